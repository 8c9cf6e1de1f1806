"""Start training from trained weights of a related network: ``train.json``'s ``init_weights``.

Fine-tuning the shipped weights with a new instance head is far cheaper than training from scratch: every weight
whose name and shape match is loaded, and a new :class:`bundle.model.network.InstanceDecoder` starts from the
trained region decoder's stages (same architecture and skips) with a zero head. ``--resume true`` then restores
the run's own checkpoint over this, as usual.
"""

from __future__ import annotations

import logging
import os

import torch

from bundle.core.errors import DataError
from bundle.model.instance import copy_decoder_stages

__all__ = ["warm_start"]

logger = logging.getLogger(__name__)


def warm_start(network: torch.nn.Module, path: str | os.PathLike | None = None) -> torch.nn.Module:
    """``network`` with the matching weights of ``path`` (a ``model.pt`` state dict or a training ``checkpoint.pt``
    whose ``"network"`` entry is used); ``path=None`` returns it unchanged. Weights of ``path`` whose shape differs
    and weights the network lacks are skipped and logged; a file that holds no weights raises :class:`DataError`."""
    if path is None or str(path).strip().lower() in ("", "none", "null"):
        return network
    if not os.path.isfile(path):
        raise DataError(f"{path}: init_weights not found. Pass a model.pt or checkpoint.pt (e.g. models/model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled code that weights_only refuses
        raise DataError(f"{path}: init_weights is not a readable PyTorch weights file ({type(exc).__name__}). "
                        "Pass a model.pt or checkpoint.pt") from exc
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: init_weights holds no state dict of network weights")
    own = network.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise DataError(f"{path}: init_weights shares no weight with the network of the config "
                        "(another architecture?); train from scratch with --init_weights None")
    network.load_state_dict({**own, **loaded})
    fresh = sorted(set(own) - set(loaded))
    instance_decoder = getattr(network, "instance_decoder", None)
    if instance_decoder is not None and not any(k.startswith("instance_decoder.") for k in loaded):
        copied = {f"instance_decoder.{k}" for k in copy_decoder_stages(network.segmentation_decoder, instance_decoder)}
        # a zero head: the new term starts at the target's mean square, not at a random output whose large
        # gradients would first shake the trained stages
        torch.nn.init.zeros_(instance_decoder.head.weight)
        torch.nn.init.zeros_(instance_decoder.head.bias)
        fresh = [k for k in fresh if k not in copied]
        logger.info("warm start: the instance decoder starts from the region decoder's %d stage weights", len(copied))
    skipped = sorted(set(state) - set(loaded))
    logger.info("warm start from %s: %d weights loaded, %d new (%s), %d of the file skipped", path, len(loaded),
                len(fresh), ", ".join(fresh[:4]) + (" ..." if len(fresh) > 4 else ""), len(skipped))
    return network
