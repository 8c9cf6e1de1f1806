"""Reading H&E tiles and label maps robustly.

Every reader returns one canonical form (``read_image``: (H, W, 3) uint8 RGB; ``read_label``: (H, W) int32)
whatever the file holds, and every problem becomes one :class:`DataError` that names the file and says what to do.
TIFF goes through ``tifffile`` (it handles planar, multi-page and >8-bit TIFFs that PIL mis-reads), with PIL as
the fallback for codecs tifffile cannot decode without ``imagecodecs`` (LZW); everything else through PIL.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from bundle.core.errors import DataError

__all__ = [
    "TIFF_SUFFIXES",
    "IMAGE_SUFFIXES",
    "read_image",
    "to_uint8",
    "to_rgb",
    "check_single_frame",
    "read_label",
    "read_label_and_kind",
    "label_kind",
    "infer_label_kind",
    "image_size",
    "tile_id",
]

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

LabelKind = Literal["instance", "binary"]


def _fail(path: str | os.PathLike, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: {problem}. {fix}")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise _fail(path, what, "Check the path, or re-create the dataset with scripts/prepare_data.py")


def tiff_frames(tif) -> int:
    """Number of full-size frames of an open ``tifffile.TiffFile``: top-level pages of page 0's shape that are not
    reduced-resolution copies (pyramid levels, SVS thumbnails and label images have other shapes or flags)."""
    pages = tif.pages
    first = pages.first if hasattr(pages, "first") else pages[0]
    n = 0
    for page in pages:
        if page.shape == first.shape and not int(getattr(page, "subfiletype", 0) or 0) & 1:
            n += 1
    return n


def check_single_frame(tif, path: str | os.PathLike) -> None:
    """Refuse a multi-frame TIFF (a stack, a time series, pages saved one after another): which frame is the tile
    is the user's choice, not the reader's."""
    n = tiff_frames(tif)
    if n > 1:
        raise _fail(path, f"holds {n} frames of the same size (a multi-page TIFF, a stack), expected one 2D image",
                    "Save each frame as its own file (e.g. tifffile.imwrite per frame) and segment those")


def _read_tiff(path: Path) -> tuple[np.ndarray, int | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series or not len(tif.pages) or not tif.series[0].shape or 0 in tif.series[0].shape:
            raise _fail(path, "holds no image data (a TIFF header without an image)",
                        "The file is empty or truncated; re-export it")
        series = tif.series[0]
        arr, axes = series.asarray(), series.axes
        bits = getattr(tif.pages[0], "bitspersample", None)
        arr = _tiff_to_yxs(arr, axes, path)
        check_single_frame(tif, path)
    container = arr.dtype.itemsize * 8 if arr.dtype.kind in "ui" else None
    return arr, (int(bits) if bits and container and int(bits) < container else None)


def _read_pil(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as im:
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            raise _fail(path, f"holds {n_frames} frames (a stack), expected one 2D image",
                        "Save each tile as its own single-frame file")
        mode = im.mode
        if mode == "P":
            # palette -> RGB(A): keep transparency information if the palette has it
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode == "1":
            im = im.convert("L")
        return np.asarray(im), mode


def _read_raw(path: str | os.PathLike) -> tuple[np.ndarray, int | None, str | None]:
    """Decode ``path`` into a numpy array without changing its values.

    Returns ``(array, bits_per_sample, pil_mode)``: ``bits_per_sample`` is the declared bit depth when the
    file states one that is smaller than the container (e.g. 12-bit data in a 16-bit TIFF), else ``None``;
    ``pil_mode`` is the PIL mode when PIL decoded the file, else ``None``.
    TIFF goes to tifffile first; if it cannot decode (e.g. LZW - the MoNuSeg release's compression - needs the
    optional ``imagecodecs`` package), PIL's libtiff decoder is tried before giving up.
    """
    path = Path(path)
    _check_exists(path)
    tiff_error: Exception | None = None
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            arr, bits = _read_tiff(path)
            return arr, bits, None
        except DataError:
            raise
        except Exception as exc:
            tiff_error = exc
    try:
        with warnings.catch_warnings():
            if tiff_error is not None:  # a TIFF tifffile rejected: PIL's complaints would only repeat it
                warnings.simplefilter("ignore")
            arr, mode = _read_pil(path)
        return arr, None, mode
    except DataError:
        raise
    except Exception as exc:  # PIL/tifffile raise many types for corrupt or truncated files
        why = f"{type(exc).__name__}: {exc}"
        if tiff_error is not None:
            why = f"tifffile: {type(tiff_error).__name__}: {tiff_error}; PIL: {why}"
        raise _fail(path, f"cannot be decoded as an image ({why})",
                    "The file is corrupt, truncated or not an image; re-download or re-export it") from exc


def _tiff_to_yxs(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reorder a tifffile array with axes such as ``"SYX"`` / ``"YXS"`` into (H, W[, C]); refuse stacks."""
    extra = [(a, n) for a, n in zip(axes, arr.shape) if a not in "YXS" and n > 1]
    if extra or "Y" not in axes or "X" not in axes:
        raise _fail(path, f"has shape {arr.shape} (axes {axes!r}): a 3D stack, not a 2D image",
                    "Save each tile as its own 2D image (H, W) or (H, W, 3)")
    keep = [axes.index("Y"), axes.index("X")] + ([axes.index("S")] if "S" in axes else [])
    drop = tuple(i for i in range(arr.ndim) if i not in keep)
    arr = arr.squeeze(axis=drop) if drop else arr
    order = sorted(keep)
    return np.transpose(arr, [order.index(k) for k in keep])


def _as_2d_planes(arr: np.ndarray, path: Path) -> np.ndarray:
    """Return ``arr`` as (H, W) or (H, W, C) with C in 1..4, refusing stacks and degenerate shapes."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        raise _fail(path, f"has shape {arr.shape}: a 3D stack, not a 2D image",
                    "Save each tile as its own 2D image (H, W) or (H, W, 3)")
    if arr.ndim not in (2, 3):
        raise _fail(path, f"has shape {arr.shape}, expected a 2D image (H, W) or (H, W, 3)",
                    "Save each tile as its own 2D image")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise _fail(path, f"has shape {arr.shape}, which is not a 2D image (a side is shorter than 2 pixels)",
                    "Check that the file holds an image tile, not a vector or a single pixel")
    return arr


#: whether an undeclared bit depth read from the values was said (once per process: a folder of such tiles)
_DEPTH_WARNED: list[bool] = []


def _used_depth(hi: float, path: str | os.PathLike) -> int:
    """The bit depth of 16-bit-container data that uses only 8, 10, 12 or 14 bits (a camera's 12-bit data saved as
    16-bit without declaring it): shifting by 8 would leave 0-6 bits of contrast. Said once, with the fix."""
    depth = next(d for d in (8, 10, 12, 14) if hi < 2**d)
    if not _DEPTH_WARNED:
        _DEPTH_WARNED.append(True)
        logging.getLogger(__name__).warning(
            f"{path}: 16-bit image whose values all fit {depth} bits (max {int(hi)}): read as {depth}-bit data "
            f"(value >> {depth - 8}), not as dark 16-bit data; other such files are read alike without this "
            f"warning. To make it explicit, save the files with their bit depth declared (TIFF "
            f"BitsPerSample={depth}) or scaled to the full 16-bit range (value << {16 - depth})")
    return depth


def to_uint8(
    arr: np.ndarray, path: str | os.PathLike, bits: int | None = None, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """THE rule for turning stored pixel values into 8-bit ones, used by every reader (whole tiles through
    :func:`read_image`, regions of large TIFFs and slides through :class:`bundle.inference.slide.WSISource`):

    - uint8 as stored; bool -> 0/255;
    - unsigned integers of ``depth`` bits (``bits`` when the file declares fewer than its container holds, e.g.
      12-bit data in a 16-bit TIFF; 8, 10, 12 or 14 when undeclared 16-bit data uses no more, with a
      a warning once; else the container): ``value >> (depth - 8)``, so full-range 16-bit data
      (``v * 257``) gives back ``v`` - a shift, not a min-max stretch, so a value always maps to the same output
      whatever else is in the image; negative values or values above the depth are refused;
    - floats: in [0, 1] -> ``round(255 * x)``; in [0, 255] (max above 1) -> ``round(x)``; any other range,
      NaN or infinity is refused.

    ``value_range`` = (min, max) of the WHOLE image when ``arr`` is only a region of it: whether floats are
    [0, 1] or [0, 255] data is decided on the whole image, so every region is scaled alike.
    Raises :class:`DataError` naming ``path`` and what to do.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    lo, hi = value_range if value_range is not None else (
        (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0))
    if arr.dtype.kind in "ui":
        if arr.dtype.kind == "i" and arr.size and min(lo, float(arr.min())) < 0:
            raise _fail(path, "has negative pixel values", "Export the image as unsigned 8- or 16-bit")
        depth = bits or arr.dtype.itemsize * 8
        if arr.dtype.kind == "i" and bits is None and arr.dtype.itemsize > 2:
            # PIL opens 16-bit PNGs in mode "I" (int32) on some versions: infer 16-bit from the range
            depth = 16 if hi < 2**16 else 32
        if bits is None and depth == 16 and 0 < hi < 2**14:
            depth = _used_depth(hi, path)
        shift = max(depth - 8, 0)
        if arr.size and int(arr.max()) >= 2**depth:
            raise _fail(path, f"has values above its declared {depth}-bit depth", "Re-export the image")
        return (arr.astype(np.uint64) >> shift).astype(np.uint8)
    if arr.dtype.kind == "f":
        if arr.size and not np.isfinite(arr).all():
            raise _fail(path, "is a floating-point image with NaN or infinite values",
                        "Export it as 8-bit RGB (uint8) PNG or TIFF")
        if lo < 0 or hi > 255 or (arr.size and (float(arr.min()) < 0 or float(arr.max()) > 255)):
            raise _fail(path, f"is a floating-point image with values in [{lo:g}, {hi:g}], neither [0, 1] nor [0, 255]",
                        "Export it as 8-bit RGB (uint8) PNG or TIFF, or scale it to [0, 1]")
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.round(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    raise _fail(path, f"has unsupported pixel type {arr.dtype}", "Export it as 8-bit RGB PNG or TIFF")


def to_rgb(arr: np.ndarray, path: str | os.PathLike, bits: int | None = None,
           value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W[, C]) stored pixels -> (H, W, 3) uint8 RGB: :func:`to_uint8`, then gray replicated, an all-opaque
    alpha dropped, a partly transparent one composited on WHITE (what a slide viewer shows). The channel rules
    of :func:`read_image`, shared with the region readers of :mod:`bundle.inference.slide`."""
    arr = to_uint8(arr, path, bits, value_range)
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c not in (1, 2, 3, 4):
        raise _fail(path, f"has {c} samples per pixel, expected gray, gray+alpha, RGB or RGBA",
                    "Export it as 8-bit RGB PNG or TIFF")
    if c in (2, 4):
        colour, alpha = arr[..., :-1], arr[..., -1:]
        if (alpha == 255).all():
            arr = colour
        else:
            a = alpha.astype(np.float32) / 255.0
            arr = np.round(colour.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)
        c -= 1
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an H&E tile as (H, W, 3) uint8 RGB.

    Conversions (values are never min-max stretched):
    - grayscale (H, W) or (H, W, 1) -> the one channel replicated three times;
    - palette -> RGB through the palette; mode ``"1"`` -> 0/255;
    - RGBA / gray+alpha -> the alpha channel is dropped when it is all opaque (as in the TNBC release),
      otherwise the colour is composited on a WHITE background (``rgb * a + 255 * (1 - a)``, rounded),
      which is what a slide viewer shows for transparent pixels;
    - 16-bit (or 12-bit declared in a TIFF) -> 8-bit by dropping the low bits (``value >> 8`` for full-range
      16-bit); floats in [0, 1] -> ``round(255 * x)``, in [0, 255] -> ``round(x)``, others refused
      (:func:`to_uint8`, the rule every reader shares);
    - multi-frame files (GIF, multi-page TIFF) are refused: which frame is the tile is the user's choice.

    Raises :class:`DataError` (naming the file) for a missing, corrupt or non-2D file (a 3D stack, 1xN).
    """
    path = Path(path)
    arr, bits, _ = _read_raw(path)
    return to_rgb(_as_2d_planes(arr, path), path, bits)


def infer_label_kind(raw: np.ndarray) -> LabelKind:
    """``"binary"`` for a boolean or 8-bit map whose values are a subset of {0, 1} or {0, 255}, else ``"instance"``.

    16/32-bit maps are always instance maps (an instance map with a single nucleus is also valid binary).
    """
    if raw.dtype == bool:
        return "binary"
    if raw.dtype == np.uint8:
        values = np.unique(raw)
        if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
            return "binary"
    return "instance"


def _label_plane(raw: np.ndarray, path: Path) -> np.ndarray:
    raw = _as_2d_planes(raw, path)
    if raw.ndim == 3:
        # RGB(A) label: acceptable only if it is a grey image stored as colour; an opaque or absent alpha
        colour = raw[..., :3] if raw.shape[-1] >= 3 else raw[..., :1]
        if raw.shape[-1] in (2, 4) and not (raw[..., -1] == raw[..., -1].flat[0]).all():
            raise _fail(path, "is a label map with a varying alpha channel", "Save labels as single-channel PNG")
        if not (colour == colour[..., :1]).all():
            raise _fail(path, "is a colour label map (channels differ)",
                        "Save labels as a single-channel uint16 instance map or a 0/255 binary mask")
        raw = colour[..., 0]
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
            raise _fail(path, "is a floating-point label map with non-integer values",
                        "Save labels as integer (uint16) instance maps or 0/255 masks")
        raw = raw.astype(np.int64)
    if raw.dtype.kind not in "uib":
        raise _fail(path, f"has unsupported label type {raw.dtype}", "Save labels as uint16 or uint8 PNG")
    if raw.size and raw.dtype != bool and (raw.min() < 0 or int(raw.max()) > np.iinfo(np.int32).max):
        raise _fail(path, "has label values outside 0..2**31-1", "Labels must be 0 (background) or positive ids")
    return raw


_WARNED: set[str] = set()


def read_label_and_kind(
    path: str | os.PathLike, kind: Literal["auto", "instance", "binary"] = "auto"
) -> tuple[np.ndarray, LabelKind]:
    """Read a label map as (H, W) int32 and say whether it is an ``"instance"`` or ``"binary"`` map.

    ``kind="auto"`` decides with :func:`infer_label_kind`; ``"binary"`` maps any non-zero value to 1;
    ``"instance"`` keeps the values as stored (0 = background, k > 0 = nucleus k).
    Colour labels are accepted only when the three channels are identical.
    """
    if kind not in ("auto", "instance", "binary"):
        raise ValueError(f"kind must be 'auto', 'instance' or 'binary', got {kind!r}")
    path = Path(path)
    raw, _, _ = _read_raw(path)
    plane = _label_plane(raw, path)
    resolved: LabelKind = infer_label_kind(plane) if kind == "auto" else kind
    if kind == "auto" and resolved == "instance" and plane.dtype == np.uint8 and str(path) not in _WARNED:
        _WARNED.add(str(path))  # once per file and process, not every epoch
        values = np.unique(plane)
        import logging

        logging.getLogger(__name__).warning(
            f"{path}: 8-bit label map with {len(values)} values ({', '.join(map(str, values[:6].tolist()))}"
            f"{', ...' if len(values) > 6 else ''}), not a 0/255 mask: read as an INSTANCE map (each value one "
            "nucleus). If it is a mask, save it as 0/255 (or put it under masks/)")
    if resolved == "binary":
        return (plane != 0).astype(np.int32), "binary"
    return plane.astype(np.int32), "instance"


def read_label(path: str | os.PathLike, kind: Literal["auto", "instance", "binary"] = "auto") -> np.ndarray:
    """Read a label map as (H, W) int32: instance ids kept, binary masks (0/255, 0/1, mode 1) -> 0/1.

    See :func:`read_label_and_kind` for the rules; use it (or :func:`label_kind`) to learn which kind it was.
    """
    return read_label_and_kind(path, kind)[0]


def label_kind(path: str | os.PathLike) -> LabelKind:
    """Whether the label file at ``path`` is an ``"instance"`` or a ``"binary"`` map (decodes the file)."""
    return read_label_and_kind(path, "auto")[1]


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file read from its header only (PIL / tifffile do not decode the pixels here)."""
    path = Path(path)
    _check_exists(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
                axes = tif.series[0].axes
            if "Y" in axes and "X" in axes:
                return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
            return int(shape[0]), int(shape[1])
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception as exc:
        raise _fail(path, f"cannot be opened as an image ({type(exc).__name__}: {exc})",
                    "The file is corrupt or not an image; re-download or re-export it") from exc


def tile_id(path: str | os.PathLike) -> str:
    """Output stem of a tile: its file name without the image suffix (``a.ome.tif`` -> ``a.ome``)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
