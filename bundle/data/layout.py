"""The standard dataset layout, its validation, and the patient/organ-grouped k-fold split every run reads.

Standard layout (what ``scripts/prepare_data.py`` writes; ``/work/shared/data/{tnbc,monuseg}`` follow it)::

    <dataset_dir>/images/<id>.png     RGB tile (.tif/.tiff/.jpg/.jpeg also accepted)
    <dataset_dir>/labels/<id>.png     uint16 instance map (0 = background)      } one of the two per id;
    <dataset_dir>/masks/<id>.png      binary mask, 0/255                         } labels/ wins if both exist
    <dataset_dir>/meta.csv            columns id,group[,split]; group = patient or organ

Split protocol (grouped k-fold, default K=5, seed=42): each group (patient/organ) lies in exactly one fold.
For fold k, ``test`` = fold k, ``val`` = fold (k+1) % K, ``train`` = the other K-2 folds, so validation is
carved from training patients and never from the held-out fold. The split is computed once, written to a
JSON file and then only read; a changed meta.csv is detected by a SHA-256 of its rows and refused.

``split`` column of meta.csv: rows with ``split == "test"`` (an official held-out set, e.g. the MoNuSeg test
images) never enter the folds; ``part="holdout"`` returns them. ``part="all"`` returns every row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from bundle.core.errors import DataError
from bundle.core.files import write_text_atomic
from bundle.data.io import IMAGE_SUFFIXES, image_size, read_label
from bundle.data.prepare import convert_tnbc

__all__ = [
    "TNBC_URL",
    "TNBC_SHA256",
    "META_COLUMNS",
    "read_meta",
    "validate_dataset",
    "default_split_file",
    "label_statistics",
    "assign_folds",
    "make_splits",
    "load_or_create_splits",
    "meta_hash",
    "fold_ids",
    "get_datalist",
    "ensure_dataset",
]

logger = logging.getLogger(__name__)

# Naylor et al. 2019, Zenodo record 1175282. SHA-256 as recorded for this exact URL by torch-em
# (constantinpape/torch-em, torch_em/data/datasets/histopathology/tnbc.py); not re-verified here (offline).
TNBC_URL = "https://zenodo.org/records/1175282/files/TNBC_NucleiSegmentation.zip"
TNBC_SHA256 = "da708c3a988f4ad4b9bbb9283b387faf703f0bc0e5e689927306bd27ea13a57f"

META_COLUMNS = ("id", "group", "split")
REQUIRED_COLUMNS = ("id", "group")
LABEL_DIRS = (("labels", "instance"), ("masks", "binary"))
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
HOLDOUT_SPLIT = "test"
SPLIT_FORMAT_VERSION = 1
_MAX_LISTED = 10  # problems listed per message; the count says how many more

Part = Literal["train", "val", "test", "all", "holdout"]


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _meta_path(dataset_dir: Path) -> Path:
    return dataset_dir / "meta.csv"


def _check_dataset_dir(dataset_dir: Path) -> None:
    if not dataset_dir.exists():
        raise DataError(
            f"{dataset_dir}: dataset folder does not exist. Pass an existing folder in the standard layout, "
            "convert a public release with scripts/prepare_data.py, or call ensure_dataset(..., download=True)"
        )
    if not dataset_dir.is_dir():
        raise DataError(f"{dataset_dir}: is a file, not a dataset folder. Pass the folder that holds meta.csv")
    if next(dataset_dir.iterdir(), None) is None:
        raise DataError(
            f"{dataset_dir}: dataset folder is empty. Put images/, labels/ or masks/ and meta.csv in it "
            "(scripts/prepare_data.py writes this layout), or call ensure_dataset(..., download=True)"
        )


def read_meta(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Read ``<dataset_dir>/meta.csv`` as a list of ``{"id", "group", "split"}`` dicts (``split`` defaults to "all").

    Raises :class:`DataError` for a missing file, missing columns, empty cells or duplicate ids
    (all duplicates / empty cells listed in one message).
    """
    dataset_dir = Path(dataset_dir)
    _check_dataset_dir(dataset_dir)
    path = _meta_path(dataset_dir)
    if not path.is_file():
        raise DataError(
            f"{path}: meta.csv is missing. Write a CSV with header 'id,group,split' (one row per image; "
            "group = patient or organ), or re-create the dataset with scripts/prepare_data.py"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc}). Save meta.csv as a UTF-8 CSV file") from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: malformed meta.csv, missing column(s) {missing} (header is {header}). "
            "The first line must be 'id,group,split'"
        )
    rows, empty, seen, dupes = [], [], set(), []
    for line_no, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        if not row.get("id") or not row.get("group"):
            empty.append(line_no)
            continue
        if row["id"] in seen:
            dupes.append(row["id"])
        seen.add(row["id"])
        rows.append({"id": row["id"], "group": row["group"], "split": row.get("split") or "all"})
    if empty:
        raise DataError(f"{path}: malformed meta.csv, empty id or group on line(s) {_listing(empty)}. Fill them in")
    if dupes:
        raise DataError(
            f"{path}: malformed meta.csv, duplicate id(s) {_listing(sorted(set(dupes)))}. Ids must be unique"
        )
    if not rows:
        raise DataError(f"{path}: meta.csv has a header but no rows. Add one row per image")
    return rows


def _index_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map file stem -> path for files in ``folder`` with one of ``suffixes``; refuse two files with one stem."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
                found.setdefault(p.stem, []).append(p)
    clashes = sorted(f"{k} ({', '.join(q.name for q in v)})" for k, v in found.items() if len(v) > 1)
    if clashes:
        raise DataError(f"{folder}: several files share one id: {_listing(clashes)}. Keep one file per id")
    return {k: v[0] for k, v in found.items()}


def validate_dataset(dataset_dir: str | os.PathLike, check_sizes: bool = True) -> list[dict[str, str]]:
    """Check the standard layout and return one item per meta.csv row.

    Items are ``{"image", "label" (absolute paths), "label_kind" ("instance" | "binary"), "id", "group",
    "split"}``. Each kind of problem (empty folder, meta.csv missing/malformed, ids without image, ids without
    label, label size != image size) raises ONE :class:`DataError` listing every offending file. Sizes are
    read from the file headers, without decoding pixels.
    """
    dataset_dir = Path(dataset_dir).resolve()
    rows = read_meta(dataset_dir)
    images = _index_files(dataset_dir / "images", IMAGE_SUFFIXES)
    label_index = [(_index_files(dataset_dir / d, LABEL_SUFFIXES), kind) for d, kind in LABEL_DIRS]

    no_image = [r["id"] for r in rows if r["id"] not in images]
    if no_image:
        raise DataError(
            f"{dataset_dir / 'images'}: no image file for id(s) {_listing(no_image)} listed in meta.csv. "
            "Add images/<id>.png (or .tif/.jpg) or remove those rows from meta.csv"
        )
    items, no_label = [], []
    for r in rows:
        hit = next(((idx[r["id"]], kind) for idx, kind in label_index if r["id"] in idx), None)
        if hit is None:
            no_label.append(r["id"])
            continue
        items.append(
            {"image": str(images[r["id"]]), "label": str(hit[0]), "label_kind": hit[1], **r}
        )
    if no_label:
        raise DataError(
            f"{dataset_dir}: no label file for id(s) {_listing(no_label)} listed in meta.csv. Add labels/<id>.png "
            "(uint16 instance map) or masks/<id>.png (0/255 mask), or remove those rows from meta.csv"
        )
    if check_sizes:
        mismatched = []
        for it in items:
            hi, hl = image_size(it["image"]), image_size(it["label"])
            if hi != hl:
                mismatched.append(f"{it['label']} is {hl[0]}x{hl[1]} but {Path(it['image']).name} is {hi[0]}x{hi[1]}")
        if mismatched:
            raise DataError(
                f"{dataset_dir}: label size differs from its image for {len(mismatched)} id(s): "
                f"{_listing(mismatched)}. Re-export the labels at the image resolution (H x W must match)"
            )
    return items


def label_statistics(items: Sequence[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Per image: foreground fraction and nucleus count (instance ids, or 8-connected components of a mask)."""
    from scipy import ndimage

    stats = {}
    for it in items:
        lab = read_label(it["label"], kind=it["label_kind"])
        if it["label_kind"] == "instance":
            n = int(np.unique(lab[lab > 0]).size)
        else:
            n = int(ndimage.label(lab > 0, structure=np.ones((3, 3), dtype=bool))[1])
        stats[it["id"]] = {"foreground_fraction": float((lab > 0).mean()), "nuclei": float(n)}
    return stats


def _imbalance(n: np.ndarray, fg: np.ndarray) -> tuple[int, float]:
    """(image-count range, sum of squared relative deviations of fold size and fold mean foreground fraction)."""
    density = fg / np.maximum(n, 1)
    n_bar, d_bar = n.mean(), fg.sum() / max(n.sum(), 1)
    cost = float(np.sum(((n - n_bar) / n_bar) ** 2))
    if d_bar > 0:
        cost += float(np.sum(((density - d_bar) / d_bar) ** 2))
    return int(n.max() - n.min()), cost


def assign_folds(
    group_sizes: dict[str, int], group_fg: dict[str, float], n_folds: int = 5, seed: int = 42
) -> list[list[str]]:
    """Assign whole groups to ``n_folds`` folds, balancing image count and mean foreground fraction.

    ``group_sizes[g]`` = number of images of group g; ``group_fg[g]`` = sum of their foreground fractions.
    1. Greedy: groups in decreasing size (ties broken by a permutation seeded with ``seed``) go to the fold
       whose sum of squared normalised loads ``(n_f / n_mean)^2 + (F_f / F_mean)^2`` grows least, so the
       first ``n_folds`` groups open one fold each.
    2. Hill climbing over single-group moves and pairwise swaps (no fold left empty), minimising
       lexicographically (max - min fold image count, sum of squared relative deviations of fold size and of
       fold mean foreground fraction). Deterministic for a given seed.
    """
    groups = list(group_sizes)
    if n_folds < 3:
        raise ValueError(f"n_folds must be >= 3 (test, val and train folds), got {n_folds}")
    if len(groups) < n_folds:
        raise DataError(
            f"only {len(groups)} groups for {n_folds} folds: every fold needs at least one group. "
            f"Use n_folds <= {len(groups)} or check the group column of meta.csv"
        )
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    order.sort(key=lambda g: -group_sizes[g])  # stable: the seeded permutation breaks ties
    size = np.array([group_sizes[g] for g in groups], dtype=float)
    fg = np.array([group_fg[g] for g in groups], dtype=float)
    index = {g: i for i, g in enumerate(groups)}
    n_mean, f_mean = size.sum() / n_folds, max(fg.sum() / n_folds, 1e-12)

    fold_of = np.full(len(groups), -1)
    n_load, f_load = np.zeros(n_folds), np.zeros(n_folds)
    for g in order:
        i = index[g]
        growth = (2 * n_load * size[i] + size[i] ** 2) / n_mean**2 + (2 * f_load * fg[i] + fg[i] ** 2) / f_mean**2
        f = int(np.argmin(growth))
        fold_of[i] = f
        n_load[f] += size[i]
        f_load[f] += fg[i]

    def score(assign: np.ndarray) -> tuple[int, float]:
        n = np.bincount(assign, weights=size, minlength=n_folds)
        F = np.bincount(assign, weights=fg, minlength=n_folds)
        return _imbalance(n, F)

    best = score(fold_of)
    improved = True
    while improved:
        improved = False
        for i in range(len(groups)):
            for f in range(n_folds):  # moves
                if f == fold_of[i] or np.sum(fold_of == fold_of[i]) == 1:
                    continue
                trial = fold_of.copy()
                trial[i] = f
                s = score(trial)
                if s[0] < best[0] or (s[0] == best[0] and s[1] < best[1] - 1e-12):
                    fold_of, best, improved = trial, s, True
            for j in range(i + 1, len(groups)):  # swaps
                if fold_of[i] == fold_of[j]:
                    continue
                trial = fold_of.copy()
                trial[i], trial[j] = fold_of[j], fold_of[i]
                s = score(trial)
                if s[0] < best[0] or (s[0] == best[0] and s[1] < best[1] - 1e-12):
                    fold_of, best, improved = trial, s, True
    return [sorted(g for g in groups if fold_of[index[g]] == f) for f in range(n_folds)]


def meta_hash(dataset_dir: str | os.PathLike) -> str:
    """SHA-256 of meta.csv's rows as ``id,group,split`` lines joined by LF, in file order.

    Hashing the parsed rows rather than the bytes keeps a split valid across CRLF/LF, a BOM or stray spaces
    (e.g. the TNBC folder built by :func:`ensure_dataset` and the shared copy hash alike).
    """
    rows = read_meta(dataset_dir)
    return hashlib.sha256("\n".join(f"{r['id']},{r['group']},{r['split']}" for r in rows).encode()).hexdigest()


def make_splits(dataset_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> dict[str, Any]:
    """Compute the grouped k-fold split of ``dataset_dir`` (see :func:`assign_folds`) as a JSON-able dict."""
    dataset_dir = Path(dataset_dir).resolve()
    items = [it for it in validate_dataset(dataset_dir) if it["split"] != HOLDOUT_SPLIT]
    if not items:
        raise DataError(
            f"{_meta_path(dataset_dir)}: every row has split='{HOLDOUT_SPLIT}', nothing left to cross-validate. "
            "Use part='holdout' or part='all' to evaluate on these images"
        )
    stats = label_statistics(items)
    sizes: dict[str, int] = {}
    fgs: dict[str, float] = {}
    for it in items:
        sizes[it["group"]] = sizes.get(it["group"], 0) + 1
        fgs[it["group"]] = fgs.get(it["group"], 0.0) + stats[it["id"]]["foreground_fraction"]
    folds = assign_folds(sizes, fgs, n_folds=n_folds, seed=seed)
    out_folds = []
    for k, groups in enumerate(folds):
        ids = sorted(it["id"] for it in items if it["group"] in groups)
        out_folds.append(
            {
                "fold": k,
                "groups": groups,
                "ids": ids,
                "n_images": len(ids),
                "mean_foreground_fraction": round(float(np.mean([stats[i]["foreground_fraction"] for i in ids])), 6),
                "mean_nuclei_per_image": round(float(np.mean([stats[i]["nuclei"] for i in ids])), 3),
            }
        )
    return {
        "format_version": SPLIT_FORMAT_VERSION,
        "dataset": dataset_dir.name,  # informational only; the meta.csv hash is what is checked
        "meta_csv_sha256": meta_hash(dataset_dir),
        "n_folds": n_folds,
        "seed": seed,
        "protocol": "fold k: test = folds[k], val = folds[(k+1) % n_folds], train = all other folds",
        "balancing": "groups assigned greedily by size, then moves/swaps minimising (image-count range, "
        "squared relative deviation of fold size and mean foreground fraction)",
        "holdout_ids": sorted(r["id"] for r in read_meta(dataset_dir) if r["split"] == HOLDOUT_SPLIT),
        "folds": out_folds,
    }


def default_split_file(dataset_dir: str | os.PathLike, n_folds: int = 5, seed: int = 42) -> Path:
    """``<dataset_dir>/splits_<K>fold_seed<S>.json`` - the default location when the dataset folder is writable."""
    return Path(dataset_dir).resolve() / f"splits_{n_folds}fold_seed{seed}.json"


def _writable(folder: Path) -> bool:
    """Writable for us AND not marked read-only by its mode bits (root passes ``os.access`` on r-x folders)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _resolve_split_file(dataset_dir: Path, split_file: str | os.PathLike | None, n_folds: int, seed: int) -> Path:
    if split_file is not None:
        path = Path(split_file)
        return path / default_split_file(dataset_dir, n_folds, seed).name if path.is_dir() else path
    path = default_split_file(dataset_dir, n_folds, seed)
    if path.is_file() or _writable(dataset_dir):
        return path
    raise DataError(
        f"{dataset_dir}: the dataset folder is read-only, so the split file cannot be written beside it. "
        f"Pass split_file=<output_dir>/{path.name} (shared by every run on this dataset)"
    )


def load_or_create_splits(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 42,
) -> dict[str, Any]:
    """Read the split JSON, or compute and write it (atomically) if it does not exist yet.

    ``split_file``: an explicit JSON path (or a folder, which gets ``splits_<K>fold_seed<S>.json``); ``None``
    means :func:`default_split_file` when that exists or the dataset folder is writable, else a
    :class:`DataError` asks for an explicit path. An existing file is reused, never regenerated; if meta.csv
    changed since it was written, or it was made for another ``n_folds``/``seed``, a DataError says to delete
    or rename it.
    """
    dataset_dir = Path(dataset_dir).resolve()
    path = _resolve_split_file(dataset_dir, split_file, n_folds, seed)
    if path.is_file():
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
            folds = splits["folds"]
            stored_hash = splits["meta_csv_sha256"]
            stored = (int(splits["n_folds"]), int(splits["seed"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a valid split file ({type(exc).__name__}: {exc}). Delete or rename it to regenerate"
            ) from exc
        if stored_hash != meta_hash(dataset_dir):
            raise DataError(
                f"{path}: was made from a different meta.csv than {_meta_path(dataset_dir)} (row hash differs). "
                "meta.csv changed since the split was written; delete or rename the split file to make a new split "
                "(results of runs on the old split are then not comparable)"
            )
        if stored != (n_folds, seed) or len(folds) != n_folds:
            raise DataError(
                f"{path}: holds a {stored[0]}-fold split with seed {stored[1]}, but n_folds={n_folds}, seed={seed} "
                "was asked for. Pass the matching split_file or delete/rename this one"
            )
        return splits
    splits = make_splits(dataset_dir, n_folds=n_folds, seed=seed)
    try:
        write_text_atomic(path, json.dumps(splits, indent=2) + "\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot write the split file ({exc}). Pass a writable split_file path") from exc
    logger.info("wrote %d-fold split (seed %d) to %s", n_folds, seed, path)
    return splits


def fold_ids(splits: dict[str, Any], fold: int, part: Literal["train", "val", "test"]) -> list[str]:
    """Image ids of ``part`` for ``fold`` under the protocol test = k, val = (k+1) % K, train = the rest."""
    k_total = len(splits["folds"])
    if not 0 <= fold < k_total:
        raise ValueError(f"fold must be in 0..{k_total - 1} (or -1 for all data), got {fold}")
    val_fold = (fold + 1) % k_total
    if part == "test":
        chosen = [fold]
    elif part == "val":
        chosen = [val_fold]
    elif part == "train":
        chosen = [f for f in range(k_total) if f not in (fold, val_fold)]
    else:
        raise ValueError(f"part must be 'train', 'val' or 'test' here, got {part!r}")
    return sorted(i for f in chosen for i in splits["folds"][f]["ids"])


def get_datalist(
    dataset_dir: str | os.PathLike,
    fold: int = 0,
    part: Part = "train",
    split_file: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 42,
) -> list[dict[str, str]]:
    """MONAI-style datalist ``[{"image", "label", "label_kind", "id", "group"}, ...]`` for one fold and part.

    - ``part in {"train", "val", "test"}`` with ``fold`` in ``0..K-1``: the grouped split read (or created
      once) by :func:`load_or_create_splits`;
    - ``fold=-1`` with ``part="train"``: every cross-validation image (train on everything except
      ``split == "test"`` rows); ``fold=-1`` has no val/test part;
    - ``part="all"``: every row of meta.csv; ``part="holdout"``: rows with ``split == "test"``.
    Paths are absolute. For configs: ``"$bundle.data.layout.get_datalist(@dataset_dir, @fold, 'train', @split_file)"``.
    """
    items = validate_dataset(dataset_dir)
    keep = ("image", "label", "label_kind", "id", "group")
    strip = lambda seq: [{k: it[k] for k in keep} for it in seq]  # noqa: E731
    if part == "all":
        return strip(items)
    if part == "holdout":
        return strip([it for it in items if it["split"] == HOLDOUT_SPLIT])
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be one of 'train', 'val', 'test', 'all', 'holdout'; got {part!r}")
    if fold == -1:
        if part != "train":
            raise ValueError("fold=-1 trains on all cross-validation data and has no 'val' or 'test' part")
        return strip([it for it in items if it["split"] != HOLDOUT_SPLIT])
    splits = load_or_create_splits(dataset_dir, split_file=split_file, n_folds=n_folds, seed=seed)
    by_id = {it["id"]: it for it in items}
    return strip([by_id[i] for i in fold_ids(splits, fold, part)])


def _find_tnbc_root(folder: Path) -> Path | None:
    """The folder below ``folder`` that holds ``Slide_*`` directories (skipping macOS ``__MACOSX`` copies)."""
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if "__MACOSX" in candidate.parts:
            continue
        if any(c.is_dir() and c.name.startswith("Slide_") for c in candidate.iterdir()):
            return candidate
    return None


def _fetch(url: str, archive: Path, hash_val: str | None, extract_dir: Path) -> None:
    """Download ``url`` to ``archive`` and extract it into ``extract_dir`` with MONAI's downloader.

    ``monai.apps.download_and_extract`` first asks ``requests.head`` for the file name, which has no adapter
    for ``file://``; for such URLs its two halves (``download_url``, whose ``urlretrieve`` does read file://,
    and ``extractall``) are called directly - same hash check, same extraction.
    """
    from monai.apps import download_and_extract, download_url, extractall

    if urlparse(url).scheme == "file":
        download_url(url, filepath=archive, hash_val=hash_val, hash_type="sha256", progress=False)
        extractall(archive, output_dir=extract_dir)
    else:
        download_and_extract(url, filepath=archive, output_dir=extract_dir, hash_val=hash_val, hash_type="sha256")


def ensure_dataset(
    dataset_dir: str | os.PathLike,
    download: bool = True,
    url: str = TNBC_URL,
    hash_val: str | None = TNBC_SHA256,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return ``dataset_dir`` validated; if it is missing (or empty), download TNBC and convert it first.

    Like ``monai.apps.DecathlonDataset(download=True)``: the release zip (``url``, SHA-256 ``hash_val``; pass
    ``None`` to skip the check) is fetched with ``monai.apps.download_and_extract`` into ``cache_dir``
    (default ``<dataset_dir>_download`` beside it, kept so a second call does not download again), then
    converted to the standard layout with :func:`bundle.data.prepare.convert_tnbc`. Offline machines pass an
    existing ``dataset_dir``; ``download=False`` turns a missing folder into a :class:`DataError`.
    """
    dataset_dir = Path(dataset_dir).resolve()
    present = dataset_dir.is_dir() and next(dataset_dir.iterdir(), None) is not None
    if present:
        validate_dataset(dataset_dir)
        return dataset_dir
    if not download:
        raise DataError(
            f"{dataset_dir}: dataset folder is missing or empty and download is off. Pass an existing dataset "
            "folder, or --download true to fetch the TNBC release into it"
        )
    cache = Path(cache_dir) if cache_dir is not None else dataset_dir.parent / f"{dataset_dir.name}_download"
    archive = cache / Path(url.split("?")[0]).name
    extract_dir = cache / "extracted"
    try:
        _fetch(url, archive, hash_val, extract_dir)
    except Exception as exc:  # MONAI raises bare Exception, HashCheckError, URLError, BadZipFile, ...
        raise DataError(
            f"{url}: download or extraction into {cache} failed ({type(exc).__name__}: {exc}). Check the network "
            f"and the URL, delete a partial {archive} if present, or pass an existing dataset folder"
        ) from exc
    src = _find_tnbc_root(extract_dir)
    if src is None:
        raise DataError(
            f"{extract_dir}: the archive from {url} holds no Slide_* folders (not the TNBC release layout). "
            "Check the URL, or convert the data yourself with scripts/prepare_data.py"
        )
    convert_tnbc(src, dataset_dir)  # refuses a non-empty folder, so a half-written one is never merged into
    validate_dataset(dataset_dir)
    return dataset_dir
