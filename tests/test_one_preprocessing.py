"""Inference sees what training saw: the chunk engine's network input of a whole validation tile equals what
``configs/train.json``'s ``validate#preprocessing`` (read from the config itself) makes of it.

The engine re-implements the chain for speed and bounded memory (float32 L*a*b*, resampling matrices, statistics of
the whole image before the chunks; bundle.inference.colour / chunks), so an edit of the training chain that the
engine does not follow must fail here; the negative controls below show that each kind of edit would.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle.data.io import read_image
from bundle.inference.engine import load_segmenter
from bundle.inference.pipeline import segment_image
from bundle.inference.sources import ArraySource

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
INFERENCE = str(ROOT / "configs" / "inference.json")
#: standardised input units (the inputs' spread is 1): the two implementations agree to float32 rounding (measured
#: up to 1e-5 per pixel, 1.2e-6 on average); a changed step moves the mean by 0.03 or more
MAX_DIFF, MEAN_DIFF = 1e-4, 1e-5


class CapturePredictor:
    """Records the network input of each chunk; returns empty maps (DS-HFN's three eval channels)."""

    roi_size, stride = 256, 192

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.inputs.append(x.copy())
        return np.zeros((3, *x.shape[1:]), np.float32)


class NoSink:
    def add(self, block) -> None:
        pass


def _train_parser(data_root, **ids) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["data_root"] = str(data_root)
    for key, value in ids.items():
        parser[key] = value
    return parser


def engine_input(item: dict) -> np.ndarray:
    """The network input the inference engine (built from configs/inference.json) gives the whole tile."""
    seg = load_segmenter(INFERENCE, ckpt_path=None)
    capture = CapturePredictor()
    source = ArraySource(read_image(item["image"]), str(item["image"]))
    segment_image(source, capture, NoSink(), seg.reference, item["pixel_size"], seg.model_pixel_size,
                  chunk=4096, input_mode=seg.input_mode)  # one chunk: its net area is the whole image
    assert len(capture.inputs) == 1
    return capture.inputs[0]


def differs(train: np.ndarray, engine: np.ndarray) -> bool:
    if train.shape != engine.shape:
        return True
    diff = np.abs(train - engine)
    return diff.max() > MAX_DIFF or diff.mean() > MEAN_DIFF


@pytest.fixture(scope="module")
def val_items(tnbc_dir):
    items = _train_parser(tnbc_dir.parent).get_parsed_content("val_datalist")
    by_dataset = {}
    for item in items:
        by_dataset.setdefault(item.get("dataset", str(item["image"]).split("/")[-3]), item)
    return list(by_dataset.values())  # one validation tile of each dataset


# 0.25 um/px: the model scale (no resize); 0.5: upsampled 2x; 0.125: downsampled 2x with anti-aliasing
@pytest.mark.parametrize("pixel_size", [0.25, 0.5, 0.125])
def test_engine_input_equals_the_validation_chain_of_train_json(val_items, tnbc_dir, pixel_size):
    parser = _train_parser(tnbc_dir.parent)
    chain = parser.get_parsed_content("validate#preprocessing")
    for item in val_items:
        item = {**item, "pixel_size": pixel_size}
        train = chain(dict(item))["image"].numpy()
        engine = engine_input(item)
        assert train.shape == engine.shape, item["image"]
        diff = np.abs(train - engine)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (item["image"], diff.max(), diff.mean())


def _edited_chain(data_root, edit: str):
    parser = _train_parser(data_root)
    base, target = copy.deepcopy(parser.get("base_transforms")), copy.deepcopy(parser.get("target_transforms"))
    if edit == "no_reinhard":
        parser["reinhard"] = False
    for t in base:
        if t["_target_"].endswith("ToModelScaled") and edit == "bilinear":
            t["mode"] = ["bilinear", "nearest-exact"]
    for t in target:
        if t["_target_"] == "NormalizeIntensityd" and edit == "global_standardisation":
            t["channel_wise"] = False
    if edit == "gray":
        parser["input_mode"] = "gray"
    parser["base_transforms"], parser["target_transforms"] = base, target
    return parser.get_parsed_content("validate#preprocessing")


@pytest.mark.parametrize("edit", ["no_reinhard", "bilinear", "global_standardisation", "gray"])
def test_an_edit_of_the_training_chain_alone_is_caught(val_items, tnbc_dir, edit):
    """Negative controls: the comparison above fails for each kind of change made to training and not inference."""
    item = {**val_items[0], "pixel_size": 0.5}
    train = _edited_chain(tnbc_dir.parent, edit)(dict(item))["image"].numpy()
    assert differs(train, engine_input(item))
