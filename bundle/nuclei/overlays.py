"""Contour overlays for people to look at: true nuclei outlines in green, predicted in red (yellow where they agree)."""

from __future__ import annotations

import numpy as np
import torch
from skimage.segmentation import find_boundaries

TRUE_RGB = (0, 255, 0)
PRED_RGB = (255, 0, 0)
BOTH_RGB = (255, 255, 0)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_display_rgb(image) -> np.ndarray:
    """(H, W), (1, H, W) or (3, H, W) image of any range -> (H, W, 3) uint8, min-max stretched per image."""
    img = _to_numpy(image).astype(np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (img * 255).round().astype(np.uint8)


def contour_overlay(image, pred=None, label=None) -> np.ndarray:
    """Draw the inner contours of binary masks ``pred`` and ``label`` ((H, W) or (1, H, W)) on ``image``.

    Returns (H, W, 3) uint8. Either mask may be None.
    """
    out = to_display_rgb(image)
    masks = {}
    for name, m in (("pred", pred), ("label", label)):
        if m is not None:
            m = _to_numpy(m)
            m = m[0] if m.ndim == 3 else m
            if m.shape != out.shape[:2]:
                raise ValueError(f"contour_overlay: {name} shape {m.shape} differs from image shape {out.shape[:2]}")
            masks[name] = find_boundaries(m > 0.5, mode="inner")
    p = masks.get("pred", np.zeros(out.shape[:2], bool))
    t = masks.get("label", np.zeros(out.shape[:2], bool))
    out[t & ~p] = TRUE_RGB
    out[p & ~t] = PRED_RGB
    out[p & t] = BOTH_RGB
    return out
