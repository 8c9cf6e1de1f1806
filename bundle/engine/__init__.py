"""Ignite handlers the training and evaluation configs wire in: gradient clipping, model selection, early stopping,
resumable checkpoints, CPU-time budget, training curve, loss terms, TensorBoard contours
(:mod:`~bundle.engine.handlers`), nucleus instance metrics of each validation tile
(:mod:`~bundle.engine.instance_eval`) and per-image metric tables (:mod:`~bundle.engine.tables`). Imports
:mod:`bundle.data`, :mod:`bundle.model`, :mod:`bundle.evaluation`, :mod:`bundle.nuclei`."""
