"""Inference cost of one 1000x1000 tile split into stages, and peak memory of large images.

    python scripts/benchmark.py --suite inference             # stage times on this machine's CPU
    python scripts/benchmark.py --suite inference --device cuda --amp
    python -m bundle.research.bench.inference --memory 4000 8000       # peak RSS of scripts/segment.py on big tiles
    python -m bundle.research.bench.inference --network                # DS-HFN's share: one chunk's sliding window

Stages (the functions the chunked engine, :mod:`bundle.inference`, runs; each the best of ``--repeat`` runs,
since on a shared machine other processes only ever add time):

* ``read``: :func:`bundle.data.io.read_image` of the PNG tile;
* ``normalisation``: whole-image statistics + Reinhard + BT.601 grayscale (:func:`bundle.inference.colour.reinhard_gray`,
  float32 L*a*b*) + anti-aliased bicubic resize to model scale + standardisation; the row
  ``normalisation (skimage)`` is the same with the per-tile config's ``bundle.data.transforms`` (skimage L*a*b*) +
  ``ToModelScaled``, for comparison;
* ``network``: DS-HFN (config width, random weights: the cost does not depend on them) through MONAI's
  ``SlidingWindowInferer`` (256 px windows, overlap 0.25, batch 8), at model scale (1000 px at 0.25 um/px ->
  500 px);
* ``post-processing``: the engine's :func:`bundle.inference.blocks.segment_blocks` (maps back to the tile's size, bilinear;
  marker watershed :func:`bundle.nuclei.watershed.instances_from_maps` on the model-scale maps, labels resized to the
  tile, or on the native maps with ``--post_scale native``), then the nucleus table, GeoJSON polygons and
  overlay in memory;
* ``writing``: uint16 label PNG, GeoJSON, CSV and overlay PNG, atomically.

Post-processing runs on maps made from the tile's ground-truth labels (region = label > 0, boundary = inner
contour), so it sees the tile's real nucleus count; a random network's maps would not. Reported: each stage in
seconds and as a fraction of the network, and the target ratio (everything but the network) / network <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bundle import bundle_root
from bundle.core.files import write_png_atomic, write_text_atomic
from bundle.data.io import read_image, read_label
from bundle.data.scale import ToModelScaled
from bundle.data.transforms import Grayscale, ReinhardNormalize
from bundle.inference.blocks import segment_blocks
from bundle.inference.chunks import (
    ChunkMaps,
    SlidingWindowPredictor,
    chunk_grid,
    model_size,
    to_model_scale,
)
from bundle.inference.colour import image_statistics, reinhard_gray
from bundle.inference.engine import load_segmenter
from bundle.inference.sources import ArraySource
from bundle.model.contract import value
from bundle.model.network import DSHFN
from bundle.nuclei.exports import (
    instance_overlay,
    instances_geojson,
    nucleus_table,
    table_csv,
    write_instance_map,
)
from bundle.nuclei.watershed import WatershedParams
from bundle.research.bench import sync, time_call
from bundle.research.tuning import scaled_grid

ROOT = Path(bundle_root())
REFERENCE = value("reinhard_reference")  # the shipped weights' (configs/model.json)


class IntensityNet(nn.Module):
    """Stand-in for DS-HFN with its eval output contract (N, 3, H, W): region = sigmoid(-4 (x + 0.5)) (dark =
    nucleus, x is the standardised grayscale), boundary = 0, refined = region. Costs next to nothing, so memory
    and time measured with it are the engine's own (used by ``--memory``; see docs/inference.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = torch.sigmoid(-4.0 * (x + 0.5))
        return torch.cat([region, torch.zeros_like(region), region], dim=1)


def _monuseg_tile() -> tuple[Path, Path] | None:
    data = Path(os.environ.get("DSHFN_SHARED_DATA", ROOT.parent / "shared" / "data")) / "monuseg"
    images = sorted((data / "images").glob("*.png"))
    return (images[0], data / "labels" / images[0].name) if images else None


def _synthetic_tile(path: Path, size: int = 1000) -> tuple[Path, np.ndarray]:
    """Dark disks on a pink background (used when the MoNuSeg data is absent)."""
    from PIL import Image
    from skimage.draw import disk

    rng = np.random.default_rng(0)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = (225, 190, 215)
    label = np.zeros((size, size), np.int32)
    for i, (y, x) in enumerate(rng.integers(10, size - 10, (600, 2)), start=1):
        label[disk((y, x), rng.integers(5, 10), shape=label.shape)] = i
    rgb[label > 0] = (90, 40, 130)
    Image.fromarray(rgb).save(path)
    return path, label


def _config_watershed(post_scale: str, factor: float):
    """``configs/inference.json``'s watershed parameters, scaled to native-size maps for ``post_scale="native"``."""
    params = load_segmenter(str(ROOT / "configs" / "inference.json"), ckpt_path=None).watershed
    if post_scale == "native":
        values = params.to_dict()
        scaled = scaled_grid({k: (values[k],) for k in ("min_size", "min_marker_size", "smooth_sigma", "marker_radius",
                                                         "peak_min_distance")}, factor)
        params = WatershedParams.from_dict({**values, **{k: v[0] for k, v in scaled.items()}})
    return params


def run(args: Any) -> list[dict]:
    from skimage.segmentation import find_boundaries

    device = torch.device(getattr(args, "device", "cpu"))
    repeat = max(1, int(getattr(args, "repeat", 3)))
    quick = bool(getattr(args, "quick", False))
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    found = _monuseg_tile()
    if found:
        path, label = found[0], read_label(found[1])
    else:
        path, label = _synthetic_tile(tmp / "tile.png")
    times: dict[str, float] = {}

    def timed(name: str, fn) -> Any:
        times[name] = time_call(fn, device if name == "network" else "cpu", warmup=1, repeat=repeat)
        return fn()

    rgb = timed("read", lambda: read_image(path))
    h, w = rgb.shape[:2]
    hm, wm = model_size(h, 0.5), model_size(w, 0.5)

    def normalise() -> np.ndarray:  # what predict_chunks does for a tile that is one chunk
        stats = image_statistics(ArraySource(rgb), REFERENCE)
        gray = stats.gray if stats.gray is not None else reinhard_gray(rgb, stats.lab_mean, stats.lab_std, REFERENCE)
        x = to_model_scale(gray, (0, h), (0, w), (0, hm), (0, wm), (h, w), (hm, wm))
        return ((np.clip(x / 255.0, 0, 1) - stats.input_mean[0]) / stats.input_std[0]).astype(np.float32)

    x = timed("normalisation", normalise)
    reinhard, grayscale, resize = ReinhardNormalize(**REFERENCE), Grayscale(), ToModelScaled("image", 0.25)

    def normalise_skimage() -> torch.Tensor:
        g = grayscale(torch.from_numpy(reinhard(np.moveaxis(rgb, -1, 0).astype(np.float32))))
        g = resize({"image": g})["image"].clamp(0, 255) / 255.0
        return (g - g.mean()) / g.std()

    timed("normalisation (skimage)", normalise_skimage)

    network = DSHFN(features=4, levels=2) if quick else DSHFN()
    predictor = SlidingWindowPredictor(network, 256, 8, 0.25, device, amp=bool(getattr(args, "amp", False)))
    timed("network", lambda: predictor(x))

    region = (label > 0).astype(np.float32)
    boundary = find_boundaries(label, mode="inner").astype(np.float32)
    # the maps come back at model scale: downsample the label maps, as the network would see them
    down = [to_model_scale(m, (0, h), (0, w), (0, hm), (0, wm), (h, w), (hm, wm)).clip(0, 1) for m in (region, boundary)]
    (gy,), (gx,) = chunk_grid(h, hm, hm, 64, 256, 192), chunk_grid(w, wm, wm, 64, 256, 192)
    maps = ChunkMaps(gy, gx, down[0], down[1], rgb)
    post_scale = getattr(args, "post_scale", "model")
    # the shipped config's watershed (tuned at model scale); sizes x factor^2 / x factor on native-size maps
    params = _config_watershed(post_scale, h / hm)

    def postprocess() -> dict:  # the engine's blocks (one for a 1000 x 1000 tile), then what TileOutputs builds
        (block,) = segment_blocks(maps, (h, w), (hm, wm), params, post_chunk=max(h, w), post_scale=post_scale)
        table = nucleus_table(block.rgb, block.instances, block.region, block.boundary)
        geo = instances_geojson(block.instances, block.region, block.rgb, block.boundary, tile_id="bench", table=table)
        return {"inst": block.instances, "table": table, "geo": geo, "overlay": instance_overlay(rgb, block.instances)}

    out = timed("post-processing", postprocess)

    def write() -> None:
        write_instance_map(tmp / "t_instances.png", out["inst"])
        write_text_atomic(tmp / "t.geojson", json.dumps(out["geo"], separators=(",", ":")))
        write_text_atomic(tmp / "t_nuclei.csv", table_csv(dict(out["table"])))
        write_png_atomic(tmp / "t_overlay.png", out["overlay"])

    timed("writing", write)
    sync(device)
    net = times["network"]
    rest = sum(times[k] for k in ("read", "normalisation", "post-processing", "writing"))
    tile = f"{path.name} {h}x{w}, {int(out['inst'].max())} nuclei"
    rows = [{"stage": k, "seconds": v, "x_network": v / net, "tile": tile} for k, v in times.items()]
    rows.append({"stage": "all but network (target <= 0.5 x network)", "seconds": rest, "x_network": rest / net,
                 "tile": f"{torch.get_num_threads()} threads, {device}"})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# peak memory of large tiles
# ----------------------------------------------------------------------------------------------------------------
def make_big_tiff(path: Path, size: int) -> Path:
    """A size x size tiled RGB TIFF (zlib, 512 px tiles) mosaicked from one MoNuSeg tile (or synthetic disks),
    written tile row by tile row so that building it needs no image-sized array."""
    import tifffile

    found = _monuseg_tile()
    src = read_image(found[0]) if found else read_image(_synthetic_tile(path.with_suffix(".src.png"))[0])
    th = 512

    def tiles():
        for y in range(0, size, th):
            for x in range(0, size, th):
                yy = (np.arange(y, y + th) % src.shape[0])[:, None]
                xx = (np.arange(x, x + th) % src.shape[1])[None, :]
                yield src[yy, xx]

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(th, th), compression="zlib",
                     photometric="rgb")
    return path


def measure_memory(size: int, chunk: int = 1024, formats: tuple[str, ...] = ("png", "geojson", "csv", "overlay"),
                   dshfn: bool = False) -> dict:
    """Run ``scripts/segment.py`` on a size x size tiled TIFF in a fresh process, with DS-HFN (random weights:
    cost and memory do not depend on them) or, by default, :class:`IntensityNet`; returns its summary
    (``peak_rss_mib`` from ``resource.getrusage``) plus the RSS of a process that only imports and builds the
    model (``baseline_rss_mib``) and the wall time."""
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        tmp = Path(tmp)
        tif = make_big_tiff(tmp / f"big{size}.tif", size)
        override = tmp / "stub.json"
        override.write_text(json.dumps({} if dshfn else {"network_def": {"_target_": "bundle.research.bench.inference.IntensityNet"}}))
        cmd = [sys.executable, str(ROOT / "scripts" / "segment.py"), "--input", str(tif), "--output_dir",
               str(tmp / "out"), "--ckpt", "none", "--config_file", str(ROOT / "configs" / "inference.json"),
               "--config_file", str(override), "--chunk", str(chunk), "--device", "cpu", "--no_progress",
               "--formats", *formats]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        wall = time.perf_counter() - t0
        summary = json.loads((tmp / "out" / f"big{size}_summary.json").read_text())
        base = subprocess.run(
            [sys.executable, "-c", "import resource, sys; sys.path.insert(0, sys.argv[1]); import scripts.segment as s;"
             " s.load_settings(sys.argv[2:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)",
             str(ROOT), str(ROOT / "configs" / "inference.json"), str(override)], check=True, capture_output=True, text=True, cwd=ROOT)
        summary["baseline_rss_mib"] = float(base.stdout.split()[-1])
        summary["wall_s"] = round(wall, 1)
        return summary


def network_chunk_memory(chunk: int = 1024, halo: int = 64, roi: int = 256, stride: int = 192) -> dict:
    """Peak RSS rise (MiB) of one DS-HFN sliding-window pass over a chunk's network region (chunk + 2 halo +
    2 roi + stride alignment, model px), in a fresh process: the network's share on top of :func:`measure_memory`."""
    side = -(-chunk // stride) * stride + 2 * halo + 2 * roi + stride - 1
    code = (
        "import sys, resource, numpy as np, torch; sys.path.insert(0, sys.argv[1]);"
        "from bundle.model.network import DSHFN; from bundle.inference.chunks import SlidingWindowPredictor;"
        "p = SlidingWindowPredictor(DSHFN(), 256, 8, 0.25); x = np.random.randn(int(sys.argv[2]), int(sys.argv[2])).astype(np.float32);"
        "p(np.random.randn(256, 256).astype(np.float32));"
        "open('/proc/self/clear_refs', 'w').write('5');"
        "rss = lambda k: int([l for l in open('/proc/self/status') if l.startswith(k)][0].split()[1]) / 1024;"
        "before = rss('VmRSS'); p(x); print(before, rss('VmHWM') - before)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(side)], check=True, capture_output=True, text=True)
    before, rise = (float(v) for v in out.stdout.split()[-2:])
    return {"region_px": side, "rss_before_mib": before, "peak_rise_mib": rise}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=int, nargs="*", default=[], help="image sizes (px) to measure")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--formats", nargs="+", default=["png", "geojson", "csv", "overlay"])
    p.add_argument("--network", action="store_true", help="measure DS-HFN's share on one chunk")
    p.add_argument("--dshfn", action="store_true", help="--memory runs with DS-HFN instead of the stand-in (slow on CPU)")
    args = p.parse_args(argv)
    for size in args.memory:
        s = measure_memory(size, args.chunk, tuple(args.formats), dshfn=args.dshfn)
        keys = ("shape", "chunks", "nuclei", "peak_rss_mib", "baseline_rss_mib", "wall_s")
        print(json.dumps({**{k: s[k] for k in keys}, "chunk": args.chunk, "formats": args.formats, "dshfn": args.dshfn}))
    if args.network:
        print(json.dumps(network_chunk_memory(args.chunk)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
