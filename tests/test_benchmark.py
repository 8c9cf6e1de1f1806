"""scripts/benchmark.py runs its suites end to end (--quick): the suites import what they time, find the bundle's
configs and data, and report every row. No timing is asserted (speed is a benchmark, never a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_every_stage(tnbc_dir, monuseg_dir, tmp_path):
    out = tmp_path / "bench.json"
    # the cost suite times HoVerNet (most of its 18 s): its config loading is checked below instead
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--suite", "inference", "--suite", "metrics",
                           "--quick", "--repeat", "1", "--json", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    stages = [r["stage"] for r in rows["inference"]]
    assert stages[:6] == ["read", "normalisation", "normalisation (skimage)", "network", "post-processing", "writing"]
    assert all(r["seconds"] > 0 for r in rows["inference"])
    assert rows["metrics"] and all(r["ours_s"] > 0 for r in rows["metrics"])


def test_cost_suite_builds_the_shipped_network_from_inference_json():
    from bundle import bundle_root
    from bundle.model.contract import read_contract
    from bundle.model.network import DSHFN
    from bundle.research.bench.cost import inference_network

    network, in_channels, model_pixel_size = inference_network([f"{bundle_root()}/configs/inference.json"])
    config = read_contract()
    assert isinstance(network, DSHFN) and in_channels == 3 and model_pixel_size == config["model_pixel_size"]
    assert network.instance_head == config["instance_head"]
    other = "distance" if config["instance_head"] != "distance" else "hv"
    assert inference_network([f"{bundle_root()}/configs/inference.json"], instance_head=other)[0].instance_head == other
