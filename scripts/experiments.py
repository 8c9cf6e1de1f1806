"""Cross-validation and transfer experiments: a thin command line over :mod:`bundle.research.experiments`.

    # DS-HFN and BasicUNet on all five TNBC folds, same budget (resumable: rerun the same command); results under
    # runs/experiments/results/tnbc_cpu_40ep (--publish: docs/results/tnbc_cpu_40ep, the committed tables)
    python scripts/experiments.py run --variants dshfn basic_unet --folds 0 1 2 3 4 \\
        --dataset_dir ../shared/data/tnbc
    # the Table 4 ablations on two folds
    python scripts/experiments.py run --variants ablations --folds 0 1 --dataset_dir ../shared/data/tnbc
    # tables (mean +- SD over folds) from the committed per-image CSVs
    python scripts/experiments.py table --results_dir docs/results/tnbc_cpu_40ep --resolution paper
    # MoNuSeg cross-organ transfer (paper Figure 5): train on one organ group, test on the others (resumable)
    python scripts/experiments.py transfer --dataset_dir ../shared/data/monuseg --rows 0 1 2 3 4
    python scripts/experiments.py transfer-table --results_dir docs/results/monuseg_transfer_cpu_40ep
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import bundle_path  # noqa: F401  (the bundle root on sys.path)

from bundle import bundle_root
from bundle.core.cli import data_path
from bundle.research.experiments import ABLATIONS, RESOLUTIONS, run_fold
from bundle.research.launch import (
    KFOLD,
    VARIANTS,
    device_name,
    schedule_tag,
    split_file_for,
)
from bundle.research.tables import per_fold_table, summarise
from bundle.research.transfer import run_transfer_row, transfer_table

#: folds of the k-fold split (``n_folds`` of configs/experiments/kfold.json; the transfer config has the same)
with open(os.path.join(bundle_root(), KFOLD), encoding="utf-8") as _f:
    N_FOLDS = int(json.load(_f)["n_folds"])


def results_folder(args: argparse.Namespace, name: str) -> str:
    """Where a run's per-fold results go: ``--results_dir``; with ``--publish`` the committed
    ``docs/results/<name>``; else ``<runs_dir>/results/<name>``, beside the runs (never into the bundle unasked)."""
    if args.results_dir:
        return data_path(args.results_dir)
    if args.publish:
        return os.path.join(bundle_root(), "docs", "results", name)
    return os.path.join(args.runs_dir, "results", name)


def fail(message: str) -> None:
    """One line and exit 2 (argparse's usage block would bury it)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_run_args(args: argparse.Namespace, folds: list[int], option: str) -> None:
    """What can be checked before any work: the dataset folder and the fold numbers (one line each)."""
    args.dataset_dir = data_path(args.dataset_dir)  # a path, never code for the config parser
    args.runs_dir = data_path(args.runs_dir)
    if not os.path.isfile(os.path.join(args.dataset_dir, "meta.csv")):
        fail(f"--dataset_dir {args.dataset_dir}: not a dataset folder (no meta.csv). Give a folder in the "
                     "standard layout, e.g. ../shared/data/tnbc (scripts/prepare_data.py makes one)")
    bad = sorted({k for k in folds if not 0 <= k < N_FOLDS})
    if bad:
        fail(f"{option} {' '.join(map(str, bad))}: the split has {N_FOLDS} folds, give numbers from 0 to "
                     f"{N_FOLDS - 1}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train + evaluate variants on folds (skips what is done, resumes the rest)")
    run.add_argument("--variants", nargs="+", default=["dshfn", "basic_unet"],
                     help=f"names from {sorted(VARIANTS)}, or 'ablations' for {ABLATIONS}")
    run.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run.add_argument("--schedule", default="configs/schedules/cpu_40ep.json",
                     help="config file with the budget (epochs, batch, lr), identical for every variant")
    run.add_argument("--max_epochs", type=int, default=None, help="override the schedule's epochs (smoke runs)")
    run.add_argument("--dataset_dir", required=True)
    run.add_argument("--runs_dir", default="runs/experiments",
                     help="checkpoints, logs, the fold split if none is committed for the dataset, and the results")
    run.add_argument("--results_dir", default=None,
                     help="per-fold CSV/JSON (default <runs_dir>/results/<dataset>_<schedule>, the schedule's epochs "
                     "replaced by --max_epochs: one folder per budget)")
    run.add_argument("--publish", action="store_true",
                     help="file the results in docs/results/<dataset>_<schedule> (the committed tables)")
    run.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the config's choice)")
    run.add_argument("--num_workers", type=int, default=0)
    run.add_argument("--fold_major", action="store_true", help="loop folds outside variants (default: variants outside)")
    table = sub.add_parser("table", help="markdown table of mean +- SD over folds")
    table.add_argument("--results_dir", required=True)
    table.add_argument("--resolution", choices=RESOLUTIONS, default="paper")
    table.add_argument("--variants", nargs="+", default=None)
    table.add_argument("--folds", nargs="+", type=int, default=None, help="only these folds (default: every fold found)")
    table.add_argument("--per_fold", action="store_true", help="each fold's Dice, BF1 and HD95 instead of mean +- SD")
    transfer = sub.add_parser("transfer", help="cross-organ transfer rows (paper Figure 5): train on one fold's "
                              "organ, select on the next fold, test on the rest (skips what is done, resumes the rest)")
    transfer.add_argument("--rows", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training folds (organ groups)")
    transfer.add_argument("--variant", choices=sorted(VARIANTS), default="dshfn")
    transfer.add_argument("--schedule", default="configs/schedules/cpu_40ep.json")
    transfer.add_argument("--max_epochs", type=int, default=None, help="override the schedule's epochs (smoke runs)")
    transfer.add_argument("--dataset_dir", required=True, help="a dataset grouped by organ, e.g. ../shared/data/monuseg")
    transfer.add_argument("--runs_dir", default="runs/experiments",
                          help="checkpoints, logs, the fold split if none is committed for the dataset, and the results")
    transfer.add_argument("--results_dir", default=None,
                          help="per-image CSVs and summaries (default <runs_dir>/results/<dataset>_transfer_<schedule>)")
    transfer.add_argument("--publish", action="store_true",
                          help="file the results in docs/results/<dataset>_transfer_<schedule> (the committed tables)")
    transfer.add_argument("--device", default=None)
    transfer.add_argument("--num_workers", type=int, default=0)
    ttable = sub.add_parser("transfer-table", help="markdown matrix, rows = training organ, columns = tested organ")
    ttable.add_argument("--results_dir", required=True)
    ttable.add_argument("--variant", default="dshfn")
    ttable.add_argument("--metric", default="dice", help="a per-image CSV column: dice, bf1, hd95, aji, pq, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if getattr(args, "device", None):  # data, not code: validated here, before any run starts
        try:
            args.device = device_name(args.device)
        except ValueError as exc:
            parser.error(str(exc))

    if args.command == "table":
        if args.per_fold:
            print(per_fold_table(args.results_dir, args.variants, args.resolution, args.folds))
        else:
            print(summarise(args.results_dir, args.variants, args.resolution, args.folds))
        return 0
    if args.command == "transfer-table":
        print(transfer_table(args.results_dir, args.variant, args.metric))
        return 0
    if args.command == "transfer":
        check_run_args(args, args.rows, "--rows")
        dataset = os.path.basename(os.path.normpath(args.dataset_dir))
        results_dir = results_folder(args, f"{dataset}_transfer_{schedule_tag(args.schedule, args.max_epochs)}")
        runs_dir = os.path.join(args.runs_dir, f"{dataset}_transfer")
        split_file = split_file_for(args.dataset_dir, runs_dir, N_FOLDS)
        for row in args.rows:
            result = run_transfer_row(row, args.dataset_dir, runs_dir, results_dir, args.variant, args.max_epochs,
                                      device=args.device, num_workers=args.num_workers, overrides=[args.schedule],
                                      split_file=split_file)
            logging.info(f"{result}")
        print(f"\n## {dataset} cross-organ transfer, {args.variant}\n")
        print(transfer_table(results_dir, args.variant))
        return 0
    variants = [v for name in args.variants for v in (ABLATIONS if name == "ablations" else [name])]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)} or 'ablations'")
    check_run_args(args, args.folds, "--folds")
    dataset = os.path.basename(os.path.normpath(args.dataset_dir))
    results_dir = results_folder(args, f"{dataset}_{schedule_tag(args.schedule, args.max_epochs)}")
    runs_dir = os.path.join(args.runs_dir, dataset)
    split_file = split_file_for(args.dataset_dir, runs_dir, N_FOLDS)
    pairs = [(v, k) for k in args.folds for v in variants] if args.fold_major else \
        [(v, k) for v in variants for k in args.folds]
    for variant, fold in pairs:
        result = run_fold(variant, fold, args.dataset_dir, runs_dir, results_dir, args.max_epochs, device=args.device,
                          num_workers=args.num_workers, overrides=[args.schedule], split_file=split_file)
        logging.info(f"{result}")
    for resolution in RESOLUTIONS:
        print(f"\n## {dataset}, {resolution} resolution\n")
        print(summarise(results_dir, variants, resolution))
    return 0


if __name__ == "__main__":
    sys.exit(main())
