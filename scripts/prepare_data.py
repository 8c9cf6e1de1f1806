#!/usr/bin/env python
"""Convert an original public release into the bundle's standard dataset layout.

    python scripts/prepare_data.py tnbc    --src TNBC_NucleiSegmentation --dst data/tnbc
    python scripts/prepare_data.py monuseg --src MoNuSegTrainingData     --dst data/monuseg

tnbc     Naylor et al. 2019 (Zenodo record 1175282, TNBC_NucleiSegmentation.zip). --src is the unzipped folder
         holding Slide_01..Slide_11/<XX>_<k>.png (RGB or RGBA) and GT_01..GT_11/<XX>_<k>.png (0/255 masks).
         Writes images/<id>.png (RGB), masks/<id>.png (0/255 uint8), meta.csv (group = patient XX, split = all).
monuseg  MoNuSeg 2018 (Kumar et al.). --src holds 'Tissue Images/TCGA-*.tif' and 'Annotations/TCGA-*.xml'
         (training release) or .tif and .xml side by side (test release). Each Aperio ImageScope XML region is
         rasterised like MATLAB poly2mask: skimage.draw.polygon(Y-1, X-1), later regions overwrite earlier
         ones, regions with <3 vertices or no pixels dropped. Writes images/<id>.png (RGB), labels/<id>.png
         (uint16 instance map 1..N), meta.csv (group = organ, split = train/test for the official ids).

Files are written atomically; a non-empty --dst is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import logging
import sys

import bundle_path  # noqa: F401  (the bundle root on sys.path)

from bundle.core.errors import DataError
from bundle.data.layout import validate_dataset
from bundle.data.prepare import convert_monuseg, convert_tnbc

CONVERTERS = {"tnbc": convert_tnbc, "monuseg": convert_monuseg}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{tnbc,monuseg}")
    helps = {
        "tnbc": "TNBC release (Slide_XX/ + GT_XX/) -> images/, masks/, meta.csv",
        "monuseg": "MoNuSeg 2018 release (Tissue Images/ + Annotations/ XML) -> images/, labels/, meta.csv",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--src", required=True, help="unzipped original release folder")
        p.add_argument("--dst", required=True, help="output folder (standard layout)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        dst = CONVERTERS[args.dataset](args.src, args.dst, overwrite=args.overwrite)
        items = validate_dataset(dst)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = sorted({it["group"] for it in items})
    print(f"wrote {len(items)} images in {len(groups)} groups to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
