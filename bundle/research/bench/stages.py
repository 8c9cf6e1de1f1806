"""Stage profile of the inference engine on one dense mm² of 40x tissue and on a slide-like image with half glass.

    python scripts/benchmark.py --suite stages                     # 1 and 2 threads, dense mm² and 50 % glass
    python -m bundle.research.bench.stages --build runs/throughput  # only (re)build the inputs
    python -m bundle.research.bench.stages --compare before.json after.json   # before/after tables

Each run is a fresh process with ``OMP_NUM_THREADS`` set, running ``configs/inference.json``'s engine
(:func:`profile_run`) under a :class:`bundle.inference.timing.StageTimer`; the weights load before the timed run.
Stages: ``read`` (decode / region reads), ``colour statistics``, ``glass test`` (slides), ``reinhard``,
``resample`` (to model scale and standardisation), ``network`` (the forward passes only), ``blending`` (MONAI's
inferer around them: windows, Gaussian weights, accumulation, and the window cache's lookups), ``maps to native``,
``watershed`` (instances and block ownership), ``measurements``, ``label map``, ``geojson``, ``csv``, ``png``,
``overlay`` (drawing) / ``overlay png`` (encoding). ``--overrides '{"prefetch": false}'`` keeps every stage on the
main thread, so their times add up to the run; with ``prefetch`` on they overlap and are marked as background.

Inputs (built deterministically from ``../shared/data``, never committed; :func:`build_inputs`):

* ``dense_mm2.png``: 4000 x 4000 px at 0.25 um/px = 1 mm², a 4 x 4 mosaic of the first 16 MoNuSeg tiles (sorted
  by name; 1000 x 1000 40x H&E each), what ``configs/inference.json`` gets as a (large) tile;
* ``dense_mm2.tif``: the same pixels as a 2-level pyramidal TIFF (slide mode: tissue statistics, GeoJSON + CSV);
* ``glass50.tif``: the same 16 tiles spread over twice the area (4000 x 8000, 2-level pyramidal TIFF): tissue in
  the left half, near-white glass (240 +- 3, seeded) in the right half.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bundle import bundle_root
from bundle.core.files import atomic_write, write_png_atomic
from bundle.data.io import read_image
from bundle.inference.engine import load_segmenter
from bundle.inference.pipeline import peak_rss_mib
from bundle.inference.timing import StageTimer

ROOT = Path(bundle_root())
TILE = 1000
GRID = 4


def shared_data() -> Path:
    return Path(os.environ.get("DSHFN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def dense_mosaic(data: Path | None = None) -> np.ndarray:
    """(4000, 4000, 3) uint8: the first 16 MoNuSeg tiles (sorted by name) in row-major order."""
    images = sorted((Path(data or shared_data()) / "monuseg" / "images").glob("*.png"))[: GRID * GRID]
    if len(images) < GRID * GRID:
        raise FileNotFoundError(f"need {GRID * GRID} MoNuSeg tiles under {data or shared_data()}/monuseg/images")
    out = np.empty((GRID * TILE, GRID * TILE, 3), np.uint8)
    for k, path in enumerate(images):
        y, x = divmod(k, GRID)
        out[y * TILE : (y + 1) * TILE, x * TILE : (x + 1) * TILE] = read_image(path)[:TILE, :TILE]
    return out


def glass_slide(dense: np.ndarray, seed: int = 0) -> np.ndarray:
    """The dense mosaic on the left half of an image twice as wide, near-white glass on the right half."""
    h, w = dense.shape[:2]
    out = np.empty((h, 2 * w, 3), np.uint8)
    out[:, :w] = dense
    rng = np.random.default_rng(seed)
    out[:, w:] = np.clip(240 + rng.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    return out


def write_pyramid(path: Path, rgb: np.ndarray, tile: int = 512, pixel_size: float = 0.25) -> Path:
    """A 2-level pyramidal tiled TIFF (zlib; level 1 = 2x downsample) with its resolution tag, written atomically."""
    import tifffile

    def write(tmp: str) -> None:
        res = (1e4 / pixel_size, 1e4 / pixel_size)
        with tifffile.TiffWriter(tmp) as tif:
            tif.write(rgb, tile=(tile, tile), compression="zlib", photometric="rgb", subifds=1,
                      resolution=res, resolutionunit="CENTIMETER")
            tif.write(rgb[::2, ::2], tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1,
                      resolution=(res[0] / 2, res[1] / 2), resolutionunit="CENTIMETER")

    atomic_write(path, write)
    return path


def build_inputs(out_dir: str | os.PathLike, data: Path | None = None) -> dict[str, Path]:
    """Build (or reuse) the benchmark inputs in ``out_dir`` (module docstring), each in its own folder so that
    ``--input_dir`` can name it; returns ``{name: path}``."""
    out = Path(out_dir)
    paths = {"dense_png": out / "dense_png" / "dense_mm2.png", "dense_tif": out / "dense_tif" / "dense_mm2.tif",
             "glass50": out / "glass50" / "glass50.tif"}
    if all(p.is_file() for p in paths.values()):
        return paths
    dense = dense_mosaic(data)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(paths["dense_png"], dense)
    write_pyramid(paths["dense_tif"], dense)
    write_pyramid(paths["glass50"], glass_slide(dense))
    return paths


#: what each input is run as: (folder name under the build folder, what the table calls it)
INPUTS = {"dense": ("dense_png", "dense mm² (4000² PNG, tile outputs)"),
          "dense_slide": ("dense_tif", "dense mm² as a slide (GeoJSON + CSV)"),
          "glass50": ("glass50", "50 % glass slide (4000 x 8000, GeoJSON + CSV)")}


def profile_run(input_dir: str | os.PathLike, output_dir: str | os.PathLike, threads: int | None = None,
                config: str | os.PathLike | None = None, **overrides: Any) -> dict:
    """Run ``configs/inference.json``'s engine on ``input_dir`` in this process with a :class:`StageTimer`;
    returns ``{"stages": rows, "wall_s", "peak_rss_mib", "nuclei", "threads"}``."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    segmenter = load_segmenter(str(config or ROOT / "configs" / "inference.json"), device="cpu", progress=False,
                               skip_existing=False, **overrides)
    segmenter.predictor()  # weights loaded outside the timed run, as for every image after the first
    t0 = time.perf_counter()
    with StageTimer() as timer:
        result = segmenter.run(input_dir, output_dir)
    wall = time.perf_counter() - t0
    return {"stages": timer.table(), "wall_s": wall, "peak_rss_mib": peak_rss_mib(), "nuclei": result["nuclei"],
            "threads": torch.get_num_threads()}


def _fresh_process(input_dir: Path, output_dir: Path, threads: int, overrides: dict) -> dict:
    """:func:`profile_run` in a new process with ``OMP_NUM_THREADS=threads`` (torch's pool is sized at start)."""
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
        out = Path(tmp) / "profile.json"
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bundle.research.bench.stages import profile_run;"
                "r = profile_run(sys.argv[2], sys.argv[3], int(sys.argv[4]), **json.loads(sys.argv[6]));"
                "open(sys.argv[5], 'w').write(json.dumps(r))")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", code, str(ROOT), str(input_dir), str(output_dir), str(threads), str(out),
                        json.dumps(overrides)], check=True, env=env, cwd=ROOT)
        return json.loads(out.read_text())


#: stage groups of the table, in pipeline order (stages not listed are appended)
ORDER = ["read", "colour statistics", "glass test", "reinhard", "resample", "network", "blending", "maps to native",
         "watershed", "measurements", "label map", "geojson", "csv", "png", "tiff", "overlay", "maps"]


def stage_rows(profile: dict, label: str) -> list[dict]:
    """The table rows of one profile: every stage (wall, CPU, x network) and the summary rows."""
    stages = {r["stage"]: r for r in profile["stages"]}
    net = stages.get("network", {"wall_s": float("nan")})["wall_s"]
    names = [k for k in ORDER if k in stages] + [k for k in stages if k not in ORDER]
    rows = [{"input": label, "threads": profile["threads"], "stage": k + (" (background thread)" if stages[k]["thread"] == "background" else ""),
             "wall_s": stages[k]["wall_s"], "cpu_s": stages[k]["cpu_s"], "x_network": stages[k]["wall_s"] / net}
            for k in names]
    rest = sum(stages[k]["wall_s"] for k in names if k != "network")  # work, whichever thread did it
    if not any(stages[k]["thread"] == "background" for k in names):
        other = profile["wall_s"] - rest - net  # run set-up, summaries, the generator itself
        rows.append({"input": label, "threads": profile["threads"], "stage": "(untimed: run files, glue)",
                     "wall_s": other, "cpu_s": float("nan"), "x_network": other / net})
    rows += [
        {"input": label, "threads": profile["threads"], "stage": "**non-network / network**", "wall_s": rest,
         "cpu_s": float("nan"), "x_network": rest / net},
        {"input": label, "threads": profile["threads"], "stage": "**run wall (network share)**", "wall_s": profile["wall_s"],
         "cpu_s": float("nan"), "x_network": f"share {net / profile['wall_s']:.2f}; {profile['nuclei']} nuclei; "
                                             f"peak RSS {profile['peak_rss_mib']:.0f} MiB"},
    ]
    return rows


def run(args: Any) -> list[dict]:
    """``scripts/benchmark.py --suite stages``: every input of ``--stage_inputs`` at every ``--threads``, each in a
    fresh process. ``--quick``: a 1024 x 1024 crop of the mosaic, one thread (a smoke run)."""
    build = Path(getattr(args, "build_dir", None) or ROOT / "runs" / "bench_stages")
    threads = getattr(args, "threads", None) or [1, 2]
    names = getattr(args, "stage_inputs", None) or list(INPUTS)
    overrides = json.loads(getattr(args, "overrides", None) or "{}")
    if getattr(args, "quick", False):

        quick = build / "quick"
        quick.mkdir(parents=True, exist_ok=True)
        if not (quick / "quick.png").is_file():
            write_png_atomic(quick / "quick.png", dense_mosaic()[:1024, :1024])
        inputs = {"quick": (quick, "1024² crop of the mosaic")}
        threads = [1]
    else:
        paths = build_inputs(build)
        inputs = {k: (paths[INPUTS[k][0]].parent, INPUTS[k][1]) for k in names}
    rows = []
    for n in threads:
        for key, (folder, label) in inputs.items():
            with tempfile.TemporaryDirectory(prefix="bench_stages_out_") as out:
                profile = _fresh_process(folder, Path(out), int(n), overrides)
            rows += stage_rows(profile, label)
    return rows


def compare_tables(before: list[dict], after: list[dict]) -> str:
    """Markdown: per input and thread count, each stage's wall seconds and multiple of the network before and
    after (the ``--json`` rows of two ``--suite stages`` runs)."""
    def fmt(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    out = []
    groups = dict.fromkeys((r["input"], r["threads"]) for r in after)
    for label, threads in groups:
        b = {r["stage"].replace(" (background thread)", ""): r for r in before if (r["input"], r["threads"]) == (label, threads)}
        a = {r["stage"].replace(" (background thread)", ""): r for r in after if (r["input"], r["threads"]) == (label, threads)}
        out += [f"\n**{label}, {threads} thread{'s' if threads > 1 else ''}**\n",
                "| stage | before s | before x net | after s | after x net |", "|---|---|---|---|---|"]
        for k in list(dict.fromkeys([*b, *a])):
            rb, ra = b.get(k, {}), a.get(k, {})
            xb, xa = rb.get("x_network"), ra.get("x_network")
            out.append(f"| {k} | {fmt(rb.get('wall_s'))} | {fmt(xb)} | {fmt(ra.get('wall_s'))} | {fmt(xa)} |")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="runs/throughput", help="folder for the inputs")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                   help="print before/after tables from two `scripts/benchmark.py --suite stages --json` files")
    args = p.parse_args()
    if args.compare:
        rows = [json.loads(Path(f).read_text())["stages"] for f in args.compare]
        print(compare_tables(*rows))
    else:
        for k, v in build_inputs(args.build).items():
            print(k, v, v.stat().st_size)
