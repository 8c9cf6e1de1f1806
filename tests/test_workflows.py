"""The bundle's workflows through the real CLI (``python -m monai.bundle run ...``) on real TNBC tiles.

One small training run (9 tiles of 5 patients, 2 epochs) is shared by the module: evaluation, inference,
DDP evaluation and the kill-and-resume test all build on its outputs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
COMMON = ["--num_workers", "0", "--batch_size", "3", "--val_batch_size", "2"]

pytestmark = pytest.mark.slow


def bundle_cmd(run_id: str, configs: list[str], *overrides: str) -> list[str]:
    files = [str(ROOT / "configs" / c) for c in configs]
    cfg = files[0] if len(files) == 1 else "[" + ",".join(repr(f) for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", cfg, *overrides]


def run(cmd: list[str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def small_dataset(tnbc_dir, tmp_path_factory) -> Path:
    """9 TNBC tiles of 5 patients (1 + 2 x 4) in the standard layout, in a temp dir."""
    dst = tmp_path_factory.mktemp("tnbc_small")
    rows = list(csv.DictReader(open(tnbc_dir / "meta.csv")))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    chosen = []
    for i, g in enumerate(sorted(groups)[:5]):
        chosen += groups[g][: 1 if i == 0 else 2]
    for sub in ("images", "masks"):
        (dst / sub).mkdir()
        for r in chosen:
            os.symlink(tnbc_dir / sub / f"{r['id']}.png", dst / sub / f"{r['id']}.png")
    with open(dst / "meta.csv", "w") as f:
        f.write("id,group,split\n" + "".join(f"{r['id']},{r['group']},all\n" for r in chosen))
    return dst


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    args = ["--dataset_dir", str(small_dataset), "--output_dir", str(out), "--split_file", str(out / "splits.json")]
    log = run(bundle_cmd("training", ["train.json"], *args, "--max_epochs", "2", *COMMON))
    return {"out": out, "args": args, "log": log}


def test_training_writes_weights_checkpoint_logs_and_metrics(trained):
    out, log = trained["out"], trained["log"]
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())  # plain state_dict
    ckpt = torch.load(out / "models" / "checkpoint.pt", weights_only=False)
    assert {"trainer", "network", "optimizer", "lr_scheduler", "validator_best"} <= set(ckpt)
    splits = json.loads((out / "splits.json").read_text())["datasets"]
    (name, split), = splits.items()  # --dataset_dir: one dataset, named after its folder
    # a 512 x 512 TNBC tile at the model scale of 0.25 um/px is drawn as four 256 x 256 crops an epoch
    n_crops = 4 * len(split["train"])
    assert ckpt["trainer"]["iteration"] == 2 * -(-n_crops // 3)  # 2 epochs x ceil(crops / batch 3)
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "val_mean_dice" in log and "val_bf1" in log and "val_hd95" in log
    assert "loss_glga" in log and "lr" in log  # loss terms and learning rate logged per epoch
    # a fresh run says so (ignite's "resuming from iteration 0" is for a state MONAI set up), and the log holds one
    # bar's updates, no cursor escape codes
    assert "Engine run starting with max_epochs=2" in log and "resuming from iteration 0" not in log
    assert "\x1b[A" not in log
    assert not list(out.rglob(".*.tmp*")), "a temp file was left behind"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for f in (out / "logs").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"train_loss", "loss_seg", "loss_edge", "loss_glga", "lr", "val_mean_dice", "val_bf1", "val_hd95"} <= tags["scalars"]
    assert any(t.startswith("val/contours") for t in tags["images"]), tags["images"]
    # validation = fold 0 of the dataset's grouped 5-fold split: whole patients
    assert split["val"] and split["val_groups"] and not set(split["val"]) & set(split["train"])


def test_default_run_id_also_trains(small_dataset, tmp_path):
    """``monai.bundle run`` with no run id executes the same training (``run``) as ``run training``."""
    cmd = bundle_cmd("training", ["train.json"])
    cmd.remove("training")
    log = run(cmd + ["--dataset_dir", str(small_dataset), "--output_dir", str(tmp_path), "--split_file",
                     str(tmp_path / "s.json"), "--max_epochs", "1", *COMMON])
    assert (tmp_path / "models" / "model.pt").is_file() and "Epoch[1] Complete" in log


def test_evaluate_merged_after_train_writes_tables(trained):
    out, tables = trained["out"], {}
    for res in ("paper", "native"):
        log = run(bundle_cmd("evaluating", ["train.json", "evaluate.json"], *trained["args"], "--num_workers", "0",
                             "--eval_resolution", res))
        d = out / "eval" / f"val_{res}"
        rows = list(csv.DictReader(open(d / "metrics_per_image.csv")))
        summary = json.loads((d / "metrics_summary.json").read_text())
        (split,) = json.loads((out / "splits.json").read_text())["datasets"].values()
        assert len(rows) == summary["n_images"] == len(split["val"])  # the validation patients' tiles
        for k in ("dice", "iou", "precision", "recall", "bf1", "bf1_diag", "hd", "hd95"):
            assert k in summary and k in rows[0], k
        for k in ("dice", "iou", "precision", "recall", "bf1"):
            vals = [float(r[k]) for r in rows if r[k]]
            assert all(0.0 <= v <= 1.0 for v in vals), (k, vals)
            assert summary[k]["mean"] == pytest.approx(np.mean(vals), rel=1e-5)  # CSV: 6 significant digits
        assert f"weights loaded from {out / 'models' / 'model.pt'}" in log and "resuming from iteration 0" not in log
        tables[res] = {r["id"]: r for r in rows}
    # a truncated download of the weights: one line naming the config's option, never torch's weights_only advice
    data = (out / "models" / "model.pt").read_bytes()
    (out / "truncated.pt").write_bytes(data[: len(data) // 2])
    proc = subprocess.run(bundle_cmd("evaluating", ["train.json", "evaluate.json"], *trained["args"], "--num_workers",
                                     "0", "--ckpt_path", str(out / "truncated.pt")),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert len(errors) == 1 and "truncated.pt: is not a readable PyTorch weights file (the file is truncated" in errors[0]
    assert errors[0].endswith("--ckpt_path models/model.pt"), errors[0]
    # the nuclei (inference.json's watershed on the model-scale maps, labels at the tile's size) do not depend on
    # the resolution of the pixel metrics, and are scored as scripts/recipe.py scores them
    from bundle.nuclei.watershed import WatershedParams
    from bundle.research.recipe import evaluate_run

    shipped = json.loads((ROOT / "configs" / "model.json").read_text())["watershed"]
    overrides = dict(zip((a.lstrip("-") for a in trained["args"][::2]), trained["args"][1::2]))
    recipe = {r["id"]: r for r in evaluate_run([str(ROOT / "configs" / "train.json")], overrides,
                                                out / "models" / "model.pt",
                                                watershed=WatershedParams.from_dict(shipped))["tiles"]}
    assert set(recipe) == set(tables["paper"]) == set(tables["native"])
    for i, r in recipe.items():
        for ours, theirs in (("nuclei_dice", "dice"), ("nuclei_bf1", "bf1"), ("nuclei_hd95", "hd95")):
            for res in tables:
                assert float(tables[res][i][ours]) == pytest.approx(r[theirs], rel=1e-5, abs=1e-6), (i, ours, res)
        assert tables["paper"][i]["aji"] == "" and "aji" not in r  # TNBC labels are binary masks: no AJI


def test_inference_folder_any_size_and_resume(trained, tnbc_dir, monuseg_dir, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.open(tnbc_dir / "images" / "01_1.png").save(tiles / "a.png")
    mono = sorted((monuseg_dir / "images").glob("*.png"))[0]
    Image.open(mono).crop((0, 0, 500, 300)).save(tiles / "b.tif")  # odd size, TIFF
    outdir = tmp_path / "pred"
    args = ["--input_dir", str(tiles), "--output_dir", str(outdir), "--ckpt_path",
            str(trained["out"] / "models" / "model.pt"), "--progress", "False"]
    run(bundle_cmd("inference", ["inference.json"], *args, "--formats", "['png','mask','prob','nifti']"))
    for stem, (w, h) in (("a", (512, 512)), ("b", (500, 300))):
        for kind in ("mask", "region", "boundary"):
            im = Image.open(outdir / f"{stem}_{kind}.png")
            assert im.size == (w, h) and im.mode == "L", (stem, kind, im.size)
        assert set(np.unique(np.asarray(Image.open(outdir / f"{stem}_mask.png")))) <= {0, 255}
        assert (outdir / f"{stem}_pred.nii.gz").is_file()
    # a second run skips finished tiles and leaves their files untouched
    before = (outdir / "a_mask.png").stat().st_mtime_ns
    log = run(bundle_cmd("inference", ["inference.json"], *args, "--formats", "['png','mask']"))
    assert "2 of 2 images already have their outputs" in log
    assert (outdir / "a_mask.png").stat().st_mtime_ns == before


def test_killed_run_resumes_from_saved_epoch(small_dataset, tmp_path):
    # a narrow network: this is about the checkpoint, not the model (4x fewer FLOPs than the default width)
    args = ["--dataset_dir", str(small_dataset), "--output_dir", str(tmp_path), "--split_file",
            str(tmp_path / "s.json"), "--features", "8", *COMMON]
    ckpt = tmp_path / "models" / "checkpoint.pt"
    proc = subprocess.Popen(bundle_cmd("training", ["train.json"], *args, "--max_epochs", "20"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert ckpt.is_file(), "no checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9: no chance to clean up
        proc.wait()
    state = torch.load(ckpt, weights_only=False)["trainer"]
    per_epoch = state["epoch_length"]
    saved_epoch = state["iteration"] // per_epoch
    assert saved_epoch >= 1
    log = run(bundle_cmd("training", ["train.json"], *args, "--max_epochs", str(saved_epoch + 1), "--resume", "true"))
    assert f"resumed from {ckpt} at epoch {saved_epoch}" in log
    assert f"Epoch: {saved_epoch + 1}/{saved_epoch + 1}" in log and "Epoch: 1/" not in log
    assert torch.load(ckpt, weights_only=False)["trainer"]["iteration"] == per_epoch * (saved_epoch + 1)
    # an empty checkpoint (a disk that filled up): one line saying so and what to do, not torch's EOFError
    ckpt.write_bytes(b"")
    proc = subprocess.run(bundle_cmd("training", ["train.json"], *args, "--max_epochs", "30", "--resume", "true"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"error: {ckpt}: cannot read the checkpoint to resume from (the file is empty (0 bytes)). "
                      "Delete it, or give --resume false to start afresh (it is overwritten)"]


def test_ddp_evaluation_matches_single_process(trained):
    """2 CPU processes (gloo) under torchrun give the same per-image metrics as one process."""
    out = trained["out"]
    single = bundle_cmd("evaluating", ["train.json", "evaluate.json"], *trained["args"], "--num_workers", "0",
                        "--eval_part", "all", "--eval_dir", str(out / "eval_single"))
    run(single)
    multi = bundle_cmd("evaluating", ["train.json", "evaluate.json", "multi_gpu_evaluate.json"], *trained["args"],
                       "--num_workers", "0", "--eval_part", "all", "--eval_dir", str(out / "eval_ddp"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
                *multi[2:]]
    run(torchrun)
    a = {r["id"]: r for r in csv.DictReader(open(out / "eval_single" / "metrics_per_image.csv"))}
    b = {r["id"]: r for r in csv.DictReader(open(out / "eval_ddp" / "metrics_per_image.csv"))}
    assert len(a) == 9 and set(a) == set(b)  # 9 images over 2 ranks: no padding duplicates
    for i in a:
        for k, v in a[i].items():
            if k in ("id", "filename") or v == "":
                assert v == b[i][k]
            else:
                assert float(v) == pytest.approx(float(b[i][k]), abs=1e-5), (i, k)


def test_tracking_mlflow_logs_loss_terms_and_validation(small_dataset, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run(bundle_cmd("training", ["train.json"], "--dataset_dir", str(small_dataset), "--output_dir", str(tmp_path),
                   "--split_file", str(tmp_path / "s.json"), "--max_epochs", "1", *COMMON, "--tracking", "mlflow"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "no MLflow run recorded"
    logged = set().union(*(r.data.metrics for r in runs))
    assert {"train_loss", "loss_seg", "loss_edge", "loss_glga", "lr", "val_mean_dice", "val_bf1"} <= logged


def test_ddp_training_two_processes(small_dataset, tmp_path):
    """multi_gpu_train.json under torchrun with 2 CPU processes (gloo): trains, rank 0 alone writes."""
    cmd = bundle_cmd("training", ["train.json", "multi_gpu_train.json"], "--dataset_dir", str(small_dataset),
                     "--output_dir", str(tmp_path), "--split_file", str(tmp_path / "s.json"), "--max_epochs", "1", *COMMON)
    log = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534", "-m", *cmd[2:]])
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "checkpoint.pt").is_file()
    assert log.count("new best key metric") == 1  # BestModelSaver runs on rank 0 only
    # DistributedSampler shards the training crops (one per 512 x 512 tile at model scale) over the 2 ranks
    (split,) = json.loads((tmp_path / "s.json").read_text())["datasets"].values()
    per_rank = -(-4 * len(split["train"]) // 2)  # four crops per 512 x 512 tile at 0.25 um/px
    assert torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=False)["trainer"]["iteration"] == -(-per_rank // 3)
