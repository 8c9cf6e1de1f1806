"""An optional stage timer for the inference engine: wall and CPU seconds accumulated per named stage.

The engine wraps each stage in ``with stage("name"):``. With no timer active (the default) that is one global
lookup and a shared no-op context manager; ``with StageTimer() as timer:`` activates one for the code inside
(``scripts/benchmark.py --suite stages`` reads ``timer.table()``). Stages must not nest on one thread.

CPU seconds are the process's (``time.process_time``: all threads, so torch's intra-op threads count in
``network``) for stages on the thread that activated the timer, and the thread's own (``time.thread_time``) for
stages run on another thread (e.g. the output writer), which are also marked in :attr:`StageTimer.background`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

__all__ = ["StageTimer", "stage", "active_timer"]

_NULL = contextlib.nullcontext()
_active: StageTimer | None = None


class StageTimer:
    """Accumulates ``wall``/``cpu`` seconds and ``calls`` per stage name (see the module docstring)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.background: set[str] = set()
        self.total_wall = 0.0
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._t0 = 0.0
        self._previous: StageTimer | None = None

    def __enter__(self) -> StageTimer:
        global _active
        self._previous, _active = _active, self
        self._owner = threading.get_ident()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        self.total_wall += time.perf_counter() - self._t0
        _active = self._previous

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        main = threading.get_ident() == self._owner
        clock = time.process_time if main else time.thread_time
        w0, c0 = time.perf_counter(), clock()
        try:
            yield
        finally:
            w, c = time.perf_counter() - w0, clock() - c0
            with self._lock:
                self.wall[name] += w
                self.cpu[name] += c
                self.calls[name] += 1
                if not main:
                    self.background.add(name)

    def add(self, name: str, wall: float, cpu: float = 0.0) -> None:
        """Add an externally measured interval (e.g. the network's forward passes inside MONAI's inferer)."""
        with self._lock:
            self.wall[name] += wall
            self.cpu[name] += cpu
            self.calls[name] += 1

    def table(self) -> list[dict]:
        """One row per stage, in first-use order: ``stage``, ``wall_s``, ``cpu_s``, ``calls``, ``thread``."""
        return [{"stage": k, "wall_s": self.wall[k], "cpu_s": self.cpu[k], "calls": self.calls[k],
                 "thread": "background" if k in self.background else "main"} for k in self.wall]


def active_timer() -> StageTimer | None:
    return _active


def stage(name: str) -> contextlib.AbstractContextManager:
    """``with stage("name"):`` times the block into the active :class:`StageTimer`; a no-op when none is active."""
    timer = _active
    return _NULL if timer is None else timer.measure(name)
