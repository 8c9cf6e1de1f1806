"""Tables of the k-fold experiments: per-image CSVs -> per-fold means -> mean +- SD over folds, as markdown."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from bundle.research.launch import VARIANTS

#: columns of the tables: (metric key in metrics_summary.json, label, higher is better)
TABLE_METRICS = [
    ("dice", "Dice", True),
    ("iou", "IoU", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("bf1", "BF1 (2 px)", True),
    ("bf1_diag", "BF1 (0.75 % diag.)", True),
    ("hd", "HD (px)", False),
    ("hd95", "HD95 (px)", False),
]


def per_image_means(csv_path: str | os.PathLike) -> dict[str, float]:
    """Mean of every numeric column of a per-image metrics CSV (NaN entries, e.g. HD of an empty mask, ignored)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    means: dict[str, float] = {}
    for key in rows[0] if rows else []:
        cells = [row[key] for row in rows if row[key] not in ("", None)]  # "" = NaN in the writer's CSV
        try:
            values = [float(c) for c in cells]
        except ValueError:  # a text column (id, filename)
            continue
        values = [v for v in values if math.isfinite(v)]
        if values:
            means[key] = sum(values) / len(values)
    return means


def collect(results_dir: str | os.PathLike, resolution: str) -> dict[str, dict[int, dict[str, float]]]:
    """{variant: {fold: {metric: mean over the fold's test images}}} from the per-image CSVs in ``results_dir``."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for csv_path in sorted(Path(results_dir).glob(f"*/fold*_{resolution}.csv")):
        fold = int(csv_path.stem[len("fold"):].split("_")[0])
        found.setdefault(csv_path.parent.name, {})[fold] = per_image_means(csv_path)
    return found


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarise(results_dir: str | os.PathLike, variants: Iterable[str] | None = None, resolution: str = "paper",
              folds: Iterable[int] | None = None) -> str:
    """Markdown table: per variant, mean +- SD over folds of each fold's mean test metric, and the folds used
    (only ``folds`` when given, so variants run on fewer folds are compared on the same ones)."""
    found = collect(results_dir, resolution)
    if folds is not None:
        keep = set(folds)
        found = {v: {k: m for k, m in per.items() if k in keep} for v, per in found.items()}
        found = {v: per for v, per in found.items() if per}
    names = [v for v in (variants or VARIANTS) if v in found]
    head = "| model | folds | " + " | ".join(label for _, label, _ in TABLE_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_METRICS) + 2)]
    for name in names:
        folds = found[name]
        cells = []
        for key, _, _ in TABLE_METRICS:
            values = [m[key] for m in folds.values() if key in m]
            if values:
                mean, sd = mean_sd(values)
                cells.append(f"{mean:.3f} ± {sd:.3f}" if key not in ("hd", "hd95") else f"{mean:.1f} ± {sd:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {name} | {','.join(str(k) for k in sorted(folds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_fold_table(results_dir: str | os.PathLike, variants: Iterable[str] | None = None, resolution: str = "paper",
                   folds: Iterable[int] | None = None, metrics: Sequence[str] = ("dice", "bf1", "hd95")) -> str:
    """Markdown table: per variant, each fold's mean test value of each of ``metrics`` (``-`` where a variant has
    not run that fold), so variants are compared within a fold (folds differ more than variants do)."""
    found = collect(results_dir, resolution)
    names = [v for v in (variants or VARIANTS) if v in found]
    keep = sorted(set(folds) if folds is not None else {k for v in names for k in found[v]})
    labels = {key: label for key, label, _ in TABLE_METRICS}
    head = "| model | " + " | ".join(f"{labels.get(m, m)} fold {k}" for m in metrics for k in keep) + " |"
    lines = [head, "|" + "---|" * (1 + len(metrics) * len(keep))]
    for name in names:
        cells = []
        for m in metrics:
            for k in keep:
                value = found[name].get(k, {}).get(m)
                cells.append("–" if value is None else (f"{value:.1f}" if m in ("hd", "hd95") else f"{value:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
