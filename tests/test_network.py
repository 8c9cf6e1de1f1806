"""DS-HFN network (bundle/model/network.py): output contract, ablations, gradients, references, TorchScript."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from bundle.model.network import (
    DSHFN,
    HFEM,
    DeformableConv,
    GlobalStream,
    LocalStream,
    MutualRefinement,
    SpatialAttention,
    shape_summary,
)
from bundle.model.sobel import SobelMagnitude

SMALL = dict(features=4)  # narrowest legal width: fast, same topology as the default
VARIANTS = {
    "full": {},
    "local_only": dict(streams="local"),
    "global_only": dict(streams="global"),
    "additive_fusion": dict(fusion="add"),
    "no_boundary_decoder": dict(boundary_decoder=False),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        return torch.jit.script(model)


@pytest.mark.parametrize("size", [256, 512])
def test_default_model_eval_shapes(size):
    model = DSHFN().eval()
    assert model.size_divisor == 32
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 3, size, size)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ablation_variants_train_and_eval_shapes(name):
    kwargs = VARIANTS[name]
    model = DSHFN(**SMALL, **kwargs)
    x = torch.randn(2, 1, 64, 96)
    train_channels = 1 if kwargs.get("boundary_decoder") is False else 2
    logits = model.train()(x)
    assert logits.shape == (2, train_channels, 64, 96)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 3, 64, 96)
    # the network computes in channels-last internally but hands back plain NCHW tensors
    assert logits.is_contiguous() and out.is_contiguous()


@pytest.mark.parametrize(
    "kwargs, divisor", [({}, 32), (dict(levels=3), 16), (dict(fusion_stride=8, levels=2), 16), (dict(levels=1), 4)]
)
def test_size_divisor_follows_fusion_stride_and_levels(kwargs, divisor):
    model = DSHFN(**SMALL, **kwargs).eval()
    assert model.size_divisor == divisor
    with torch.no_grad():
        assert model(torch.randn(1, 1, divisor, 2 * divisor)).shape == (1, 3, divisor, 2 * divisor)


def test_bad_size_raises_value_error_naming_the_multiple():
    model = DSHFN(**SMALL).eval()
    with pytest.raises(ValueError, match=r"multiples of size_divisor=32.*250x250"):
        model(torch.randn(1, 1, 250, 250))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(streams="neither"), "streams"),
        (dict(fusion="concat"), "fusion"),
        (dict(features=6), "features"),
        (dict(fusion_stride=3), "fusion_stride"),
        (dict(levels=0), "levels"),
        (dict(refine_lambda=1.5), "lambda"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSHFN(**kwargs)


def test_streams_are_level_aligned_and_global_stream_is_low_resolution():
    """Eq. 7: both streams give H/2**k x W/2**k at every entry k; the deformable convs only ever see
    1/fusion_stride of the input or less (the low-resolution pathway)."""
    x = torch.randn(1, 1, 64, 64)
    skips, levels = [2, 2], [4, 8, 16]
    g_feats = GlobalStream(1, skips, levels)(x)
    l_feats = LocalStream(1, skips, [2, 4, 8])(x)
    assert [f.shape[-2:] for f in g_feats] == [f.shape[-2:] for f in l_feats]
    assert [f.shape[-1] for f in g_feats] == [64 // 2**k for k in range(5)]
    assert [f.shape[1] for f in g_feats] == skips + levels

    model = DSHFN(**SMALL, fusion_stride=4)
    seen: list[int] = []
    for m in model.modules():
        if isinstance(m, DeformableConv):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    model(torch.randn(1, 1, 128, 128))
    assert seen == [32, 16, 8, 4]


def test_sobel_layer_matches_scipy():
    """The local stream's edge channel (eq. 4-5) is scipy's Sobel magnitude of the input."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, 1, 40, 56)).astype(np.float32)
    stream = LocalStream(1, [2], [2])
    assert isinstance(stream.sobel, SobelMagnitude)
    ours = stream.sobel(torch.from_numpy(img)).numpy()
    ref = np.stack(
        [np.hypot(ndimage.sobel(im[0].astype(np.float64), 0), ndimage.sobel(im[0].astype(np.float64), 1)) for im in img]
    )[:, None]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)  # atol: the sqrt(. + 1e-6) guard


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_deformable_conv_with_zero_offsets_equals_dilated_conv(dilation):
    block = DeformableConv(5, 7, dilation)
    torch.nn.init.normal_(block.conv.weight)
    x = torch.randn(2, 5, 17, 19)
    ref = F.conv2d(x, block.conv.weight, padding=dilation, dilation=dilation)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    # the offsets really deform: a half-pixel shift changes the result
    torch.nn.init.constant_(block.offset.bias, 0.5)
    assert (block(x) - ref).abs().max() > 1e-2


def test_spatial_attention_matches_hand_computation():
    att = SpatialAttention()
    x = torch.randn(2, 6, 9, 11)
    mean = torch.from_numpy(x.numpy().mean(axis=1, keepdims=True))
    amax = torch.from_numpy(x.numpy().max(axis=1, keepdims=True))
    expected = torch.sigmoid(F.conv2d(torch.cat([mean, amax], 1), att.conv.weight, padding=3))
    out = att(x)
    assert out.shape == (2, 1, 9, 11)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_hfem_fuses_all_levels_at_the_finest_level_resolution():
    widths = [[4, 2], [8, 4], [16, 8]]
    hfem = HFEM(widths, channels=3, out_channels=5)
    levels = [[torch.randn(2, c, 16 // 2**i, 16 // 2**i) for c in chs] for i, chs in enumerate(widths)]
    out = hfem(levels)
    assert out.shape == (2, 5, 16, 16)
    assert hfem.fuse[0].in_channels == 3 * 2 * 3  # D = L levels x 2 streams x C (eq. 13)
    # eq. 12 for the coarsest level, checked through its own pieces
    lvl = hfem.levels[2]
    cat = torch.cat([lvl.proj[0](levels[2][0]), lvl.proj[1](levels[2][1])], 1)
    torch.testing.assert_close(lvl(levels[2]), cat * lvl.attention(cat))


def _dead_parameters(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model = DSHFN(**SMALL, **VARIANTS[name]).train()
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    offsets = [n for n, _ in model.named_parameters() if ".offset." in n]
    assert offsets or name == "local_only"
    assert _dead_parameters(model) == []


def test_lambda_is_a_stored_fixed_coefficient():
    model = DSHFN(**SMALL, refine_lambda=0.3)
    assert "refinement.refine_lambda" in model.state_dict()
    assert "refinement.refine_lambda" not in dict(model.named_parameters())  # not learned: no loss reaches Y_R
    assert model.refinement.weight().item() == pytest.approx(0.3)


def test_eval_channels_are_in_documented_ranges():
    model = DSHFN(**SMALL).eval()
    with torch.no_grad():
        # push the region logits up so the range is exercised, not just values near 0.5
        model.segmentation_decoder.head.bias.fill_(3.0)
        x = 5 * torch.randn(2, 1, 64, 64)
        out = model(x)
    y_seg, y_edge, y_r = out[:, 0], out[:, 1], out[:, 2]
    lam = model.refinement.weight().item()
    assert 0.0 <= lam <= 1.0
    assert y_seg.min() >= 0 and y_seg.max() <= 1 and y_edge.min() >= 0 and y_edge.max() <= 1
    assert y_r.min() >= 0 and y_r.max() <= 1 + lam and y_r.max() > 1  # the refinement does amplify
    torch.testing.assert_close(y_r, y_seg * (1 + lam * y_edge))
    # channels 0-1 are the sigmoid of the train-mode logits (BN held on running stats for both)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(torch.sigmoid(logits), out[:, :2])


def test_eval_without_boundary_decoder_has_zero_boundary_and_unrefined_region():
    model = DSHFN(**SMALL, boundary_decoder=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert torch.all(out[:, 1] == 0)
    torch.testing.assert_close(out[:, 2], out[:, 0])
    assert model.refinement is None


def test_refinement_lambda_limits_and_values():
    y_seg, y_edge = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    for lam in (0.0, 0.3, 1.0):  # the closed interval of the paper
        torch.testing.assert_close(MutualRefinement(lam)(y_seg, y_edge), y_seg * (1 + lam * y_edge))
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match="lambda"):
            MutualRefinement(bad)


def test_he_initialisation_and_zero_offsets():
    model = DSHFN()
    conv = model.streams[0].levels[3].conv  # 64 -> 128 channels, 3x3: enough weights for a std estimate
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # kaiming_normal_, fan_out, ReLU gain
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    for m in model.modules():
        if isinstance(m, DeformableConv):
            assert torch.all(m.offset.weight == 0) and torch.all(m.offset.bias == 0)


@pytest.mark.parametrize("name", ["full", "local_only", "no_boundary_decoder", "additive_fusion"])
def test_torchscript_round_trip_matches_eager(name, tmp_path):
    model = DSHFN(**SMALL, **VARIANTS[name]).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of train/eval paths would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "dshfn.ts"
    torch.jit.save(_script(model), str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="size_divisor=32"):
        loaded(torch.randn(1, 1, 48, 48))


def test_shape_summary_traces_the_resolution_plan():
    lines = shape_summary(DSHFN(**SMALL), 64, 64)
    text = "\n".join(lines)
    assert "fusion (HFEM)" in text and "1x8x16x16" in text  # 2F channels at 1/fusion_stride
    assert lines[-1].split()[-1] == "1x3x64x64"
