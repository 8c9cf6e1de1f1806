"""One image through the network and the watershed, chunk by chunk: :func:`segment_image` (pixels -> nucleus blocks
-> a sink such as :class:`bundle.inference.writers.TileOutputs`). Memory is bounded by the chunk size; the maps of
each chunk equal a whole-image pass (:mod:`bundle.inference.chunks`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.data.scale import MODEL_PIXEL_SIZE, scale_factor
from bundle.inference.blocks import segment_blocks
from bundle.inference.chunks import (
    chunk_grid,
    model_size,
    predict_chunks,
    to_model_scale,
)
from bundle.inference.colour import ImageStats, image_statistics
from bundle.inference.overlap import prefetch as prefetch_items
from bundle.inference.sources import RegionSource
from bundle.inference.timing import stage
from bundle.nuclei.watershed import WatershedParams

logger = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``resource.getrusage``), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def segment_image(
    source: RegionSource,
    predictor: Callable[[np.ndarray], np.ndarray],
    sink: Any,
    reference: Mapping[str, Sequence[float]],
    pixel_size: float,
    model_pixel_size: float = MODEL_PIXEL_SIZE,
    params: WatershedParams | None = None,
    chunk: int = 1024,
    halo: int = 64,
    roi: int | None = None,
    stride: int | None = None,
    post_chunk: int = 1024,
    post_halo: int | None = None,
    tissue_only: bool = False,
    stats: ImageStats | None = None,
    progress: bool = False,
    post_scale: str = "model",
    input_mode: str = "gray",
    prefetch: bool = False,
) -> dict[str, Any]:
    """Segment ``source`` chunk by chunk into ``sink`` (``add(NucleusBlock)``, e.g. :class:`TileOutputs`).

    ``pixel_size`` of the source (um/px) and ``model_pixel_size`` fix the model scale; ``chunk``/``halo``/``roi``
    are model pixels (``roi``/``stride`` = the inferer's window and step, default the predictor's);
    ``post_chunk``/``post_halo`` native pixels (default halo: ``halo`` model px in native px, less the bilinear
    taps). ``tissue_only`` (slides): statistics from tissue and no network pass on all-glass chunks.
    ``post_scale``: where the watershed runs (:func:`segment_blocks`); ``params`` sizes are pixels of that grid.
    ``input_mode``: the network's input (:mod:`bundle.data.channels`); ``reference=None`` skips Reinhard.
    ``prefetch``: read, normalise and predict the next chunk on a background thread while this one is
    post-processed and written (:func:`bundle.inference.overlap.prefetch`; the same outputs, one more chunk in memory).
    Returns a summary (nuclei, chunks, blocks, truncated nuclei, label conflicts, seconds).
    """
    t0 = time.perf_counter()
    params = params or WatershedParams()
    factor = scale_factor(pixel_size, model_pixel_size)
    window = getattr(predictor, "roi_size", None)
    if roi is not None and window is not None and roi != window:
        raise ValueError(f"roi={roi} differs from the predictor's window {window}; the chunk grid must follow the window")
    roi = roi or window or 256
    stride = stride or getattr(predictor, "stride", None) or max(int(roi * 0.75), 1)
    if halo < 1 or chunk < 1:
        raise ValueError(f"chunk and halo must be positive model pixels, got chunk={chunk}, halo={halo}")
    if post_halo is None:
        post_halo = max(1, int((halo - 2) / factor))
    h, w = source.shape
    model_shape = (model_size(h, factor), model_size(w, factor))
    getattr(predictor, "clear_cache", lambda: None)()  # windows of another image are never reused
    if stats is None:
        resize = None
        if model_shape != (h, w):  # the input moments at model scale, where training standardises
            def resize(plane: np.ndarray) -> np.ndarray:
                return to_model_scale(plane, (0, h), (0, w), (0, model_shape[0]), (0, model_shape[1]), (h, w), model_shape)
        with stage("colour statistics"):
            stats = image_statistics(source, reference, tissue_only=tissue_only, input_mode=input_mode, resize=resize)
    summary = {"nuclei": 0, "chunks": 0, "skipped_chunks": 0, "blocks": 0, "truncated": 0}
    produced = predict_chunks(source, predictor, stats, reference, factor, chunk, halo, roi, stride, tissue_only)
    chunks = produced = prefetch_items(produced) if prefetch else produced
    if progress:
        from tqdm import tqdm

        n = len(chunk_grid(h, model_shape[0], chunk, halo, roi, stride)) * len(chunk_grid(w, model_shape[1], chunk, halo, roi, stride))
        chunks = tqdm(chunks, total=n, desc=Path(source.path).name, unit="chunk")
    try:
        for maps in chunks:
            summary["chunks"] += 1
            summary["skipped_chunks"] += int(maps.skipped)
            for block in segment_blocks(maps, (h, w), model_shape, params, post_chunk, post_halo, post_scale):
                sink.add(block)
                summary["blocks"] += 1
                summary["nuclei"] += block.count
                summary["truncated"] += block.truncated
            del maps  # free this chunk before the generator computes the next one
    finally:
        produced.close()  # stops a prefetching thread at once when the loop ends early
    if summary["truncated"]:
        logger.warning(f"{source.path}: {summary['truncated']} nuclei touch a block's halo edge and may be cut; "
                       f"raise --halo (now {halo} model px)")
    summary["conflict_pixels"] = int(getattr(sink, "conflicts", 0))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ------------------------------------------------------------------------------------------------------------
# folder mode (configs/inference.json): corrupt tiles are reported and skipped, ranks share the tiles
