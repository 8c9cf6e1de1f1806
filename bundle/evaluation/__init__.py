"""Metrics: pixel metrics and their MONAI handlers (:mod:`~bundle.evaluation.pixel`: Dice, IoU, boundary F1,
Hausdorff) and nucleus instance metrics (:mod:`~bundle.evaluation.instance`: AJI, AJI+, PQ). Imports nothing else of
the bundle."""
