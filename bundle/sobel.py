"""Sobel gradient magnitude, shared by the network's local stream (eq. 4) and the loss (eq. 22-25)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# scipy.ndimage.sobel's kernels: derivative [-1, 0, 1] along one axis, smoothing [1, 2, 1] along the other.
_KX = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_KY = _KX.t().contiguous()


def sobel_kernels(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the (2, 1, 3, 3) stack ``[K_x, K_y]`` for use with ``conv2d``."""
    return torch.stack([_KX, _KY]).unsqueeze(1).to(dtype=dtype, device=device)


def sobel_magnitude(x: torch.Tensor, kernels: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Gradient magnitude ``sqrt(G_x^2 + G_y^2 + eps)`` of each channel of ``x`` (N, C, H, W).

    Borders repeat the edge pixel (scipy.ndimage's default ``mode="reflect"`` is half-sample symmetric,
    which for a 1-pixel pad is torch's ``"replicate"``), so the result equals
    ``hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))`` up to ``eps``. ``eps`` keeps the square root
    differentiable at flat regions (gradient of sqrt at 0 is infinite), which matters under AMP.
    Computed in float32 whatever the input dtype, then cast back.
    """
    if x.ndim != 4:
        raise ValueError(f"sobel_magnitude expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    k = sobel_kernels(torch.float32, x.device) if kernels is None else kernels.to(torch.float32)
    xf = x.float().reshape(n * c, 1, h, w)
    g = F.conv2d(F.pad(xf, (1, 1, 1, 1), mode="replicate"), k)
    mag = torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + eps)
    return mag.reshape(n, c, h, w).to(x.dtype)


class SobelMagnitude(nn.Module):
    """Module form of :func:`sobel_magnitude` with the fixed kernels held as a (non-trainable) buffer."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("kernels", sobel_kernels(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sobel_magnitude(x, self.kernels, self.eps)
