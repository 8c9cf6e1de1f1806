#!/usr/bin/env python
"""Recipe probes on the multi-dataset validation split (configs/recipe/): train each probe for the same CPU-time
budget, then score it on the validation tiles with its own tuned watershed (bundle.research.recipe).

    # two probes at a time, one thread each (resumable: finished probes are skipped)
    OMP_NUM_THREADS=1 python scripts/recipe.py run --probes baseline scale_025 --data_root ../shared/data
    python scripts/recipe.py table --results_dir docs/results/recipe
    # weights (e.g. the shipped ones) on the validation split, with the watershed users get
    python scripts/recipe.py score --weights models/model.pt --data_root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bundle_path import ROOT

from bundle.model.contract import value
from bundle.nuclei.watershed import WatershedParams
from bundle.research.recipe import (
    PROBE_CONFIGS,
    evaluate_run,
    load_probes,
    loader_throughput,
    per_dataset_table,
    recipe_table,
    run_probe,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score probes")
    r.add_argument("--probes", nargs="+", required=True, help="probe names of --probe_file")
    r.add_argument("--probe_file", default=str(ROOT / "configs" / "recipe" / "probes.json"))
    r.add_argument("--data_root", required=True, help="folder holding tnbc/, monuseg/, consep/")
    r.add_argument("--budget_minutes", type=float, default=15.0, help="CPU minutes of training per probe")
    r.add_argument("--runs_dir", default=str(ROOT / "runs" / "recipe"))
    r.add_argument("--results_dir", default=str(ROOT / "docs" / "results" / "recipe"))
    q = sub.add_parser("throughput", help="data loading vs network step per training batch, for one probe")
    q.add_argument("--probe", required=True)
    q.add_argument("--probe_file", default=str(ROOT / "configs" / "recipe" / "probes.json"))
    q.add_argument("--data_root", required=True)
    q.add_argument("--batches", type=int, default=20)
    t = sub.add_parser("table", help="markdown table of the scored probes")
    t.add_argument("--results_dir", default=str(ROOT / "docs" / "results" / "recipe"))
    t.add_argument("--probe_file", default=str(ROOT / "configs" / "recipe" / "probes.json"))
    t.add_argument("--per_dataset", nargs="*", metavar="SCORES", default=None,
                   help="AJI / PQ / Dice per instance-labelled dataset instead, for --results_dir and these extra "
                   "score files (scripts/recipe.py score --out)")
    e = sub.add_parser("score", help="score weights on the validation split (AJI, PQ, Dice, BF1, HD95 at native size)")
    e.add_argument("--weights", required=True, help="model.pt (state dict) or a training checkpoint.pt")
    e.add_argument("--data_root", required=True, help="folder holding tnbc/, monuseg/, consep/")
    e.add_argument("--config_file", nargs="+", default=[str(ROOT / "configs" / "train.json")],
                   help="training config(s) of the weights (network, scale, input, validation split)")
    e.add_argument("--watershed", choices=["inference", "tune"], default="inference",
                   help="the watershed of configs/inference.json (what users get) or one tuned on these tiles")
    e.add_argument("--out", help="JSON with the means, the watershed and every tile's row")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "table" and args.per_dataset is not None:
        print(per_dataset_table([args.results_dir, *args.per_dataset]))
        return 0
    if args.cmd == "table":
        print(recipe_table(args.results_dir, json.loads(Path(args.probe_file).read_text()).get("_baseline")))
        return 0
    if args.cmd == "score":
        watershed = None
        if args.watershed == "inference":
            watershed = WatershedParams.from_dict(value("watershed"))
        res = evaluate_run(args.config_file, {"data_root": str(Path(args.data_root).resolve())}, args.weights,
                           args.out, watershed)
        print(json.dumps({k: res[k] for k in ("watershed", "tuning", "overall", "instance_sets", "per_dataset")}, indent=2))
        return 0
    probes = load_probes(args.probe_file)
    if args.cmd == "throughput":
        spec = dict(probes[args.probe])
        files = [str(ROOT / f) for f in (*PROBE_CONFIGS, *spec.pop("configs", []))]
        print(json.dumps(loader_throughput(files, {**spec, "data_root": str(Path(args.data_root).resolve()),
                                                   "output_dir": str(ROOT / "runs" / "throughput")}, args.batches)))
        return 0
    unknown = [n for n in args.probes if n not in probes]
    if unknown:
        p.error(f"unknown probe(s) {unknown}; {args.probe_file} has {sorted(probes)}")
    for name in args.probes:
        res = run_probe(name, probes[name], args.data_root, args.runs_dir, args.results_dir, args.budget_minutes)
        logging.info("%s: %s", name, json.dumps(res["instance_sets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
