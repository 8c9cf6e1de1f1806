"""Network pass over images of any size in chunks, with memory bounded by the chunk size.

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

"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.layers.convutils import gaussian_1d
from scipy import ndimage, sparse

from bundle.core.errors import DataError
from bundle.data.channels import rgb_to_input
from bundle.inference.colour import (
    ImageStats,
    is_background,
    reinhard_gray,
    reinhard_rgb,
)
from bundle.inference.sources import RegionSource
from bundle.inference.timing import active_timer, stage
from bundle.inference.windows import WindowCache
from bundle.nuclei.binarize import REGION, watershed_channel

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# geometry and resampling
# ------------------------------------------------------------------------------------------------------------
def model_size(n: int, factor: float) -> int:
    """Length at model scale of ``n`` native pixels (the rounding of ``bundle.data.scale.ToModelScaled``)."""
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
    if tuple(native_shape) == tuple(model_shape):  # 40x at 0.25 um/px: the bilinear weights are 1 and 0, a crop
        sy, sx = slice(out_y[0] - in_y[0], out_y[1] - in_y[0]), slice(out_x[0] - in_x[0], out_x[1] - in_x[0])
        return [np.clip(np.asarray(m, np.float32)[sy, sx], 0.0, 1.0) for m in maps]
    ry = resample_matrix(out_y, in_y, native_shape[0], model_shape[0], "bilinear")
    rx = resample_matrix(out_x, in_x, native_shape[1], model_shape[1], "bilinear")
    return [np.clip(np.asarray((rx @ np.asarray(ry @ m).T).T, np.float32), 0.0, 1.0) for m in maps]


def _blur_radius(n_in: int, n_out: int) -> int:
    k = _antialias_kernel(n_in, n_out)
    return 0 if k is None else len(k) // 2


# ------------------------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------------------------
def default_inferer(roi_size: int = 256, sw_batch_size: int = 8, overlap: float = 0.25) -> SlidingWindowInferer:
    """MONAI's ``SlidingWindowInferer`` as ``configs/inference.json`` sets it: square windows, Gaussian blending,
    reflect padding."""
    return SlidingWindowInferer((int(roi_size), int(roi_size)), sw_batch_size, float(overlap), mode="gaussian",
                                padding_mode="reflect")


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
        inferer: SlidingWindowInferer | None = None,
        window_cache: int = 0,
    ) -> None:
        """``inferer``: a configured MONAI ``SlidingWindowInferer`` with square windows (its ``roi_size`` and
        ``overlap`` then replace the arguments); default: one from ``roi_size``/``sw_batch_size``/``overlap``
        with Gaussian blending and reflect padding. ``window_cache``: bytes of window outputs kept so that a window
        shared by neighbouring chunks is predicted once (:class:`bundle.inference.windows.WindowCache`; 0: none)."""
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.amp = amp
        inferer = inferer or default_inferer(roi_size, sw_batch_size, overlap)
        roi = inferer.roi_size
        roi = [int(roi)] * 2 if isinstance(roi, int) else [int(r) for r in roi]
        overlap = inferer.overlap
        overlap = [float(overlap)] * 2 if isinstance(overlap, (int, float)) else [float(o) for o in overlap]
        if len(set(roi)) != 1 or len(set(overlap)) != 1:
            raise ValueError(f"SlidingWindowPredictor needs square windows and one overlap, got roi_size={roi}, "
                             f"overlap={overlap}")
        self.inferer, self.roi_size, self.overlap = inferer, roi[0], overlap[0]
        self.cache = WindowCache(None, window_cache) if window_cache > 0 else None

    def plan_windows(self, origin: tuple[int, int], shape: tuple[int, int], keep) -> None:
        """Tell the window cache where the next call's windows lie in the image: the input is the image's
        ``shape`` region at ``origin`` (model px); ``keep(y, x)``: a window there can be needed later. MONAI's own
        scan (``_get_scan_interval``, ``dense_patch_slices``) gives the positions in the order it passes them."""
        if self.cache is None:
            return
        if min(shape) < self.roi_size:  # padded to a window: positions not worth the bookkeeping
            self.cache.plan(None, None)
            return
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        roi = (self.roi_size, self.roi_size)
        scan = _get_scan_interval(tuple(shape), roi, 2, (self.overlap, self.overlap))
        slices = dense_patch_slices(tuple(shape), roi, scan, return_slice=True)
        self.cache.plan([(origin[0] + s[0].start, origin[1] + s[1].start) for s in slices], keep)

    def prune_windows(self) -> None:
        """Drop the cached windows no later chunk can need."""
        if self.cache is not None:
            self.cache.prune()

    def clear_cache(self) -> None:
        """Forget the stored windows (a new image)."""
        if self.cache is not None:
            self.cache.clear()

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
        timer = active_timer()
        timed = network = self.network if timer is None else _TimedNetwork(self.network, timer)
        if self.cache is not None:
            self.cache.network, network = timed, self.cache
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
            out = self.inferer(t, network)
        out = out[0, :, py // 2 : py // 2 + h, px // 2 : px // 2 + w].float().cpu().numpy()
        if timer is not None:  # the inferer's own work (windows, Gaussian weights, accumulation) = all but the forwards
            timer.add("blending", time.perf_counter() - w0 - timed.wall, time.process_time() - c0 - timed.cpu)
        return out


class _TimedNetwork:
    """The network as the inferer calls it, its forward passes added to a :class:`StageTimer` as ``network``."""

    def __init__(self, network: torch.nn.Module, timer) -> None:
        self.network, self.timer, self.wall, self.cpu = network, timer, 0.0, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w0, c0 = time.perf_counter(), time.process_time()
        out = self.network(x)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        self.wall, self.cpu = self.wall + w, self.cpu + c
        self.timer.add("network", w, c)
        return out


@dataclass
class ChunkMaps:
    """Probability maps of one chunk on its ``exact`` area (model scale) and its native RGB read region."""

    y: ChunkGeometry
    x: ChunkGeometry
    region: np.ndarray  # (h, w) float32, model scale, over exact
    boundary: np.ndarray
    rgb: np.ndarray  # native RGB over (y.native_read, x.native_read)
    skipped: bool = False  # background chunk: no network pass, maps are zero


def network_input(
    rgb: np.ndarray, stats: ImageStats, reference: Mapping[str, Sequence[float]] | None, gy: ChunkGeometry,
    gx: ChunkGeometry, native_shape: tuple[int, int], model_shape: tuple[int, int],
) -> np.ndarray:
    """(C, h, w) float32 standardised network input of one chunk's net area from its native RGB read region:
    Reinhard, resize to model scale, :func:`bundle.data.channels.rgb_to_input`, whole-image standardisation.
    Gray is resized as one plane (the luma is linear in R, G, B, so this equals resizing the RGB first)."""
    h, w = native_shape
    if stats.input_mode == "gray":
        if stats.gray is not None and stats.gray.shape == (h, w):
            gray = stats.gray[gy.native_read[0] : gy.native_read[1], gx.native_read[0] : gx.native_read[1]]
        else:
            with stage("reinhard"):
                gray = reinhard_gray(rgb, stats.lab_mean, stats.lab_std, reference)
        with stage("resample"):
            x = to_model_scale(gray, gy.native_read, gx.native_read, gy.net, gx.net, native_shape, model_shape)
            planes = np.clip(x / np.float32(255.0), 0.0, 1.0)[None]
    else:
        with stage("reinhard"):
            norm = reinhard_rgb(rgb, stats.lab_mean, stats.lab_std, reference)
        with stage("resample"):
            scaled = np.stack([to_model_scale(np.ascontiguousarray(norm[..., c]), gy.native_read, gx.native_read,
                                              gy.net, gx.net, native_shape, model_shape) for c in range(3)], axis=-1)
            planes = np.moveaxis(rgb_to_input(scaled, stats.input_mode), -1, 0)
    with stage("resample"):  # the standardisation, counted with the resampling it follows
        mean = np.asarray(stats.input_mean, np.float32)[:, None, None]
        std = np.maximum(np.asarray(stats.input_std, np.float32), 1e-8)[:, None, None]
        return np.ascontiguousarray((planes - mean) / std, dtype=np.float32)


def _later_chunks_need(ys: Sequence[ChunkGeometry], xs: Sequence[ChunkGeometry], iy: int, ix: int, roi: int,
                       stride: int):
    """``keep(y, x)``: whether a window at (y, x) (model px) lies inside the ``net`` of a chunk after (iy, ix) in
    row-major order: a later chunk of this row, or any chunk of a later row."""
    row = ys[iy].net
    next_row = ys[iy + 1].net[0] if iy + 1 < len(ys) else None
    next_col = xs[ix + 1].net[0] if ix + 1 < len(xs) else None

    # later chunks' windows start on their net origin's grid (multiples of the stride from it), except the
    # edge-clamped last ones, which are never shared
    def keep(y: int, x: int) -> bool:
        if next_row is not None and y >= next_row and (y - next_row) % stride == 0:
            return True
        return next_col is not None and x >= next_col and (x - next_col) % stride == 0 and y + roi <= row[1]

    return keep


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
    array to (C, h, w) maps whose channels ``REGION``/``BOUNDARY`` are probabilities (DS-HFN's eval output);
    ``boundary`` is the map the watershed separates nuclei with (:func:`bundle.nuclei.binarize.watershed_channel`).
    ``skip_background`` (slides) gives all-zero maps without a network pass where the core is all glass.
    """
    h, w = source.shape
    hm, wm = model_size(h, factor), model_size(w, factor)
    ys = chunk_grid(h, hm, chunk, halo, roi, stride, _blur_radius(h, hm))
    xs = chunk_grid(w, wm, chunk, halo, roi, stride, _blur_radius(w, wm))
    plan = getattr(predictor, "plan_windows", None)
    for iy, gy in enumerate(ys):
        for ix, gx in enumerate(xs):
            if plan is not None:
                plan((gy.net[0], gx.net[0]), (gy.net[1] - gy.net[0], gx.net[1] - gx.net[0]),
                     _later_chunks_need(ys, xs, iy, ix, roi, stride))
            with stage("read"):
                rgb = np.asarray(source.read(*gy.native_read, *gx.native_read))
            expect = (gy.native_read[1] - gy.native_read[0], gx.native_read[1] - gx.native_read[0], 3)
            if rgb.shape != expect or rgb.dtype != np.uint8:
                raise DataError(f"{source.path}: region read gave {rgb.dtype} {rgb.shape}, expected uint8 {expect}")
            shape = (gy.exact[1] - gy.exact[0], gx.exact[1] - gx.exact[0])
            if skip_background:
                cy = slice(gy.native_core[0] - gy.native_read[0], gy.native_core[1] - gy.native_read[0])
                cx = slice(gx.native_core[0] - gx.native_read[0], gx.native_core[1] - gx.native_read[0])
                with stage("glass test"):
                    glass = is_background(rgb[cy, cx]).all()
                if glass:
                    zero = np.zeros(shape, np.float32)
                    yield ChunkMaps(gy, gx, zero, zero, rgb, skipped=True)
                    continue
            x = network_input(rgb, stats, reference, gy, gx, (h, w), (hm, wm))
            maps = predictor(x)
            getattr(predictor, "prune_windows", lambda: None)()
            if maps.ndim != 3 or maps.shape[1:] != x.shape[1:]:
                raise ValueError(f"predictor returned shape {maps.shape} for an input of {x.shape}; expected (C, h, w)")
            with stage("blending"):  # the exact crop of the blended maps
                ey = slice(gy.exact[0] - gy.net[0], gy.exact[1] - gy.net[0])
                ex = slice(gx.exact[0] - gx.net[0], gx.exact[1] - gx.net[0])
                region = np.ascontiguousarray(maps[REGION, ey, ex], np.float32)
                channel = watershed_channel(maps.shape[0])
                boundary = np.zeros_like(region) if channel is None else np.ascontiguousarray(maps[channel, ey, ex], np.float32)
            del maps, x
            yield ChunkMaps(gy, gx, region, boundary, rgb)
            del rgb, region, boundary  # not alive while the next chunk is read and predicted


# ------------------------------------------------------------------------------------------------------------
# nuclei, block by block
# ------------------------------------------------------------------------------------------------------------
