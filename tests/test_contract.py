"""The model contract (configs/model.json, bundle.model.contract): the one definition of the network, its input, its
threshold and its watershed, read by training, evaluation and inference alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.model.contract import CONTRACT_IDS, network, read_contract, value
from bundle.model.network import DSHFN

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_network_def_and_contract_values_are_written_once():
    configs = {p.relative_to(CONFIGS).as_posix(): json.loads(p.read_text()) for p in CONFIGS.rglob("*.json")}
    dshfn = [name for name, cfg in configs.items() if '"bundle.model.network.DSHFN"' in json.dumps(cfg)]
    assert dshfn == ["model.json"]
    contract = read_contract()
    assert set(CONTRACT_IDS) | {"network_def"} == set(contract)
    for name in ("train.json", "inference.json"):
        cfg = configs[name]
        assert cfg["network_def"]["_target_"] == "bundle.model.contract.network", name
        for key in CONTRACT_IDS:  # every contract id of these files is read from the contract, none restated
            if key in cfg:
                assert cfg[key] == {"_target_": "bundle.model.contract.value", "key": key}, (name, key)
    # no number of the Reinhard reference outside the contract
    reference = str(contract["reinhard_reference"]["means"][0])
    assert [n for n, cfg in configs.items() if reference in json.dumps(cfg)] == ["model.json"]
    # no config builds a device or a process group from the environment in a $ string, and none imports by macro
    for name, cfg in configs.items():
        for text in _strings(cfg):
            assert not any(s in text for s in ("os.environ", "init_process_group", "set_device")), (name, text)
            assert not text.startswith("%"), (name, text)


def test_value_overrides_entries_of_a_mapping_only():
    ws = value("watershed", min_size=3)
    assert ws["min_size"] == 3 and ws["boundary_threshold"] == read_contract()["watershed"]["boundary_threshold"]
    with pytest.raises(KeyError, match="has no entries"):
        value("watershed", radius=3)
    with pytest.raises(TypeError, match="takes no entries"):
        value("features", width=3)
    with pytest.raises(KeyError, match="not an id of the model contract"):
        value("network_def")


def test_network_takes_contract_ids_and_network_arguments():
    torch.manual_seed(0)
    net = network(input_mode="gray", features=4, streams="local")
    assert isinstance(net, DSHFN) and net.in_channels == 1
    assert [type(m).__name__ for m in net.streams] == ["LocalStream"]
    wide = network(features=8)
    narrow = network(features=4)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in narrow.parameters())


PROBE = r"""
import json, sys
from monai.bundle import ConfigParser
sys.path.insert(0, sys.argv[1])
from bundle.inference.engine import load_segmenter
cfg = sys.argv[1] + "/configs/"
train = ConfigParser(); train.read_config([cfg + "train.json", cfg + "evaluate.json"])
train["data_root"] = sys.argv[2]
net = train.get_parsed_content("network_def")
scale = [t for t in train.get_parsed_content("validate#preprocessing").transforms if type(t).__name__ == "ToModelScaled"][0]
reinhard = [t for t in train.get_parsed_content("validate#preprocessing").transforms if type(t).__name__ == "ReinhardNormalized"][0]
nuclei = [h for h in train.get_parsed_content("validate#handlers") if type(h).__name__ == "InstanceMetricsHandler"][0]
seg = load_segmenter(cfg + "inference.json", ckpt_path=None)
print(json.dumps({
    "train_in": net.in_channels, "train_params": sum(p.numel() for p in net.parameters()),
    "train_scale": scale.model_pixel_size, "train_means": [float(m) for m in reinhard.normalize.means],
    "eval_min_size": nuclei.params.min_size, "eval_scale": nuclei.model_pixel_size,
    "infer_in": seg.network.in_channels, "infer_params": sum(p.numel() for p in seg.network.parameters()),
    "infer_mode": seg.input_mode, "infer_scale": seg.model_pixel_size, "infer_means": list(seg.reference["means"]),
    "infer_min_size": seg.watershed.min_size}))
"""


def test_one_edit_of_the_contract_changes_training_evaluation_and_inference(tmp_path):
    """A copy of the bundle whose model.json says gray input, width 8, 0.5 um/px, another Reinhard reference and
    min_size 20: train.json (+ evaluate.json) and inference.json all follow, parsed from another folder."""
    copy = tmp_path / "bundle_copy"
    shutil.copytree(ROOT / "bundle", copy / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(CONFIGS, copy / "configs")
    contract = json.loads((copy / "configs" / "model.json").read_text())
    contract.update(input_mode="gray", features=8, model_pixel_size=0.5)
    contract["reinhard_reference"]["means"] = [70.0, 10.0, -5.0]
    contract["watershed"]["min_size"] = 20
    (copy / "configs" / "model.json").write_text(json.dumps(contract))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(copy), str(tmp_path / "no_data")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    width8 = sum(p.numel() for p in DSHFN(in_channels=1, features=8, upsample=contract["upsample"]).parameters())
    assert got["train_in"] == got["infer_in"] == 1 and got["infer_mode"] == "gray"
    assert got["train_params"] == got["infer_params"] == width8
    assert got["train_scale"] == got["eval_scale"] == got["infer_scale"] == 0.5
    assert got["train_means"] == got["infer_means"] == [70.0, 10.0, -5.0]
    assert got["eval_min_size"] == got["infer_min_size"] == 20


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_fronts_score_with_the_contract_watershed(monkeypatch, tmp_path):
    """scripts/recipe.py score and scripts/figures.py separation hand the contract's watershed to the library."""
    from bundle.nuclei.watershed import WatershedParams

    shipped = WatershedParams.from_dict(value("watershed"))
    recipe, got = _load_script("recipe"), {}
    monkeypatch.setattr(recipe, "evaluate_run", lambda *a: got.setdefault("watershed", a[4]) and {
        k: {} for k in ("watershed", "tuning", "overall", "instance_sets", "per_dataset")})
    assert recipe.main(["score", "--weights", "w.pt", "--data_root", str(tmp_path)]) == 0
    assert got["watershed"] == shipped
    figures, seen = _load_script("figures"), {}

    def diagnose(config_files, overrides, weights, params, *rest, **kw):
        seen["params"] = params
        raise SystemExit(0)

    monkeypatch.setattr(figures, "diagnose_weights", diagnose)
    with pytest.raises(SystemExit):
        figures.main(["separation", "--data_root", str(tmp_path), "--weights", "w.pt", "--boundary_threshold", "0.2",
                      "--out", str(tmp_path / "f.png")])
    assert seen["params"] == WatershedParams.from_dict({**value("watershed"), "boundary_threshold": 0.2})
