"""PID lock files, so parallel workers (``--folds`` split across processes) never run the same (variant, fold) twice:
:func:`run_once` does a unit of work unless its results exist or another live process holds its lock; a lock whose
process is gone is taken over."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def run_once(key: dict[str, Any], label: str, out: Path, done: Callable[[], bool],
              work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work()`` unless ``done()``, holding ``out/run.lock``: skipped (``key`` + ``skipped``) when the results exist
    or when another live process holds the lock (``busy``); ``done`` is asked again once the lock is held."""
    if done():
        logger.info(f"{label}: results exist, skipped")
        return {**key, "skipped": True}
    with RunLock(out / "run.lock") as lock:
        if not lock.acquired:
            logger.info(f"{label}: another live process holds {lock.path}, skipped")
            return {**key, "skipped": True, "busy": True}
        if done():  # finished by another worker meanwhile
            return {**key, "skipped": True}
        return work()


class RunLock:
    """An exclusive lock file holding the owner's PID, so parallel workers (``--folds`` split across processes)
    never train the same (variant, fold) twice; a lock whose process is gone is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acquired = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if lock_owner_alive(self.path):
                    return self
                self.path.unlink(missing_ok=True)  # stale: its process died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.acquired = True
            break
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.acquired:
            self.path.unlink(missing_ok=True)


def lock_owner_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0
