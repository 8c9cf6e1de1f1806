"""Every JSON file in configs/ is instantiated by a test, merged the way it is used (docs/configs.md).

``COVERED`` maps each config file to the tests that parse its objects; ``test_every_config_file_is_covered`` fails
when a file is added without a test. The tests here cover the files no other module instantiates.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import link_subset
from monai.bundle import ConfigParser
from monai.networks.nets import BasicUNet

from bundle.data.channels import input_channels
from bundle.handlers.training import EarlyStopping
from bundle.model.baselines import SegmentationOutput
from bundle.model.network import DSHFN
from bundle.research.recipe import PROBE_CONFIGS, load_probes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: config file (relative to configs/) -> "test module::test function" that instantiate it, merged as it is used
COVERED = {
    "train.json": ["test_config_files.py::test_train_builds_trainer_and_evaluator",
                   "test_transforms.py::test_full_train_chain"],
    "train_final.json": ["test_config_files.py::test_train_final_trains_on_the_validation_tiles_too"],
    "model.json": ["test_contract.py::test_one_edit_of_the_contract_changes_training_evaluation_and_inference",
                   "test_contract.py::test_network_takes_contract_ids_and_network_arguments"],
    "evaluate.json": ["test_config_files.py::test_evaluate_after_train_scores_the_nuclei_a_user_gets",
                      "test_workflows.py::test_evaluate_merged_after_train_writes_tables"],
    "multi_gpu_train.json": ["test_workflows.py::test_ddp_training_two_processes"],
    "multi_gpu_evaluate.json": ["test_workflows.py::test_ddp_evaluation_matches_single_process"],
    "inference.json": ["test_configs.py::test_config_workflow_has_all_properties",
                       "test_engine.py::test_both_front_ends_write_byte_identical_outputs"],
    "experiments/kfold.json": ["test_config_files.py::test_kfold_datalists_are_the_committed_folds",
                               "test_experiments.py::test_every_variant_builds_its_network_and_loss"],
    "experiments/organ_transfer.json": [
        "test_transfer.py::test_transfer_configs_train_at_model_scale_on_crops_and_evaluate_whole_tiles"],
    "experiments/organ_transfer_evaluate.json": [
        "test_transfer.py::test_transfer_configs_train_at_model_scale_on_crops_and_evaluate_whole_tiles"],
    "recipe/probe_schedule.json": ["test_recipe_datasets.py::test_recipe_config_one_training_epoch_runs"],
    "recipe/probes.json": ["test_config_files.py::test_every_probe_overrides_existing_ids_and_builds_its_network"],
    "recipe/basic_unet.json": ["test_config_files.py::test_every_probe_overrides_existing_ids_and_builds_its_network"],
    "schedules/cpu_40ep.json": ["test_config_files.py::test_schedules_set_the_trainer_they_say"],
    "schedules/cpu_long.json": ["test_config_files.py::test_schedules_set_the_trainer_they_say"],
    "schedules/cpu_finetune.json": ["test_config_files.py::test_schedules_set_the_trainer_they_say"],
    "recipe/instance_probes.json": ["test_config_files.py::test_every_instance_probe_builds_its_head_and_loss"],
    **{f"variants/{p.name}": ["test_experiments.py::test_every_variant_builds_its_network_and_loss"]
       for p in sorted((CONFIGS / "variants").glob("*.json"))},
}
#: not bundle configs: split files (data), the metadata and its schema (test_configs.py verifies them)
NOT_CONFIGS = ("splits/", "metadata.json", "meta_schema.json")


def test_every_config_file_is_covered():
    files = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.json")}
    configs = {f for f in files if not f.startswith(NOT_CONFIGS)}
    assert configs == set(COVERED), "add the new config file's test to COVERED"
    for tests in COVERED.values():
        for test in tests:
            module, name = test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / "tests" / module).read_text(), re.M), test


@pytest.mark.parametrize("name", sorted(COVERED))
def test_configs_hold_wiring_and_a_one_line_comment(name):
    """Prose lives in docs/configs.md: at most a one-line ``_comment``; no file depends on a list position."""
    text = (CONFIGS / name).read_text()
    config = json.loads(text)
    comments = [k for k in config if k.startswith("_comment")]
    assert comments in ([], ["_comment"]), comments
    if comments:
        assert "\n" not in config["_comment"] and len(config["_comment"]) <= 200, config["_comment"]
    assert not re.search(r"issue \d", text, re.I)
    assert not re.search(r"#\d+\b|\[-?\d*:-?\d*\]", text), "override by id, not by list position"
    assert f"## `configs/{name}`" in (ROOT / "docs" / "configs.md").read_text(), "describe the file in docs/configs.md"


# ------------------------------------------------------------------------------------------------- helpers
def _parser(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module")
def tiny_tnbc(tnbc_dir, tmp_path_factory) -> Path:
    """5 TNBC tiles of 5 patients: a split with 4 training tiles and 1 validation tile."""
    rows = list(csv.DictReader(open(tnbc_dir / "meta.csv")))
    first = {}
    for r in rows:
        first.setdefault(r["group"], r)
    chosen = [first[g] for g in sorted(first)[:5]]
    return link_subset(tnbc_dir, chosen, tmp_path_factory.mktemp("tiny") / "tnbc", "masks")


def _tiny(files, dataset_dir: Path, out: Path, **overrides) -> ConfigParser:
    return _parser(files, dataset_dir=str(dataset_dir), output_dir=str(out), num_workers=0, device="cpu", **overrides)


def _handler(handlers, cls):
    (found,) = [h for h in handlers if isinstance(h, cls)]
    return found


# --------------------------------------------------------------------------------------------------- tests
def test_train_builds_trainer_and_evaluator(tiny_tnbc, tmp_path, one_torch_thread):
    parser = _tiny(["train.json"], tiny_tnbc, tmp_path)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 200 and trainer.network is parser.get_parsed_content("network")
    net = trainer.network
    assert isinstance(net, DSHFN) and net.in_channels == input_channels("rgb") == 3
    assert parser.get_parsed_content("loss").weights == {"seg": 0.6, "edge": 0.2, "glga": 0.2}
    assert _handler(parser.get_parsed_content("train#handlers"), EarlyStopping).patience == 15
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert evaluator.network is net and type(evaluator.inferer).__name__ == "SlidingWindowInferer"
    val_ids = {it["id"] for it in parser.get_parsed_content("val_datalist")}
    train_ids = {it["id"] for it in parser.get_parsed_content("train_datalist")}
    assert len(val_ids) == 1 and len(train_ids) == 4 and not val_ids & train_ids
    batch = next(iter(trainer.data_loader))
    assert batch["image"].shape[1:] == (3, 256, 256) and batch["label"].shape[1:] == (3, 256, 256)


def test_train_final_trains_on_the_validation_tiles_too(tiny_tnbc, tmp_path, one_torch_thread):
    base = _tiny(["train.json"], tiny_tnbc, tmp_path / "base")
    final = _tiny(["train.json", "train_final.json"], tiny_tnbc, tmp_path / "final")
    val = [it["id"] for it in base.get_parsed_content("val_datalist")]
    train = [it["id"] for it in base.get_parsed_content("train_datalist")]
    final_train = [it["id"] for it in final.get_parsed_content("train_datalist")]
    assert val and sorted(final_train) == sorted(train + val)
    assert [it["id"] for it in final.get_parsed_content("val_datalist")] == val  # still logged, monitoring only
    trainer = final.get_parsed_content("train#trainer")
    assert len(trainer.data_loader.dataset) == len(base.get_parsed_content("train#sampled")) + len(val) * 4
    # early stopping can never fire before the last epoch
    patience = _handler(final.get_parsed_content("train#handlers"), EarlyStopping).patience
    assert patience == trainer.state.max_epochs == 200


def test_evaluate_after_train_scores_the_nuclei_a_user_gets(tnbc_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no macro: the merged configs parse from any folder
    overrides = dict(data_root=str(tnbc_dir.parent), output_dir=str(tmp_path), device="cpu", num_workers=0)
    parser = _parser(["train.json", "evaluate.json"], **overrides)
    train = _parser(["train.json"], **overrides)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, DSHFN) and net.in_channels == 3
    chain = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    assert chain[:2] == ["CopyItemsd", "LoadTiled"]  # the released label at the tile's size, not cleaned
    assert chain[2:] == [type(t).__name__ for t in train.get_parsed_content("validate#preprocessing").transforms]
    assert "RandSpatialCropd" not in chain and "ToModelScaled" in chain
    handlers = parser.get_parsed_content("validate#handlers")
    loader = next(h for h in handlers if type(h).__name__ == "WeightsLoader")
    assert loader.load_path == str(tmp_path / "models" / "model.pt") and loader.option == "--ckpt_path"
    assert type(parser.get_parsed_content("validate#inferer")).__name__ == "SlidingWindowInferer"
    # the nuclei a user gets: the contract's watershed on the model-scale maps copied before binarisation
    nuclei = next(h for h in handlers if type(h).__name__ == "InstanceMetricsHandler")
    contract = json.loads((CONFIGS / "model.json").read_text())
    assert nuclei.params.to_dict() == contract["watershed"] and nuclei.pred_key == "maps"
    assert nuclei.model_pixel_size == contract["model_pixel_size"] == parser.get_parsed_content("model_pixel_size")
    first = parser.get_parsed_content("validate#postprocessing").transforms[0]
    assert type(first).__name__ == "CopyItemsd" and list(first.keys) == ["pred"] and list(first.names) == ["maps"]
    off = _parser(["train.json", "evaluate.json"], nuclei_metrics=False, **overrides).get_parsed_content("validate#handlers")
    assert "InstanceMetricsHandler" not in [type(h).__name__ for h in off]
    eval_ids = [it["id"] for it in parser.get_parsed_content("eval_datalist")]
    assert eval_ids == [it["id"] for it in train.get_parsed_content("val_datalist")]
    assert parser.get_parsed_content("eval_dir") == str(tmp_path / "eval" / "val_paper")
    # a command line's watershed entry reaches the handler through the contract
    tuned = _parser(["train.json", "evaluate.json"], **{"watershed#min_size": 30}, **overrides)
    assert next(h for h in tuned.get_parsed_content("validate#handlers")
                if type(h).__name__ == "InstanceMetricsHandler").params.min_size == 30


def test_kfold_datalists_are_the_committed_folds(tnbc_dir, tmp_path):
    """kfold.json after train.json: train on three folds, validate on fold k+1, test on fold k, gray input."""
    split = json.loads((CONFIGS / "splits" / "tnbc_5fold_seed42.json").read_text())
    folds = [set(f["ids"]) for f in split["folds"]]
    for fold in (0, 4):
        parser = _parser(["train.json", "experiments/kfold.json"], dataset_dir=str(tnbc_dir), fold=fold,
                         output_dir=str(tmp_path))
        ids = {part: {it["id"] for it in parser.get_parsed_content(f"{part}_datalist")} for part in ("train", "val", "eval")}
        assert ids["eval"] == folds[fold] and ids["val"] == folds[(fold + 1) % 5]
        assert ids["train"] == set().union(*folds) - folds[fold] - folds[(fold + 1) % 5]
        assert {it["pixel_size"] for it in parser.get_parsed_content("train_datalist")} == {0.25}
        assert parser.get_parsed_content("network_def").in_channels == 1  # the paper's gray input


@pytest.mark.parametrize("schedule,expected", [
    ("cpu_40ep.json", {"max_epochs": 40, "batch_size": 4, "lr": 1e-3, "T_0": 50, "interval": 1, "patience": 15}),
    ("cpu_long.json", {"max_epochs": 60, "batch_size": 4, "lr": 1e-3, "T_0": 60, "interval": 2, "patience": 60}),
    ("cpu_finetune.json", {"max_epochs": 12, "batch_size": 4, "lr": 2e-4, "T_0": 12, "interval": 2, "patience": 12}),
])
def test_schedules_set_the_trainer_they_say(schedule, expected, tiny_tnbc, tmp_path, one_torch_thread):
    from monai.handlers import ValidationHandler

    parser = _tiny(["train.json", f"schedules/{schedule}"], tiny_tnbc, tmp_path)
    trainer = parser.get_parsed_content("train#trainer")
    handlers = parser.get_parsed_content("train#handlers")
    scheduler = parser.get_parsed_content("lr_scheduler")
    got = {"max_epochs": trainer.state.max_epochs, "batch_size": trainer.data_loader.batch_size,
           "lr": trainer.optimizer.param_groups[0]["lr"], "T_0": scheduler.T_0,
           "interval": _handler(handlers, ValidationHandler).interval, "patience": _handler(handlers, EarlyStopping).patience}
    assert got == expected


def test_every_probe_overrides_existing_ids_and_builds_its_network(one_torch_thread):
    """Each recipe probe, merged as bundle.research.recipe.run_probe merges it, changes ids train.json has and builds."""
    train_ids = set(json.loads((CONFIGS / "train.json").read_text()))
    probes = load_probes(CONFIGS / "recipe" / "probes.json")
    assert "baseline" in probes and "recipe" in probes
    for name, spec in probes.items():
        spec = dict(spec)
        files = [*PROBE_CONFIGS, *spec.pop("configs", [])]
        assert set(spec) <= train_ids, (name, set(spec) - train_ids)
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in files])
        parser.update(spec)
        net = parser.get_parsed_content("network_def")
        channels = input_channels(spec["input_mode"])
        if "configs/recipe/basic_unet.json" in files:
            assert isinstance(net, SegmentationOutput) and isinstance(net.net, BasicUNet)
            assert net.net.conv_0.conv_0.conv.in_channels == channels
        else:
            assert isinstance(net, DSHFN) and net.in_channels == channels
        net.eval()
        with torch.no_grad():
            assert net(torch.randn(1, channels, 32, 32)).shape == (1, 3, 32, 32), name


def test_every_instance_probe_builds_its_head_and_loss(one_torch_thread):
    """Each instance-head probe, merged as run_probe merges it, starts from the shipped weights and builds the
    network, targets and loss of its head."""
    from bundle.model.instance import instance_channels

    train_ids = set(json.loads((CONFIGS / "train.json").read_text()))
    probes = load_probes(CONFIGS / "recipe" / "instance_probes.json")
    assert {"ft_boundary", "ft_hv", "ft_distance"} <= set(probes)
    shipped = torch.load(ROOT / "models" / "model.pt", weights_only=True)
    for name, spec in probes.items():
        spec = dict(spec)
        assert set(spec) <= train_ids, (name, set(spec) - train_ids)
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in PROBE_CONFIGS])
        parser.update({**spec, "init_weights": str(ROOT / spec["init_weights"])})
        net = parser.get_parsed_content("network_init")
        k = instance_channels(spec["instance_head"])
        assert net.instance_head == spec["instance_head"]
        # the paper's decoders start from the shipped weights
        state = net.state_dict()
        assert all(torch.equal(state[key], value) for key, value in shipped.items() if key in state), name
        assert ("inst" in parser.get_parsed_content("loss").weights) == bool(k), name
        net.train()
        assert net(torch.randn(2, net.in_channels, 64, 64)).shape == (2, 2 + k, 64, 64), name
