"""Loading trained weights into a network safely: ``torch.load(weights_only=True)`` and one-line errors that name
the file and the option that gave it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from bundle.core.errors import DataError

logger = logging.getLogger(__name__)


def checkpoint_problem(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few whole words: empty, truncated, pickled code or
    not a PyTorch file. Never torch's own advice, which is to load with ``weights_only=False`` - that would run
    whatever code a planted file holds."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot be read: {err.strerror or type(err).__name__}"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == b"PK\x03\x04":  # torch.save's zip container
        import zipfile

        if not zipfile.is_zipfile(path):
            return f"the file is truncated at {size} bytes: an incomplete download or copy"
    if "Weights only load failed" in str(exc):
        if "GLOBAL" in str(exc) or "global" in str(exc):
            return "it holds pickled objects or code besides weights, which are not loaded for safety"
        return "corrupt, or not a file written by torch.save"
    return f"{type(exc).__name__}; corrupt, truncated or not a file written by torch.save"


def load_weights(network, ckpt: str | os.PathLike | None, device="cpu", option: str = "--ckpt_path") -> None:
    """Load a plain state_dict (or a ``{"model": state_dict}`` checkpoint) into ``network``.

    ``ckpt=None`` keeps the random initialisation (with a warning); a missing, empty, truncated or foreign file or
    weights that do not fit the network raise :class:`DataError` naming the file and what to do, with ``option``
    (the command-line option that gives the file: ``--ckpt_path`` for the configs, ``--ckpt`` for
    ``scripts/segment.py``).
    """
    if ckpt is None:
        logger.warning("no checkpoint given: the network keeps its random initialisation")
        return
    if not Path(ckpt).is_file():
        raise DataError(f"{ckpt}: checkpoint not found. Train the bundle first or pass {option} models/model.pt")
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # empty, truncated, not a torch file, or pickled code that weights_only refuses
        raise DataError(f"{ckpt}: is not a readable PyTorch weights file ({checkpoint_problem(ckpt, exc)}). "
                        f"Re-download or re-train it, or pass the shipped weights: {option} models/model.pt") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(f"{ckpt}: holds a {type(state).__name__}, not a state dict of network weights. "
                        "Save network.state_dict() (or {'model': network.state_dict()})")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        missing = sorted(set(network.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(network.state_dict()))
        detail = (f"{len(missing)} weights missing, {len(unexpected)} unexpected, e.g. "
                  f"{(missing or unexpected or ['a size mismatch'])[0]!r}" if missing or unexpected
                  else str(exc).splitlines()[-1].strip()[:200])
        raise DataError(f"{ckpt}: does not fit the network of the config ({detail}). "
                        "Use the config the checkpoint was trained with (--config_file / network_def)") from exc
