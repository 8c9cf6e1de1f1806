"""bundle.research.recipe: grid_index (hand-worked values and bounds) and recipe_table (rows ordered by validation AJI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from bundle.research.recipe import grid_index, recipe_table


def test_grid_index_hand_worked_values():
    i, j = np.mgrid[:64, :64]
    # (i + j) % 2: every 2x2 cell is [0 1; 1 0], |a - b - c + d| / 4 = 2 / 4 = 0.5; every horizontal step is 1
    assert grid_index((i + j) % 2) == pytest.approx(0.5)
    assert grid_index(3.0 * ((i + j) % 2) + 7.0) == pytest.approx(0.5)  # scale and offset free
    # cells [0 1; 1 0] and [1 0; 0 1] alternating (no step between cells): alternation 0.5 per cell, steps
    # 32 ones and 31 zeros per row -> 0.5 / (32 / 63) = 63 / 64, the largest value possible on 64 columns
    row = np.tile([0, 1, 1, 0], 16)
    mirrored = np.where(i % 2 == 0, row[None, :], 1 - row[None, :])
    assert grid_index(mirrored) == pytest.approx(63 / 64)
    assert grid_index(0.1 * j + 0.03 * i) == pytest.approx(0.0, abs=1e-9)  # linear ramp: no 2x2 alternation
    assert grid_index(np.full((8, 8), 0.3)) == 0.0  # flat map: defined as 0
    assert grid_index(np.pad((i + j) % 2, ((0, 1), (0, 1)))) == pytest.approx(0.5)  # odd sizes: last row/col cut
    # any period-2 texture (a transposed convolution's 2x2 cell tiled): |d1 - d2| / 4 <= (|d1| + |d2|) / 4 = step / 2
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert grid_index(np.tile(rng.normal(size=(2, 2)), (8, 8))) <= 0.5 + 1e-12
        assert grid_index(rng.normal(size=(10, 10))) < 1.0


def test_grid_index_smooth_random_maps_are_small():
    rng = np.random.default_rng(0)
    smooth = [grid_index(gaussian_filter(rng.random((128, 128)), 3)) for _ in range(3)]
    noise = grid_index(rng.random((128, 128)))
    assert all(0.0 < s < 0.1 for s in smooth)
    assert 0.2 < noise < 0.5
    ramp = gaussian_filter(rng.random((128, 128)), 3)
    grid = ramp + 0.05 * ((np.add.outer(np.arange(128), np.arange(128))) % 2)  # faint checkerboard on top
    assert grid_index(grid) > 3 * max(smooth)


def result_json(name: str, aji: float, dice: float) -> dict:
    return {
        "probe": name, "overrides": {"input_mode": "rgb"} if name == "b" else {},
        "configs": ["train.json", "datasets.json", "probe_schedule.json"] + (["basic_unet.json"] if name == "b" else []),
        "instance_sets": {"aji": aji, "pq": 0.5}, "overall": {"dice": dice, "bf1": 0.6, "hd95": 3.25, "grid_index": 0.12},
        "per_dataset": {"tnbc": {"dice": 0.7}}, "epochs": 3, "crops_per_cpu_second": 1.5, "train_cpu_minutes": 10.0,
    }


def test_recipe_table_orders_by_aji(tmp_path):
    for name, aji, dice in [("a", 0.41, 0.80), ("b", 0.55, 0.70), ("c", 0.47, 0.90)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(result_json(name, aji, dice)))
    lines = recipe_table(tmp_path).splitlines()
    assert lines[0].startswith("| probe |") and set(lines[1]) <= {"|", "-"}
    rows = [ln.split("|")[1:-1] for ln in lines[2:]]
    assert [r[0].strip() for r in rows] == ["b", "c", "a"]
    assert [r[2].strip() for r in rows] == ["0.550", "0.470", "0.410"]
    assert rows[0][1].strip() == "input_mode=rgb +basic_unet.json" and rows[1][1].strip() == "(baseline)"
    assert len(rows[0]) == lines[0].count("|") - 1
    # only the ids that differ from the baseline are listed as switches
    rows = [ln.split("|")[1:-1] for ln in recipe_table(tmp_path, {"input_mode": "rgb"}).splitlines()[2:]]
    assert rows[0][1].strip() == "+basic_unet.json"


def test_load_probes_puts_the_baseline_under_each_probe(tmp_path):
    from bundle.research.recipe import load_probes

    path = tmp_path / "probes.json"
    path.write_text(json.dumps({"_baseline": {"input_mode": "gray", "features": 16}, "base": {}, "wide": {"features": 32}}))
    assert load_probes(path) == {"base": {"input_mode": "gray", "features": 16}, "wide": {"input_mode": "gray", "features": 32}}
