"""The one inference engine (bundle.inference.engine) behind both front ends: byte-identical outputs from
``configs/inference.json`` and ``scripts/segment.py``, the resume rule, images shared by ranks, a bad image in a
folder, per-pixel map formats. The network is ``bundle.research.bench.inference.IntensityNet`` (dark = nucleus, no weights),
so runs take seconds and find real nuclei on the synthetic tiles of tests/test_user_files.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.core.errors import DataError
from bundle.inference.engine import (
    DONE_SUFFIX,
    SUMMARY_FILE,
    NucleiSegmenter,
    load_segmenter,
)
from tests.test_user_files import STUB, tissue

ROOT = Path(__file__).resolve().parents[1]
NUCLEUS_FILES = ("{}.geojson", "{}_nuclei.csv", "{}_instances.png", "{}_overlay.png", "{}_mask.png", "{}_region.png",
                 "{}_boundary.png")


@pytest.fixture(scope="module")
def stub_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stub") / "stub.json"
    path.write_text(json.dumps(STUB))
    return path


def segmenter(stub_config, **overrides) -> NucleiSegmenter:
    ids = {"ckpt_path": None, "device": "cpu", "progress": False, "chunk": 128, "halo": 24, **overrides}
    return load_segmenter([str(ROOT / "configs" / "inference.json"), str(stub_config)], **ids)


def tiles(folder: Path, n: int = 3, shape=(160, 192)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(tissue(shape, seed=i)).save(folder / f"t{i}.png")
    return [f"t{i}" for i in range(n)]


def test_both_front_ends_write_byte_identical_outputs(stub_config, tmp_path):
    names = tiles(tmp_path / "in", 2)
    formats = ["png", "geojson", "csv", "overlay", "mask", "prob"]
    seg = tmp_path / "seg"
    cmd = [sys.executable, str(ROOT / "scripts" / "segment.py"), "--input", str(tmp_path / "in"), "--output_dir", str(seg),
           "--ckpt", "none", "--config_file", str(ROOT / "configs" / "inference.json"), "--config_file", str(stub_config),
           "--device", "cpu", "--no_progress", "--formats", *formats]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600).returncode == 0
    inf = tmp_path / "inf"
    config = f"['{ROOT / 'configs' / 'inference.json'}','{stub_config}']"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config,
                           "--input_dir", str(tmp_path / "in"), "--output_dir", str(inf), "--ckpt_path", "$None",
                           "--progress", "False", "--formats", repr(formats)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in names:
        for pattern in NUCLEUS_FILES:
            a, b = seg / pattern.format(name), inf / pattern.format(name)
            assert a.read_bytes() == b.read_bytes(), a.name
        assert json.loads((seg / f"{name}{DONE_SUFFIX}").read_text())["nuclei"] > 5
    one, other = (json.loads((d / SUMMARY_FILE).read_text()) for d in (seg, inf))
    assert one == other and one["images_done"] == 2


def test_resume_needs_the_marker_and_every_format(stub_config, tmp_path):
    names = tiles(tmp_path / "in", 2)
    out = tmp_path / "out"
    first = segmenter(stub_config, formats=["csv"]).run(tmp_path / "in", out)
    assert first["images_done"] == 2
    (out / f"{names[1]}{DONE_SUFFIX}").unlink()  # as if killed before its marker: redone
    again = segmenter(stub_config, formats=["csv"]).run(tmp_path / "in", out)
    assert (again["images_done"], again["images_skipped"], again["nuclei"]) == (1, 1, first["nuclei"])
    more = segmenter(stub_config, formats=["csv", "mask"]).run(tmp_path / "in", out)  # a format missing: redone
    assert more["images_done"] == 2 and all((out / f"{n}_mask.png").is_file() for n in names)
    fresh = segmenter(stub_config, formats=["csv"], skip_existing=False).run(tmp_path / "in", out)
    assert fresh["images_done"] == 2 and fresh["images_skipped"] == 0


def test_ranks_share_the_images_each_once(stub_config, tmp_path, monkeypatch):
    names = tiles(tmp_path / "in", 5, (96, 96))
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        # without torch.distributed each rank reports only its own share
        done.append(segmenter(stub_config, formats=["csv"]).run(tmp_path / "in", tmp_path / f"out{rank}")["done"])
    assert sorted(done[0] + done[1]) == names and not set(done[0]) & set(done[1])
    assert done == [["t0", "t2", "t4"], ["t1", "t3"]]  # monai.data.partition_dataset: interleaved, no padding


def test_a_bad_image_is_listed_and_the_rest_done(stub_config, tmp_path):
    tiles(tmp_path / "in", 2)
    data = (tmp_path / "in" / "t0.png").read_bytes()
    (tmp_path / "in" / "bad.png").write_bytes(data[: len(data) // 2])
    result = segmenter(stub_config, formats=["png"]).run(tmp_path / "in", tmp_path / "out")
    assert result["done"] == ["t0", "t1"] and result["images_failed"] == 1
    assert "bad.png" in result["failed"][0]["tile"] and not list((tmp_path / "out").glob("bad*"))
    only_bad = tmp_path / "only"
    only_bad.mkdir()
    (only_bad / "bad.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="every image failed"):
        segmenter(stub_config).run(only_bad, tmp_path / "out2")


def test_map_formats_are_the_network_maps_and_refused_for_huge_images(stub_config, tmp_path, monkeypatch):
    tiles(tmp_path / "in", 1)
    out = tmp_path / "out"
    segmenter(stub_config, formats=["mask", "prob", "nifti", "png"]).run(tmp_path / "in", out)
    region = np.asarray(Image.open(out / "t0_region.png"))
    mask = np.asarray(Image.open(out / "t0_mask.png"))
    assert region.shape == mask.shape == (160, 192) and set(np.unique(mask)) == {0, 255}
    # the mask is the region probability above the threshold (0.5 -> 127.5 in the x255 PNG, up to rounding)
    assert ((region >= 129) <= (mask == 255)).all() and ((mask == 255) <= (region >= 127)).all()
    import nibabel as nib

    nii = np.asarray(nib.load(out / "t0_pred.nii.gz").dataobj)
    assert nii.shape[:2] == (160, 192) and nii.shape[-1] == 2
    from bundle.inference import writers

    monkeypatch.setattr(writers, "PNG_MAX_PIXELS", 100 * 100)
    with pytest.raises(DataError, match="too large for the per-pixel outputs"):
        writers.TileOutputs(tmp_path, "x", (160, 192), ["mask"])


@pytest.mark.parametrize("ids,message", [
    ({"formats": ["pdf"]}, "unknown output format"),
    ({"chunk": 64, "patch_size": [128, 128]}, "chunk 64 is smaller than the network's window"),
    ({"pixel_size": 40}, "pixel_size=40"),
])
def test_bad_settings_are_one_line_errors(stub_config, ids, message):
    from bundle.core.cli import find_data_error

    with pytest.raises(Exception) as info:  # the config parser wraps it; the entry points print the DataError
        segmenter(stub_config, **ids)
    assert message in str(find_data_error(info.value))
