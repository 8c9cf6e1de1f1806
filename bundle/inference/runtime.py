"""An optional network runtime for the CPU: DS-HFN exported to ONNX and run by ONNX Runtime (config id
``onnx_runtime``, off by default; measured in docs/benchmarks.md).

torchvision's ``deform_conv2d`` has no ONNX symbolic, so the default exporter stops on it
(``UnsupportedOperatorError ... torchvision::deform_conv2d``), and the dynamo exporter needs ``onnxscript`` and has no
translation for it either. ONNX opset 19 has ``DeformConv`` with the same semantics (offsets per offset group,
optional mask, then bias), so :func:`_deform_conv2d_symbolic` maps the op onto it for the TorchScript exporter
(``dynamo=False``); ONNX Runtime's CPU provider implements ``DeformConv``. Maps differ from torch's by float
rounding (max abs difference measured in docs/benchmarks.md), so label maps are not byte-identical to the torch
path: that is why it is an option.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from bundle.core.errors import DataError

__all__ = ["OnnxNetwork", "export_onnx"]

_REGISTERED = False


def _deform_conv2d_symbolic(g, inp, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                            groups, offset_groups, use_mask):
    args = [inp, weight, offset, bias] + ([mask] if use_mask else [])
    return g.op("DeformConv", *args, strides_i=[stride_h, stride_w], pads_i=[pad_h, pad_w, pad_h, pad_w],
                dilations_i=[dil_h, dil_w], group_i=groups, offset_group_i=offset_groups)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.onnx import symbolic_helper

    symbolic = symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")(
        _deform_conv2d_symbolic)
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", symbolic, 19)
    _REGISTERED = True


def _in_channels(network: torch.nn.Module) -> int:
    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    return int(first.in_channels)


def export_onnx(network: torch.nn.Module, roi: int = 256) -> bytes:
    """The network in eval mode as an ONNX opset-19 model (batch axis dynamic, ``roi`` x ``roi`` windows)."""
    _register()
    network = network.eval()
    x = torch.zeros(2, _in_channels(network), roi, roi)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (x,), buf, opset_version=19, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return buf.getvalue()


class OnnxNetwork:
    """``network`` exported by :func:`export_onnx` and run by ONNX Runtime on the CPU: a callable from a (N, C, roi,
    roi) float32 tensor to the eval output tensor, what MONAI's inferer calls. ``threads``: intra-op threads
    (default torch's)."""

    def __init__(self, network: torch.nn.Module, roi: int = 256, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DataError(f"onnx_runtime is on but onnxruntime is not installed ({exc}). "
                            "pip install -r requirements.txt (onnxruntime, onnx), or set onnx_runtime false") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(export_onnx(network, roi), options, providers=["CPUExecutionProvider"])
        self.roi = roi

    def to(self, device) -> OnnxNetwork:
        if torch.device(device).type != "cpu":
            raise DataError(f"onnx_runtime runs on the CPU only; got device {device}. Set onnx_runtime false")
        return self

    def eval(self) -> OnnxNetwork:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(y)
