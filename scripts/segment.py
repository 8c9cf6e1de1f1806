#!/usr/bin/env python
"""Nucleus segmentation of large tiles, slides and folders, chunk by chunk with bounded memory.

    python scripts/segment.py --input big_tile.tif --output_dir out/            # one large tile
    python scripts/segment.py --input slide.tif --level 1 --output_dir out/      # a pyramidal TIFF (or SVS with OpenSlide)
    python scripts/segment.py --input tiles/ --output_dir out/ --device cuda     # a folder (resumes; skips bad tiles)
    torchrun --nproc_per_node=2 scripts/segment.py --input tiles/ --output_dir out/   # ranks share the tiles

Outputs per image (``bundle.exports`` layout; coordinates in level-0 pixels for slides): ``<id>.geojson``
(QuPath detections), ``<id>_nuclei.csv``; for tiles also ``<id>_instances.png`` (uint16 label map) and
``<id>_overlay.png``; ``<id>_summary.json`` (written last: marks the image as done) and, for the run,
``segment_summary.json`` (images done / skipped / failed, nuclei). The network, Reinhard reference, sliding
window and watershed settings are read from ``--config_file`` (default ``configs/inference.json``; give it
several times to merge overrides). See ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bundle.exports import FORMATS  # noqa: E402
from bundle.inference import DEFAULT_PIXEL_SIZE, check_pixel_size, load_inference_settings, tile_id  # noqa: E402
from bundle.io import DataError, load_weights, write_text_atomic  # noqa: E402
from bundle.outputs import ensure_output_dir, output_files, tile_datalist  # noqa: E402
from bundle.slide import is_slide, open_source, segment_slide  # noqa: E402
from bundle.tiling import SlidingWindowPredictor, TileOutputs, peak_rss_mib, segment_image, shard  # noqa: E402

logger = logging.getLogger("segment")
DONE_SUFFIX = "_summary.json"


load_settings = load_inference_settings  # the name older callers use


def slide_mode(path: Path, args: argparse.Namespace) -> bool:
    return args.slide == "yes" or (args.slide == "auto" and (args.level > 0 or is_slide(path)))


def formats_of(path: Path, args: argparse.Namespace) -> list[str]:
    """The formats ``path`` gets: slides only GeoJSON / CSV (nothing image-sized)."""
    if slide_mode(path, args):
        return [f for f in args.formats if f in ("geojson", "csv")] or ["geojson"]
    return list(args.formats)


def done_summary(path: Path, args: argparse.Namespace) -> dict | None:
    """The ``<id>_summary.json`` of an image whose outputs are complete for the formats asked, else None (a
    rerun with more ``--formats`` redoes the image)."""
    out_dir, stem = Path(args.output_dir), tile_id(path)
    marker = out_dir / f"{stem}{DONE_SUFFIX}"
    if not marker.is_file():
        return None
    if not all(any(p.is_file() for p in output_files(out_dir, stem, f)) for f in formats_of(path, args)):
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def segment_file(path: Path, args: argparse.Namespace, predictor, settings: dict) -> dict:
    """One image: a slide (one GeoJSON in level-0 pixels) or a tile of any size (label map + exports)."""
    chunking = {"chunk": args.chunk, "halo": args.halo, "roi": settings["roi"], "post_chunk": args.post_chunk,
                "post_scale": settings["post_scale"], "input_mode": settings["input_mode"]}
    out_dir = Path(args.output_dir)
    if slide_mode(path, args):
        formats = formats_of(path, args)
        return segment_slide(path, out_dir, predictor, settings["reference"], level=args.level,
                             pixel_size=args.pixel_size, model_pixel_size=settings["model_pixel_size"],
                             params=settings["watershed"], formats=formats, progress=args.progress, **chunking)
    source = open_source(path)
    stem = tile_id(path)
    sink = TileOutputs(out_dir, stem, source.shape, args.formats)
    pixel_size = DEFAULT_PIXEL_SIZE if args.pixel_size is None else args.pixel_size
    try:
        summary = segment_image(source, predictor, sink, settings["reference"], pixel_size,
                                settings["model_pixel_size"], settings["watershed"], progress=args.progress, **chunking)
        paths = sink.close(source)
    except BaseException:
        sink.abort()
        raise
    summary.update(input=str(path), shape=list(source.shape), pixel_size=pixel_size,
                   outputs={k: str(v) for k, v in paths.items()}, peak_rss_mib=round(peak_rss_mib(), 1))
    write_text_atomic(out_dir / f"{stem}{DONE_SUFFIX}", json.dumps(summary, indent=2) + "\n")
    return summary


def _gather(value):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, value)
        return parts
    return [value]


def run(args: argparse.Namespace) -> dict:
    # every check on the inputs, options and output folder first: bad input stops here, before any network work
    inputs = Path(args.input)
    if not inputs.exists():
        raise DataError(f"{inputs}: --input does not exist. Give an image file or a folder of tiles")
    ensure_output_dir(args.output_dir)
    # the input folder refused as --output_dir, stale temp files of a killed run cleared
    tiles = [Path(d["image"]) for d in tile_datalist(inputs if inputs.is_dir() else [inputs], args.output_dir,
                                                     DONE_SUFFIX, skip_existing=False, option="--input")]
    settings = load_settings(args.config_file)
    if args.chunk < settings["roi"]:
        raise DataError(f"--chunk {args.chunk} is smaller than the network's window ({settings['roi']} model px). "
                        f"Give --chunk {settings['roi']} or more (default 1024)")
    device = torch.device(args.device)
    load_weights(settings["network"], args.ckpt, device)
    predictor = SlidingWindowPredictor(settings["network"], settings["roi"], settings["sw_batch_size"],
                                       settings["overlap"], device, amp=args.amp)
    earlier = {} if args.no_resume or not inputs.is_dir() else {t: done_summary(t, args) for t in tiles}
    earlier = {t: s for t, s in earlier.items() if s is not None}
    todo = [t for t in tiles if t not in earlier]
    if earlier:
        logger.info(f"{len(earlier)} of {len(tiles)} images already have their outputs in {args.output_dir}: skipped")
    mine = shard(todo)
    rank = int(os.environ.get("RANK", 0))
    done, failed, nuclei = [], [], 0
    iterator = mine
    if args.progress and len(mine) > 1:
        from tqdm import tqdm

        iterator = tqdm(mine, desc=f"rank {rank}" if rank else "tiles", unit="tile", disable=rank > 0)
    for path in iterator:
        try:
            summary = segment_file(path, args, predictor, settings)
        except DataError as exc:
            logger.error(f"{path}: skipped, {exc}")
            failed.append({"tile": str(path), "error": str(exc)})
            continue
        except Exception as exc:  # not a known bad input: log the traceback, but one file must not end the run
            logger.exception(f"{path}: failed, {type(exc).__name__}: {exc}")
            failed.append({"tile": str(path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        done.append(tile_id(path))
        nuclei += summary["nuclei"]
        logger.info(f"{path}: {summary['nuclei']} nuclei in {summary['seconds']} s ({summary['chunks']} chunks)")
    parts = _gather({"done": done, "failed": failed, "nuclei": nuclei})
    nuclei_now = sum(p["nuclei"] for p in parts)
    nuclei_before = sum(int(s.get("nuclei", 0)) for s in earlier.values())
    result = {
        "images_done": sum(len(p["done"]) for p in parts),
        "images_skipped": len(tiles) - len(todo),
        "images_failed": sum(len(p["failed"]) for p in parts),
        "nuclei": nuclei_now + nuclei_before,  # every image with outputs: done now or skipped (done before)
        "nuclei_this_run": nuclei_now,
        "done": sorted(d for p in parts for d in p["done"]),
        "done_per_rank": [len(p["done"]) for p in parts],
        "failed": [f for p in parts for f in p["failed"]],
    }
    if rank == 0:
        logger.info(f"{result['images_done']} images done, {result['images_skipped']} skipped (outputs existed), "
                    f"{result['images_failed']} failed, {result['nuclei']} nuclei")
        write_text_atomic(Path(args.output_dir) / "segment_summary.json", json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an image (tile of any size, pyramidal TIFF, SVS...) or a folder of tiles")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--ckpt", default=str(ROOT / "models" / "model.pt"), help="trained weights (state dict or {'model': ...})")
    p.add_argument("--config_file", action="append", help="bundle config(s) (default configs/inference.json); later ones override")
    p.add_argument("--pixel_size", type=float, help=f"um/px of the input (level 0 for slides); default: the slide's "
                   f"resolution tags, else {DEFAULT_PIXEL_SIZE}")
    p.add_argument("--level", type=int, default=0, help="slide level to segment (0 = full resolution)")
    p.add_argument("--slide", choices=("auto", "yes", "no"), default="auto",
                   help="slide mode (one GeoJSON, no label map): auto = pyramidal TIFF, SVS/NDPI or --level > 0")
    p.add_argument("--chunk", type=int, default=1024, help="chunk size in model pixels (memory grows with its square)")
    p.add_argument("--halo", type=int, default=64, help="margin around a chunk in model pixels (> a nucleus)")
    p.add_argument("--post_chunk", type=int, default=1024, help="watershed block size in native pixels")
    p.add_argument("--formats", nargs="+", default=["png", "geojson", "csv", "overlay"], choices=FORMATS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="autocast the network (fp16 on CUDA)")
    p.add_argument("--no_resume", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    args.config_file = args.config_file or [str(ROOT / "configs" / "inference.json")]
    if args.ckpt and args.ckpt.lower() == "none":
        args.ckpt = None
    return args


def check_args(args: argparse.Namespace) -> None:
    """Range checks of the numbers, before anything is loaded: one line naming the option and what to give."""
    if args.pixel_size is not None:
        check_pixel_size(args.pixel_size, "--pixel_size")
    for name, low in (("chunk", 1), ("halo", 1), ("post_chunk", 16), ("level", 0)):
        value = getattr(args, name)
        if value < low:
            raise DataError(f"--{name} {value}: must be {low} or more (see --help for what it means and its default)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:  # only to gather the run summary; the tiles are split by rank without communication
        torch.distributed.init_process_group("gloo")
    try:
        check_args(args)
        result = run(args)
    except DataError as exc:
        logger.error(str(exc))
        return 2
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result["images_failed"] == 0:
        return 0
    # 1: some images failed (listed in segment_summary.json); 2: nothing useful produced at all
    return 1 if result["images_done"] + result["images_skipped"] > 0 else 2


if __name__ == "__main__":
    raise SystemExit(main())
