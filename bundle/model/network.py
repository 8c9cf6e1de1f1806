"""DS-HFN (Dual-Stream HyperFusionNet), Nasimov et al., Bioengineering 2025, 12, 868, section 3.1-3.3.

Plain ``torch.nn.Module`` s that the bundle configs instantiate (``"_target_": "bundle.model.network.DSHFN"``).
Resolution plan (see ``docs/architecture.md`` for the equation -> class table and a shape diagram):
both encoder streams return a feature pyramid with one entry per stride ``2**k``; the first
``log2(fusion_stride)`` entries are shallow features used as decoder skips, the last ``levels`` entries
are the aligned encoder levels (eq. 7), the finest of which sits at ``1/fusion_stride`` of the input.
HFEM fuses the levels at that reduced "base" resolution and the two decoders climb back to full
resolution with transposed convolutions and skips, so both readings in the paper hold.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from bundle.model.instance import check_instance_head, instance_channels, instance_separation
from bundle.model.sobel import SobelMagnitude

__all__ = [
    "AdditiveFusion",
    "BoundaryDecoder",
    "DSHFN",
    "DecoderStage",
    "DeformableConv",
    "GlobalLevel",
    "GlobalStream",
    "HFEM",
    "HFEMLevel",
    "LocalStream",
    "MutualRefinement",
    "SegmentationDecoder",
    "SpatialAttention",
    "channels_last",
    "conv_bn_act",
    "shape_summary",
]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: oneDNN's NCHW path reorders every narrow (8-16 channel) full-resolution conv,
    which made them 3-10x slower than in NHWC on CPU; values are unchanged."""
    return x.contiguous(memory_format=torch.channels_last)


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    act: type[nn.Module] = nn.GELU,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    """``act(BN(Conv(x)))`` with 'same' padding (halved size when ``stride=2``); the conv has no bias (BN follows)."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        act(),
    )


class DeformableConv(nn.Module):
    """``DC_d`` of eq. 2: 3x3 deformable convolution with dilation ``d`` (``torchvision.ops.DeformConv2d``).

    The sampling offsets (two per kernel tap) come from the block's own 3x3 convolution with the same
    dilation, initialised to zero so the block starts as the plain dilated convolution ``conv2d(x, weight,
    dilation=d)`` and learns to deform from there (:meth:`reset_offsets`).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        self.offset = nn.Conv2d(in_channels, 2 * 3 * 3, 3, padding=dilation, dilation=dilation)
        self.conv = DeformConv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.reset_offsets()

    def reset_offsets(self) -> None:
        """Zero the offset predictor: a zero offset samples the regular dilated grid."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            # torchvision has no reduced-precision CPU kernel (and autocasts to fp32 on CUDA anyway)
            return self.conv(x.float(), offset.float()).to(x.dtype)
        return self.conv(x, offset)


class GlobalLevel(nn.Module):
    """One global-stream level, eq. 2-3: ``F_l = GELU(DC_d(BN(Conv3x3(F_{l-1}))))`` plus the residual ``F_{l-1}``.

    The Conv3x3 carries the level's stride (2 between levels, 1 for the first); when the shape changes the
    residual goes through a projection shortcut (2x2 average pooling + 1x1 conv) so eq. 3 stays an addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.deform = DeformableConv(out_channels, out_channels, dilation)
        self.act = nn.GELU()
        shortcut: List[nn.Module] = []
        if stride > 1:
            shortcut.append(nn.AvgPool2d(stride))
        if in_channels != out_channels:
            shortcut.append(nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.shortcut = nn.Sequential(*shortcut)  # empty Sequential is the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.deform(self.norm(self.conv(x)))) + self.shortcut(x)


class GlobalStream(nn.Module):
    """Global (context) stream ``G`` of the dual-stream encoder, eq. 1-3: a low-resolution pathway.

    The stem ``phi_0^g`` (eq. 1) is a chain of dilated 3x3 Conv-BN-GELU blocks: one at full resolution,
    then stride-2 ones down to ``1/fusion_stride``; their intermediate outputs are the stream's shallow
    features. The levels (:class:`GlobalLevel`, eq. 2-3) then run only at ``1/fusion_stride`` and below,
    which is where the deformable convolutions live: on a CPU they cost 50-100x a plain conv of the
    same size, so keeping them off the full-resolution grid is what makes the network cheaper than a U-Net.

    ``forward`` returns ``len(skip_channels) + len(level_channels)`` maps, entry ``k`` at stride ``2**k``.
    """

    def __init__(
        self, in_channels: int, skip_channels: Sequence[int], level_channels: Sequence[int], dilation: int = 2
    ) -> None:
        super().__init__()
        stem: List[nn.Module] = []
        prev = in_channels
        for k, ch in enumerate(skip_channels):
            stem.append(conv_bn_act(prev, ch, nn.GELU, stride=1 if k == 0 else 2, dilation=dilation))
            prev = ch
        self.stem = nn.ModuleList(stem)
        self.stem_out = conv_bn_act(prev, level_channels[0], nn.GELU, stride=2, dilation=dilation)  # F_0^g
        self.levels = nn.ModuleList(
            GlobalLevel(level_channels[max(i - 1, 0)], ch, 1 if i == 0 else 2, dilation)
            for i, ch in enumerate(level_channels)
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats: List[torch.Tensor] = []
        for block in self.stem:
            x = channels_last(block(x))  # a 1-channel input is layout-ambiguous, so set it on the outputs
            feats.append(x)
        x = self.stem_out(x)
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class LocalStream(nn.Module):
    """Local (edge) stream ``L`` of the dual-stream encoder, eq. 4-6.

    The input is concatenated with its Sobel gradient magnitude (eq. 4-5, :class:`bundle.model.sobel.SobelMagnitude`),
    projected by a full-resolution Conv3x3-BN-ReLU stem ``phi_0^l`` and passed through one shallow
    Conv3x3-BN-ReLU block per stride, each downsampling with stride 2 instead of pooling (eq. 6).
    ReLU rather than the paper's GELU (its ``R``): this is the stream that runs at full resolution, where
    the cheaper activation counts.

    ``forward`` returns ``len(skip_channels) + len(level_channels)`` maps, entry ``k`` at stride ``2**k``.
    """

    def __init__(self, in_channels: int, skip_channels: Sequence[int], level_channels: Sequence[int]) -> None:
        super().__init__()
        self.sobel = SobelMagnitude()
        widths = list(skip_channels) + list(level_channels)
        self.stem = conv_bn_act(2 * in_channels, widths[0], nn.ReLU)
        self.blocks = nn.ModuleList(
            conv_bn_act(widths[i], widths[i + 1], nn.ReLU, stride=2) for i in range(len(widths) - 1)
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(channels_last(torch.cat([x, self.sobel(x)], dim=1)))  # I^edge of eq. 5
        feats = [x]
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class SpatialAttention(nn.Module):
    """Cross-stream spatial attention map of eq. 10-11: ``A = sigmoid(Conv7x7([mean_c(x), max_c(x)]))``.

    Returns (N, 1, H, W) weights in (0, 1)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class HFEMLevel(nn.Module):
    """HFEM at one level, eq. 8-12: 1x1-project each stream to ``C`` channels, concatenate, reweight by
    :class:`SpatialAttention`. Takes one map per stream (1 or 2); returns ``F_l^att``, ``C * n_streams`` channels."""

    def __init__(self, stream_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in stream_channels)
        self.attention = SpatialAttention()

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        projected: List[torch.Tensor] = []
        for i, proj in enumerate(self.proj):
            projected.append(proj(feats[i]))
        cat = torch.cat(projected, dim=1)
        return cat * self.attention(cat)


class HFEM(nn.Module):
    """HyperFeature Embedding Module, eq. 8-14.

    Each level goes through :class:`HFEMLevel` (eq. 8-12), is bilinearly upsampled to the finest level's
    resolution -- the fusion ("base") resolution, ``1/fusion_stride`` of the input (eq. 13) -- and the
    concatenated hypercolumn ``H`` is fused by a depthwise-separable 3x3 conv -> BN -> GELU (eq. 14).

    ``forward(levels)`` takes ``levels[l][s]``: level ``l`` (finest first) of stream ``s``.
    """

    def __init__(self, level_channels: Sequence[Sequence[int]], channels: int, out_channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(HFEMLevel(chs, channels) for chs in level_channels)
        hyper = sum(channels * len(chs) for chs in level_channels)  # D of eq. 13
        self.fuse = nn.Sequential(
            nn.Conv2d(hyper, hyper, 3, padding=1, groups=hyper, bias=False),  # depthwise ...
            nn.Conv2d(hyper, out_channels, 1, bias=False),  # ... separable (pointwise) part
            nn.BatchNorm2d(out_channels),
            nn.GELU(),
        )

    def forward(self, levels: List[List[torch.Tensor]]) -> torch.Tensor:
        size = [levels[0][0].shape[-2], levels[0][0].shape[-1]]
        hyper: List[torch.Tensor] = []
        for i, level in enumerate(self.levels):
            att = level(levels[i])
            if i > 0:
                att = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
            hyper.append(att)
        return self.fuse(torch.cat(hyper, dim=1))


class AdditiveFusion(nn.Module):
    """Ablation "w/o HFEM" (paper Table 4): simple additive fusion instead of eq. 8-14.

    Per level each stream is 1x1-projected to ``out_channels`` and the projections are summed; the levels
    are bilinearly upsampled to the fusion resolution and summed too (no attention, no hypercolumn
    concatenation, no depthwise-separable fusion), then BN -> GELU so the decoders see the same kind of input.
    """

    def __init__(self, level_channels: Sequence[Sequence[int]], out_channels: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=False) for c in chs) for chs in level_channels
        )
        self.out = nn.Sequential(nn.BatchNorm2d(out_channels), nn.GELU())

    def forward(self, levels: List[List[torch.Tensor]]) -> torch.Tensor:
        size = [levels[0][0].shape[-2], levels[0][0].shape[-1]]
        total = torch.zeros(0)
        for i, projs in enumerate(self.proj):
            level = torch.zeros(0)
            for j, proj in enumerate(projs):
                p = proj(levels[i][j])
                level = p if j == 0 else level + p
            if i > 0:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            total = level if i == 0 else total + level
        return self.out(total)


UPSAMPLES = ("transpose", "bilinear")


class DecoderStage(nn.Module):
    """One decoder upsampling stage, eq. 15-16 (and 18): ``GELU(BN(ConvTranspose2x2(x)))`` doubles the
    resolution, the 1x1-projected encoder skip is concatenated, and a Conv3x3-BN-GELU merges the two
    (an addition to eq. 15: without it the skip would only meet the decoder features in the 1x1 head).

    ``upsample="bilinear"`` replaces the 2x2 stride-2 transposed convolution (each output pixel of a 2x2 cell
    gets its own kernel tap, a period-2 checkerboard in the maps) by bilinear upsampling + Conv3x3."""

    def __init__(
        self, in_channels: int, out_channels: int, skip_in_channels: int, skip_channels: int, upsample: str = "transpose"
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLES:
            raise ValueError(f"DecoderStage: upsample must be one of {UPSAMPLES}, got {upsample!r}")
        if upsample == "transpose":
            up: List[nn.Module] = [nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)]
        else:
            up = [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                  nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
        self.up = nn.Sequential(*up, nn.BatchNorm2d(out_channels), nn.GELU())
        self.skip = nn.Conv2d(skip_in_channels, skip_channels, 1, bias=False)
        self.merge = conv_bn_act(out_channels + skip_channels, out_channels, nn.GELU)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.up(x), self.skip(skip)], dim=1))


class SegmentationDecoder(nn.Module):
    """Segmentation decoder, eq. 15-17: :class:`DecoderStage` s from ``H^fused`` up to full resolution with
    skips from both encoder streams, then a 1x1 head. Returns the region LOGIT (eq. 17 before the sigmoid).

    ``forward(x, skips)`` takes the skips coarsest first, one per stage.
    """

    def __init__(
        self, in_channels: int, stage_channels: Sequence[int], skip_in_channels: Sequence[int],
        upsample: str = "transpose", out_channels: int = 1,
    ) -> None:
        super().__init__()
        stages: List[nn.Module] = []
        prev = in_channels
        for ch, skip_in in zip(stage_channels, skip_in_channels):
            stages.append(DecoderStage(prev, ch, skip_in, ch, upsample))
            prev = ch
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(prev, out_channels, 1)

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[i])
        return self.head(x)


class BoundaryDecoder(SegmentationDecoder):
    """Boundary decoder, eq. 18-19: the same architecture as :class:`SegmentationDecoder`, fed the shallow
    local-stream features as skips (edge-related activations) and supervised with the boundary target.
    Returns the boundary LOGIT (eq. 19 before the sigmoid)."""


class InstanceDecoder(SegmentationDecoder):
    """Instance decoder (not in the paper): the :class:`SegmentationDecoder` architecture and skips with a
    ``out_channels``-channel head regressing an instance-aware target, HoVer-Net's HV maps (2 channels) or the
    normalised distance map (1); see :mod:`bundle.model.instance`."""


class MutualRefinement(nn.Module):
    """Mutual consistency block, eq. 20: ``Y_R = Y_seg * (1 + lambda * Y_edge)`` on probabilities.

    ``lambda`` in [0, 1] is a fixed coefficient (the paper's "tunable weighting coefficient"), held as a
    buffer so checkpoints and TorchScript exports carry it. It is not learned: the training losses (eq. 21)
    act on Y_seg and Y_edge, never on Y_R, so a learnable lambda would receive no gradient and silently keep
    its initial value. Choose it on validation data (``DSHFN(refine_lambda=...)``).
    """

    def __init__(self, refine_lambda: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= refine_lambda <= 1.0:
            raise ValueError(f"MutualRefinement: lambda must lie in [0, 1], got {refine_lambda}")
        self.register_buffer("refine_lambda", torch.tensor(float(refine_lambda)))

    def weight(self) -> torch.Tensor:
        """The refinement coefficient lambda in [0, 1]."""
        return self.refine_lambda

    def forward(self, y_seg: torch.Tensor, y_edge: torch.Tensor) -> torch.Tensor:
        return y_seg * (1.0 + self.refine_lambda * y_edge)


def _he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init of every conv weight (paper Table 2); zero biases, unit BN."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, DeformConv2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


STREAMS = ("both", "local", "global")
FUSIONS = ("hfem", "add")


class DSHFN(nn.Module):
    """Dual-Stream HyperFusionNet: :class:`GlobalStream` + :class:`LocalStream` -> :class:`HFEM` ->
    :class:`SegmentationDecoder` + :class:`BoundaryDecoder` -> :class:`MutualRefinement`.

    Output (one tensor, so MONAI's ``verify_net_in_out`` and TorchScript export work):

    * ``train()``: logits (N, 2, H, W) -- channel 0 region logit, channel 1 boundary logit;
      (N, 1, H, W) region logit only when ``boundary_decoder=False``.
    * ``eval()``: (N, 3, H, W) --
      channel 0 region probability ``Y_seg = sigmoid(region logit)`` in [0, 1];
      channel 1 boundary probability ``Y_edge`` in [0, 1] (all zeros when ``boundary_decoder=False``);
      channel 2 refined region map ``Y_R = Y_seg * (1 + lambda * Y_edge)`` of eq. 20, in [0, 1 + lambda]
      (equals channel 0 when ``boundary_decoder=False``).

    With an instance head (``instance_head="hv"`` or ``"distance"``, :class:`InstanceDecoder`) the training output
    gains the head's 2 or 1 channels after the others, and the eval output a fourth channel: the separation map
    ``S`` in [0, 1] of :func:`bundle.model.instance.instance_separation`, which the watershed uses in place of the
    boundary map.

    H and W must be multiples of :attr:`size_divisor` ``= fusion_stride * 2**(levels - 1)`` (32 by
    default); other sizes raise ``ValueError``.

    Args:
        in_channels: input channels (1: grayscale, standardised).
        features: base width ``F``. Global levels have ``F * 2**l`` channels (l = 0..levels-1), local levels
            half that; shallow (skip) features ``F // 2``; HFEM projects every stream to ``F`` (eq. 8) and
            fuses to ``2F`` (eq. 14); decoder stages have ``min(2F, F/2 * 2**k)`` channels at stride ``2**k``.
        levels: number of aligned encoder levels ``L`` fused by HFEM.
        fusion_stride: the HFEM ("base") resolution is ``1/fusion_stride`` of the input; a power of two >= 2.
            The decoders have ``log2(fusion_stride)`` transposed-convolution stages.
        dilation: dilation ``d`` of the global stream's dilated and deformable convolutions.
        streams: "both" (DS-HFN), "local" (w/o global stream) or "global" (w/o local stream).
        fusion: "hfem" (eq. 8-14) or "add" (w/o HFEM: :class:`AdditiveFusion`).
        boundary_decoder: False drops the boundary decoder and the refinement (w/o boundary decoder).
        refine_lambda: lambda of eq. 20, a fixed coefficient in [0, 1] (not learned; see :class:`MutualRefinement`).
        upsample: decoder upsampling, "transpose" (eq. 15's transposed convolution) or "bilinear" (see
            :class:`DecoderStage`).
        instance_head: "none" (the paper's network), "hv" or "distance" (see :mod:`bundle.model.instance`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: int = 16,
        levels: int = 4,
        fusion_stride: int = 4,
        dilation: int = 2,
        streams: str = "both",
        fusion: str = "hfem",
        boundary_decoder: bool = True,
        refine_lambda: float = 0.5,
        upsample: str = "transpose",
        instance_head: str = "none",
    ) -> None:
        super().__init__()
        self.instance_head = check_instance_head(instance_head, "DSHFN: instance_head")
        if streams not in STREAMS:
            raise ValueError(f"DSHFN: streams must be one of {STREAMS}, got {streams!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"DSHFN: fusion must be one of {FUSIONS}, got {fusion!r}")
        if features < 4 or features % 4:
            raise ValueError(f"DSHFN: features must be a positive multiple of 4, got {features}")
        if levels < 1:
            raise ValueError(f"DSHFN: levels must be >= 1, got {levels}")
        if fusion_stride < 2 or fusion_stride & (fusion_stride - 1):
            raise ValueError(f"DSHFN: fusion_stride must be a power of two >= 2, got {fusion_stride}")
        if dilation < 1:
            raise ValueError(f"DSHFN: dilation must be >= 1, got {dilation}")

        self.in_channels = in_channels
        n_skips = int(math.log2(fusion_stride))
        self.n_skips = n_skips
        self.size_divisor = fusion_stride * 2 ** (levels - 1)
        skip_channels = [features // 2] * n_skips
        global_levels = [features * 2**i for i in range(levels)]
        local_levels = [c // 2 for c in global_levels]

        stream_mods: List[nn.Module] = []
        stream_widths: List[List[int]] = []  # per stream, per stride 2**k
        if streams in ("both", "global"):
            stream_mods.append(GlobalStream(in_channels, skip_channels, global_levels, dilation))
            stream_widths.append(skip_channels + global_levels)
        if streams in ("both", "local"):
            stream_mods.append(LocalStream(in_channels, skip_channels, local_levels))
            stream_widths.append(skip_channels + local_levels)
        self.streams = nn.ModuleList(stream_mods)
        # the boundary decoder's skips come from the local stream (last in the list) whenever it exists
        self.boundary_source = len(stream_mods) - 1

        level_widths = [[w[n_skips + i] for w in stream_widths] for i in range(levels)]
        fused = 2 * features
        if fusion == "hfem":
            self.fusion: nn.Module = HFEM(level_widths, features, fused)
        else:
            self.fusion = AdditiveFusion(level_widths, fused)

        strides = list(range(n_skips - 1, -1, -1))  # decoder stages, coarsest first
        stage_channels = [min(fused, features // 2 * 2**k) for k in strides]
        seg_skip_in = [sum(w[k] for w in stream_widths) for k in strides]
        self.segmentation_decoder = SegmentationDecoder(fused, stage_channels, seg_skip_in, upsample)
        self.boundary_decoder: BoundaryDecoder | None = None
        self.refinement: MutualRefinement | None = None
        if boundary_decoder:
            edge_skip_in = [stream_widths[self.boundary_source][k] for k in strides]
            self.boundary_decoder = BoundaryDecoder(fused, stage_channels, edge_skip_in, upsample)
            self.refinement = MutualRefinement(refine_lambda)
        self.instance_decoder: InstanceDecoder | None = None
        if instance_head != "none":
            self.instance_decoder = InstanceDecoder(
                fused, stage_channels, seg_skip_in, upsample, out_channels=instance_channels(instance_head)
            )

        self.apply(_he_init)
        for m in self.modules():
            if isinstance(m, DeformableConv):
                m.reset_offsets()  # undo He init: zero offsets = regular dilated grid at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DSHFN expects input (N, {self.in_channels}, H, W), got shape {list(x.shape)}: "
                "feed standardised grayscale tiles with a channel axis"
            )
        h, w = x.shape[-2], x.shape[-1]
        if h % self.size_divisor != 0 or w % self.size_divisor != 0:
            raise ValueError(
                f"DSHFN needs H and W to be multiples of size_divisor={self.size_divisor} "
                f"(fusion_stride * 2**(levels-1)), got {h}x{w}: pad or crop the input "
                f"(e.g. monai.transforms.DivisiblePad(k={self.size_divisor}))"
            )
        pyramids: List[List[torch.Tensor]] = []
        for stream in self.streams:
            pyramids.append(stream(x))

        n_levels = len(pyramids[0]) - self.n_skips
        levels: List[List[torch.Tensor]] = []
        for i in range(n_levels):
            levels.append([p[self.n_skips + i] for p in pyramids])
        fused = channels_last(self.fusion(levels))

        seg_skips: List[torch.Tensor] = []
        edge_skips: List[torch.Tensor] = []
        for k in range(self.n_skips - 1, -1, -1):
            seg_skips.append(torch.cat([p[k] for p in pyramids], dim=1))
            edge_skips.append(pyramids[self.boundary_source][k])
        seg = self.segmentation_decoder(fused, seg_skips)
        instance_decoder = self.instance_decoder
        inst = None if instance_decoder is None else instance_decoder(fused, seg_skips)

        boundary_decoder = self.boundary_decoder
        refinement = self.refinement
        edge = None if boundary_decoder is None else boundary_decoder(fused, edge_skips)
        # outputs go back to the default (NCHW-contiguous) layout so callers may .view() them
        if self.training:
            logits = [seg] if edge is None else [seg, edge]
            return torch.cat(logits if inst is None else logits + [inst], dim=1).contiguous()
        y_seg = torch.sigmoid(seg)
        if edge is None or refinement is None:
            maps = [y_seg, torch.zeros_like(y_seg), y_seg]
        else:
            y_edge = torch.sigmoid(edge)
            maps = [y_seg, y_edge, refinement(y_seg, y_edge)]
        if inst is not None:
            maps.append(instance_separation(self.instance_head, inst).to(y_seg.dtype))
        return torch.cat(maps, dim=1).contiguous()


def shape_summary(model: DSHFN, height: int = 256, width: int = 256, batch: int = 1) -> List[str]:
    """Lines ``module: shape`` traced by running ``model`` (eval mode) on a (batch, C, height, width) input."""
    lines: List[str] = []

    def shape(t: object) -> str:
        if isinstance(t, torch.Tensor):
            return "x".join(str(s) for s in t.shape)
        return "[" + ", ".join(shape(v) for v in t) + "]"  # type: ignore[union-attr]

    def hook(name: str):
        return lambda mod, inp, out: lines.append(f"{name:<46} {shape(out)}")

    watched = {"streams.%d" % i: s for i, s in enumerate(model.streams)}
    watched["fusion"] = model.fusion
    for dec_name in ("segmentation_decoder", "boundary_decoder", "instance_decoder"):
        dec = getattr(model, dec_name)
        if dec is not None:
            for i, stage in enumerate(dec.stages):
                watched[f"{dec_name}.stages.{i}"] = stage
            watched[f"{dec_name}.head"] = dec.head
    handles = [m.register_forward_hook(hook(f"{n} ({type(m).__name__})")) for n, m in watched.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(batch, model.in_channels, height, width))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    head = f"{'input':<46} {batch}x{model.in_channels}x{height}x{width}"
    return [head] + lines + [f"{'output (eval)':<46} {shape(out)}"]


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print DS-HFN's tensor shapes for one input size.")
    parser.add_argument("--size", type=int, default=256, help="input height = width")
    parser.add_argument("--kwargs", default="{}", help='DSHFN constructor arguments as JSON, e.g. \'{"levels": 3}\'')
    cli = parser.parse_args()
    net = DSHFN(**json.loads(cli.kwargs))
    n_params = sum(p.numel() for p in net.parameters())
    print(f"DSHFN({cli.kwargs}): {n_params} parameters, size_divisor={net.size_divisor}")
    print("\n".join(shape_summary(net, cli.size, cli.size)))
