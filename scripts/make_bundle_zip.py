#!/usr/bin/env python
"""Package this bundle as a zip for ``monai.bundle.download(url=...)`` and ``monai.bundle.load``.

    python scripts/make_bundle_zip.py --out dist/dshfn_nuclei_segmentation.zip

Then, in any project:

    monai.bundle.download(url="file:///path/to/dshfn_nuclei_segmentation.zip", bundle_dir="bundles")
    net = monai.bundle.load("dshfn_nuclei_segmentation", bundle_dir="bundles", source="github")
"""

from __future__ import annotations

import argparse
import os
import sys

import bundle_path  # noqa: F401  (the bundle root on sys.path)

from bundle.packaging import BUNDLE_NAME, build_bundle_zip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--root", default=root, help="bundle root (default: this checkout)")
    p.add_argument("--name", default=BUNDLE_NAME, help="bundle folder name inside the zip")
    p.add_argument("--out", default=os.path.join(root, "dist", f"{BUNDLE_NAME}.zip"),
                   help="zip to write, or a folder to write <name>.zip into")
    args = p.parse_args(argv)
    try:
        build_bundle_zip(args.root, args.out, args.name)
    except OSError as exc:  # not a bundle root, a folder that cannot be written: one line, not a traceback
        why = f"{args.out}: cannot be written ({exc.strerror}). Give a writable file or folder" if exc.strerror else exc
        print(f"error: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
