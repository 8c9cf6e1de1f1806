"""Launching the experiments' runs: the config files of a variant, ``python -m monai.bundle run`` in a subprocess,
training once with resume, and what a finished run's folder says (its trainer state, its best validation, its curve).

Every run is a fresh process (memory is returned) started from the bundle root with overrides that are data, never
code: MONAI's parser would run a leading ``$`` and follow ``@`` and ``%``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from bundle import bundle_root
from bundle.core.cli import data_path, data_value
from bundle.core.errors import DataError
from bundle.core.files import atomic_write, write_text_atomic
from bundle.data.layout import meta_hash

#: variant name -> config files merged after configs/train.json (paths relative to the bundle root)
VARIANTS: dict[str, list[str]] = {
    "dshfn": [],
    "basic_unet": ["configs/variants/basic_unet.json"],
    "attention_unet": ["configs/variants/attention_unet.json"],
    "local_only": ["configs/variants/ablation_local_only.json"],
    "global_only": ["configs/variants/ablation_global_only.json"],
    "additive_fusion": ["configs/variants/ablation_additive_fusion.json"],
    "no_boundary_decoder": ["configs/variants/ablation_no_boundary_decoder.json"],
    "no_glga": ["configs/variants/ablation_no_glga.json"],
    "dshfn_width32": ["configs/variants/dshfn_width32.json"],
}


#: the single-dataset k-fold datalists, merged after train.json (and evaluate.json) in every fold run
KFOLD = "configs/experiments/kfold.json"


def keep_curve(run_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a run's per-epoch ``curve.csv`` (``bundle.handlers.training.TrainingCurve``, the ``curve_path`` of train.json)
    beside its results (committed, since run folders are not); atomic."""
    data = (Path(run_dir) / "curve.csv").read_bytes()
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))


def split_file_for(dataset_dir: str | os.PathLike, runs_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> str:
    """The k-fold split file of ``dataset_dir``: the committed ``configs/splits/<name>_<K>fold_seed<S>.json`` when it
    was made from this dataset's meta.csv (read only), else ``<runs_dir>/splits/`` (made there on first use)."""
    name = f"{os.path.basename(os.path.normpath(dataset_dir))}_{n_folds}fold_seed{seed}.json"
    committed = Path(bundle_root()) / "configs" / "splits" / name
    try:
        if json.loads(committed.read_text(encoding="utf-8")).get("meta_csv_sha256") == meta_hash(dataset_dir):
            return str(committed)
    except (OSError, ValueError, AttributeError):  # none committed, unreadable, or no meta.csv to compare with
        pass
    return str(Path(runs_dir) / "splits" / name)


def schedule_tag(schedule: str | os.PathLike, max_epochs: int | None = None) -> str:
    """The name a run's results are filed under: the schedule file's name, its epoch count replaced by
    ``max_epochs`` when that is given (``cpu_40ep`` with ``--max_epochs 1`` is ``cpu_1ep``, never ``cpu_40ep``)."""
    stem = os.path.splitext(os.path.basename(schedule))[0]
    if max_epochs is None:
        return stem
    tagged, n = re.subn(r"\d+ep$", f"{int(max_epochs)}ep", stem)
    return tagged if n else f"{stem}_{int(max_epochs)}ep"


def config_files(variant: str, pipeline: Sequence[str] = (), overrides: Sequence[str] = ()) -> list[Path]:
    """Config files in merge order: train.json, the ``pipeline`` files (e.g. evaluate.json), the variant,
    ``overrides``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    root = Path(bundle_root())
    files = [root / "configs" / "train.json"] + [root / f for f in (*pipeline, *VARIANTS[variant])]
    return files + [Path(f).resolve() for f in overrides]


def config_arg(variant: str, pipeline: Sequence[str] = (), overrides: Sequence[str] = ()) -> str:
    """``--config_file`` value of :func:`config_files`."""
    return "[" + ",".join(repr(str(f)) for f in config_files(variant, pipeline, overrides)) + "]"


def config_values(files: Sequence[Path], values: dict[str, Any], keys: Sequence[str]) -> list[Any]:
    """Parsed values of ``keys`` in the merged ``files`` with ``values`` set (what ``monai.bundle run`` sees)."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for k, v in values.items():
        parser[k] = v
    return [parser.get_parsed_content(k) for k in keys]


def bundle_run(run_id: str, config_file: str, overrides: dict[str, Any], log_path: Path) -> None:
    """``python -m monai.bundle run <run_id>`` in a subprocess (a fresh process per run: memory is returned)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file]
    for key, value in overrides.items():
        if isinstance(value, str):  # data, never code: MONAI's parser runs a leading $ and follows @ and %
            value = data_path(value) if key.endswith(("_dir", "_file", "_path")) else data_value(value, f"--{key}")
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=bundle_root(), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed (exit {proc.returncode}); see {log_path}")


def device_name(device: str) -> str:
    """``device`` as DATA for a config override: validated by ``torch.device`` ('cpu', 'cuda', 'cuda:1', 'mps'...)
    and passed on as its canonical name, a plain string the configs use as ``@device``. Never pasted into a
    ``$...`` expression: MONAI evaluates those, so a crafted value would run as code."""
    try:
        return str(torch.device(str(device)))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DataError(f"--device {device!r}: not a torch device ({exc}). Give cpu, cuda or cuda:N") from None


def train_once(variant: str, out: Path, common: dict[str, Any], max_epochs: int | None, overrides: Sequence[str],
                pipeline: Sequence[str], log_path: Path) -> dict[str, Any]:
    """Train ``variant`` into ``out`` unless ``out/train_done.json`` says it finished (resuming from the per-epoch
    checkpoint when there is one); returns that file's content (schedule file names, training seconds)."""
    done = out / "train_done.json"
    if not done.is_file():
        started = time.time()
        resume = (out / "models" / "checkpoint.pt").is_file()
        epochs = {} if max_epochs is None else {"max_epochs": max_epochs}
        bundle_run("training", config_arg(variant, pipeline, overrides), {**common, **epochs, "resume": resume}, log_path)
        write_json(done, {"schedule": [Path(f).name for f in overrides], "seconds": round(time.time() - started, 1)})
    return json.loads(done.read_text())


def trainer_state(run_dir: Path) -> dict[str, int | None]:
    """``epochs_run`` and ``max_epochs`` of the run, from its resumable checkpoint (None when unknown)."""
    ckpt = run_dir / "models" / "checkpoint.pt"
    if not ckpt.is_file():
        return {"epochs_run": None, "max_epochs": None}

    trainer = torch.load(ckpt, map_location="cpu", weights_only=True).get("trainer") or {}
    epochs = None
    if trainer.get("epoch_length"):  # ignite stores iteration and epoch_length, not the epoch
        epochs = int(trainer["iteration"]) // int(trainer["epoch_length"])
    return {"epochs_run": epochs, "max_epochs": trainer.get("max_epochs")}


def best_validation(run_dir: Path) -> dict[str, float | int | None]:
    """Validation Dice of the selected checkpoint and its epoch, from the run's resumable checkpoint."""
    ckpt = run_dir / "models" / "checkpoint.pt"
    if not ckpt.is_file():
        return {"best_val_dice": None, "best_val_epoch": None}

    best = torch.load(ckpt, map_location="cpu", weights_only=True).get("validator_best") or {}
    return {"best_val_dice": best.get("best_metric"), "best_val_epoch": best.get("best_metric_epoch")}


def write_json(path: Path, value: Any) -> None:

    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def copy_atomic(src: Path, dst: Path) -> None:

    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def relative_to_bundle(path: Path) -> str:
    """``path`` relative to the bundle root when it lies inside it (portable in committed JSON)."""
    try:
        return str(path.resolve().relative_to(bundle_root()))
    except ValueError:
        return str(path)
