"""Training on several datasets at once: each with its pixel size, one grouped validation split for all.

``datasets`` (a config id) maps a name to ``{"dir": <standard layout folder>, "pixel_size": <um/px>}``, e.g.::

    {"tnbc": {"dir": ".../tnbc", "pixel_size": 0.25}, "consep": {"dir": ".../consep", "pixel_size": 0.25}}

The split file holds, per dataset, the ids of its validation part and of its training part: the validation
part is fold 0 of the dataset's own grouped 5-fold split (:func:`bundle.data.layout.make_splits`: whole patients,
organs or tiles), so no group is ever on both sides. It is computed once, written, and then only read; a
changed meta.csv is refused (SHA-256 of its rows), as for the single-dataset split.

Every datalist item carries its ``pixel_size`` (for :class:`bundle.data.scale.ToModelScaled`), its ``dataset``
name and ``label_kind``; binary masks (TNBC) give region targets only (see :class:`bundle.data.transforms.NucleiTargets`).
:func:`crop_indices` repeats each tile in proportion to its area at the model scale, so every dataset
contributes every epoch in proportion to its tissue, as random crops that are never squashed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundle.core.errors import DataError
from bundle.core.files import write_text_atomic
from bundle.data.io import image_size
from bundle.data.layout import ensure_dataset, make_splits, meta_hash, validate_dataset
from bundle.data.scale import check_pixel_size

__all__ = ["SPLIT_KIND", "resolve_datasets", "make_recipe_split", "load_or_create_recipe_split", "datasets_datalist",
           "crop_indices", "with_pixel_size"]

logger = logging.getLogger(__name__)

#: "kind" field of the multi-dataset split file (a single-dataset k-fold file has none)
SPLIT_KIND = "multi-dataset validation split"


def _check_datasets(datasets: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(datasets, Mapping) or not datasets:
        raise DataError(
            f"datasets must map a name to {{'dir': ..., 'pixel_size': ...}}, got {datasets!r}. "
            "Example: --datasets \"{'mine': {'dir': '/data/mine', 'pixel_size': 0.25}}\""
        )
    for name, spec in datasets.items():
        if not isinstance(spec, Mapping) or "dir" not in spec or "pixel_size" not in spec:
            raise DataError(f"datasets[{name!r}] must have 'dir' and 'pixel_size' (um/px), got {spec!r}")
        check_pixel_size(spec["pixel_size"], f"datasets[{name!r}] pixel_size")


def resolve_datasets(
    datasets: Mapping[str, Mapping[str, Any]], dataset_dir: str | os.PathLike | None = None,
    pixel_size: float = 0.25, download: bool = False,
) -> dict[str, dict[str, Any]]:
    """The datasets a run trains on: ``{folder name: {"dir": dataset_dir, "pixel_size": pixel_size}}`` when
    ``dataset_dir`` is given (one dataset of your own), else ``datasets`` with every folder checked. ``download``
    fetches TNBC (:func:`bundle.data.layout.ensure_dataset`) into a missing ``dataset_dir`` or a missing ``"tnbc"`` entry."""
    if dataset_dir:
        # named as the option the user types: the dataset's entry would be named after its folder
        pixel_size = check_pixel_size(pixel_size, "--pixel_size")
        path = ensure_dataset(dataset_dir, download=download)
        out = {Path(path).name: {"dir": str(path), "pixel_size": pixel_size}}
    else:
        out = {name: dict(spec) for name, spec in datasets.items()}
    _check_datasets(out)
    for name, spec in out.items():
        folder = Path(spec["dir"])
        if name == "tnbc" and download and not folder.is_dir():
            spec["dir"] = str(ensure_dataset(folder, download=True))
        elif not folder.is_dir():
            raise DataError(
                f"{folder}: dataset {name!r} not found. Pass --data_root (the folder holding "
                f"{', '.join(sorted(out))}), --dataset_dir for one dataset of your own, or --datasets"
            )
    return out


def make_recipe_split(datasets: Mapping[str, Mapping[str, Any]], seed: int = 42) -> dict[str, Any]:
    """Per dataset: validation = fold 0 of its grouped 5-fold split (seed ``seed``), training = the rest."""
    _check_datasets(datasets)
    out: dict[str, Any] = {"kind": SPLIT_KIND, "seed": seed, "protocol": "val = fold 0 of each dataset's grouped "
                           "5-fold split (bundle.data.layout.make_splits), train = folds 1-4", "datasets": {}}
    for name, spec in datasets.items():
        folds = make_splits(spec["dir"], n_folds=5, seed=seed)["folds"]
        out["datasets"][name] = {
            "meta_csv_sha256": meta_hash(spec["dir"]),
            "val_groups": folds[0]["groups"],
            "val": folds[0]["ids"],
            "train": sorted(i for f in folds[1:] for i in f["ids"]),
        }
    return out


def load_or_create_recipe_split(
    datasets: Mapping[str, Mapping[str, Any]], split_file: str | os.PathLike, seed: int = 42,
    known_split: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Read ``split_file``, adding (and writing) the split of any dataset it does not hold yet: taken from
    ``known_split`` (e.g. the bundle's committed split) when that holds it for the same meta.csv, else computed."""
    _check_datasets(datasets)
    path = Path(split_file)
    split: dict[str, Any] = {"kind": SPLIT_KIND, "seed": seed, "datasets": {}}
    if path.is_file():
        try:
            split = json.loads(path.read_text(encoding="utf-8"))
            held = split["datasets"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a valid split file ({type(exc).__name__}: {exc}). Delete it to regenerate") from exc
        if split.get("kind") != SPLIT_KIND:
            raise DataError(f"{path}: is a single-dataset fold file, not a multi-dataset split. Pass another --split_file")
        for name, spec in datasets.items():
            if name in held and held[name]["meta_csv_sha256"] != meta_hash(spec["dir"]):
                raise DataError(
                    f"{path}: dataset {name!r} was split from a different meta.csv than {Path(spec['dir']) / 'meta.csv'}. "
                    "Use another --split_file (or give the dataset another name) for changed data"
                )
    missing = {n: s for n, s in datasets.items() if n not in split["datasets"]}
    if missing and known_split is not None and Path(known_split).is_file() and Path(known_split) != path:
        known = json.loads(Path(known_split).read_text(encoding="utf-8"))
        if known.get("kind") == SPLIT_KIND and known.get("seed") == seed:
            for name in list(missing):
                entry = known["datasets"].get(name)
                if entry is not None and entry["meta_csv_sha256"] == meta_hash(missing[name]["dir"]):
                    split["datasets"][name] = entry
                    del missing[name]
            if not missing:
                write_text_atomic(path, json.dumps(split, indent=2) + "\n")
    if missing:
        split["datasets"].update(make_recipe_split(missing, seed)["datasets"])
        try:
            write_text_atomic(path, json.dumps(split, indent=2) + "\n")
        except OSError as exc:
            raise DataError(f"{path}: cannot write the split file ({exc}). Pass a writable --split_file") from exc
        logger.info("split of %s written to %s", sorted(missing), path)
    return split


def datasets_datalist(
    datasets: Mapping[str, Mapping[str, Any]], split_file: str | os.PathLike, part: str = "train", seed: int = 42,
    known_split: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Datalist of ``part`` ("train", "val" or "all": both) over every dataset: ``{"image", "label",
    "label_kind", "id", "group", "dataset", "pixel_size"}`` per tile."""
    if part not in ("train", "val", "all"):
        raise ValueError(f"part must be 'train', 'val' or 'all', got {part!r}")
    split = load_or_create_recipe_split(datasets, split_file, seed, known_split) if part != "all" else None
    out = []
    for name, spec in datasets.items():
        items = {it["id"]: it for it in validate_dataset(spec["dir"])}
        ids = sorted(items) if split is None else split["datasets"][name][part]
        for i in ids:
            it = items[i]
            out.append({k: it[k] for k in ("image", "label", "label_kind", "id", "group")}
                       | {"dataset": name, "pixel_size": float(spec["pixel_size"])})
    return out


def crop_indices(
    datalist: Sequence[Mapping[str, Any]], spatial_size: Sequence[int], model_pixel_size: float
) -> list[int]:
    """Index ``i`` of ``datalist`` repeated ``ceil(model-scale area / crop area)`` times (at least once): one epoch
    then draws about as many random crops from a tile as it takes to cover it once."""
    crop = float(spatial_size[0]) * float(spatial_size[1])
    out: list[int] = []
    for i, it in enumerate(datalist):
        h, w = image_size(it["image"])
        f = float(it["pixel_size"]) / float(model_pixel_size)
        out += [i] * max(1, math.ceil(round(h * f) * round(w * f) / crop - 1e-9))
    return out


def with_pixel_size(datalist: Sequence[Mapping[str, Any]], pixel_size: float, dataset: str = "") -> list[dict[str, Any]]:
    """``datalist`` items (e.g. :func:`bundle.data.layout.get_datalist`'s) with ``pixel_size`` and ``dataset`` added, the
    keys the training chain reads (:class:`bundle.data.scale.ToModelScaled` ``pixel_size_key``)."""
    _check_datasets({dataset or "dataset": {"dir": "", "pixel_size": pixel_size}})
    return [{**it, "pixel_size": float(pixel_size), "dataset": dataset or it.get("dataset", "")} for it in datalist]
