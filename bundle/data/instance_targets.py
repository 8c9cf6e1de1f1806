"""Instance-aware training targets for DS-HFN's instance head (:mod:`bundle.model.instance`), from an id map.

* ``"hv"``: HoVer-Net's horizontal and vertical maps (Graham et al. 2019), MONAI's ``ComputeHoVerMaps``;
* ``"distance"``: :func:`instance_distance_map`, each nucleus' distance to background normalised to 1 at its
  centre (Naylor et al. 2018, the TNBC authors' target).
"""

from __future__ import annotations

import numpy as np
from monai.transforms import ComputeHoVerMaps
from scipy import ndimage as ndi

__all__ = ["INSTANCE_TARGETS", "TARGET_CHANNELS", "instance_distance_map", "instance_target"]

#: instance target kinds and their channels (the same names as ``bundle.model.instance.INSTANCE_HEADS``)
TARGET_CHANNELS = {"none": 0, "hv": 2, "distance": 1}
INSTANCE_TARGETS = tuple(TARGET_CHANNELS)


def instance_distance_map(ids: np.ndarray) -> np.ndarray:
    """(H, W) float32: for each pixel of nucleus ``k``, its Euclidean distance to the nearest pixel that is not
    ``k`` (background, another nucleus or outside the image), divided by the largest such distance in ``k``;
    0 on background. Touching nuclei thus meet at a valley, not a plateau."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, np.float32)
    for k, box in enumerate(ndi.find_objects(ids), start=1):
        if box is None:
            continue
        own = np.pad(ids[box] == k, 1)  # the pad: the image border counts as outside, as it does for HoVer-Net's maps
        dist = ndi.distance_transform_edt(own)[1:-1, 1:-1]
        inside = own[1:-1, 1:-1]
        peak = dist[inside].max()
        out[box] = np.where(inside, dist / peak, out[box])
    return out


def instance_target(ids: np.ndarray, kind: str) -> np.ndarray:
    """The ``kind`` target (C, H, W) float32 of an (H, W) id map (C = :data:`TARGET_CHANNELS` ``[kind]``)."""
    if kind not in TARGET_CHANNELS:
        raise ValueError(f"instance target must be one of {list(INSTANCE_TARGETS)}, got {kind!r}")
    ids = np.asarray(ids)
    if kind == "hv":
        return np.asarray(ComputeHoVerMaps()(ids[None].astype(np.int64)), np.float32)
    if kind == "distance":
        return instance_distance_map(ids)[None]
    return np.zeros((0, *ids.shape), np.float32)
