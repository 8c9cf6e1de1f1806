"""DS-HFN (Dual-Stream HyperFusionNet) nuclei segmentation: the MONAI bundle's Python components.

Configs in ``configs/`` reference these modules as ``bundle.<module>.<Name>``; ``monai.bundle run``
puts the bundle root on ``sys.path`` so the package imports without installation.
"""

def bundle_root() -> str:
    """Absolute path of the bundle root (the folder holding ``configs/`` and this ``bundle/`` package).

    Configs call it as ``{"_target_": "bundle.bundle_root"}``: a ``_target_`` is imported when it is
    instantiated, after ``monai.bundle run`` has put the bundle root on ``sys.path``, whereas a config
    ``imports`` entry runs before that and fails outside the bundle root.
    """
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metadata_version() -> str:
    """``version`` of ``configs/metadata.json``: the one place the bundle's version is written."""
    import json
    import os

    try:
        with open(os.path.join(bundle_root(), "configs", "metadata.json"), encoding="utf-8") as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError):  # a copy of the package without its configs
        return "unknown"


__version__ = _metadata_version()


def _find_data_error(exc: BaseException | None):
    """The first ``bundle.io.DataError`` in an exception's cause/context chain, or None."""
    from bundle.io import DataError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _cli_excepthook(exc_type, exc, tb, _default=None) -> None:
    """Bad input gets one line naming the file and what to do, not MONAI's wrapped 150-line traceback."""
    import os
    import sys

    err = _find_data_error(exc)
    if err is None or os.environ.get("DSHFN_TRACEBACK"):
        (_default or sys.__excepthook__)(exc_type, exc, tb)
        return
    print(f"error: {err}\n(set DSHFN_TRACEBACK=1 for the full traceback)", file=sys.stderr)


def _install_cli_excepthook() -> None:
    # only under `python -m monai.bundle ...`: a library must not change a host program's excepthook
    import functools
    import sys

    argv0 = sys.argv[0].replace("\\", "/") if sys.argv else ""
    if argv0.endswith("monai/bundle/__main__.py"):
        sys.excepthook = functools.partial(_cli_excepthook, _default=sys.excepthook)


_install_cli_excepthook()
