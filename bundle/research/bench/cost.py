"""Inference cost per square millimetre of tissue: DS-HFN as ``configs/inference.json`` runs it (and with each other
instance head) next to MONAI's ``HoVerNet(mode="fast")`` and ``BasicUNet``.

    python scripts/benchmark.py --suite cost           # eval forward, batch 4 x 256 x 256, CPU
    python scripts/benchmark.py --suite cost --quick   # batch 1, smoke run

Each network runs one eval forward (``no_grad``) on a batch of 256 x 256 windows; the time is divided by the
output pixels it yields (HoVerNet's "fast" mode returns the central 164 x 164 of each 256 x 256 window, the
others all of it) and by the tissue area of a pixel at the scale the network works at (DS-HFN and BasicUNet at
the config's ``model_pixel_size``, HoVerNet at 0.25 um/px, the 40x scale it is trained at), giving seconds per
mm^2 of tissue. The networks are timed alternately and each figure is the best of ``--repeat`` runs (other
processes only ever add time); the ratio to HoVerNet is the row to read.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet, HoVerNet

from bundle import bundle_root
from bundle.inference.engine import load_segmenter
from bundle.model.instance import INSTANCE_HEADS
from bundle.research.bench import time_call

SIZE = 256
HOVERNET_PIXEL_SIZE = 0.25
HOVERNET_OUT = 164  # MONAI HoVerNet(mode="fast"): valid convolutions crop a 256 window to its central 164


def inference_network(config_files: list[str], **overrides: Any) -> tuple[torch.nn.Module, int, float]:
    s = load_segmenter(config_files, ckpt_path=None, **overrides)
    return s.network, int(getattr(s.network, "in_channels", 1)), s.model_pixel_size


def run(args: Any) -> list[dict]:
    device = torch.device(args.device)
    batch = 1 if args.quick else 4
    config = [f"{bundle_root()}/configs/inference.json"]
    dshfn, in_ch, model_ps = inference_network(config)
    nets = {f"DS-HFN (inference.json, instance_head={dshfn.instance_head})": (dshfn, in_ch, SIZE, model_ps)}
    for head in INSTANCE_HEADS:  # the other heads, for their cost
        if head != dshfn.instance_head:
            nets[f"DS-HFN instance_head={head}"] = (inference_network(config, instance_head=head)[0], in_ch, SIZE, model_ps)
    nets.update({
        "BasicUNet": (BasicUNet(spatial_dims=2, in_channels=in_ch, out_channels=2), in_ch, SIZE, model_ps),
        "HoVerNet fast": (HoVerNet(mode="fast", in_channels=3, out_classes=0), 3, HOVERNET_OUT, HOVERNET_PIXEL_SIZE),
    })
    best: dict[str, float] = {}
    calls = {}
    for name, (net, ch, _, _) in nets.items():
        net = net.to(device).eval()
        x = torch.randn(batch, ch, SIZE, SIZE, device=device)

        def fwd(net=net, x=x) -> None:
            with torch.no_grad():
                net(x)

        fwd()  # warm-up
        calls[name] = fwd
    for _ in range(max(1, args.repeat)):
        for name, fwd in calls.items():
            t = time_call(fwd, device, warmup=0, repeat=1)
            best[name] = min(best.get(name, float("inf")), t)
    rows = []
    ref = None
    for name, (_, _, out, ps) in nets.items():
        us_per_px = 1e6 * best[name] / (batch * out * out)
        px_per_mm2 = (1000.0 / ps) ** 2
        s_per_mm2 = us_per_px * 1e-6 * px_per_mm2
        rows.append({"network": name, "um_per_px": ps, "batch_s": round(best[name], 3),
                     "us_per_output_px": round(us_per_px, 2), "s_per_mm2": round(s_per_mm2, 3)})
        if name.startswith("HoVerNet"):
            ref = s_per_mm2
    for r in rows:
        r["ratio_to_hovernet"] = round(r["s_per_mm2"] / ref, 4) if ref else None
    return rows
