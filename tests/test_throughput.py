"""Throughput machinery of the inference engine: the stage timer, the prefetching chunk pass and the writer thread
(the same output bytes as a sequential run), and the crop that replaces the identity resampling at 40x."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from bundle.data.io import read_image
from bundle.inference.chunks import maps_to_native, resample_matrix
from bundle.inference.engine import load_segmenter
from bundle.inference.overlap import Writer, prefetch
from bundle.inference.timing import StageTimer, active_timer, stage
from tests.test_engine import stub_config, tiles  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


# -- stage timer ------------------------------------------------------------------------------------------------
def test_stage_timer_sums_and_is_a_noop_when_off():
    assert active_timer() is None
    assert stage("x") is stage("y")  # off: one shared no-op context, nothing recorded anywhere
    with StageTimer() as timer:
        assert active_timer() is timer
        for _ in range(3):
            with stage("sleep"):
                time.sleep(0.02)
        with stage("busy"):
            sum(range(200_000))
    assert active_timer() is None
    rows = {r["stage"]: r for r in timer.table()}
    assert rows["sleep"]["calls"] == 3 and rows["busy"]["calls"] == 1
    assert 0.06 <= rows["sleep"]["wall_s"] < 0.5
    assert rows["sleep"]["cpu_s"] < rows["sleep"]["wall_s"]  # sleeping costs no CPU
    assert rows["busy"]["cpu_s"] > 0
    assert sum(r["wall_s"] for r in rows.values()) <= timer.total_wall


def test_stage_timer_marks_stages_of_other_threads():
    with StageTimer() as timer, Writer() as writer:
        def job():
            with stage("write"):
                return 7
        writer.submit("b", job)
        assert writer.wait()["b"] == 7
    assert "write" in timer.background


# -- prefetch and writer ----------------------------------------------------------------------------------------
def test_prefetch_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad chunk")

    got = []
    with pytest.raises(ValueError, match="bad chunk"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_the_producer_when_the_consumer_stops():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=1)
    assert next(it) == 0
    it.close()
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n <= 3  # one in the consumer's hands, one queued, one being made


def test_writer_returns_results_in_order_and_reraises():
    for enabled in (True, False):
        with Writer(enabled) as writer:
            writer.submit("x", lambda a: a * 2, 21)
            writer.submit("y", lambda: "done")
            assert writer.wait() == {"x": 42, "y": "done"}
            writer.submit("z", lambda: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                writer.wait()


# -- 40x: the identity resampling is a crop --------------------------------------------------------------------
def test_maps_to_native_at_equal_scale_equals_the_resampling_matrices(monuseg_dir):
    from bundle.inference.colour import lab_planes

    rgb = read_image(sorted((monuseg_dir / "images").glob("*.png"))[0])[:400, :360]
    lab = np.stack(lab_planes(rgb), axis=-1)  # two real-looking maps in [0, 1] (and one outside it, which both clip)
    maps = [lab[..., 0] / 100.0, np.abs(lab[..., 1]) / 40.0 - 0.2]
    out_y, out_x, in_y, in_x, shape = (17, 390), (3, 341), (0, 400), (0, 360), (400, 360)
    got = maps_to_native(maps, out_y, out_x, in_y, in_x, shape, shape)
    ry = resample_matrix(out_y, in_y, shape[0], shape[0], "bilinear")
    rx = resample_matrix(out_x, in_x, shape[1], shape[1], "bilinear")
    for g, m in zip(got, maps):
        want = np.clip(np.asarray((rx @ np.asarray(ry @ m).T).T, np.float32), 0.0, 1.0)
        assert g.dtype == np.float32 and np.array_equal(g, want)


# -- the engine: prefetch and writer thread change no byte ------------------------------------------------------
def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.endswith("summary.json")}


def test_outputs_identical_with_and_without_prefetch_and_writer_thread(stub_config, tmp_path):  # noqa: F811
    tiles(tmp_path / "in", 2, shape=(300, 420))  # several chunks (chunk 128 + halo 24) and blocks per tile
    runs = {}
    for on in (False, True):
        out = tmp_path / f"out_{on}"
        seg = load_segmenter([str(ROOT / "configs" / "inference.json"), str(stub_config)], ckpt_path=None,
                             device="cpu", progress=False, chunk=128, halo=24, post_chunk=96,
                             prefetch=str(on).lower(), writer_thread="yes" if on else "no")
        assert (seg.prefetch, seg.writer_thread) == (on, on)
        seg.run(tmp_path / "in", out)
        summary = json.loads((out / "t0_summary.json").read_text())
        assert summary["chunks"] > 2 and summary["nuclei"] > 0
        runs[on] = _digests(out)
    assert runs[True] == runs[False] and len(runs[True]) == 8


def test_engine_stage_table_covers_the_run(stub_config, tmp_path):  # noqa: F811
    tiles(tmp_path / "in", 1, shape=(300, 420))
    seg = load_segmenter([str(ROOT / "configs" / "inference.json"), str(stub_config)], ckpt_path=None, device="cpu",
                         progress=False, chunk=128, halo=24, prefetch=False)
    seg.predictor()
    t0 = time.perf_counter()
    with StageTimer() as timer:
        seg.run(tmp_path / "in", tmp_path / "out")
    wall = time.perf_counter() - t0
    rows = {r["stage"]: r for r in timer.table()}
    for name in ("read", "colour statistics", "reinhard", "resample", "network", "blending", "watershed",
                 "measurements", "geojson", "csv", "label map", "png", "overlay"):
        assert rows[name]["calls"] >= 1 and rows[name]["wall_s"] >= 0, name
    main = sum(r["wall_s"] for r in rows.values() if r["thread"] == "main")
    assert main <= wall  # stages of the main thread never overlap


# -- optional runtime: ONNX Runtime ----------------------------------------------------------------------------
def test_onnx_runtime_is_off_by_word_and_matches_torch():
    from bundle.model.network import DSHFN

    for word in ("false", "no", "0", "off", False):
        assert load_segmenter(str(ROOT / "configs" / "inference.json"), ckpt_path=None, onnx_runtime=word).onnx_runtime is False
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch

    from bundle.inference.runtime import OnnxNetwork

    torch.manual_seed(0)
    network = DSHFN(in_channels=3, features=4, levels=2).eval()
    from bundle.model.network import DeformableConv

    blocks = [m for m in network.modules() if isinstance(m, DeformableConv)]
    assert blocks
    for m in blocks:  # non-zero offsets, so the deformable convolutions really sample off the grid
        torch.nn.init.normal_(m.offset.weight, std=0.5)
    x = torch.randn(3, 3, 64, 64)
    onnx = OnnxNetwork(network, roi=64, threads=1)
    with torch.no_grad():
        want = network(x)
    got = onnx(x)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4
    seg = load_segmenter(str(ROOT / "configs" / "inference.json"), ckpt_path=None, onnx_runtime="yes",
                         features=4, network_def={"_target_": "bundle.model.network.DSHFN", "in_channels": 3,
                                                  "features": 4, "levels": 2})
    assert seg.onnx_runtime is True and isinstance(seg.predictor().network, OnnxNetwork)


# -- window cache ------------------------------------------------------------------------------------------------
def test_window_cache_predicts_each_window_once_and_keeps_only_what_is_planned():
    import torch

    from bundle.inference.windows import WindowCache

    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x * 2 + 1

    cache = WindowCache(net, max_bytes=10 * 2**20)
    a, b, c = (torch.full((1, 8, 8), float(v)) for v in (1, 2, 3))
    assert torch.equal(cache(torch.stack([a, b])), torch.stack([a, b]) * 2 + 1)
    got = cache(torch.stack([b, c, a]))  # b and a seen: only c goes through the network
    assert torch.equal(got, torch.stack([b, c, a]) * 2 + 1) and calls == [2, 1]
    assert (cache.hits, cache.misses) == (2, 3)
    # planned positions: only windows a later chunk can use are stored, the rest pruned after the chunk
    cache.clear()
    cache.plan([(0, 0), (0, 192), (192, 0)], keep=lambda y, x: y >= 192)
    cache(torch.stack([a, b, c]))
    assert len(cache._store) == 1  # only c, at y = 192
    cache.plan(None, keep=lambda y, x: False)
    cache.prune()
    assert not cache._store and cache.bytes == 0


def test_outputs_identical_with_and_without_window_cache(stub_config, tmp_path):  # noqa: F811
    tiles(tmp_path / "in", 1, shape=(700, 640))  # 3 x 3 chunks of 256 model px: windows shared across chunks
    runs, hits = {}, {}
    for on in (False, True):
        out = tmp_path / f"out_{on}"
        seg = load_segmenter([str(ROOT / "configs" / "inference.json"), str(stub_config)], ckpt_path=None,
                             device="cpu", progress=False, chunk=256, halo=24, window_cache=on)
        seg.run(tmp_path / "in", out)
        runs[on] = _digests(out)
        hits[on] = seg.predictor().cache.hits if on else 0
    assert runs[True] == runs[False] and hits[True] > 0


# -- the stages benchmark's inputs and table ---------------------------------------------------------------------
def test_stage_inputs_are_built_deterministically(monuseg_dir, tmp_path):
    import tifffile

    from bundle.research.bench.stages import dense_mosaic, glass_slide, write_pyramid

    dense = dense_mosaic(monuseg_dir.parent)
    assert dense.shape == (4000, 4000, 3) and dense.dtype == np.uint8
    assert np.array_equal(dense, dense_mosaic(monuseg_dir.parent))
    small = dense[:600, :500]
    slide = glass_slide(small)
    assert slide.shape == (600, 1000, 3) and np.array_equal(slide[:, :500], small)
    assert slide[:, 500:].min() >= 237 and np.array_equal(slide, glass_slide(small))
    path = write_pyramid(tmp_path / "s.tif", slide, tile=256)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 1000, 3), (300, 500, 3)]
        assert np.array_equal(levels[0].asarray(), slide)


def test_stage_rows_ratio_and_share():
    from bundle.research.bench.stages import stage_rows

    profile = {"threads": 2, "wall_s": 10.0, "peak_rss_mib": 1000.0, "nuclei": 5, "stages": [
        {"stage": "network", "wall_s": 6.0, "cpu_s": 11.0, "calls": 4, "thread": "main"},
        {"stage": "watershed", "wall_s": 2.0, "cpu_s": 2.0, "calls": 4, "thread": "main"},
        {"stage": "png", "wall_s": 1.0, "cpu_s": 1.0, "calls": 1, "thread": "background"},
    ]}
    rows = {r["stage"]: r for r in stage_rows(profile, "x")}
    assert rows["**non-network / network**"]["wall_s"] == 3.0 and rows["**non-network / network**"]["x_network"] == 0.5
    assert "png (background thread)" in rows and "(untimed: run files, glue)" not in rows
    assert rows["**run wall (network share)**"]["x_network"].startswith("share 0.60")
