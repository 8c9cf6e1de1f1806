"""Instance heads beside DS-HFN's two decoders, and the separation map each gives the marker watershed.

The paper's region + boundary maps with a marker watershed do not separate nuclei that touch along long edges
(packed epithelium: docs/README.md, "Why touching nuclei merge"). An instance head regresses an instance-aware
target from which a *separation map* ``S`` in [0, 1] (high between nuclei, low inside them) follows; the watershed
(:func:`bundle.nuclei.watershed.instances_from_maps`) then uses ``S`` where it would use the boundary probability.

* ``"hv"``: HoVer-Net's horizontal and vertical distances of each nucleus pixel to its centre of mass
  (Graham et al. 2019, eq. 1; targets by MONAI's ``ComputeHoVerMaps``), linear output in about [-1, 1].
  ``S = clip(max(-d h/dx, -d v/dy), 0, 1)``: inside a nucleus both maps rise along their axis; across the line
  where two nuclei touch they fall from +1 to -1, and at the background edge from +-1 to 0.
* ``"distance"``: the distance of each nucleus pixel to the nearest pixel outside it, divided by the nucleus'
  largest (Naylor et al. 2018); sigmoid output in [0, 1]. ``S = 1 - distance``: markers are the nucleus cores.
* ``"none"``: no head; the paper's network exactly.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from bundle.model.sobel import sobel_kernels

__all__ = ["INSTANCE_HEADS", "INSTANCE_CHANNELS", "check_instance_head", "instance_channels", "hv_separation",
           "distance_separation", "instance_separation", "copy_decoder_stages"]

#: the instance heads and the number of output channels each adds in training
INSTANCE_CHANNELS: Dict[str, int] = {"none": 0, "hv": 2, "distance": 1}
INSTANCE_HEADS = tuple(INSTANCE_CHANNELS)


def check_instance_head(name: str, owner: str = "instance_head") -> str:
    """``name`` if it is one of :data:`INSTANCE_HEADS`, else ``ValueError`` naming ``owner``."""
    if name not in INSTANCE_CHANNELS:
        raise ValueError(f"{owner} must be one of {list(INSTANCE_HEADS)}, got {name!r}")
    return name


def hv_separation(hv: torch.Tensor) -> torch.Tensor:
    """Separation map ``clip(max(-d h/dx, -d v/dy), 0, 1)`` (N, 1, H, W) of HV maps ``hv`` (N, 2, H, W).

    Derivatives are scipy.ndimage's 3x3 Sobel divided by 8, so a ramp of slope 1 gives 1 and the +1 -> -1 fall
    between touching nuclei about 1. Written instead of MONAI's ``GenerateInstanceBorder`` because that one
    min-max normalises the gradients over the whole image: the same pixel would get another value in another
    window or slide chunk; the fixed scale is chunk-invariant (tests/test_instance_head.py compares the nuclei
    the two give).
    """
    if hv.dim() != 4 or hv.shape[1] != 2:
        raise ValueError("hv_separation expects (N, 2, H, W) HV maps")
    dtype = torch.float64 if hv.dtype == torch.float64 else torch.float32
    k = sobel_kernels(dtype, hv.device) / 8.0
    x = F.pad(hv.to(dtype), [1, 1, 1, 1], mode="replicate")
    dh_dx = F.conv2d(x[:, 0:1], k[0:1])
    dv_dy = F.conv2d(x[:, 1:2], k[1:2])
    return torch.clamp(torch.maximum(-dh_dx, -dv_dy), 0.0, 1.0)


def distance_separation(distance: torch.Tensor) -> torch.Tensor:
    """Separation map ``1 - distance`` of a normalised distance map (N, 1, H, W) in [0, 1]."""
    return 1.0 - distance


def instance_separation(head: str, logits: torch.Tensor) -> torch.Tensor:
    """The separation map (N, 1, H, W) of ``head``'s training output ``logits`` (N, k, H, W)."""
    if head == "hv":
        return hv_separation(logits)
    if head == "distance":
        return distance_separation(torch.sigmoid(logits))
    raise ValueError("instance_separation: no separation map for instance_head " + head)


def instance_channels(head: str) -> int:
    """Output channels of ``head`` (0 for ``"none"``)."""
    return INSTANCE_CHANNELS[check_instance_head(head)]


def copy_decoder_stages(source: torch.nn.Module, target: torch.nn.Module) -> List[str]:
    """Copy the weights of ``source``'s stages into ``target``'s stages where names and shapes match (a warm start
    for a new instance decoder from the trained region decoder: same architecture, same skips); returns the names
    copied. Heads are left as they are."""
    src = {k: v for k, v in source.state_dict().items() if k.startswith("stages.")}
    dst = target.state_dict()
    copied = [k for k, v in src.items() if k in dst and dst[k].shape == v.shape]
    target.load_state_dict({**dst, **{k: src[k] for k in copied}})
    return copied
