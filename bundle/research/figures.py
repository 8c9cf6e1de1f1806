"""Figures of the experiments, made from the committed results so anyone can regenerate them.

* :func:`plot_curves`, :func:`plot_metric_bars`: training curves and mean +- SD bars (matplotlib, an optional
  extra: ``pip install -r requirements-figures.txt``);
* :func:`qualitative_grid`: image with true (green) and predicted (red) contours for tiles of several patients
  (PIL only), via :func:`bundle.nuclei.overlays.contour_overlay`;
* :func:`plot_transfer_heatmap`: the cross-organ transfer matrix (paper Figure 5) as a heatmap (matplotlib).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bundle import bundle_root
from bundle.core.files import atomic_write, write_png_atomic
from bundle.data.io import read_image
from bundle.data.layout import get_datalist
from bundle.model.weights import load_weights
from bundle.nuclei.overlays import contour_overlay
from bundle.research.launch import VARIANTS
from bundle.research.tables import TABLE_METRICS, collect
from bundle.research.transfer import transfer_fold_names, transfer_matrix

#: per-epoch scalars worth keeping (train_loss is logged per iteration and left out)
CURVE_TAGS = ("val_mean_dice", "val_iou", "val_bf1", "val_hd95", "loss_total", "loss_seg", "loss_edge", "loss_glga", "lr")


def read_curves(csv_path: str | os.PathLike) -> dict[str, np.ndarray]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in (rows[0] if rows else [])}


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra
        raise ImportError("figures need matplotlib: pip install -r requirements-figures.txt") from exc
    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def plot_curves(results_dir: str | os.PathLike, variants: Sequence[str], out_png: str | os.PathLike,
                tags: Sequence[str] = ("val_mean_dice", "val_bf1", "loss_total")) -> Path:
    """Per-epoch curves (one panel per tag), every fold a thin line, the fold mean a thick one, per variant."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4), squeeze=False)
    for colour, variant in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], variants):
        curves = [read_curves(p) for p in sorted(Path(results_dir, variant).glob("fold*_curves.csv"))]
        for ax, tag in zip(axes[0], tags):
            runs = [c[tag] for c in curves if tag in c]
            for r in runs:
                ax.plot(np.arange(1, len(r) + 1), r, color=colour, alpha=0.3, lw=0.8)
            if runs:
                n = min(len(r) for r in runs)
                ax.plot(np.arange(1, n + 1), np.nanmean([r[:n] for r in runs], axis=0), color=colour, lw=2,
                        label=f"{variant} ({len(runs)} folds)")
            ax.set_title(tag)
            ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, out_png)
    plt.close(fig)
    return out


def plot_training_curve(curve_csv: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """One run's ``curve.csv`` (:class:`bundle.handlers.training.TrainingCurve`) against its CPU hours: the loss
    terms, the validation Dice and BF1 (validated epochs only) and the learning rate, one panel each."""
    plt = pyplot()
    c = read_curves(curve_csv)
    hours = np.cumsum(c["cpu_seconds"]) / 3600
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.4))
    for tag in ("loss_total", "loss_seg", "loss_edge", "loss_glga"):
        axes[0].plot(hours, c[tag], lw=1.5 if tag == "loss_total" else 0.9, label=tag)
    for tag in ("val_mean_dice", "val_bf1"):
        ok = np.isfinite(c[tag])
        axes[1].plot(hours[ok], c[tag][ok], marker="o", ms=3, label=tag)
    axes[2].plot(hours, c["lr"])
    for ax, title in zip(axes, ("training loss", "validation (22 tiles, model scale)", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel(f"CPU hours (epoch {int(c['epoch'][-1])} at {hours[-1]:.2f} h)" if ax is axes[1] else "CPU hours")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, out_png)
    plt.close(fig)
    return out


def training_curve_table(curve_csv: str | os.PathLike, every: int = 4) -> str:
    """Markdown table of one run's ``curve.csv``: every ``every``-th validated epoch and the last one, with the
    CPU hours so far, the epoch's mean training loss and the validation Dice, BF1 and HD95."""
    c = read_curves(curve_csv)
    hours = np.cumsum(c["cpu_seconds"]) / 3600
    validated = [i for i in range(len(c["epoch"])) if np.isfinite(c["val_mean_dice"][i])]
    rows = [i for i in validated if int(c["epoch"][i]) % every == 0]
    if validated and validated[-1] not in rows:
        rows.append(validated[-1])
    lines = ["| epoch | CPU hours | train loss | val Dice | val BF1 | val HD95 (px) |", "|---|---|---|---|---|---|"]
    lines += [f"| {int(c['epoch'][i])} | {hours[i]:.2f} | {c['loss_total'][i]:.3f} | {c['val_mean_dice'][i]:.3f} | "
              f"{c['val_bf1'][i]:.3f} | {c['val_hd95'][i]:.1f} |" for i in rows]
    return "\n".join(lines) + "\n"


def plot_metric_bars(results_dir: str | os.PathLike, variants: Sequence[str], out_png: str | os.PathLike,
                     resolution: str = "paper", metrics: Sequence[str] = ("dice", "iou", "bf1", "hd95")) -> Path:
    """Mean +- SD over folds of each fold's mean test metric, one panel per metric, one bar per variant."""
    plt = pyplot()
    found = collect(results_dir, resolution)
    names = [v for v in variants if v in found]
    labels = {key: label for key, label, _ in TABLE_METRICS}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        values = [[found[v][k][key] for k in sorted(found[v]) if key in found[v][k]] for v in names]
        means = [np.mean(x) if x else np.nan for x in values]
        sds = [np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in values]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color="#7a9cc6")
        for i, x in enumerate(values):
            ax.scatter([i] * len(x), x, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(labels.get(key, key))
    fig.suptitle(f"test folds, {resolution} resolution (dots: folds)", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, out_png)
    plt.close(fig)
    return out


def plot_transfer_heatmap(results_dir: str | os.PathLike, out_png: str | os.PathLike, variant: str = "dshfn",
                          metric: str = "dice", title: str | None = None) -> Path:
    """Heatmap of the cross-organ transfer matrix: rows = training organ, columns = evaluated organ, colour and
    number = mean ``metric`` over the column's tiles. Only test cells are coloured; each row's validation organ
    (it chose the checkpoint) and training organ are hatched grey and labelled "val" / "train"."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    cells = transfer_matrix(results_dir, variant, metric)
    if not cells:
        raise FileNotFoundError(f"{Path(results_dir) / variant}: no train<i>_<role><j>.csv with a '{metric}' column; "
                                "run `python scripts/experiments.py transfer` first")
    names = transfer_fold_names(results_dir, variant)
    rows = sorted({i for i, _ in cells})
    cols = sorted({j for _, j in cells} | set(names))
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), (role, value) in cells.items():
        if role == "test":
            grid[rows.index(i), cols.index(j)] = value
    lower_better = metric.startswith("hd")
    fig, ax = plt.subplots(figsize=(1.25 * len(cols) + 2.2, 0.9 * len(rows) + 1.6))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r" if lower_better else "viridis",
                      vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0, vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1)
    for (i, j), (role, value) in cells.items():
        r, c = rows.index(i), cols.index(j)
        text = f"{value:.3f}" if metric not in ("hd", "hd95") else f"{value:.1f}"
        if role == "test":
            rgba = image.cmap(image.norm(value))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
        else:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="#e6e6e6", edgecolor="#9a9a9a", hatch="//", lw=0))
            ax.text(c, r, f"{role}\n{text}", ha="center", va="center", fontsize=8, color="#444444",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    label = lambda f: f"{f}: {names[f]}" if f in names else str(f)  # noqa: E731
    ax.set_xticks(range(len(cols)), [label(f) for f in cols], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [label(f) for f in rows], fontsize=8)
    ax.set_xlabel("tested on (organ group)")
    ax.set_ylabel("trained on (organ group)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"mean {metric} (test cells)")
    ax.set_title(title or f"{variant}: cross-organ transfer, mean {metric} per tile\n"
                 "hatched: val = model selection organ, train = training organ (not test results)", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, out_png)
    plt.close(fig)
    return out


def qualitative_grid(panels: Sequence[tuple[str, np.ndarray]], out_png: str | os.PathLike, columns: int = 4) -> Path:
    """Tile (caption, RGB uint8 (H, W, 3)) panels into one PNG with captions (PIL only)."""
    from PIL import Image, ImageDraw

    if not panels:
        raise ValueError("qualitative_grid: no panels")
    columns = max(1, min(columns, len(panels)))
    h = max(p.shape[0] for _, p in panels)
    w = max(p.shape[1] for _, p in panels)
    rows = (len(panels) + columns - 1) // columns
    pad = 18
    canvas = Image.new("RGB", (columns * w, rows * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, panel) in enumerate(panels):
        x, y = (i % columns) * w, (i // columns) * (h + pad)
        canvas.paste(Image.fromarray(panel), (x, y + pad))
        draw.text((x + 3, y + 3), caption, fill="black")
    write_png_atomic(out_png, np.asarray(canvas))
    return Path(out_png)


def prediction_panels(
    variant: str,
    fold: int,
    run_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    part: str = "val",
    per_group: int = 1,
    max_panels: int = 8,
    device: str = "cpu",
) -> list[tuple[str, np.ndarray]]:
    """(caption, overlay) for ``per_group`` tiles of each patient/organ in ``part`` of ``fold`` (validation by
    default, never the held-out test part unless asked), predicted by ``run_dir/models/model.pt`` through the
    variant's own validation pipeline: true contours green, predicted red, yellow where they agree."""
    import torch
    from monai.bundle import ConfigParser
    from PIL import Image

    root = Path(bundle_root())
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json")] + [str(root / f) for f in VARIANTS[variant]])
    parser["dataset_dir"] = str(dataset_dir)
    parser["fold"] = fold
    parser["download"] = False

    datalist = get_datalist(dataset_dir, fold, part, parser.get_parsed_content("split_file"))
    chosen, seen = [], {}
    for item in datalist:
        if seen.get(item["group"], 0) < per_group and len(chosen) < max_panels:
            seen[item["group"]] = seen.get(item["group"], 0) + 1
            chosen.append(item)
    transform = parser.get_parsed_content("validate#preprocessing")
    net = parser.get_parsed_content("network_def")
    load_weights(net, Path(run_dir) / "models" / "model.pt", device)
    net = net.to(device).eval()
    threshold = float(parser.get_parsed_content("threshold"))
    panels = []
    for item in chosen:
        data = transform(dict(item))
        with torch.no_grad():
            prob = net(torch.as_tensor(data["image"])[None].to(device))[0, 0].cpu().numpy()
        pred = prob > threshold
        label = np.asarray(data["label"])[0] > 0.5
        rgb = read_image(item["image"])
        rgb = np.asarray(Image.fromarray(rgb).resize(pred.shape[::-1], Image.BICUBIC))
        dice = 2 * (pred & label).sum() / max(1, pred.sum() + label.sum())
        panels.append((f"{item['id']} ({item['group']}) Dice {dice:.2f}", contour_overlay(np.moveaxis(rgb, -1, 0), pred, label)))
    return panels
