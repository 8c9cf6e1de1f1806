"""The experiment machinery: baseline adapter, config variants, fold tables, and one real run_fold."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import link_subset, write_csv
from monai.bundle import ConfigParser
from monai.networks.nets import BasicUNet

from bundle.model.baselines import SegmentationOutput
from bundle.model.network import DSHFN
from bundle.research.experiments import result_paths, run_fold
from bundle.research.launch import KFOLD, VARIANTS
from bundle.research.tables import per_fold_table, per_image_means, summarise

ROOT = Path(__file__).resolve().parents[1]


def test_segmentation_output_keeps_logits_in_training_and_gives_the_dshfn_contract_in_eval(one_torch_thread):
    torch.manual_seed(0)
    for out_channels in (1, 2):
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=out_channels, features=(4, 4, 8, 8, 16, 4))
        wrapped = SegmentationOutput(net, size_divisor=16)
        x = torch.randn(2, 1, 32, 48)
        wrapped.train()
        torch.testing.assert_close(wrapped(x), net(x))
        wrapped.eval()
        with torch.no_grad():
            logits, out = net(x), wrapped(x)
        assert out.shape == (2, 3, 32, 48)
        torch.testing.assert_close(out[:, 0], torch.sigmoid(logits[:, 0]))
        torch.testing.assert_close(out[:, 2], out[:, 0])  # no eq. 20 refinement in a baseline
        expected_boundary = torch.sigmoid(logits[:, 1]) if out_channels == 2 else torch.zeros_like(out[:, 1])
        torch.testing.assert_close(out[:, 1], expected_boundary)
        with pytest.raises(ValueError, match="multiples of size_divisor=16"):
            wrapped(torch.randn(1, 1, 40, 48))


def _parse(variant: str, pipeline: tuple[str, ...] = ()) -> ConfigParser:
    parser = ConfigParser()
    files = ["configs/train.json", *pipeline, KFOLD, *VARIANTS[variant]]  # the runner's merge order
    parser.read_config([str(ROOT / f) for f in files])
    return parser


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_its_network_and_loss(variant, one_torch_thread):
    parser = _parse(variant)
    net = parser.get_parsed_content("network_def", instantiate=True)
    # the evaluation merges evaluate.json (which re-imports train.json's network_def) before the variant
    evaluated = _parse(variant, ("configs/evaluate.json",)).get_parsed_content("network_def", instantiate=True)
    assert type(evaluated) is type(net) and evaluated.state_dict().keys() == net.state_dict().keys()
    loss = parser.get_parsed_content("loss", instantiate=True)
    base = _parse("dshfn")
    # only the network and the loss differ from DS-HFN's config: same data, optimiser, schedule, budget
    for key in ("train_datalist", "val_datalist", "optimizer", "lr_scheduler", "max_epochs", "patience", "batch_size"):
        assert parser.get(key) == base.get(key), key
    expected = {
        "dshfn": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.2}),
        "basic_unet": (SegmentationOutput, {"seg": 1.0, "edge": 0.0, "glga": 0.0}),
        "attention_unet": (SegmentationOutput, {"seg": 1.0, "edge": 0.0, "glga": 0.0}),
        "local_only": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.2}),
        "global_only": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.2}),
        "additive_fusion": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.2}),
        "no_boundary_decoder": (DSHFN, {"seg": 0.6, "edge": 0.0, "glga": 0.2}),
        "no_glga": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.0}),
        "dshfn_width32": (DSHFN, {"seg": 0.6, "edge": 0.2, "glga": 0.2}),
    }[variant]
    assert isinstance(net, expected[0]) and loss.weights == expected[1]
    if isinstance(net, DSHFN):
        kinds = sorted(type(s).__name__ for s in net.streams)
        assert kinds == {"local_only": ["LocalStream"], "global_only": ["GlobalStream"]}.get(
            variant, ["GlobalStream", "LocalStream"])
        assert type(net.fusion).__name__ == ("AdditiveFusion" if variant == "additive_fusion" else "HFEM")
        assert (net.boundary_decoder is None) == (variant == "no_boundary_decoder")
        width = sum(p.numel() for p in net.parameters())
        assert (width > 1_000_000) == (variant == "dshfn_width32")
    net.train()
    x = torch.randn(2, 1, 64, 64)
    label = torch.zeros(2, 2, 64, 64)
    label[:, :, 20:40, 20:40] = 1
    value = loss(net(x), label)  # the loss accepts the variant's training output
    assert torch.isfinite(value)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 64, 64)


def test_fold_tables_are_means_of_fold_means(tmp_path):
    # the writer leaves HD empty for an image without nuclei: it must be left out, not read as 0
    write_csv(tmp_path / "a" / "fold0_paper.csv", [{"id": "x", "dice": 0.5, "hd95": 4}, {"id": "y", "dice": 0.7, "hd95": ""}])
    write_csv(tmp_path / "a" / "fold1_paper.csv", [{"id": "z", "dice": 0.8, "hd95": 2}, {"id": "w", "dice": 1.0, "hd95": 6}])
    write_csv(tmp_path / "b" / "fold0_paper.csv", [{"id": "x", "dice": 0.4, "hd95": 8}])
    write_csv(tmp_path / "b" / "fold1_paper.csv", [{"id": "z", "dice": 0.5, "hd95": 9}])
    assert per_image_means(tmp_path / "a" / "fold0_paper.csv") == pytest.approx({"dice": 0.6, "hd95": 4.0})
    table = summarise(tmp_path, ["a", "b"], "paper").splitlines()
    # a: fold means 0.6 and 0.9 -> 0.75 +- sqrt(2 * 0.15^2) = 0.212; HD95 fold means 4 and 4 -> 4.0 +- 0.0
    assert table[2].startswith("| a | 0,1 | 0.750 ± 0.212 |") and "| 4.0 ± 0.0 |" in table[2]
    assert table[3].startswith("| b | 0,1 | 0.450 ± 0.071 |") and "| 8.5 ± 0.7 |" in table[3]
    assert "–" in summarise(tmp_path, ["a"], "paper").splitlines()[2]  # metrics absent from the CSV
    only1 = summarise(tmp_path, ["a", "b"], "paper", folds=[1]).splitlines()
    assert only1[2].startswith("| a | 1 | 0.900 ± 0.000 |") and only1[3].startswith("| b | 1 | 0.500 ± 0.000 |")
    # per fold: each fold's mean, worked out above; a fold a variant has not run is marked
    write_csv(tmp_path / "a" / "fold2_paper.csv", [{"id": "v", "dice": 0.3, "hd95": 1}])
    per_fold = per_fold_table(tmp_path, ["a", "b"], "paper", metrics=("dice", "hd95")).splitlines()
    assert per_fold[0] == "| model | Dice fold 0 | Dice fold 1 | Dice fold 2 | HD95 (px) fold 0 | HD95 (px) fold 1 | HD95 (px) fold 2 |"
    assert per_fold[2] == "| a | 0.600 | 0.900 | 0.300 | 4.0 | 4.0 | 1.0 |"
    assert per_fold[3] == "| b | 0.400 | 0.500 | – | 8.0 | 9.0 | – |"


@pytest.mark.slow
def test_run_fold_trains_evaluates_and_skips_finished_folds(tnbc_dir, tmp_path):
    """A real fold of the baseline through the CLI: the variant's network is trained AND evaluated."""
    rows = list(csv.DictReader(open(tnbc_dir / "meta.csv")))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    chosen = [r for g in sorted(groups)[:5] for r in groups[g][:2]]  # 10 tiles, 5 patients: one patient a fold
    data = link_subset(tnbc_dir, chosen, tmp_path / "tiny_tnbc", "masks")
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"spatial_size": [64, 64], "batch_size": 3, "val_batch_size": 2,
                                 "split_file": str(tmp_path / "splits.json"),
                                 "network_def#net#features": [4, 4, 8, 8, 16, 4]}))
    kwargs = dict(dataset_dir=data, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", max_epochs=1,
                  device="cpu", overrides=[str(small)])
    first = run_fold("basic_unet", 1, **kwargs)
    assert first["skipped"] is False
    weights = torch.load(tmp_path / "runs" / "basic_unet" / "fold1" / "models" / "model.pt", weights_only=True)
    assert all(k.startswith("net.") for k in weights)  # the BasicUNet was trained, not DS-HFN
    splits = json.loads((tmp_path / "splits.json").read_text())
    test_ids = sorted(splits["folds"][1]["ids"])
    for resolution in ("paper", "native"):
        csv_path, json_path = result_paths(tmp_path / "results", "basic_unet", 1, resolution)
        got = list(csv.DictReader(open(csv_path)))
        assert sorted(r["id"] for r in got) == test_ids  # the held-out fold, nothing else
        assert all(0.0 <= float(r["dice"]) <= 1.0 for r in got)
        summary = json.loads(json_path.read_text())
        assert summary["resolution"] == resolution and summary["max_epochs"] == 1 and summary["epochs_run"] == 1 and summary["schedule"] == ["small.json"]
        assert math.isclose(summary["dice"]["mean"], per_image_means(csv_path)["dice"], rel_tol=1e-5)
    assert run_fold("basic_unet", 1, **kwargs)["skipped"] is True


def test_run_lock_keeps_parallel_workers_apart_and_takes_over_stale_locks(tmp_path):
    import subprocess
    import sys

    from bundle.research.locks import RunLock

    lock_path = tmp_path / "run" / "run.lock"
    with RunLock(lock_path) as first:
        assert first.acquired and lock_path.read_text() == str(os.getpid())
        with RunLock(lock_path) as second:  # the owner is alive: a second worker stays out
            assert not second.acquired
        assert lock_path.is_file()
    assert not lock_path.exists()  # released on exit
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path.write_text(dead.stdout.strip())  # a worker that was killed
    with RunLock(lock_path) as third:
        assert third.acquired and lock_path.read_text() == str(os.getpid())
    busy = tmp_path / "runs" / "dshfn" / "fold0" / "run.lock"
    busy.parent.mkdir(parents=True)
    busy.write_text(str(os.getpid()))
    got = run_fold("dshfn", 0, tmp_path / "no_data", tmp_path / "runs", tmp_path / "results")
    assert got["busy"] is True and not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------- scripts/experiments.py front end
def _experiments_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:

    return subprocess.run([sys.executable, str(ROOT / "scripts" / "experiments.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_experiments_checks_folds_and_dataset_before_any_work(tnbc_dir, tmp_path):
    runs = tmp_path / "runs"
    proc = _experiments_cli("run", "--variants", "dshfn", "--folds", "0", "7", "--dataset_dir", str(tnbc_dir),
                            "--runs_dir", str(runs), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --folds 7: the split has 5 folds, give numbers from 0 to 4"]
    assert not runs.exists()
    # a value is data: '$...' is a (missing) folder, never code for the config parser
    pwned = tmp_path / "pwned"
    code = f"$__import__('pathlib').Path({str(pwned)!r}).touch() or {str(tnbc_dir)!r}"
    proc = _experiments_cli("run", "--variants", "dshfn", "--folds", "0", "--dataset_dir", code, "--runs_dir",
                            str(runs), "--max_epochs", "1", cwd=tmp_path)
    assert proc.returncode == 2 and not pwned.exists() and not runs.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a dataset folder (no meta.csv)" in proc.stderr


def test_experiments_write_under_their_runs_folder_unless_published(tnbc_dir, tmp_path, monkeypatch):
    """Results and a split go under --runs_dir; only --publish files them in docs/results/; a run shortened by
    --max_epochs is named after the epochs it had. The committed split of the same meta.csv is read, not written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiments_cli", ROOT / "scripts" / "experiments.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []
    monkeypatch.setattr(cli, "run_fold", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.setattr(cli, "summarise", lambda *a, **k: "")
    own = link_subset(tnbc_dir, list(csv.DictReader(open(tnbc_dir / "meta.csv")))[:10], tmp_path / "mine", "masks")
    runs = tmp_path / "runs"
    for dataset, extra in ((tnbc_dir, []), (own, []), (tnbc_dir, ["--publish"])):
        assert cli.main(["run", "--variants", "dshfn", "--folds", "0", "--dataset_dir", str(dataset), "--runs_dir",
                         str(runs), "--max_epochs", "1", *extra]) == 0
    (tnbc_args, tnbc_kw), (own_args, own_kw), (pub_args, _) = calls
    assert tnbc_args[4] == str(runs / "results" / "tnbc_cpu_1ep") and tnbc_args[3] == str(runs / "tnbc")
    assert tnbc_kw["split_file"] == str(ROOT / "configs" / "splits" / "tnbc_5fold_seed42.json")  # committed: read
    assert own_args[4] == str(runs / "results" / "mine_cpu_1ep")
    assert own_kw["split_file"] == str(runs / "mine" / "splits" / "mine_5fold_seed42.json")
    assert pub_args[4] == str(ROOT / "docs" / "results" / "tnbc_cpu_1ep")
    assert not (ROOT / "docs" / "results" / "tnbc_cpu_1ep").exists() and not runs.exists()  # nothing written yet
    from bundle.research.launch import schedule_tag

    assert schedule_tag("configs/schedules/cpu_40ep.json") == "cpu_40ep"
    assert schedule_tag("configs/schedules/cpu_40ep.json", 40) == "cpu_40ep"
    assert schedule_tag("my_budget.json", 3) == "my_budget_3ep"
