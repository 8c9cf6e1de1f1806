"""Evaluation metrics (paper eq. 28-31) on real masks against MONAI, scipy and numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from monai.metrics.utils import get_mask_edges
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from bundle.evaluation.pixel import (
    MATLAB_BFSCORE_FRACTION,
    BoundaryF1Handler,
    BoundaryF1Metric,
    HausdorffHandler,
    HausdorffMetric,
    PixelPrecisionHandler,
    PixelRecallHandler,
    mask_boundary,
    nearest_sq_distance,
)

SIZE = 256


# ----------------------------------------------------------------------------------------------- data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crop(mask: np.ndarray) -> np.ndarray:
    """The SIZE x SIZE window with the most foreground among a few (keeps crops realistic, not empty)."""
    starts = range(0, mask.shape[0] - SIZE + 1, max(1, (mask.shape[0] - SIZE) // 3))
    windows = [(r, c) for r in starts for c in starts]
    best = max(windows, key=lambda rc: mask[rc[0] : rc[0] + SIZE, rc[1] : rc[1] + SIZE].sum())
    return mask[best[0] : best[0] + SIZE, best[1] : best[1] + SIZE]


@pytest.fixture(scope="module")
def ground_truths(tnbc_dir, monuseg_dir) -> list[np.ndarray]:
    """Two TNBC masks and two MoNuSeg labels > 0 (from different patients / organs), cropped to 256 x 256, bool."""
    tnbc = [np.array(Image.open(p)) > 0 for p in sorted((tnbc_dir / "masks").glob("*.png"))[::25]]
    monuseg = [np.array(Image.open(p)) > 0 for p in sorted((monuseg_dir / "labels").glob("*.png"))[::15]]
    out = [_crop(m) for m in tnbc + monuseg]
    assert all(m.sum() > 500 for m in out)
    return out


def _perturbations(gt: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    labels, n = ndimage.label(gt)
    dropped = gt & ~np.isin(labels, np.arange(1, n + 1, 3))  # every third nucleus removed
    added = gt.copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cy, cx in rng.integers(10, SIZE - 10, size=(3, 2)):
        added |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 36  # three extra round nuclei
    return {
        "identical": gt.copy(),
        "eroded": ndimage.binary_erosion(gt, iterations=2),
        "dilated": ndimage.binary_dilation(gt, iterations=2),
        "shift1": np.roll(gt, 1, axis=1),
        "shift3": np.roll(gt, (3, -2), axis=(0, 1)),
        "shift5": np.roll(gt, 5, axis=0),
        "dropped": dropped,
        "added": added,
        "speck": np.pad(np.ones((2, 2), bool), ((5, SIZE - 7), (SIZE - 9, 7))),  # one tiny blob far from most nuclei
    }


@pytest.fixture(scope="module")
def cases(ground_truths) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, y_pred, y): every perturbation of every ground truth, as binary (N, 1, 256, 256) float tensors."""
    rng = np.random.default_rng(0)
    names, preds, gts = [], [], []
    for i, gt in enumerate(ground_truths):
        for name, pred in _perturbations(gt, rng).items():
            names.append(f"{i}:{name}")
            preds.append(pred)
            gts.append(gt)
    to = lambda a: torch.tensor(np.stack(a)[:, None], dtype=torch.float32)  # noqa: E731
    return names, to(preds), to(gts)


@pytest.fixture(scope="module")
def monai_hd(cases) -> dict:
    """MONAI's ``compute_hausdorff_distance`` (default arguments) on every case, per percentile (computed once)."""
    _, y_pred, y = cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {p: compute_hausdorff_distance(y_pred, y, percentile=p) for p in (None, 95)}


# ------------------------------------------------------------------------------------------ references


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _bf1_reference(pred: np.ndarray, gt: np.ndarray, theta: float, structure: np.ndarray | None = None) -> float:
    """Csurka et al.'s BF1 with scipy distance transforms (non-empty masks)."""
    bp = pred & ~ndimage.binary_erosion(pred, structure=structure)
    bg = gt & ~ndimage.binary_erosion(gt, structure=structure)
    precision = (ndimage.distance_transform_edt(~bg)[bp] <= theta).mean()
    recall = (ndimage.distance_transform_edt(~bp)[bg] <= theta).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------- building blocks


def test_mask_boundary_is_monais_edges(ground_truths):
    for gt in ground_truths[::2]:
        ours = mask_boundary(torch.tensor(gt)).numpy()
        np.testing.assert_array_equal(ours, _edges(gt))
        np.testing.assert_array_equal(ours, get_mask_edges(torch.tensor(gt), torch.tensor(gt), crop=False)[0].numpy())
        eight = gt & ~ndimage.binary_erosion(gt, structure=np.ones((3, 3)))
        np.testing.assert_array_equal(mask_boundary(torch.tensor(gt), connectivity=2).numpy(), eight)
    full = torch.ones(5, 6, dtype=torch.bool)  # the image border counts as background
    assert mask_boundary(full).sum() == 2 * 5 + 2 * 6 - 4


def test_nearest_distance_is_exact_euclidean_transform(ground_truths):
    """All pixels queried = a dense EDT; compared with scipy's on boundaries, sparse points and far targets."""
    rng = np.random.default_rng(1)
    targets = [_edges(ground_truths[0]), _edges(ground_truths[3]), rng.random((SIZE, SIZE)) > 0.999]
    far = np.zeros((SIZE, SIZE), bool)
    far[3, 250] = far[200, 10] = True  # most pixels 64+ px away: the whole-column stage
    targets.append(far)
    dst = torch.tensor(np.stack(targets))
    group, sq = nearest_sq_distance(torch.ones_like(dst), dst)
    dense = sq.sqrt().reshape(dst.shape).numpy()
    for k, target in enumerate(targets):
        np.testing.assert_allclose(dense[k], ndimage.distance_transform_edt(~target), atol=1e-4, rtol=0)
    assert (group.reshape(dst.shape) == torch.arange(len(targets))[:, None, None]).all()
    # the "within max_sq" mode decides the threshold exactly
    for max_sq in (0, 4, 8, 13, 50):
        _, sq_t = nearest_sq_distance(torch.ones_like(dst), dst, max_sq=max_sq)
        ref = np.stack([ndimage.distance_transform_edt(~t) for t in targets]) ** 2
        np.testing.assert_array_equal((sq_t <= max_sq).reshape(dst.shape).numpy(), np.round(ref) <= max_sq)
    # an image without targets: infinite distances
    _, sq_empty = nearest_sq_distance(torch.ones(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert torch.isinf(sq_empty).all()


# ----------------------------------------------------------------------------------------- Hausdorff


@pytest.mark.parametrize("percentile", [None, 95])
def test_hausdorff_matches_monai(cases, monai_hd, percentile):
    names, y_pred, y = cases
    ours = HausdorffMetric(percentile=percentile)(y_pred, y)
    ref = monai_hd[percentile]
    assert ours.shape == ref.shape == (len(names), 1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=lambda m: f"{m}\ncases: {names}")
    assert (ours[[n.endswith("identical") for n in names]] == 0).all()
    assert (ours[[n.endswith("shift5") for n in names]] > 0).all()


def test_hausdorff_matches_scipy_directed_hausdorff(cases):
    names, y_pred, y = cases
    ours = HausdorffMetric()(y_pred, y)[:, 0].numpy()
    directed = HausdorffMetric(directed=True)(y_pred, y)[:, 0].numpy()
    for k, name in enumerate(names):
        a = np.argwhere(_edges(y_pred[k, 0].numpy() > 0))
        b = np.argwhere(_edges(y[k, 0].numpy() > 0))
        ab, ba = directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]
        assert ours[k] == pytest.approx(max(ab, ba), abs=1e-4), name
        assert directed[k] == pytest.approx(ab, abs=1e-4), name


def test_hausdorff_empty_policy_matches_monai(ground_truths):
    gt = torch.tensor(ground_truths[0], dtype=torch.float32)[None, None]
    empty = torch.zeros_like(gt)
    y_pred = torch.cat([empty, gt, empty, gt])
    y = torch.cat([gt, empty, empty, gt])
    for percentile, one_empty in ((None, math.inf), (95, math.nan)):
        with pytest.warns(UserWarning, match="2 of 4 ground-truth masks and 2 of 4 predictions are empty"):
            ours = HausdorffMetric(percentile=percentile)(y_pred, y)[:, 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = compute_hausdorff_distance(y_pred, y, percentile=percentile)[:, 0]
        torch.testing.assert_close(ours, ref, equal_nan=True)
        expected = torch.tensor([one_empty, one_empty, math.nan, 0.0])
        torch.testing.assert_close(ours, expected, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn_empty=False stays silent
        HausdorffMetric(warn_empty=False)(y_pred, y)


def test_hausdorff_multichannel_include_background_like_monai(cases):
    _, y_pred, y = cases
    two_p, two_y = torch.cat([1 - y_pred[:4], y_pred[:4]], 1), torch.cat([1 - y[:4], y[:4]], 1)
    for include_background in (False, True):
        ours = HausdorffMetric(include_background=include_background)(two_p, two_y)
        ref = compute_hausdorff_distance(two_p, two_y, include_background=include_background)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ boundary F1


@pytest.mark.parametrize(
    "kwargs, theta, structure",
    [
        ({}, 2.0, None),
        ({"tolerance": 0.0}, 0.0, None),
        ({"tolerance": 4.5}, 4.5, None),
        ({"tolerance_fraction": MATLAB_BFSCORE_FRACTION}, MATLAB_BFSCORE_FRACTION * math.hypot(SIZE, SIZE), None),
        ({"connectivity": 2}, 2.0, np.ones((3, 3))),
    ],
)
def test_boundary_f1_matches_scipy_reference(cases, kwargs, theta, structure):
    names, y_pred, y = cases
    ours = BoundaryF1Metric(**kwargs)(y_pred, y)[:, 0].numpy()
    for k, name in enumerate(names):
        ref = _bf1_reference(y_pred[k, 0].numpy() > 0, y[k, 0].numpy() > 0, theta, structure)
        assert ours[k] == pytest.approx(ref, abs=1e-6), name
    assert ours[[n.endswith("identical") for n in names]] == pytest.approx(1.0)
    assert (ours[[n.endswith("shift5") for n in names]] < 1).all()


def test_boundary_f1_empty_policy(ground_truths):
    gt = torch.tensor(ground_truths[1], dtype=torch.float32)[None, None]
    empty = torch.zeros_like(gt)
    y_pred, y = torch.cat([empty, gt, empty]), torch.cat([gt, empty, empty])  # pred empty, gt empty, both
    expected = torch.tensor([0.0, math.nan, math.nan])
    torch.testing.assert_close(BoundaryF1Metric()(y_pred, y)[:, 0], expected, equal_nan=True)
    torch.testing.assert_close(BoundaryF1Metric(ignore_empty=False)(y_pred, y)[:, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_bad_arguments_and_inputs_raise():
    with pytest.raises(ValueError, match="not both"):
        BoundaryF1Metric(tolerance=2, tolerance_fraction=0.01)
    with pytest.raises(ValueError, match="percentile"):
        HausdorffMetric(percentile=0)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        BoundaryF1Metric()(x, torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        HausdorffMetric()(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))


# ------------------------------------------------------------------- batching, accumulation, handlers


def test_batching_and_accumulation_equal_per_sample(cases):
    names, y_pred, y = cases
    names, y_pred, y = names[::4], y_pred[::4], y[::4]  # a subset: every perturbation kind, fewer images
    for metric in (BoundaryF1Metric(), HausdorffMetric(percentile=95)):
        batched = metric(y_pred, y)
        metric.reset()
        singles = torch.cat([metric(y_pred[k : k + 1], y[k : k + 1]) for k in range(len(names))])
        torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
        # the buffer over several iterations (what DDP gathers) holds every sample once, in order
        torch.testing.assert_close(metric.get_buffer(), singles)
        assert metric.aggregate().item() == pytest.approx(np.nanmean(singles.numpy()), rel=1e-6)
        assert metric.aggregate(reduction="none").shape == (len(names), 1)
        metric.reset()
        metric(y_pred[:5], y[:5])
        metric(y_pred[5:], y[5:])  # uneven iterations
        assert metric.aggregate().item() == pytest.approx(np.nanmean(singles.numpy()), rel=1e-6)
        # decollated batches (lists of channel-first tensors, as MONAI workflows pass them) give the same values
        metric.reset()
        torch.testing.assert_close(metric(list(y_pred), list(y)), singles, atol=1e-5, rtol=0)


def _np_region_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
    nan = float("nan")
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if gt.any() else nan,
        "iou": tp / (tp + fp + fn) if gt.any() else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
    }


def test_ignite_handlers_report_the_metric_values(cases, monai_hd):
    from ignite.engine import Engine

    names, y_pred, y = cases
    batches = [(y_pred[a : a + 7], y[a : a + 7]) for a in range(0, len(names), 7)]
    engine = Engine(lambda e, batch: batch)
    handlers = {
        "bf1": BoundaryF1Handler(tolerance=2.0),
        "bf1_diag": BoundaryF1Handler(tolerance_fraction=MATLAB_BFSCORE_FRACTION),
        "hd95": HausdorffHandler(percentile=95, include_background=True),
        "precision": PixelPrecisionHandler(),
        "recall": PixelRecallHandler(),
    }
    for name, handler in handlers.items():
        handler.attach(engine, name)
    engine.run(batches, max_epochs=1)
    m = engine.state.metrics
    assert m["bf1"] == pytest.approx(BoundaryF1Metric()(y_pred, y).nanmean().item(), rel=1e-6)
    diag = BoundaryF1Metric(tolerance_fraction=MATLAB_BFSCORE_FRACTION)(y_pred, y).nanmean().item()
    assert m["bf1_diag"] == pytest.approx(diag, rel=1e-6)
    assert m["hd95"] == pytest.approx(monai_hd[95].nanmean().item(), rel=1e-5)
    ref = [_np_region_scores(y_pred[k, 0].numpy() > 0, y[k, 0].numpy() > 0) for k in range(len(names))]
    assert m["precision"] == pytest.approx(np.nanmean([r["precision"] for r in ref]), rel=1e-5)
    assert m["recall"] == pytest.approx(np.nanmean([r["recall"] for r in ref]), rel=1e-5)
    assert engine.state.metric_details["hd95"].shape == (len(names), 1)
