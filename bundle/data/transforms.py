"""Preprocessing, target generation and augmentation of H&E tiles for DS-HFN (paper §4.1-4.2), as MONAI transforms.

Every step exists as an array ``Transform`` (``Foo``, channel-first ``(C, H, W)`` numpy array or torch tensor /
``MetaTensor`` in, same type out, metadata kept) and a dictionary ``MapTransform`` (``Food``, with ``keys`` and
``allow_missing_keys``), so each is a JSON-instantiable step of a bundle config:

- :class:`TileReader` / :class:`LoadTile` / :class:`LoadTiled`: a tile through :mod:`bundle.data.io` -> image
  ``(3, H, W)`` float32 RGB 0..255, label ``(1, H, W)`` int32 (instance ids, or 0/1 for binary masks); the path is
  kept in the ``MetaTensor`` meta ``"filename_or_obj"`` so MONAI writers and handlers can name their outputs.
- :class:`ReinhardNormalize` (Reinhard et al. 2001 colour transfer in CIE L*a*b*) and :func:`reinhard_reference`.
- :class:`Grayscale`: RGB -> 1-channel luma (ITU-R BT.601 by default, BT.709 as skimage ``rgb2gray``).
- :class:`CleanMask`: the paper's "segmentation masks were refined using morphological operations to suppress
  label noise": drops specks < ``min_size`` pixels and fills holes <= ``max_hole_size`` pixels inside each nucleus.
- :class:`NucleiTargets`: label map -> the 2-channel target ``(2, H, W)`` float32 {0, 1} of the shared data
  contract: channel 0 = nucleus foreground, channel 1 = boundary map (``skimage.segmentation.find_boundaries``).

The chains themselves are defined once, in ``configs/train.json``: ``base_transforms`` (load, clean the label,
Reinhard, resize to the model scale with :class:`bundle.data.scale.ToModelScaled`, pad to ``spatial_size``),
``input_transforms`` (:class:`bundle.data.channels.ModelInputd`), ``target_transforms`` (:class:`NucleiTargetsd`,
per-channel z-score), ``random_crop``, ``stain_augmentation`` and ``train#augmentation``, assembled into
``train#preprocessing`` and ``validate#preprocessing``. Design choices (why):

- Order: the deterministic steps come first (everything in ``base_transforms``), so a ``CacheDataset`` caches
  them. Targets come after every geometric step so that the boundary channel is recomputed on the label actually
  seen at training resolution (crisp, 1 pixel wide, consistent with the region channel) instead of being
  resampled as a thin line that nearest/bilinear interpolation would break or blur.
- Reinhard before the resize: the colour statistics are those of the full-resolution tile (the space is the one
  the reference is computed in); being a per-pixel map it commutes with resizing up to interpolation.
- Resize to the model scale: bicubic with anti-aliasing for the image (MONAI's bicubic alone samples the Keys
  cubic at output pixel centres with no low-pass filter, which aliases chromatin texture when shrinking by more
  than 2; ``anti_aliasing`` applies a Gaussian of sigma (s - 1) / 2 first, skimage.transform.resize's rule), and
  ``"nearest-exact"`` for the label (pixel-centre sampling, the same grid as bicubic with
  ``align_corners=False``; torch's legacy ``"nearest"`` takes the top-left pixel of each cell and shifts the label
  by up to (s - 1) / 2 input pixels relative to the image).
- Augmentation after the crop at model scale (cheaper, and the label is resampled only once by nearest before
  the targets are drawn). Rotations by multiples of 90 degrees and flips are exact; small rotations (+-15
  degrees) and elastic warps use reflection padding so no black corners appear that have no nucleus label. No
  random translation beyond the crop: the network is fully convolutional.
- Reinhard reference: a dict ``{"means": [L, a, b], "stds": [L, a, b]}`` stored in the config (``@reinhard_reference``),
  computed by ``scripts/reinhard_stats.py`` from the training images of a split.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor, PathLike
from monai.data import ImageReader
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import (
    convert_data_type,
    convert_to_dst_type,
    ensure_tuple,
    ensure_tuple_rep,
)
from scipy import ndimage as ndi
from skimage.color import lab2rgb, rgb2lab
from skimage.morphology import remove_small_objects
from skimage.segmentation import find_boundaries

from bundle.data.instance_targets import INSTANCE_TARGETS, instance_target
from bundle.data.io import IMAGE_SUFFIXES, read_image, read_label_and_kind

__all__ = [
    "TileReader",
    "LoadTile",
    "LoadTiled",
    "lab_statistics",
    "reinhard_reference",
    "ReinhardNormalize",
    "ReinhardNormalized",
    "LUMA_WEIGHTS",
    "Grayscale",
    "clean_label_map",
    "CleanMask",
    "CleanMaskd",
    "NucleiTargets",
    "NucleiTargetsd",
]


def _as_numpy(img: NdarrayOrTensor, dtype: Any = None) -> np.ndarray:
    return convert_data_type(img, np.ndarray, dtype=dtype)[0]


def _check_channels(img: NdarrayOrTensor, channels: int, what: str) -> None:
    if img.ndim != 3 or img.shape[0] != channels:
        raise ValueError(f"{what} expects a channel-first ({channels}, H, W) array, got shape {tuple(img.shape)}")


# ----------------------------------------------------------------------------------------------------- loading
class TileReader(ImageReader):
    """MONAI ``ImageReader`` for 2D tiles (PNG/TIFF/JPEG) through :mod:`bundle.data.io`.

    ``kind="image"`` gives (H, W, 3) uint8 RGB (:func:`bundle.data.io.read_image`), ``kind="label"`` (H, W) int32
    (:func:`bundle.data.io.read_label_and_kind` with ``label_kind``; meta ``"label_kind"`` says "instance" or
    "binary"). Rows stay rows: unlike MONAI's ``PILReader`` nothing is transposed, so arrays match what
    numpy/skimage show. Usable as ``LoadImaged(keys, reader="bundle.data.transforms.TileReader", kind="label")``,
    but prefer :class:`LoadTiled`: ``LoadImage`` wraps errors of a reader it was given at construction into a
    RuntimeError with a traceback, while :class:`LoadTile` lets the one-line :class:`bundle.core.errors.DataError` through.
    """

    def __init__(self, kind: str = "image", label_kind: str = "auto") -> None:
        if kind not in ("image", "label"):
            raise ValueError(f"TileReader kind must be 'image' or 'label', got {kind!r}")
        self.kind = kind
        self.label_kind = label_kind

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(str(f).lower().endswith(IMAGE_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> list[tuple[np.ndarray, dict]]:
        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"TileReader reads one 2D tile at a time, got {len(files)} files: {files}")
        path = files[0]
        if self.kind == "image":
            return [(read_image(path), {"original_channel_dim": -1})]
        label, label_kind = read_label_and_kind(path, self.label_kind)
        # no channel axis: EnsureChannelFirst adds one
        return [(label, {"original_channel_dim": float("nan"), "label_kind": label_kind})]

    def get_data(self, img: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
        array, meta = img[0]
        meta = dict(meta, spatial_shape=np.asarray(array.shape[:2]))
        return array, meta


class LoadTile(Transform):
    """Load one tile file: ``kind="image"`` -> (3, H, W) float32 RGB 0..255, ``kind="label"`` -> (1, H, W) int32.

    Returns a ``MetaTensor`` whose meta holds ``"filename_or_obj"`` (the path), ``"spatial_shape"`` and, for
    labels, ``"label_kind"``. Bad files raise :class:`bundle.core.errors.DataError` naming the file.
    """

    def __init__(self, kind: str = "image", label_kind: str = "auto") -> None:
        self.reader = TileReader(kind, label_kind)
        dtype = np.float32 if kind == "image" else np.int32
        self._load = LoadImage(reader=self.reader, image_only=True, ensure_channel_first=True, dtype=dtype)

    def __call__(self, filename: PathLike) -> torch.Tensor:
        # the runtime reader= path of LoadImage does not swallow the reader's DataError
        return self._load(os.fspath(filename), reader=self.reader)


class LoadTiled(MapTransform):
    """Dictionary form of :class:`LoadTile`: ``kinds[i]`` ("image" or "label") says how to read ``keys[i]``."""

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        kinds: Sequence[str] | str = ("image", "label"),
        label_kind: str = "auto",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        kinds = ensure_tuple_rep(kinds, len(self.keys))
        self.loaders = {key: LoadTile(kind, label_kind) for key, kind in zip(self.keys, kinds)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loaders[key](d[key])
        return d


# --------------------------------------------------------------------------------------------------- Reinhard
def lab_statistics(rgb: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (3 + 3 floats) of a (3, H, W) RGB 0..255 image in CIE L*a*b*.

    All pixels count (no tissue mask): the TNBC and MoNuSeg tiles are cut from tissue and have little glass, and
    :class:`ReinhardNormalize` matches exactly these all-pixel statistics, so reference and image agree.
    """
    _check_channels(rgb, 3, "lab_statistics")
    lab = rgb2lab(np.moveaxis(_as_numpy(rgb, np.float64), 0, -1) / 255.0).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


def reinhard_reference(images: Iterable[np.ndarray]) -> dict[str, list[float]]:
    """Reference statistics for :class:`ReinhardNormalize` from (H, W, 3) RGB tiles (as ``bundle.data.io.read_image``).

    Returns ``{"means": [L, a, b], "stds": [L, a, b]}``: the mean over images of each image's all-pixel L*a*b*
    means and standard deviations (every tile weighs the same whatever its size), ready for the config.
    """
    means, stds = [], []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"reinhard_reference: image {i} has shape {image.shape}, expected (H, W, 3) RGB")
        m, s = lab_statistics(np.moveaxis(image, -1, 0))
        means.append(m)
        stds.append(s)
    if not means:
        raise ValueError("reinhard_reference: no images given; check the dataset directory and the ids")
    return {"means": np.mean(means, 0).round(4).tolist(), "stds": np.mean(stds, 0).round(4).tolist()}


class ReinhardNormalize(Transform):
    """Reinhard et al. 2001 colour transfer: match each L*a*b* channel's mean and std to a reference.

    ``out_c = (lab_c - mean_c) / std_c * ref_std_c + ref_mean_c`` for c in (L*, a*, b*), then back to RGB and
    clipped to [0, 255]. Input and output: (3, H, W) RGB 0..255 (float32 out).

    Space: CIE L*a*b* (D65, ``skimage.color.rgb2lab`` / ``lab2rgb``) instead of Reinhard's l-alpha-beta (log-LMS
    decorrelated by a fixed rotation). Both separate lightness from two opponent-colour axes, which is what makes
    per-channel matching work; L*a*b* has a tested, exactly invertible implementation in skimage and is what
    common stain-normalisation code (staintools, OpenCV-based pipelines) uses. Out-of-gamut colours are clipped by
    ``lab2rgb`` (its warning about clipped negative Z is silenced on purpose), so the output statistics match the
    reference only approximately.
    """

    def __init__(self, means: Sequence[float], stds: Sequence[float], eps: float = 1e-6) -> None:
        self.means = np.asarray(means, dtype=np.float64)
        self.stds = np.asarray(stds, dtype=np.float64)
        if self.means.shape != (3,) or self.stds.shape != (3,) or (self.stds <= 0).any():
            raise ValueError(
                f"ReinhardNormalize needs 3 L*a*b* means and 3 positive stds (see scripts/reinhard_stats.py), "
                f"got means={means}, stds={stds}"
            )
        self.eps = eps

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_channels(img, 3, "ReinhardNormalize")
        lab = rgb2lab(np.moveaxis(_as_numpy(img, np.float64), 0, -1) / 255.0)
        mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
        lab = (lab - mean) / np.maximum(std, self.eps) * self.stds + self.means
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*negative Z values.*")
            rgb = lab2rgb(lab)
        out = np.clip(np.moveaxis(rgb, -1, 0) * 255.0, 0.0, 255.0).astype(np.float32)
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class ReinhardNormalized(MapTransform):
    """Dictionary form of :class:`ReinhardNormalize`."""

    def __init__(
        self,
        keys: KeysCollection,
        means: Sequence[float],
        stds: Sequence[float],
        eps: float = 1e-6,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = ReinhardNormalize(means, stds, eps)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


# -------------------------------------------------------------------------------------------------- grayscale
LUMA_WEIGHTS: dict[str, tuple[float, float, float]] = {
    # ITU-R BT.601 luma: PIL convert("L"), OpenCV COLOR_RGB2GRAY, torchvision rgb_to_grayscale (0.2989)
    "bt601": (0.299, 0.587, 0.114),
    # ITU-R BT.709 / sRGB coefficients: skimage.color.rgb2gray
    "bt709": (0.2125, 0.7154, 0.0721),
}


class Grayscale(Transform):
    """RGB (3, H, W) -> luma (1, H, W) float32, ``Y = w_R R + w_G G + w_B B`` in the input's value range.

    ``weights="bt601"`` (default) is ITU-R BT.601 luma, i.e. PIL ``convert("L")`` without its rounding to uint8
    and OpenCV/torchvision grayscale, what a PyTorch pipeline such as the paper's most likely used; ``"bt709"``
    equals ``skimage.color.rgb2gray`` (times the input scale). Own one-liner rather than torchvision's so both
    conventions work on numpy arrays and MetaTensors alike.
    """

    def __init__(self, weights: str | Sequence[float] = "bt601") -> None:
        if isinstance(weights, str):
            if weights not in LUMA_WEIGHTS:
                raise ValueError(
                    f"Grayscale weights must be one of {sorted(LUMA_WEIGHTS)} or 3 floats, got {weights!r}"
                )
            weights = LUMA_WEIGHTS[weights]
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != 3:
            raise ValueError(f"Grayscale needs 3 weights (R, G, B), got {weights}")

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_channels(img, 3, "Grayscale")
        dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
        img = convert_to_dst_type(img, img, dtype=dtype)[0]
        w_r, w_g, w_b = self.weights
        return w_r * img[0:1] + w_g * img[1:2] + w_b * img[2:3]


# ------------------------------------------------------------------------------------------- label cleaning
def clean_label_map(label: np.ndarray, min_size: int = 10, max_hole_size: int = 10) -> np.ndarray:
    """Remove objects with fewer than ``min_size`` pixels and fill holes of <= ``max_hole_size`` pixels per object.

    ``label`` (H, W) is an instance map (0 = background) or a 0/1 mask; a 0/1 mask is split into 8-connected
    components first, so "object" always means one nucleus (or one clump of merged nuclei). Holes are filled per
    object, never in the union: gaps enclosed by several touching nuclei (up to ~1000 px in MoNuSeg) are real
    background. A filled hole takes the id of the object around it; the output keeps the input's kind.
    """
    label = np.asarray(label)
    binary = label.max(initial=0) <= 1
    objects = ndi.label(label > 0, structure=np.ones((3, 3)))[0] if binary else label.astype(np.int64)
    if min_size > 1:
        objects = remove_small_objects(objects, max_size=min_size - 1)
    if max_hole_size > 0:
        filled = objects.copy()
        for i, box in enumerate(ndi.find_objects(objects), start=1):
            if box is None:
                continue
            inside = objects[box] == i
            # fill_holes, not remove_small_holes: a gap touching the crop's edge is open to the outside
            holes, _ = ndi.label(ndi.binary_fill_holes(inside) & ~inside)
            small = np.bincount(holes.ravel()) <= max_hole_size
            small[0] = False
            filled[box][small[holes] & (objects[box] == 0)] = i
        objects = filled
    out = (objects > 0) if binary else objects
    return out.astype(label.dtype)


class CleanMask(Transform):
    """Morphological label refinement (paper §4.1) on a (1, H, W) label map; see :func:`clean_label_map`.

    A step of ``base_transforms`` in ``configs/train.json`` with ``min_size=10, max_hole_size=10`` at the tile's
    native resolution, because the paper does it and it is cheap; its effect on these releases is small: TNBC
    loses 4 specks (10 pixels) of 4,028 components and gains 7 hole pixels, MoNuSeg loses 2 objects and gains 95
    pixels in 67 holes of 1-4 pixels. Nothing a pathologist would call a nucleus changes.
    """

    def __init__(self, min_size: int = 10, max_hole_size: int = 10) -> None:
        self.min_size = int(min_size)
        self.max_hole_size = int(max_hole_size)

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_channels(label, 1, "CleanMask")
        cleaned = clean_label_map(_as_numpy(label)[0], self.min_size, self.max_hole_size)
        return convert_to_dst_type(cleaned[None], label)[0]


class CleanMaskd(MapTransform):
    """Dictionary form of :class:`CleanMask`."""

    def __init__(
        self, keys: KeysCollection, min_size: int = 10, max_hole_size: int = 10, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.clean = CleanMask(min_size, max_hole_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clean(d[key])
        return d


# ------------------------------------------------------------------------------------------------- targets
class NucleiTargets(Transform):
    """Label map (1, H, W) (instance ids or 0/1) -> training target (2, H, W) float32 in {0, 1}.

    Channel 0 = foreground ``label > 0``; channel 1 = ``skimage.segmentation.find_boundaries(label, connectivity,
    mode)``: with instance ids these are the pixels of a nucleus next to background OR to another nucleus (so
    touching nuclei are separated), with a binary mask the contours of its connected blobs.

    ``mode="inner"`` (default) keeps the boundary inside the nucleus (a subset of channel 0), 1 pixel wide, 4-
    neighbour test (``connectivity=1``). Why: at 256x256 a nucleus is ~10 (TNBC) or ~5 (MoNuSeg, 1000->256)
    pixels across, and even this 1-pixel band is 30 % (TNBC) / 53 % (MoNuSeg) of the foreground; ``"thick"``
    doubles it by adding a band outside, which for MoNuSeg is larger than the nuclei themselves. The inner band
    is the thinnest target that still marks every contour (and a 2-pixel gap between touching nuclei),
    and it lies where eq. 20's refinement ``Y_seg * (1 + lambda * Y_edge)`` raises the region probability:
    on the nucleus rim, not on the background outside it. Tile borders are not boundaries (skimage
    reflects at the edge). Apply after every geometric transform of the label (see the module docstring);
    a float label from ``mode="nearest"`` resampling is rounded back to ids.
    """

    def __init__(self, mode: str = "inner", connectivity: int = 1, width: int = 1) -> None:
        if mode not in ("inner", "outer", "thick"):
            raise ValueError(f"NucleiTargets mode must be 'inner', 'outer' or 'thick', got {mode!r}")
        if connectivity not in (1, 2):
            raise ValueError(f"NucleiTargets connectivity must be 1 or 2, got {connectivity!r}")
        if int(width) != width or width < 1:
            raise ValueError(f"NucleiTargets width must be a positive integer, got {width!r}")
        if width > 1 and mode != "inner":
            raise ValueError("NucleiTargets width > 1 is defined for mode='inner' only")
        self.mode = mode
        self.connectivity = connectivity
        self.width = int(width)

    def boundary(self, ids: np.ndarray) -> np.ndarray:
        """Boundary channel of an (H, W) id map: ``find_boundaries`` (1 pixel); for ``width`` w > 1 the pixels of a
        nucleus with another id (or background) within w steps (a radius-w diamond for ``connectivity=1``, square
        for 2), so touching nuclei are parted by a 2w-pixel band; tile borders reflect, as in skimage."""
        if self.width == 1:
            return find_boundaries(ids, connectivity=self.connectivity, mode=self.mode, background=0)
        footprint = ndi.iterate_structure(ndi.generate_binary_structure(2, self.connectivity), self.width)
        differs = (ndi.grey_dilation(ids, footprint=footprint) != ids) | (ndi.grey_erosion(ids, footprint=footprint) != ids)
        return differs & (ids > 0)

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_channels(label, 1, "NucleiTargets")
        ids = np.rint(_as_numpy(label)[0]).astype(np.int64)
        target = np.stack([ids > 0, self.boundary(ids)]).astype(np.float32)
        dtype = torch.float32 if isinstance(label, torch.Tensor) else np.float32
        return convert_to_dst_type(target, label, dtype=dtype)[0]


class NucleiTargetsd(MapTransform):
    """Dictionary form of :class:`NucleiTargets`: reads ``keys`` (default "label") and replaces them by the target.

    ``kind_key``: the item key naming the label kind (``"label_kind"`` of the datalists). When set, a third
    channel is added: the boundary weight, 1 for instance labels and ``binary_weight`` (default 0) for binary
    masks, whose merged blobs hide the borders between touching nuclei (:class:`bundle.model.losses.DSHFNLoss` then
    trains the boundary decoder on instance-labelled tiles only and the region decoder on all). Training on
    binary masks alone, set ``binary_weight=1`` so the boundary decoder learns the blob contours.

    ``instance_target``: ``"hv"`` or ``"distance"`` (:mod:`bundle.data.instance_targets`) appends, after the
    boundary weight (1 everywhere without ``kind_key``), the instance weight (1 for instance labels, always 0 for
    binary masks: their blobs are not nuclei) and the target's 2 or 1 channels (zeros for binary masks).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        mode: str = "inner",
        connectivity: int = 1,
        width: int = 1,
        kind_key: str | None = None,
        binary_weight: float = 0.0,
        instance_target: str = "none",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if instance_target not in INSTANCE_TARGETS:
            raise ValueError(f"NucleiTargetsd: instance_target must be one of {list(INSTANCE_TARGETS)}, got {instance_target!r}")
        self.targets = NucleiTargets(mode, connectivity, width)
        self.kind_key = kind_key
        self.binary_weight = float(binary_weight)
        self.instance_target = instance_target

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            target = self.targets(d[key])
            if self.kind_key is not None and self.kind_key not in d:
                raise KeyError(f"NucleiTargetsd: item has no {self.kind_key!r} (instance or binary); keys: {sorted(map(str, d))}")
            binary = self.kind_key is not None and d[self.kind_key] == "binary"
            extra = []
            if self.kind_key is not None or self.instance_target != "none":
                extra.append(np.full((1, *target.shape[1:]), self.binary_weight if binary else 1.0, np.float32))
            if self.instance_target != "none":
                ids = np.rint(_as_numpy(d[key])[0]).astype(np.int64)
                inst = instance_target(np.zeros_like(ids) if binary else ids, self.instance_target)
                extra += [np.full_like(extra[0], 0.0 if binary else 1.0), inst]
            if extra:
                stacked = np.concatenate(extra).astype(np.float32)
                target = torch.cat([target, convert_to_dst_type(stacked, target)[0]]) if isinstance(target, torch.Tensor) \
                    else np.concatenate([target, stacked])
            d[key] = target
        return d
