"""DS-HFN training loss (paper eq. 21 / 27): ``L_total = α·L_seg + β·L_edge + γ·L_GLGA``.

* ``L_seg``: Dice + BCE on the region logit (MONAI ``DiceCELoss(sigmoid=True)``, which uses
  ``BCEWithLogitsLoss`` for a single channel);
* ``L_edge``: BCE on the boundary logit against the boundary target (``BCEWithLogitsLoss``);
* ``L_GLGA``: :class:`GradientAlignedLoss` (eq. 22-26).

Every term is computed from logits in float32 with autocast off, so the loss is stable under AMP
(fp16 and bf16) whatever dtype the network emits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

from bundle.model.sobel import sobel_magnitude

__all__ = ["GradientAlignedLoss", "DSHFNLoss"]

TERMS = ("seg", "edge", "glga")


class GradientAlignedLoss(_Loss):
    """Global-Local Gradient Alignment loss ``L_GLGA`` (paper eq. 22-26).

    ``mean |G(σ(logits)) - G(Y)|`` over batch, channels and pixels, where ``G`` is the Sobel gradient
    magnitude ``sqrt(G_x^2 + G_y^2 + eps)`` of :func:`bundle.model.sobel.sobel_magnitude`; ``eps`` keeps the square
    root differentiable where the map is flat.

    Args:
        eps: added under the square root (both maps get it, so it cancels where both are flat).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, C, H, W) region logits; ``target`` (N, C, H, W) binary mask."""
        if logits.shape != target.shape:
            raise ValueError(
                f"logits and target must have the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        # float32 at least (float64 kept for gradcheck), autocast off: the sqrt's eps underflows in half precision
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            prob = torch.sigmoid(logits.to(dtype))
            grad_pred = sobel_magnitude(prob, eps=self.eps)
            grad_true = sobel_magnitude(target.to(dtype), eps=self.eps)
            return (grad_pred - grad_true).abs().mean()


class DSHFNLoss(_Loss):
    """``L_total = α·L_seg + β·L_edge + γ·L_GLGA`` (paper eq. 21 / 27; Table 2 weights 0.6 / 0.2 / 0.2).

    ``forward(pred, label)``: ``pred`` (N, 2, H, W) logits ``[region, boundary]`` as the network returns them in
    training, or (N, 1, H, W) region logits when the boundary decoder is ablated; ``label`` (N, 2, H, W)
    ``[foreground, boundary]`` in {0, 1} (one channel is enough for a one-channel ``pred``), optionally with a
    third channel, the per-pixel weight of ``L_edge`` (0 where the boundary is unknown: binary masks, see
    :class:`bundle.data.transforms.NucleiTargetsd` ``kind_key``); ``L_edge`` is then the weighted mean.

    A zero weight switches its term off (e.g. ``gamma=0`` is the "w/o gradient-aligned loss" ablation): it adds
    nothing and passes no gradient, but is still computed without grad and logged so that runs stay comparable.
    With a one-channel ``pred`` there is no boundary output: ``beta`` must then be 0 (else ``ValueError`` at the
    call) and ``"edge"`` is left out of the log.

    After each call ``last_terms`` holds detached float32 scalars ``{"seg", "edge", "glga", "total"}`` (unweighted
    terms, weighted total) for logging; see :class:`bundle.engine.handlers.LossTermsHandler`.

    Args:
        alpha, beta, gamma: weights of ``L_seg``, ``L_edge``, ``L_GLGA`` (>= 0).
        eps: :class:`GradientAlignedLoss`'s ``eps``.
        edge_pos_weight: weight of the boundary pixels in ``L_edge`` (BCE ``pos_weight``); boundaries are a small
            fraction of the pixels, and with weight 1 the boundary map stays faint.
        log_disabled_terms: also compute (without grad) and log terms whose weight is 0.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        beta: float = 0.2,
        gamma: float = 0.2,
        eps: float = 1e-6,
        edge_pos_weight: float = 1.0,
        log_disabled_terms: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"DSHFNLoss: {name} must be >= 0, got {value}")
        if alpha == beta == gamma == 0:
            raise ValueError("DSHFNLoss: at least one of alpha, beta, gamma must be > 0")
        self.weights = {"seg": float(alpha), "edge": float(beta), "glga": float(gamma)}
        self.log_disabled_terms = log_disabled_terms
        self.seg_loss = DiceCELoss(sigmoid=True)
        if not edge_pos_weight > 0:
            raise ValueError(f"DSHFNLoss: edge_pos_weight must be > 0, got {edge_pos_weight}")
        self.edge_pos_weight = float(edge_pos_weight)
        self.glga_loss = GradientAlignedLoss(eps=eps)
        self.last_terms: dict[str, torch.Tensor] = {}

    def edge_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """BCE with logits on the boundary (``pos_weight`` = ``edge_pos_weight``), mean over pixels of non-zero
        ``weight`` (all pixels when None); 0 (with a zero gradient) when no pixel counts."""
        pos_weight = logits.new_tensor(self.edge_pos_weight)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
        if weight is None:
            return bce.mean()
        return (bce * weight).sum() / weight.sum().clamp_min(1.0)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 4 or pred.shape[1] not in (1, 2):
            raise ValueError(
                "DSHFNLoss: pred must be (N, 2, H, W) [region, boundary] logits or (N, 1, H, W), "
                f"got {tuple(pred.shape)}"
            )
        has_edge = pred.shape[1] == 2
        if label.ndim != 4 or label.shape[0] != pred.shape[0] or label.shape[2:] != pred.shape[2:]:
            raise ValueError(f"DSHFNLoss: label {tuple(label.shape)} does not match pred {tuple(pred.shape)}")
        if label.shape[1] < pred.shape[1]:
            raise ValueError(f"DSHFNLoss: label needs channels [foreground, boundary], got {tuple(label.shape)}")
        if not has_edge and self.weights["edge"] != 0:
            raise ValueError(
                f"DSHFNLoss: pred has no boundary channel (boundary decoder ablated) but beta={self.weights['edge']}; "
                "set beta=0 in the loss config for this ablation"
            )
        # Losses in float32 with autocast off: BCE-with-logits and the Sobel square root stay finite in fp16/bf16.
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, label = pred.float(), label.float()
            inputs = {
                "seg": (self.seg_loss, pred[:, :1], label[:, :1]),
                "glga": (self.glga_loss, pred[:, :1], label[:, :1]),
            }
            if has_edge:
                weight = label[:, 2:3] if label.shape[1] > 2 else None
                inputs["edge"] = (lambda x, y, w=weight: self.edge_loss(x, y, w), pred[:, 1:2], label[:, 1:2])
            total = pred.new_zeros(())
            terms: dict[str, torch.Tensor] = {}
            for name in TERMS:
                if name not in inputs:
                    continue
                fn, x, y = inputs[name]
                weight = self.weights[name]
                if weight != 0:
                    value = fn(x, y)
                    total = total + weight * value
                elif self.log_disabled_terms:
                    with torch.no_grad():
                        value = fn(x, y)
                else:
                    continue
                terms[name] = value.detach()
        terms["total"] = total.detach()
        self.last_terms = terms
        return total
