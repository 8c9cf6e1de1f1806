"""The few torch.distributed steps the engine handlers, the inference engine and the DDP configs' ``finalize``
share; each is a no-op in a single process. Imports only torch."""

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
