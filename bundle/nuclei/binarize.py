"""Turning DS-HFN's eval output (region, boundary, refined channels) into the binary masks metrics compare."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

# channel order of DSHFN's eval output (see bundle.model.network.DSHFN); SEPARATION only with an instance head
REGION, BOUNDARY, REFINED, SEPARATION = 0, 1, 2, 3


def watershed_channel(n_channels: int) -> int | None:
    """The eval-output channel the watershed separates touching nuclei with: the instance head's separation map
    when the output has one, else the boundary map (None for a region map alone)."""
    if n_channels > SEPARATION:
        return SEPARATION
    return BOUNDARY if n_channels > BOUNDARY else None


class BinarizeChannel(Transform):
    """Select one channel of a channel-first map and threshold it: ``(C, H, W) -> (1, H, W)`` float {0, 1}.

    ``threshold=None`` keeps the selected channel's values (e.g. to write probabilities).
    """

    def __init__(self, channel: int = REGION, threshold: float | None = 0.5) -> None:
        self.channel = channel
        self.threshold = threshold

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True)
        if img.ndim < 3 or img.shape[0] <= self.channel:
            raise ValueError(f"BinarizeChannel: channel {self.channel} requested from a map of shape {tuple(img.shape)}")
        out = img[self.channel : self.channel + 1]
        if self.threshold is not None:
            out = (out > self.threshold).to(torch.float32)
        return out


class BinarizeChanneld(MapTransform):
    """Dictionary form of :class:`BinarizeChannel`; ``channel``/``threshold`` may be given per key."""

    def __init__(
        self,
        keys: KeysCollection,
        channel: int | Sequence[int] = REGION,
        threshold: float | None | Sequence[float | None] = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        channels = list(channel) if isinstance(channel, Sequence) else [channel] * n
        thresholds = list(threshold) if isinstance(threshold, Sequence) else [threshold] * n
        if len(channels) != n or len(thresholds) != n:
            raise ValueError(f"BinarizeChanneld: give one channel/threshold, or one per key ({n} keys)")
        self.ops = [BinarizeChannel(c, t) for c, t in zip(channels, thresholds)]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, op in zip(self.keys, self.ops):
            if key in d or not self.allow_missing_keys:
                d[key] = op(d[key])
        return d
