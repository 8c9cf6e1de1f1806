#!/usr/bin/env python
"""Reinhard colour-normalisation reference statistics (CIE L*a*b* means and stds) from a dataset's training images.

    python scripts/reinhard_stats.py --dataset_dir data/tnbc                                   # all CV images
    python scripts/reinhard_stats.py --dataset_dir data/tnbc --split_file configs/splits/tnbc_5fold_seed42.json --fold 0
    python scripts/reinhard_stats.py --dataset_dir data/tnbc --ids 01_1,01_2,02_1 --output ref.json

Prints ``{"means": [L, a, b], "stds": [L, a, b]}`` (paste it as the config's ``reinhard_reference``): the mean
over images of each image's all-pixel L*a*b* means and stds, see ``bundle.data.transforms.reinhard_reference``.
Images: ``--ids`` if given, else the training part of ``--fold`` of the grouped split (``bundle.data.layout``; the split
file is created if it does not exist yet), else (``--fold -1``, the default) every cross-validation image
(all rows of meta.csv except ``split == "test"``). Use a fold's training part for a clean protocol: the
reference then never sees that fold's validation or test images.
"""

from __future__ import annotations

import argparse
import json
import sys

import bundle_path  # noqa: F401  (the bundle root on sys.path)

from bundle.core.errors import DataError
from bundle.core.files import write_text_atomic
from bundle.data.io import read_image
from bundle.data.layout import get_datalist, validate_dataset
from bundle.data.transforms import reinhard_reference


def image_paths(args: argparse.Namespace) -> list[str]:
    """Absolute image paths chosen by ``--ids`` or by ``--fold`` / ``--split_file``."""
    if args.ids:
        wanted = [i for chunk in args.ids for i in chunk.split(",") if i]
        by_id = {it["id"]: it["image"] for it in validate_dataset(args.dataset_dir, check_sizes=False)}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataError(f"{args.dataset_dir}: ids not in meta.csv: {', '.join(missing)}. Check --ids")
        return [by_id[i] for i in wanted]
    items = get_datalist(args.dataset_dir, args.fold, "train", args.split_file, args.n_folds, args.seed)
    return [it["image"] for it in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset in the standard layout (images/, meta.csv)")
    parser.add_argument("--ids", nargs="+", help="image ids (space- or comma-separated); overrides --fold")
    parser.add_argument("--split_file", help="split JSON of bundle.data.layout (created if absent)")
    parser.add_argument("--fold", type=int, default=-1, help="use this fold's training part; -1 = all CV images")
    parser.add_argument("--n_folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", help="also write the JSON to this file (atomically)")
    args = parser.parse_args(argv)

    try:
        paths = image_paths(args)
        reference = reinhard_reference(read_image(p) for p in paths)
    except (DataError, ValueError) as exc:
        print(f"reinhard_stats: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(reference)
    print(f"reinhard_stats: {len(paths)} images of {args.dataset_dir}", file=sys.stderr)
    print(text)
    if args.output:
        write_text_atomic(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
