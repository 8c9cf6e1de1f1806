"""Reading and preparing data: image and label files (:mod:`~bundle.data.io`), the dataset layout and grouped splits
(:mod:`~bundle.data.layout`), multi-dataset training lists (:mod:`~bundle.data.datasets`), MONAI transforms of the
training chain (:mod:`~bundle.data.transforms`, :mod:`~bundle.data.channels`, :mod:`~bundle.data.scale`) and the
conversion of public releases (:mod:`~bundle.data.prepare`). Imports nothing else of the bundle."""
