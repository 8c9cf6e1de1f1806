"""Ignite handlers the training and evaluation configs wire in (MONAI's ``handlers``): saving and loading weights
(:mod:`~bundle.handlers.checkpoints`), the training loop's clipping, early stopping, budget, curve and logs
(:mod:`~bundle.handlers.training`), nucleus instance metrics of each validation tile
(:mod:`~bundle.handlers.instance_eval`) and per-image metric tables (:mod:`~bundle.handlers.tables`)."""
