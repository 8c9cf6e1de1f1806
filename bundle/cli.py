"""The friendly error of the command-line entry points: bad input ends with one line naming the file and what to
do, not MONAI's wrapped 150-line traceback. Installed by the entry points (the configs' ``initialize``,
``scripts/*.py``), never on import: a library must not change a host program's ``sys.excepthook``."""

from __future__ import annotations

import functools
import os
import sys

from bundle.data.io import DataError


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The first :class:`bundle.data.io.DataError` in an exception's cause/context chain (MONAI wraps errors raised
    while a config is instantiated or a transform runs), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def cli_excepthook(exc_type, exc, tb, default=None) -> None:
    """Print a :class:`DataError` found in ``exc`` as one line; anything else (or ``DSHFN_TRACEBACK=1``) goes to
    ``default``, the previous hook."""
    err = find_data_error(exc)
    if err is None or os.environ.get("DSHFN_TRACEBACK"):
        (default or sys.__excepthook__)(exc_type, exc, tb)
        return
    print(f"error: {err}\n(set DSHFN_TRACEBACK=1 for the full traceback)", file=sys.stderr)


def install_cli_errors() -> None:
    """Make :func:`cli_excepthook` this process's ``sys.excepthook`` (once; the previous hook handles the rest)."""
    if not isinstance(sys.excepthook, functools.partial) or sys.excepthook.func is not cli_excepthook:
        sys.excepthook = functools.partial(cli_excepthook, default=sys.excepthook)
