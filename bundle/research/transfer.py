"""MoNuSeg cross-organ transfer (paper Figure 5): train on one organ group, test on the organs never seen.

The organ groups are the folds of the committed grouped split (``configs/splits/monuseg_5fold_seed42.json``:
0 kidney, 1 prostate, 2 breast, 3 liver, 4 bladder + colon + stomach). Row ``i`` of the transfer matrix:

* ``train``: the tiles of fold ``i`` only (one organ group);
* ``val``: fold ``(i + 1) % K`` (another organ), used only for model selection (validation Dice, early
  stopping, best checkpoint), the same "val = next fold" convention as the cross-validation protocol;
* ``test``: every tile of the other ``K - 2`` folds.

Nothing is tuned on a test column, so the test cells of the matrix are out-of-organ results; the val cell of a
row is optimistic (it chose the checkpoint) and the diagonal is the training organ itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from bundle.core.cli import data_path
from bundle.core.files import write_text_atomic
from bundle.data.layout import get_datalist, load_or_create_splits
from bundle.research.launch import (
    best_validation,
    bundle_run,
    config_arg,
    config_files,
    config_values,
    device_name,
    keep_curve,
    relative_to_bundle,
    train_once,
    trainer_state,
    write_json,
)
from bundle.research.locks import run_once
from bundle.research.tables import TABLE_METRICS, per_image_means

__all__ = ["ROLES", "transfer_folds", "fold_role", "transfer_datalist", "run_transfer_row", "transfer_matrix",
           "transfer_fold_names", "transfer_table", "TRANSFER_TRAIN", "TRANSFER_EVALUATE"]

#: what a fold is for a given row: its training organ, its model-selection organ, or a held-out test organ
ROLES = ("train", "val", "test")
TransferPart = Literal["train", "val", "test", "all"]


def transfer_folds(row: int, n_folds: int = 5) -> dict[str, list[int]]:
    """Folds of row ``row``: ``{"train": [row], "val": [(row + 1) % K], "test": the other K - 2 folds}``."""
    if n_folds < 3:
        raise ValueError(f"the transfer protocol needs at least 3 folds (train, val, test), got n_folds={n_folds}")
    if not 0 <= row < n_folds:
        raise ValueError(f"row (the training fold) must be in 0..{n_folds - 1}, got {row}")
    val = (row + 1) % n_folds
    return {"train": [row], "val": [val], "test": [f for f in range(n_folds) if f not in (row, val)]}


def fold_role(row: int, fold: int, n_folds: int = 5) -> str:
    """Role (``"train"``, ``"val"`` or ``"test"``) of ``fold`` for the model of row ``row``."""
    parts = transfer_folds(row, n_folds)
    return next(role for role in ROLES if fold in parts[role])


def _part_folds(row: int, part: str, n_folds: int) -> list[int]:
    """Folds of ``part`` (a role or ``"all"``) of row ``row``."""
    parts = transfer_folds(row, n_folds)
    if part == "all":
        return list(range(n_folds))
    if part not in parts:
        raise ValueError(f"part must be one of {[*ROLES, 'all']}, got {part!r}")
    return parts[part]


def transfer_datalist(
    dataset_dir: str | os.PathLike,
    row: int,
    part: TransferPart = "train",
    split_file: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 42,
) -> list[dict[str, str]]:
    """MONAI datalist of ``part`` of row ``row`` (see the module docstring), in fold order.

    Built from :func:`bundle.data.layout.get_datalist` (the tiles of fold ``f`` are its ``test`` part), so the same
    split file, dataset validation and error messages apply. For configs::

        {"_target_": "bundle.research.transfer.transfer_datalist", "dataset_dir": "@dataset_root", "row": "@fold",
         "part": "train", "split_file": "@split_file"}
    """
    folds = _part_folds(row, part, n_folds)
    return [item for f in folds for item in get_datalist(dataset_dir, f, "test", split_file, n_folds, seed)]


# --- running a row and its tables ------------------------------------------------------------------------------

#: config files of a transfer row, merged after train.json (training) and after train.json + evaluate.json
TRANSFER_TRAIN = ("configs/experiments/organ_transfer.json",)


TRANSFER_EVALUATE = ("configs/evaluate.json", "configs/experiments/organ_transfer.json",
                     "configs/experiments/organ_transfer_evaluate.json")


_TRANSFER_CSV = re.compile(r"^train(\d+)_(train|val|test)(\d+)\.csv$")


def transfer_csv_path(results_dir: str | os.PathLike, variant: str, row: int, fold: int, role: str) -> Path:
    """Per-image CSV of the row-``row`` model on the tiles of ``fold`` (``role``: train, val or test for that row)."""
    return Path(results_dir) / variant / f"train{row}_{role}{fold}.csv"


def transfer_summary_path(results_dir: str | os.PathLike, variant: str, row: int) -> Path:
    return Path(results_dir) / variant / f"train{row}_summary.json"


def run_transfer_row(
    row: int,
    dataset_dir: str | os.PathLike,
    runs_dir: str | os.PathLike,
    results_dir: str | os.PathLike,
    variant: str = "dshfn",
    max_epochs: int | None = None,
    device: str | None = None,
    num_workers: int = 0,
    overrides: Sequence[str] = (),
    split_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Row ``row`` of the cross-organ transfer matrix (:mod:`bundle.research.transfer`): train ``variant`` on fold ``row``'s
    organ, select the checkpoint on fold ``row + 1``, evaluate every tile once, and file the per-image rows of each
    fold under its role for this row (``train<row>_{train,val,test}<fold>.csv``) plus ``train<row>_summary.json``.

    Resumable like :func:`bundle.research.experiments.run_fold`: skipped when every file exists, a killed training resumes from its checkpoint,
    one live process per row (lock file). The selected weights stay at ``runs_dir/<variant>/train<row>/models/model.pt``.
    ``overrides``: config files merged last (the schedule; a smaller network in a smoke test).
    """
    train_files = config_files(variant, TRANSFER_TRAIN, overrides)
    config = {"dataset_dir": data_path(str(dataset_dir)), "fold": row}  # parsed here too: data, never code
    if split_file is not None:
        config["split_file"] = data_path(str(split_file))
    split_file, n_folds, seed = config_values(train_files, config, ("split_file", "n_folds", "seed"))
    folds = transfer_folds(row, n_folds)
    splits = load_or_create_splits(dataset_dir, split_file, n_folds, seed)
    wanted = {f: transfer_csv_path(results_dir, variant, row, f, fold_role(row, f, n_folds)) for f in range(n_folds)}
    summary_path = transfer_summary_path(results_dir, variant, row)
    out = Path(runs_dir) / variant / f"train{row}"
    return run_once(
        {"variant": variant, "row": row}, f"{variant} transfer row {row}", out,
        lambda: summary_path.is_file() and all(p.is_file() for p in wanted.values()),
        lambda: _run_transfer_row_locked(variant, row, out, results_dir, max_epochs, device, num_workers, overrides,
                                         config, split_file, n_folds, folds, splits, wanted, summary_path),
    )


def _run_transfer_row_locked(variant, row, out, results_dir, max_epochs, device, num_workers, overrides, config,
                             split_file, n_folds, folds, splits, wanted, summary_path) -> dict[str, Any]:

    started = time.time()
    common: dict[str, Any] = {**config, "output_dir": str(out), "num_workers": num_workers}
    if device:
        common["device"] = device_name(device)
    log_path = out / "experiment.log"
    train_info = train_once(variant, out, common, max_epochs, overrides, TRANSFER_TRAIN, log_path)
    keep_curve(out, Path(results_dir) / variant / f"train{row}_curves.csv")
    bundle_run("evaluating", config_arg(variant, TRANSFER_EVALUATE, overrides), {**common, "eval_part": "all"},
                log_path)
    per_image = out / "eval" / f"fold{row}_all_model" / "metrics_per_image.csv"
    fold_of = {i: f for f, fold in enumerate(splits["folds"]) for i in fold["ids"]}
    header, rows = _split_rows_by_fold(per_image, fold_of)
    columns = {}
    for f, path in wanted.items():
        got, expected = sorted(r[0] for r in rows.get(f, [])), sorted(splits["folds"][f]["ids"])
        if got != expected:
            raise RuntimeError(f"{per_image}: fold {f} has rows for {got}, expected the split's {expected}")
        _write_csv_atomic(path, header, rows[f])
        columns[str(f)] = {"role": fold_role(row, f, n_folds), "groups": splits["folds"][f]["groups"],
                           "n_images": len(rows[f]), "mean": per_image_means(path)}
    groups = lambda part: [g for f in folds[part] for g in splits["folds"][f]["groups"]]  # noqa: E731
    write_json(summary_path, {
        "variant": variant, "row": row, "train_fold": folds["train"][0], "val_fold": folds["val"][0],
        "test_folds": folds["test"], "train_groups": groups("train"), "val_groups": groups("val"),
        "test_groups": groups("test"), "split_file": Path(split_file).name, "columns": columns,
        "schedule": train_info.get("schedule"), "train_seconds": train_info.get("seconds"),
        "checkpoint": relative_to_bundle(out / "models" / "model.pt"), **trainer_state(out), **best_validation(out),
    })
    return {"variant": variant, "row": row, "skipped": False, "seconds": round(time.time() - started, 1)}


def _split_rows_by_fold(csv_path: Path, fold_of: dict[str, int]) -> tuple[list[str], dict[int, list[list[str]]]]:
    """(header, {fold: rows}) of a per-image CSV whose first column is the image id; columns reordered to id,
    filename, the pixel metrics of :data:`TABLE_METRICS`, then the rest (instance metrics) as they came."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        first = ["id", "filename", *(key for key, _, _ in TABLE_METRICS)]
        order = [header.index(c) for c in first if c in header] + [i for i, c in enumerate(header) if c not in first]
        rows: dict[int, list[list[str]]] = {}
        for r in reader:
            if r[0] not in fold_of:
                raise RuntimeError(f"{csv_path}: image {r[0]!r} is in no fold of the split file")
            rows.setdefault(fold_of[r[0]], []).append([r[i] for i in order])
    return [header[i] for i in order], rows


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def transfer_matrix(results_dir: str | os.PathLike, variant: str = "dshfn",
                    metric: str = "dice") -> dict[tuple[int, int], tuple[str, float]]:
    """``{(training fold, evaluated fold): (role, mean of metric over that fold's tiles)}`` from the per-image CSVs
    ``train<i>_<role><j>.csv`` in ``results_dir/<variant>``; cells whose CSV lacks the metric are left out."""
    cells: dict[tuple[int, int], tuple[str, float]] = {}
    for path in sorted(Path(results_dir, variant).glob("train*.csv")):
        match = _TRANSFER_CSV.match(path.name)
        if not match:
            continue  # train<i>_curves.csv
        means = per_image_means(path)
        if metric in means:
            cells[(int(match.group(1)), int(match.group(3)))] = (match.group(2), means[metric])
    return cells


def transfer_fold_names(results_dir: str | os.PathLike, variant: str = "dshfn") -> dict[int, str]:
    """``{fold: "kidney"}`` (groups joined by "+") from the rows' summary JSONs in ``results_dir/<variant>``."""
    names: dict[int, str] = {}
    for path in sorted(Path(results_dir, variant).glob("train*_summary.json")):
        for fold, column in json.loads(path.read_text()).get("columns", {}).items():
            names[int(fold)] = "+".join(column.get("groups") or [f"fold {fold}"])
    return names


def transfer_table(results_dir: str | os.PathLike, variant: str = "dshfn", metric: str = "dice",
                   names: dict[int, str] | None = None) -> str:
    """Markdown matrix of ``metric``: rows = training organ, columns = evaluated organ. Test cells are plain
    numbers; the row's validation organ (model selection) and its training organ are marked *val* and *train*.
    Last column: the mean of the row's test cells; last row: the mean of each column's test cells."""
    cells = transfer_matrix(results_dir, variant, metric)
    names = names if names is not None else transfer_fold_names(results_dir, variant)
    fmt = (lambda v: f"{v:.1f}") if metric in ("hd", "hd95") else (lambda v: f"{v:.3f}")  # noqa: E731
    rows = sorted({i for i, _ in cells})
    folds = sorted({j for _, j in cells} | set(names))
    label = lambda f: f"{f} {names[f]}" if f in names else str(f)  # noqa: E731
    lines = [f"| {metric}: train \\ test | " + " | ".join(label(f) for f in folds) + " | mean (test) |",
             "|" + "---|" * (len(folds) + 2)]
    for i in rows:
        out = []
        for j in folds:
            role, value = cells.get((i, j), ("", math.nan))
            out.append("–" if not role else fmt(value) if role == "test" else f"*{role} {fmt(value)}*")
        tests = [v for (r, j), (role, v) in cells.items() if r == i and role == "test"]
        out.append(fmt(sum(tests) / len(tests)) if tests else "–")
        lines.append(f"| {label(i)} | " + " | ".join(out) + " |")
    col_means = []
    for j in folds:
        tests = [v for (_, c), (role, v) in cells.items() if c == j and role == "test"]
        col_means.append(fmt(sum(tests) / len(tests)) if tests else "–")
    lines.append("| mean (test) | " + " | ".join(col_means) + " | |")
    return "\n".join(lines)
