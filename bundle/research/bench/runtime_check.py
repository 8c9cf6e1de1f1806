"""The ONNX Runtime option against the torch path on a folder of tiles: max abs difference of the region and
boundary maps and the nuclei counts per tile (the engine with ``formats`` nifti + csv, both runtimes).

    python -m bundle.research.bench.runtime_check --tiles DIR --out runs/onnx_check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bundle import bundle_root
from bundle.inference.engine import load_segmenter


def compare(tiles: str, out: str, threads: int | None = None) -> dict:
    import nibabel as nib
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    config = str(Path(bundle_root()) / "configs" / "inference.json")
    runs = {}
    for name, onnx in (("torch", False), ("onnx", True)):
        seg = load_segmenter(config, device="cpu", progress=False, skip_existing=False, onnx_runtime=onnx,
                             formats=["csv", "nifti"])
        seg.run(tiles, out / name)
        runs[name] = out / name
    rows, worst = [], 0.0
    for summary in sorted(runs["torch"].glob("*_summary.json")):
        if summary.name == "segment_summary.json":
            continue
        stem = summary.name[: -len("_summary.json")]
        a = np.asarray(nib.load(runs["torch"] / f"{stem}_pred.nii.gz").dataobj)
        b = np.asarray(nib.load(runs["onnx"] / f"{stem}_pred.nii.gz").dataobj)
        n_a = json.loads(summary.read_text())["nuclei"]
        n_b = json.loads((runs["onnx"] / summary.name).read_text())["nuclei"]
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff)
        rows.append({"tile": stem, "max_abs_diff": diff, "nuclei_torch": n_a, "nuclei_onnx": n_b,
                     "count_diff_pct": 100.0 * abs(n_b - n_a) / max(n_a, 1)})
    total_a, total_b = sum(r["nuclei_torch"] for r in rows), sum(r["nuclei_onnx"] for r in rows)
    return {"tiles": rows, "max_abs_diff": worst, "nuclei_torch": total_a, "nuclei_onnx": total_b,
            "worst_tile_count_diff_pct": max(r["count_diff_pct"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", default="runs/onnx_check")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    print(json.dumps(compare(args.tiles, args.out, args.threads), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
