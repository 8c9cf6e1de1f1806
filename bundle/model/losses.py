"""DS-HFN training loss (paper eq. 21 / 27): ``L_total = α·L_seg + β·L_edge + γ·L_GLGA`` (+ ``δ·L_inst``).

* ``L_seg``: Dice + BCE on the region logit (MONAI ``DiceCELoss(sigmoid=True)``, which uses
  ``BCEWithLogitsLoss`` for a single channel);
* ``L_edge``: BCE on the boundary logit against the boundary target (``BCEWithLogitsLoss``);
* ``L_GLGA``: :class:`GradientAlignedLoss` (eq. 22-26);
* ``L_inst`` (not in the paper; only with an instance head): :class:`InstanceMapLoss`.

Every term is computed from logits in float32 with autocast off, so the loss is stable under AMP
(fp16 and bf16) whatever dtype the network emits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import SobelGradients
from torch.nn.modules.loss import _Loss

from bundle.model.instance import check_instance_head, instance_channels
from bundle.model.sobel import sobel_magnitude

__all__ = ["GradientAlignedLoss", "InstanceMapLoss", "DSHFNLoss"]

TERMS = ("seg", "edge", "glga", "inst")


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


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the pixels (and channels) where ``weight`` (N, 1, H, W) is non-zero, weighted;
    0 with a zero gradient when none is."""
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


class InstanceMapLoss(_Loss):
    """``L_inst`` of an instance head (:mod:`bundle.model.instance`), over the pixels of non-zero ``weight``.

    * ``"hv"``: HoVer-Net's HV loss (Graham et al. 2019, eq. 2-3, as MONAI's ``HoVerNetLoss`` computes it):
      ``mse_weight · MSE(hv, target) + grad_weight · MSGE``, MSGE being the squared error of
      d h/dx and d v/dy (MONAI ``SobelGradients``, kernel 5) over the nucleus pixels; defaults 2 and 1 as MONAI's.
    * ``"distance"``: MSE of ``sigmoid(logit)`` against the normalised distance map.

    ``forward(logits, target, foreground, weight)``: the head's (N, k, H, W) logits and target, the (N, 1, H, W)
    nucleus mask and per-pixel weight (0 on binary-mask tiles, which hold no instances).
    """

    def __init__(self, head: str, mse_weight: float = 2.0, grad_weight: float = 1.0) -> None:
        super().__init__()
        self.head = check_instance_head(head, "InstanceMapLoss: head")
        if head == "none":
            raise ValueError("InstanceMapLoss: head 'none' has no instance map to train")
        self.mse_weight, self.grad_weight = float(mse_weight), float(grad_weight)
        self.sobel_h = SobelGradients(kernel_size=5, spatial_axes=1)
        self.sobel_v = SobelGradients(kernel_size=5, spatial_axes=0)

    def _hv_gradients(self, hv: torch.Tensor) -> torch.Tensor:
        # MONAI's SobelGradients takes (C, H, W): the batch goes in as channels
        return torch.stack([self.sobel_h(hv[:, 0]), self.sobel_v(hv[:, 1])], dim=1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"InstanceMapLoss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        if self.head == "distance":
            return _weighted_mean((torch.sigmoid(logits) - target) ** 2, weight)
        mse = _weighted_mean((logits - target) ** 2, weight)
        msge = _weighted_mean((self._hv_gradients(logits) - self._hv_gradients(target)) ** 2, weight * foreground)
        return self.mse_weight * mse + self.grad_weight * msge


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

    With an instance head (``instance_head`` "hv" or "distance"), ``pred`` carries the head's k logits after the
    others and ``label`` is ``[foreground, boundary, boundary weight, instance weight, k instance targets]``
    (:class:`bundle.data.transforms.NucleiTargetsd` ``instance_target``); ``delta`` weighs :class:`InstanceMapLoss`.

    After each call ``last_terms`` holds detached float32 scalars ``{"seg", "edge", "glga", "inst", "total"}``
    (unweighted terms present, weighted total) for logging; see :class:`bundle.handlers.training.LossTermsHandler`.

    Args:
        alpha, beta, gamma: weights of ``L_seg``, ``L_edge``, ``L_GLGA`` (>= 0).
        eps: :class:`GradientAlignedLoss`'s ``eps``.
        edge_pos_weight: weight of the boundary pixels in ``L_edge`` (BCE ``pos_weight``); boundaries are a small
            fraction of the pixels, and with weight 1 the boundary map stays faint.
        log_disabled_terms: also compute (without grad) and log terms whose weight is 0.
        instance_head: "none", "hv" or "distance": the network's instance head (:mod:`bundle.model.instance`).
        delta: weight of ``L_inst`` (>= 0).
    """

    def __init__(
        self,
        alpha: float = 0.6,
        beta: float = 0.2,
        gamma: float = 0.2,
        eps: float = 1e-6,
        edge_pos_weight: float = 1.0,
        log_disabled_terms: bool = True,
        instance_head: str = "none",
        delta: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("delta", delta)):
            if not value >= 0:
                raise ValueError(f"DSHFNLoss: {name} must be >= 0, got {value}")
        if alpha == beta == gamma == 0 and (instance_head == "none" or delta == 0):
            raise ValueError("DSHFNLoss: at least one of alpha, beta, gamma (or delta, with an instance head) must be > 0")
        self.instance_head = check_instance_head(instance_head, "DSHFNLoss: instance_head")
        self.n_inst = instance_channels(instance_head)
        # the paper's loss (no head) has exactly its three weighted terms
        self.weights = {"seg": float(alpha), "edge": float(beta), "glga": float(gamma)}
        if self.n_inst:
            self.weights["inst"] = float(delta)
        self.inst_loss = InstanceMapLoss(instance_head) if self.n_inst else None
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
        k = self.n_inst
        if pred.ndim != 4 or pred.shape[1] - k not in (1, 2):
            raise ValueError(
                f"DSHFNLoss: pred must be (N, {2 + k}, H, W) [region, boundary{', instance' if k else ''}] logits "
                f"or (N, {1 + k}, H, W) without the boundary decoder (instance_head={self.instance_head!r}), "
                f"got {tuple(pred.shape)}"
            )
        has_edge = pred.shape[1] - k == 2
        if label.ndim != 4 or label.shape[0] != pred.shape[0] or label.shape[2:] != pred.shape[2:]:
            raise ValueError(f"DSHFNLoss: label {tuple(label.shape)} does not match pred {tuple(pred.shape)}")
        if label.shape[1] < (4 + k if k else pred.shape[1]):
            raise ValueError(
                "DSHFNLoss: label needs channels [foreground, boundary"
                + (f", boundary weight, instance weight, {k} instance targets] (NucleiTargetsd instance_target="
                   f"{self.instance_head!r})" if k else "]") + f", got {tuple(label.shape)}"
            )
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
            if self.inst_loss is not None:
                fg, inst_weight = label[:, :1], label[:, 3:4]
                inputs["inst"] = (lambda x, y, f=fg, w=inst_weight: self.inst_loss(x, y, f, w),
                                  pred[:, pred.shape[1] - k:], label[:, 4:4 + k])
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
