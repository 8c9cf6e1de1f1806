"""Shared pytest fixtures: paths to the read-only datasets in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# what Python does for `python scripts/<tool>.py`, for the tests that load a script as a module
sys.path.insert(0, str(ROOT / "scripts"))

SHARED_DATA = Path(os.environ.get("DSHFN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "meta.csv").is_file():
        pytest.skip(f"{path} is absent: put ../shared beside the checkout (or set DSHFN_SHARED_DATA) to run this test")
    return path


@pytest.fixture(scope="session")
def tnbc_dir() -> Path:
    """../shared/data/tnbc: 50 RGB 512x512 tiles with binary masks, group = patient."""
    return _dataset("tnbc")


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    """../shared/data/monuseg: 30 RGB 1000x1000 tiles with uint16 instance labels, group = organ."""
    return _dataset("monuseg")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one intra-op thread avoids thread-pool stalls on a busy 2-core CI machine (up to 10x)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def link_subset(source: Path, rows: list[dict], dest: Path, label_dir: str) -> Path:
    """A dataset folder ``dest`` in the standard layout holding symlinks to ``rows`` (meta.csv dicts) of ``source``
    (images and ``label_dir``, "masks" or "labels"), nothing copied; their own meta.csv, split "all"."""
    for sub in ("images", label_dir):
        (dest / sub).mkdir(parents=True)
        for r in rows:
            os.symlink(source / sub / f"{r['id']}.png", dest / sub / f"{r['id']}.png")
    (dest / "meta.csv").write_text("id,group,split\n" + "".join(f"{r['id']},{r['group']},all\n" for r in rows))
    return dest


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file, creating its folder."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
