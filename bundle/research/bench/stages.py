"""Stage profile of the inference engine on one dense mm² of 40x tissue and on a slide-like image with half glass.

    python scripts/benchmark.py --suite stages                     # 1 and 2 threads, dense mm² and 50 % glass
    python -m bundle.research.bench.stages --build runs/throughput  # only (re)build the two inputs

Inputs (built deterministically from ``../shared/data``, never committed; :func:`build_inputs`):

* ``dense_mm2.png``: 4000 x 4000 px at 0.25 um/px = 1 mm², a 4 x 4 mosaic of the first 16 MoNuSeg tiles (sorted
  by name; 1000 x 1000 40x H&E each), what ``configs/inference.json`` gets as a (large) tile;
* ``dense_mm2.tif``: the same pixels as a 2-level pyramidal TIFF (slide mode: tissue statistics, GeoJSON + CSV);
* ``glass50.tif``: the same 16 tiles spread over twice the area (4000 x 8000, 2-level pyramidal TIFF): tissue in
  the left half, near-white glass (240 +- 3, seeded) in the right half.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bundle import bundle_root

ROOT = Path(bundle_root())
TILE = 1000
GRID = 4


def shared_data() -> Path:
    return Path(os.environ.get("DSHFN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def dense_mosaic(data: Path | None = None) -> np.ndarray:
    """(4000, 4000, 3) uint8: the first 16 MoNuSeg tiles (sorted by name) in row-major order."""
    from bundle.data.io import read_image

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

    from bundle.data.io import atomic_write

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
    from bundle.data.io import write_png_atomic

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


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="runs/throughput", help="folder for the inputs")
    args = p.parse_args()
    for k, v in build_inputs(args.build).items():
        print(k, v, v.stat().st_size)
