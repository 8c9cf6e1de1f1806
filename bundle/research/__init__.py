"""Everything that measures the bundle rather than runs it (not needed to segment or train): k-fold and cross-organ
experiments (:mod:`~bundle.research.experiments`, :mod:`~bundle.research.transfer`), the recipe probes
(:mod:`~bundle.research.recipe`), watershed tuning (:mod:`~bundle.research.tuning`), figures
(:mod:`~bundle.research.figures`) and benchmarks (:mod:`bundle.research.bench`). May import any other subpackage;
none imports it."""
