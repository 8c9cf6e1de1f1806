"""Each window through the network once: chunks overlap by their halo plus a window on each side
(:mod:`bundle.inference.chunks`), so at the default chunk size a 40x image's windows were predicted about 2.3 times.
:class:`WindowCache` sits between MONAI's ``SlidingWindowInferer`` and the network and returns the stored output of
a window whose input it has seen (same bytes), so the next chunk reuses the windows it shares with the previous
ones. The inferer still blends every window of every chunk in the same order, so the maps are the same values as
without the cache (tests/test_throughput.py; byte-identical outputs on the dense mm², docs/benchmarks.md).

Keyed by a BLAKE2b digest of the window's input bytes (shape and dtype included), so a window that differs in one
bit is predicted again and a wrong guess of the geometry can only cost time. What is KEPT follows the geometry:
the chunk pass says, per chunk, where its windows lie in the image (:meth:`WindowCache.plan`, the positions in
MONAI's scan order) and which positions a later chunk can still need (``keep``); only those are stored and the rest
are pruned after the chunk, so the store holds the strips shared with the next chunk of the row and with the next
row (~100 windows, 80 MB, for a 4000 px wide image). Beyond ``max_bytes`` the least recently used are dropped.
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
        self._where: dict[bytes, tuple[int, int]] = {}
        self._positions: list[tuple[int, int]] | None = None
        self._keep = None
        self._at = 0
        self.bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._store.clear()
        self._where.clear()
        self.bytes = 0

    def plan(self, positions: list[tuple[int, int]] | None, keep=None) -> None:
        """The image positions of the windows of the next inferer call, in the order the inferer passes them, and
        ``keep(y, x)``: whether a window there can be needed by a later chunk (None: keep everything, LRU only)."""
        self._positions, self._keep, self._at = positions, keep, 0

    def prune(self) -> None:
        """Drop the stored windows that no later chunk can need (after a chunk)."""
        if self._keep is None:
            return
        for key in [k for k, pos in self._where.items() if not self._keep(*pos)]:
            self._drop(key)

    def _next_positions(self, n: int) -> list | None:
        if self._positions is None:
            return None
        at, self._at = self._at, self._at + n
        if self._at > len(self._positions):  # not the call the plan was made for: keep by LRU only
            self._positions = None
            return None
        return self._positions[at : self._at]

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
        where = self._next_positions(len(keys))
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
            if where is None or self._keep is None or self._keep(*where[i]):
                self._put(keys[i], fresh[i], None if where is None else where[i])
        for i, k in enumerate(keys):
            if i not in fresh and k in self._store:  # recently used: dropped last
                self._store.move_to_end(k)
        if out is not None:
            return out
        return torch.stack([fresh[i] if i in fresh else cached[i] for i in range(len(keys))])

    def _put(self, key: bytes, value: torch.Tensor, where: tuple[int, int] | None) -> None:
        value = value.detach().clone()
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._store:
            return
        self._store[key] = value
        if where is not None:
            self._where[key] = where
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._store)))

    def _drop(self, key: bytes) -> None:
        old = self._store.pop(key)
        self._where.pop(key, None)
        self.bytes -= old.numel() * old.element_size()
