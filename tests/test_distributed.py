"""bundle.core.distributed in one process: without a process group and inside a one-rank gloo group (the
multi-process path runs in tests/test_workflows.py under torchrun)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from bundle.core.distributed import (
    gather_objects,
    is_rank0,
    local_device,
    rank,
    rank_and_size,
    shutdown,
    start_process_group,
)


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


def test_plain_process_starts_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert start_process_group(torch.device("cpu")) is False
    assert not dist.is_initialized()
    assert rank() == 0
    assert local_device() == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))


def test_torchrun_environment_starts_gloo_group_on_cpu_and_shutdown_ends_it(monkeypatch):
    with socket.socket() as s:  # a free port for the env:// rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        assert start_process_group(torch.device("cpu")) is True
        assert dist.get_backend() == "gloo" and rank() == 0
        assert start_process_group(torch.device("cpu")) is True  # a second call joins nothing new
        shutdown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
