"""A user's own files through both inference front ends (``configs/inference.json`` and ``scripts/segment.py``),
every input built here: one decoding rule (16-bit, float [0, 1] / [0, 255], multi-frame), ids that would collide,
an output folder that is the input folder, reruns with more formats, temp files of a killed run, ordinary file
names, a bad file in a folder, absurd numbers, corrupt or mismatched checkpoints, an Aperio slide through
OpenSlide. Bad input must stop with one line naming the file or option, before any network work.

The network is ``bundle.research.bench.inference.IntensityNet`` (dark = nucleus; no weights), so the runs take seconds and
find real nuclei on the synthetic tiles."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bundle.core.errors import DataError
from bundle.data.io import read_image, read_label_and_kind
from bundle.inference.files import clean_stale_temp, find_tiles, tiles_for_run
from bundle.inference.slide import WSISource, open_source
from bundle.model.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
STUB = {"network_def": {"_target_": "bundle.research.bench.inference.IntensityNet"}, "patch_size": [64, 64]}


def tissue(shape=(192, 224), seed=0) -> np.ndarray:
    """Pink background with dark purple disks of varied shade: what IntensityNet segments."""
    rng = np.random.default_rng(seed)
    h, w = shape
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = (228, 190, 212)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(40):
        y, x, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 8)
        rgb[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = (rng.integers(60, 110), 30, rng.integers(110, 150))
    return np.clip(rgb.astype(int) + rng.integers(-6, 7, rgb.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stub(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stub")
    (d / "stub.json").write_text(json.dumps(STUB))
    torch.save({}, d / "stub.pt")  # IntensityNet has no weights
    return {"config": d / "stub.json", "ckpt": d / "stub.pt"}


def bundle_run(stub, *overrides, ok=True) -> subprocess.CompletedProcess:
    config = f"['{ROOT / 'configs' / 'inference.json'}','{stub['config']}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config,
           "--ckpt_path", str(stub["ckpt"]), "--chunk", "128", "--halo", "24", "--progress", "False",
           *[str(o) for o in overrides]]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def segment_cli():
    spec = importlib.util.spec_from_file_location("segment_cli_user_files", ROOT / "scripts" / "segment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def segment(stub, inputs, out, *extra) -> int:
    return segment_cli().main(["--input", str(inputs), "--output_dir", str(out), "--ckpt", "none", "--config_file",
                               str(ROOT / "configs" / "inference.json"), "--config_file", str(stub["config"]),
                               "--device", "cpu", "--no_progress", "--chunk", "128", "--halo", "24", *map(str, extra)])


def labels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def write_variants(folder: Path, rgb: np.ndarray) -> dict[str, Path]:
    """The same tile as 8-bit PNG, 8-bit TIFF, 16-bit TIFF (v * 257), float TIFFs in [0, 1] and [0, 255]."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"png8": folder / "png8.png", "tif8": folder / "tif8.tif", "u16": folder / "u16.tif",
             "f01": folder / "f01.tif", "f255": folder / "f255.tif"}
    Image.fromarray(rgb).save(paths["png8"])
    tifffile.imwrite(paths["tif8"], rgb, photometric="rgb", tile=(64, 64))
    tifffile.imwrite(paths["u16"], rgb.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))
    tifffile.imwrite(paths["f01"], rgb.astype(np.float32) / 255, photometric="rgb")
    tifffile.imwrite(paths["f255"], rgb.astype(np.float32), photometric="rgb", rowsperstrip=16)
    return paths


def write_frames(path: Path, rgb: np.ndarray) -> Path:
    """Three frames as three separate pages (each its own series): a reader that takes page 0 silently is wrong."""
    with tifffile.TiffWriter(path) as tw:
        for frame in (rgb, rgb[::-1], rgb[:, ::-1]):
            tw.write(np.ascontiguousarray(frame), photometric="rgb")
    return path


# --------------------------------------------------------------------------------------------- decoding, unit
def test_one_decoding_rule_for_whole_tiles_and_regions(tmp_path):
    rgb = tissue()
    paths = write_variants(tmp_path, rgb)
    for name, path in paths.items():
        np.testing.assert_array_equal(read_image(path), rgb, err_msg=name)  # inference.json's reader
        source = open_source(path)  # segment.py's reader: TIFF region by region
        assert isinstance(source, WSISource) or path.suffix == ".png"
        np.testing.assert_array_equal(source.read(0, rgb.shape[0], 0, rgb.shape[1]), rgb, err_msg=name)
        np.testing.assert_array_equal(source.read(37, 101, 50, 190), rgb[37:101, 50:190], err_msg=name)
    # [0, 1] vs [0, 255] is decided on the whole image, not per region: a dark region of a [0, 255] float image
    dark = rgb.astype(np.float32)
    dark[:64, :64] = 0.5
    tifffile.imwrite(tmp_path / "dark.tif", dark, photometric="rgb", tile=(64, 64))
    assert (WSISource(tmp_path / "dark.tif").read(0, 64, 0, 64) <= 1).all()
    # other ranges, NaN, multi-frame: one line naming the file, in both readers
    tifffile.imwrite(tmp_path / "f2.tif", rgb.astype(np.float32) * 4, photometric="rgb")  # e.g. 10-bit as float
    bad_nan = rgb.astype(np.float32) / 255
    bad_nan[5, 5, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad_nan, photometric="rgb")
    write_frames(tmp_path / "frames.tif", rgb)
    for name, pattern in (("f2.tif", r"f2\.tif.*neither \[0, 1\] nor \[0, 255\]"), ("nan.tif", r"nan\.tif.*NaN"),
                          ("frames.tif", r"frames\.tif.*stack")):
        with pytest.raises(DataError, match=pattern):
            read_image(tmp_path / name)
        with pytest.raises(DataError, match=pattern):
            open_source(tmp_path / name).read(0, 8, 0, 8)


def test_both_front_ends_find_the_same_nuclei_in_16bit_and_float_tiffs(stub, tmp_path):
    rgb = tissue((256, 288))
    tiles = tmp_path / "tiles"
    paths = write_variants(tiles, rgb)
    write_frames(tiles / "frames.tif", rgb)
    # segment.py (exit 1: the 3-frame TIFF failed, the rest done)
    assert segment(stub, tiles, tmp_path / "seg") == 1
    # configs/inference.json (exit 1 too: a partial failure is visible to a script driving the command)
    assert bundle_run(stub, "--input_dir", tiles, "--output_dir", tmp_path / "inf", ok=False).returncode == 1
    for folder in ("seg", "inf"):
        summary = json.loads((tmp_path / folder / "segment_summary.json").read_text())
        assert summary["done"] == sorted(paths) and "stack" in summary["failed"][0]["error"]
        ref = labels(tmp_path / folder / "png8_instances.png")
        assert ref.max() >= 20
        for name in paths:
            np.testing.assert_array_equal(labels(tmp_path / folder / f"{name}_instances.png"), ref, err_msg=name)


# ---------------------------------------------------------------------------------- file names and output folders
def test_ordinary_file_names_work_in_the_config(stub, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    names = ["slide 1", "tile(2)", "ñ"]
    for i, n in enumerate(names):
        Image.fromarray(tissue((128, 128), seed=i)).save(tiles / f"{n}.png")
    proc = bundle_run(stub, "--input_dir", tiles, "--output_dir", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "segment_summary.json").read_text())
    assert summary["images_failed"] == 0 and summary["done"] == sorted(names)
    # the last line names the counts and where the outputs are
    assert proc.stdout.strip().splitlines()[-1].endswith(
        f"3 images done, 0 skipped (outputs existed), 0 failed, {summary['nuclei']} nuclei; outputs in {tmp_path / 'out'}")
    for n in names:
        assert (tmp_path / "out" / f"{n}.geojson").is_file() and (tmp_path / "out" / f"{n}_instances.png").is_file()


def test_config_run_with_failures_exits_nonzero_and_no_tile_overwrites_the_run_summary(stub, tmp_path):
    """A script driving ``monai.bundle run`` sees a partial failure: exit 1, the failed files in the summary and on
    the last line. ``segment.png`` would write ``segment_summary.json``, the run's summary: it is refused on its own
    (the rest of the folder runs), and a rerun counts the same nuclei. One bar at a time: no cursor escape codes."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, name in enumerate(["a", "segment", "c"]):
        Image.fromarray(tissue((96, 128), seed=i)).save(tiles / f"{name}.png")
    (tiles / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
           f"['{ROOT / 'configs' / 'inference.json'}','{stub['config']}']", "--ckpt_path", str(stub["ckpt"]),
           "--chunk", "128", "--halo", "24", "--input_dir", str(tiles), "--output_dir", str(out)]  # bars on (default)
    runs = []
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
        summary = json.loads((out / "segment_summary.json").read_text())
        runs.append(summary)
        assert proc.returncode == 1, proc.stdout[-3000:]
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("error: ") and "2 failed" in last and str(out) in last, last
        assert "segment.png" in last and "broken.png" in last and "Traceback" not in proc.stdout
        assert sorted(Path(f["tile"]).name for f in summary["failed"]) == ["broken.png", "segment.png"]
        assert "\x1b" not in proc.stdout  # nested bars would move the cursor with escape codes
    first, second = runs
    assert (first["images_done"], first["images_skipped"], first["images_failed"]) == (2, 0, 2)
    assert (second["images_done"], second["images_skipped"], second["images_failed"]) == (0, 2, 2)
    assert first["done"] == ["a", "c"] and second["nuclei"] == first["nuclei"] > 0
    assert "overwrite the run's segment_summary.json" in next(f["error"] for f in first["failed"]
                                                              if f["tile"].endswith("segment.png"))


def test_script_values_are_data_not_code(stub, tmp_path, caplog):
    """segment.py hands --ckpt and --device to the config parser: a leading $ must not run. A path is kept (a file
    really named so is read as such), anything else is refused with one line."""
    Image.fromarray(tissue((96, 96))).save(tmp_path / "t.png")
    pwned = tmp_path / "pwned"
    code = f"$__import__('pathlib').Path({str(pwned)!r}).touch() or {str(stub['ckpt'])!r}"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "segment.py"), "--input", "t.png", "--output_dir",
                           "out", "--ckpt", code, "--device", "cpu", "--no_progress", "--config_file",
                           str(ROOT / "configs" / "inference.json"), "--config_file", str(stub["config"])],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not pwned.exists(), proc.stderr[-2000:]
    assert "checkpoint not found. Train the bundle first or pass --ckpt models/model.pt" in proc.stderr
    with caplog.at_level(logging.ERROR, logger="segment"):
        assert segment(stub, tmp_path / "t.png", tmp_path / "out", "--device", code.replace(str(stub["ckpt"]), "cpu")) == 2
    assert not pwned.exists() and "--device" in caplog.text and "may not start with $" in caplog.text


def test_same_id_twice_and_output_folder_equal_to_input_are_refused(stub, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(tissue((96, 96))).save(tiles / "a.png")
    Image.fromarray(tissue((96, 96), seed=1)).save(tiles / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png|a\.jpg.*a\.png"):
        find_tiles(tiles)
    assert segment(stub, tiles, tmp_path / "seg") == 2 and not (tmp_path / "seg" / "a_summary.json").exists()
    proc = bundle_run(stub, "--input_dir", tiles, "--output_dir", tmp_path / "inf", ok=False)
    assert proc.returncode != 0 and "a.jpg" in proc.stderr and "a.png" in proc.stderr and "Traceback" not in proc.stderr
    (tiles / "a.jpg").unlink()
    with pytest.raises(DataError, match="output folder is the input folder"):
        tiles_for_run(tiles, tiles)
    assert segment(stub, tiles, tiles) == 2 and sorted(p.name for p in tiles.iterdir()) == ["a.png"]


def test_rerun_with_more_formats_writes_them_and_keeps_the_nuclei_count(stub, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(tissue((128, 160))).save(tiles / "t.png")
    out = tmp_path / "seg"
    assert segment(stub, tiles, out, "--formats", "png") == 0
    first = json.loads((out / "segment_summary.json").read_text())
    assert not (out / "t_nuclei.csv").exists() and first["nuclei"] > 0
    assert segment(stub, tiles, out, "--formats", "png", "csv") == 0  # csv missing: the tile is redone
    second = json.loads((out / "segment_summary.json").read_text())
    assert (out / "t_nuclei.csv").is_file() and second["images_done"] == 1 and second["nuclei"] == first["nuclei"]
    assert segment(stub, tiles, out, "--formats", "csv") == 0  # all there: skipped, the count kept
    third = json.loads((out / "segment_summary.json").read_text())
    assert (third["images_done"], third["images_skipped"], third["nuclei"]) == (0, 1, first["nuclei"])
    # the config front end follows the same resume rule: its marker and an output of every format asked
    inf = tmp_path / "inf"
    bundle_run(stub, "--input_dir", tiles, "--output_dir", inf, "--formats", "['png']")
    assert not (inf / "t.geojson").exists()
    bundle_run(stub, "--input_dir", tiles, "--output_dir", inf, "--formats", "['png','geojson']")
    summary = json.loads((inf / "segment_summary.json").read_text())
    assert (inf / "t.geojson").is_file() and summary["images_done"] == 1 and summary["nuclei"] == first["nuclei"]


def test_temp_files_of_a_killed_run_are_removed_on_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a writer that died
    stale = [tmp_path / f".t_instances.png.{dead.pid}.ab12cd34.tmp.png", tmp_path / f".t.geojson.{dead.pid}.partial"]
    live = [tmp_path / f".u.geojson.{os.getpid()}.partial", tmp_path / f".u_overlay.png.{os.getpid()}.x.tmp.png"]
    keep = [tmp_path / "t.png", tmp_path / ".hidden"]
    for p in stale + live + keep:
        p.write_bytes(b"x")
    assert clean_stale_temp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in live + keep)


# --------------------------------------------------------------------------------------- bad files, bad numbers
def test_a_bad_file_does_not_stop_a_folder_run(stub, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    # a TIFF header whose only IFD has no entries: no image at all
    (tiles / "a_empty.tif").write_bytes(b"II*\x00" + struct.pack("<IHI", 8, 0, 0))
    Image.fromarray(tissue((96, 96))).save(tiles / "b.png")
    assert segment(stub, tiles, tmp_path / "out") == 1  # partly done
    run = json.loads((tmp_path / "out" / "segment_summary.json").read_text())
    assert run["done"] == ["b"] and run["images_failed"] == 1
    assert "a_empty.tif" in run["failed"][0]["error"] and "no image data" in run["failed"][0]["error"]
    (tiles / "b.png").unlink()
    assert segment(stub, tiles, tmp_path / "out2") == 2  # nothing useful produced


@pytest.mark.parametrize("option,value,message", [
    ("--pixel_size", "0", "outside 0.05..5"), ("--pixel_size", "-0.25", "outside 0.05..5"),
    ("--pixel_size", "40", "give --pixel_size 0.25"), ("--pixel_size", "1e-6", "outside 0.05..5"),
    ("--chunk", "0", "--chunk 0"), ("--chunk", "-5", "--chunk -5"), ("--chunk", "32", "smaller than the network's window"),
])
def test_absurd_numbers_are_refused_before_any_work(stub, tmp_path, caplog, option, value, message):
    Image.fromarray(tissue((96, 96))).save(tmp_path / "t.png")
    with caplog.at_level(logging.ERROR, logger="segment"):
        assert segment(stub, tmp_path / "t.png", tmp_path / "out", option, value) == 2
    assert message in caplog.text and not (tmp_path / "out" / "t_summary.json").exists()


def test_segment_messages_for_output_dir_empty_folder_and_corrupt_checkpoint(stub, tmp_path, caplog):
    Image.fromarray(tissue((96, 96))).save(tmp_path / "t.png")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.ERROR, logger="segment"):
        assert segment(stub, tmp_path / "t.png", tmp_path / "afile") == 2
        assert segment(stub, tmp_path / "empty", tmp_path / "out") == 2
    assert "--output_dir is a file" in caplog.text and "Point --input at a folder" in caplog.text
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint" * 50)
    with pytest.raises(DataError, match=r"corrupt\.pt: is not a readable PyTorch weights file"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "corrupt.pt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt: does not fit the network") as err:
        load_weights(torch.nn.Conv2d(2, 2, 1), tmp_path / "other.pt")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_config_bad_input_is_one_line_and_nonzero(stub, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(tissue((96, 96))).save(tiles / "t.png")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage" * 100)
    from bundle.model.network import DSHFN

    torch.save(DSHFN(features=4, levels=2).state_dict(), tmp_path / "dshfn.pt")  # weights of another network
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    cases = [
        (["--input_dir", tiles, "--output_dir", tmp_path / "o1", "--pixel_size", "40"], "give pixel_size 0.25"),
        (["--input_dir", tiles, "--output_dir", tmp_path / "afile"], "--output_dir is a file"),
        (["--input_dir", tiles, "--output_dir", tmp_path / "o2", "--ckpt_path", tmp_path / "corrupt.pt"],
         "corrupt.pt: is not a readable PyTorch weights file"),
        (["--input_dir", tiles, "--output_dir", tmp_path / "o3", "--ckpt_path", tmp_path / "dshfn.pt"],
         "dshfn.pt: does not fit the network"),
        (["--input_dir", bad, "--output_dir", tmp_path / "o4"], "every image failed"),
    ]
    for args, message in cases:
        proc = bundle_run(stub, *args, ok=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and len(errors[0]) < 600


def test_a_mask_with_other_values_is_read_as_instances_with_one_warning(tmp_path, caplog):
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 2:6], mask[8:12, 8:12] = 255, 128  # e.g. an anti-aliased or resampled 0/255 mask
    Image.fromarray(mask).save(tmp_path / "m.png")
    with caplog.at_level(logging.WARNING, logger="bundle.data.io"):
        assert read_label_and_kind(tmp_path / "m.png")[1] == "instance"
        read_label_and_kind(tmp_path / "m.png")
    lines = [r.getMessage() for r in caplog.records if "m.png" in r.getMessage()]
    assert len(lines) == 1 and "INSTANCE map" in lines[0]


# --------------------------------------------------------------------------------------------------- security
def test_device_is_data_and_checkpoints_load_weights_only(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from bundle.handlers.checkpoints import ResumableCheckpoint
    from bundle.research.launch import device_name

    assert device_name("cpu") == "cpu" and device_name("cuda:1") == "cuda:1"
    with pytest.raises(DataError, match="not a torch device"):
        device_name("cpu'); __import__('os').system('touch pwned'); ('")
    monkeypatch.setenv("DSHFN_TEST_PLANTED", str(tmp_path / "planted"))
    torch.save({"trainer": Planted()}, tmp_path / "checkpoint.pt")  # pickled code, not weights
    trainer = Engine(lambda e, b: None)
    handler = ResumableCheckpoint(str(tmp_path / "checkpoint.pt"), {}, resume=True)
    with pytest.raises(DataError, match="cannot read the checkpoint.*pickled objects or code.*--resume false") as err:
        handler.load(trainer)
    assert "weights_only" not in str(err.value)
    assert not (tmp_path / "planted").exists()


class Planted:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["DSHFN_TEST_PLANTED"]),))


# ------------------------------------------------------------------------------------------------ vendor slides
def test_aperio_slide_through_openslide_and_segment(stub, tmp_path):
    openslide = pytest.importorskip("openslide")
    image = np.concatenate([tissue((256, 256), seed=s) for s in range(3)], 1)  # 256 x 768
    desc = "Aperio Image Library v12.0.0\r\n768x256 [0,0 768x256] (128x128) RAW/RGB|AppMag = 40|MPP = 0.25"
    kw = dict(tile=(128, 128), compression="zlib", photometric="rgb", metadata=None)
    with tifffile.TiffWriter(tmp_path / "slide.svs") as tw:
        tw.write(image, description=desc, **kw)
        tw.write(image[::2, ::2], description="Aperio Image Library v12.0.0\r\n384x128", **kw)
    assert openslide.OpenSlide.detect_format(str(tmp_path / "slide.svs")) == "aperio"
    source = WSISource(tmp_path / "slide.svs")
    assert source.backend == "openslide" and source.mpp == pytest.approx(0.25) and source.n_levels == 2
    np.testing.assert_array_equal(source.read(10, 200, 300, 700), image[10:200, 300:700])
    out = tmp_path / "out"
    assert segment(stub, tmp_path / "slide.svs", out) == 0
    summary = json.loads((out / "slide_summary.json").read_text())
    features = json.loads((out / "slide.geojson").read_text())["features"]
    assert summary["pixel_size"] == pytest.approx(0.25) and len(features) == summary["nuclei"] >= 60
    # the same pixels as a plain tiled TIFF through the tifffile reader: the same nuclei
    tifffile.imwrite(tmp_path / "plain.tif", image, tile=(128, 128), photometric="rgb")
    assert segment(stub, tmp_path / "plain.tif", tmp_path / "plain", "--slide", "yes", "--pixel_size", "0.25") == 0
    assert json.loads((tmp_path / "plain" / "plain_summary.json").read_text())["nuclei"] == summary["nuclei"]
