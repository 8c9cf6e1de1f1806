"""Figures of the experiments: curves exported from TensorBoard logs, plots and the overlay grid."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from bundle.research.figures import (
    plot_curves,
    plot_metric_bars,
    plot_training_curve,
    qualitative_grid,
)


def test_qualitative_grid_places_every_panel(tmp_path):
    panels = [(f"p{i}", np.full((20, 30, 3), 40 * i, np.uint8)) for i in range(5)]
    out = qualitative_grid(panels, tmp_path / "grid.png", columns=2)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * (20 + 18), 2 * 30, 3)
    assert (grid[18 + 5, 5] == 0).all() and (grid[2 * 38 + 18 + 5, 5] == 160).all()  # panels 0 and 4
    with pytest.raises(ValueError, match="no panels"):
        qualitative_grid([], tmp_path / "none.png")


def _run_curve(path):
    """A training run's curve.csv: validation every second epoch (empty cells between)."""
    cols = "epoch,cpu_seconds,loss_seg,loss_edge,loss_glga,loss_total,lr,val_mean_dice,val_iou,val_bf1,val_hd95"
    rows = [f"{e},300,{1 / e},{0.5 / e},{0.4 / e},{0.8 / e},{1e-3 / e}," + (f"{0.6 + e / 100},0.5,0.5,30" if e % 2 == 0
                                                                          else ",,,") for e in range(1, 7)]
    path.write_text(cols + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (requirements-figures.txt) absent")
def test_plots_from_results_folders(tmp_path):
    for variant, base in (("a", 0.8), ("b", 0.6)):
        for fold in (0, 1):
            (tmp_path / "res" / variant).mkdir(parents=True, exist_ok=True)
            (tmp_path / "res" / variant / f"fold{fold}_curves.csv").write_text(
                "epoch,cpu_seconds,loss_total,val_mean_dice\n" + "".join(f"{e},1.0,{1 / e},{e / 10 + base}\n" for e in (1, 2, 3)))
            with open(tmp_path / "res" / variant / f"fold{fold}_paper.csv", "w") as f:
                f.write(f"id,dice,iou,bf1,hd95\nx,{base + fold / 10},0.5,0.5,3\n")
    for path in (plot_curves(tmp_path / "res", ["a", "b"], tmp_path / "curves.png", tags=("val_mean_dice",)),
                 plot_metric_bars(tmp_path / "res", ["a", "b"], tmp_path / "bars.png"),
                 plot_training_curve(_run_curve(tmp_path / "curve.csv"), tmp_path / "run_curve.png")):
        img = np.asarray(Image.open(path))
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def test_training_curve_table_rows_by_hand(tmp_path):
    from bundle.research.figures import training_curve_table

    lines = training_curve_table(_run_curve(tmp_path / "curve.csv"), every=4).splitlines()
    # validated epochs 2, 4, 6: every 4th (4) and the last (6); CPU hours = epochs x 300 s / 3600
    assert lines[2:] == ["| 4 | 0.33 | 0.200 | 0.640 | 0.500 | 30.0 |", "| 6 | 0.50 | 0.133 | 0.660 | 0.500 | 30.0 |"]
    assert len(training_curve_table(tmp_path / "curve.csv", every=2).splitlines()) == 2 + 3
