"""The networks and their losses: DS-HFN (:mod:`~bundle.model.network`), the Sobel operator it and its loss share
(:mod:`~bundle.model.sobel`), the DS-HFN loss (:mod:`~bundle.model.losses`) and the baseline wrappers
(:mod:`~bundle.model.baselines`). Imports nothing else of the bundle."""
