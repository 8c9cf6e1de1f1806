"""Evaluation plumbing: channel selection/thresholding, the scale contract, and per-image metric tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import MeanDice

from bundle.data.scale import MODEL_PIXEL_SIZE, ToModelScaled, scale_factor
from bundle.evaluation.pixel import (
    HausdorffHandler,
    PixelPrecisionHandler,
    PixelRecallHandler,
)
from bundle.handlers.tables import MetricsTableWriter
from bundle.inference.writers import probability_to_uint8
from bundle.nuclei.binarize import BinarizeChannel, BinarizeChanneld

ROOT = Path(__file__).resolve().parents[1]


def test_binarize_channel_selects_and_thresholds():
    x = torch.tensor([[[0.2, 0.6]], [[0.9, 0.1]], [[0.5, 0.51]]])  # (3, 1, 2)
    torch.testing.assert_close(BinarizeChannel(0, 0.5)(x), torch.tensor([[[0.0, 1.0]]]))
    torch.testing.assert_close(BinarizeChannel(2, 0.5)(x), torch.tensor([[[0.0, 1.0]]]))  # > not >=
    torch.testing.assert_close(BinarizeChannel(1, None)(x), x[1:2])
    with pytest.raises(ValueError, match="channel 3"):
        BinarizeChannel(3)(x)
    d = BinarizeChanneld(["pred", "label"], channel=[1, 0], threshold=[0.5, None])({"pred": x, "label": x})
    torch.testing.assert_close(d["pred"], torch.tensor([[[1.0, 0.0]]]))
    torch.testing.assert_close(d["label"], x[0:1])


def test_scale_contract_and_exact_inverse():
    assert scale_factor(0.25, 0.5) == 0.5 and scale_factor(0.5, 0.5) == 1.0
    with pytest.raises(ValueError):
        scale_factor(0)
    t = ToModelScaled("image", pixel_size=0.25, model_pixel_size=0.5)
    img = MetaTensor(torch.rand(1, 601, 333))
    out = t({"image": img})
    assert out["image"].shape[-2:] == (300, 166)  # round(601 * 0.5), round(333 * 0.5)
    back = t.inverse(out)
    assert back["image"].shape[-2:] == (601, 333)


def test_function_default_scale_is_the_shipped_configs():
    """A Python user who leaves model_pixel_size out gets the scale the shipped weights were trained at."""
    assert json.loads((ROOT / "configs" / "model.json").read_text())["model_pixel_size"] == MODEL_PIXEL_SIZE
    assert scale_factor(MODEL_PIXEL_SIZE) == 1.0


def test_probability_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(probability_to_uint8(np.array([-0.1, 0.0, 0.5, 1.0, 1.7])), [0, 0, 128, 255, 255])


def test_metrics_table_writer_per_image_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(3):  # uneven batches: 2, 2, 1 images
        n = 1 if b == 2 else 2
        batch = []
        for i in range(n):
            pred = (torch.rand(1, 32, 32, generator=g) > 0.5).float()
            label = (torch.rand(1, 32, 32, generator=g) > 0.6).float()
            image = MetaTensor(torch.zeros(1, 32, 32), meta={"filename_or_obj": f"/x/tile_{b}{i}.png"})
            batch.append({"image": image, "pred": pred, "label": label})
        batches.append(batch)
    engine = Engine(lambda e, batch: batch)
    tf = lambda out: ([o["pred"] for o in out], [o["label"] for o in out])  # noqa: E731
    MeanDice(include_background=True, save_details=True, output_transform=tf).attach(engine, "dice")
    PixelPrecisionHandler(output_transform=tf).attach(engine, "precision")
    PixelRecallHandler(output_transform=tf).attach(engine, "recall")
    HausdorffHandler(include_background=True, warn_empty=False, output_transform=tf).attach(engine, "hd")
    MetricsTableWriter(str(tmp_path)).attach(engine)
    engine.run(batches)

    rows = list(csv.DictReader(open(tmp_path / "metrics_per_image.csv")))
    assert [r["id"] for r in rows] == ["tile_00", "tile_01", "tile_10", "tile_11", "tile_20"]
    items = [it for b in batches for it in b]
    for r, it in zip(rows, items):
        p, y = it["pred"].numpy() > 0, it["label"].numpy() > 0
        tp = (p & y).sum()
        assert float(r["dice"]) == pytest.approx(2 * tp / (p.sum() + y.sum()), abs=1e-6)
        assert float(r["precision"]) == pytest.approx(tp / p.sum(), abs=1e-6)
        assert float(r["recall"]) == pytest.approx(tp / y.sum(), abs=1e-6)
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    dice = [float(r["dice"]) for r in rows]
    assert summary["n_images"] == 5
    # the CSV holds 6 significant digits
    assert summary["dice"]["mean"] == pytest.approx(np.mean(dice), rel=1e-5)
    assert summary["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1), rel=1e-4)


def test_metrics_table_writer_leaves_undefined_values_empty(tmp_path):
    empty = torch.zeros(1, 16, 16)
    full = torch.zeros(1, 16, 16)
    full[:, 4:8, 4:8] = 1
    items = [
        {"image": MetaTensor(empty, meta={"filename_or_obj": "a.png"}), "pred": empty, "label": full},  # HD undefined
        {"image": MetaTensor(empty, meta={"filename_or_obj": "b.png"}), "pred": full, "label": full},
    ]
    engine = Engine(lambda e, batch: batch)
    tf = lambda out: ([o["pred"] for o in out], [o["label"] for o in out])  # noqa: E731
    HausdorffHandler(percentile=95, include_background=True, warn_empty=False, output_transform=tf).attach(engine, "hd95")
    MetricsTableWriter(str(tmp_path)).attach(engine)
    engine.run([items])
    rows = list(csv.DictReader(open(tmp_path / "metrics_per_image.csv")))
    assert rows[0]["hd95"] == "" and float(rows[1]["hd95"]) == 0.0
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["hd95"] == {"mean": 0.0, "sd": None, "n": 1}
