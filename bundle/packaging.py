"""Build the distributable bundle zip that ``monai.bundle.download(url=...)`` / ``monai.bundle.load`` consume."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

from bundle.core.files import atomic_write

#: the bundle's folder name inside the zip (``monai.bundle.load(name=BUNDLE_NAME, ...)``)
BUNDLE_NAME = "dshfn_nuclei_segmentation"
#: what ships: the bundle layout of MONAI's specification plus the code the configs import
INCLUDE = ("configs", "bundle", "models", "docs", "scripts", "LICENSE", "README.md", "requirements.txt")


def bundle_files(root: str | os.PathLike) -> list[Path]:
    """Files of the bundle under ``root``: git-tracked ones when ``root`` is a git checkout (so local data,
    runs and caches never ship), else every file under :data:`INCLUDE`; plus ``models/*`` weights either way, except
    training checkpoints (``models/*checkpoint*``)."""
    root = Path(root).resolve()
    files: set[Path] = set()
    try:
        out = subprocess.run(["git", "ls-files", "-z", *INCLUDE], cwd=root, capture_output=True, check=True)
        files = {root / p for p in out.stdout.decode().split("\0") if p}
    except (OSError, subprocess.CalledProcessError):
        for name in INCLUDE:
            p = root / name
            files |= {f for f in p.rglob("*") if f.is_file()} if p.is_dir() else ({p} if p.is_file() else set())
    files |= {f for f in (root / "models").glob("*") if f.is_file()}
    # a training run's resumable state is for whoever continues the run, not for users of the bundle
    return sorted(f for f in files if f.is_file() and "__pycache__" not in f.parts
                  and not (f.parent == root / "models" and "checkpoint" in f.name))


def build_bundle_zip(root: str | os.PathLike, out_zip: str | os.PathLike, name: str = BUNDLE_NAME) -> Path:
    """Zip the bundle at ``root`` as ``<name>/...`` into ``out_zip`` (atomically; a folder, existing or given with a
    trailing slash, gets ``<name>.zip`` in it); returns the zip path."""
    root = Path(root).resolve()
    meta = root / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not a bundle root (configs/metadata.json missing)")
    version = json.loads(meta.read_text())["version"]
    files = bundle_files(root)

    def _write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f"{name}/{f.relative_to(root).as_posix()}")

    if Path(out_zip).is_dir() or str(out_zip).endswith((os.sep, "/")):
        out_zip = Path(out_zip) / f"{name}.zip"
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_zip, _write)
    print(f"wrote {out_zip} ({name} {version}, {len(files)} files)")
    return out_zip
