"""DS-HFN (Dual-Stream HyperFusionNet) nuclei segmentation: the MONAI bundle's Python components.

Configs in ``configs/`` reference these modules as ``bundle.<module>.<Name>``; ``monai.bundle run``
puts the bundle root on ``sys.path`` so the package imports without installation.
"""

__version__ = "0.1.0"
