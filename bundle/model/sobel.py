"""Sobel gradient magnitude, shared by the network's local stream (eq. 4) and the loss (eq. 22-25)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def sobel_kernels(dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> torch.Tensor:
    """The (2, 1, 3, 3) stack ``[K_x, K_y]`` of scipy.ndimage.sobel's kernels, for ``conv2d`` (a correlation):
    derivative [-1, 0, 1] along one axis, smoothing [1, 2, 1] along the other."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=device)
    return torch.stack([kx, kx.t()]).unsqueeze(1)


def sobel_magnitude(x: torch.Tensor, kernels: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Gradient magnitude ``sqrt(G_x^2 + G_y^2 + eps)`` of each channel of ``x`` (N, C, H, W).

    Borders repeat the edge pixel (scipy.ndimage's default ``mode="reflect"`` is half-sample symmetric,
    which for a 1-pixel pad is torch's ``"replicate"``), so with ``eps=0`` the result equals
    ``hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))``. ``eps`` keeps the square root differentiable at
    flat regions (the gradient of sqrt at 0 is infinite), which matters under AMP. Half-precision and
    integer inputs are computed in float32 (float64 stays float64), then cast back to ``x``'s float dtype.
    TorchScript-compatible, so the network that uses it exports.
    """
    if x.dim() != 4:
        raise ValueError("sobel_magnitude expects a (N, C, H, W) tensor")
    n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = sobel_kernels(dtype, x.device) if kernels is None else kernels.to(dtype)
    xf = x.to(dtype).reshape(n * c, 1, h, w)
    g = F.conv2d(F.pad(xf, [1, 1, 1, 1], mode="replicate"), k)
    mag = torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + eps).reshape(n, c, h, w)
    return mag.to(x.dtype) if x.is_floating_point() else mag


class SobelMagnitude(nn.Module):
    """Module form of :func:`sobel_magnitude` with the fixed kernels held as a (non-trainable) buffer."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("kernels", sobel_kernels(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sobel_magnitude(x, self.kernels, self.eps)
