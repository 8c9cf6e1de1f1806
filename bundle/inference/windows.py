"""Each window through the network once: chunks overlap by their halo plus a window on each side
(:mod:`bundle.inference.chunks`), so at the default chunk size a 40x image's windows were predicted about 2.3 times.
:class:`WindowCache` sits between MONAI's ``SlidingWindowInferer`` and the network and returns the stored output of
a window whose input it has seen (same bytes), so the next chunk reuses the windows it shares with the previous
ones. The inferer still blends every window of every chunk in the same order, so the maps are the same values as
without the cache (tests/test_throughput.py; byte-identical outputs on the dense mm², docs/benchmarks.md).

Keyed by a BLAKE2b digest of the window's input bytes (shape and dtype included): no geometry is assumed, a window
that differs in one bit is predicted again. Least recently used windows are dropped beyond ``max_bytes``; that only
costs recomputation (a slide wider than the cache keeps the saving between neighbours in a row).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

__all__ = ["WindowCache"]


class WindowCache:
    """``network`` as MONAI's inferer calls it (a (N, C, h, w) batch of windows -> a tensor), with the outputs of
    windows already seen taken from a least-recently-used store of at most ``max_bytes``. Only tensor outputs are
    stored; anything else passes through."""

    def __init__(self, network, max_bytes: int = 256 * 2**20) -> None:
        self.network, self.max_bytes = network, int(max_bytes)
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    @staticmethod
    def _key(window: torch.Tensor) -> bytes:
        arr = window.detach().contiguous().cpu().numpy()
        h = hashlib.blake2b(f"{arr.dtype}{arr.shape}".encode(), digest_size=20)
        h.update(memoryview(arr).cast("B"))
        return h.digest()

    def __call__(self, x: torch.Tensor):
        if self.max_bytes <= 0 or not isinstance(x, torch.Tensor) or x.ndim < 2:
            return self.network(x)
        keys = [self._key(x[i]) for i in range(x.shape[0])]
        cached = [self._store.get(k) for k in keys]
        miss = [i for i, c in enumerate(cached) if c is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if len(miss) == len(keys):  # nothing seen: the batch as the inferer made it
            out = self.network(x)
            if not isinstance(out, torch.Tensor):
                return out
            computed = list(out)
        else:
            computed = [] if not miss else list(self.network(x[miss]))
            if computed and not isinstance(computed[0], torch.Tensor):
                return self.network(x)
            out = None
        fresh = dict(zip(miss, computed))
        for i in miss:
            self._put(keys[i], fresh[i])
        for i, k in enumerate(keys):
            if i not in fresh:
                self._store.move_to_end(k, last=True) if k in self._store else None
        if out is not None:
            return out
        return torch.stack([fresh[i] if i in fresh else cached[i] for i in range(len(keys))])

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        value = value.detach().clone()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
