"""Each section's stain, estimated once over its tissue, stored with the patches and looked up per spot.

A slide-scope stain normaliser (:mod:`brst.handlers.stain.base`) maps every patch of a slide
with that slide's source statistics: the median of per-tile statistics over the slide's tissue
tiles (:meth:`~brst.handlers.stain.base.StainNormalizer.slide_statistics`). ``prepare``
estimates them for every method with its default parameters over the section's spot patches
(each spot is a tissue tile; at most :data:`SAMPLE_TILES`, evenly spread) and stores them in the
file's ``slide_stain`` attribute (schema 2,
docs/CONTRACTS.md). A run whose normaliser has other parameters, or a schema-1 file, gets them
estimated from the same patches when the run starts.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from brst.handlers.errors import BrstError
from brst.handlers.stain import METHODS, StainNormalizer, make_stain, statistics_from_dict

from .schema import SLIDE_STAIN_ATTR

log = logging.getLogger(__name__)

#: methods whose slide statistics ``prepare`` stores
STORED_METHODS = tuple(name for name in METHODS if name != "none")
#: a section's stain is the median over at most this many of its spot patches, evenly spread
#: (a robust median needs no more, and ``prepare`` pays for every one)
SAMPLE_TILES = 64


def sample_rows(n: int) -> np.ndarray:
    """Positions of at most :data:`SAMPLE_TILES` of ``n`` tiles, evenly spread. Shape: -> ``(k,)`` int64."""
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_TILES)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def estimate(module: StainNormalizer, patches: np.ndarray) -> torch.Tensor:
    """A section's source statistics ``(K,)`` float64 over :func:`sample_rows` of its patches ``(n, P, P, 3)``."""
    return module.slide_statistics(patches[sample_rows(len(patches))])


def section_stain(patches: np.ndarray) -> dict[str, dict | None]:
    """Slide statistics of one section for every stored method (None where no tile has tissue).

    Shape: patches uint8 ``(n, P, P, 3)`` -> ``{method: named fields}``.
    """
    stains = {}
    for method in STORED_METHODS:
        module = make_stain(method)
        try:
            stains[method] = module.statistics_dict(estimate(module, patches))
        except BrstError:
            stains[method] = None
    return stains


def stain_attribute(sections: dict[str, dict[str, dict | None]]) -> str:
    """The ``slide_stain`` attribute (JSON) for ``{section: section_stain(...)}``."""
    params = {method: make_stain(method).params for method in STORED_METHODS}
    return json.dumps({"params": params, "sections": sections}, sort_keys=True)


def stored_stain(attrs: dict) -> dict:
    """A file's ``slide_stain`` attribute (``{"params": {method: params}, "sections": {section:
    {method: fields}}}``) as a dict; empty for schema-1 files."""
    raw = attrs.get(SLIDE_STAIN_ATTR)
    return json.loads(raw) if raw else {}


def _section_statistics(index, section: str, module: StainNormalizer, stored: dict) -> torch.Tensor:
    """``(K,)`` float32 source statistics of one section: stored when their parameters match, else estimated."""
    fields = stored.get("sections", {}).get(section, {}).get(module.method)
    if fields is not None and stored.get("params", {}).get(module.method) == module.params:
        return statistics_from_dict(module, fields, f"section {section} slide stain").float()
    spots = np.flatnonzero(index.spots["section"] == section)
    log.info("estimating the %s stain of section %s over its spot patches", module.method, section)
    try:
        return module.slide_statistics(index.patches(spots[sample_rows(len(spots))])).float()
    except BrstError as err:
        raise BrstError(f"section {section}", f"no slide stain: {err.problem}") from None


def slide_stain_table(index, module: StainNormalizer) -> torch.Tensor | None:
    """Each spot's slide statistics for ``module``, or None when it is not slide-scope.

    Shape: ``(N, K)`` float32 on the CPU, row ``i`` for spot ``i`` of ``index``.
    """
    if not module.uses_slide_statistics:
        return None
    table = torch.empty(len(index), module.n_statistics, dtype=torch.float32)
    sections = index.spots["section"]
    for file_index in range(len(index.files)):
        stored = stored_stain(index.file_attrs[file_index])
        in_file = index.spots["file_index"] == file_index
        for section in np.unique(sections[in_file]):
            rows = np.flatnonzero(in_file & (sections == section))
            table[rows] = _section_statistics(index, str(section), module, stored)
    return table
