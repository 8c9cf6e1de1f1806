#!/usr/bin/env python
"""Benchmarks: this bundle's components side by side with their baselines, reported as ratios.

    python scripts/benchmark.py                    # every suite
    python scripts/benchmark.py --suite network    # DS-HFN vs MONAI BasicUNet
    python scripts/benchmark.py --suite metrics    # BF1/HD95 vs MONAI HausdorffDistanceMetric
    python scripts/benchmark.py --suite inference  # one 1000x1000 tile: read / normalise / network / post / write
    python scripts/benchmark.py --suite cost       # inference cost per mm^2 of tissue vs HoVerNet(fast) and BasicUNet
    python scripts/benchmark.py --suite stages     # the engine stage by stage: dense mm², 50 % glass slide; 1 and 2 threads
    python scripts/benchmark.py --device cuda --amp

Results print as markdown tables (paste into docs/benchmarks.md) and, with --json, are saved.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

import bundle_path  # noqa: F401  (the bundle root on sys.path)

from bundle.research.bench import format_table

SUITES = ["network", "metrics", "inference", "cost", "stages"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, action="append", help="suite(s) to run (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU) where a suite supports it")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (median is reported)")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--post_scale", choices=["model", "native"], default="model",
                        help="inference suite: watershed on the model-scale maps (default) or on native-size maps")
    parser.add_argument("--threads", type=int, nargs="+", help="stages suite: torch/OpenMP threads (default 1 2)")
    parser.add_argument("--stage_inputs", nargs="+", choices=["dense", "dense_slide", "glass50"],
                        help="stages suite: inputs (default all three)")
    parser.add_argument("--build_dir", help="stages suite: folder for the built inputs (default runs/bench_stages)")
    parser.add_argument("--overrides", help="stages suite: config ids as JSON, e.g. '{\"chunk\": 2048}'")
    parser.add_argument("--json", help="write all rows to this JSON file")
    args = parser.parse_args(argv)

    all_rows: dict[str, list[dict]] = {}
    for name in args.suite or SUITES:
        suite = importlib.import_module(f"bundle.research.bench.{name}")
        rows = suite.run(args)
        all_rows[name] = rows
        print(f"\n## {name} ({args.device}{', amp' if args.amp else ''})\n")
        print(format_table(rows))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(all_rows, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
