"""bundle.distributed in one process: without a process group and inside a one-rank gloo group (the
multi-process path runs in tests/test_workflows.py under torchrun)."""

from __future__ import annotations

import torch.distributed as dist

from bundle.core.distributed import gather_objects, is_rank0, rank_and_size, shutdown


def test_without_a_process_group():
    assert not dist.is_initialized()
    assert is_rank0()
    assert gather_objects({"a": 1}) == [{"a": 1}]
    shutdown()  # nothing to destroy: no error
    assert not dist.is_initialized()


def test_rank_and_size_falls_back_to_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_size() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_size() == (1, 2)


def test_one_rank_group_gathers_and_is_destroyed(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized() and is_rank0()
        assert gather_objects(["x", 2]) == [["x", 2]]
        assert rank_and_size() == (0, 1)
        shutdown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
