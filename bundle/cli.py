"""The command-line entry points' friendly error and on/off switches.

Bad input ends with one line naming the file and what to do, not MONAI's wrapped 150-line traceback; the hook is
installed by the entry points (the configs' ``initialize``, ``scripts/*.py``), never on import: a library must not
change a host program's ``sys.excepthook``. :func:`as_flag` reads a switch given on the command line.
"""

from __future__ import annotations

import functools
import os
import sys

from bundle.data.io import DataError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


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


def as_flag(value: object, name: str) -> bool:
    """``value`` as a bool. ``monai.bundle run --resume false`` passes the string ``'false'`` (fire reads only
    ``False`` as a bool), which ``bool()`` would turn on; true/false, yes/no, on/off and 1/0 are read in any case,
    anything else is a one-line :class:`DataError` naming the setting."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{name}={value!r}: give true or false")
