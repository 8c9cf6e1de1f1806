"""bundle.data.io: every image/label flavour reads into the canonical form, bad files give one DataError naming the file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from bundle.core.errors import DataError
from bundle.core.files import write_png_atomic, write_text_atomic
from bundle.data.io import (
    image_size,
    label_kind,
    read_image,
    read_label,
    read_label_and_kind,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgb_png_tiff_and_planar_tiff_read_unchanged(tmp_path):
    assert np.array_equal(read_image(_save(tmp_path / "a.png", RGB)), RGB)
    tifffile.imwrite(tmp_path / "a.tif", RGB)
    assert np.array_equal(read_image(tmp_path / "a.tif"), RGB)
    tifffile.imwrite(tmp_path / "p.tiff", np.moveaxis(RGB, -1, 0), planarconfig="separate", photometric="rgb")
    out = read_image(tmp_path / "p.tiff")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and np.array_equal(out, RGB)


def test_lzw_tiff_decodes_without_imagecodecs(tmp_path):
    # MoNuSeg's "Tissue Images" are LZW TIFFs; tifffile needs imagecodecs for LZW, PIL's libtiff does not
    Image.fromarray(RGB).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    assert tifffile.TiffFile(tmp_path / "lzw.tif").pages[0].compression == 5
    assert np.array_equal(read_image(tmp_path / "lzw.tif"), RGB)


def test_jpeg_matches_pil_decoding(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.jpg", quality=90)
    assert np.array_equal(read_image(tmp_path / "a.jpg"), np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")))


def test_opaque_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    assert np.array_equal(read_image(_save(tmp_path / "a.png", rgba)), RGB)


def test_transparent_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[0, :, 3] = 0  # fully transparent -> white
    rgba[1, :, 3] = 255  # opaque -> colour
    rgba[2:, :, 3] = 128
    out = read_image(_save(tmp_path / "a.png", rgba))
    assert (out[0] == 255).all()
    assert (out[1] == (100, 50, 0)).all()
    a = 128 / 255  # by hand: colour * a + 255 * (1 - a), rounded
    expected = [round(v * a + 255 * (1 - a)) for v in (100, 50, 0)]
    assert (out[2:] == expected).all()


def test_grayscale_bilevel_and_palette(tmp_path):
    gray = RGB[..., 0]
    assert np.array_equal(read_image(_save(tmp_path / "g.png", gray)), np.dstack([gray] * 3))
    Image.fromarray(gray > 127).save(tmp_path / "b.png")  # mode "1"
    assert np.array_equal(read_image(tmp_path / "b.png")[..., 1], np.where(gray > 127, 255, 0))
    Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    reference = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "p.png"), reference)


def test_16bit_is_scaled_by_bit_depth(tmp_path):
    gray16 = RNG.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really stored as 16-bit
    out = read_image(tmp_path / "g16.png")
    assert np.array_equal(out[..., 2], (gray16 >> 8).astype(np.uint8))
    assert out[0, 0, 0] == gray16[0, 0] // 256
    tifffile.imwrite(tmp_path / "c16.tif", RGB.astype(np.uint16) * 257)  # full-range 16-bit RGB
    assert np.array_equal(read_image(tmp_path / "c16.tif"), RGB)


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png.*does not exist"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"junk\.png.*cannot be decoded.*re-download"):
        read_image(tmp_path / "junk.png")
    data = (_save(tmp_path / "full.png", RGB)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"junk\.tif"):
        read_image(tmp_path / "junk.tif")


def test_non_2d_data_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", RNG.integers(0, 256, (5, 16, 16), dtype=np.uint8))
    with pytest.raises(DataError, match=r"stack\.tif.*3D stack"):
        read_image(tmp_path / "stack.tif")
    with pytest.raises(DataError, match=r"line\.png.*not a 2D image"):
        read_image(_save(tmp_path / "line.png", RGB[:1]))
    frames = [Image.fromarray(RGB), Image.fromarray(RGB[::-1].copy())]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"anim\.gif.*2 frames"):
        read_image(tmp_path / "anim.gif")
    with pytest.raises(DataError, match=r"stack\.tif"):
        read_label(tmp_path / "stack.tif")


def test_instance_labels_kept_binary_masks_mapped_to_01(tmp_path):
    inst = RNG.integers(0, 3000, (20, 20)).astype(np.uint16)
    Image.fromarray(inst).save(tmp_path / "inst.png")
    lab, kind = read_label_and_kind(tmp_path / "inst.png")
    assert kind == "instance" and lab.dtype == np.int32 and np.array_equal(lab, inst)
    tifffile.imwrite(tmp_path / "inst.tif", inst)
    assert np.array_equal(read_label(tmp_path / "inst.tif"), inst) and label_kind(tmp_path / "inst.tif") == "instance"
    assert np.array_equal(read_label(tmp_path / "inst.png", kind="binary"), (inst > 0).astype(np.int32))

    fg = RNG.random((20, 20)) > 0.5
    for name, arr, mode in [("m255.png", fg.astype(np.uint8) * 255, None), ("m01.png", fg.astype(np.uint8), None),
                            ("rgb.png", np.dstack([fg.astype(np.uint8) * 255] * 3), None)]:
        lab, kind = read_label_and_kind(_save(tmp_path / name, arr, mode))
        assert kind == "binary" and lab.dtype == np.int32 and np.array_equal(lab, fg.astype(np.int32)), name
    Image.fromarray(fg).save(tmp_path / "bilevel.png")
    assert label_kind(tmp_path / "bilevel.png") == "binary"
    assert np.array_equal(read_label(tmp_path / "bilevel.png"), fg.astype(np.int32))


def test_colour_label_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"colour\.png.*colour label map"):
        read_label(_save(tmp_path / "colour.png", RGB))


def test_image_size_reads_headers(tmp_path):
    assert image_size(_save(tmp_path / "a.png", RGB)) == (24, 32)
    tifffile.imwrite(tmp_path / "a.tif", RGB)
    assert image_size(tmp_path / "a.tif") == (24, 32)
    with pytest.raises(DataError, match="does not exist"):
        image_size(tmp_path / "nope.png")


def test_write_png_atomic_round_trips_and_leaves_no_temp(tmp_path):
    u16 = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    write_png_atomic(tmp_path / "sub" / "l.png", u16)
    write_png_atomic(tmp_path / "sub" / "i.png", RGB)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "l.png")), u16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "i.png")), RGB)
    assert sorted(os.listdir(tmp_path / "sub")) == ["i.png", "l.png"]
    with pytest.raises(ValueError, match="expected uint8"):
        write_png_atomic(tmp_path / "f.png", RGB.astype(np.float32))


@pytest.mark.parametrize("shape,dtype", [((5, 1), np.uint8), ((4, 9), np.uint8), ((6, 5, 3), np.uint8),
                                         ((3, 7, 4), np.uint8), ((8, 3), np.uint16), ((1, 1), np.uint16)])
def test_encode_png_decodes_to_the_same_array_with_pil(shape, dtype):
    import io

    from bundle.core.files import encode_png

    info = np.iinfo(dtype)
    a = RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    a.flat[0], a.flat[-1] = info.max, info.min  # the Sub filter wraps modulo 256
    for level in (0, 1, 9):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(a, level)))), a)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    write_text_atomic(tmp_path / "t.txt", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("bundle.core.files.encode_png", boom)
    (tmp_path / "x.png").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        write_png_atomic(tmp_path / "x.png", RGB)
    assert (tmp_path / "x.png").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["t.txt", "x.png"]
    assert (tmp_path / "t.txt").read_text() == "old"
