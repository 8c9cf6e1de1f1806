"""The nucleus post-processing as MONAI transforms, for a config's ``postprocessing`` chain the way MONAI's own
pathology post-processing (``monai.apps.pathology.transforms.post``) is used::

    {"_target_": "bundle.nuclei.transforms.NucleusInstancesd", "keys": "pred", "instance_key": "instances",
     "watershed": "@watershed"}

Both wrap :func:`bundle.nuclei.watershed.instances_from_output`: the marker watershed on the region map, separated
by the boundary map, or by the instance head's separation map when the network has one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from bundle.core.cli import read_flags
from bundle.nuclei.watershed import WatershedParams, instances_from_output

__all__ = ["NucleusInstances", "NucleusInstancesd"]


def _params(watershed: WatershedParams | Mapping[str, Any] | None) -> WatershedParams:
    if isinstance(watershed, WatershedParams):
        return watershed
    # on/off fields as the user typed them (``--watershed#fill_holes false``)
    return WatershedParams.from_dict(read_flags(watershed, WatershedParams, "--watershed"))


class NucleusInstances(Transform):
    """One network output (C, H, W) of probabilities (DS-HFN's eval output: region, boundary, refined[, separation])
    -> its nucleus instance map (1, H, W) int32, 0 = background, nuclei 1..N; a tensor in gives a tensor out.

    Args:
        watershed: :class:`WatershedParams` or its config mapping (``configs/model.json``'s ``watershed``).
    """

    backend = [torch.Tensor, np.ndarray]

    def __init__(self, watershed: WatershedParams | Mapping[str, Any] | None = None) -> None:
        self.params = _params(watershed)

    def __call__(self, maps: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        instances = instances_from_output(maps, self.params)[None]
        if isinstance(maps, torch.Tensor):
            return torch.as_tensor(instances, device=maps.device)
        return instances


class NucleusInstancesd(MapTransform):
    """Dictionary form of :class:`NucleusInstances`: the instance map of each of ``keys`` goes to ``instance_key``
    (one key), or replaces the maps when ``instance_key`` is None."""

    backend = NucleusInstances.backend

    def __init__(self, keys: KeysCollection, watershed: WatershedParams | Mapping[str, Any] | None = None,
                 instance_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if instance_key is not None and len(self.keys) != 1:
            raise ValueError(f"instance_key {instance_key!r} takes one key, got {list(self.keys)}")
        self.transform = NucleusInstances(watershed)
        self.instance_key = instance_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.instance_key or key] = self.transform(d[key])
        return d
