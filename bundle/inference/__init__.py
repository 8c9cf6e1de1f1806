"""Inference: from the pixels of a tile, a folder of tiles, a large image or a slide to nucleus outputs.

Modules, in the order imports point (each uses only those before it; pixel sizes and the resize to model scale are
:mod:`bundle.data.scale`, shared with training):

- :mod:`~bundle.inference.colour`: L*a*b*, Reinhard, whole-image statistics;
- :mod:`~bundle.inference.sources`: images read region by region;
- :mod:`~bundle.inference.chunks`: chunk geometry, resampling, the sliding-window network pass;
- :mod:`~bundle.inference.blocks`: nuclei from the maps, block by block, each nucleus owned once;
- :mod:`~bundle.inference.writers`: per-image output files, written block by block;
- :mod:`~bundle.inference.pipeline`: one image through all of the above;
- :mod:`~bundle.inference.slide`: slides (OpenSlide / tifffile levels) into one GeoJSON;
- :mod:`~bundle.inference.files`: which tiles a run has, the output folder, resume markers;
- :mod:`~bundle.inference.engine`: :class:`NucleiSegmenter`, the run both front ends call.
"""
