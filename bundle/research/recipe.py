"""Choosing the training recipe on the validation split: one run's network scored as a user would see it.

:func:`evaluate_run` builds the run's own configs (network, validation preprocessing, datasets and split), loads
the run's final weights, predicts each validation tile at the model scale (the run's ``validate#inferer``, MONAI's
``SlidingWindowInferer`` with Gaussian blending, as inference runs it), tunes the watershed on the instance-labelled validation tiles
(:func:`bundle.research.tuning.tune_in_stages`, mean AJI; the size grid scaled to the model pixel size), and scores the
nuclei at each tile's native resolution: Dice, AJI, PQ (instance labels only), BF1 (2 px) and HD95 of the
foreground. Tuning and scoring use the same validation tiles for every candidate, so the comparison is fair;
none of them is a training tile, and no test tile is ever read.

``grid_index`` measures the regular pattern of transposed convolutions in the maps: the mean absolute 2x2
alternation ``|a - b - c + d| / 4`` of the region map over its 2x2 cells, divided by the map's mean absolute
horizontal step. It is below 1 for any map; a period-2 pattern such as the checkerboard ``(i + j) % 2`` (what a
2x2 stride-2 transposed convolution paints on flat features) gives at most 0.5, white noise about 0.35, smooth
maps about 0.05-0.1 (Gaussian-filtered noise, sigma 2-3 px) and a linear ramp 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle import bundle_root
from bundle.core.files import write_text_atomic
from bundle.data.io import read_label
from bundle.data.scale import model_shape, scale_factor
from bundle.evaluation.instance import aji
from bundle.handlers.instance_eval import native_nuclei, nuclei_scores, unpad
from bundle.nuclei.binarize import REGION, watershed_channel
from bundle.nuclei.watershed import WatershedParams
from bundle.research.launch import bundle_run
from bundle.research.tuning import (
    SIZE_GRID,
    THRESHOLD_GRID,
    scaled_grid,
    tune_in_stages,
)

__all__ = ["grid_index", "predict_validation", "score_tiles", "evaluate_run"]

logger = logging.getLogger(__name__)


def grid_index(prob: np.ndarray) -> float:
    """Period-2 (checkerboard) texture of a map relative to its overall roughness (see the module docstring)."""
    m = np.asarray(prob, np.float64)
    h, w = (m.shape[0] // 2) * 2, (m.shape[1] // 2) * 2
    m = m[:h, :w]
    alt = np.abs(m[0::2, 0::2] - m[0::2, 1::2] - m[1::2, 0::2] + m[1::2, 1::2]).mean() / 4
    step = np.abs(np.diff(m, axis=1)).mean()
    return float(alt / step) if step > 0 else 0.0


def predict_validation(parser: Any, network: torch.nn.Module) -> list[dict[str, Any]]:
    """Model-scale region and boundary maps of every validation tile (the chain's padding cut off), with its
    truth at native size."""
    datalist = parser.get_parsed_content("val_datalist")
    model_pixel_size = float(parser.get_parsed_content("model_pixel_size"))
    preprocess = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    network.eval()
    out = []
    for item in datalist:
        d = preprocess(dict(item))
        with torch.no_grad():
            maps = inferer(torch.as_tensor(np.asarray(d["image"]))[None].float(), network)[0].numpy()
        truth = read_label(item["label"], kind=item["label_kind"])
        maps = unpad(maps, model_shape(truth.shape, scale_factor(float(item["pixel_size"]), model_pixel_size)))
        out.append({"id": item["id"], "dataset": item["dataset"], "kind": item["label_kind"], "image": item["image"],
                    "region": maps[REGION], "boundary": maps[watershed_channel(len(maps))], "truth": truth})
    return out


def _instances(tile: tuple[np.ndarray, np.ndarray, np.ndarray], params: WatershedParams) -> tuple[np.ndarray, np.ndarray]:
    region, boundary, truth = tile
    return native_nuclei(np.stack([region, boundary]), np.shape(truth), params), np.asarray(truth)


def score_tiles(tiles: Sequence[Mapping[str, Any]], params: WatershedParams) -> list[dict[str, Any]]:
    """Per tile: nuclei from the maps (watershed ``params`` at model scale, labels resized to native) scored
    against the truth at native size by :func:`bundle.handlers.instance_eval.nuclei_scores`, as
    ``configs/evaluate.json`` scores them; AJI and PQ for instance labels only."""
    rows = []
    for t in tiles:
        inst, truth = _instances((t["region"], t["boundary"], t["truth"]), params)
        scores = nuclei_scores(inst, truth, instances=t["kind"] == "instance")
        row = {"id": t["id"], "dataset": t["dataset"], "dice": scores["nuclei_dice"], "bf1": scores["nuclei_bf1"],
               "hd95": scores["nuclei_hd95"]}
        if t["kind"] == "instance":
            row["aji"], row["pq"] = scores["aji"], scores["pq"]
        row["grid_index"] = grid_index(t["region"])
        row["nuclei"] = int(inst.max())
        rows.append(row)
    return rows


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keys = ("dice", "aji", "pq", "bf1", "hd95", "grid_index")
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys if any(k in r for r in rows)}


def evaluate_run(config_files: Sequence[str], overrides: Mapping[str, Any], weights: str | os.PathLike,
                 out: str | os.PathLike | None = None, watershed: WatershedParams | None = None) -> dict[str, Any]:
    """Score one run (see the module docstring); ``weights``: a ``model.pt`` state dict or a ``checkpoint.pt``
    whose ``"network"`` entry is used. The watershed is tuned on the instance-labelled tiles unless ``watershed``
    is given (e.g. the shipped ``configs/inference.json`` one). Returns (and writes to ``out``) the watershed,
    per-dataset and overall means, and every tile's row."""
    from monai.bundle import ConfigParser

    started = time.time()
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(dict(overrides))
    network = parser.get_parsed_content("network_def")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network.load_state_dict(state["network"] if "network" in state else state)  # checkpoint.pt or model.pt
    tiles = predict_validation(parser, network)
    factor = 0.5 / float(parser.get_parsed_content("model_pixel_size"))  # the size grid is in 0.5 um/px pixels
    sizes = scaled_grid(SIZE_GRID, factor)
    base = WatershedParams(min_size=round(8 * factor**2), min_marker_size=round(8 * factor**2))
    instance_tiles = [(t["region"], t["boundary"], t["truth"]) for t in tiles if t["kind"] == "instance"]
    if watershed is None:
        best, table = tune_in_stages(instance_tiles, base, "aji", (THRESHOLD_GRID, sizes))
    else:
        best, table = watershed, [{"score": float(np.mean([aji(*_instances(t, watershed)) for t in instance_tiles]))}]
    rows = score_tiles(tiles, best)
    result = {
        "weights": str(weights),
        "watershed": best.to_dict(),
        "tuning": {"start_aji": table[0]["score"], "best_aji": max(r["score"] for r in table), "settings": len(table)},
        "overall": _means(rows),
        "instance_sets": _means([r for r in rows if "aji" in r]),
        "per_dataset": {ds: _means([r for r in rows if r["dataset"] == ds]) for ds in sorted({r["dataset"] for r in rows})},
        "tiles": rows,
        "seconds": round(time.time() - started, 1),
    }
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


#: config files of every recipe probe, in merge order (then the probe's own files)
PROBE_CONFIGS = ("configs/train.json", "configs/recipe/probe_schedule.json")


def load_probes(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"configs": [extra config files], <config id>: <value>, ...}}`` from a JSON file; the file's
    ``"_baseline"`` ids (the recipe every probe changes one switch of) are put under each probe's own."""
    probes = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(probes, dict) or not all(isinstance(v, dict) for v in probes.values()):
        raise ValueError(f"{path}: expected {{probe name: {{config id: value}}}}")
    base = probes.pop("_baseline", {})
    return {name: {**base, **spec} for name, spec in probes.items()}


def run_probe(name: str, spec: Mapping[str, Any], data_root: str, runs_dir: str | os.PathLike,
              results_dir: str | os.PathLike, budget_minutes: float) -> dict[str, Any]:
    """Train probe ``name`` for ``budget_minutes`` of CPU time (skipped when its weights exist), then score it
    with :func:`evaluate_run` into ``<results_dir>/<name>.json`` (skipped when that exists)."""
    root = Path(bundle_root())
    out_json = Path(results_dir) / f"{name}.json"
    if out_json.is_file():
        return json.loads(out_json.read_text())
    spec = dict(spec)
    files = [str(root / f) for f in (*PROBE_CONFIGS, *spec.pop("configs", []))]
    run_dir = Path(runs_dir).resolve() / name
    overrides = {**spec, "data_root": str(Path(data_root).resolve())}
    ckpt = run_dir / "models" / "checkpoint.pt"
    done = run_dir / "train_done.json"
    if not done.is_file():
        started, cpu = time.time(), os.times()
        bundle_run("training", "[" + ",".join(repr(f) for f in files) + "]",
                   {**overrides, "output_dir": str(run_dir), "budget_minutes": budget_minutes}, run_dir / "train.log")
        t = os.times()
        write_text_atomic(done, json.dumps({"wall_seconds": round(time.time() - started, 1),
                                            "cpu_seconds": round(t.children_user + t.children_system
                                                                 - cpu.children_user - cpu.children_system, 1)}) + "\n")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    trainer = state.get("trainer", {})
    iterations, epoch_length = int(trainer.get("iteration", 0)), int(trainer.get("epoch_length", 0) or 1)
    result = evaluate_run(files, overrides, ckpt)
    train = json.loads(done.read_text())
    batch = int(json.loads((root / PROBE_CONFIGS[-1]).read_text())["batch_size"])
    result = {"probe": name, "overrides": {k: v for k, v in spec.items()}, "configs": [Path(f).name for f in files],
              "budget_cpu_minutes": budget_minutes, "epochs": iterations // epoch_length, "iterations": iterations,
              "crops": iterations * batch, "train_wall_minutes": round(train["wall_seconds"] / 60, 1),
              "train_cpu_minutes": round(train["cpu_seconds"] / 60, 1),
              "crops_per_cpu_second": round(iterations * batch / max(train["cpu_seconds"], 1e-9), 2), **result}
    write_text_atomic(out_json, json.dumps(result, indent=2) + "\n")
    return result


def _scored_rows(paths: Sequence[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """``(file stem, result)`` of every scored file (a folder stands for its ``*.json``), best validation AJI first."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    rows = [(f.stem, json.loads(f.read_text())) for f in files]
    rows.sort(key=lambda r: -r[1]["instance_sets"].get("aji", float("nan")))
    return rows


def recipe_table(results_dir: str | os.PathLike, baseline: Mapping[str, Any] | None = None) -> str:
    """Markdown table, one row per scored probe (``<results_dir>/*.json``), best validation AJI first; the
    switches column lists the ids that differ from ``baseline`` and the config files not every probe merged."""
    base = dict(baseline or {})
    rows = [r for _, r in _scored_rows([results_dir])]
    shared = set.intersection(*(set(r["configs"]) for r in rows)) if rows else set()
    head = ("| probe | switches | AJI | PQ | Dice | BF1 | HD95 (px) | TNBC Dice | grid | epochs | crops/CPU-s | "
            "train CPU min |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        inst, allm, tn = r["instance_sets"], r["overall"], r["per_dataset"].get("tnbc", {})
        sw = ", ".join([f"{k}={v}" for k, v in r["overrides"].items() if base.get(k, None) != v]
                       + [f"+{c}" for c in r["configs"] if c not in shared])
        sw = sw.replace(", +", " +") or "(baseline)"
        lines.append(f"| {r['probe']} | {sw} | {inst['aji']:.3f} | {inst['pq']:.3f} | {allm['dice']:.3f} | "
                     f"{allm['bf1']:.3f} | {allm['hd95']:.1f} | {tn.get('dice', float('nan')):.3f} | "
                     f"{allm['grid_index']:.2f} | {r['epochs']} | {r['crops_per_cpu_second']:.2f} | {r['train_cpu_minutes']} |")
    return "\n".join(lines)


def per_dataset_table(paths: Sequence[str | os.PathLike], datasets: Sequence[str] = ("consep", "monuseg")) -> str:
    """Markdown table of scored weights (probe results or ``scripts/recipe.py score --out`` files; a folder stands
    for its ``*.json``), best mean AJI first: AJI over the instance-labelled tiles, then AJI / PQ / Dice of each of
    ``datasets``, the watershed's boundary threshold and how many settings its search tried."""
    cols = " | ".join(f"{d} AJI | {d} PQ | {d} Dice" for d in datasets)
    lines = [f"| weights | AJI | {cols} | boundary threshold | settings tried | train CPU min |",
             "|---|---|" + "---|" * (3 * len(datasets)) + "---|---|---|"]
    for stem, r in _scored_rows(paths):
        per = r["per_dataset"]
        cells = " | ".join(f"{per.get(d, {}).get(m, float('nan')):.3f}" for d in datasets for m in ("aji", "pq", "dice"))
        tried = (r.get("tuning") or {}).get("settings", "(fixed)")
        lines.append(f"| {r.get('probe', stem)} | {r['instance_sets']['aji']:.3f} | {cells} | "
                     f"{r['watershed']['boundary_threshold']} | {tried} | {r.get('train_cpu_minutes', '')} |")
    return "\n".join(lines)


def loader_throughput(config_files: Sequence[str], overrides: Mapping[str, Any], batches: int = 20) -> dict[str, float]:
    """Seconds per training batch spent in data loading (the cached chain's random part: crop, stain
    augmentation, input conversion, geometric augmentation, targets) and in the network step (forward, loss,
    backward, AdamW), measured in this process one after the other, so the caller's thread count applies."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update({**dict(overrides), "num_workers": 0})
    loader = parser.get_parsed_content("train#dataloader")
    network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    network.train()
    load_s = step_s = 0.0
    n = 0
    it = iter(loader)
    for _ in range(batches):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        value = loss(network(batch["image"]), batch["label"])
        value.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if _ > 0:  # the first batch pays one-off costs
            load_s, step_s, n = load_s + t1 - t0, step_s + t2 - t1, n + 1
    crops = int(parser.get_parsed_content("batch_size"))
    return {"load_s_per_batch": load_s / n, "step_s_per_batch": step_s / n, "batch_size": crops,
            "crops_per_s": crops / ((load_s + step_s) / n), "load_share": load_s / (load_s + step_s)}
