"""From network maps to nuclei: the marker watershed (:mod:`~bundle.nuclei.watershed`), channel binarisation
(:mod:`~bundle.nuclei.binarize`), per-nucleus measurements (:mod:`~bundle.nuclei.measure`), GeoJSON / CSV / label
map exports (:mod:`~bundle.nuclei.exports`) and contour overlays (:mod:`~bundle.nuclei.overlays`). Imports
:mod:`bundle.data` and :mod:`bundle.evaluation`."""
