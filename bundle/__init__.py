"""DS-HFN (Dual-Stream HyperFusionNet) nuclei segmentation: the MONAI bundle's Python components.

Configs in ``configs/`` reference these modules as ``bundle.<module>.<Name>``; ``monai.bundle run``
puts the bundle root on ``sys.path`` so the package imports without installation.
"""

__version__ = "0.1.0"


def bundle_root() -> str:
    """Absolute path of the bundle root (the folder holding ``configs/`` and this ``bundle/`` package).

    Configs call it as ``{"_target_": "bundle.bundle_root"}``: a ``_target_`` is imported when it is
    instantiated, after ``monai.bundle run`` has put the bundle root on ``sys.path``, whereas a config
    ``imports`` entry runs before that and fails outside the bundle root.
    """
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
