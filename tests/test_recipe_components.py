"""Recipe components: wide boundary targets with a kind weight, the weighted boundary loss, bilinear decoder
upsampling and the CPU-time training budget, each against an independent reference (skimage, torch, a brute-force
loop or hand-worked values). Also: test_recipe_channels.py, test_recipe_datasets.py, test_recipe_scoring.py."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.segmentation import find_boundaries

from bundle.data.transforms import NucleiTargets, NucleiTargetsd
from bundle.handlers.training import TrainingBudget
from bundle.model.losses import DSHFNLoss
from bundle.model.network import DSHFN

# --- bundle.data.transforms.NucleiTargets(width) ------------------------------------------------------------------


def random_instances(h: int, w: int, n: int, rng) -> np.ndarray:
    """Overlapping random rectangles and discs (later ones on top): touching nuclei, nuclei at the border."""
    ids = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 6)
        if k % 2:
            ids[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        else:
            ids[max(cy - r, 0): cy + r, max(cx - r, 0): cx + r] = k
    return ids


def brute_force_boundary(ids: np.ndarray, width: int) -> np.ndarray:
    """Nucleus pixels with another id (or background) within city-block distance ``width``; borders reflect."""
    h, w = ids.shape
    pad = np.pad(ids, width, mode="symmetric")  # d c b a | a b c d: scipy's "reflect", skimage's convention
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            if ids[i, j] == 0:
                continue
            for di in range(-width, width + 1):
                for dj in range(-(width - abs(di)), width - abs(di) + 1):
                    if pad[i + width + di, j + width + dj] != ids[i, j]:
                        out[i, j] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_boundary_width1_is_find_boundaries_inner(seed):
    ids = random_instances(20, 17, 8, np.random.default_rng(seed))
    target = NucleiTargets(width=1)(ids[None].astype(np.float32))
    np.testing.assert_array_equal(target[0], ids > 0)
    np.testing.assert_array_equal(target[1].astype(bool), find_boundaries(ids, mode="inner", connectivity=1))
    np.testing.assert_array_equal(target[1].astype(bool), brute_force_boundary(ids, 1))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("width", [2, 3])
def test_boundary_wide_matches_brute_force(seed, width):
    ids = random_instances(19, 23, 10, np.random.default_rng(100 + seed))
    target = NucleiTargets(width=width)(torch.as_tensor(ids[None], dtype=torch.float32))
    assert isinstance(target, torch.Tensor) and tuple(target.shape) == (2, 19, 23)
    np.testing.assert_array_equal(target[1].numpy().astype(bool), brute_force_boundary(ids, width))


def test_touching_nuclei_get_a_band_on_both_sides():
    ids = np.zeros((12, 16), np.int64)
    ids[2:10, 2:8], ids[2:10, 8:14] = 1, 2  # touching along the line between columns 7 and 8
    b = NucleiTargets(width=2)(ids[None])[1].astype(bool)
    # interior rows 4..7 (2 px from the top/bottom edges): columns 2,3 (background left), 6,7 | 8,9, 12,13
    for r in range(4, 8):
        assert np.flatnonzero(b[r]).tolist() == [2, 3, 6, 7, 8, 9, 12, 13]
    assert not b[ids == 0].any() and b[2:4, 2:14].all() and b[8:10, 2:14].all()  # top and bottom bands
    assert np.flatnonzero(NucleiTargets(width=1)(ids[None])[1][5]).tolist() == [2, 7, 8, 13]
    with pytest.raises(ValueError):
        NucleiTargets(width=0)
    with pytest.raises(ValueError):
        NucleiTargets(mode="outer", width=2)


def test_targets_kind_weight_channel():
    ids = random_instances(16, 16, 5, np.random.default_rng(0))[None].astype(np.float32)
    t = NucleiTargetsd("label", kind_key="label_kind")
    inst = t({"label": ids, "label_kind": "instance"})["label"]
    binary = t({"label": torch.as_tensor(ids > 0, dtype=torch.float32), "label_kind": "binary"})["label"]
    assert inst.shape == (3, 16, 16) and (inst[2] == 1).all()
    assert isinstance(binary, torch.Tensor) and tuple(binary.shape) == (3, 16, 16) and (binary[2] == 0).all()
    np.testing.assert_array_equal(inst[:2], NucleiTargets()(ids))
    assert NucleiTargetsd("label")({"label": ids})["label"].shape == (2, 16, 16)  # no kind_key: two channels
    with pytest.raises(KeyError, match="label_kind"):
        t({"label": ids})


# --- bundle.model.losses.DSHFNLoss: pos_weight and the boundary weight channel -------------------------------------


def pred_label(n: int = 2, h: int = 16, w: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, 2, h, w, generator=g)
    label = (torch.rand(n, 2, h, w, generator=g) > 0.7).float()
    return pred, label


@pytest.mark.parametrize("pos_weight", [1.0, 5.0])
def test_edge_term_is_bce_with_pos_weight(pos_weight):
    pred, label = pred_label()
    loss = DSHFNLoss(edge_pos_weight=pos_weight)
    loss(pred, label)
    ref = F.binary_cross_entropy_with_logits(pred[:, 1:2], label[:, 1:2], pos_weight=torch.tensor(pos_weight))
    assert float(loss.last_terms["edge"]) == pytest.approx(float(ref), rel=1e-6)
    ones = torch.cat([label, torch.ones_like(label[:, :1])], 1)  # an all-ones weight channel changes nothing
    loss(pred, ones)
    assert float(loss.last_terms["edge"]) == pytest.approx(float(ref), rel=1e-6)
    if pos_weight != 1.0:
        assert float(ref) != pytest.approx(float(F.binary_cross_entropy_with_logits(pred[:, 1:2], label[:, 1:2])))


def test_zero_weight_image_does_not_count_in_edge_term():
    pred, label = pred_label(n=2)
    weight = torch.zeros(2, 1, 16, 16)
    weight[0] = 1.0  # image 1: binary mask, boundary unknown
    loss = DSHFNLoss(edge_pos_weight=3.0)
    loss(pred, torch.cat([label, weight], 1))
    both = float(loss.last_terms["edge"])
    loss(pred[:1], label[:1])
    alone = float(loss.last_terms["edge"])
    assert both == pytest.approx(alone, rel=1e-6)
    # the other image's boundary prediction gets no gradient from the edge term
    p = pred.clone().requires_grad_(True)
    DSHFNLoss(alpha=0.0, beta=1.0, gamma=0.0)(p, torch.cat([label, weight], 1)).backward()
    assert p.grad[1].abs().sum() == 0 and p.grad[0, 1].abs().sum() > 0


def test_all_zero_weight_gives_zero_finite_edge_term_without_gradient():
    pred, label = pred_label()
    p = pred.clone().requires_grad_(True)
    loss = DSHFNLoss()
    total = loss(p, torch.cat([label, torch.zeros_like(label[:, :1])], 1))
    total.backward()
    assert float(loss.last_terms["edge"]) == 0.0 and math.isfinite(float(total.detach()))
    assert torch.isfinite(p.grad).all()
    assert p.grad[:, 1].abs().sum() == 0 and p.grad[:, 0].abs().sum() > 0  # region terms still train


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_edge_pos_weight_must_be_positive(bad):
    with pytest.raises(ValueError, match="edge_pos_weight"):
        DSHFNLoss(edge_pos_weight=bad)


# --- bundle.model.network.DSHFN(upsample) --------------------------------------------------------------------------


def test_bilinear_upsample_shapes_match_transpose(one_torch_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    nets = {u: DSHFN(features=8, upsample=u) for u in ("transpose", "bilinear")}
    kinds = {u: {type(m) for m in n.modules()} for u, n in nets.items()}
    assert torch.nn.ConvTranspose2d in kinds["transpose"] and torch.nn.Upsample not in kinds["transpose"]
    assert torch.nn.ConvTranspose2d not in kinds["bilinear"] and torch.nn.Upsample in kinds["bilinear"]
    for train in (True, False):
        outs = {}
        for u, n in nets.items():
            n.train(train)
            with torch.no_grad():
                outs[u] = n(x)
        assert outs["bilinear"].shape == outs["transpose"].shape == ((2, 2, 64, 64) if train else (2, 3, 64, 64))
        assert torch.isfinite(outs["bilinear"]).all()
    with pytest.raises(ValueError, match="upsample"):
        DSHFN(features=8, upsample="nearest")


def test_three_input_channels(one_torch_thread):
    net = DSHFN(in_channels=3, features=8, upsample="bilinear").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 64))
    assert tuple(out.shape) == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 1, 32, 32))


# --- bundle.handlers.training.TrainingBudget --------------------------------------------------------------------------


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.parametrize("budget_s,stop_epoch", [(0.05, 1), (0.5, 2)])
def test_training_budget_stops_after_the_epoch_that_uses_it(budget_s, stop_epoch):
    from ignite.engine import Engine

    engine = Engine(lambda e, batch: burn(0.08))  # 4 iterations: 0.32 CPU s per epoch
    budget = TrainingBudget(minutes=budget_s / 60)
    budget.attach(engine)
    assert budget.used() == 0.0
    engine.run([0, 1, 2, 3], max_epochs=10)
    assert engine.state.epoch == stop_epoch and engine.state.iteration == 4 * stop_epoch  # whole epochs only
    assert budget.used() >= budget_s


def test_training_budget_large_runs_every_epoch():
    from ignite.engine import Engine

    engine = Engine(lambda e, batch: None)
    TrainingBudget(minutes=1000).attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert engine.state.epoch == 3 and engine.state.iteration == 6


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_training_budget_invalid_minutes(bad):
    with pytest.raises(ValueError, match="minutes"):
        TrainingBudget(bad)
