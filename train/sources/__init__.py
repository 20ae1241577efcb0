"""Slide sources: the pixels of one slide file, folder or DICOMweb series, read by region.

:func:`~brst.train.sources.open.open_image` picks the handle for a source; every handle is a
:class:`~brst.train.sources.slide_image.SlideImage`. The pyramidal ones (TIFF, OpenSlide,
DICOM) subclass :class:`~brst.train.sources.pyramid.PyramidImage`. Dataset formats (spots,
counts and a slide) are :mod:`brst.train.data.readers`, which open their slides here.
"""
