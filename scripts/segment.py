#!/usr/bin/env python
"""Nucleus segmentation of large tiles, slides and folders, chunk by chunk with bounded memory.

    python scripts/segment.py --input big_tile.tif --output_dir out/            # one large tile
    python scripts/segment.py --input slide.tif --level 1 --output_dir out/      # a pyramidal TIFF (or SVS with OpenSlide)
    python scripts/segment.py --input tiles/ --output_dir out/ --device cuda     # a folder (resumes; skips bad tiles)
    torchrun --nproc_per_node=2 scripts/segment.py --input tiles/ --output_dir out/   # ranks share the tiles

A command-line front over the inference engine (:class:`bundle.inference.engine.NucleiSegmenter`), the same
one ``python -m monai.bundle run inference --config_file configs/inference.json`` runs: each option sets the
config id of the same meaning, so both give the same files. Outputs per image (coordinates in level-0 pixels
for slides): ``<id>.geojson`` (QuPath detections), ``<id>_nuclei.csv``; for tiles also ``<id>_instances.png``
(uint16 label map) and ``<id>_overlay.png`` (and ``mask``/``prob``/``nifti`` maps when asked);
``<id>_summary.json`` (written last: marks the image as done) and, for the run, ``segment_summary.json``.
The network, Reinhard reference, sliding window and watershed settings are read from ``--config_file``
(default ``configs/inference.json``; give it several times to merge overrides). See ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import logging

from bundle_path import ROOT

from bundle.core.cli import data_path, data_value, find_data_error
from bundle.core.distributed import shutdown, start_process_group
from bundle.data.scale import DEFAULT_PIXEL_SIZE
from bundle.inference.engine import check_settings, exit_code, load_segmenter
from bundle.inference.writers import OUTPUT_FORMATS

logger = logging.getLogger("segment")


def config_overrides(args: argparse.Namespace) -> dict:
    """The inference config ids the given options set (options not given keep the config's value), as data: a
    value starting with ``$``, ``@`` or ``%`` would be run or followed by the config parser (a path gets ``./``,
    anything else is refused)."""
    device = None if args.device is None else data_value(args.device, "--device")
    ids = {"pixel_size": args.pixel_size, "level": args.level, "slide": args.slide, "chunk": args.chunk,
           "halo": args.halo, "post_chunk": args.post_chunk, "formats": args.formats, "device": device,
           "amp": args.amp or None, "skip_existing": False if args.no_resume else None,
           "progress": None if args.progress else False}
    ids = {k: v for k, v in ids.items() if v is not None}
    if args.ckpt is not None:
        ids["ckpt_path"] = None if args.ckpt.lower() == "none" else data_path(args.ckpt)
    return ids


def run(args: argparse.Namespace) -> dict:
    # the options' own numbers first, named as options; the engine checks the merged settings again
    check_settings(args.pixel_size, chunk=args.chunk, halo=args.halo, post_chunk=args.post_chunk, level=args.level,
                   prefix="--")
    segmenter = load_segmenter(args.config_file, **config_overrides(args))
    segmenter.ckpt_option = "--ckpt"
    return segmenter.run(args.input, args.output_dir, option="--input")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an image (tile of any size, pyramidal TIFF, SVS...) or a folder of tiles")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--ckpt", help="trained weights (state dict or {'model': ...}); default: the config's ckpt_path "
                   "(models/model.pt); 'none' = the network's initial weights")
    p.add_argument("--config_file", action="append", help="bundle config(s) (default configs/inference.json); later ones override")
    p.add_argument("--pixel_size", type=float, help=f"um/px of the input (level 0 for slides); default: the slide's "
                   f"resolution tags, else {DEFAULT_PIXEL_SIZE}")
    p.add_argument("--level", type=int, help="slide level to segment (0 = full resolution)")
    p.add_argument("--slide", choices=("auto", "yes", "no"),
                   help="slide mode (one GeoJSON, no label map): auto = pyramidal TIFF, SVS/NDPI or --level > 0")
    p.add_argument("--chunk", type=int, help="chunk size in model pixels (memory grows with its square; default 1024)")
    p.add_argument("--halo", type=int, help="margin around a chunk in model pixels (> a nucleus; default 64)")
    p.add_argument("--post_chunk", type=int, help="watershed block size in native pixels (default 1024)")
    p.add_argument("--formats", nargs="+", choices=OUTPUT_FORMATS, help="outputs per image (default: the config's formats)")
    p.add_argument("--device", help="where the network runs (default: cuda when there is one, else cpu)")
    p.add_argument("--amp", action="store_true", help="autocast the network (fp16 on CUDA)")
    p.add_argument("--no_resume", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    args.config_file = args.config_file or [str(ROOT / "configs" / "inference.json")]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # under torchrun the group only gathers the run summary; the images are split by rank without communication
    start_process_group()
    try:
        result = run(args)
    except Exception as exc:  # a bad input or option, possibly wrapped by the config parser: one line
        err = find_data_error(exc)
        if err is None:
            raise
        logger.error(str(err))
        return 2
    finally:
        shutdown()
    # 1: some images failed (listed in segment_summary.json and on the closing line); 2: nothing useful produced
    return exit_code(result)


if __name__ == "__main__":
    raise SystemExit(main())
