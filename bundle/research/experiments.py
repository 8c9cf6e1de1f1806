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

import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bundle import bundle_root
from bundle.core.cli import data_path, data_value

logger = logging.getLogger(__name__)

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
ABLATIONS = ["dshfn", "local_only", "global_only", "additive_fusion", "no_boundary_decoder", "no_glga"]
RESOLUTIONS = ("paper", "native")
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



def keep_curve(run_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a run's per-epoch ``curve.csv`` (``bundle.handlers.training.TrainingCurve``, the ``curve_path`` of train.json)
    beside its results (committed, since run folders are not); atomic."""
    from bundle.core.files import atomic_write

    data = (Path(run_dir) / "curve.csv").read_bytes()
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))


def split_file_for(dataset_dir: str | os.PathLike, runs_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> str:
    """The k-fold split file of ``dataset_dir``: the committed ``configs/splits/<name>_<K>fold_seed<S>.json`` when it
    was made from this dataset's meta.csv (read only), else ``<runs_dir>/splits/`` (made there on first use)."""
    from bundle.data.layout import meta_hash

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


def _config_files(variant: str, pipeline: Sequence[str] = (), overrides: Sequence[str] = ()) -> list[Path]:
    """Config files in merge order: train.json, the ``pipeline`` files (e.g. evaluate.json), the variant,
    ``overrides``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    root = Path(bundle_root())
    files = [root / "configs" / "train.json"] + [root / f for f in (*pipeline, *VARIANTS[variant])]
    return files + [Path(f).resolve() for f in overrides]


def _configs(variant: str, pipeline: Sequence[str] = (), overrides: Sequence[str] = ()) -> str:
    """``--config_file`` value of :func:`_config_files`."""
    return "[" + ",".join(repr(str(f)) for f in _config_files(variant, pipeline, overrides)) + "]"


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
    return _run_once(
        {"variant": variant, "fold": fold}, f"{variant} fold {fold}", out,
        lambda: all(c.is_file() and j.is_file() for c, j in wanted),
        lambda: _run_fold_locked(variant, fold, dataset_dir, out, results_dir, max_epochs, device, num_workers,
                                 overrides, wanted, split_file),
    )


def _run_once(key: dict[str, Any], label: str, out: Path, done: Callable[[], bool],
              work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work()`` unless ``done()``, holding ``out/run.lock``: skipped (``key`` + ``skipped``) when the results exist
    or when another live process holds the lock (``busy``); ``done`` is asked again once the lock is held."""
    if done():
        logger.info(f"{label}: results exist, skipped")
        return {**key, "skipped": True}
    with _RunLock(out / "run.lock") as lock:
        if not lock.acquired:
            logger.info(f"{label}: another live process holds {lock.path}, skipped")
            return {**key, "skipped": True, "busy": True}
        if done():  # finished by another worker meanwhile
            return {**key, "skipped": True}
        return work()


class _RunLock:
    """An exclusive lock file holding the owner's PID, so parallel workers (``--folds`` split across processes)
    never train the same (variant, fold) twice; a lock whose process is gone is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acquired = False

    def __enter__(self) -> "_RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _alive(self.path):
                    return self
                self.path.unlink(missing_ok=True)  # stale: its process died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.acquired = True
            break
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.acquired:
            self.path.unlink(missing_ok=True)


def device_name(device: str) -> str:
    """``device`` as DATA for a config override: validated by ``torch.device`` ('cpu', 'cuda', 'cuda:1', 'mps'...)
    and passed on as its canonical name, a plain string the configs use as ``@device``. Never pasted into a
    ``$...`` expression: MONAI evaluates those, so a crafted value would run as code."""
    import torch

    try:
        return str(torch.device(str(device)))
    except (RuntimeError, TypeError, ValueError) as exc:
        from bundle.core.errors import DataError

        raise DataError(f"--device {device!r}: not a torch device ({exc}). Give cpu, cuda or cuda:N") from None


def _alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


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
    train_info = _train_once(variant, out, common, max_epochs, overrides, (KFOLD,), log_path)
    keep_curve(out, Path(results_dir) / variant / f"fold{fold}_curves.csv")
    for resolution, (csv_path, json_path) in zip(RESOLUTIONS, wanted):
        eval_dir = out / "eval" / f"fold{fold}_test_{resolution}"
        bundle_run("evaluating", _configs(variant, ["configs/evaluate.json", KFOLD], overrides),
                    {**common, "eval_part": "test", "eval_resolution": resolution}, log_path)
        summary = json.loads((eval_dir / "metrics_summary.json").read_text())
        summary.update(variant=variant, fold=fold, resolution=resolution, schedule=train_info.get("schedule"),
                       train_seconds=train_info.get("seconds"), **_trainer_state(out))
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(eval_dir / "metrics_per_image.csv", csv_path)
        _write_json(json_path, summary)
    return {"variant": variant, "fold": fold, "skipped": False, "seconds": round(time.time() - started, 1)}


def _train_once(variant: str, out: Path, common: dict[str, Any], max_epochs: int | None, overrides: Sequence[str],
                pipeline: Sequence[str], log_path: Path) -> dict[str, Any]:
    """Train ``variant`` into ``out`` unless ``out/train_done.json`` says it finished (resuming from the per-epoch
    checkpoint when there is one); returns that file's content (schedule file names, training seconds)."""
    done = out / "train_done.json"
    if not done.is_file():
        started = time.time()
        resume = (out / "models" / "checkpoint.pt").is_file()
        epochs = {} if max_epochs is None else {"max_epochs": max_epochs}
        bundle_run("training", _configs(variant, pipeline, overrides), {**common, **epochs, "resume": resume}, log_path)
        _write_json(done, {"schedule": [Path(f).name for f in overrides], "seconds": round(time.time() - started, 1)})
    return json.loads(done.read_text())


def _trainer_state(run_dir: Path) -> dict[str, int | None]:
    """``epochs_run`` and ``max_epochs`` of the run, from its resumable checkpoint (None when unknown)."""
    ckpt = run_dir / "models" / "checkpoint.pt"
    if not ckpt.is_file():
        return {"epochs_run": None, "max_epochs": None}
    import torch

    trainer = torch.load(ckpt, map_location="cpu", weights_only=True).get("trainer") or {}
    epochs = None
    if trainer.get("epoch_length"):  # ignite stores iteration and epoch_length, not the epoch
        epochs = int(trainer["iteration"]) // int(trainer["epoch_length"])
    return {"epochs_run": epochs, "max_epochs": trainer.get("max_epochs")}


def _write_json(path: Path, value: Any) -> None:
    from bundle.core.files import write_text_atomic

    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _copy_atomic(src: Path, dst: Path) -> None:
    from bundle.core.files import atomic_write

    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


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


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
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
                mean, sd = _mean_sd(values)
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


# --- MoNuSeg cross-organ transfer (paper Figure 5) --------------------------------------------------------------

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


def _config_values(files: Sequence[Path], values: dict[str, Any], keys: Sequence[str]) -> list[Any]:
    """Parsed values of ``keys`` in the merged ``files`` with ``values`` set (what ``monai.bundle run`` sees)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for k, v in values.items():
        parser[k] = v
    return [parser.get_parsed_content(k) for k in keys]


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

    Resumable like :func:`run_fold`: skipped when every file exists, a killed training resumes from its checkpoint,
    one live process per row (lock file). The selected weights stay at ``runs_dir/<variant>/train<row>/models/model.pt``.
    ``overrides``: config files merged last (the schedule; a smaller network in a smoke test).
    """
    from bundle.data.layout import load_or_create_splits
    from bundle.research.transfer import fold_role, transfer_folds

    train_files = _config_files(variant, TRANSFER_TRAIN, overrides)
    config = {"dataset_dir": data_path(str(dataset_dir)), "fold": row}  # parsed here too: data, never code
    if split_file is not None:
        config["split_file"] = data_path(str(split_file))
    split_file, n_folds, seed = _config_values(train_files, config, ("split_file", "n_folds", "seed"))
    folds = transfer_folds(row, n_folds)
    splits = load_or_create_splits(dataset_dir, split_file, n_folds, seed)
    wanted = {f: transfer_csv_path(results_dir, variant, row, f, fold_role(row, f, n_folds)) for f in range(n_folds)}
    summary_path = transfer_summary_path(results_dir, variant, row)
    out = Path(runs_dir) / variant / f"train{row}"
    return _run_once(
        {"variant": variant, "row": row}, f"{variant} transfer row {row}", out,
        lambda: summary_path.is_file() and all(p.is_file() for p in wanted.values()),
        lambda: _run_transfer_row_locked(variant, row, out, results_dir, max_epochs, device, num_workers, overrides,
                                         config, split_file, n_folds, folds, splits, wanted, summary_path),
    )


def _run_transfer_row_locked(variant, row, out, results_dir, max_epochs, device, num_workers, overrides, config,
                             split_file, n_folds, folds, splits, wanted, summary_path) -> dict[str, Any]:
    from bundle.research.transfer import fold_role

    started = time.time()
    common: dict[str, Any] = {**config, "output_dir": str(out), "num_workers": num_workers}
    if device:
        common["device"] = device_name(device)
    log_path = out / "experiment.log"
    train_info = _train_once(variant, out, common, max_epochs, overrides, TRANSFER_TRAIN, log_path)
    keep_curve(out, Path(results_dir) / variant / f"train{row}_curves.csv")
    bundle_run("evaluating", _configs(variant, TRANSFER_EVALUATE, overrides), {**common, "eval_part": "all"},
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
    _write_json(summary_path, {
        "variant": variant, "row": row, "train_fold": folds["train"][0], "val_fold": folds["val"][0],
        "test_folds": folds["test"], "train_groups": groups("train"), "val_groups": groups("val"),
        "test_groups": groups("test"), "split_file": Path(split_file).name, "columns": columns,
        "schedule": train_info.get("schedule"), "train_seconds": train_info.get("seconds"),
        "checkpoint": _relative(out / "models" / "model.pt"), **_trainer_state(out), **_best_validation(out),
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
    import io

    from bundle.core.files import write_text_atomic

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _relative(path: Path) -> str:
    """``path`` relative to the bundle root when it lies inside it (portable in committed JSON)."""
    try:
        return str(path.resolve().relative_to(bundle_root()))
    except ValueError:
        return str(path)


def _best_validation(run_dir: Path) -> dict[str, float | int | None]:
    """Validation Dice of the selected checkpoint and its epoch, from the run's resumable checkpoint."""
    ckpt = run_dir / "models" / "checkpoint.pt"
    if not ckpt.is_file():
        return {"best_val_dice": None, "best_val_epoch": None}
    import torch

    best = torch.load(ckpt, map_location="cpu", weights_only=True).get("validator_best") or {}
    return {"best_val_dice": best.get("best_metric"), "best_val_epoch": best.get("best_metric_epoch")}


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
