"""bundle.data.datasets (multi-dataset split, datalists, crop repeats) and the recipe config chain on tiny synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.core.errors import DataError
from bundle.core.files import write_png_atomic
from bundle.data.datasets import (
    crop_indices,
    datasets_datalist,
    load_or_create_recipe_split,
    make_recipe_split,
)
from bundle.data.layout import make_splits, validate_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = [str(ROOT / "configs" / f) for f in ("train.json", "recipe/probe_schedule.json")]


def make_dataset(root: Path, kind: str, n_groups: int = 5, per_group=(1, 2, 1, 1, 2), sizes=((64, 64), (128, 96), (96, 128)),
                 seed: int = 0) -> Path:
    """Standard layout: RGB tiles with darker disc nuclei; ``kind`` "instance" (labels/, uint16 ids) or "binary"
    (masks/, 0/255); ``n_groups`` groups of ``per_group[g]`` tiles each, sizes cycling through ``sizes``."""
    rng = np.random.default_rng(seed)
    label_dir = "labels" if kind == "instance" else "masks"
    (root / "images").mkdir(parents=True)
    (root / label_dir).mkdir()
    rows, k = [], 0
    for g in range(n_groups):
        for j in range(per_group[g % len(per_group)]):
            h, w = sizes[k % len(sizes)]
            k += 1
            ids = np.zeros((h, w), np.uint16)
            yy, xx = np.mgrid[:h, :w]
            for n in range(1, 6):
                cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(5, 9)
                ids[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = n
            rgb = rng.integers(170, 230, (h, w, 3)).astype(np.uint8)
            rgb[ids > 0] = rng.integers(40, 110, (int((ids > 0).sum()), 3)).astype(np.uint8)
            tid = f"{root.name}_g{g}_{j}"
            write_png_atomic(root / "images" / f"{tid}.png", rgb)
            write_png_atomic(root / label_dir / f"{tid}.png", ids if kind == "instance" else (ids > 0).astype(np.uint8) * 255)
            rows.append(f"{tid},grp{g},all")
    (root / "meta.csv").write_text("id,group,split\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """tnbc (binary masks), monuseg and consep (instance labels): 5 groups each, 64..128 px tiles."""
    root = tmp_path_factory.mktemp("recipe_data")
    make_dataset(root / "tnbc", "binary", seed=1)
    make_dataset(root / "monuseg", "instance", per_group=(1,), seed=2)
    make_dataset(root / "consep", "instance", seed=3)
    return root


def specs(root: Path, names=("tnbc", "monuseg", "consep"), pixel_size: float = 0.25) -> dict:
    return {n: {"dir": str(root / n), "pixel_size": pixel_size} for n in names}


def group_of(dataset_dir) -> dict:
    return {it["id"]: it["group"] for it in validate_dataset(dataset_dir)}


# --- make_recipe_split / load_or_create_recipe_split ---------------------------------------------------------


def test_recipe_split_is_fold0_of_grouped_split_and_groups_never_straddle(data_root):
    split = make_recipe_split(specs(data_root), seed=42)
    assert set(split["datasets"]) == {"tnbc", "monuseg", "consep"}
    for name, entry in split["datasets"].items():
        folds = make_splits(data_root / name, n_folds=5, seed=42)["folds"]
        assert entry["val"] == folds[0]["ids"] and entry["val_groups"] == folds[0]["groups"]
        groups = group_of(data_root / name)
        val_groups = {groups[i] for i in entry["val"]}
        train_groups = {groups[i] for i in entry["train"]}
        assert val_groups and train_groups and not (val_groups & train_groups)
        assert val_groups == set(entry["val_groups"])
        assert sorted(entry["val"] + entry["train"]) == sorted(groups)  # every tile on exactly one side


def test_split_file_written_once_then_read(data_root, tmp_path):
    path = tmp_path / "split.json"
    first = load_or_create_recipe_split(specs(data_root, ("tnbc",)), path)
    on_disk = json.loads(path.read_text())
    assert on_disk["datasets"]["tnbc"]["val"] == first["datasets"]["tnbc"]["val"]
    # a marker put into the file comes back: the second call reads, it does not recompute
    on_disk["datasets"]["tnbc"]["val"] = ["MARKER"]
    path.write_text(json.dumps(on_disk))
    assert load_or_create_recipe_split(specs(data_root, ("tnbc",)), path)["datasets"]["tnbc"]["val"] == ["MARKER"]


def test_dataset_added_later_is_appended(data_root, tmp_path):
    path = tmp_path / "split.json"
    load_or_create_recipe_split(specs(data_root, ("tnbc",)), path)
    on_disk = json.loads(path.read_text())
    on_disk["datasets"]["tnbc"]["val"] = ["MARKER"]
    path.write_text(json.dumps(on_disk))
    both = load_or_create_recipe_split(specs(data_root, ("tnbc", "consep")), path)
    saved = json.loads(path.read_text())
    assert set(saved["datasets"]) == {"tnbc", "consep"}
    assert saved["datasets"]["tnbc"]["val"] == ["MARKER"]  # the existing entry is kept as it was
    expected = make_splits(data_root / "consep", n_folds=5, seed=42)["folds"][0]["ids"]
    assert saved["datasets"]["consep"]["val"] == both["datasets"]["consep"]["val"] == expected


def test_changed_meta_csv_is_refused(tmp_path):
    ds = make_dataset(tmp_path / "mine", "instance", per_group=(1,), sizes=((32, 32),))
    path = tmp_path / "split.json"
    load_or_create_recipe_split(specs(tmp_path, ("mine",)), path)
    meta = ds / "meta.csv"
    lines = meta.read_text().splitlines()
    lines[1] = lines[1].replace("grp0", "grp1")  # one tile moved to another patient
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="different meta.csv"):
        load_or_create_recipe_split(specs(tmp_path, ("mine",)), path)


@pytest.mark.parametrize("pixel_size", [40, 0.01, 6.0])
def test_out_of_range_pixel_size_refused(data_root, tmp_path, pixel_size):
    with pytest.raises(DataError, match="outside 0.05..5"):
        load_or_create_recipe_split(specs(data_root, ("tnbc",), pixel_size), tmp_path / "s.json")
    with pytest.raises(DataError, match="outside 0.05..5"):
        make_recipe_split(specs(data_root, ("tnbc",), pixel_size))
    assert not (tmp_path / "s.json").exists()


# --- datasets_datalist ---------------------------------------------------------------------------------------


def test_datalist_items_and_train_val_partition(data_root, tmp_path):
    ds = {"tnbc": {"dir": str(data_root / "tnbc"), "pixel_size": 0.25},
          "consep": {"dir": str(data_root / "consep"), "pixel_size": 0.5}}
    path = tmp_path / "split.json"
    train = datasets_datalist(ds, path, "train")
    val = datasets_datalist(ds, path, "val")
    for it in train + val:
        assert {"image", "label", "label_kind", "id", "group", "dataset", "pixel_size"} <= set(it)
        assert it["pixel_size"] == ds[it["dataset"]]["pixel_size"]
        assert it["label_kind"] == ("binary" if it["dataset"] == "tnbc" else "instance")
        assert Path(it["image"]).parent == Path(ds[it["dataset"]]["dir"]).resolve() / "images"
    tr = {(it["dataset"], it["id"]) for it in train}
    va = {(it["dataset"], it["id"]) for it in val}
    assert len(tr) == len(train) and len(va) == len(val)
    assert not tr & va
    everything = {(n, i) for n in ds for i in group_of(ds[n]["dir"])}
    assert tr | va == everything
    assert {(it["dataset"], it["id"]) for it in datasets_datalist(ds, path, "all")} == everything
    for n in ds:  # no group of a dataset on both sides
        assert not {it["group"] for it in train if it["dataset"] == n} & {it["group"] for it in val if it["dataset"] == n}
    with pytest.raises(ValueError, match="part"):
        datasets_datalist(ds, path, "test")


# --- crop_indices --------------------------------------------------------------------------------------------


def test_crop_indices_repeat_by_model_scale_area(tmp_path):
    items = []
    for name, (h, w), px in [("a", (1000, 1000), 0.25), ("b", (64, 64), 0.25), ("c", (512, 512), 0.5),
                             ("d", (600, 600), 0.5), ("e", (300, 200), 0.5), ("f", (1000, 1000), 1.0)]:
        write_png_atomic(tmp_path / f"{name}.png", np.zeros((h, w, 3), np.uint8))
        items.append({"image": str(tmp_path / f"{name}.png"), "pixel_size": px})
    # by hand, crop 256 x 256 = 65536 px at 0.5 um/px:
    #   a: 500*500 = 250000 -> 3.81 -> 4;  b: 32*32 -> 1 (at least once);  c: 512*512 = 4 crops exactly -> 4
    #   d: 360000 -> 5.49 -> 6;  e: 60000 -> 0.92 -> 1;  f: 2000*2000 = 4e6 -> 61.04 -> 62
    counts = [4, 1, 4, 6, 1, 62]
    out = crop_indices(items, [256, 256], 0.5)
    assert out == [i for i, n in enumerate(counts) for _ in range(n)]
    # independent formula for a non-square crop
    expected = [math.ceil(round(h * p / 0.5) * round(w * p / 0.5) / (128 * 64)) for (h, w), p in
                [((1000, 1000), 0.25), ((64, 64), 0.25), ((512, 512), 0.5), ((600, 600), 0.5), ((300, 200), 0.5),
                 ((1000, 1000), 1.0)]]
    assert np.bincount(crop_indices(items, [128, 64], 0.5)).tolist() == [max(1, e) for e in expected]


# --- the recipe config chain ---------------------------------------------------------------------------------


def recipe_parser(data_root: Path, tmp_path: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(RECIPE_CONFIGS)
    parser.update({"data_root": str(data_root), "split_file": str(tmp_path / "split.json"), "spatial_size": [64, 64],
                   "features": 8, "batch_size": 2, "num_workers": 0, "output_dir": str(tmp_path / "run"),
                   "device": "cpu", "model_pixel_size": 0.5, **overrides})
    return parser


def test_recipe_config_datasets_match_the_folders():
    cfg = json.loads((ROOT / "configs" / "train.json").read_text())
    assert set(cfg["default_datasets"]) == {"tnbc", "monuseg", "consep"}
    committed = json.loads((ROOT / "configs" / "splits" / "datasets_val_seed42.json").read_text())
    assert set(committed["datasets"]) == set(cfg["default_datasets"])


@pytest.mark.parametrize("mode,channels", [("gray", 1), ("rgb", 3)])
def test_recipe_config_sampled_items(data_root, tmp_path, mode, channels, one_torch_thread):
    parser = recipe_parser(data_root, tmp_path, input_mode=mode)
    sampled = parser.get_parsed_content("train#sampled")
    datalist = parser.get_parsed_content("train_datalist")
    assert len(sampled) == len(datalist)  # every tile is at most 64x64 at the model scale: one crop each
    assert {it["dataset"] for it in datalist} == {"tnbc", "monuseg", "consep"}
    for k in range(len(sampled)):
        item = sampled[k]
        assert tuple(item["image"].shape) == (channels, 64, 64)
        assert tuple(item["label"].shape) == (3, 64, 64)
        src = datalist[sampled.indices[k]]
        # boundary weight: all ones for instance labels, all zeros for binary masks
        assert float(item["label"][2].min()) == float(item["label"][2].max()) == (src["label_kind"] == "instance")
        assert set(np.unique(np.asarray(item["label"][:2]))) <= {0.0, 1.0}
    net = parser.get_parsed_content("network_def")
    assert net.in_channels == channels


def test_recipe_config_one_training_epoch_runs(data_root, tmp_path, one_torch_thread):
    parser = recipe_parser(data_root, tmp_path, max_epochs=1)
    trainer = parser.get_parsed_content("train#trainer")
    net = parser.get_parsed_content("network")
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    n_crops = len(parser.get_parsed_content("train#sampled"))
    assert trainer.state.epoch == 1 and trainer.state.iteration == math.ceil(n_crops / 2)  # batch_size 2
    assert math.isfinite(float(trainer.state.output[0]["loss"] if isinstance(trainer.state.output, list)
                               else trainer.state.output["loss"]))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters())), "no parameter was updated"
    assert (tmp_path / "split.json").is_file()
