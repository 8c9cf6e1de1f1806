"""Bundle packaging: metadata schema, workflow properties, network I/O contract, TorchScript export,
and another project taking the bundle with ``monai.bundle.download`` / ``load``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_every_config_is_valid_json():
    for f in CONFIGS.glob("*.json"):
        json.loads(f.read_text())


def test_metadata_verifies_against_shipped_schema():
    out = _cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "configs/meta_schema.json")
    assert "metadata is verified with no error" in out


def test_metadata_schema_rejects_missing_required_field(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bad), "--filepath",
                           str(CONFIGS / "meta_schema.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "network_data_format" in proc.stdout + proc.stderr


def test_metadata_version_has_changelog_entry():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert "not for diagnosis" in meta["intended_use"].lower()


@pytest.mark.parametrize("workflow_type,config", [("train", "train.json"), ("inference", "inference.json")])
def test_config_workflow_has_all_properties(workflow_type, config, tnbc_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    os.symlink(tnbc_dir / "images" / "01_1.png", tiles / "01_1.png")
    overrides = {"dataset_dir": str(tnbc_dir), "split_file": str(tmp_path / "splits.json"), "num_workers": 0,
                 "input_dir": str(tiles), "output_dir": str(tmp_path / "out")}
    wf = ConfigWorkflow(config_file=str(CONFIGS / config), meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type, **overrides)
    wf.initialize()
    assert wf.check_properties() == []


def test_verify_net_in_out():
    out = _cli("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
               "configs/train.json", "--n", "4", "--any", "1", "--device", "cpu")
    assert "data shape of network is verified with no error" in out


def test_ckpt_export_torchscript_matches_eager(tmp_path):
    from bundle.model.network import DSHFN

    torch.manual_seed(0)
    contract = json.loads((CONFIGS / "model.json").read_text())
    assert contract["input_mode"] == "rgb" and contract["upsample"] == "bilinear"  # the shipped recipe
    net = DSHFN(in_channels=3, features=contract["features"], upsample=contract["upsample"])
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    _cli("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--meta_file",
         "configs/metadata.json", "--config_file", "configs/train.json")
    loaded = torch.jit.load(str(ts))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), atol=1e-5, rtol=1e-5)


def test_bundle_zip_download_load_from_another_project(tmp_path):
    """Another project: download the zip by URL, load the network with weights, run inference elsewhere."""
    import monai.bundle

    from bundle.packaging import BUNDLE_NAME, build_bundle_zip

    zpath = build_bundle_zip(ROOT, tmp_path / "dist" / f"{BUNDLE_NAME}.zip")
    names = zipfile.ZipFile(zpath).namelist()
    assert f"{BUNDLE_NAME}/configs/metadata.json" in names and f"{BUNDLE_NAME}/bundle/model/network.py" in names
    assert not any("/tests/" in n or "__pycache__" in n or n.endswith("checkpoint.pt") for n in names)
    # weights for the test: the repo may not ship a trained model.pt yet
    from bundle.model.network import DSHFN

    torch.manual_seed(1)
    ref = DSHFN()
    if f"{BUNDLE_NAME}/models/model.pt" not in names:
        weights = tmp_path / "model.pt"
        torch.save(ref.state_dict(), weights)
        with zipfile.ZipFile(zpath, "a") as zf:
            zf.write(weights, f"{BUNDLE_NAME}/models/model.pt")
    bundles = tmp_path / "project" / "bundles"
    monai.bundle.download(name=BUNDLE_NAME, url=zpath.resolve().as_uri(), bundle_dir=str(bundles))
    installed = bundles / BUNDLE_NAME
    assert (installed / "configs" / "inference.json").is_file()

    code = (
        "import sys, torch, monai.bundle\n"
        f"sys.path.insert(0, {str(installed)!r})  # the bundle's own components live in its bundle/ package\n"
        f"net = monai.bundle.load({BUNDLE_NAME!r}, bundle_dir={str(bundles)!r}, source='github', device='cpu')\n"
        f"sd = torch.load({str(installed / 'models' / 'model.pt')!r}, weights_only=True)\n"
        "assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())\n"
        "print('LOADED', type(net).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "project", env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LOADED DSHFN" in proc.stdout, proc.stderr[-3000:]


def test_cli_bad_input_is_one_clear_message(tnbc_dir, tmp_path):
    """A dataset problem under `monai.bundle run` reads as one line naming the file, not a wrapped traceback."""
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    for i in ("01_1", "01_2"):
        os.symlink(tnbc_dir / "masks" / f"{i}.png", ds / "masks" / f"{i}.png")
    os.symlink(tnbc_dir / "images" / "01_1.png", ds / "images" / "01_1.png")  # 01_2 has no image
    (ds / "meta.csv").write_text("id,group,split\n01_1,01,all\n01_2,01,all\n")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
                           "--dataset_dir", str(ds), "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "01_2" in err[0], proc.stderr[-2000:]
