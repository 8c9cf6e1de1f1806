"""Cross-validation experiments: DS-HFN, the MONAI baselines and the Table 4 ablations, one pipeline.

Every run is ``python -m monai.bundle run`` on ``configs/train.json`` plus the variant's file from
``configs/variants/`` (config variants, not forks), so every model sees the same folds, transforms, optimiser,
schedule, early stopping and evaluation. Per fold ``k`` (the committed split file's protocol): train on the
other three folds, select the checkpoint on fold ``k+1`` (validation Dice), evaluate once on fold ``k`` at the
paper's 256 x 256 and at the native size. The threshold stays at the paper's 0.5: nothing is tuned, so nothing
can leak from the held-out fold.

Runs are resumable at two levels: a training subprocess resumes from its per-epoch checkpoint, and a
(variant, fold) whose results are already under ``results_dir`` is skipped. Results are copied to
``<results_dir>/<variant>/fold<k>_<resolution>.csv`` (per image) and ``.json`` (summary) as each fold finishes, so
tables can be assembled across sessions and machines with :func:`summarise`. ``scripts/experiments.py`` writes them
under its runs folder, and into ``docs/results/<dataset>_<schedule>`` only when asked (``--publish``); the fold split
is the committed one (``configs/splits/``) when it was made from the same meta.csv, else one written under the runs
folder (:func:`split_file_for`), so a user's experiment never writes into the bundle.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bundle.research.launch import (
    KFOLD,
    bundle_run,
    config_arg,
    copy_atomic,
    device_name,
    keep_curve,
    train_once,
    trainer_state,
    write_json,
)
from bundle.research.locks import run_once

ABLATIONS = ["dshfn", "local_only", "global_only", "additive_fusion", "no_boundary_decoder", "no_glga"]


RESOLUTIONS = ("paper", "native")


def result_paths(results_dir: str | os.PathLike, variant: str, fold: int, resolution: str) -> tuple[Path, Path]:
    base = Path(results_dir) / variant / f"fold{fold}_{resolution}"
    return base.with_suffix(".csv"), base.with_suffix(".json")


def run_fold(
    variant: str,
    fold: int,
    dataset_dir: str | os.PathLike,
    runs_dir: str | os.PathLike,
    results_dir: str | os.PathLike,
    max_epochs: int | None = None,
    device: str | None = None,
    num_workers: int = 0,
    overrides: Sequence[str] = (),
    split_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``variant`` on ``fold`` (resuming a killed run), evaluate its held-out fold at both resolutions and
    copy the per-image CSV and summary JSON to ``results_dir``. Skipped when those results exist.

    ``overrides``: config files merged last (after the variant): the schedule (``configs/schedules/``) or, in a
    smoke test, a smaller network. ``max_epochs`` (if given) overrides both. ``split_file``: the fold split (default:
    the config's, kfold.json's ``split_file``).
    """
    wanted = [result_paths(results_dir, variant, fold, r) for r in RESOLUTIONS]
    out = Path(runs_dir) / variant / f"fold{fold}"
    return run_once(
        {"variant": variant, "fold": fold}, f"{variant} fold {fold}", out,
        lambda: all(c.is_file() and j.is_file() for c, j in wanted),
        lambda: _run_fold_locked(variant, fold, dataset_dir, out, results_dir, max_epochs, device, num_workers,
                                 overrides, wanted, split_file),
    )


def _run_fold_locked(variant, fold, dataset_dir, out, results_dir, max_epochs, device, num_workers, overrides,
                     wanted, split_file=None) -> dict[str, Any]:
    common: dict[str, Any] = {"dataset_dir": str(dataset_dir), "output_dir": str(out), "fold": fold,
                              "num_workers": num_workers}
    if split_file is not None:
        common["split_file"] = str(split_file)
    if device:
        common["device"] = device_name(device)
    log_path = out / "experiment.log"
    started = time.time()
    train_info = train_once(variant, out, common, max_epochs, overrides, (KFOLD,), log_path)
    keep_curve(out, Path(results_dir) / variant / f"fold{fold}_curves.csv")
    for resolution, (csv_path, json_path) in zip(RESOLUTIONS, wanted):
        eval_dir = out / "eval" / f"fold{fold}_test_{resolution}"
        bundle_run("evaluating", config_arg(variant, ["configs/evaluate.json", KFOLD], overrides),
                    {**common, "eval_part": "test", "eval_resolution": resolution}, log_path)
        summary = json.loads((eval_dir / "metrics_summary.json").read_text())
        summary.update(variant=variant, fold=fold, resolution=resolution, schedule=train_info.get("schedule"),
                       train_seconds=train_info.get("seconds"), **trainer_state(out))
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        copy_atomic(eval_dir / "metrics_per_image.csv", csv_path)
        write_json(json_path, summary)
    return {"variant": variant, "fold": fold, "skipped": False, "seconds": round(time.time() - started, 1)}
