"""The inference engine: one code path from an input (a tile, a folder of tiles, a large image or a slide) to the
nucleus outputs, for both front ends (``configs/inference.json`` and ``scripts/segment.py``).

Per image it writes the outputs of the formats asked (:class:`bundle.inference.writers.TileOutputs`; slides only
GeoJSON and CSV, :func:`bundle.inference.slide.segment_slide`) and then ``<id>_summary.json``, the image's resume
marker. A rerun skips the images whose marker and every asked format exist. Ranks (torchrun) share the images still
to do by ``monai.data.partition_dataset`` (interleaved, no padding); an image that cannot be read or written is
logged and listed, and the run goes on. Rank 0 writes ``segment_summary.json`` for the whole run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import partition_dataset
from monai.inferers import SlidingWindowInferer

from bundle.core.cli import as_flag, read_flags
from bundle.core.distributed import gather_objects, rank_and_size
from bundle.core.errors import DataError
from bundle.core.files import write_text_atomic
from bundle.data.io import tile_id
from bundle.data.scale import DEFAULT_PIXEL_SIZE, MODEL_PIXEL_SIZE, check_pixel_size
from bundle.inference.chunks import SlidingWindowPredictor, default_inferer
from bundle.inference.files import output_files, tiles_for_run
from bundle.inference.pipeline import peak_rss_mib, segment_image
from bundle.inference.slide import is_slide, open_source, segment_slide
from bundle.inference.timing import stage
from bundle.inference.writers import OUTPUT_FORMATS, TileOutputs
from bundle.model.weights import load_weights
from bundle.nuclei.watershed import WatershedParams

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FORMATS", "DONE_SUFFIX", "RUN_FILES", "SUMMARY_FILE", "NucleiSegmenter", "check_settings",
           "closing_line", "exit_code", "load_segmenter"]

#: per-image resume marker, written after every other output of the image
DONE_SUFFIX = "_summary.json"
#: the run's summary (rank 0): images done / skipped / failed, nuclei, the failures with their reasons
SUMMARY_FILE = "segment_summary.json"
#: files of the run itself in the output folder, which no image's outputs may overwrite
RUN_FILES = (SUMMARY_FILE,)
DEFAULT_FORMATS = ("png", "geojson", "csv", "overlay")
#: window outputs kept by the CPU window cache (about 330 windows of 3 x 256 x 256 float32)
WINDOW_CACHE_BYTES = 256 * 2**20
#: what a slide gets: nothing image-sized
SLIDE_FORMATS = ("geojson", "csv")


def _square(roi: int | Sequence[int]) -> int:
    return int(roi) if isinstance(roi, int) else int(roi[0])


def run_file_clash(path: Path, formats: Sequence[str]) -> str | None:
    """The run-level file (:data:`RUN_FILES`) an image's outputs would overwrite (``segment.png`` ->
    ``segment_summary.json``), else None; compared case-insensitively, as on macOS and Windows."""
    stem = tile_id(path)
    names = {f"{stem}{DONE_SUFFIX}"} | {p.name for f in formats for p in output_files(Path("."), stem, f)}
    run_files = {f.casefold(): f for f in RUN_FILES}
    return next((run_files[n.casefold()] for n in sorted(names) if n.casefold() in run_files), None)


def closing_line(result: Mapping[str, Any], output_dir: str | os.PathLike) -> str:
    """The last line of a run: counts, the failed inputs (the first few) and where the outputs are."""
    line = (f"{result['images_done']} images done, {result['images_skipped']} skipped (outputs existed), "
            f"{result['images_failed']} failed, {result['nuclei']} nuclei; outputs in {output_dir}")
    if result["images_failed"]:
        names = [Path(f["tile"]).name for f in result["failed"]]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        line += f"; failed: {', '.join(names[:5])}{more} (reasons in {Path(output_dir) / SUMMARY_FILE})"
    return line


def exit_code(result: Mapping[str, Any]) -> int:
    """0: every image done or skipped; 1: some failed (listed in the run summary); 2: nothing useful produced."""
    if not result["images_failed"]:
        return 0
    return 1 if result["images_done"] + result["images_skipped"] > 0 else 2


def check_settings(
    pixel_size: float | None = None, model_pixel_size: float | None = None, chunk: int | None = None,
    halo: int | None = None, post_chunk: int | None = None, level: int | None = None, roi: int | None = None,
    prefix: str = "",
) -> None:
    """Range checks of the engine's numbers (those given), each a one-line :class:`DataError` naming the setting as
    ``prefix + name`` (``"--"`` for command-line options) and what to give."""
    if pixel_size is not None:
        check_pixel_size(pixel_size, f"{prefix}pixel_size")
    if model_pixel_size is not None:
        check_pixel_size(model_pixel_size, "model_pixel_size")
    for name, value, low in (("chunk", chunk, 1), ("halo", halo, 1), ("post_chunk", post_chunk, 16), ("level", level, 0)):
        if value is not None and int(value) < low:
            raise DataError(f"{prefix}{name} {value}: must be {low} or more (see --help for what it means and its default)")
    if chunk is not None and roi is not None and int(chunk) < int(roi):
        raise DataError(f"{prefix}chunk {chunk} is smaller than the network's window ({roi} model px). "
                        f"Give {prefix}chunk {roi} or more (default 1024)")


class NucleiSegmenter:
    """Segment the nuclei of every image of an input into an output folder (module docstring).

    Args:
        network: the segmentation network (DS-HFN's eval output: region, boundary, ... probabilities).
        ckpt: weights loaded into ``network`` before the first image (None: use it as it is).
        device: where the network runs.
        reference: Reinhard reference ``{"means", "stds"}`` in L*a*b*; None: no colour normalisation.
        input_mode: the network's input channels (:mod:`bundle.data.channels`).
        pixel_size: um/px of the inputs (level 0 for slides); None: a slide's resolution tags, else
            :data:`DEFAULT_PIXEL_SIZE`.
        model_pixel_size: um/px the network was trained at.
        inferer: MONAI ``SlidingWindowInferer`` (square windows, model pixels); default 256 px, overlap 0.25,
            Gaussian blending, reflect padding.
        watershed: :class:`bundle.nuclei.watershed.WatershedParams` or its dict; sizes in pixels of ``post_scale``'s grid.
        post_scale: where the watershed runs, ``"model"`` or ``"native"`` (:func:`bundle.inference.blocks.segment_blocks`).
        formats: outputs per image, from :data:`bundle.inference.writers.OUTPUT_FORMATS`.
        threshold: region probability of the ``mask`` output.
        chunk, halo: network chunk and its margin (model pixels); memory grows with ``chunk ** 2``.
        post_chunk: watershed block (native pixels).
        level, slide: slide level to segment; slide mode ``"auto"`` (pyramidal TIFF, vendor slide or ``level > 0``),
            ``"yes"`` or ``"no"``.
        amp: autocast the network.
        resume: skip images whose outputs exist.
        progress: progress bars.
        prefetch: run the next chunk's network pass on a background thread while the current chunk is
            post-processed and written (:func:`bundle.inference.overlap.prefetch`); same outputs. Off by default: on
            2 cores the network already uses both, so it saved ~1 s of 44 s per mm² for ~300 MiB more memory.
        writer_thread: encode a tile's label map and overlay PNGs on a writer thread.
        window_cache: predict each window once on the CPU, reusing the windows neighbouring chunks share
            (:class:`bundle.inference.windows.WindowCache`, at most 256 MiB; the same maps).
        onnx_runtime: run the network with ONNX Runtime on the CPU (:mod:`bundle.inference.runtime`; maps equal to
            float rounding, not byte-identical).
        input_dir, output_dir: what :meth:`run` segments when called without arguments (MONAI's workflow
            convention: ``$@evaluator.run()``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        ckpt: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        reference: Mapping[str, Sequence[float]] | None = None,
        input_mode: str = "rgb",
        pixel_size: float | None = None,
        model_pixel_size: float = MODEL_PIXEL_SIZE,
        inferer: SlidingWindowInferer | None = None,
        watershed: WatershedParams | Mapping[str, Any] | None = None,
        post_scale: str = "model",
        formats: Sequence[str] = DEFAULT_FORMATS,
        threshold: float = 0.5,
        chunk: int = 1024,
        halo: int = 64,
        post_chunk: int = 1024,
        level: int = 0,
        slide: str = "auto",
        amp: bool = False,
        resume: bool = True,
        progress: bool = True,
        prefetch: bool = False,
        writer_thread: bool = True,
        onnx_runtime: bool = False,
        window_cache: bool = True,
        input_dir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
        if unknown:
            raise DataError(f"unknown output format(s) {unknown}; choose from {', '.join(OUTPUT_FORMATS)}")
        inferer = inferer or default_inferer()
        check_settings(pixel_size, model_pixel_size, chunk, halo, post_chunk, level, _square(inferer.roi_size))
        if slide not in ("auto", "yes", "no"):
            raise DataError(f"slide={slide!r}: give 'auto', 'yes' or 'no'")
        self.network, self.ckpt, self.device = network, ckpt, torch.device(device)
        self.reference, self.input_mode = reference, str(input_mode)
        self.pixel_size, self.model_pixel_size = pixel_size, float(model_pixel_size)
        self.inferer, self.roi = inferer, _square(inferer.roi_size)
        self.input_dir, self.output_dir = input_dir, output_dir
        # on/off fields read by word (bundle.core.cli.read_flags), like every switch of the config
        self.watershed = watershed if isinstance(watershed, WatershedParams) else \
            WatershedParams.from_dict(read_flags(watershed, WatershedParams, "--watershed"))
        self.post_scale, self.formats, self.threshold = str(post_scale), tuple(formats), float(threshold)
        self.chunk, self.halo, self.post_chunk = int(chunk), int(halo), int(post_chunk)
        self.level, self.slide, self.amp = int(level), slide, as_flag(amp, "amp")
        self.resume, self.progress = as_flag(resume, "resume"), as_flag(progress, "progress")
        self.prefetch, self.writer_thread = as_flag(prefetch, "prefetch"), as_flag(writer_thread, "writer_thread")
        self.onnx_runtime = as_flag(onnx_runtime, "onnx_runtime")
        self.window_cache = as_flag(window_cache, "window_cache")
        self._predictor: SlidingWindowPredictor | None = None
        #: the option that gives ``ckpt`` on the front end in use (the messages name it)
        self.ckpt_option = "--ckpt_path"
        #: the last :meth:`run`'s summary (what :meth:`finish` reports)
        self.result: dict[str, Any] | None = None
        self._result_dir: Path | None = None
        self._chunk_bars = self.progress

    # -- which images, which outputs ----------------------------------------------------------------------------
    def is_slide(self, path: Path) -> bool:
        return self.slide == "yes" or (self.slide == "auto" and (self.level > 0 or is_slide(path)))

    def formats_of(self, path: Path) -> list[str]:
        """The formats ``path`` gets: slides only GeoJSON / CSV."""
        if self.is_slide(path):
            return [f for f in self.formats if f in SLIDE_FORMATS] or ["geojson"]
        return list(self.formats)

    def done_summary(self, path: Path, output_dir: Path) -> dict | None:
        """The ``<id>_summary.json`` of an image whose outputs exist for every format asked, else None."""
        stem = tile_id(path)
        marker = output_dir / f"{stem}{DONE_SUFFIX}"
        if not marker.is_file():
            return None
        if not all(any(p.is_file() for p in output_files(output_dir, stem, f)) for f in self.formats_of(path)):
            return None
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -- one image ----------------------------------------------------------------------------------------------
    def predictor(self) -> SlidingWindowPredictor:
        """The network with its weights (loaded once) as a sliding-window predictor."""
        if self._predictor is None:
            if self.ckpt is not None:
                load_weights(self.network, self.ckpt, self.device, option=self.ckpt_option)
            self.network.to(self.device)
            network = self.network
            if self.onnx_runtime:
                from bundle.inference.runtime import OnnxNetwork

                network = OnnxNetwork(self.network.to("cpu").eval(), self.roi).to(self.device)
            cache = WINDOW_CACHE_BYTES if self.window_cache and self.device.type == "cpu" else 0
            self._predictor = SlidingWindowPredictor(network, device=self.device, amp=self.amp, inferer=self.inferer,
                                                     window_cache=cache)
        return self._predictor

    def segment_file(self, path: Path, output_dir: Path) -> dict[str, Any]:
        """One image: a slide (one GeoJSON / CSV in level-0 pixels) or a tile of any size; returns its summary."""
        chunking = {"chunk": self.chunk, "halo": self.halo, "roi": self.roi, "post_chunk": self.post_chunk,
                    "post_scale": self.post_scale, "input_mode": self.input_mode, "prefetch": self.prefetch}
        if self.is_slide(path):
            return segment_slide(path, output_dir, self.predictor(), self.reference, level=self.level,
                                 pixel_size=self.pixel_size, model_pixel_size=self.model_pixel_size,
                                 params=self.watershed, formats=self.formats_of(path), progress=self._chunk_bars,
                                 **chunking)
        with stage("read"):
            source = open_source(path)
        stem = tile_id(path)
        pixel_size = DEFAULT_PIXEL_SIZE if self.pixel_size is None else self.pixel_size
        sink = TileOutputs(output_dir, stem, source.shape, self.formats, threshold=self.threshold,
                           writer_thread=self.writer_thread)
        try:
            summary = segment_image(source, self.predictor(), sink, self.reference, pixel_size, self.model_pixel_size,
                                    self.watershed, progress=self._chunk_bars, **chunking)
            paths = sink.close(source)
        except BaseException:
            sink.abort()
            raise
        summary.update(input=str(path), shape=list(source.shape), pixel_size=pixel_size,
                       outputs={k: str(v) for k, v in paths.items()}, peak_rss_mib=round(peak_rss_mib(), 1))
        write_text_atomic(output_dir / f"{stem}{DONE_SUFFIX}", json.dumps(summary, indent=2) + "\n")
        return summary

    # -- a run --------------------------------------------------------------------------------------------------
    def run(self, inputs: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
            option: str = "--input_dir") -> dict[str, Any]:
        """Segment every image of ``inputs`` (an image file or a folder of tiles) into ``output_dir``.

        Returns the run summary (also written by rank 0 to :data:`SUMMARY_FILE`). Raises a one-line
        :class:`DataError` when the inputs or the output folder are unusable (before any network work), and when
        every image failed.
        """
        inputs, output_dir = inputs or self.input_dir, output_dir or self.output_dir
        if inputs is None or output_dir is None:
            raise DataError("no input or output folder: give input_dir and output_dir (--input_dir X --output_dir OUT)")
        inputs, output_dir = Path(inputs), Path(output_dir)
        if not inputs.exists():
            raise DataError(f"{inputs}: {option} does not exist. Give an image file or a folder of tiles")
        tiles = tiles_for_run(inputs if inputs.is_dir() else [inputs], output_dir, option)
        clashes = {t: run_file_clash(t, self.formats_of(t)) for t in tiles}
        clashed = [{"tile": str(t), "error": f"its outputs would overwrite the run's {name}. Rename the file "
                    f"(e.g. {t.stem}_1{t.suffix}) and run again"} for t, name in clashes.items() if name]
        rank, world_size = rank_and_size()
        for c in clashed if rank == 0 else []:
            logger.error(f"{c['tile']}: skipped, {c['error']}")
        tiles = [t for t in tiles if not clashes[t]]
        earlier = {t: self.done_summary(t, output_dir) for t in tiles} if self.resume and inputs.is_dir() else {}
        earlier = {t: s for t, s in earlier.items() if s is not None}
        todo = [t for t in tiles if t not in earlier]
        if earlier:
            logger.info(f"{len(earlier)} of {len(tiles)} images already have their outputs in {output_dir}: skipped")
        mine = partition_dataset(todo, num_partitions=world_size, shuffle=False, even_divisible=False)[rank] if todo else []
        if todo:
            self.predictor()  # a bad checkpoint stops the run here, with one line
        done, failed, nuclei = [], [], 0
        iterator = mine
        # one bar at a time: nested bars move the cursor with escape codes, which end up in log files
        self._chunk_bars = self.progress and len(mine) <= 1
        if self.progress and len(mine) > 1:
            from tqdm import tqdm

            iterator = tqdm(mine, desc=f"rank {rank}" if rank else "images", unit="image", disable=rank > 0)
        for path in iterator:
            try:
                summary = self.segment_file(path, output_dir)
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
        parts = gather_objects({"done": done, "failed": failed, "nuclei": nuclei})
        nuclei_now = sum(p["nuclei"] for p in parts)
        result = {
            "images_done": sum(len(p["done"]) for p in parts),
            "images_skipped": len(earlier),
            "images_failed": 0,  # set below, from the list
            "nuclei": nuclei_now + sum(int(s.get("nuclei", 0)) for s in earlier.values()),
            "nuclei_this_run": nuclei_now,
            "done": sorted(d for p in parts for d in p["done"]),
            "done_per_rank": [len(p["done"]) for p in parts],
            "failed": clashed + [f for p in parts for f in p["failed"]],
        }
        result["images_failed"] = len(result["failed"])
        self.result, self._result_dir = result, output_dir
        if rank == 0:
            write_text_atomic(output_dir / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
            logger.info(closing_line(result, output_dir))
        if result["images_failed"] and not result["images_done"] and not result["images_skipped"]:
            first = result["failed"][0]
            raise DataError(f"{first['tile']}: every image failed ({result['images_failed']}; first: {first['error']}). "
                            f"See {output_dir / SUMMARY_FILE} and fix the inputs")
        return result

    def finish(self) -> None:
        """End a ``monai.bundle run`` (the config's ``finalize``): exit 1 when some images failed, so a script
        driving the command sees it; the closing line (the failed files and where they are listed) is printed
        again as the last line. Nothing to do when every image was done or skipped."""
        if self.result is None or not exit_code(self.result):
            return
        rank, _ = rank_and_size()  # every rank exits non-zero, rank 0 says why
        raise SystemExit(f"error: {closing_line(self.result, self._result_dir)}" if rank == 0 else 1)


def load_segmenter(config_files: str | os.PathLike | Sequence[str | os.PathLike], **overrides: Any) -> NucleiSegmenter:
    """The ``segmenter`` of the inference config(s) (later files override earlier), after setting ``overrides``
    by config id (``device``, ``pixel_size``, ``formats``...): the one place both front ends build the engine."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("segmenter", instantiate=True)
