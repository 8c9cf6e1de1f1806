"""Inference on tiles of any size: which tiles to run, and bringing them to the scale the network was trained at.

The network works at a fixed pixel size, the config's ``model_pixel_size`` (0.25 um/px for the shipped weights;
:data:`MODEL_PIXEL_SIZE`, 0.5, is only the functions' default). A tile of pixel size ``p`` is resized by
``p / model_pixel_size`` before the sliding-window network pass, and the prediction is resized back (MONAI
``Invertd``) to the tile's own size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.transforms import Resized

from bundle.io import IMAGE_SUFFIXES, DataError

logger = logging.getLogger(__name__)

#: default model pixel size of the functions here (um/px); the configs set ``model_pixel_size`` (0.25 when shipped)
MODEL_PIXEL_SIZE = 0.5
#: micrometres per pixel assumed for input tiles unless told otherwise (40x scanners: 0.23-0.26)
DEFAULT_PIXEL_SIZE = 0.25


#: micrometres per pixel a scan can have: 0.05 (beyond any optical scanner) .. 5 (about a 2x overview)
PIXEL_SIZE_RANGE = (0.05, 5.0)


def check_pixel_size(pixel_size: float, name: str = "pixel_size") -> float:
    """``pixel_size`` (um/px) if it is in :data:`PIXEL_SIZE_RANGE`, else a one-line :class:`bundle.io.DataError`
    (a ValueError) saying what to give: a magnification typed instead (40, 20) gets the pixel size it means."""
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        raise DataError(f"{name}={pixel_size!r} is not a number. Give the size of one pixel in um (0.25 for 40x scans)") from None
    lo, hi = PIXEL_SIZE_RANGE
    if not lo <= value <= hi:  # also NaN
        magnification = {10: 1.0, 20: 0.5, 40: 0.25, 60: 0.17, 80: 0.125}
        if value in magnification:  # a magnification typed where micrometres per pixel belong
            what = f"this looks like a magnification: a {value:g}x scan is about {magnification[value]} um/px, give {name} {magnification[value]}"
        else:
            what = "give the size of one pixel in um, e.g. 0.25 for 40x scans, 0.5 for 20x"
        raise DataError(f"{name}={pixel_size} um/px is outside {lo}..{hi} um/px; {what}")
    return value


def scale_factor(pixel_size: float, model_pixel_size: float = MODEL_PIXEL_SIZE) -> float:
    """Resize factor that brings a tile of ``pixel_size`` um/px to the network's ``model_pixel_size``; both must
    be in :data:`PIXEL_SIZE_RANGE` (:func:`check_pixel_size`)."""
    return check_pixel_size(pixel_size) / check_pixel_size(model_pixel_size, "model_pixel_size")


class ToModelScaled(Resized):
    """Resize ``keys`` by ``pixel_size / model_pixel_size`` (anti-aliased bicubic by default); invertible.

    A ``Resized`` whose output size follows each tile's own size, so MONAI's ``Invertd`` maps predictions
    back to the tile's size exactly as it does for any ``Resized``. ``pixel_size_key``: read each item's pixel
    size from that key instead (datalists of several datasets, :func:`bundle.datasets.datasets_datalist`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixel_size: float = DEFAULT_PIXEL_SIZE,
        model_pixel_size: float = MODEL_PIXEL_SIZE,
        mode: str | Sequence[str] = "bicubic",
        anti_aliasing: bool | Sequence[bool] = True,
        pixel_size_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, spatial_size=(1, 1), mode=mode, anti_aliasing=anti_aliasing, allow_missing_keys=allow_missing_keys)
        self.factor = scale_factor(pixel_size, model_pixel_size)
        self.model_pixel_size = model_pixel_size
        self.pixel_size_key = pixel_size_key

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        key = next(iter(self.key_iterator(d)))
        h, w = d[key].shape[-2:]
        factor = self.factor
        if self.pixel_size_key is not None:
            factor = scale_factor(float(d[self.pixel_size_key]), self.model_pixel_size)
        # per call: each DataLoader worker owns its copy of the transform, so this is not shared state
        self.resizer.spatial_size = (max(1, round(h * factor)), max(1, round(w * factor)))
        return super().__call__(d, lazy=lazy)


def find_tiles(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Tiles to process: a folder (its PNG/JPEG/TIFF files, sorted), one file, or a list of files."""
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            tiles = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
            if not tiles:
                raise DataError(f"{path}: no tiles ({', '.join(IMAGE_SUFFIXES)}) in this folder. Point --input_dir at a folder of H&E tiles")
            return tiles
        inputs = [path]
    tiles = [Path(p) for p in inputs]
    missing = [str(p) for p in tiles if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: tile not found ({len(missing)} missing in all). Check the path")
    return tiles


def tile_id(path: str | os.PathLike) -> str:
    """Output stem of a tile: its file name without the image suffix (``a.ome.tif`` -> ``a.ome``)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def tile_datalist(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    done_suffix: str = "_mask.png",
    skip_existing: bool = True,
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for the tiles of ``inputs``, leaving out those already done (resume).

    A tile counts as done when ``<output_dir>/<tile id><done_suffix>`` exists: outputs are written
    atomically, so a present file is a complete one.
    """
    tiles = find_tiles(inputs)
    todo = tiles
    if skip_existing and output_dir is not None:
        todo = [t for t in tiles if not (Path(output_dir) / f"{tile_id(t)}{done_suffix}").is_file()]
        if len(todo) < len(tiles):
            logger.info(f"{len(tiles) - len(todo)} of {len(tiles)} tiles already have outputs in {output_dir}: skipped")
    return [{"image": str(t)} for t in todo]


def load_inference_settings(config_files: str | Sequence[str]) -> dict[str, Any]:
    """Network (instantiated, random weights) and inference settings from the bundle config(s), later files
    overriding earlier: ``network``, ``reference`` (Reinhard; None when ``reinhard`` is off), ``input_mode``, ``watershed`` (:class:`bundle.instances.WatershedParams`),
    ``roi``, ``overlap``, ``sw_batch_size``, ``model_pixel_size``, ``post_scale``."""
    from monai.bundle import ConfigParser

    from bundle.instances import WatershedParams

    parser = ConfigParser()
    parser.read_config([config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files))
    get = lambda key, default=None: parser.get_parsed_content(key) if key in parser else default  # noqa: E731
    patch = get("patch_size", [256, 256])
    return {
        "network": parser.get_parsed_content("network_def", instantiate=True),
        "reference": get("reinhard_reference") if get("reinhard", True) else None,
        "input_mode": str(get("input_mode", "gray")),
        "watershed": WatershedParams.from_dict(get("watershed", {})),
        "roi": int(patch[0]),
        "overlap": float(get("overlap", 0.25)),
        "sw_batch_size": int(get("sw_batch_size", 8)),
        "model_pixel_size": float(get("model_pixel_size", MODEL_PIXEL_SIZE)),
        "post_scale": str(get("post_scale", "model")),
    }
