"""DS-HFN loss (paper eq. 21-27) against independent numpy/scipy references, on real TNBC masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from bundle.handlers.training import LossTermsHandler
from bundle.model.losses import DSHFNLoss, GradientAlignedLoss

EPS = 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _glga_reference(logits: np.ndarray, target: np.ndarray, eps: float = EPS) -> float:
    """Eq. 22-26 with scipy's Sobel: mean |sqrt(Sx^2 + Sy^2 + eps)(p) - same(Y)|, per image and channel."""

    def mag(a: np.ndarray) -> np.ndarray:
        return np.sqrt(ndimage.sobel(a, axis=0) ** 2 + ndimage.sobel(a, axis=1) ** 2 + eps)

    p = _sigmoid(logits.astype(np.float64))
    n, c = p.shape[:2]
    diffs = [np.abs(mag(p[a, b]) - mag(target[a, b].astype(np.float64))) for a in range(n) for b in range(c)]
    return float(np.mean(diffs))


def _bce_reference(logits: np.ndarray, target: np.ndarray) -> float:
    p = _sigmoid(logits.astype(np.float64))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def _dice_loss_reference(logits: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> float:
    """MONAI's soft Dice loss as documented: per sample and channel, then the mean."""
    p = _sigmoid(logits.astype(np.float64))
    inter = (p * target).sum(axis=(2, 3))
    denom = p.sum(axis=(2, 3)) + target.sum(axis=(2, 3))
    return float(np.mean(1.0 - (2.0 * inter + smooth) / (denom + smooth)))


@pytest.fixture(scope="module")
def tnbc_labels(tnbc_dir) -> np.ndarray:
    """(4, 2, 64, 64) float64 [foreground, boundary] from four real TNBC masks (64x64 crops around nuclei)."""
    labels = []
    for path in sorted((tnbc_dir / "masks").glob("*.png"))[:4]:
        m = np.array(Image.open(path)) > 0
        m = m[96:160, 96:160]
        boundary = m & ~ndimage.binary_erosion(m)
        labels.append(np.stack([m, boundary]).astype(np.float64))
    out = np.stack(labels)
    assert out[:, 0].sum() > 0, "the crops must contain nuclei"
    return out


def _logits_like(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Imperfect logits: the label smoothed, scaled and with noise (a plausible network output)."""
    rng = np.random.default_rng(seed)
    smooth = np.stack([[ndimage.gaussian_filter(c, 1.5) for c in n] for n in labels])
    return 6.0 * (smooth - 0.5) + rng.normal(0, 1.0, labels.shape)


def test_glga_matches_scipy_sobel_reference(tnbc_labels):
    logits = _logits_like(tnbc_labels)
    pred, label = torch.tensor(logits, dtype=torch.float32), torch.tensor(tnbc_labels, dtype=torch.float32)
    ours = GradientAlignedLoss()(pred, label)
    ref = _glga_reference(logits, tnbc_labels)
    assert ref > 0.05  # the reference is not trivially small
    assert ours.item() == pytest.approx(ref, rel=1e-5)


def test_terms_match_references(tnbc_labels):
    logits = _logits_like(tnbc_labels, seed=1)
    pred = torch.tensor(logits, dtype=torch.float32)
    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    loss = DSHFNLoss(alpha=0.6, beta=0.2, gamma=0.2)
    total = loss(pred, label)
    seg = _dice_loss_reference(logits[:, :1], tnbc_labels[:, :1]) + _bce_reference(logits[:, :1], tnbc_labels[:, :1])
    edge = _bce_reference(logits[:, 1:], tnbc_labels[:, 1:])
    glga = _glga_reference(logits[:, :1], tnbc_labels[:, :1])
    assert loss.last_terms["seg"].item() == pytest.approx(seg, rel=1e-5)
    assert loss.last_terms["edge"].item() == pytest.approx(edge, rel=1e-5)
    assert loss.last_terms["glga"].item() == pytest.approx(glga, rel=1e-5)
    assert total.item() == pytest.approx(0.6 * seg + 0.2 * edge + 0.2 * glga, rel=1e-5)
    assert loss.last_terms["total"].item() == pytest.approx(total.item())


def test_perfect_prediction_gives_near_zero_terms(tnbc_labels):
    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    perfect = 40.0 * (2 * label - 1)  # sigmoid saturates to the 0/1 label
    loss = DSHFNLoss()
    loss(perfect, label)
    assert loss.last_terms["glga"].item() < 1e-6
    assert loss.last_terms["edge"].item() < 1e-6
    assert loss.last_terms["seg"].item() < 1e-6
    # a confidently wrong (shifted) prediction is far from zero for every term; note that an inverted one
    # would not be for L_GLGA, which compares gradient magnitudes
    loss(torch.roll(perfect, shifts=3, dims=-1), label)
    assert min(loss.last_terms[k].item() for k in ("seg", "edge", "glga")) > 0.1


def test_glga_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(2, 1, 6, 7) > 0.5).double()
    fn = GradientAlignedLoss()
    # bundle.model.sobel computes in float32 whatever the input dtype, so the finite-difference step and
    # tolerances are those a float32 function supports (gradients here are ~1e-2).
    assert torch.autograd.gradcheck(lambda t: fn(t, y), (x,), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_zero_weights_switch_terms_off(tnbc_labels):
    logits = torch.tensor(_logits_like(tnbc_labels, seed=2), dtype=torch.float32)
    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    full = DSHFNLoss(alpha=0.6, beta=0.2, gamma=0.2)
    full(logits, label)
    terms = {k: v.item() for k, v in full.last_terms.items()}

    no_glga = DSHFNLoss(alpha=0.6, beta=0.2, gamma=0.0)
    pred = logits.clone().requires_grad_(True)
    value = no_glga(pred, label)
    assert value.item() == pytest.approx(0.6 * terms["seg"] + 0.2 * terms["edge"], rel=1e-6)
    assert no_glga.last_terms["glga"].item() == pytest.approx(terms["glga"], rel=1e-6)  # still logged
    value.backward()
    ref_pred = logits.clone().requires_grad_(True)
    seg, edge = full.seg_loss(ref_pred[:, :1], label[:, :1]), full.edge_loss(ref_pred[:, 1:], label[:, 1:])
    (0.6 * seg + 0.2 * edge).backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad)

    only_glga = DSHFNLoss(alpha=0.0, beta=0.0, gamma=1.0, log_disabled_terms=False)
    assert only_glga(logits, label).item() == pytest.approx(terms["glga"], rel=1e-6)
    assert set(only_glga.last_terms) == {"glga", "total"}

    with pytest.raises(ValueError, match="at least one"):
        DSHFNLoss(alpha=0, beta=0, gamma=0)
    with pytest.raises(ValueError, match="gamma"):
        DSHFNLoss(gamma=-0.1)


def test_boundary_decoder_ablation(tnbc_labels):
    logits = torch.tensor(_logits_like(tnbc_labels, seed=3), dtype=torch.float32)
    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    with pytest.raises(ValueError, match="beta=0"):
        DSHFNLoss()(logits[:, :1], label)
    loss = DSHFNLoss(alpha=0.6, beta=0.0, gamma=0.2)
    value = loss(logits[:, :1], label)
    assert "edge" not in loss.last_terms
    terms = {k: v.item() for k, v in loss.last_terms.items()}
    assert value.item() == pytest.approx(0.6 * terms["seg"] + 0.2 * terms["glga"], rel=1e-6)
    with pytest.raises(ValueError, match="pred must be"):
        loss(logits[:, 0], label)
    with pytest.raises(ValueError, match="label"):
        DSHFNLoss()(logits, label[:, :1])


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 30.0 * self.conv(x)  # large logits: saturated sigmoids are where half precision fails


@pytest.mark.parametrize("mode", ["bf16-autocast", "fp16-input"])
def test_amp_stability(tnbc_labels, mode):
    torch.manual_seed(0)
    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    image = torch.tensor(tnbc_labels[:, :1], dtype=torch.float32) * 2 - 1
    net = _TinyNet()
    loss = DSHFNLoss()
    if mode == "bf16-autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = net(image)
            assert pred.dtype == torch.bfloat16
            value = loss(pred, label)
            glga_amp = GradientAlignedLoss()(pred[:, :1], label[:, :1])  # used on its own under autocast too
        glga_fp32 = GradientAlignedLoss()(pred[:, :1].detach().float(), label[:, :1])
        assert glga_amp.dtype == torch.float32 and glga_amp.item() == pytest.approx(glga_fp32.item(), rel=1e-6)
    else:
        pred = net(image).half()
        value = loss(pred, label)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    # the half-precision loss agrees with the float32 one on the same logits
    reference = DSHFNLoss()(pred.detach().float(), label)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_loss_terms_handler_logs_to_engine(tnbc_labels):
    from ignite.engine import Engine, Events

    label = torch.tensor(tnbc_labels, dtype=torch.float32)
    logits = [torch.tensor(_logits_like(tnbc_labels, seed=s), dtype=torch.float32) for s in range(3)]
    loss = DSHFNLoss()
    seen = []

    def step(engine, pred):
        value = loss(pred, label)
        seen.append({k: v.item() for k, v in loss.last_terms.items()})
        return {"loss": value.item()}

    engine = Engine(step)
    LossTermsHandler(loss).attach(engine)
    outputs = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    engine.run(logits, max_epochs=1)
    for k in ("seg", "edge", "glga", "total"):
        assert engine.state.metrics[f"loss_{k}"] == pytest.approx(np.mean([s[k] for s in seen]), rel=1e-6)
        assert [o[f"loss_{k}"] for o in outputs] == pytest.approx([s[k] for s in seen], rel=1e-6)
    assert outputs[0]["loss"] == pytest.approx(seen[0]["total"], rel=1e-6)
