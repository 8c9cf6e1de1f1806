"""Images read region by region: the :class:`RegionSource` protocol every engine input follows, and
:class:`ArraySource` for a tile already in memory (slides: :mod:`bundle.inference.slide`)."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


class RegionSource(Protocol):
    """A 2D RGB image read region by region: ``shape`` = (H, W) at the processing level; ``read(y0, y1, x0, x1)``
    -> (y1-y0, x1-x0, 3) uint8; ``path`` names it in messages."""

    shape: tuple[int, int]
    path: str

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


class ArraySource:
    """An RGB tile already in memory (PNG/JPEG tiles are decoded whole anyway) as a :class:`RegionSource`."""

    def __init__(self, rgb: np.ndarray, path: str = "<array>") -> None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{path}: expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        self.rgb = rgb
        self.shape = (int(rgb.shape[0]), int(rgb.shape[1]))
        self.path = path

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.rgb[y0:y1, x0:x1]
