"""The command-line entry points' friendly error and on/off switches.

Bad input ends with one line naming the file and what to do, not MONAI's wrapped 150-line traceback; the hook is
installed by the entry points (the configs' ``initialize``, ``scripts/*.py``), never on import: a library must not
change a host program's ``sys.excepthook``. :func:`as_flag` and :func:`switch` read a switch given on the command
line; :func:`data_value` and :func:`data_path` keep a script option's value data when it is handed to MONAI's config
parser.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

from bundle.core.errors import DataError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The first :class:`bundle.core.errors.DataError` in an exception's cause/context chain (MONAI wraps errors raised
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
    anything else is a one-line :class:`DataError` naming the setting as ``name`` (the option as the user types
    it, e.g. ``--skip_existing``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{name} {value!r}: give true or false (also yes/no, on/off, 1/0)")


def switch(flag: object, name: str, on: Any = True, off: Any = False) -> Any:
    """``on`` if the switch ``flag`` (read by :func:`as_flag`, errors naming ``name``) is on, else ``off``.

    What a config uses where an on/off id decides a value, instead of a ``$`` expression that would take the string
    ``'false'`` for true: ``"reference": {"_target_": "bundle.core.cli.switch", "flag": "@reinhard", "name": "--reinhard",
    "on": "@reinhard_reference", "off": null}``; ``"_disabled_"`` gets ``"on": false, "off": true``.
    """
    return on if as_flag(flag, name) else off


def read_flags(values: Mapping[str, Any] | None, schema: type, prefix: str) -> dict[str, Any]:
    """``values`` (a config mapping for the dataclass ``schema``) with its bool fields read by :func:`as_flag`,
    named ``<prefix>#<field>``: ``--watershed#fill_holes false`` arrives as the string ``'false'``."""
    out = dict(values or {})
    for field in dataclasses.fields(schema):
        if field.name in out and field.type in (bool, "bool"):
            out[field.name] = as_flag(out[field.name], f"{prefix}#{field.name}")
    return out


#: first characters that make MONAI's config parser read a string as code (``$``), a reference (``@``) or a macro
#: (``%``) instead of as data
_CONFIG_SYNTAX = ("$", "@", "%")


def data_value(value: str, option: str) -> str:
    """``value`` of the script option ``option`` for a config override, refused (one-line :class:`DataError`) when
    it starts with ``$``, ``@`` or ``%``: MONAI's parser would run it as code or follow it as a reference."""
    text = str(value)
    if text.startswith(_CONFIG_SYNTAX):
        raise DataError(f"{option} {text!r}: a value may not start with {', '.join(_CONFIG_SYNTAX)} (the config "
                        "parser would read it as code or a reference). Give the plain value")
    return text


def data_path(value: str | os.PathLike) -> str:
    """A file or folder path for a config override, kept data: one starting with ``$``, ``@`` or ``%`` (a file
    really named so) gets a leading ``./``, the same file, which the config parser leaves alone."""
    text = os.fspath(value)
    return os.path.join(".", text) if text.startswith(_CONFIG_SYNTAX) else text
