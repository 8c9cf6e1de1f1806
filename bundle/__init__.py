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
