#!/usr/bin/env python
"""Tune the watershed parameters of ``configs/inference.json`` on validation tiles only.

    # the cross-organ transfer models (scripts/experiments.py transfer), each on its validation organ
    python scripts/tune_watershed.py --runs_dir runs/experiments/monuseg_transfer/dshfn --rows 0 1 2 3 4 \\
        --dataset_dir ../shared/data/monuseg --out docs/results/watershed_tuning.json

Row ``r``'s model (``<runs_dir>/train<r>/models/model.pt``) trained on one organ group and chose its checkpoint on
the next one; its maps on that validation group are the tuning items, so no tile is ever scored by a model that
trained on it, and no test column of the transfer heatmap is touched. The best setting (mean AJI over all items)
is printed as the ``watershed`` block to paste into ``configs/inference.json``; every setting tried is saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from bundle_path import ROOT

from bundle.core.files import write_text_atomic
from bundle.data.scale import DEFAULT_PIXEL_SIZE
from bundle.inference.chunks import SlidingWindowPredictor
from bundle.inference.engine import load_segmenter
from bundle.model.weights import load_weights
from bundle.nuclei.watershed import WatershedParams
from bundle.research.transfer import transfer_datalist
from bundle.research.tuning import (
    SIZE_GRID,
    THRESHOLD_GRID,
    native_items,
    scaled_grid,
    tune_in_stages,
    validation_items,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs_dir", required=True, help="folder with train<row>/models/model.pt")
    p.add_argument("--rows", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--dataset_dir", required=True, help="instance-labelled tiles (standard layout), e.g. MoNuSeg")
    p.add_argument("--split_file", default=None,
                   help="fold file (default: the bundle's configs/splits/<dataset folder name>_5fold_seed42.json)")
    p.add_argument("--config_file", nargs="+", default=[str(ROOT / "configs" / "inference.json")])
    p.add_argument("--pixel_size", type=float, default=DEFAULT_PIXEL_SIZE)
    p.add_argument("--metric", choices=["aji", "aji_plus", "pq"], default="aji")
    p.add_argument("--post_scale", choices=["model", "native"], default="model",
                   help="grid of the watershed: the model-scale maps (inference default) or the maps at tile size "
                        "(size parameters scaled by the resize factor)")
    p.add_argument("--out", default=None, help="JSON with every setting tried and the best one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    segmenter = load_segmenter(args.config_file, ckpt_path=None, device="cpu")
    split_file = args.split_file or ROOT / "configs" / "splits" / f"{Path(args.dataset_dir).resolve().name}_5fold_seed42.json"
    items, rows_used = [], []
    started = time.time()
    for row in args.rows:
        ckpt = Path(args.runs_dir) / f"train{row}" / "models" / "model.pt"
        if not ckpt.is_file():
            logging.warning(f"row {row}: no {ckpt} (not trained yet), left out")
            continue
        load_weights(segmenter.network, ckpt, "cpu")
        predictor = SlidingWindowPredictor(segmenter.network, device="cpu", inferer=segmenter.inferer)
        val = transfer_datalist(args.dataset_dir, row, "val", split_file)
        items += validation_items(predictor, val, segmenter.reference, args.pixel_size, segmenter.model_pixel_size)
        rows_used.append({"row": row, "checkpoint": str(ckpt), "val_ids": [d["id"] for d in val]})
        logging.info(f"row {row}: {len(val)} validation tiles")
    if not items:
        p.error(f"no trained row found under {args.runs_dir}; run scripts/experiments.py transfer first")
    base, grids = segmenter.watershed, (THRESHOLD_GRID, SIZE_GRID)
    if args.post_scale == "native":
        f = segmenter.model_pixel_size / args.pixel_size  # native pixels per model pixel
        items = native_items(items)
        base = WatershedParams.from_dict({**base.to_dict(), **{k: v[0] for k, v in scaled_grid(
            {k: [base.to_dict()[k]] for k in SIZE_GRID}, f).items()}})
        grids = (THRESHOLD_GRID, scaled_grid(SIZE_GRID, f))
    best, table = tune_in_stages(items, base, args.metric, grids)
    result = {"metric": args.metric, "rows": rows_used, "n_items": len(items), "post_scale": args.post_scale,
              "start": table[0], "best": {"params": best.to_dict(), "score": max(r["score"] for r in table)},
              "table": table, "seconds": round(time.time() - started, 1)}
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({"watershed": best.to_dict()}, indent=4))
    print(f"mean {args.metric} over {len(items)} validation tiles: {table[0]['score']:.4f} (config) -> "
          f"{result['best']['score']:.4f} (best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
