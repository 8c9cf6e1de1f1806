"""Nucleus segmentation of images of any size in chunks, with memory bounded by the chunk size.

A large tile or a slide level is processed chunk by chunk on a grid at MODEL scale (the network's
``MODEL_PIXEL_SIZE``; :mod:`bundle.inference`). Per chunk (one axis shown; every interval is clipped to the image)::

    core   [c0, c1)                  the chunks' cores partition the image
    exact  [c0 - halo, c1 + halo)    where the chunk's probability maps are needed
    net    [R0, R1) = [floor((c0 - halo - roi) / stride) * stride, c1 + halo + roi)

``net`` is what the sliding-window network (MONAI ``SlidingWindowInferer``, the same settings as
``configs/inference.json``) sees. Because R0 lies on the whole image's window grid (multiples of the window
stride) and ``net`` reaches one window (``roi``) beyond ``exact``, every window that covers a pixel of ``exact``
in a whole-image pass is also a window of this chunk, with the same input pixels, and no other window covers it:
the chunk's maps on ``exact`` equal a whole-image pass (up to float rounding). There is no seam to blend away.

Preprocessing gives the same values as on the whole image too: Reinhard (fixed source statistics measured once
for the whole image, :func:`image_statistics`) and the grayscale are per pixel; the anti-aliased bicubic resize
to model scale (what ``bundle.inference.ToModelScaled`` = MONAI ``Resize`` computes) is evaluated at the global
sampling positions from a native region read with enough margin for the blur and the four cubic taps.

Nuclei: the chunk's native core is cut into post-processing blocks (``post_chunk`` native px); each block runs
the watershed (:func:`bundle.instances.instances_from_maps`) on the block plus ``post_halo`` pixels of the exact
maps and keeps only the nuclei whose centroid lies in the block. The blocks partition the image, so every
nucleus is kept exactly once; a nucleus crossing a block border is segmented whole inside the halo (the halo is
much wider than a nucleus), so none is cut. The nucleus table, GeoJSON features and the instance label map are
filled block by block (:class:`TileOutputs`, :class:`bundle.slide.SlideOutputs`), the GeoJSON and CSV streamed
to disk, the overlay and TIFF label map written tile by tile, so memory stays bounded by the chunk size; only a
tile's uint16 label map is image-sized (slides keep none).

Also here: a float32 CIE L*a*b* conversion equal to scikit-image's (:func:`rgb_to_lab`, :func:`lab_to_rgb`) that
makes Reinhard ~10x cheaper, and the folder-mode pieces of ``configs/inference.json`` (:class:`GuardedDataset`,
:class:`GuardedIteration`, :func:`shard`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import Dataset
from monai.inferers import SlidingWindowInferer
from monai.networks.layers.convutils import gaussian_1d
from scipy import ndimage, sparse
from skimage.segmentation import find_boundaries

from bundle.channels import rgb_to_input
from bundle.exports import _table_csv, instances_geojson, nucleus_table, write_instance_map
from bundle.inference import MODEL_PIXEL_SIZE, scale_factor
from bundle.instances import WatershedParams, instances_from_maps, nearest_index, relabel_consecutive
from bundle.io import DataError, atomic_write, write_png_atomic
from bundle.postprocessing import BOUNDARY, REGION
from bundle.transforms import LUMA_WEIGHTS
from bundle.visualize import PRED_RGB

logger = logging.getLogger(__name__)

__all__ = [
    "rgb_to_lab",
    "lab_to_rgb",
    "ImageStats",
    "image_statistics",
    "reinhard_gray",
    "RegionSource",
    "ArraySource",
    "ChunkGeometry",
    "chunk_grid",
    "model_size",
    "resample_matrix",
    "to_model_scale",
    "SlidingWindowPredictor",
    "ChunkMaps",
    "predict_chunks",
    "NucleusBlock",
    "segment_blocks",
    "NucleusStream",
    "TileOutputs",
    "segment_image",
    "peak_rss_mib",
    "GuardedDataset",
    "GuardedIteration",
    "shard",
]

# ------------------------------------------------------------------------------------------------------------
# colour: skimage's sRGB <-> CIE L*a*b* (D65, 2 deg) in float32, vectorised
# ------------------------------------------------------------------------------------------------------------
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
# sRGB 8-bit value -> linear light: exact for uint8 input, which is what tiles and slides hold
_LINEAR_LUT_F32 = np.where(
    np.arange(256) / 255.0 > 0.04045, ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4, np.arange(256) / 255.0 / 12.92
).astype(np.float32)


def _mix(planes: Sequence[np.ndarray], matrix: np.ndarray) -> list[np.ndarray]:
    """``matrix @ (p0, p1, p2)`` per pixel on separate channel planes: plain multiply-adds, because numpy's
    ``(N, 3) @ (3, 3)`` goes to a BLAS gemm whose threading costs more than the arithmetic."""
    m = matrix.astype(np.float32)
    return [m[i, 0] * planes[0] + m[i, 1] * planes[1] + m[i, 2] * planes[2] for i in range(3)]


def _lab_f(t: np.ndarray) -> np.ndarray:
    out = np.cbrt(t)
    toe = t <= 0.008856  # rare in tissue: patched after the vectorised cube root instead of a full np.where
    out[toe] = np.float32(7.787) * t[toe] + np.float32(16.0 / 116.0)
    return out


def _lab_planes(rgb: np.ndarray) -> list[np.ndarray]:
    """L*, a*, b* planes (float32, each of the image's shape without the channel axis) of (..., 3) RGB."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:  # exact 8-bit -> linear-light lookup
        planes = [np.take(_LINEAR_LUT_F32, rgb[..., c]) for c in range(3)]  # np.take: 2x faster than indexing
    else:
        c = np.asarray(rgb, np.float32) / np.float32(255.0)
        c = np.where(c > 0.04045, ((c + np.float32(0.055)) / np.float32(1.055)) ** np.float32(2.4), c / np.float32(12.92))
        planes = [c[..., i] for i in range(3)]
    fx, fy, fz = (_lab_f(t) for t in _mix(planes, _XYZ_FROM_RGB / _WHITE_D65[:, None]))
    light = np.float32(116.0) * fy - np.float32(16.0)
    fx -= fy  # in place: a* and b* reuse the f planes
    fx *= np.float32(500.0)
    fy -= fz
    fy *= np.float32(200.0)
    return [light, fx, fy]


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB 0..255 (uint8 or float) -> (..., 3) float32 L*a*b*: ``skimage.color.rgb2lab(rgb / 255)``.

    The same formulas as scikit-image (sRGB gamma, its XYZ matrix, D65 white, cube root with the linear
    toe), in float32 on channel planes: ~10x faster, within 1e-3 of skimage's float64. Written here because
    Reinhard on every chunk of a slide made skimage's L*a*b* the largest cost after the network.
    """
    return np.stack(_lab_planes(rgb), axis=-1).astype(np.float32, copy=False)


def _rgb_planes(lab: Sequence[np.ndarray]) -> list[np.ndarray]:
    """R, G, B planes (float32, 0..255) of L*a*b* planes (the formulas of :func:`lab_to_rgb`)."""
    fy = (lab[0] + np.float32(16.0)) / np.float32(116.0)
    f = [lab[1] / np.float32(500.0) + fy, fy, np.maximum(fy - lab[2] / np.float32(200.0), np.float32(0.0))]
    xyz = []
    for t in f:
        cube = t * t * t
        toe = t <= 0.2068966  # rare: patched instead of a full np.where
        cube[toe] = (t[toe] - np.float32(16.0 / 116.0)) / np.float32(7.787)
        xyz.append(cube)
    out = []
    for lin in _mix(xyz, _RGB_FROM_XYZ * _WHITE_D65[None, :]):
        dark = lin <= 0.0031308
        gamma = np.float32(1.055) * np.maximum(lin, np.float32(0.0031308)) ** np.float32(1 / 2.4) - np.float32(0.055)
        gamma[dark] = lin[dark] * np.float32(12.92)
        gamma *= np.float32(255.0)
        out.append(np.clip(gamma, 0.0, 255.0, out=gamma))
    return out


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(..., 3) L*a*b* -> (..., 3) float32 RGB in [0, 255]: ``skimage.color.lab2rgb(lab) * 255`` (z < 0 set to 0,
    out-of-gamut values clipped, as skimage does)."""
    lab = np.asarray(lab, np.float32)
    return np.stack(_rgb_planes([lab[..., 0], lab[..., 1], lab[..., 2]]), axis=-1).astype(np.float32, copy=False)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    w = LUMA_WEIGHTS["bt601"]
    return np.float32(w[0]) * rgb[..., 0] + np.float32(w[1]) * rgb[..., 1] + np.float32(w[2]) * rgb[..., 2]


@dataclass(frozen=True)
class ImageStats:
    """Whole-image statistics that every chunk is normalised with (so that chunks agree with each other).

    ``lab_mean``/``lab_std``: L*a*b* mean and std of the image (Reinhard's source statistics);
    ``input_mean``/``input_std``: per channel of the network input (:func:`bundle.channels.rgb_to_input` of the
    Reinhard-normalised image; what MONAI's ``NormalizeIntensityd(channel_wise=True)`` standardises with in
    ``configs/inference.json``); ``input_mode``: which input that is.
    """

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    input_mode: str = "gray"
    #: gray mode: the whole image's Reinhard gray (H, W) float32 0..255 when it was computed anyway (small images),
    #: so the chunk pass does not convert every pixel to L*a*b* and back a second time
    gray: np.ndarray | None = field(default=None, repr=False, compare=False)


def _reinhard_terms(stats_mean, stats_std, reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.asarray(stats_mean, np.float32)
    gain = np.asarray(reference["stds"], np.float32) / np.maximum(np.asarray(stats_std, np.float32), 1e-6)
    return mean, gain, np.asarray(reference["means"], np.float32)


def reinhard_rgb(
    rgb: np.ndarray, stats_mean: Sequence[float], stats_std: Sequence[float],
    reference: Mapping[str, Sequence[float]] | None, block: int = 2**16, lab: Sequence[np.ndarray] | None = None,
    gray: bool = False,
) -> np.ndarray:
    """(..., 3) RGB -> (..., 3) float32 RGB 0..255 of the Reinhard-normalised image (the formula of
    :class:`bundle.transforms.ReinhardNormalize` with FIXED source statistics), ``block`` pixels at a time so the
    float temporaries stay small and cache-resident; ``gray=True`` returns the BT.601 gray (...) instead (one
    plane kept, not three). ``lab``: the image's flattened L*, a*, b* planes (:func:`rgb_to_lab`), when already
    known. ``reference=None``: no normalisation (the RGB, or its gray, as float32)."""
    shape = np.shape(rgb)[:-1]
    flat = np.asarray(rgb).reshape(-1, 3)
    if reference is None:
        out = flat.astype(np.float32)
        return (_rgb_to_gray(out) if gray else out).reshape(shape if gray else (*shape, 3))
    mean, gain, ref_mean = _reinhard_terms(stats_mean, stats_std, reference)
    out = np.empty(len(flat) if gray else (len(flat), 3), np.float32)
    for i in range(0, len(flat), block):
        part = _lab_planes(flat[i : i + block]) if lab is None else [p[i : i + block] for p in lab]
        planes = np.stack(_rgb_planes([(p - mean[c]) * gain[c] + ref_mean[c] for c, p in enumerate(part)]), axis=-1)
        out[i : i + block] = _rgb_to_gray(planes) if gray else planes
    return out.reshape(shape if gray else (*shape, 3))


def reinhard_gray(
    rgb: np.ndarray, stats_mean: Sequence[float], stats_std: Sequence[float],
    reference: Mapping[str, Sequence[float]] | None, block: int = 2**16, lab: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 BT.601 gray 0..255 of the Reinhard-normalised image (:func:`reinhard_rgb`)."""
    return reinhard_rgb(rgb, stats_mean, stats_std, reference, block, lab, gray=True)


class RegionSource(Protocol):
    """A 2D RGB image read region by region: ``shape`` = (H, W) at the processing level; ``read(y0, y1, x0, x1)``
    -> (y1-y0, x1-x0, 3) uint8; ``path`` names it in messages."""

    shape: tuple[int, int]
    path: str

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


class ArraySource:
    """An RGB tile already in memory (PNG/JPEG tiles are decoded whole anyway) as a :class:`RegionSource`."""

    def __init__(self, rgb: np.ndarray, path: str = "<array>") -> None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{path}: expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        self.rgb = rgb
        self.shape = (int(rgb.shape[0]), int(rgb.shape[1]))
        self.path = path

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.rgb[y0:y1, x0:x1]


def _is_background(rgb: np.ndarray, level: int = 220) -> np.ndarray:
    """Glass: every channel >= ``level`` (bright and unsaturated)."""
    return rgb.min(axis=-1) >= level


def _plane_moments(plane: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std of a float32 plane, accumulated in float64 (numpy's pairwise summation)."""
    mean = float(plane.mean(dtype=np.float64))
    return mean, math.sqrt(float(np.square(plane - np.float32(mean)).mean(dtype=np.float64)))


def image_statistics(
    source: RegionSource,
    reference: Mapping[str, Sequence[float]],
    max_pixels: int = 2**22,
    block: int = 2048,
    tissue_only: bool = False,
    input_mode: str = "gray",
) -> ImageStats:
    """:class:`ImageStats` of ``source`` from a regular subsample of at most ``max_pixels`` pixels (every pixel
    of images up to 2048 x 2048; every ``k``-th row and column of larger ones), read block by block.

    ``tissue_only`` leaves out glass (:func:`_is_background`), for slides: the reference statistics come from
    tissue tiles, and a slide's background would otherwise dominate the mean. ``reference=None``: no Reinhard.
    """
    h, w = source.shape
    step = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
    block = max(step, block - block % step)  # a multiple of step, so the subsample grid is global
    samples = []
    for y in range(0, h, block):
        for x in range(0, w, block):
            rgb = source.read(y, min(h, y + block), x, min(w, x + block))[::step, ::step].reshape(-1, 3)
            samples.append(rgb[~_is_background(rgb)] if tissue_only else rgb)
    rgb = np.concatenate(samples)
    if len(rgb) == 0:
        raise DataError(f"{source.path}: no tissue found (every pixel is bright glass); nothing to segment")
    lab = _lab_planes(rgb)
    mean, std = np.array([_plane_moments(p) for p in lab]).T
    # one block read whole: the samples are the image in raster order, so the chunk pass can reuse the gray
    whole = step == 1 and not tissue_only and h <= block and w <= block
    if input_mode == "gray":
        gray = reinhard_gray(rgb, mean, std, reference, lab=lab)
        del lab
        g_mean, g_std = _plane_moments(np.clip(gray / np.float32(255.0), 0.0, 1.0))
        return ImageStats(tuple(mean.tolist()), tuple(std.tolist()), (g_mean,), (g_std,), "gray",
                          gray.reshape(h, w) if whole else None)
    planes = rgb_to_input(reinhard_rgb(rgb, mean, std, reference, lab=lab), input_mode)
    del lab
    moments = [_plane_moments(np.ascontiguousarray(planes[:, c])) for c in range(planes.shape[1])]
    return ImageStats(tuple(mean.tolist()), tuple(std.tolist()), tuple(m for m, _ in moments),
                      tuple(s for _, s in moments), input_mode)


# ------------------------------------------------------------------------------------------------------------
# geometry and resampling
# ------------------------------------------------------------------------------------------------------------
def model_size(n: int, factor: float) -> int:
    """Length at model scale of ``n`` native pixels (the rounding of ``bundle.inference.ToModelScaled``)."""
    return max(1, round(n * factor))


@dataclass(frozen=True)
class ChunkGeometry:
    """One axis of a chunk (module docstring): model-scale ``core``/``exact``/``net`` and the native intervals
    ``native_core`` (partition of the image), ``native_exact`` (native pixels whose bilinear taps lie in
    ``exact``) and ``native_read`` (what preprocessing ``net`` needs: cubic taps + blur margin). Half-open."""

    core: tuple[int, int]
    exact: tuple[int, int]
    net: tuple[int, int]
    native_core: tuple[int, int]
    native_exact: tuple[int, int]
    native_read: tuple[int, int]


def chunk_grid(
    n_native: int, n_model: int, chunk: int, halo: int, roi: int, stride: int, blur_radius: int = 0
) -> list[ChunkGeometry]:
    """Chunks of one axis (see :class:`ChunkGeometry`); ``chunk`` is rounded up to a multiple of ``stride``.

    Exact rational arithmetic (``s = n_native / n_model`` native pixels per model pixel), so the native
    intervals meet without a gap or an overlap whatever the pixel sizes.
    """
    if min(n_native, n_model, chunk, roi, stride) < 1 or halo < 0:
        raise ValueError(f"chunk_grid: sizes must be positive, got {n_native=}, {n_model=}, {chunk=}, {roi=}, {stride=}, {halo=}")
    chunk = math.ceil(chunk / stride) * stride
    s = Fraction(n_native, n_model)
    out = []
    for c0 in range(0, n_model, chunk):
        c1 = min(n_model, c0 + chunk)
        e0, e1 = max(0, c0 - halo), min(n_model, c1 + halo)
        r0, r1 = max(0, (e0 - roi) // stride * stride), min(n_model, e1 + roi)
        a0, a1 = (0 if c0 == 0 else round(c0 * s)), (n_native if c1 == n_model else round(c1 * s))
        # bilinear (model -> native): native x samples u = (x + 1/2) / s - 1/2, taps floor(u) and floor(u) + 1
        x0 = 0 if e0 == 0 else math.ceil((e0 + Fraction(1, 2)) * s - Fraction(1, 2))
        x1 = n_native if e1 == n_model else math.ceil((e1 - Fraction(1, 2)) * s - Fraction(1, 2))
        # bicubic (native -> model): model j samples v = (j + 1/2) s - 1/2, taps floor(v) - 1 .. floor(v) + 2
        n0 = max(0, math.floor((r0 + Fraction(1, 2)) * s - Fraction(1, 2)) - 1 - blur_radius)
        n1 = min(n_native, math.floor((r1 - Fraction(1, 2)) * s - Fraction(1, 2)) + 3 + blur_radius)
        out.append(ChunkGeometry((c0, c1), (e0, e1), (r0, r1), (a0, a1), (max(x0, 0), min(x1, n_native)), (n0, n1)))
    return out


def _cubic(t: np.ndarray, a: float = -0.75) -> tuple[np.ndarray, ...]:
    """Keys cubic convolution weights for taps -1, 0, 1, 2 at fractional offset ``t`` (PyTorch's bicubic)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def resample_matrix(
    out_range: tuple[int, int], in_range: tuple[int, int], n_out: int, n_in: int, mode: str
) -> sparse.csr_matrix:
    """Sparse (len(out_range), len(in_range)) matrix of ``F.interpolate(size=n_out, align_corners=False)`` along one
    axis of length ``n_in`` (``mode`` "bicubic" or "bilinear", taps clamped at the image border as PyTorch does),
    restricted to the output pixels ``out_range`` and the input pixels ``in_range`` (every tap must lie inside).

    Written because PyTorch/MONAI only resample a whole array: these rows are the global sampling positions,
    so a crop resampled with them equals the crop of the whole image resampled (tested against ``F.interpolate``).
    """
    j = np.arange(*out_range, dtype=np.float64)
    src = (j + 0.5) * (n_in / n_out) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)  # PyTorch clamps the source coordinate for linear modes
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        taps, weights = [i0, i0 + 1], [1 - t, t]
    elif mode == "bicubic":
        i0 = np.floor(src).astype(np.int64)
        taps, weights = [i0 - 1, i0, i0 + 1, i0 + 2], list(_cubic(src - i0))
    else:
        raise ValueError(f"resample_matrix: mode must be 'bicubic' or 'bilinear', got {mode!r}")
    cols = np.clip(np.stack(taps, 1), 0, n_in - 1) - in_range[0]
    if cols.size and (cols.min() < 0 or cols.max() >= in_range[1] - in_range[0]):
        raise ValueError(f"resample_matrix: taps of output {out_range} fall outside the input {in_range}")
    rows = np.repeat(np.arange(len(j)), len(taps))
    m = sparse.coo_matrix(
        (np.stack(weights, 1).ravel().astype(np.float32), (rows, cols.ravel())), shape=(len(j), in_range[1] - in_range[0])
    )
    return m.tocsr()  # duplicate (clamped) taps are summed


def _antialias_kernel(n_in: int, n_out: int) -> np.ndarray | None:
    """MONAI ``Resize(anti_aliasing=True)``'s Gaussian (sigma = (n_in / n_out - 1) / 2, erf kernel) or None."""
    if n_out >= n_in:
        return None
    sigma = (n_in / n_out - 1) / 2
    if sigma <= 0:
        return None
    return gaussian_1d(sigma, truncated=4.0, approx="erf").numpy().astype(np.float32)


def to_model_scale(
    gray: np.ndarray, read_y: tuple[int, int], read_x: tuple[int, int], net_y: tuple[int, int], net_x: tuple[int, int],
    native_shape: tuple[int, int], model_shape: tuple[int, int],
) -> np.ndarray:
    """The ``net_y x net_x`` crop of MONAI ``Resize(model_shape, mode="bicubic", anti_aliasing=True)`` of the whole
    native image, computed from the native crop ``gray`` = image[read_y, read_x] (float32).

    The anti-aliasing Gaussian is MONAI's (erf kernel, zero padding at the image border); inside the image the
    crop's margin (``blur_radius`` of :func:`chunk_grid`) covers it.
    """
    out = gray
    for axis, (n_in, n_out) in enumerate(zip(native_shape, model_shape)):
        k = _antialias_kernel(n_in, n_out)
        if k is not None:
            out = ndimage.correlate1d(out, k, axis=axis, mode="constant", cval=0.0)
    if native_shape != model_shape:
        wy = resample_matrix(net_y, read_y, model_shape[0], native_shape[0], "bicubic")
        wx = resample_matrix(net_x, read_x, model_shape[1], native_shape[1], "bicubic")
        out = np.asarray((wx @ np.asarray(wy @ out).T).T, dtype=np.float32)
    else:
        out = out[net_y[0] - read_y[0] : net_y[1] - read_y[0], net_x[0] - read_x[0] : net_x[1] - read_x[0]]
    return np.ascontiguousarray(out, dtype=np.float32)


def maps_to_native(
    maps: Sequence[np.ndarray], out_y: tuple[int, int], out_x: tuple[int, int], in_y: tuple[int, int],
    in_x: tuple[int, int], native_shape: tuple[int, int], model_shape: tuple[int, int],
) -> list[np.ndarray]:
    """The native window ``out_y x out_x`` of probability maps brought back from model scale by bilinear resizing
    (``F.interpolate``, as ``Invertd`` does), from their model-scale crop ``in_y x in_x``; float32, clipped to [0, 1]."""
    ry = resample_matrix(out_y, in_y, native_shape[0], model_shape[0], "bilinear")
    rx = resample_matrix(out_x, in_x, native_shape[1], model_shape[1], "bilinear")
    return [np.clip(np.asarray((rx @ np.asarray(ry @ m).T).T, np.float32), 0.0, 1.0) for m in maps]


def _blur_radius(n_in: int, n_out: int) -> int:
    k = _antialias_kernel(n_in, n_out)
    return 0 if k is None else len(k) // 2


# ------------------------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------------------------
class SlidingWindowPredictor:
    """(C, H, W) (or (H, W)) standardised input at model scale -> (C, H, W) float32 numpy maps: the network (eval mode,
    no grad) through MONAI's ``SlidingWindowInferer`` with ``configs/inference.json``'s settings."""

    def __init__(
        self,
        network: torch.nn.Module,
        roi_size: int = 256,
        sw_batch_size: int = 8,
        overlap: float = 0.25,
        device: str | torch.device = "cpu",
        amp: bool = False,
    ) -> None:
        self.network = network.to(device).eval()
        self.roi_size = int(roi_size)
        self.overlap = float(overlap)
        self.device = torch.device(device)
        self.amp = amp
        self.inferer = SlidingWindowInferer(
            (self.roi_size, self.roi_size), sw_batch_size, self.overlap, mode="gaussian", padding_mode="reflect"
        )

    @property
    def stride(self) -> int:
        """Window step of the inferer (MONAI ``_get_scan_interval``) = the chunk grid's alignment."""
        return max(int(self.roi_size * (1 - self.overlap)), 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x[None] if x.ndim == 2 else x  # (h, w) or (C, h, w)
        h, w = x.shape[-2:]
        # mirror an image smaller than a window up to its size, centred (the config's SpatialPadd, mode
        # "symmetric"): the inferer's own "reflect" padding fails when the pad exceeds the image
        (py, px) = (max(0, self.roi_size - h), max(0, self.roi_size - w))
        if py or px:
            x = np.pad(x, [(0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)], mode="symmetric")
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None].to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
            out = self.inferer(t, self.network)
        return out[0, :, py // 2 : py // 2 + h, px // 2 : px // 2 + w].float().cpu().numpy()


@dataclass
class ChunkMaps:
    """Probability maps of one chunk on its ``exact`` area (model scale) and its native RGB read region."""

    y: ChunkGeometry
    x: ChunkGeometry
    region: np.ndarray  # (h, w) float32, model scale, over exact
    boundary: np.ndarray
    rgb: np.ndarray  # native RGB over (y.native_read, x.native_read)
    skipped: bool = False  # background chunk: no network pass, maps are zero


def _network_input(
    rgb: np.ndarray, stats: ImageStats, reference: Mapping[str, Sequence[float]] | None, gy: ChunkGeometry,
    gx: ChunkGeometry, native_shape: tuple[int, int], model_shape: tuple[int, int],
) -> np.ndarray:
    """(C, h, w) float32 standardised network input of one chunk's net area from its native RGB read region:
    Reinhard, resize to model scale, :func:`bundle.channels.rgb_to_input`, whole-image standardisation.
    Gray is resized as one plane (the luma is linear in R, G, B, so this equals resizing the RGB first)."""
    h, w = native_shape
    if stats.input_mode == "gray":
        if stats.gray is not None and stats.gray.shape == (h, w):
            gray = stats.gray[gy.native_read[0] : gy.native_read[1], gx.native_read[0] : gx.native_read[1]]
        else:
            gray = reinhard_gray(rgb, stats.lab_mean, stats.lab_std, reference)
        x = to_model_scale(gray, gy.native_read, gx.native_read, gy.net, gx.net, native_shape, model_shape)
        planes = np.clip(x / np.float32(255.0), 0.0, 1.0)[None]
    else:
        norm = reinhard_rgb(rgb, stats.lab_mean, stats.lab_std, reference)
        scaled = np.stack([to_model_scale(np.ascontiguousarray(norm[..., c]), gy.native_read, gx.native_read, gy.net,
                                          gx.net, native_shape, model_shape) for c in range(3)], axis=-1)
        planes = np.moveaxis(rgb_to_input(scaled, stats.input_mode), -1, 0)
    mean = np.asarray(stats.input_mean, np.float32)[:, None, None]
    std = np.maximum(np.asarray(stats.input_std, np.float32), 1e-8)[:, None, None]
    return np.ascontiguousarray((planes - mean) / std, dtype=np.float32)


def predict_chunks(
    source: RegionSource,
    predictor: Callable[[np.ndarray], np.ndarray],
    stats: ImageStats,
    reference: Mapping[str, Sequence[float]],
    factor: float,
    chunk: int = 1024,
    halo: int = 64,
    roi: int = 256,
    stride: int = 192,
    skip_background: bool = False,
) -> Iterator[ChunkMaps]:
    """Yield the chunks of ``source`` (row-major) with their region/boundary maps at model scale on ``exact``.

    ``factor`` = native pixel size / model pixel size; ``predictor`` maps a standardised (h, w) model-scale
    array to (C, h, w) maps whose channels ``REGION``/``BOUNDARY`` are probabilities (DS-HFN's eval output).
    ``skip_background`` (slides) gives all-zero maps without a network pass where the core is all glass.
    """
    h, w = source.shape
    hm, wm = model_size(h, factor), model_size(w, factor)
    ys = chunk_grid(h, hm, chunk, halo, roi, stride, _blur_radius(h, hm))
    xs = chunk_grid(w, wm, chunk, halo, roi, stride, _blur_radius(w, wm))
    for gy in ys:
        for gx in xs:
            rgb = np.asarray(source.read(*gy.native_read, *gx.native_read))
            expect = (gy.native_read[1] - gy.native_read[0], gx.native_read[1] - gx.native_read[0], 3)
            if rgb.shape != expect or rgb.dtype != np.uint8:
                raise DataError(f"{source.path}: region read gave {rgb.dtype} {rgb.shape}, expected uint8 {expect}")
            shape = (gy.exact[1] - gy.exact[0], gx.exact[1] - gx.exact[0])
            if skip_background:
                cy = slice(gy.native_core[0] - gy.native_read[0], gy.native_core[1] - gy.native_read[0])
                cx = slice(gx.native_core[0] - gx.native_read[0], gx.native_core[1] - gx.native_read[0])
                if _is_background(rgb[cy, cx]).all():
                    zero = np.zeros(shape, np.float32)
                    yield ChunkMaps(gy, gx, zero, zero, rgb, skipped=True)
                    continue
            x = _network_input(rgb, stats, reference, gy, gx, (h, w), (hm, wm))
            maps = predictor(x)
            if maps.ndim != 3 or maps.shape[1:] != x.shape[1:]:
                raise ValueError(f"predictor returned shape {maps.shape} for an input of {x.shape}; expected (C, h, w)")
            ey = slice(gy.exact[0] - gy.net[0], gy.exact[1] - gy.net[0])
            ex = slice(gx.exact[0] - gx.net[0], gx.exact[1] - gx.net[0])
            region = np.ascontiguousarray(maps[REGION, ey, ex], np.float32)
            boundary = (
                np.ascontiguousarray(maps[BOUNDARY, ey, ex], np.float32) if maps.shape[0] > BOUNDARY else np.zeros_like(region)
            )
            del maps, x
            yield ChunkMaps(gy, gx, region, boundary, rgb)
            del rgb, region, boundary  # not alive while the next chunk is read and predicted


# ------------------------------------------------------------------------------------------------------------
# nuclei, block by block
# ------------------------------------------------------------------------------------------------------------
@dataclass
class NucleusBlock:
    """The nuclei OWNED by one post-processing block (centroid inside its core), cropped to the block's window.

    ``origin`` = native (y, x) of the window; ``instances`` (h, w) int32 with local ids 1..n (non-owned nuclei
    erased); ``region``/``boundary`` native probability maps and ``rgb`` over the same window; ``truncated``:
    owned nuclei touching the window edge inside the image (their shape may be cut; should be 0).
    """

    origin: tuple[int, int]
    instances: np.ndarray
    region: np.ndarray
    boundary: np.ndarray
    rgb: np.ndarray
    truncated: int = 0

    @property
    def count(self) -> int:
        return int(self.instances.max(initial=0))


def _centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centroids (pixel index coordinates) of ids 1..max, via bincount over the foreground pixels
    (ndimage is per label)."""
    flat = instances.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    n = int(flat.max(initial=0)) + 1
    rows, cols = np.divmod(fg, instances.shape[1])
    area = np.bincount(lab, minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(lab, rows, n) / area, np.bincount(lab, cols, n) / area


def _split(interval: tuple[int, int], size: int) -> list[tuple[int, int]]:
    a, b = interval
    n = max(1, math.ceil((b - a) / size))
    edges = [a + round(i * (b - a) / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n) if edges[i + 1] > edges[i]]


#: where the watershed runs: on the network's model-scale maps, or on the maps upsampled to the native grid
POST_SCALES = ("model", "native")


def segment_blocks(
    maps: ChunkMaps,
    native_shape: tuple[int, int],
    model_shape: tuple[int, int],
    params: WatershedParams,
    post_chunk: int = 1024,
    post_halo: int = 96,
    post_scale: str = "model",
) -> Iterator[NucleusBlock]:
    """Cut ``maps``' native core into blocks of at most ``post_chunk`` pixels; per block (plus ``post_halo``
    pixels), run the watershed and keep the nuclei whose centroid lies in the block.

    ``post_scale="model"`` (default): the watershed runs on the network's own maps at model scale and the labels
    are brought to the native grid by nearest-exact resizing (:func:`bundle.instances.upsample_labels`), 4x
    fewer pixels for 40x tiles; ``"native"``: on the maps upsampled to native size (bilinear). Either way the
    block carries the bilinear native maps for the per-nucleus measurements.
    """
    if post_scale not in POST_SCALES:
        raise ValueError(f"post_scale must be one of {POST_SCALES}, got {post_scale!r}")
    gy, gx = maps.y, maps.x
    if maps.skipped:
        return
    for by in _split(gy.native_core, post_chunk):
        for bx in _split(gx.native_core, post_chunk):
            wy = (max(gy.native_exact[0], by[0] - post_halo), min(gy.native_exact[1], by[1] + post_halo))
            wx = (max(gx.native_exact[0], bx[0] - post_halo), min(gx.native_exact[1], bx[1] + post_halo))
            up = maps_to_native([maps.region, maps.boundary], wy, wx, gy.exact, gx.exact, native_shape, model_shape)
            if post_scale == "native":
                inst = instances_from_maps(up[0], up[1], params)
                cy, cx = _centroids(inst)
                cy, cx = cy + wy[0], cx + wx[0]
            else:
                # model pixels nearest to the window's native pixels: among its bilinear taps, so inside ``exact``
                iy = nearest_index(native_shape[0], model_shape[0], *wy) - gy.exact[0]
                ix = nearest_index(native_shape[1], model_shape[1], *wx) - gx.exact[0]
                sy, sx = slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1)
                inst = instances_from_maps(maps.region[sy, sx], maps.boundary[sy, sx], params)
                # ownership from the model-scale centroid mapped to native pixels (a model pixel's native pixels
                # are centred there): the same in every block that holds the nucleus, 4x fewer pixels to sum
                cy, cx = _centroids(inst)
                cy = (cy + sy.start + gy.exact[0] + 0.5) * (native_shape[0] / model_shape[0]) - 0.5
                cx = (cx + sx.start + gx.exact[0] + 0.5) * (native_shape[1] / model_shape[1]) - 0.5
            owned = (cy >= by[0]) & (cy < by[1]) & (cx >= bx[0]) & (cx < bx[1])
            owned[0] = False
            inst = relabel_consecutive(np.where(owned[inst], inst, 0))
            if post_scale == "model":
                inst = inst[iy - iy[0]][:, ix - ix[0]]
            truncated = 0
            if inst.any():
                edges = []
                if wy[0] > 0:
                    edges.append(inst[0])
                if wy[1] < native_shape[0]:
                    edges.append(inst[-1])
                if wx[0] > 0:
                    edges.append(inst[:, 0])
                if wx[1] < native_shape[1]:
                    edges.append(inst[:, -1])
                truncated = len(np.unique(np.concatenate(edges))[1:]) if edges else 0
            ry0, rx0 = gy.native_read[0], gx.native_read[0]
            rgb = maps.rgb[wy[0] - ry0 : wy[1] - ry0, wx[0] - rx0 : wx[1] - rx0]
            yield NucleusBlock((wy[0], wx[0]), inst, up[0], up[1], rgb, truncated)


class NucleusStream:
    """Streams per-nucleus CSV rows and GeoJSON features of successive :class:`NucleusBlock` s into temp files
    beside ``<stem>_nuclei.csv`` / ``<stem>.geojson``; :meth:`close` renames them into place (atomic).

    Coordinates: ``offset + scale * native`` (``bundle.exports`` frame), e.g. level-0 slide pixels.
    Every nucleus gets the next global id, shared by the CSV ``id``, the GeoJSON ``instance_id`` and the label map.
    """

    def __init__(
        self, out_dir: str | os.PathLike, stem: str, formats: Sequence[str] = ("geojson", "csv"),
        offset: Sequence[float] = (0.0, 0.0), scale: float = 1.0, tolerance: float = 0.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem, self.offset, self.scale, self.tolerance = stem, (float(offset[0]), float(offset[1])), float(scale), tolerance
        self.paths = {}
        if "geojson" in formats:
            self.paths["geojson"] = self.out_dir / f"{stem}.geojson"
        if "csv" in formats:
            self.paths["csv"] = self.out_dir / f"{stem}_nuclei.csv"
        self._tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.partial") for k, p in self.paths.items()}
        self._files = {k: open(t, "w", encoding="utf-8", newline="") for k, t in self._tmp.items()}
        if "geojson" in self._files:
            self._files["geojson"].write('{"type":"FeatureCollection","features":[\n')
        self.count = 0
        self._first_feature = True
        self._header = True

    def add(self, block: NucleusBlock) -> np.ndarray:
        """Write ``block``'s nuclei; returns its local -> global id table (index 0 -> 0)."""
        n = block.count
        lut = np.zeros(n + 1, np.int64)
        lut[1:] = np.arange(self.count + 1, self.count + n + 1)
        if n == 0 or not self._files:
            self.count += n
            return lut
        oy, ox = block.origin
        offset = (self.offset[0] + self.scale * ox, self.offset[1] + self.scale * oy)
        table = nucleus_table(block.rgb, block.instances, block.region, block.boundary, offset, self.scale)
        if "geojson" in self._files:
            collection = instances_geojson(
                block.instances, block.region, block.rgb, block.boundary, offset=offset, scale=self.scale,
                tolerance=self.tolerance, tile_id=f"{self.stem}@{oy},{ox}", table=table,
            )
            f = self._files["geojson"]
            for feature, gid in zip(collection["features"], lut[table["id"]].tolist()):
                feature["properties"]["instance_id"] = gid
                feature["properties"]["measurements"]["instance_id"] = gid
                f.write(("" if self._first_feature else ",\n") + json.dumps(feature, separators=(",", ":"), allow_nan=False))
                self._first_feature = False
        if "csv" in self._files:
            table["id"] = lut[table["id"]]
            text = _table_csv(table)
            self._files["csv"].write(text if self._header else text.split("\n", 1)[1])
            self._header = False
        self.count += n
        return lut

    def close(self) -> dict[str, Path]:
        """Finish and rename the files into place; the GeoJSON last (its presence marks a finished image)."""
        if "geojson" in self._files:
            self._files["geojson"].write("\n]}\n")
        if "csv" in self._files and self._header:  # no nucleus at all: still a valid CSV with its header
            self._files["csv"].write(_table_csv(nucleus_table(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.int32), np.zeros((1, 1)), np.zeros((1, 1)))))
        for f in self._files.values():
            f.close()
        for key in sorted(self._tmp, key=lambda k: k == "geojson"):
            os.replace(self._tmp[key], self.paths[key])
        self._files = {}
        return dict(self.paths)

    def abort(self) -> None:
        """Drop the partial files (after an error)."""
        for f in self._files.values():
            f.close()
        for t in self._tmp.values():
            if t.exists():
                t.unlink()
        self._files = {}


#: images with more pixels than this get their label map and overlay as tiled TIFFs written tile by tile:
#: PNG cannot be written piecewise, and encoding an 8000 x 8000 RGB PNG costs twice the image in copies
PNG_MAX_PIXELS = 4096 * 4096


def _write_tiled_tiff(path: Path, tiles: Iterator[np.ndarray], shape: tuple[int, ...], dtype: Any, tile: int) -> Path:
    import tifffile

    photometric = "rgb" if len(shape) == 3 else "minisblack"
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, tiles, shape=shape, dtype=dtype, tile=(tile, tile),
                                                     compression="zlib", photometric=photometric))
    return path


class TileOutputs:
    """Outputs of one large tile in the :func:`bundle.exports.write_tile_outputs` layout, filled block by block:
    ``<stem>.geojson`` and ``<stem>_nuclei.csv`` (streamed), ``<stem>_instances.png`` (uint16 label map) and
    ``<stem>_overlay.png`` (contours drawn from the final label map). Beyond :data:`PNG_MAX_PIXELS` pixels or
    65535 nuclei the label map and overlay are tiled zlib TIFFs (``_instances.tif``, uint32 if needed;
    ``_overlay.tif``) written tile by tile. Only the label map is image-sized in memory."""

    def __init__(self, out_dir: str | os.PathLike, stem: str, shape: tuple[int, int],
                 formats: Sequence[str] = ("png", "geojson", "csv", "overlay"), tolerance: float = 0.0) -> None:
        from bundle.exports import FORMATS

        unknown = sorted(set(formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {FORMATS}")
        self.out_dir, self.stem, self.formats = Path(out_dir), stem, tuple(formats)
        self.stream = NucleusStream(out_dir, stem, formats, tolerance=tolerance)
        need_labels = {"png", "tiff", "overlay"} & set(formats)
        self.labels = np.zeros(shape, np.uint16) if need_labels else None
        self.conflicts = 0

    def add(self, block: NucleusBlock) -> None:
        lut = self.stream.add(block)
        if self.labels is None or block.count == 0:
            return
        if self.stream.count > np.iinfo(self.labels.dtype).max:
            self.labels = self.labels.astype(np.uint32)
        oy, ox = block.origin
        h, w = block.instances.shape
        view = self.labels[oy : oy + h, ox : ox + w]
        inside = block.instances > 0
        # a pixel claimed by a nucleus of another block keeps its first owner (both segment the same maps,
        # so this only happens where two watersheds disagree on a 1-pixel border)
        free = inside & (view == 0)
        self.conflicts += int(inside.sum() - free.sum())
        view[free] = lut[block.instances[free]].astype(view.dtype)

    def close(self, source: RegionSource, tile: int = 512) -> dict[str, Path]:
        """Write the label map and overlay, then finish the streamed files; returns ``{format: path}``."""
        paths: dict[str, Path] = {}
        if self.labels is not None:
            small = self.labels.size <= PNG_MAX_PIXELS and self.labels.dtype == np.uint16
            if "png" in self.formats and small:
                paths["png"] = write_instance_map(self.out_dir / f"{self.stem}_instances.png", self.labels)
            elif "png" in self.formats:
                logger.info(f"{self.stem}: {self.labels.shape} px / {self.stream.count} nuclei: label map as tiled TIFF")
            if "tiff" in self.formats or ("png" in self.formats and "png" not in paths):
                paths["tiff"] = _write_tiled_tiff(self.out_dir / f"{self.stem}_instances.tif", self._label_tiles(tile),
                                                  self.labels.shape, self.labels.dtype, tile)
            if "overlay" in self.formats and self.labels.size <= PNG_MAX_PIXELS:
                paths["overlay"] = self.out_dir / f"{self.stem}_overlay.png"
                overlay = np.empty((*self.labels.shape, 3), np.uint8)
                for (y, x), part in self.overlay_blocks(source, 2048):
                    overlay[y : y + part.shape[0], x : x + part.shape[1]] = part
                write_png_atomic(paths["overlay"], overlay)
            elif "overlay" in self.formats:
                tiles = (np.pad(p, ((0, tile - p.shape[0]), (0, tile - p.shape[1]), (0, 0))) for _, p in self.overlay_blocks(source, tile))
                paths["overlay"] = _write_tiled_tiff(self.out_dir / f"{self.stem}_overlay.tif", tiles,
                                                     (*self.labels.shape, 3), np.uint8, tile)
        paths.update(self.stream.close())
        return paths

    def _label_tiles(self, tile: int) -> Iterator[np.ndarray]:
        h, w = self.labels.shape
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                part = self.labels[y : y + tile, x : x + tile]
                yield part if part.shape == (tile, tile) else np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))

    def overlay_blocks(self, source: RegionSource, block: int = 2048) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Row-major ``((y, x), rgb)`` blocks of the tile with each nucleus' inner contour drawn (as
        :func:`bundle.exports.instance_overlay`), each computed with a 1-pixel margin so contours across block
        borders are exact."""
        h, w = self.labels.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                y1, x1 = min(h, y + block), min(w, x + block)
                my0, mx0 = max(0, y - 1), max(0, x - 1)
                lab = self.labels[my0 : min(h, y1 + 1), mx0 : min(w, x1 + 1)]
                edge = find_boundaries(lab, mode="inner", connectivity=1, background=0)[y - my0 : y1 - my0, x - mx0 : x1 - mx0]
                part = np.array(source.read(y, y1, x, x1), dtype=np.uint8, copy=True)
                part[edge] = np.asarray(PRED_RGB, np.uint8)
                yield (y, x), part

    def abort(self) -> None:
        self.stream.abort()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``resource.getrusage``), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def segment_image(
    source: RegionSource,
    predictor: Callable[[np.ndarray], np.ndarray],
    sink: Any,
    reference: Mapping[str, Sequence[float]],
    pixel_size: float,
    model_pixel_size: float = MODEL_PIXEL_SIZE,
    params: WatershedParams | None = None,
    chunk: int = 1024,
    halo: int = 64,
    roi: int | None = None,
    stride: int | None = None,
    post_chunk: int = 1024,
    post_halo: int | None = None,
    tissue_only: bool = False,
    stats: ImageStats | None = None,
    progress: bool = False,
    post_scale: str = "model",
    input_mode: str = "gray",
) -> dict[str, Any]:
    """Segment ``source`` chunk by chunk into ``sink`` (``add(NucleusBlock)``, e.g. :class:`TileOutputs`).

    ``pixel_size`` of the source (um/px) and ``model_pixel_size`` fix the model scale; ``chunk``/``halo``/``roi``
    are model pixels (``roi``/``stride`` = the inferer's window and step, default the predictor's);
    ``post_chunk``/``post_halo`` native pixels (default halo: ``halo`` model px in native px, less the bilinear
    taps). ``tissue_only`` (slides): statistics from tissue and no network pass on all-glass chunks.
    ``post_scale``: where the watershed runs (:func:`segment_blocks`); ``params`` sizes are pixels of that grid.
    ``input_mode``: the network's input (:mod:`bundle.channels`); ``reference=None`` skips Reinhard.
    Returns a summary (nuclei, chunks, blocks, truncated nuclei, label conflicts, seconds).
    """
    t0 = time.perf_counter()
    params = params or WatershedParams()
    factor = scale_factor(pixel_size, model_pixel_size)
    window = getattr(predictor, "roi_size", None)
    if roi is not None and window is not None and roi != window:
        raise ValueError(f"roi={roi} differs from the predictor's window {window}; the chunk grid must follow the window")
    roi = roi or window or 256
    stride = stride or getattr(predictor, "stride", None) or max(int(roi * 0.75), 1)
    if halo < 1 or chunk < 1:
        raise ValueError(f"chunk and halo must be positive model pixels, got chunk={chunk}, halo={halo}")
    if post_halo is None:
        post_halo = max(1, int((halo - 2) / factor))
    h, w = source.shape
    model_shape = (model_size(h, factor), model_size(w, factor))
    if stats is None:
        stats = image_statistics(source, reference, tissue_only=tissue_only, input_mode=input_mode)
    summary = {"nuclei": 0, "chunks": 0, "skipped_chunks": 0, "blocks": 0, "truncated": 0}
    chunks = predict_chunks(source, predictor, stats, reference, factor, chunk, halo, roi, stride, tissue_only)
    if progress:
        from tqdm import tqdm

        n = len(chunk_grid(h, model_shape[0], chunk, halo, roi, stride)) * len(chunk_grid(w, model_shape[1], chunk, halo, roi, stride))
        chunks = tqdm(chunks, total=n, desc=Path(source.path).name, unit="chunk")
    for maps in chunks:
        summary["chunks"] += 1
        summary["skipped_chunks"] += int(maps.skipped)
        for block in segment_blocks(maps, (h, w), model_shape, params, post_chunk, post_halo, post_scale):
            sink.add(block)
            summary["blocks"] += 1
            summary["nuclei"] += block.count
            summary["truncated"] += block.truncated
        del maps  # free this chunk before the generator computes the next one
    if summary["truncated"]:
        logger.warning(f"{source.path}: {summary['truncated']} nuclei touch a block's halo edge and may be cut; "
                       f"raise --halo (now {halo} model px)")
    summary["conflict_pixels"] = int(getattr(sink, "conflicts", 0))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ------------------------------------------------------------------------------------------------------------
# folder mode (configs/inference.json): corrupt tiles are reported and skipped, ranks share the tiles
# ------------------------------------------------------------------------------------------------------------
def _data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` in ``exc``'s cause chain (MONAI wraps transform errors in RuntimeError)."""
    from bundle import _find_data_error

    return _find_data_error(exc)


class GuardedDataset(Dataset):
    """MONAI ``Dataset`` whose items that fail with :class:`bundle.io.DataError` (missing, corrupt, truncated
    tile) become a marker ``{"image": path, "error": message}`` instead of an exception: a DataLoader worker
    that raised would end the whole run. Any other exception is a bug and propagates."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as exc:
            err = _data_error(exc)
            if err is None:
                raise
            item = self.data[index]
            return {"image": str(item["image"] if isinstance(item, Mapping) else item), "error": str(err)}


class GuardedIteration:
    """``iteration_update`` for a MONAI ``SupervisedEvaluator``: a batch of :class:`GuardedDataset` markers skips
    the network and the postprocessing and becomes ``[{"image": path, "error": message}]`` (for
    :class:`bundle.writers.TileWriter` to report); other batches run the evaluator's own iteration.
    Needs ``batch_size=1`` (tiles of different sizes do not batch anyway)."""

    def __call__(self, engine: Any, batch: Any) -> Any:
        if isinstance(batch, Mapping) and "error" in batch:
            paths = batch["image"] if isinstance(batch["image"], (list, tuple)) else [batch["image"]]
            errors = batch["error"] if isinstance(batch["error"], (list, tuple)) else [batch["error"]]
            return [{"image": str(p), "error": str(e)} for p, e in zip(paths, errors)]
        return engine._iteration(engine, batch)


def shard(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """This rank's share ``items[rank::world_size]`` (every item on exactly one rank); rank and world size from
    ``torch.distributed`` when initialised, else the ``RANK``/``WORLD_SIZE`` variables torchrun sets, else 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]
