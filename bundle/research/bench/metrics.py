"""Boundary F1 and HD95 of :mod:`bundle.evaluation.pixel` against MONAI's ``HausdorffDistanceMetric(percentile=95)``.

Inputs are realistic: ground truths are TNBC masks (resized to 256 x 256, as the paper does) and MoNuSeg
labels > 0 (1000 x 1000) from ``../shared/data`` (or ``$DSHFN_SHARED_DATA``), with perturbed copies
(shifted, dilated, some nuclei dropped) as predictions; random disks when the data are absent.
Each row times one ``metric(y_pred, y)`` call on the whole batch, wall-clock with device sync. The three
metrics are timed in turn within each repetition (after one warm-up), so load from other jobs on a shared
machine hits them alike; the median and the minimum over ``args.repeat`` (at least 3) repetitions are reported,
the minimum being the steadier figure on a busy machine.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric
from PIL import Image
from scipy import ndimage

from bundle import bundle_root
from bundle.evaluation.pixel import BoundaryF1Metric, HausdorffMetric
from bundle.research.bench import sync

ROOT = Path(bundle_root())
DATA = Path(os.environ.get("DSHFN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: 2 px shift, 1 px dilation, every fifth nucleus dropped."""
    labels, n = ndimage.label(gt)
    pred = gt & ~np.isin(labels, np.arange(1 + seed % 5, n + 1, 5))
    return ndimage.binary_dilation(np.roll(pred, (2, -1), axis=(0, 1)))


def _disks(count: int, size: int, seed: int) -> list[np.ndarray]:
    """Fallback ground truths: random non-overlapping-ish disks of radius 4-11, about 40 per 256 x 256."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    n = 40 * (size * size) // (256 * 256)
    masks = []
    for _ in range(count):
        m = np.zeros((size, size), bool)
        for cy, cx, r in zip(rng.integers(0, size, n), rng.integers(0, size, n), rng.integers(4, 12, n)):
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks.append(m)
    return masks


def load_masks(kind: str, count: int) -> tuple[list[np.ndarray], str]:
    """``count`` ground-truth masks: ``"tnbc"`` (256 x 256) or ``"monuseg"`` (1000 x 1000), or disks if absent."""
    if kind == "tnbc" and (DATA / "tnbc" / "masks").is_dir():
        paths = sorted((DATA / "tnbc" / "masks").glob("*.png"))[:count]
        return [np.array(Image.open(p).resize((256, 256), Image.NEAREST)) > 0 for p in paths], "tnbc"
    if kind == "monuseg" and (DATA / "monuseg" / "labels").is_dir():
        paths = sorted((DATA / "monuseg" / "labels").glob("*.png"))[:count]
        return [np.array(Image.open(p)) > 0 for p in paths], "monuseg"
    return _disks(count, 256 if kind == "tnbc" else 1000, seed=0), "synthetic disks"


def _time_in_turn(fns: dict, device: torch.device, repeat: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each ``fn()`` per repetition, the functions timed one after another each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(max(3, repeat)):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def run(args) -> list[dict]:
    device = torch.device(args.device)
    setups = [("tnbc", 4 if args.quick else 16), ("monuseg", 1 if args.quick else 4)]
    ours = {
        "HD95": HausdorffMetric(percentile=95, include_background=True, warn_empty=False),
        "BF1": BoundaryF1Metric(),
    }
    monai_hd95 = HausdorffDistanceMetric(percentile=95, include_background=True)
    rows = []
    for kind, count in setups:
        gts, source = load_masks(kind, count)
        preds = [_perturb(g, k) for k, g in enumerate(gts)]
        y = torch.tensor(np.stack(gts)[:, None], dtype=torch.float32, device=device)
        y_pred = torch.tensor(np.stack(preds)[:, None], dtype=torch.float32, device=device)
        case = f"{len(gts)}x{y.shape[-2]}x{y.shape[-1]} ({source})"

        def call(metric):
            metric.reset()
            return metric(y_pred, y)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation notice inside get_mask_edges
            times = _time_in_turn(
                {"monai": lambda: call(monai_hd95), **{k: (lambda m=m: call(m)) for k, m in ours.items()}},
                device,
                args.repeat,
            )
            reference = call(monai_hd95)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        for name, metric in ours.items():
            value = call(metric)
            rows.append(
                {
                    "case": case,
                    "metric": name,
                    "ours_s": med[name],
                    "monai_hd95_s": med["monai"],
                    "ratio": med[name] / med["monai"],
                    "ours_min_s": best[name],
                    "monai_hd95_min_s": best["monai"],
                    "ratio_min": best[name] / best["monai"],
                    "mean_value": float(value.nanmean()),
                    "max_abs_diff_vs_monai": float((value - reference).abs().max()) if name == "HD95" else float("nan"),
                    "threads": torch.get_num_threads(),
                }
            )
    return rows
