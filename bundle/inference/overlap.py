"""Overlapping the engine's stages: the network pass of the next chunk runs on a background thread while the main
thread post-processes and writes the current one (:func:`prefetch`), and the image-sized PNGs of a tile are encoded
on a writer thread (:class:`Writer`). Both keep the order of the results, so the outputs are the same bytes as a
sequential run (tests/test_throughput.py); torch and zlib release the GIL, so the two threads really overlap.

Written with the standard library's ``threading``/``queue`` because MONAI's ``ThreadBuffer`` (the same idea for a
DataLoader) swallows nothing but also stops nothing: a consumer that fails mid-image would leave its producer
thread blocked on a full queue holding a chunk in memory; here closing the iterator stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["prefetch", "Writer"]

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` on a background thread, at most ``depth`` items ahead of the consumer; yields them in
    order. An exception of the producer is raised in the consumer at the item where it happened; closing the
    generator (or an exception in the consumer) stops the producer at its next item."""
    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                del item  # not kept alive by this frame while the consumer works on it
                if stop.is_set():
                    return
            q.put((True, _DONE))
        except BaseException as exc:  # handed to the consumer
            q.put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
            del item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


class Writer:
    """One background thread that runs write jobs in submission order; :meth:`wait` returns their results and
    re-raises the first failure. Used as a context manager, it waits on exit (and on an error, still lets the
    submitted jobs finish so no temp file is left half written)."""

    def __init__(self, enabled: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="writer") if enabled else None
        self._jobs: list[tuple[Any, Future]] = []

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:  # run now; a failure is raised by wait(), as on the thread
            job: Future = Future()
            try:
                job.set_result(fn(*args))
            except Exception as exc:
                job.set_exception(exc)
            self._jobs.append((key, job))
        else:
            self._jobs.append((key, self._pool.submit(fn, *args)))

    def wait(self) -> dict:
        out = {}
        try:
            for key, job in self._jobs:
                out[key] = job.result()
        finally:
            self._jobs = []
        return out

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
