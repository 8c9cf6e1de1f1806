"""Inference front ends on real tiles with a small random DS-HFN: ``configs/inference.json`` folder mode (nucleus
outputs, a truncated tile reported and skipped, summary, resume), the same config under torchrun (every tile
exactly once), and ``scripts/segment.py`` on a large tiled TIFF, a pyramidal slide and a folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bundle.core.errors import DataError
from bundle.data.io import read_image
from bundle.model.network import DSHFN
from bundle.model.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = {"network_def#features": 4, "network_def#levels": 2}
#: a tiny network of the shipped recipe (RGB input, bilinear decoder), what inference.json builds with TINY
RECIPE = {"in_channels": 3, "upsample": "bilinear"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(DSHFN(features=4, levels=2, **RECIPE).state_dict(), path)
    return path


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def bundle_run(*overrides: str, torchrun: bool = False, rc: int = 0) -> str:
    cmd = ["-m", "monai.bundle", "run", "inference", "--config_file", str(ROOT / "configs" / "inference.json"),
           *[str(o) for o in overrides]]
    for key, value in TINY.items():
        cmd += [f"--{key}", str(value)]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run(prefix + cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if " - ERROR - " in line and "skipped" not in line]
    assert proc.returncode == rc, "\n".join(errors[:5]) + out[-3000:]
    return out


def check_nucleus_outputs(out: Path, stem: str, size_hw: tuple[int, int]) -> int:
    labels = np.asarray(Image.open(out / f"{stem}_instances.png"))
    assert labels.dtype == np.uint16 and labels.shape == size_hw
    features = json.loads((out / f"{stem}.geojson").read_text())["features"]
    rows = list(csv.DictReader(open(out / f"{stem}_nuclei.csv")))
    ids = sorted(int(r["id"]) for r in rows)
    assert ids == sorted(f["properties"]["instance_id"] for f in features) == sorted(np.unique(labels[labels > 0]).tolist())
    counts = np.bincount(labels.ravel())
    assert all(int(r["area_px"]) == counts[int(r["id"])] for r in rows)
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    assert overlay.shape == (*size_hw, 3)
    return len(ids)


def test_inference_config_folder_mode_reports_bad_tiles_and_resumes(ckpt, tnbc_dir, monuseg_dir, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.open(tnbc_dir / "images" / "01_1.png").save(tiles / "a.png")
    Image.open(sorted((monuseg_dir / "images").glob("*.png"))[0]).crop((0, 0, 500, 300)).save(tiles / "b.tif")
    truncated_copy(tiles / "a.png", tiles / "c.png")
    out = tmp_path / "out"
    args = ["--input_dir", tiles, "--output_dir", out, "--ckpt_path", ckpt]
    bundle_run(*args, rc=1)  # one image failed: visible to a script driving the command
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["images_done"] == 2 and summary["images_failed"] == 1 and summary["images_skipped"] == 0
    assert summary["failed"][0]["tile"].endswith("c.png") and "c.png" in summary["failed"][0]["error"]
    nuclei = check_nucleus_outputs(out, "a", (512, 512)) + check_nucleus_outputs(out, "b", (300, 500))
    assert summary["nuclei"] == nuclei > 0
    assert not list(out.glob("c*")) and not list(out.glob(".*"))  # nothing for the bad tile, no temp files
    # resume: finished tiles are skipped and untouched, the bad one is tried (and reported) again
    before = (out / "a.geojson").stat().st_mtime_ns
    log = bundle_run(*args, rc=1)
    summary = json.loads((out / "segment_summary.json").read_text())
    assert (summary["images_done"], summary["images_skipped"], summary["images_failed"]) == (0, 2, 1)
    assert "2 of 3 images already have their outputs" in log and "c.png: skipped" in log
    assert (out / "a.geojson").stat().st_mtime_ns == before
    # "--skip_existing false" reaches the engine as the string 'false' (fire): it must redo every tile
    bundle_run(*args, "--skip_existing", "false", rc=1)
    summary = json.loads((out / "segment_summary.json").read_text())
    assert (summary["images_done"], summary["images_skipped"], summary["images_failed"]) == (2, 0, 1)
    assert (out / "a.geojson").stat().st_mtime_ns > before


def test_inference_config_under_torchrun_processes_every_tile_once(ckpt, tnbc_dir, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    sources = sorted((tnbc_dir / "images").glob("*.png"))[:5]
    for i, src in enumerate(sources):
        Image.open(src).crop((0, 0, 128, 128)).save(tiles / f"t{i}.png")
    out = tmp_path / "out"
    bundle_run("--input_dir", tiles, "--output_dir", out, "--ckpt_path", ckpt, "--formats", "['csv','mask']",
               torchrun=True)
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["done"] == [f"t{i}" for i in range(5)]  # all, each once (the list would repeat a duplicate)
    assert summary["done_per_rank"] == [3, 2] and summary["images_done"] == 5
    assert all((out / f"t{i}_mask.png").is_file() and (out / f"t{i}_nuclei.csv").is_file() for i in range(5))


def test_segment_cli_loads_checkpoints_and_rejects_a_mismatch(ckpt, tnbc_dir, tmp_path, caplog):
    cli = _segment_module()
    tile = tmp_path / "t.png"
    Image.open(tnbc_dir / "images" / "01_1.png").crop((0, 0, 96, 96)).save(tile)
    # the default network (features 16) and the tiny checkpoint: one line, exit 2, nothing written for the tile
    with caplog.at_level("ERROR", logger="segment"):
        assert cli.main(["--input", str(tile), "--output_dir", str(tmp_path / "out"), "--ckpt", str(ckpt),
                         "--device", "cpu", "--no_progress"]) == 2
    assert "does not fit the network" in caplog.text and not list((tmp_path / "out").glob("t_*"))
    net = DSHFN(features=4, levels=2, **RECIPE)
    load_weights(net, str(ckpt), torch.device("cpu"))
    torch.testing.assert_close(net.state_dict(), torch.load(ckpt))
    torch.save({"model": DSHFN(features=4, levels=2, **RECIPE).state_dict()}, tmp_path / "wrapped.pt")
    load_weights(net, str(tmp_path / "wrapped.pt"), torch.device("cpu"))  # a {"model": ...} checkpoint
    with pytest.raises(DataError, match="does not fit the network"):
        load_weights(DSHFN(features=8, levels=2, **RECIPE), str(ckpt), torch.device("cpu"))
    with pytest.raises(DataError, match="not found"):
        load_weights(net, str(tmp_path / "missing.pt"), torch.device("cpu"))


def _segment_module():
    spec = importlib.util.spec_from_file_location("segment_cli", ROOT / "scripts" / "segment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segment_cli_large_tile_slide_and_folder(ckpt, monuseg_dir, tmp_path):
    images = [read_image(p) for p in sorted((monuseg_dir / "images").glob("*.png"))[:2]]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    tifffile.imwrite(inputs / "big.tif", images[0][:600, :560], tile=(128, 128), compression="zlib", photometric="rgb")
    level0 = np.concatenate(images, 1)[:512, :1024]
    with tifffile.TiffWriter(inputs / "slide.tif") as tw:  # two-level pyramid, 0.25 um/px at level 0
        for k in (0, 1):
            tw.write(level0[:: 2**k, :: 2**k], tile=(128, 128), compression="zlib", photometric="rgb",
                     subfiletype=1 if k else 0, resolution=(1e4 / (0.25 * 2**k),) * 2, resolutionunit="CENTIMETER")
    truncated_copy(inputs / "big.tif", inputs / "broken.tif")
    override = tmp_path / "stub.json"  # a stand-in network that finds the dark nuclei (a random one finds noise)
    # at 0.5 um/px on the gray input, the chunk counts below are those of a 600 x 560 40x tile halved
    override.write_text(json.dumps({"network_def": {"_target_": "bundle.research.bench.inference.IntensityNet"},
                                    "patch_size": [64, 64], "model_pixel_size": 0.5, "input_mode": "gray"}))
    out = tmp_path / "out"
    cli = _segment_module()
    argv = ["--input", str(inputs), "--output_dir", str(out), "--ckpt", "none", "--config_file",
            str(ROOT / "configs" / "inference.json"), "--config_file", str(override), "--chunk", "144", "--halo", "24",
            "--post_chunk", "256", "--device", "cpu", "--no_progress"]
    assert cli.main(argv) == 1  # one input failed
    run = json.loads((out / "segment_summary.json").read_text())
    assert run["done"] == ["big", "slide"] and run["images_failed"] == 1 and "broken.tif" in run["failed"][0]["error"]
    big = json.loads((out / "big_summary.json").read_text())
    assert big["chunks"] == 6 and big["truncated"] == 0 and big["shape"] == [600, 560]
    assert check_nucleus_outputs(out, "big", (600, 560)) == big["nuclei"] > 0
    slide = json.loads((out / "slide_summary.json").read_text())
    assert slide["level"] == 0 and slide["pixel_size"] == pytest.approx(0.25) and slide["chunks"] == 8
    features = json.loads((out / "slide.geojson").read_text())["features"]
    assert len(features) == slide["nuclei"] == run["nuclei"] - big["nuclei"]
    assert not (out / "slide_instances.png").exists()  # slide mode: no image-sized outputs
    # level 1 of the same slide through --level: coordinates stay in level-0 pixels
    cli.main(["--input", str(inputs / "slide.tif"), "--output_dir", str(tmp_path / "lv1"), "--level", "1", *argv[4:]])
    lv1 = json.loads((tmp_path / "lv1" / "slide.geojson").read_text())["features"]
    xs = [p[0] for f in lv1 for p in f["geometry"]["coordinates"][0] if f["geometry"]["type"] == "Polygon"]
    assert len(lv1) > 0 and max(xs) > 600 and max(xs) <= 1024 and all(x % 2 == 0 for x in xs)
    # resume: both finished images skipped
    assert cli.main(argv) == 1
    run = json.loads((out / "segment_summary.json").read_text())
    assert (run["images_done"], run["images_skipped"], run["images_failed"]) == (0, 2, 1)
