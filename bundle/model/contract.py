"""The model contract, ``configs/model.json``: what a network of this bundle is and what its weights expect.

One file holds the network (``network_def``), its input (``input_mode``, ``model_pixel_size``, ``reinhard`` and
``reinhard_reference``), the output threshold and the watershed. ``configs/train.json`` and
``configs/inference.json`` read each of these ids through :func:`value` and :func:`network` (evaluation is merged
after ``train.json``), so changing the width or the input mode in ``model.json`` changes training, evaluation and
inference together, and a run's own override (``--input_mode gray``, ``--network_def#streams global``) still
applies to that run only.

Read through functions rather than MONAI ``%`` macros because a macro's path is relative to the working
directory: ``monai.bundle.load`` from a user's project and ``scripts/segment.py`` from any folder would not find
the file; the path here is anchored at the bundle root.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from bundle import bundle_root

__all__ = ["CONTRACT_IDS", "contract_path", "read_contract", "value", "network"]

#: the ids of ``configs/model.json`` besides ``network_def``; train.json and inference.json read each by :func:`value`
CONTRACT_IDS = ("model_pixel_size", "input_mode", "reinhard", "reinhard_reference", "features", "upsample",
                "instance_head", "threshold", "watershed")


def contract_path() -> Path:
    """``configs/model.json`` of this bundle."""
    return Path(bundle_root()) / "configs" / "model.json"


def _parser(path: str | os.PathLike | None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(path or contract_path()))
    return parser


def read_contract(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The contract as plain data (``_comment`` dropped), ``network_def`` unresolved: what tests and benchmarks read."""
    return {k: copy.deepcopy(v) for k, v in _parser(path).get().items() if not k.startswith("_")}


def value(key: str, path: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """The contract's value of ``key`` (one of :data:`CONTRACT_IDS`). For a mapping (``watershed``,
    ``reinhard_reference``) ``overrides`` replace its entries, so a command line's ``--watershed#min_size 20``
    reaches it; a scalar takes none."""
    contract = read_contract(path)
    if key not in CONTRACT_IDS or key not in contract:
        raise KeyError(f"{key!r} is not an id of the model contract {path or contract_path()}; ids: {list(CONTRACT_IDS)}")
    found = contract[key]
    if overrides:
        if not isinstance(found, Mapping):
            raise TypeError(f"model contract id {key!r} is a {type(found).__name__}; it takes no entries {sorted(overrides)}")
        unknown = sorted(set(overrides) - set(found))
        if unknown:
            raise KeyError(f"model contract id {key!r} has no entries {unknown}; entries: {sorted(found)}")
        found = {**found, **overrides}
    return found


def network(path: str | os.PathLike | None = None, **ids: Any) -> torch.nn.Module:
    """A new network from the contract's ``network_def``. ``ids`` that are contract ids (``input_mode``,
    ``features``, ``upsample``, ``instance_head``: the values of the calling config) replace the contract's; any
    other name is an argument of ``network_def`` itself (``streams="global"``, ``boundary_decoder=False``)."""
    parser = _parser(path)
    for key, val in ids.items():
        parser[key if key in CONTRACT_IDS else f"network_def#{key}"] = val
    return parser.get_parsed_content("network_def", instantiate=True)
