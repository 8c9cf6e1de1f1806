"""Colour for chunked inference: skimage's sRGB <-> CIE L*a*b* in float32 (about 10x cheaper than skimage on
whole slides, equal to it to float rounding), Reinhard normalisation with fixed whole-image statistics, and those
statistics (:func:`image_statistics`) measured once per image so that every chunk is normalised alike."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bundle.core.errors import DataError
from bundle.data.channels import rgb_to_input
from bundle.data.transforms import LUMA_WEIGHTS
from bundle.inference.sources import RegionSource

logger = logging.getLogger(__name__)


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


def lab_planes(rgb: np.ndarray) -> list[np.ndarray]:
    """L*, a*, b* planes (float32, each of the image's shape without the channel axis) of (..., 3) RGB 0..255:
    ``skimage.color.rgb2lab(rgb / 255)``.

    The same formulas as scikit-image (sRGB gamma, its XYZ matrix, D65 white, cube root with the linear toe), in
    float32 on channel planes: ~10x faster, within 2e-3 of skimage's float64 (tests/test_tiling.py). Written here
    because Reinhard on every chunk of a slide made skimage's L*a*b* the largest cost after the network.
    """
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


def rgb_planes(lab: Sequence[np.ndarray]) -> list[np.ndarray]:
    """R, G, B planes (float32, 0..255) of L*a*b* planes: ``skimage.color.lab2rgb(lab) * 255`` (z < 0 set to 0,
    out-of-gamut values clipped, as skimage does), in float32 for the reason of :func:`lab_planes`."""
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


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    w = LUMA_WEIGHTS["bt601"]
    return np.float32(w[0]) * rgb[..., 0] + np.float32(w[1]) * rgb[..., 1] + np.float32(w[2]) * rgb[..., 2]


@dataclass(frozen=True)
class ImageStats:
    """Whole-image statistics that every chunk is normalised with (so that chunks agree with each other).

    ``lab_mean``/``lab_std``: L*a*b* mean and std of the image (Reinhard's source statistics);
    ``input_mean``/``input_std``: per channel of the network input (:func:`bundle.data.channels.rgb_to_input` of the
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
    :class:`bundle.data.transforms.ReinhardNormalize` with FIXED source statistics), ``block`` pixels at a time so the
    float temporaries stay small and cache-resident; ``gray=True`` returns the BT.601 gray (...) instead (one
    plane kept, not three). ``lab``: the image's flattened L*, a*, b* planes (:func:`lab_planes`), when already
    known. ``reference=None``: no normalisation (the RGB, or its gray, as float32)."""
    shape = np.shape(rgb)[:-1]
    flat = np.asarray(rgb).reshape(-1, 3)
    if reference is None:
        out = flat.astype(np.float32)
        return (_rgb_to_gray(out) if gray else out).reshape(shape if gray else (*shape, 3))
    mean, gain, ref_mean = _reinhard_terms(stats_mean, stats_std, reference)
    out = np.empty(len(flat) if gray else (len(flat), 3), np.float32)
    for i in range(0, len(flat), block):
        part = lab_planes(flat[i : i + block]) if lab is None else [p[i : i + block] for p in lab]
        planes = np.stack(rgb_planes([(p - mean[c]) * gain[c] + ref_mean[c] for c, p in enumerate(part)]), axis=-1)
        out[i : i + block] = _rgb_to_gray(planes) if gray else planes
    return out.reshape(shape if gray else (*shape, 3))


def reinhard_gray(
    rgb: np.ndarray, stats_mean: Sequence[float], stats_std: Sequence[float],
    reference: Mapping[str, Sequence[float]] | None, block: int = 2**16, lab: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 BT.601 gray 0..255 of the Reinhard-normalised image (:func:`reinhard_rgb`)."""
    return reinhard_rgb(rgb, stats_mean, stats_std, reference, block, lab, gray=True)


def is_background(rgb: np.ndarray, level: int = 220) -> np.ndarray:
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
    resize: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImageStats:
    """:class:`ImageStats` of ``source`` from a regular subsample of at most ``max_pixels`` pixels (every pixel
    of images up to 2048 x 2048; every ``k``-th row and column of larger ones), read block by block.

    ``tissue_only`` leaves out glass (:func:`is_background`), for slides: the reference statistics come from
    tissue tiles, and a slide's background would otherwise dominate the mean. ``reference=None``: no Reinhard.
    ``resize`` (an (H, W) plane -> the plane at model scale): when every pixel was read, the input moments are those
    of the resized planes, as training's ``NormalizeIntensityd`` takes them after ``ToModelScaled`` (an
    anti-aliased downsample lowers the spread); otherwise, and for subsampled images, those at the native scale.
    """
    h, w = source.shape
    step = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
    block = max(step, block - block % step)  # a multiple of step, so the subsample grid is global
    samples = []
    for y in range(0, h, block):
        for x in range(0, w, block):
            rgb = source.read(y, min(h, y + block), x, min(w, x + block))[::step, ::step].reshape(-1, 3)
            samples.append(rgb[~is_background(rgb)] if tissue_only else rgb)
    rgb = np.concatenate(samples)
    if len(rgb) == 0:
        raise DataError(f"{source.path}: no tissue found (every pixel is bright glass); nothing to segment")
    lab = lab_planes(rgb)
    mean, std = np.array([_plane_moments(p) for p in lab]).T
    # one block read whole: the samples are the image in raster order, so the chunk pass can reuse the gray
    whole = step == 1 and not tissue_only and h <= block and w <= block
    scaled = resize if whole else None
    if input_mode == "gray":
        gray = reinhard_gray(rgb, mean, std, reference, lab=lab)
        del lab
        plane = gray if scaled is None else scaled(gray.reshape(h, w))
        g_mean, g_std = _plane_moments(np.clip(plane / np.float32(255.0), 0.0, 1.0))
        return ImageStats(tuple(mean.tolist()), tuple(std.tolist()), (g_mean,), (g_std,), "gray",
                          gray.reshape(h, w) if whole else None)
    norm = reinhard_rgb(rgb, mean, std, reference, lab=lab)
    del lab
    if scaled is not None:  # the order of the chunk pass: Reinhard, resize, then the input conversion
        norm = norm.reshape(h, w, 3)
        norm = np.stack([scaled(np.ascontiguousarray(norm[..., c])) for c in range(3)], axis=-1).reshape(-1, 3)
    planes = rgb_to_input(norm, input_mode)
    moments = [_plane_moments(np.ascontiguousarray(planes[:, c])) for c in range(planes.shape[1])]
    return ImageStats(tuple(mean.tolist()), tuple(std.tolist()), tuple(m for m, _ in moments),
                      tuple(s for _, s in moments), input_mode)


# ------------------------------------------------------------------------------------------------------------
