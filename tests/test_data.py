"""bundle.data.layout: layout validation, grouped k-fold splits written once and reused, datalists, ensure_dataset."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.core.errors import DataError
from bundle.data.io import read_image, read_label
from bundle.data.layout import (
    assign_folds,
    ensure_dataset,
    get_datalist,
    load_or_create_splits,
    read_meta,
    validate_dataset,
)

RNG = np.random.default_rng(1)


def _tiny_dataset(root: Path, ids_groups, size=(16, 16), label_dir="masks") -> Path:
    """A synthetic dataset in the standard layout: random RGB tiles and 0/255 masks."""
    (root / "images").mkdir(parents=True)
    (root / label_dir).mkdir()
    lines = ["id,group,split"]
    for i, g in ids_groups:
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray((RNG.random(size) > 0.7).astype(np.uint8) * 255).save(root / label_dir / f"{i}.png")
        lines.append(f"{i},{g},all")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return root


def _linked_copy(src: Path, dst: Path) -> Path:
    """Writable view of a read-only dataset: own meta.csv, image/label folders symlinked (no pixel copies)."""
    dst.mkdir()
    shutil.copy(src / "meta.csv", dst / "meta.csv")
    for sub in ("images", "labels", "masks"):
        if (src / sub).is_dir():
            os.symlink(src / sub, dst / sub)
    return dst


# --- read_meta / validate_dataset: one clear message per kind of problem ---------------------------------


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"nothere: dataset folder does not exist.*ensure_dataset"):
        validate_dataset(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: dataset folder is empty"):
        validate_dataset(tmp_path / "empty")


def test_meta_csv_missing_or_malformed(tmp_path):
    root = _tiny_dataset(tmp_path / "d", [("a", "p1"), ("b", "p1")])
    (root / "meta.csv").unlink()
    with pytest.raises(DataError, match=r"meta\.csv: meta\.csv is missing.*id,group,split"):
        read_meta(root)
    (root / "meta.csv").write_text("id,split\na,all\n")
    with pytest.raises(DataError, match=r"meta\.csv: malformed.*missing column.*'group'"):
        read_meta(root)
    (root / "meta.csv").write_text("id,group,split\na,p1,all\nb,p1,all\na,p2,all\nb,p2,all\n")
    with pytest.raises(DataError, match=r"duplicate id\(s\) a, b\. Ids must be unique") as err:
        read_meta(root)
    assert str(root / "meta.csv") in str(err.value)
    (root / "meta.csv").write_text("id,group,split\na,,all\n,p1,all\n")
    with pytest.raises(DataError, match=r"empty id or group on line\(s\) 2, 3"):
        read_meta(root)
    (root / "meta.csv").write_text("id,group\na,p1\n")  # split column optional
    assert read_meta(root) == [{"id": "a", "group": "p1", "split": "all"}]


def test_ids_without_files_are_listed_together(tmp_path):
    root = _tiny_dataset(tmp_path / "d", [("a", "p1"), ("b", "p1"), ("c", "p2")])
    (root / "images" / "a.png").unlink()
    (root / "images" / "c.png").unlink()
    with pytest.raises(DataError, match=r"images: no image file for id\(s\) a, c listed in meta\.csv"):
        validate_dataset(root)
    root = _tiny_dataset(tmp_path / "e", [("a", "p1"), ("b", "p1"), ("c", "p2")])
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"no label file for id\(s\) b listed.*labels/<id>\.png"):
        validate_dataset(root)


def test_label_size_mismatch_names_the_file(tmp_path):
    root = _tiny_dataset(tmp_path / "d", [("a", "p1"), ("b", "p1")])
    Image.fromarray(np.zeros((16, 15), np.uint8)).save(root / "masks" / "b.png")
    with pytest.raises(DataError, match=r"label size differs.*masks/b\.png is 16x15 but b\.png is 16x16"):
        validate_dataset(root)


def test_validate_shared_datasets(tnbc_dir, monuseg_dir):
    tnbc = validate_dataset(tnbc_dir)
    assert len(tnbc) == 50 and {it["label_kind"] for it in tnbc} == {"binary"}
    assert len({it["group"] for it in tnbc}) == 11
    mon = validate_dataset(monuseg_dir)
    assert len(mon) == 30 and {it["label_kind"] for it in mon} == {"instance"}
    assert all(Path(it["image"]).is_absolute() and Path(it["label"]).is_file() for it in mon)


# --- fold assignment ----------------------------------------------------------------------------------


def _best_range_by_brute_force(sizes, n_folds):
    best = None
    for assign in itertools.product(range(n_folds), repeat=len(sizes)):
        if len(set(assign)) < n_folds:
            continue
        loads = np.bincount(assign, weights=sizes, minlength=n_folds)
        rng = loads.max() - loads.min()
        best = rng if best is None else min(best, rng)
    return best


@pytest.mark.parametrize("case", range(4))
def test_assign_folds_matches_exhaustive_count_balance(case):
    rng = np.random.default_rng(case)
    sizes = {f"g{i}": int(s) for i, s in enumerate(rng.integers(1, 9, size=7))}
    fg = {g: float(rng.uniform(0.05, 0.3)) * n for g, n in sizes.items()}
    folds = assign_folds(sizes, fg, n_folds=3, seed=42)
    assert sorted(g for f in folds for g in f) == sorted(sizes)  # each group in exactly one fold
    assert all(folds)
    loads = [sum(sizes[g] for g in f) for f in folds]
    assert max(loads) - min(loads) == _best_range_by_brute_force(list(sizes.values()), 3)
    assert assign_folds(sizes, fg, n_folds=3, seed=42) == folds  # deterministic


def test_assign_folds_needs_enough_groups():
    with pytest.raises(DataError, match="only 2 groups for 5 folds"):
        assign_folds({"a": 1, "b": 2}, {"a": 0.1, "b": 0.2}, n_folds=5)


# --- the split file for TNBC -------------------------------------------------------------------------


def test_tnbc_split_file_grouped_balanced_reused(tnbc_dir, tmp_path):
    split_file = tmp_path / "out" / "splits_5fold_seed42.json"
    splits = load_or_create_splits(tnbc_dir, split_file=split_file)
    on_disk = json.loads(split_file.read_text())
    assert on_disk == splits and splits["n_folds"] == 5 and splits["seed"] == 42
    rows = (tnbc_dir / "meta.csv").read_text().splitlines()[1:]  # "id,group,split" lines, LF-joined
    assert splits["meta_csv_sha256"] == hashlib.sha256("\n".join(rows).encode()).hexdigest()

    meta = {r["id"]: r["group"] for r in read_meta(tnbc_dir)}
    groups = [g for f in splits["folds"] for g in f["groups"]]
    assert sorted(groups) == sorted(set(meta.values())) and len(groups) == 11  # each patient in one fold
    for f in splits["folds"]:
        assert {meta[i] for i in f["ids"]} == set(f["groups"])
        assert f["n_images"] == len(f["ids"])
    counts = [f["n_images"] for f in splits["folds"]]
    assert sum(counts) == 50 and max(counts) - min(counts) <= 2  # patient sizes 8,7,6,5,4,4,4,3,3,3,3: 2 is optimal
    # foreground balance, recomputed independently from the masks
    fg = [np.mean([(read_label(tnbc_dir / "masks" / f"{i}.png") > 0).mean() for i in f["ids"]])
          for f in splits["folds"]]
    assert np.allclose(fg, [f["mean_foreground_fraction"] for f in splits["folds"]], atol=1e-6)
    assert max(fg) / min(fg) < 1.15, fg

    # reused, never regenerated: a hand-edited file comes back as it is
    on_disk["folds"][0]["note"] = "edited"
    split_file.write_text(json.dumps(on_disk))
    assert load_or_create_splits(tnbc_dir, split_file=split_file)["folds"][0]["note"] == "edited"
    with pytest.raises(DataError, match=r"holds a 5-fold split with seed 42, but n_folds=5, seed=7 was asked for"):
        load_or_create_splits(tnbc_dir, split_file=split_file, seed=7)


def test_changed_meta_csv_is_detected(tnbc_dir, tmp_path):
    data = _linked_copy(tnbc_dir, tmp_path / "tnbc")
    first = load_or_create_splits(data)  # writable folder: default file beside the data
    assert (data / "splits_5fold_seed42.json").is_file()
    assert load_or_create_splits(data) == first
    lines = (data / "meta.csv").read_text().splitlines()
    (data / "meta.csv").write_text("\n".join(lines) + "\n")  # CRLF -> LF: same rows, split still valid
    assert load_or_create_splits(data) == first
    (data / "meta.csv").write_text("\n".join(lines[:-1]) + "\n")  # drop one image
    with pytest.raises(DataError, match=r"splits_5fold_seed42\.json: was made from a different meta\.csv.*delete"):
        get_datalist(data, fold=0, part="train")


def test_read_only_dataset_needs_an_explicit_split_file(tnbc_dir):
    with pytest.raises(DataError, match=r"read-only.*split_file=<output_dir>/splits_5fold_seed42\.json"):
        load_or_create_splits(tnbc_dir)
    assert not (tnbc_dir / "splits_5fold_seed42.json").exists()


def test_datalist_parts_follow_the_protocol(tnbc_dir, tmp_path):
    split_file = tmp_path / "splits.json"
    everything = get_datalist(tnbc_dir, part="all")
    assert len(everything) == 50
    assert set(everything[0]) == {"image", "label", "label_kind", "id", "group"}
    assert [it["id"] for it in get_datalist(tnbc_dir, fold=-1, part="train")] == [it["id"] for it in everything]
    tests = []
    for k in range(5):
        parts = {p: get_datalist(tnbc_dir, fold=k, part=p, split_file=split_file) for p in ("train", "val", "test")}
        ids = {p: {it["id"] for it in v} for p, v in parts.items()}
        grp = {p: {it["group"] for it in v} for p, v in parts.items()}
        assert len(ids["train"] | ids["val"] | ids["test"]) == 50
        assert not (grp["train"] & grp["val"]) and not (grp["train"] & grp["test"]) and not (grp["val"] & grp["test"])
        nxt = {it["id"] for it in get_datalist(tnbc_dir, fold=(k + 1) % 5, part="test", split_file=split_file)}
        assert ids["val"] == nxt  # val of fold k = test of fold k+1
        tests.append(ids["test"])
    assert set().union(*tests) == {it["id"] for it in everything} and sum(map(len, tests)) == 50
    with pytest.raises(ValueError, match="no 'val' or 'test' part"):
        get_datalist(tnbc_dir, fold=-1, part="val")
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        get_datalist(tnbc_dir, fold=5, part="test", split_file=split_file)


def test_holdout_rows_stay_out_of_the_folds(tmp_path):
    pairs = [(f"i{k}", f"p{k % 4}") for k in range(12)]
    root = _tiny_dataset(tmp_path / "d", pairs, label_dir="labels")
    lines = (root / "meta.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",all", ",test")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    splits = load_or_create_splits(root, n_folds=3)
    assert splits["holdout_ids"] == ["i0"]
    assert "i0" not in {i for f in splits["folds"] for i in f["ids"]}
    assert [it["id"] for it in get_datalist(root, part="holdout")] == ["i0"]
    assert len(get_datalist(root, part="all")) == 12 and len(get_datalist(root, fold=-1)) == 11


def test_monuseg_folds_are_organs(monuseg_dir, tmp_path):
    splits = load_or_create_splits(monuseg_dir, split_file=tmp_path)  # a folder gets the default name
    assert (tmp_path / "splits_5fold_seed42.json").is_file()
    organs = [g for f in splits["folds"] for g in f["groups"]]
    assert sorted(organs) == ["bladder", "breast", "colon", "kidney", "liver", "prostate", "stomach"]
    assert [f["n_images"] for f in splits["folds"]] == [6] * 5


# --- ensure_dataset: download + convert, like DecathlonDataset(download=True) ---------------------------


def _tnbc_release_zip(tnbc_dir: Path, path: Path) -> Path:
    """A small zip in the original Zenodo layout (TNBC_NucleiSegmentation/Slide_XX, GT_XX, plus __MACOSX junk)."""
    with zipfile.ZipFile(path, "w") as zf:
        for image_id in ("01_1", "01_2", "02_1", "03_1"):
            group = image_id[:2]
            rgb = read_image(tnbc_dir / "images" / f"{image_id}.png")[:32, :48]
            rgba = np.dstack([rgb, np.full((32, 48), 255, np.uint8)])
            mask = np.asarray(Image.open(tnbc_dir / "masks" / f"{image_id}.png"))[:32, :48]
            for folder, arr in ((f"Slide_{group}", rgba), (f"GT_{group}", mask)):
                tmp = path.parent / "tmp.png"
                Image.fromarray(arr).save(tmp)
                zf.write(tmp, f"TNBC_NucleiSegmentation/{folder}/{image_id}.png")
        zf.writestr("__MACOSX/TNBC_NucleiSegmentation/Slide_01/._01_1.png", b"junk")
    return path


def test_ensure_dataset_downloads_from_file_url_and_converts(tnbc_dir, tmp_path):
    archive = _tnbc_release_zip(tnbc_dir, tmp_path / "TNBC_NucleiSegmentation.zip")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "tnbc"
    out = ensure_dataset(dest, url=archive.as_uri(), hash_val=sha)
    assert out == dest.resolve()
    items = validate_dataset(dest)
    assert [it["id"] for it in items] == ["01_1", "01_2", "02_1", "03_1"]
    assert [it["group"] for it in items] == ["01", "01", "02", "03"]
    original = read_image(tnbc_dir / "images" / "02_1.png")[:32, :48]
    assert np.array_equal(read_image(dest / "images" / "02_1.png"), original)
    assert (tmp_path / "data" / "tnbc_download" / "TNBC_NucleiSegmentation.zip").is_file()  # cached
    assert ensure_dataset(dest, url="file:///does/not/exist.zip") == dest.resolve()  # present: only validated


def test_ensure_dataset_errors(tnbc_dir, tmp_path):
    with pytest.raises(DataError, match="missing or empty and download is off"):
        ensure_dataset(tmp_path / "x", download=False)
    archive = _tnbc_release_zip(tnbc_dir, tmp_path / "TNBC_NucleiSegmentation.zip")
    with pytest.raises(DataError, match=r"download or extraction.*failed.*HashCheckError|hash"):
        ensure_dataset(tmp_path / "y", url=archive.as_uri(), hash_val="0" * 64)
    assert not (tmp_path / "y" / "meta.csv").exists()
