"""Figures of the cross-validation and transfer experiments: a thin command line over :mod:`bundle.research.figures`.

Needs matplotlib for curves, bars and the transfer heatmap (pip install -r requirements-figures.txt); qualitative
overlays need PIL only.

    python scripts/figures.py curves --results_dir docs/results/tnbc_cpu_40ep --variants dshfn basic_unet \\
        --out docs/figures/tnbc_cpu_40ep_curves.png
    python scripts/figures.py bars --results_dir docs/results/tnbc_cpu_40ep --variants dshfn basic_unet \\
        --out docs/figures/tnbc_cpu_40ep_bars.png
    # validation tiles (one per patient) of fold 0, predicted by that fold's trained run; written under runs/
    # (git-ignored): pictures of the data are never committed
    python scripts/figures.py qualitative --variant dshfn --fold 0 --run_dir runs/experiments/tnbc/dshfn/fold0 \\
        --dataset_dir ../shared/data/tnbc --out runs/figures/dshfn_fold0_val.png
    # the long run's loss, validation and learning-rate curves (the model card)
    python scripts/figures.py run-curve --curve docs/results/long_run/curve.csv --out docs/figures/long_run_curve.png
    python scripts/figures.py run-curve --curve docs/results/long_run/curve.csv --table  # its Markdown table
    # MoNuSeg cross-organ transfer matrix (paper Figure 5) from the committed per-image CSVs
    python scripts/figures.py transfer --results_dir docs/results/monuseg_transfer_cpu_40ep \\
        --out docs/figures/monuseg_transfer_heatmap.png
    # where touching nuclei merge (validation split, shipped weights): counts, and the 3 worst tiles' maps
    python scripts/figures.py separation --data_root ../shared/data --out docs/figures/separation_worst.png \\
        --json docs/results/separation/shipped.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bundle_path import ROOT

from bundle.core.files import write_text_atomic
from bundle.model.contract import value
from bundle.nuclei.watershed import WatershedParams
from bundle.research.experiments import RESOLUTIONS
from bundle.research.figures import (
    plot_curves,
    plot_metric_bars,
    plot_training_curve,
    plot_transfer_heatmap,
    prediction_panels,
    qualitative_grid,
    training_curve_table,
)
from bundle.research.launch import VARIANTS
from bundle.research.separation import diagnose_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("curves", "bars"):
        p = sub.add_parser(name)
        p.add_argument("--results_dir", required=True)
        p.add_argument("--variants", nargs="+", default=["dshfn", "basic_unet"])
        p.add_argument("--out", required=True)
        if name == "bars":
            p.add_argument("--resolution", choices=RESOLUTIONS, default="paper")
    q = sub.add_parser("qualitative")
    q.add_argument("--variant", choices=sorted(VARIANTS), default="dshfn")
    q.add_argument("--fold", type=int, default=0)
    q.add_argument("--run_dir", required=True, help="the fold's run folder (holds models/model.pt)")
    q.add_argument("--dataset_dir", required=True)
    q.add_argument("--part", choices=("train", "val", "test"), default="val")
    q.add_argument("--max_panels", type=int, default=8)
    q.add_argument("--out", required=True)
    t = sub.add_parser("transfer", help="cross-organ transfer heatmap (rows = training organ, columns = tested organ)")
    t.add_argument("--results_dir", required=True)
    t.add_argument("--variant", default="dshfn")
    t.add_argument("--metric", default="dice", help="a per-image CSV column: dice, bf1, hd95, aji, pq, ...")
    t.add_argument("--out", required=True)
    r = sub.add_parser("run-curve", help="one training run's curve.csv: loss terms, validation Dice/BF1, lr")
    r.add_argument("--curve", required=True, help="<output_dir>/curve.csv of a training run")
    r.add_argument("--out", help="the PNG to write")
    r.add_argument("--table", action="store_true", help="print the card's Markdown table of the curve instead")
    s = sub.add_parser("separation", help="where touching nuclei merge, on the validation split: touching pairs "
                       "merged with or without a boundary between them, and the worst tiles drawn")
    s.add_argument("--weights", default=str(ROOT / "models" / "model.pt"))
    s.add_argument("--data_root", required=True, help="folder holding tnbc/, monuseg/, consep/")
    s.add_argument("--config_file", nargs="+", default=[str(ROOT / "configs" / "train.json")],
                   help="training config(s) of the weights")
    s.add_argument("--instance_head", help="override the config's instance_head (the weights' head)")
    s.add_argument("--out", required=True, help="the PNG of the worst tiles")
    s.add_argument("--json", help="write the per-tile and summed counts here")
    s.add_argument("--boundary_threshold", type=float, default=None,
                   help="the watershed's boundary threshold (default: configs/inference.json's)")
    s.add_argument("--data_pixels", action="store_true",
                   help="also draw the H&E image and true contours (for a local look: never commit such a figure)")
    args = parser.parse_args(argv)

    if args.command == "separation":
        overrides = {"data_root": str(Path(args.data_root).resolve())}
        if args.instance_head:
            overrides["instance_head"] = args.instance_head
        watershed = value("watershed")
        if args.boundary_threshold is not None:
            watershed["boundary_threshold"] = args.boundary_threshold
        res = diagnose_weights(args.config_file, overrides, args.weights, WatershedParams.from_dict(watershed), args.out,
                               data_pixels=args.data_pixels)
        if args.json:
            write_text_atomic(args.json, json.dumps(res, indent=2) + "\n")
        print(json.dumps({k: res[k] for k in ("overall", "per_dataset", "threshold_sweep", "worst")}, indent=2))
        out = Path(args.out)
    elif args.command == "transfer":
        out = plot_transfer_heatmap(args.results_dir, args.out, args.variant, args.metric)
    elif args.command == "run-curve":
        if args.table:
            print(training_curve_table(args.curve), end="")
            return 0
        if not args.out:
            parser.error("run-curve needs --out (or --table)")
        out = plot_training_curve(args.curve, args.out)
    elif args.command == "curves":
        out = plot_curves(args.results_dir, args.variants, args.out)
    elif args.command == "bars":
        out = plot_metric_bars(args.results_dir, args.variants, args.out, args.resolution)
    else:
        panels = prediction_panels(args.variant, args.fold, args.run_dir, args.dataset_dir, args.part,
                                   max_panels=args.max_panels)
        out = qualitative_grid(panels, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
