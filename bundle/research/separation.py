"""Where touching nuclei merge: is the separating map absent between them, or present but lost by the watershed?

For every pair of true nuclei that touch (4-neighbours with different ids) in an instance-labelled validation tile,
:func:`touching_pairs` finds their contact line, and :func:`diagnose_tile` asks:

* **merged**: do both nuclei's best-overlapping predicted nuclei coincide (one predicted object covers both)?
* **map on the contact line**: the mean of the map the watershed separates with (the boundary probability, or an
  instance head's separation map) over the contact pixels, and the share of those pixels at or above the
  watershed's ``boundary_threshold``. The watershed's markers stay apart only if the whole line is cut, so a
  merged pair whose line is mostly (>= half) above the threshold was *lost by the watershed* (gaps in the ridge or
  markers joined elsewhere), one whose line is mostly below it had *no boundary* to cut.

:func:`plot_worst_tiles` draws the worst tiles (image, region map, separating map, nuclei against the truth).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.data.io import read_image
from bundle.evaluation.instance import aji
from bundle.model.weights import load_weights
from bundle.nuclei.watershed import WatershedParams, instances_from_maps
from bundle.research.figures import pyplot, save_figure
from bundle.research.recipe import predict_validation

__all__ = ["touching_pairs", "diagnose_tile", "summarise", "plot_worst_tiles", "diagnose_weights"]


def touching_pairs(truth: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """``{(a, b): contact pixels (n, 2)}`` for every pair of ids ``a < b`` that are 4-neighbours in ``truth``;
    the contact pixels are those of either nucleus with a 4-neighbour in the other."""
    truth = np.asarray(truth)
    pairs: dict[tuple[int, int], list[np.ndarray]] = {}
    h, w = truth.shape
    for dy, dx in ((0, 1), (1, 0)):
        a, b = truth[: h - dy, : w - dx], truth[dy:, dx:]
        touch = (a > 0) & (b > 0) & (a != b)
        ys, xs = np.nonzero(touch)
        lo, hi = np.minimum(a[touch], b[touch]), np.maximum(a[touch], b[touch])
        for key in set(zip(lo.tolist(), hi.tolist())):
            sel = (lo == key[0]) & (hi == key[1])
            pts = np.concatenate([np.stack([ys[sel], xs[sel]], 1), np.stack([ys[sel] + dy, xs[sel] + dx], 1)])
            pairs.setdefault(key, []).append(pts)
    return {k: np.unique(np.concatenate(v), axis=0) for k, v in sorted(pairs.items())}


def _best_match(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each true id, the predicted id that overlaps it most (0 when none)."""
    n_t, n_p = int(truth.max()) + 1, int(pred.max()) + 1
    both = (truth > 0) & (pred > 0)
    counts = np.bincount(truth[both].astype(np.int64) * n_p + pred[both], minlength=n_t * n_p).reshape(n_t, n_p)
    best = counts.argmax(axis=1)
    best[counts.max(axis=1) == 0] = 0
    return best


def diagnose_tile(region: np.ndarray, separating: np.ndarray, truth: np.ndarray,
                  params: WatershedParams) -> dict[str, Any]:
    """One tile's touching pairs (see the module docstring); ``region``/``separating`` at ``truth``'s size."""
    truth = np.asarray(truth).astype(np.int64)
    pred = instances_from_maps(region, separating, params)
    best = _best_match(pred, truth)
    rows = []
    for (a, b), pts in touching_pairs(truth).items():
        line = np.asarray(separating)[pts[:, 0], pts[:, 1]]
        rows.append({"merged": bool(best[a] > 0 and best[a] == best[b]), "line_mean": float(line.mean()),
                     "line_cut": float((line >= params.boundary_threshold).mean())})
    merged = [r for r in rows if r["merged"]]
    largest = np.bincount(best[best > 0]).max() if (best > 0).any() else 0
    return {
        "true_nuclei": int(len(np.unique(truth)) - 1), "predicted_nuclei": int(pred.max()),
        "largest_object_true_nuclei": int(largest),
        "touching_pairs": len(rows), "merged_pairs": len(merged),
        "merged_no_boundary": sum(r["line_cut"] < 0.5 for r in merged),
        "merged_lost_by_watershed": sum(r["line_cut"] >= 0.5 for r in merged),
        "line_mean_merged": float(np.median([r["line_mean"] for r in merged])) if merged else float("nan"),
        "line_mean_separated": float(np.median([r["line_mean"] for r in rows if not r["merged"]]))
        if len(merged) < len(rows) else float("nan"),
        "pred": pred,
    }


def summarise(diagnoses: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Totals over tiles: touching pairs, merged share, and of the merged, the share with no boundary."""
    pairs = sum(d["touching_pairs"] for d in diagnoses)
    merged = sum(d["merged_pairs"] for d in diagnoses)
    none = sum(d["merged_no_boundary"] for d in diagnoses)
    return {"touching_pairs": pairs, "merged_pairs": merged, "merged_share": merged / pairs if pairs else float("nan"),
            "merged_no_boundary": none, "merged_lost_by_watershed": merged - none,
            "no_boundary_share_of_merged": none / merged if merged else float("nan")}


def plot_worst_tiles(tiles: Sequence[Mapping[str, Any]], out_png: str | os.PathLike, crop: int = 384,
                     data_pixels: bool = False) -> Path:
    """One row per tile on the ``crop`` x ``crop`` window around its largest merged object: region map, separating
    map, and the predicted nuclei shaded by how many true nuclei each covers (1 = right, more = merged). With
    ``data_pixels`` the H&E image and the true (green) / predicted (red) contours come first: for a local look only,
    since nothing cut from the data is committed. Each tile: ``region``, ``separating``, ``pred``, ``truth``,
    ``title`` (and ``image`` (H, W, 3) uint8 with ``data_pixels``)."""
    from skimage.segmentation import find_boundaries

    plt = pyplot()
    columns = 5 if data_pixels else 3
    fig, axes = plt.subplots(len(tiles), columns, figsize=(3.3 * columns, 3.5 * len(tiles)), squeeze=False)
    for row, t in zip(axes, tiles):
        pred, truth = np.asarray(t["pred"]), np.asarray(t["truth"])
        best = _best_match(pred, truth)
        covered = np.bincount(best[best > 0], minlength=int(pred.max()) + 1)  # true nuclei per predicted nucleus
        worst = int(covered.argmax()) if covered.any() else 0
        ys, xs = np.nonzero(pred == worst) if worst else (np.array([pred.shape[0] // 2]), np.array([pred.shape[1] // 2]))
        y0 = int(np.clip(ys.mean() - crop // 2, 0, max(0, pred.shape[0] - crop)))
        x0 = int(np.clip(xs.mean() - crop // 2, 0, max(0, pred.shape[1] - crop)))
        win = (slice(y0, y0 + crop), slice(x0, x0 + crop))
        merged = np.where(pred[win] > 0, covered[pred[win]], np.nan)
        panels = [(np.asarray(t["region"])[win], "region map", "magma", 1),
                  (np.asarray(t["separating"])[win], t.get("separating_name", "boundary map"), "magma", 1),
                  (merged, "predicted nuclei: true nuclei covered", "viridis", max(4, int(np.nanmax(merged)) if pred[win].any() else 4))]
        if data_pixels:
            image = np.asarray(t["image"])[win]
            overlay = image.copy()
            overlay[find_boundaries(truth[win], mode="inner")] = (0, 255, 0)
            overlay[find_boundaries(pred[win], mode="inner")] = (255, 0, 0)
            panels = [(image, "image", None, None)] + panels + [(overlay, "predicted red, true green", None, None)]
        for ax, (img, name, cmap, vmax) in zip(row, panels):
            shown = ax.imshow(img, cmap=cmap, vmin=0 if vmax else None, vmax=vmax)
            if name.startswith("predicted nuclei"):
                fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        row[0].set_title(f"{t['title']}\n{row[0].get_title()}", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, out_png)
    plt.close(fig)
    return out


def diagnose_weights(config_files: Sequence[str], overrides: Mapping[str, Any], weights: str | os.PathLike,
                     params: WatershedParams, out_png: str | os.PathLike | None = None, worst: int = 3,
                     data_pixels: bool = False, sweep_thresholds: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
                     ) -> dict[str, Any]:
    """Diagnose ``weights`` (trained with ``config_files`` + ``overrides``) on the instance-labelled validation
    tiles with the watershed ``params``: per tile and summed, and per dataset; the ``worst`` tiles by AJI drawn to
    ``out_png`` (with the images and true contours when ``data_pixels``; see :func:`plot_worst_tiles`). Maps are at
    the model scale, which must be the tiles' own (true for the bundle's 40x data). ``threshold_sweep``: mean AJI
    (all, per dataset) and merged share with ``params`` at each of ``sweep_thresholds`` as the boundary threshold:
    a boundary that is there but too faint for ``params`` would show as AJI rising at lower thresholds."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(dict(overrides))
    network = parser.get_parsed_content("network_def")
    load_weights(network, weights)
    tiles = [t for t in predict_validation(parser, network) if t["kind"] == "instance"]
    rows, drawn = [], []
    for t in tiles:
        if t["region"].shape != t["truth"].shape:
            raise ValueError(f"{t['id']}: maps {t['region'].shape} differ from the label {t['truth'].shape}; "
                             "diagnose at the tiles' own scale")
        d = diagnose_tile(t["region"], t["boundary"], t["truth"], params)
        d.update(id=t["id"], dataset=t["dataset"], aji=float(aji(d["pred"], t["truth"])))
        drawn.append({**t, "pred": d.pop("pred")})
        rows.append(d)
    sweep = []
    for threshold in sweep_thresholds:
        p = dataclasses.replace(params, boundary_threshold=float(threshold))
        ds = [diagnose_tile(t["region"], t["boundary"], t["truth"], p) | {"dataset": t["dataset"]} for t in tiles]
        for d, t in zip(ds, tiles):  # the watershed of diagnose_tile, scored
            d["aji"] = float(aji(d.pop("pred"), t["truth"]))
        sweep.append({"boundary_threshold": float(threshold),
                      "aji": {name: float(np.mean([d["aji"] for d in ds if name in ("all", d["dataset"])]))
                              for name in ("all", *sorted({d["dataset"] for d in ds}))},
                      "merged_share": summarise(ds)["merged_share"]})
    order = np.argsort([r["aji"] for r in rows])[:worst]
    if out_png is not None and len(order):
        has_head = int(getattr(network, "instance_head", "none") != "none")
        plot_worst_tiles([{**drawn[i], "image": read_image(drawn[i]["image"]) if data_pixels else None,
                           "separating": drawn[i]["boundary"],
                           "separating_name": "separation map" if has_head else "boundary map",
                           "title": f"{rows[i]['id']} ({rows[i]['dataset']}) AJI {rows[i]['aji']:.2f}"}
                          for i in order], out_png, data_pixels=data_pixels)
    return {"weights": str(weights), "watershed": params.to_dict(), "overall": summarise(rows),
            "per_dataset": {ds: summarise([r for r in rows if r["dataset"] == ds]) for ds in sorted({r["dataset"] for r in rows})},
            "threshold_sweep": sweep, "worst": [rows[i]["id"] for i in order], "tiles": rows}
