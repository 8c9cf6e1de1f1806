"""The instance head: targets, loss, separation map and post-processing against MONAI's HoVer-Net parts and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.apps.pathology.losses import HoVerNetLoss
from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing
from monai.transforms import ComputeHoVerMaps
from scipy import ndimage

from bundle.core.errors import DataError
from bundle.data.instance_targets import (
    INSTANCE_TARGETS,
    TARGET_CHANNELS,
    instance_distance_map,
    instance_target,
)
from bundle.data.transforms import NucleiTargetsd
from bundle.evaluation.instance import aji
from bundle.model.instance import INSTANCE_CHANNELS, INSTANCE_HEADS, hv_separation
from bundle.model.losses import DSHFNLoss, InstanceMapLoss
from bundle.model.network import DSHFN
from bundle.model.warm_start import warm_start
from bundle.nuclei.binarize import BOUNDARY, SEPARATION, watershed_channel
from bundle.nuclei.watershed import (
    WatershedParams,
    instances_from_maps,
    instances_from_output,
)
from bundle.research.separation import diagnose_tile, touching_pairs


def discs(shape=(96, 96), centres=((30, 30), (30, 47), (47, 38), (70, 70)), radius=10) -> np.ndarray:
    """Touching discs: each pixel goes to the nearest centre within ``radius`` (a Voronoi cut where they meet)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    ids = d.argmin(0) + 1
    return np.where(d.min(0) <= radius, ids, 0).astype(np.int32)


def test_head_names_agree_between_data_and_model():
    assert INSTANCE_TARGETS == INSTANCE_HEADS and TARGET_CHANNELS == INSTANCE_CHANNELS


def test_distance_target_matches_a_per_nucleus_scipy_loop():
    ids = discs()
    ids[:6, 60:80] = 9  # a nucleus cut by the image border: the border counts as outside
    expected = np.zeros(ids.shape)
    for k in np.unique(ids)[1:]:
        d = ndimage.distance_transform_edt(np.pad(ids == k, 1))[1:-1, 1:-1]
        expected[ids == k] = d[ids == k] / d[ids == k].max()
    got = instance_distance_map(ids)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.dtype == np.float32 and got[ids == 0].max() == 0 and np.isclose(got[70, 70], 1.0)  # the isolated disc peaks at its centre


def test_targets_layout_and_binary_masks_carry_no_instance_target():
    ids = discs()
    hv = NucleiTargetsd(kind_key="label_kind", instance_target="hv")({"label": ids[None], "label_kind": "instance"})["label"]
    assert hv.shape == (6, 96, 96)
    np.testing.assert_array_equal(hv[0], ids > 0)
    assert hv[2].min() == hv[3].min() == 1.0  # boundary and instance weights
    np.testing.assert_allclose(hv[4:], np.asarray(ComputeHoVerMaps()(ids[None].astype(np.int64))))
    dist = NucleiTargetsd(kind_key="label_kind", instance_target="distance")({"label": ids[None], "label_kind": "instance"})["label"]
    np.testing.assert_allclose(dist[4], instance_distance_map(ids))
    binary = NucleiTargetsd(kind_key="label_kind", instance_target="hv")({"label": (ids > 0)[None].astype(np.int32), "label_kind": "binary"})["label"]
    assert binary[2].max() == binary[3].max() == 0 and not binary[4:].any()
    plain = NucleiTargetsd(kind_key="label_kind")({"label": ids[None], "label_kind": "instance"})["label"]
    assert plain.shape == (3, 96, 96)  # the paper's layout when the head is off
    with pytest.raises(ValueError, match="instance_target"):
        NucleiTargetsd(instance_target="hover")
    with pytest.raises(ValueError, match="instance target"):
        instance_target(ids, "hover")


def test_hv_separation_values_by_hand_and_against_scipy_sobel():
    x = np.arange(16, dtype=np.float32)
    rising = np.stack([np.tile(x / 10, (16, 1)), np.tile(x[:, None] / 10, (1, 16))])
    assert float(hv_separation(torch.as_tensor(rising)[None]).max()) == 0.0  # inside a nucleus: no separation
    falling = -rising
    sep = hv_separation(torch.as_tensor(falling)[None])[0, 0].numpy()
    np.testing.assert_allclose(sep[1:-1, 1:-1], 0.1, atol=1e-6)  # a falling ramp of slope 0.1
    rng = np.random.default_rng(0)
    hv = rng.uniform(-1, 1, (2, 20, 24)).astype(np.float32)
    expected = np.clip(np.maximum(-ndimage.sobel(hv[0], 1) / 8, -ndimage.sobel(hv[1], 0) / 8), 0, 1)
    np.testing.assert_allclose(hv_separation(torch.as_tensor(hv)[None])[0, 0].numpy(), expected, atol=1e-6)


def test_hv_nuclei_match_monai_hovernet_post_processing():
    """The same touching nuclei from exact HV maps through MONAI's HoVer-Net post-processing and ours."""
    ids = discs()
    hv = np.asarray(ComputeHoVerMaps()(ids[None].astype(np.int64)), np.float32)
    prob = (ids > 0).astype(np.float32)
    monai_ids = np.asarray(HoVerNetInstanceMapPostProcessing(activation=lambda x: x, mask_threshold=0.5, marker_radius=0)(
        torch.as_tensor(prob)[None], torch.as_tensor(hv))[1])[0]
    sep = hv_separation(torch.as_tensor(hv)[None])[0, 0].numpy()
    ours = instances_from_maps(prob, sep, WatershedParams(boundary_threshold=0.4, min_size=10, min_marker_size=4))
    assert ours.max() == len(np.unique(monai_ids)) - 1 == 4
    assert aji(ours, ids) > 0.95 and aji(monai_ids, ids) > 0.95
    # the paper's boundary map alone cannot do it here: a 1-pixel boundary band at these sizes is thin
    assert aji(ours, monai_ids) > 0.95


def test_instance_loss_hv_equals_monai_hovernet_hv_terms():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 2, 32, 32), torch.rand(2, 2, 32, 32) * 2 - 1
    fg = (torch.rand(2, 1, 32, 32) > 0.5).float()
    ours = InstanceMapLoss("hv")(pred, target, fg, torch.ones_like(fg))
    np_pred = torch.zeros(2, 2, 32, 32)
    np_true = torch.cat([1 - fg, fg], 1)
    monai = HoVerNetLoss(lambda_np_ce=0.0, lambda_np_dice=0.0)(
        {"nucleus_prediction": np_pred, "horizontal_vertical": pred},
        {"nucleus_prediction": np_true, "horizontal_vertical": target})
    assert torch.allclose(ours, monai, rtol=1e-5)


def test_instance_loss_distance_by_hand_and_binary_weight_zero_passes_no_gradient():
    logits, target = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.25)
    one = torch.ones(1, 1, 4, 4)
    assert torch.isclose(InstanceMapLoss("distance")(logits, target, one, one), torch.tensor(0.0625))
    net = DSHFN(in_channels=3, features=8, instance_head="hv").train()
    out = net(torch.randn(1, 3, 64, 64))
    label = torch.zeros(1, 6, 64, 64)
    label[:, 4:] = 0.7  # an instance target, but weight 0 (a binary-mask tile)
    loss = DSHFNLoss(alpha=0.0, beta=0.0, gamma=0.0, instance_head="hv", delta=1.0)
    with pytest.raises(ValueError, match="at least one"):
        DSHFNLoss(alpha=0.0, beta=0.0, gamma=0.0)
    value = loss(out, label)
    value.backward()
    assert value.item() == 0.0 and float(loss.last_terms["inst"]) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in net.instance_decoder.parameters())


def test_loss_rejects_labels_without_instance_targets():
    out = torch.zeros(1, 4, 32, 32)
    with pytest.raises(ValueError, match="instance_target='hv'"):
        DSHFNLoss(instance_head="hv")(out, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pred must be"):
        DSHFNLoss(instance_head="distance")(out, torch.zeros(1, 5, 32, 32))


@pytest.mark.parametrize("head", INSTANCE_HEADS)
def test_network_outputs_per_head(head):
    net = DSHFN(in_channels=3, features=8, instance_head=head, upsample="bilinear")
    x = torch.randn(2, 3, 64, 64)
    k = INSTANCE_CHANNELS[head]
    assert net.train()(x).shape == (2, 2 + k, 64, 64)
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape == (2, 3 + (k > 0), 64, 64)
    assert (net.instance_decoder is None) == (head == "none")
    if k:
        assert 0.0 <= float(out[:, SEPARATION].min()) and float(out[:, SEPARATION].max()) <= 1.0
    # with or without a head, the paper's maps come from the same weights
    paper = DSHFN(in_channels=3, features=8, upsample="bilinear")
    paper.load_state_dict({n: v for n, v in net.state_dict().items() if not n.startswith("instance_decoder.")})
    with torch.no_grad():
        assert torch.allclose(paper.eval()(x), out[:, :3], atol=1e-6)


def test_paper_network_has_no_instance_weights():
    assert not any(n.startswith("instance_decoder") for n in DSHFN(in_channels=3).state_dict())
    with pytest.raises(ValueError, match="instance_head"):
        DSHFN(instance_head="hover")


def test_watershed_uses_the_separation_channel_when_present():
    assert watershed_channel(4) == SEPARATION and watershed_channel(3) == BOUNDARY and watershed_channel(1) is None
    ids = discs()
    hv = np.asarray(ComputeHoVerMaps()(ids[None].astype(np.int64)), np.float32)
    sep = hv_separation(torch.as_tensor(hv)[None])[0, 0].numpy()
    prob = (ids > 0).astype(np.float32)
    params = WatershedParams(boundary_threshold=0.4)
    merged = instances_from_output(np.stack([prob, np.zeros_like(prob), prob]), params, peak_min_distance=30)
    split = instances_from_output(np.stack([prob, np.zeros_like(prob), prob, sep]), params)
    assert merged.max() < 4 and split.max() == 4


def test_warm_start_loads_the_paper_weights_and_starts_the_head_from_the_region_decoder(tmp_path):
    paper = DSHFN(in_channels=3, features=8)
    torch.save(paper.state_dict(), tmp_path / "model.pt")
    torch.save({"network": paper.state_dict(), "optimizer": {}}, tmp_path / "checkpoint.pt")
    for name in ("model.pt", "checkpoint.pt"):
        net = warm_start(DSHFN(in_channels=3, features=8, instance_head="hv"), tmp_path / name)
        state = net.state_dict()
        for key, value in paper.state_dict().items():
            assert torch.equal(state[key], value), key
            if key.startswith("segmentation_decoder.stages."):
                assert torch.equal(state[key.replace("segmentation_decoder", "instance_decoder")], value)
        assert not net.instance_decoder.head.weight.any() and not net.instance_decoder.head.bias.any()
    fresh = DSHFN(in_channels=3, features=8)
    assert warm_start(fresh, None) is fresh
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataError, match="junk.pt"):
        warm_start(DSHFN(in_channels=3, features=8), tmp_path / "junk.pt")
    with pytest.raises(DataError, match="not found"):
        warm_start(DSHFN(in_channels=3, features=8), tmp_path / "missing.pt")
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="shares no weight"):
        warm_start(DSHFN(in_channels=3, features=8), tmp_path / "foreign.pt")


def test_touching_pairs_and_diagnosis_by_hand():
    truth = np.zeros((8, 8), np.int32)
    truth[1:4, 1:3], truth[1:4, 3:5], truth[6:8, 6:8] = 1, 2, 3
    pairs = touching_pairs(truth)
    assert list(pairs) == [(1, 2)]
    assert sorted(map(tuple, pairs[(1, 2)])) == [(r, c) for r in (1, 2, 3) for c in (2, 3)]
    region = (truth > 0).astype(np.float32)
    params = WatershedParams(min_size=1, min_marker_size=1, boundary_threshold=0.5, smooth_sigma=0)
    none = diagnose_tile(region, np.zeros_like(region), truth, params)
    assert none["merged_pairs"] == 1 and none["merged_no_boundary"] == 1 and none["merged_lost_by_watershed"] == 0
    edge = np.zeros_like(region)
    edge[1:4, 3] = 1.0  # a ridge along nucleus 2's side of the contact line parts the markers
    cut = diagnose_tile(region, edge, truth, params)
    assert cut["merged_pairs"] == 0 and cut["touching_pairs"] == 1 and cut["predicted_nuclei"] == 3
