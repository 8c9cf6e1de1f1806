"""What an inference run reads and writes: the tiles
to do (every tile id unique, the output folder not the input folder), which tiles are done for the formats asked
(a rerun with more formats redoes the tiles that lack one), an output folder that can be written, and the temp
files a killed run left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bundle.core.errors import DataError
from bundle.data.io import IMAGE_SUFFIXES, tile_id

logger = logging.getLogger(__name__)

__all__ = ["find_tiles", "tile_id", "output_files", "ensure_output_dir", "clean_stale_temp"]

#: output files of each format (any one of them present counts): label map and overlay are tiled TIFFs instead
#: of PNGs for images above :data:`bundle.inference.writers.PNG_MAX_PIXELS`
_FORMAT_FILES = {
    "png": ("{}_instances.png", "{}_instances.tif"),
    "tiff": ("{}_instances.tif",),
    "geojson": ("{}.geojson",),
    "csv": ("{}_nuclei.csv",),
    "overlay": ("{}_overlay.png", "{}_overlay.tif"),
    "mask": ("{}_mask.png",),
    "prob": ("{}_region.png",),
    "nifti": ("{}_pred.nii.gz",),
}


def find_tiles(inputs: str | os.PathLike | Sequence[str | os.PathLike], option: str = "--input_dir") -> list[Path]:
    """Tiles to process (a folder's PNG/JPEG/TIFF files sorted, one file, or a list of files), refusing two tiles with the same id (``a.png`` and ``a.jpg`` would
    write the same ``a_*`` outputs); ``option`` names the command-line option in the messages."""
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        folder = Path(inputs)
        if not any(p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) for p in folder.iterdir()):
            raise DataError(f"{folder}: no tiles ({', '.join(IMAGE_SUFFIXES)}) in this folder. "
                            f"Point {option} at a folder of H&E tiles")
    tiles = _list_tiles(inputs)
    seen: dict[str, Path] = {}
    for t in tiles:
        key = tile_id(t).casefold()  # case-insensitive file systems would mix 'A' and 'a' too
        if key in seen:
            raise DataError(f"{seen[key]} and {t}: both would write the outputs {tile_id(t)}_*. "
                            "Rename one of them (or move it to another folder) and run again")
        seen[key] = t
    return tiles


def _list_tiles(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
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


def output_files(out_dir: str | os.PathLike, stem: str, fmt: str) -> list[Path]:
    """The files that hold ``fmt`` output of tile ``stem`` (any one present is enough)."""
    return [Path(out_dir) / pattern.format(stem) for pattern in _FORMAT_FILES[fmt]]


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def tiles_for_run(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike, option: str = "--input_dir"
) -> list[Path]:
    """The tiles of ``inputs`` (:func:`find_tiles`), once the output folder is checked: refuses an ``output_dir``
    that is the input folder (a rerun would segment the previous run's outputs), creates it and clears the temp
    files a killed run left there."""
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir() and _same_folder(Path(inputs), Path(output_dir)):
        raise DataError(f"{output_dir}: the output folder is the input folder, so a rerun would segment the "
                        "outputs of this one. Choose another --output_dir (e.g. a subfolder)")
    tiles = find_tiles(inputs, option)
    ensure_output_dir(output_dir)
    clean_stale_temp(output_dir)
    return tiles


def ensure_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """Create ``path`` if needed and check that files can be written there; one-line :class:`DataError` if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: {option} is a file, not a folder. Give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = "not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror or str(exc)
        raise DataError(f"{path}: {option} cannot be written ({why}). Choose a folder you can write to") from exc
    return path


#: temp files of bundle.core.files.atomic_write (``.<name>.<pid>.<random>.tmp<suffix>``) and of the streamed GeoJSON/CSV
#: (``.<name>.<pid>.partial``): the pid of the writer is in the name
_TEMP = re.compile(r"^\..+\.(\d+)\.(?:[^.]*\.tmp.*|partial)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp(out_dir: str | os.PathLike) -> int:
    """Delete the temp files of writers that are no longer running (a killed run); those of live processes
    (another rank, another run on the same folder) stay. Returns how many were deleted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    removed = 0
    for p in out_dir.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        logger.info(f"{out_dir}: removed {removed} temp file(s) left by an interrupted run")
    return removed
