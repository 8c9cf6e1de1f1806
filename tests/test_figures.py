"""Figures of the experiments: curves exported from TensorBoard logs, plots and the overlay grid."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
from PIL import Image

from bundle.figures import export_curves, plot_curves, plot_metric_bars, qualitative_grid, read_curves


def _log_run(log_dir, epochs, resumed_at=None):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for epoch in range(1, epochs + 1):
        writer.add_scalar("val_mean_dice", epoch / 10, epoch)
        writer.add_scalar("loss_total", 1.0 / epoch, epoch)
        writer.add_scalar("train_loss", 5.0, epoch * 7)  # per iteration: not an epoch curve
    writer.close()
    if resumed_at:  # a resumed run logs the epochs after the checkpoint again, in a new event file
        writer = SummaryWriter(str(log_dir))
        for epoch in range(resumed_at, epochs + 1):
            writer.add_scalar("val_mean_dice", epoch / 10 + 0.01, epoch)
        writer.close()


def test_export_curves_one_row_per_epoch_last_value_wins(tmp_path):
    _log_run(tmp_path / "logs", 4, resumed_at=3)
    n = export_curves(tmp_path / "logs", tmp_path / "curves.csv")
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert n == 4 and [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert list(rows[0]) == ["epoch", "val_mean_dice", "loss_total"]  # train_loss left out
    curves = read_curves(tmp_path / "curves.csv")
    np.testing.assert_allclose(curves["val_mean_dice"], [0.1, 0.2, 0.31, 0.41], rtol=1e-6)
    np.testing.assert_allclose(curves["loss_total"], [1, 0.5, 1 / 3, 0.25], rtol=1e-6)


def test_qualitative_grid_places_every_panel(tmp_path):
    panels = [(f"p{i}", np.full((20, 30, 3), 40 * i, np.uint8)) for i in range(5)]
    out = qualitative_grid(panels, tmp_path / "grid.png", columns=2)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * (20 + 18), 2 * 30, 3)
    assert (grid[18 + 5, 5] == 0).all() and (grid[2 * 38 + 18 + 5, 5] == 160).all()  # panels 0 and 4
    with pytest.raises(ValueError, match="no panels"):
        qualitative_grid([], tmp_path / "none.png")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (requirements-figures.txt) absent")
def test_plots_from_results_folders(tmp_path):
    for variant, base in (("a", 0.8), ("b", 0.6)):
        for fold in (0, 1):
            _log_run(tmp_path / "logs" / variant / str(fold), 3)
            export_curves(tmp_path / "logs" / variant / str(fold), tmp_path / "res" / variant / f"fold{fold}_curves.csv")
            with open(tmp_path / "res" / variant / f"fold{fold}_paper.csv", "w") as f:
                f.write(f"id,dice,iou,bf1,hd95\nx,{base + fold / 10},0.5,0.5,3\n")
    for path in (plot_curves(tmp_path / "res", ["a", "b"], tmp_path / "curves.png", tags=("val_mean_dice",)),
                 plot_metric_bars(tmp_path / "res", ["a", "b"], tmp_path / "bars.png")):
        img = np.asarray(Image.open(path))
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
