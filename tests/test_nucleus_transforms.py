"""The watershed as MONAI transforms (bundle.nuclei.transforms), used from a config's postprocessing chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from skimage.draw import disk
from skimage.segmentation import find_boundaries

from bundle.evaluation.instance import aji
from bundle.model.contract import value
from bundle.nuclei.transforms import NucleusInstances, NucleusInstancesd
from bundle.nuclei.watershed import WatershedParams, instances_from_output


def touching_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """Three nuclei, two of them touching; DS-HFN-like eval output (region, boundary, refined)."""
    gt = np.zeros((80, 96), np.int32)
    gt[disk((40, 30), 13, shape=gt.shape)] = 1
    gt[disk((40, 52), 13, shape=gt.shape)] = 2
    gt[disk((15, 80), 8, shape=gt.shape)] = 3
    region = (gt > 0).astype(np.float32)
    boundary = find_boundaries(gt, mode="inner", connectivity=1).astype(np.float32)
    return gt, np.stack([region, boundary, region])


def test_array_transform_equals_the_function_and_keeps_the_type():
    gt, maps = touching_nuclei()
    params = WatershedParams(**value("watershed"))
    out = NucleusInstances(value("watershed"))(maps)
    assert isinstance(out, np.ndarray) and out.shape == (1, *gt.shape) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0], instances_from_output(maps, params))
    assert out.max() == 3 and aji(out[0], gt) > 0.9  # the touching pair is cut apart
    tensor = NucleusInstances(params)(torch.from_numpy(maps))
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, torch.from_numpy(out))


def test_dictionary_transform_in_a_config_postprocessing_chain():
    gt, maps = touching_nuclei()
    parser = ConfigParser({
        "watershed": {"_target_": "bundle.model.contract.value", "key": "watershed", "fill_holes": "false"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "bundle.nuclei.transforms.NucleusInstancesd", "keys": "pred", "instance_key": "instances",
             "watershed": "@watershed"}]},
    })
    chain = parser.get_parsed_content("postprocessing")
    assert chain.transforms[0].transform.params.fill_holes is False  # the user's word 'false', read as off
    out = chain({"pred": torch.from_numpy(maps)})
    assert set(out) == {"pred", "instances"} and torch.equal(out["pred"], torch.from_numpy(maps))
    assert out["instances"].shape == (1, *gt.shape) and int(out["instances"].max()) == 3
    replaced = NucleusInstancesd("pred")({"pred": maps})
    np.testing.assert_array_equal(replaced["pred"], out["instances"].numpy())
    with pytest.raises(ValueError, match="takes one key"):
        NucleusInstancesd(["a", "b"], instance_key="instances")
