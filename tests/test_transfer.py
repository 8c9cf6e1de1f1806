"""MoNuSeg cross-organ transfer (paper Figure 5): protocol, configs, matrix, heatmap and one real row."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import link_subset, write_csv
from monai.bundle import ConfigParser
from PIL import Image

from bundle.research.tables import per_image_means
from bundle.research.transfer import (
    TRANSFER_EVALUATE,
    TRANSFER_TRAIN,
    fold_role,
    run_transfer_row,
    transfer_csv_path,
    transfer_datalist,
    transfer_folds,
    transfer_matrix,
    transfer_summary_path,
    transfer_table,
)

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "configs" / "splits" / "monuseg_5fold_seed42.json"


def transfer_ids(splits: dict, row: int, part: str) -> list[str]:
    """Image ids of ``part`` of row ``row`` of a split dict (``all``: every fold)."""
    folds = range(len(splits["folds"])) if part == "all" else transfer_folds(row, len(splits["folds"]))[part]
    return sorted(i for f in folds for i in splits["folds"][f]["ids"])


def test_protocol_of_every_row_on_the_committed_monuseg_split():
    splits = json.loads(SPLIT.read_text())
    every = sorted(i for fold in splits["folds"] for i in fold["ids"])
    assert len(every) == 30
    for row in range(5):
        train, val, test = (transfer_ids(splits, row, p) for p in ("train", "val", "test"))
        assert train == sorted(splits["folds"][row]["ids"])  # one organ group
        assert val == sorted(splits["folds"][(row + 1) % 5]["ids"])  # model selection on the next fold
        assert test == sorted(i for f in range(5) if f not in (row, (row + 1) % 5) for i in splits["folds"][f]["ids"])
        assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
        assert sorted(train + val + test) == every == transfer_ids(splits, row, "all")  # every tile, once
        assert (len(train), len(val), len(test)) == (6, 6, 18)
        roles = [fold_role(row, f) for f in range(5)]
        assert roles.count("train") == 1 and roles.count("val") == 1 and roles.count("test") == 3
        assert roles[row] == "train" and roles[(row + 1) % 5] == "val"
    assert transfer_folds(4) == {"train": [4], "val": [0], "test": [1, 2, 3]}  # wraps around
    with pytest.raises(ValueError, match="0..4"):
        transfer_folds(5)
    with pytest.raises(ValueError, match="at least 3 folds"):
        transfer_folds(0, n_folds=2)
    with pytest.raises(ValueError, match="part must be"):
        transfer_datalist(ROOT / "no_dataset", 0, "holdout")


def test_transfer_datalists_are_organ_groups_of_the_shared_monuseg(monuseg_dir):
    organs = {0: {"kidney"}, 1: {"prostate"}, 2: {"breast"}, 3: {"liver"}, 4: {"bladder", "colon", "stomach"}}
    for row in range(5):
        got = {p: transfer_datalist(monuseg_dir, row, p, SPLIT) for p in ("train", "val", "test")}
        assert {it["group"] for it in got["train"]} == organs[row]
        assert {it["group"] for it in got["val"]} == organs[(row + 1) % 5]
        assert {it["group"] for it in got["test"]}.isdisjoint(organs[row] | organs[(row + 1) % 5])
        assert len({it["id"] for p in got.values() for it in p}) == 30


def _parse(files) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), *(str(ROOT / f) for f in files),
                        str(ROOT / "configs" / "schedules" / "cpu_40ep.json")])
    return parser


def test_transfer_configs_train_at_model_scale_on_crops_and_evaluate_whole_tiles():
    train, evaluate = _parse(TRANSFER_TRAIN), _parse(TRANSFER_EVALUATE)
    for parser in (train, evaluate):
        steps = parser.get_parsed_content("base_transforms")
        names = [type(t).__name__ for t in steps]
        assert names == ["LoadTiled", "CleanMaskd", "ReinhardNormalized", "ToModelScaled", "SpatialPadd"]  # no squashing
        (scale,) = [t for t in steps if type(t).__name__ == "ToModelScaled"]
        assert scale.pixel_size_key == "pixel_size" and parser.get_parsed_content("pixel_size") == 0.25
        assert parser.get_parsed_content("model_pixel_size") == 0.5  # 40x (0.25 um/px) -> 0.5 um/px
        inferer = parser.get_parsed_content("validate#inferer")
        assert type(inferer).__name__ == "SlidingWindowInferer" and tuple(inferer.roi_size) == (256, 256)
    crops = train.get_parsed_content("random_crop")
    assert type(crops).__name__ == "RandSpatialCropSamplesd" and crops.cropper.num_samples == 4
    # schedule batch 4 = crops per optimizer step: 1 tile x 4 crops
    assert train.get_parsed_content("batch_size") == 4 and train.get_parsed_content("train#dataloader#batch_size") == 1
    chain = [type(t).__name__ for t in train.get_parsed_content("train#preprocessing").transforms]
    assert chain.index("ToModelScaled") < chain.index("RandSpatialCropSamplesd") < chain.index("RandRotate90d")
    handlers = [type(h).__name__ for h in evaluate.get_parsed_content("validate#handlers")]
    assert handlers[:2] == ["WeightsLoader", "StatsHandler"] and "InstanceMetricsHandler" in handlers
    assert evaluate.get("eval_part") == "all" and evaluate.get("eval_resolution") == "model"


def _synthetic_results(root: Path) -> None:
    """Two rows of a 4-fold transfer: row 0 (train 0, val 1, test 2 3), row 1 (train 1, val 2, test 3 0)."""
    d = lambda *values: [{"id": f"t{k}", "dice": v, "hd95": 2 * v} for k, v in enumerate(values)]  # noqa: E731
    for name, values in {"train0_train0": (0.9, 0.7), "train0_val1": (0.6,), "train0_test2": (0.5, 0.3),
                         "train0_test3": (0.2,), "train1_train1": (0.8,), "train1_val2": (0.7,),
                         "train1_test3": (0.4, 0.6, 0.8), "train1_test0": (0.1,)}.items():
        write_csv(root / "v" / f"{name}.csv", d(*values))
    (root / "v" / "train0_curves.csv").write_text("epoch,val_mean_dice\n1,0.5\n")  # not a matrix cell
    columns = {str(f): {"groups": g} for f, g in enumerate((["kidney"], ["prostate"], ["liver"], ["colon", "stomach"]))}
    (root / "v" / "train0_summary.json").write_text(json.dumps({"columns": columns}))


def test_transfer_matrix_and_table_from_per_image_csvs(tmp_path):
    _synthetic_results(tmp_path)
    cells = transfer_matrix(tmp_path, "v")
    assert {k: r for k, (r, _) in cells.items()} == {(0, 0): "train", (0, 1): "val", (0, 2): "test", (0, 3): "test",
                                                      (1, 1): "train", (1, 2): "val", (1, 3): "test", (1, 0): "test"}
    assert cells[(0, 0)][1] == pytest.approx(0.8) and cells[(0, 2)][1] == pytest.approx(0.4)
    assert cells[(1, 3)][1] == pytest.approx(0.6) and transfer_matrix(tmp_path, "v", "hd95")[(1, 3)][1] == pytest.approx(1.2)
    lines = transfer_table(tmp_path, "v").splitlines()
    assert lines[0] == "| dice: train \\ test | 0 kidney | 1 prostate | 2 liver | 3 colon+stomach | mean (test) |"
    # row 0: test cells 0.4 and 0.2 -> 0.3; row 1: test cells 0.1 (fold 0) and 0.6 (fold 3) -> 0.35
    assert lines[2] == "| 0 kidney | *train 0.800* | *val 0.600* | 0.400 | 0.200 | 0.300 |"
    assert lines[3] == "| 1 prostate | 0.100 | *train 0.800* | *val 0.700* | 0.600 | 0.350 |"
    # columns: fold 0 tested by row 1 only (0.1); fold 2 by row 0 (0.4); fold 3 by both: (0.2 + 0.6) / 2
    assert lines[4] == "| mean (test) | 0.100 | – | 0.400 | 0.400 | |"
    assert transfer_table(tmp_path, "v", names={}).splitlines()[2].startswith("| 0 | *train 0.800*")
    # HD95 = 2 x Dice per image here; distances get one decimal: row 1, fold 3: 2 x 0.6
    assert "| 1.2 |" in transfer_table(tmp_path, "v", "hd95").splitlines()[3]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (requirements-figures.txt) absent")
def test_transfer_heatmap_writes_a_png(tmp_path):
    from bundle.research.figures import plot_transfer_heatmap

    _synthetic_results(tmp_path)
    out = plot_transfer_heatmap(tmp_path, tmp_path / "fig" / "heat.png", variant="v")
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 300 and img.std() > 0
    with pytest.raises(FileNotFoundError, match="no train"):
        plot_transfer_heatmap(tmp_path, tmp_path / "none.png", variant="absent")


def test_instance_metrics_handler_scores_watershed_nuclei_of_each_tile():
    from types import SimpleNamespace

    import torch

    from bundle.handlers.instance_eval import InstanceMetricsHandler

    gt = np.zeros((1, 40, 40), np.int32)
    gt[0, 5:15, 5:15], gt[0, 25:35, 20:30] = 1, 2
    pred = torch.zeros(3, 40, 40)
    pred[0] = torch.from_numpy(gt[0] > 0).float()  # region map; boundary map empty
    half = torch.zeros(3, 40, 40)
    half[0, 5:15, 5:15] = 1.0  # finds one of the two nuclei
    handler = InstanceMetricsHandler(pred_key="pred_native", label_key="label_native")
    state = SimpleNamespace(output=[{"pred_native": pred}, {"pred_native": half}],
                            batch=[{"label_native": torch.from_numpy(gt)}, {"label_native": torch.from_numpy(gt)}],
                            metrics={})
    handler(SimpleNamespace(state=state))
    np.testing.assert_allclose(state.metric_details["aji"][:, 0], [1.0, 0.5])  # AJI = 100 / (100 + 100)
    np.testing.assert_allclose(state.metric_details["pq"][:, 0], [1.0, 2 / 3])  # DQ = 1 / (1 + 0.5), SQ = 1
    assert state.metrics["aji"] == pytest.approx(0.75)
    with pytest.raises(KeyError, match="label_native"):
        InstanceMetricsHandler()(SimpleNamespace(state=SimpleNamespace(output=[{"pred_native": pred}], batch=[{}],
                                                                       metrics={})))


@pytest.mark.slow
def test_run_transfer_row_trains_evaluates_every_fold_and_skips_when_done(monuseg_dir, tmp_path):
    """One real row through the CLI on one tile per organ group (symlinks), a tiny DS-HFN, one epoch."""
    rows = list(csv.DictReader(open(monuseg_dir / "meta.csv")))
    folds = json.loads(SPLIT.read_text())["folds"]
    chosen = [next(r for r in rows if r["id"] == fold["ids"][0]) for fold in folds]  # one tile of each fold
    data = link_subset(monuseg_dir, chosen, tmp_path / "tiny_monuseg", "labels")
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"spatial_size": [64, 64], "pixel_size": 0.125, "val_batch_size": 2,
                                 "split_file": str(tmp_path / "splits.json"),
                                 "network_def": {"_target_": "bundle.model.network.DSHFN", "in_channels": 1, "features": 4}}))
    kwargs = dict(dataset_dir=data, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", max_epochs=1,
                  device="cpu", overrides=[str(small)])
    assert run_transfer_row(1, **kwargs)["skipped"] is False
    splits = json.loads((tmp_path / "splits.json").read_text())
    summary = json.loads(transfer_summary_path(tmp_path / "results", "dshfn", 1).read_text())
    assert (summary["train_fold"], summary["val_fold"], summary["test_folds"]) == (1, 2, [0, 3, 4])
    assert summary["epochs_run"] == 1 and summary["best_val_epoch"] == 1 and summary["schedule"] == ["small.json"]
    assert (tmp_path / "runs" / "dshfn" / "train1" / "models" / "model.pt").is_file()  # kept for watershed tuning
    for fold in range(5):
        role = fold_role(1, fold)
        got = list(csv.DictReader(open(transfer_csv_path(tmp_path / "results", "dshfn", 1, fold, role))))
        assert [r["id"] for r in got] == splits["folds"][fold]["ids"]  # the fold's tiles, nothing else
        assert all(0.0 <= float(r[k]) <= 1.0 for r in got for k in ("dice", "bf1", "aji", "pq"))
        assert summary["columns"][str(fold)]["role"] == role
        assert summary["columns"][str(fold)]["mean"]["dice"] == pytest.approx(per_image_means(
            transfer_csv_path(tmp_path / "results", "dshfn", 1, fold, role))["dice"])
    # the val cell is the model-selection Dice: same tiles, same pipeline as validation during training
    assert summary["columns"]["2"]["mean"]["dice"] == pytest.approx(summary["best_val_dice"], abs=1e-4)
    assert run_transfer_row(1, **kwargs)["skipped"] is True
