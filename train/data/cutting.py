"""Every kept spot's patch and each section's slide stain, section by section, on threads.

A flat slide image (JPEG/PNG) is decoded in full before its first patch (~0.5 s for a
92-megapixel HER2ST JPEG), then each patch is cut and resampled. Pillow releases the GIL
while it decodes and resamples, so threads overlap that work with each other and with the
caller's own (parsing the next section's counts, choosing genes, writing HDF5).

:class:`SectionCutter` keeps at most ``threads`` sections' images decoded at once:
:meth:`~SectionCutter.warm` starts decoding the first sections as soon as they are read
(before the spot filters and the gene plan exist); :meth:`~SectionCutter.cut` yields each
section's patches in order, ``threads`` sections in flight. The thread that cuts a section
also estimates its slide stain (:func:`~brst.train.data.slide_stain.section_stain`, ~0.1 s per
section), so the estimate overlaps the caller's writing instead of adding to it.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from brst.handlers.geometry import PatchGeometry
from brst.train.sources.open import DecodedImage
from brst.train.sources.slide_image import SlideImage

from .patches import cut_patch
from .readers.base import Section


def default_threads() -> int:
    """Two threads where there are two CPUs to run them (the decode of one section and the cut of
    another), else one."""
    return min(2, os.cpu_count() or 1)


def cut_section(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray, side_px: float,
                patch_px: int) -> np.ndarray:
    """uint8 ``(n, P, P, 3)`` patches of one section; the image is decoded once, then released."""
    try:
        patches = np.empty((len(pixel_x), patch_px, patch_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(zip(pixel_x, pixel_y)):
            patches[i] = cut_patch(image, x, y, side_px, patch_px)
        return patches
    finally:
        image.close()


class CutSection(NamedTuple):
    """One section as :meth:`SectionCutter.cut` hands it on.

    Attributes:
        patches: uint8 ``(n, P, P, 3)``, one per spot.
        stain: :func:`~brst.train.data.slide_stain.section_stain` of ``patches``.
    """

    patches: np.ndarray
    stain: dict[str, dict | None]


def cut_and_estimate(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray, side_px: float,
                     patch_px: int) -> CutSection:
    """:func:`cut_section`, then the section's slide stain over its patches, on the calling thread."""
    from .slide_stain import section_stain  # torch: not loaded by the commands that only read files

    patches = cut_section(image, pixel_x, pixel_y, side_px, patch_px)
    return CutSection(patches, section_stain(patches))


def _decode(image: SlideImage, side_px: float, patch_px: int) -> None:
    """Decode a flat image now (and keep it) at the scale its patches need; slides read by region need nothing."""
    if isinstance(image, DecodedImage):
        image.pixels(image.reduction_for(side_px, patch_px))


class SectionCutter:
    """Patches of sections at ``geometry``, ``threads`` sections decoded and cut at once.

    Use as a context manager (the threads stop on exit, also after an error).
    """

    def __init__(self, geometry: PatchGeometry, threads: int) -> None:
        self.geometry = geometry
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cut") if self.threads > 1 else None
        self._warmed = 0

    def __enter__(self) -> "SectionCutter":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def warm(self, section: Section) -> None:
        """Start decoding ``section``'s image on a thread (only the first ``threads`` sections: memory
        stays bounded; the others are decoded when :meth:`cut` reaches them)."""
        if self._pool is None or self._warmed >= self.threads:
            return
        self._warmed += 1
        self._pool.submit(_decode, section.image, self.geometry.side_px(section.um_per_px), self.geometry.patch_px)

    def _args(self, section: Section) -> tuple:
        return (section.image, section.pixel_x, section.pixel_y, self.geometry.side_px(section.um_per_px),
                self.geometry.patch_px)

    def cut(self, sections: Iterable[Section]) -> Iterator[CutSection]:
        """Each section's patches, uint8 ``(n_i, P, P, 3)`` (``n_i`` its spots), and slide stain, in order.

        While the caller handles one section, ``threads`` more are being cut and estimated. An
        error on a thread is raised here, when its section's turn comes.
        """
        if self._pool is None:
            yield from (cut_and_estimate(*self._args(section)) for section in sections)
            return
        pending: collections.deque[Future] = collections.deque()
        for section in sections:
            pending.append(self._pool.submit(cut_and_estimate, *self._args(section)))
            if len(pending) > self.threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
