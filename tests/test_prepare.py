"""bundle.data.prepare + scripts/prepare_data.py: original releases -> standard layout; round trips are exact."""

from __future__ import annotations

import csv
import importlib.util
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import polygon as draw_polygon

from bundle.core.errors import DataError
from bundle.data.io import read_image, read_label
from bundle.data.layout import read_meta, validate_dataset
from bundle.data.prepare import (
    MONUSEG_TEST_IDS,
    MONUSEG_TRAIN_IDS,
    convert_monuseg,
    convert_tnbc,
    monuseg_organ,
    rasterize_regions,
)


def _load_script(repo_root: Path):
    spec = importlib.util.spec_from_file_location("prepare_data", repo_root / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- TNBC ------------------------------------------------------------------------------------------------

TNBC_GROUPS = ("01", "09")  # 7 + 6 tiles; the release's 09_2..09_4 are RGB, the rest RGBA


def _tnbc_release(tnbc_dir: Path, root: Path) -> list[str]:
    """Original Zenodo layout Slide_XX/XX_k.png + GT_XX/XX_k.png, rebuilt from the standard-layout copy."""
    ids = [r["id"] for r in read_meta(tnbc_dir) if r["group"] in TNBC_GROUPS]
    for image_id in ids:
        group = image_id.split("_")[0]
        rgb = read_image(tnbc_dir / "images" / f"{image_id}.png")
        rgba = image_id not in ("09_2", "09_3", "09_4")  # as in the release: an all-opaque alpha channel
        pixels = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]) if rgba else rgb
        (root / f"Slide_{group}").mkdir(parents=True, exist_ok=True)
        (root / f"GT_{group}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"Slide_{group}" / f"{image_id}.png")
        Image.open(tnbc_dir / "masks" / f"{image_id}.png").save(root / f"GT_{group}" / f"{image_id}.png")
    return ids


def test_tnbc_round_trip_is_pixel_exact(tnbc_dir, tmp_path, repo_root, capsys):
    src = tmp_path / "TNBC_NucleiSegmentation"
    ids = _tnbc_release(tnbc_dir, src)
    assert Image.open(src / "Slide_01" / "01_1.png").mode == "RGBA"
    dst = tmp_path / "converted"
    script = _load_script(repo_root)
    assert script.main(["tnbc", "--src", str(src), "--dst", str(dst)]) == 0
    assert f"wrote {len(ids)} images in 2 groups" in capsys.readouterr().out

    for image_id in ids:
        out_img = Image.open(dst / "images" / f"{image_id}.png")
        out_mask = Image.open(dst / "masks" / f"{image_id}.png")
        assert out_img.mode == "RGB" and out_mask.mode == "L"
        assert np.array_equal(np.asarray(out_img), np.asarray(Image.open(tnbc_dir / "images" / f"{image_id}.png")))
        assert np.array_equal(np.asarray(out_mask), np.asarray(Image.open(tnbc_dir / "masks" / f"{image_id}.png")))
    with open(dst / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["group"], r["split"]) for r in rows] == [(i, i.split("_")[0], "all") for i in ids]
    assert [it["label_kind"] for it in validate_dataset(dst)] == ["binary"] * len(ids)

    # a non-empty destination is refused unless --overwrite
    assert script.main(["tnbc", "--src", str(src), "--dst", str(dst)]) == 2
    assert "destination is not empty" in capsys.readouterr().err
    assert script.main(["tnbc", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0


def test_tnbc_unpaired_or_wrong_folder(tmp_path):
    src = tmp_path / "rel"
    (src / "Slide_01").mkdir(parents=True)
    (src / "GT_01").mkdir()
    for name in ("01_1.png", "01_2.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "Slide_01" / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "GT_01" / "01_1.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "GT_01" / "01_9.png")
    with pytest.raises(DataError, match=r"unpaired TNBC files: 01_2\.png \(no GT\), 01_9\.png \(no image\)"):
        convert_tnbc(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with pytest.raises(DataError, match=r"no Slide_XX folders.*TNBC_NucleiSegmentation"):
        convert_tnbc(tmp_path, tmp_path / "out")


# --- MoNuSeg: XML rasterisation ----------------------------------------------------------------------------


def test_rasterize_regions_by_hand():
    """1-based (X, Y) vertices shifted by -1 (poly2mask); later regions overwrite; degenerate ones dropped."""
    square = lambda x0, y0, x1, y1: np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)  # noqa: E731
    regions = [
        square(1.5, 1.5, 4.5, 4.5),  # centres 0.5..3.5 -> rows/cols 1..3
        np.array([[2.0, 2.0], [3.0, 3.0]]),  # 2 vertices: dropped
        np.array([[1.6, 1.6], [1.9, 1.6], [1.6, 1.9]]),  # no pixel centre inside: dropped
        square(0.5, 5.5, 1.5, 6.5),  # pixel (5, 0), wholly overwritten by the last region
        square(3.5, 3.5, 6.5, 6.5),  # rows/cols 3..5, overwrites (3, 3)
        square(0.5, 5.5, 1.5, 6.5),
    ]
    expected = np.zeros((6, 6), np.uint16)
    expected[1:4, 1:4] = 1
    expected[3:6, 3:6] = 2
    expected[5, 0] = 3
    assert np.array_equal(rasterize_regions(regions, (6, 6)), expected)


def _boundary_loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed loops of the pixel-corner boundary of ``mask`` (pixel (r, c) = square [r, r+1] x [c, c+1])."""
    m = np.pad(mask, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in zip(*np.nonzero(m)):
        r0, c0 = int(r) - 1, int(c) - 1
        for outside, a, b in (
            (not m[r - 1, c], (r0, c0), (r0, c0 + 1)),
            (not m[r, c + 1], (r0, c0 + 1), (r0 + 1, c0 + 1)),
            (not m[r + 1, c], (r0 + 1, c0 + 1), (r0 + 1, c0)),
            (not m[r, c - 1], (r0 + 1, c0), (r0, c0)),
        ):
            if outside:
                edges.setdefault(a, []).append(b)
    loops = []
    while edges:  # every corner has as many boundary edges in as out, so each walk closes
        start = cur = next(iter(edges))
        loop = [start]
        while True:
            nxt = edges[cur].pop()
            if not edges[cur]:
                del edges[cur]
            if nxt == start:
                break
            loop.append(nxt)
            cur = nxt
        # drop vertices in the middle of straight runs
        loops.append([v for i, v in enumerate(loop)
                      if (v[0] - loop[i - 1][0], v[1] - loop[i - 1][1]) != (loop[(i + 1) % len(loop)][0] - v[0],
                                                                            loop[(i + 1) % len(loop)][1] - v[1])])
    return loops


def mask_to_xml_polygon(mask: np.ndarray) -> np.ndarray:
    """One ImageScope polygon (1-based X, Y) that ``polygon(Y-1, X-1)`` rasterises back onto exactly ``mask``.

    The vertices are pixel corners, so no pixel centre lies on an edge and skimage's crossing-number test is
    exact. Holes and pieces touching only diagonally are handled too: all boundary loops are chained into
    one path by axis-aligned bridges on corner grid lines walked there and back, which leaves every
    pixel centre's crossing parity (even-odd rule) unchanged.
    """
    loops = _boundary_loops(mask)
    p = loops[0][0]
    path = loops[0] + [p]
    for loop in loops[1:]:
        q = loop[0]
        elbow = (p[0], q[1])
        path += [elbow, *loop, q, elbow, p]
    v = np.asarray(path, float)
    return np.stack([v[:, 1] + 0.5, v[:, 0] + 0.5], axis=1)  # corner (R, C) -> centre coords - 0.5, then +1


def test_polygon_tracing_is_exact_on_awkward_shapes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((7, 9)) < 0.5  # holes, diagonal contacts, several pieces
        if not mask.any():
            continue
        poly = mask_to_xml_polygon(mask)
        out = np.zeros(mask.shape, bool)
        out[draw_polygon(poly[:, 1] - 1, poly[:, 0] - 1, mask.shape)] = True
        assert np.array_equal(out, mask)


def _write_imagescope_xml(path: Path, polygons: list[np.ndarray]) -> None:
    root = ET.Element("Annotations", MicronsPerPixel="0.252000")
    ann = ET.SubElement(root, "Annotation", Id="1", Type="4", LineColor="65280")
    regions = ET.SubElement(ann, "Regions")
    ET.SubElement(regions, "RegionAttributeHeaders")
    for k, poly in enumerate(polygons, start=1):
        region = ET.SubElement(regions, "Region", Id=str(k), Type="0", NegativeROA="0")
        ET.SubElement(region, "Attributes")
        verts = ET.SubElement(region, "Vertices")
        for x, y in poly:
            ET.SubElement(verts, "Vertex", X=repr(float(x)), Y=repr(float(y)), Z="0")
    ET.SubElement(ann, "Plots")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b split the pixels into the same instances (labels may differ), background equal."""
    if not np.array_equal(a == 0, b == 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return pairs.shape[1] == np.unique(a[fg]).size == np.unique(b[fg]).size


MONUSEG_CROPS = {  # id -> (row, col) of a 180 x 240 crop (non-square, to catch X/Y swaps)
    "TCGA-21-5784-01Z-00-DX1": (0, 760),  # liver, touches the top/right image edges
    "TCGA-A7-A13E-01Z-00-DX1": (400, 300),  # breast
    "TCGA-HE-7128-01Z-00-DX1": (820, 0),  # kidney, bottom/left edges
}


def test_monuseg_round_trip_reproduces_instances(monuseg_dir, tmp_path, repo_root):
    src = tmp_path / "MoNuSeg 2018 Training Data"
    (src / "Tissue Images").mkdir(parents=True)
    (src / "Annotations").mkdir()
    rng = np.random.default_rng(42)
    truth = {}
    for image_id, (r, c) in MONUSEG_CROPS.items():
        image = read_image(monuseg_dir / "images" / f"{image_id}.png")[r:r + 180, c:c + 240]
        labels = read_label(monuseg_dir / "labels" / f"{image_id}.png")[r:r + 180, c:c + 240].copy()
        labels[2:10, 2:10] = 60000  # a ring-shaped nucleus with a background hole
        labels[4:8, 4:8] = 0
        labels[12:14, 2:4] = labels[14:16, 4:6] = 60001  # two pieces touching only at a corner
        truth[image_id] = (image, labels)
        Image.fromarray(image).save(src / "Tissue Images" / f"{image_id}.tif", compression="tiff_lzw")  # as released
        ids = [i for i in np.unique(labels) if i]
        polygons = []
        for i in rng.permutation(ids):  # region order must not matter: each polygon is exact
            rows, cols = np.nonzero(labels == i)
            r0, c0 = rows.min(), cols.min()
            poly = mask_to_xml_polygon(labels[r0:rows.max() + 1, c0:cols.max() + 1] == i)
            polygons.append(poly + [c0, r0])
        _write_imagescope_xml(src / "Annotations" / f"{image_id}.xml", polygons)

    dst = tmp_path / "monuseg"
    assert _load_script(repo_root).main(["monuseg", "--src", str(src), "--dst", str(dst)]) == 0
    organs = {r["id"]: r["group"] for r in read_meta(monuseg_dir)}
    meta = read_meta(dst)
    assert [(m["id"], m["group"], m["split"]) for m in meta] == [(i, organs[i], "train") for i in sorted(MONUSEG_CROPS)]
    for image_id, (image, labels) in truth.items():
        assert np.array_equal(read_image(dst / "images" / f"{image_id}.png"), image)
        stored = Image.open(dst / "labels" / f"{image_id}.png")
        out = np.asarray(stored)
        assert stored.mode == "I;16" and out.dtype == np.uint16
        assert _same_partition(out, labels)
        assert np.array_equal(np.unique(out), np.arange(np.unique(labels).size))  # relabelled 1..N
    assert {it["label_kind"] for it in validate_dataset(dst)} == {"instance"}


def test_monuseg_test_release_layout_and_unknown_ids(tmp_path, caplog):
    src = tmp_path / "MoNuSegTestData"  # test release: .tif and .xml side by side
    src.mkdir()
    for image_id in ("TCGA-HT-8564-01Z-00-DX1", "TCGA-ZZ-0000-01Z-00-DX1"):
        Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(src / f"{image_id}.tif")
        _write_imagescope_xml(src / f"{image_id}.xml", [np.array([[2.5, 2.5], [6.5, 2.5], [6.5, 9.5], [2.5, 9.5]])])
    with caplog.at_level(logging.WARNING, logger="bundle.data.prepare"):
        convert_monuseg(src, tmp_path / "out")
    assert "TCGA-ZZ-0000-01Z-00-DX1 is not an official" in caplog.text
    meta = {m["id"]: (m["group"], m["split"]) for m in read_meta(tmp_path / "out")}
    assert meta == {"TCGA-HT-8564-01Z-00-DX1": ("brain", "test"), "TCGA-ZZ-0000-01Z-00-DX1": ("unknown", "all")}
    lab = read_label(tmp_path / "out" / "labels" / "TCGA-HT-8564-01Z-00-DX1.png")
    expected = np.zeros((12, 10), np.int32)
    expected[2:9, 2:6] = 1  # rows 1.5..8.5, cols 1.5..5.5 after the -1 shift
    assert np.array_equal(lab, expected)
    (src / "TCGA-HT-8564-01Z-00-DX1.xml").write_text("<Annotations><Region>")
    with pytest.raises(DataError, match=r"TCGA-HT-8564-01Z-00-DX1\.xml: not a valid ImageScope XML"):
        convert_monuseg(src, tmp_path / "out2")
    (src / "TCGA-HT-8564-01Z-00-DX1.xml").unlink()
    with pytest.raises(DataError, match=r"no annotation XML for TCGA-HT-8564-01Z-00-DX1"):
        convert_monuseg(src, tmp_path / "out3")


def test_monuseg_organ_table(monuseg_dir):
    shared = {r["id"]: r["group"] for r in read_meta(monuseg_dir)}
    assert MONUSEG_TRAIN_IDS == shared  # the 30 official training images, organ as MoNuSeg lists it
    assert len(MONUSEG_TEST_IDS) == 14 and not set(MONUSEG_TEST_IDS) & set(MONUSEG_TRAIN_IDS)
    assert Counter(MONUSEG_TEST_IDS.values()) == {"kidney": 3, "lung": 2, "brain": 2, "breast": 2, "bladder": 2,
                                                  "prostate": 2, "colon": 1}
    assert monuseg_organ("TCGA-G9-6336-01Z-00-DX1") == ("prostate", "train")
    assert monuseg_organ("TCGA-44-2665-01B-06-BS6") == ("lung", "test")
