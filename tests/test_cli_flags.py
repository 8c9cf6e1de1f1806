"""bundle.core.cli.as_flag: command-line switches arrive from ``monai.bundle run`` as strings ('false' stays a string
under fire), so they are read by word, never by Python truthiness."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.core.cli import as_flag
from bundle.core.errors import DataError
from bundle.handlers.checkpoints import ResumableCheckpoint
from bundle.inference.engine import NucleiSegmenter
from bundle.model.network import DSHFN


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("False", False),
                                            ("false", False), (" NO ", False), ("on", True), ("0", False), (1, True),
                                            (0, False)])
def test_words_and_bools(value, expected):
    assert as_flag(value, "x") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", None])
def test_anything_else_is_one_clear_error(value):
    with pytest.raises(DataError, match=r"^--resume .*: give true or false"):
        as_flag(value, "--resume")


def test_engine_and_checkpoint_read_switches_by_word(tmp_path):
    seg = NucleiSegmenter(DSHFN(features=4, levels=2, streams="local"), resume="false", progress="false", amp="false")
    assert (seg.resume, seg.progress, seg.amp) == (False, False, False)
    assert ResumableCheckpoint(str(tmp_path / "c.pt"), {}, resume="false").resume is False
    assert ResumableCheckpoint(str(tmp_path / "c.pt"), {}, resume="true").resume is True


# ------------------------------------------------------------------------------- through `monai.bundle run`
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--features", "4"]  # a narrow network: an id of every config that builds one


def _index(handlers: list[dict], target: str) -> int:
    return next(i for i, h in enumerate(handlers) if h["_target_"].endswith(target))


def probe_run(tmp_path: Path, configs: list[str], probe: list[str], *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``monai.bundle run probe`` on ``configs`` plus a file whose ``probe`` prints ``PROBE <dict>``: the values the
    configs' components receive from the overrides as the command line gives them (fire keeps 'false' a string)."""
    extra = tmp_path / "probe.json"
    extra.write_text(json.dumps({"probe": probe}))
    files = "[" + ",".join(repr(str(ROOT / "configs" / c)) for c in configs) + f",{str(extra)!r}]"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "probe", "--config_file", files, *overrides],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, proc.stderr[-3000:]
    return proc, ast.literal_eval(line[len("PROBE "):])


def test_training_and_evaluation_switches_read_false_as_off_on_the_command_line(tmp_path):
    train = json.loads((ROOT / "configs" / "train.json").read_text())
    resume = _index(train["train"]["handlers"], "ResumableCheckpoint")
    probe = ["$print('PROBE', {'chain': [type(t).__name__ for t in @base_transforms], "
             "'train_amp': @train#trainer#amp, 'eval_amp': @validate#evaluator#amp, "
             f"'resume': @train#handlers#{resume}#resume, "
             "'eval_handlers': [type(h).__name__ for h in @validate#handlers]})",
             "@datasets"]
    missing = tmp_path / "missing"
    proc, got = probe_run(tmp_path, ["train.json", "evaluate.json"], probe, "--reinhard", "false", "--amp", "FALSE",
                          "--resume", "no", "--nuclei_metrics", "0", "--download", "false", "--dataset_dir",
                          str(missing), "--output_dir", str(tmp_path / "out"), "--device", "cpu", *TINY)
    assert "ReinhardNormalized" not in got["chain"] and "ToModelScaled" in got["chain"]
    assert got["train_amp"] is False and got["eval_amp"] is False and got["resume"] is False
    assert "InstanceMetricsHandler" not in got["eval_handlers"] and "WeightsLoader" in got["eval_handlers"]
    # --download false: no TNBC download into <dataset_dir>_download, one line saying what to do
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and not (tmp_path / "missing_download").exists()
    assert len(errors) == 1 and "missing or empty and download is off" in errors[0] and "Traceback" not in proc.stderr


def test_inference_switches_read_false_as_off_on_the_command_line(tmp_path):
    probe = ["$print('PROBE', {'reference': @segmenter.reference, 'amp': @segmenter.amp, "
             "'resume': @segmenter.resume, 'progress': @segmenter.progress, "
             "'fill_holes': @segmenter.watershed.fill_holes, 'keep_unmarked': @segmenter.watershed.keep_unmarked})"]
    _, got = probe_run(tmp_path, ["inference.json"], probe, "--reinhard", "false", "--amp", "no", "--skip_existing",
                       "FALSE", "--progress", "0", "--watershed#fill_holes", "off", "--watershed#keep_unmarked",
                       "Yes", "--device", "cpu", *TINY)
    assert got == {"reference": None, "amp": False, "resume": False, "progress": False, "fill_holes": False,
                   "keep_unmarked": True}


def test_a_bad_switch_is_one_line_naming_the_option_as_typed(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tiles / "t.png")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                           str(ROOT / "configs" / "inference.json"), "--input_dir", str(tiles), "--output_dir",
                           str(tmp_path / "out"), "--ckpt_path", "None", "--skip_existing", "maybe", *TINY],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == ["error: --skip_existing 'maybe': give true or false (also yes/no, on/off, 1/0)"]


@pytest.mark.parametrize("configs,key,consumer", [
    (["train.json"], "reinhard", "base_transforms"),
    (["train.json"], "amp", "train#trainer#amp"),
    (["train.json"], "resume", "train#handlers#{resume}#resume"),
    (["train.json"], "download", "datasets"),
    (["train.json", "evaluate.json"], "nuclei_metrics", "validate#handlers"),
    (["train.json", "evaluate.json"], "amp", "validate#evaluator#amp"),
    (["inference.json"], "reinhard", "segmenter"),
    (["inference.json"], "amp", "segmenter"),
    (["inference.json"], "skip_existing", "segmenter"),
    (["inference.json"], "progress", "segmenter"),
    (["inference.json"], "watershed#fill_holes", "segmenter"),
    (["inference.json"], "prefetch", "segmenter"),
    (["inference.json"], "writer_thread", "segmenter"),
    (["inference.json"], "window_cache", "segmenter"),
    (["inference.json"], "onnx_runtime", "segmenter"),
])
def test_every_switch_of_every_config_names_itself(configs, key, consumer, monkeypatch):
    """What each switch's consumer gets from ``--<key> maybe`` (fire's string): one line naming ``--<key>``."""
    from monai.bundle import ConfigParser

    from bundle.core.cli import find_data_error

    resume = _index(json.loads((ROOT / "configs" / "train.json").read_text())["train"]["handlers"], "ResumableCheckpoint")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in configs])
    for k, v in {"features": 4, "device": "cpu", key: "maybe"}.items():
        parser[k] = v
    with pytest.raises(Exception) as err:
        parser.get_parsed_content(consumer.format(resume=resume))
    assert str(find_data_error(err.value)) == f"--{key} 'maybe': give true or false (also yes/no, on/off, 1/0)"


def test_training_pixel_size_errors_name_the_option(tmp_path, monuseg_dir):
    """--pixel_size abc arrives as a string: one line, not a 69-line traceback; 40 (a magnification) names the
    option the user typed, not the dataset entry it fills."""
    from bundle.data.datasets import resolve_datasets

    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                           str(ROOT / "configs" / "train.json"), "--dataset_dir", str(monuseg_dir), "--pixel_size",
                           "abc", "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: --pixel_size='abc' is not a number")
    with pytest.raises(DataError, match=r"^--pixel_size=40 um/px .*give --pixel_size 0.25$"):
        resolve_datasets({}, dataset_dir=monuseg_dir, pixel_size=40)
