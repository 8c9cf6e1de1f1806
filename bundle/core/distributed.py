"""Device, rank and the process group for every front end (the configs' ``initialize`` / ``finalize``,
``scripts/segment.py``, the handlers and the inference engine): one place that reads torchrun's environment, so
no config builds a device or a process group in a ``$`` string. Each step is a no-op in a single process."""

from __future__ import annotations

import os
from typing import Any

import torch


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_rank0() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not _active() or torch.distributed.get_rank() == 0


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the process group, else of torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if _active():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (:func:`rank_and_size`): what ``is_not_rank0`` in the configs is built from."""
    return rank_and_size()[0]


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (torchrun's ``LOCAL_RANK``, 0 in a single process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def start_process_group(device: torch.device | str | None = None) -> bool:
    """Join torchrun's process group (its ``WORLD_SIZE`` is set) when none is running: NCCL when ``device`` (default
    :func:`local_device`) is a GPU, which becomes this process's CUDA device, else gloo. True when a group is
    active afterwards; a plain ``python`` process starts none. The counterpart is :func:`shutdown`."""
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not _active() and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _active()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (``[value]`` without torch.distributed)."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def shutdown() -> None:
    """Destroy the default process group once every rank has finished its work (the workflows' ``finalize``).

    The barrier lines the ranks up so none tears down its gloo connections while another still writes its
    outputs (a CPU run once aborted in teardown, after its outputs were written, without it).
    """
    if _active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
