"""Convert the original public releases of TNBC and MoNuSeg 2018 into the standard layout of ``bundle.data.layout``.

- TNBC (Naylor et al. 2019, Zenodo 1175282): ``Slide_XX/XX_k.png`` (RGB or all-opaque RGBA) and
  ``GT_XX/XX_k.png`` (0/255) -> ``images/XX_k.png`` (RGB), ``masks/XX_k.png`` (0/255 uint8),
  meta.csv with group = XX (patient), split = all.
- MoNuSeg 2018 (Kumar et al. 2017/2020): ``Tissue Images/TCGA-*.tif`` + ``Annotations/TCGA-*.xml`` (Aperio
  ImageScope XML, one ``<Region>`` polygon per nucleus; the test release keeps .tif and .xml side by side)
  -> ``images/<id>.png``, ``labels/<id>.png`` (uint16 instance map, 1..N), meta.csv with group = organ.

Polygons are rasterised like the organisers' MATLAB ``poly2mask`` on 1-based vertices:
``skimage.draw.polygon(Y - 1, X - 1, shape)``, later regions overwrite earlier ones, regions with fewer than
3 vertices or no pixels are dropped. Every file is written atomically; a non-empty destination is refused
unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.segmentation import relabel_sequential

from bundle.core.errors import DataError
from bundle.core.files import write_png_atomic, write_text_atomic
from bundle.data.io import read_image, read_label

__all__ = [
    "MONUSEG_ORGANS",
    "MONUSEG_TRAIN_IDS",
    "MONUSEG_TEST_IDS",
    "monuseg_organ",
    "parse_imagescope_xml",
    "rasterize_regions",
    "xml_to_instance_map",
    "convert_tnbc",
    "convert_monuseg",
]

logger = logging.getLogger(__name__)

# Organ of each official MoNuSeg 2018 image, keyed by the TCGA patient barcode (first 12 characters).
# Training (30): as the challenge lists them (matches /work/shared/data/monuseg/meta.csv); the six "liver"
# images carry lung-study TCGA site codes but MoNuSeg calls them liver. Test (14): the challenge's organ per
# image (TCGA projects: 2Z/GL/IZ = KIRP kidney, 44/69 = LUAD lung, FG/HT = LGG brain, A6 = COAD colon,
# AC/AO = BRCA breast, CU/ZF = BLCA bladder, EJ/HC = PRAD prostate).
MONUSEG_TRAIN_IDS: dict[str, str] = {
    "TCGA-18-5592-01Z-00-DX1": "liver", "TCGA-21-5784-01Z-00-DX1": "liver", "TCGA-21-5786-01Z-00-DX1": "liver",
    "TCGA-38-6178-01Z-00-DX1": "liver", "TCGA-49-4488-01Z-00-DX1": "liver", "TCGA-50-5931-01Z-00-DX1": "liver",
    "TCGA-A7-A13E-01Z-00-DX1": "breast", "TCGA-A7-A13F-01Z-00-DX1": "breast", "TCGA-AR-A1AK-01Z-00-DX1": "breast",
    "TCGA-AR-A1AS-01Z-00-DX1": "breast", "TCGA-E2-A14V-01Z-00-DX1": "breast", "TCGA-E2-A1B5-01Z-00-DX1": "breast",
    "TCGA-B0-5698-01Z-00-DX1": "kidney", "TCGA-B0-5710-01Z-00-DX1": "kidney", "TCGA-B0-5711-01Z-00-DX1": "kidney",
    "TCGA-HE-7128-01Z-00-DX1": "kidney", "TCGA-HE-7129-01Z-00-DX1": "kidney", "TCGA-HE-7130-01Z-00-DX1": "kidney",
    "TCGA-CH-5767-01Z-00-DX1": "prostate", "TCGA-G9-6336-01Z-00-DX1": "prostate",
    "TCGA-G9-6348-01Z-00-DX1": "prostate", "TCGA-G9-6356-01Z-00-DX1": "prostate",
    "TCGA-G9-6362-01Z-00-DX1": "prostate", "TCGA-G9-6363-01Z-00-DX1": "prostate",
    "TCGA-DK-A2I6-01A-01-TS1": "bladder", "TCGA-G2-A2EK-01A-02-TSB": "bladder",
    "TCGA-AY-A8YK-01A-01-TS1": "colon", "TCGA-NH-A8F7-01A-01-TS1": "colon",
    "TCGA-KB-A93J-01A-01-TS1": "stomach", "TCGA-RD-A8N9-01A-01-TS1": "stomach",
}
MONUSEG_TEST_IDS: dict[str, str] = {
    "TCGA-2Z-A9J9-01A-01-TS1": "kidney", "TCGA-GL-6846-01A-01-BS1": "kidney", "TCGA-IZ-8196-01A-01-BS1": "kidney",
    "TCGA-44-2665-01B-06-BS6": "lung", "TCGA-69-7764-01A-01-TS1": "lung",
    "TCGA-FG-A4MU-01B-01-TS1": "brain", "TCGA-HT-8564-01Z-00-DX1": "brain",
    "TCGA-A6-6782-01A-01-BS1": "colon",
    "TCGA-AC-A2FO-01A-01-TS1": "breast", "TCGA-AO-A0J2-01A-01-BSA": "breast",
    "TCGA-CU-A0YN-01A-02-BSB": "bladder", "TCGA-ZF-A9R5-01A-01-TS1": "bladder",
    "TCGA-EJ-A46H-01A-03-TSC": "prostate", "TCGA-HC-7209-01A-01-TS1": "prostate",
}
MONUSEG_ORGANS: dict[str, str] = {k[:12]: v for k, v in {**MONUSEG_TRAIN_IDS, **MONUSEG_TEST_IDS}.items()}

_TNBC_NAME = re.compile(r"^(\d+)_(\d+)$")


def monuseg_organ(image_id: str) -> tuple[str, str]:
    """(organ, split) of a MoNuSeg image id: split "train"/"test" for official ids, ("unknown", "all") otherwise."""
    if image_id in MONUSEG_TRAIN_IDS:
        return MONUSEG_TRAIN_IDS[image_id], "train"
    if image_id in MONUSEG_TEST_IDS:
        return MONUSEG_TEST_IDS[image_id], "test"
    organ = MONUSEG_ORGANS.get(image_id[:12])
    if organ is None:
        logger.warning("MoNuSeg id %s is not an official training or test image: group 'unknown'", image_id)
        return "unknown", "all"
    return organ, "all"


def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: destination is a file. Pass a folder path for --dst")
    if dst.is_dir() and next(dst.iterdir(), None) is not None and not overwrite:
        raise DataError(f"{dst}: destination is not empty. Choose an empty folder or pass --overwrite")
    dst.mkdir(parents=True, exist_ok=True)


def _write_meta(dst: Path, rows: Iterable[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)  # csv's default CRLF, as in the shared copies
    writer.writerow(["id", "group", "split"])
    writer.writerows(rows)
    write_text_atomic(dst / "meta.csv", buf.getvalue())


def convert_tnbc(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert the TNBC release folder ``src`` (holding ``Slide_XX`` and ``GT_XX``) into the standard layout at ``dst``.

    Images are saved as RGB uint8 PNG (an all-opaque alpha channel is dropped, see ``bundle.data.io.read_image``),
    masks as uint8 0/255 PNG (any non-zero GT value is foreground). Pairs are matched by file stem; an image
    without GT or GT without image gives one :class:`DataError` listing them all.
    """
    src, dst = Path(src), Path(dst)
    slides = sorted(p for p in src.glob("Slide_*") if p.is_dir()) if src.is_dir() else []
    if not slides:
        raise DataError(
            f"{src}: no Slide_XX folders found. Pass the unzipped TNBC_NucleiSegmentation folder "
            "(it holds Slide_01..Slide_11 and GT_01..GT_11)"
        )
    pairs, unpaired = [], []
    for slide in slides:
        gt_dir = src / slide.name.replace("Slide_", "GT_", 1)
        for img in sorted(slide.glob("*.png")):
            gt = gt_dir / img.name
            (pairs if gt.is_file() else unpaired).append((img, gt))
        if gt_dir.is_dir():
            unpaired += [(slide / g.name, g) for g in sorted(gt_dir.glob("*.png")) if not (slide / g.name).is_file()]
    if unpaired:
        listing = ", ".join(f"{i.name} ({'no GT' if not g.is_file() else 'no image'})" for i, g in unpaired[:10])
        raise DataError(f"{src}: unpaired TNBC files: {listing}. Every Slide_XX/XX_k.png needs GT_XX/XX_k.png")
    _prepare_destination(dst, overwrite)
    rows = []
    for img, gt in pairs:
        match = _TNBC_NAME.match(img.stem)
        group = match.group(1).zfill(2) if match else img.parent.name.replace("Slide_", "", 1)
        image = read_image(img)
        mask = read_label(gt, kind="binary")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{gt}: mask is {mask.shape} but {img} is {image.shape[:2]}. Check the release files")
        write_png_atomic(dst / "images" / f"{img.stem}.png", image)
        write_png_atomic(dst / "masks" / f"{img.stem}.png", (mask * 255).astype(np.uint8))
        rows.append((img.stem, group, "all"))
    _write_meta(dst, rows)
    return dst


def parse_imagescope_xml(path: str | os.PathLike) -> list[np.ndarray]:
    """Vertices of every ``<Region>`` in an Aperio ImageScope XML, each as an (N, 2) float array of (X, Y).

    Coordinates are returned as stored (1-based, MATLAB convention); regions of all ``<Annotation>`` elements
    are returned in document order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file does not exist. Every image needs Annotations/<id>.xml")
    try:
        root = ET.parse(path).getroot()
        regions = []
        for region in root.iter("Region"):
            verts = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
            regions.append(np.asarray(verts, dtype=np.float64).reshape(-1, 2))
    except (ET.ParseError, KeyError, ValueError) as exc:
        raise DataError(
            f"{path}: not a valid ImageScope XML ({type(exc).__name__}: {exc}). Re-download the annotation file"
        ) from exc
    return regions


def rasterize_regions(regions: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (uint16, 1..N in region order) of 1-based (X, Y) polygons, MATLAB ``poly2mask`` style.

    Region k (counting kept regions) is drawn with ``skimage.draw.polygon(Y - 1, X - 1, shape)`` (pixel
    centres inside the polygon); later regions overwrite earlier ones; regions with < 3 vertices or no
    pixels, and regions wholly overwritten, vanish; the result is relabelled consecutively.
    """
    out = np.zeros(shape, dtype=np.int64)
    k = 0
    for verts in regions:
        if len(verts) < 3:
            continue
        rr, cc = draw_polygon(verts[:, 1] - 1.0, verts[:, 0] - 1.0, shape)
        if rr.size == 0:
            continue
        k += 1
        out[rr, cc] = k
    relabelled, _, _ = relabel_sequential(out)
    if relabelled.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{int(relabelled.max())} nuclei do not fit a uint16 instance map")
    return relabelled.astype(np.uint16)


def xml_to_instance_map(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise an ImageScope XML file into a uint16 instance map of ``shape`` (see :func:`rasterize_regions`)."""
    return rasterize_regions(parse_imagescope_xml(path), shape)


def _monuseg_pairs(src: Path) -> list[tuple[Path, Path]]:
    """(image .tif, annotation .xml) pairs of a MoNuSeg release folder, training or test layout."""
    image_dir = next((src / d for d in ("Tissue Images", "Tissue_Images") if (src / d).is_dir()), src)
    xml_dir = src / "Annotations" if (src / "Annotations").is_dir() else image_dir
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff")) if src.is_dir() else []
    if not images:
        raise DataError(
            f"{src}: no 'Tissue Images/*.tif' found. Pass the unzipped MoNuSeg folder (training: 'Tissue Images' and "
            "'Annotations'; test: .tif and .xml side by side)"
        )
    missing = [p.stem for p in images if not (xml_dir / f"{p.stem}.xml").is_file()]
    if missing:
        raise DataError(
            f"{xml_dir}: no annotation XML for {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}. Every image needs <id>.xml"
        )
    return [(p, xml_dir / f"{p.stem}.xml") for p in images]


def convert_monuseg(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a MoNuSeg 2018 release folder ``src`` into the standard layout at ``dst``.

    Images -> RGB uint8 PNG (pixel values unchanged); XML -> uint16 instance map of the image's size with
    :func:`xml_to_instance_map`; meta.csv group = organ (:func:`monuseg_organ`), split = train / test for
    the official ids, "all" for others (warned, group "unknown").
    """
    src, dst = Path(src), Path(dst)
    pairs = _monuseg_pairs(src)
    _prepare_destination(dst, overwrite)
    rows = []
    for tif, xml in pairs:
        image = read_image(tif)
        labels = xml_to_instance_map(xml, image.shape[:2])
        write_png_atomic(dst / "images" / f"{tif.stem}.png", image)
        write_png_atomic(dst / "labels" / f"{tif.stem}.png", labels)
        organ, split = monuseg_organ(tif.stem)
        rows.append((tif.stem, organ, split))
    _write_meta(dst, rows)
    return dst
