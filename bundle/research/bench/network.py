"""Network cost: DS-HFN (default width) vs MONAI ``BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)``.

    python scripts/benchmark.py --suite network            # batch 16 x 1x256x256, CPU
    python scripts/benchmark.py --suite network --quick    # batch 2, smoke run
    python scripts/benchmark.py --suite network --device cuda --amp

Both models see the same input. Train step = forward + backward (loss = mean of the outputs) + AdamW step;
eval = forward under ``no_grad`` in ``eval()`` mode. The two models are timed alternately, repetition by
repetition, and each time reported is the BEST of ``--repeat`` runs (of ``3 * --repeat`` for eval): on a
shared machine other processes only ever add time (single steps were seen to triple under a neighbour's
test run), so the minimum is the estimate of the model's own cost that is least disturbed, and the ratio
of minima is what to compare.
On CPU a last row repeats the ratios with ``torch.set_num_threads(1)``, which such interference cannot skew
much; it is the ratio of the models' compute, without their parallel efficiency.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step; on CPU how far the process's peak
RSS (VmHWM, reset through ``/proc/self/clear_refs`` just before) rises above its RSS over the first train step /
one eval forward, each in a fresh spawned process so freed-but-cached memory of one measurement cannot hide
the next. The train figure therefore covers activations, gradients and AdamW state, not the weights.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Callable

import torch
from monai.networks.nets import BasicUNet

from bundle.model.network import DSHFN
from bundle.research.bench import sync, time_call

SIZE = 256
RATIO_KEYS = ("params", "train_step_s", "eval_fwd_s", "peak_train_MiB", "peak_eval_MiB")


def build(name: str) -> torch.nn.Module:
    """The two compared networks, each at its default width."""
    if name == "DS-HFN":
        return DSHFN()
    if name == "BasicUNet":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    raise ValueError(f"unknown model {name!r}")


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def make_steps(
    model: torch.nn.Module, x: torch.Tensor, amp: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train_step, eval_forward) closures over ``model`` and input ``x`` (already on its device)."""
    device = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=_amp_dtype(device), enabled=amp):
            loss = model(x).float().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def eval_forward() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=_amp_dtype(device), enabled=amp):
            model(x)

    return train_step, eval_forward


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_rss_rise(name: str, x: torch.Tensor, amp: bool, mode: str, queue: mp.Queue) -> None:
    """Child process: MiB by which RSS peaks above its starting level during one train step or eval forward."""
    torch.manual_seed(0)
    train_step, eval_forward = make_steps(build(name), x, amp)
    try:  # Linux: "5" resets the peak-RSS mark (VmHWM), so imports' transient peaks don't mask the step
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kib("VmRSS")
        (train_step if mode == "train" else eval_forward)()
        queue.put((_proc_status_kib("VmHWM") - before) / 1024.0)
    except OSError:  # elsewhere fall back to the lifetime high-water mark (KiB on Linux, bytes on macOS)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (train_step if mode == "train" else eval_forward)()
        queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0)


def peak_memory_mib(name: str, x: torch.Tensor, amp: bool, mode: str) -> float:
    """Peak memory (MiB) of one train step or eval forward: CUDA allocator peak, or CPU RSS rise in a fresh process."""
    if x.device.type == "cuda":
        torch.manual_seed(0)
        train_step, eval_forward = make_steps(build(name).to(x.device), x, amp)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        (train_step if mode == "train" else eval_forward)()
        sync(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_rise, args=(name, x, amp, mode, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return float(result)


def _time_alternately(
    steps: dict[str, tuple[Callable[[], None], Callable[[], None]]], device: torch.device, repeat: int
) -> dict[str, dict[str, float]]:
    """Best-of-``repeat`` train-step and (best-of-``3 * repeat``, it is cheap) eval times, models interleaved."""
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "eval": []} for n in steps}
    for train_step, eval_forward in steps.values():  # warm-up: allocator, AdamW state, oneDNN primitive caches
        train_step()
        eval_forward()
    for r in range(3 * repeat):
        for name, (train_step, eval_forward) in steps.items():
            if r < repeat:
                times[name]["train"].append(time_call(train_step, device, warmup=0, repeat=1))
            times[name]["eval"].append(time_call(eval_forward, device, warmup=0, repeat=1))
    return {n: {k: min(v) for k, v in t.items()} for n, t in times.items()}


def run(args) -> list[dict]:
    """Rows for DS-HFN, BasicUNet, their ratio (DS-HFN / BasicUNet) and, on CPU, the ratio with one thread."""
    device = torch.device(getattr(args, "device", "cpu"))
    amp = bool(getattr(args, "amp", False))
    repeat = max(1, int(getattr(args, "repeat", 3)))
    quick = bool(getattr(args, "quick", False))
    batch = 2 if quick else 16
    size = int(getattr(args, "size", SIZE))
    names = ["DS-HFN", "BasicUNet"]

    torch.manual_seed(0)
    x = torch.randn(batch, 1, size, size, device=device)
    models = {name: build(name).to(device) for name in names}
    steps = {name: make_steps(models[name], x, amp) for name in names}
    best = _time_alternately(steps, device, repeat)

    rows = []
    for name in names:
        rows.append(
            {
                "model": name + (" (features=16)" if name == "DS-HFN" else " (default)"),
                "input": f"{batch}x1x{size}x{size}",
                "params": sum(p.numel() for p in models[name].parameters()),
                "train_step_s": best[name]["train"],
                "eval_fwd_s": best[name]["eval"],
                "peak_train_MiB": peak_memory_mib(name, x, amp, "train"),
                "peak_eval_MiB": peak_memory_mib(name, x, amp, "eval"),
            }
        )
    ours, base = rows
    rows.append(
        {
            "model": f"ratio DS-HFN / BasicUNet ({torch.get_num_threads()} threads)",
            "input": ours["input"],
            **{k: ours[k] / base[k] if base[k] else float("nan") for k in RATIO_KEYS},
        }
    )
    if device.type == "cpu" and not quick and torch.get_num_threads() > 1:
        # Cross-check immune to the other threads' scheduling: with a neighbour busy on the shared cores, every
        # parallel region waits for its descheduled thread and multi-threaded timings swing by 2-3x.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = _time_alternately(steps, device, repeat)
        finally:
            torch.set_num_threads(threads)
        rows.append(
            {
                "model": "ratio DS-HFN / BasicUNet (1 thread)",
                "input": ours["input"],
                "train_step_s": single["DS-HFN"]["train"] / single["BasicUNet"]["train"],
                "eval_fwd_s": single["DS-HFN"]["eval"] / single["BasicUNet"]["eval"],
            }
        )
    return rows
