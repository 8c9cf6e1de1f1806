"""Baseline networks (MONAI's BasicUNet, AttentionUnet, ...) behind DS-HFN's output contract.

The experiments (``configs/variants/*.json``) train the baselines through the same pipeline as DS-HFN: same
data, folds, transforms, optimiser, schedule, early stopping and evaluation. Only ``network_def`` and the loss
weights change, so the baseline needs DS-HFN's output contract, which :class:`SegmentationOutput` provides.
"""

from __future__ import annotations

import torch
from torch import nn


class SegmentationOutput(nn.Module):
    """Wrap a segmentation network that returns logits so it honours :class:`bundle.model.network.DSHFN`'s contract.

    ``net`` maps (N, C_in, H, W) to region logits (N, 1, H, W), or to region and boundary logits (N, 2, H, W).

    * ``train()``: the logits unchanged (what :class:`bundle.model.losses.DSHFNLoss` takes);
    * ``eval()``: (N, 3, H, W) -- region probability ``sigmoid(logit_0)``, boundary probability
      ``sigmoid(logit_1)`` (zeros for a one-channel net) and, in DS-HFN's refined-map slot, the region
      probability again (a baseline has no eq. 20 refinement).

    Args:
        net: the wrapped network (e.g. ``monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)``).
        size_divisor: input H and W must be multiples of this (the wrapped net's total stride), as for DS-HFN;
            other sizes raise ``ValueError`` instead of failing deep inside the net.
    """

    def __init__(self, net: nn.Module, size_divisor: int = 16) -> None:
        super().__init__()
        self.net = net
        self.size_divisor = int(size_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if h % self.size_divisor != 0 or w % self.size_divisor != 0:
            raise ValueError(
                f"{type(self.net).__name__} needs H and W to be multiples of size_divisor={self.size_divisor}, "
                f"got {h}x{w}: pad or crop the input (e.g. monai.transforms.DivisiblePad(k={self.size_divisor}))"
            )
        logits = self.net(x)
        if logits.ndim != 4 or logits.shape[1] not in (1, 2):
            raise ValueError(
                f"SegmentationOutput: the wrapped net must return (N, 1 or 2, H, W) logits, got {tuple(logits.shape)}"
            )
        if self.training:
            return logits
        region = torch.sigmoid(logits[:, :1])
        boundary = torch.sigmoid(logits[:, 1:2]) if logits.shape[1] == 2 else torch.zeros_like(region)
        return torch.cat([region, boundary, region], dim=1)
