"""The slide's µm/px, and the model's patch of each tile, streamed in bounded batches.

A tile is a square of the slide, ``patch_um`` micrometres centred on a grid point; its patch
is the pixel array the model sees, the tile resampled to ``patch_px`` pixels (``um_per_px`` of
the training patches), whatever the slide's own resolution. Patches are read by region through
the slide's image handle (:mod:`brst.train.sources.open`), a few batches ahead on worker threads
(:mod:`brst.train.slide.reading`), so at most ``prefetch + 1`` batches are in memory besides what
the handle itself keeps (a JPEG/PNG is decoded once; a pyramidal TIFF, OpenSlide or DICOM slide is
only ever read region by region).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.train.data.patches import cut_patch
from brst.train.sources.slide_image import SlideImage

from .reading import BatchReader

#: A resolution read from metadata is believed only inside this range (µm per pixel):
#: JPEG/PNG "72 dpi" headers (353 µm/px) are not a microscope's.
PLAUSIBLE_UM_PER_PX = (0.05, 20.0)


def metadata_um_per_px(image: SlideImage) -> float | None:
    """The slide's µm/px from its metadata (the handle's ``um_per_px``), or ``None`` when absent or implausible."""
    value = image.um_per_px
    low, high = PLAUSIBLE_UM_PER_PX
    return value if value is not None and low <= value <= high else None


def slide_um_per_px(image: SlideImage, given: float | None) -> float:
    """``given`` if set, else the metadata's; neither is a :class:`BrstError` asking for ``--um-per-px``."""
    if given is not None:
        return float(given)
    found = metadata_um_per_px(image)
    if found is None:
        raise BrstError(image.path, "its metadata gives no microscope resolution; pass --um-per-px "
                                    "(HER2ST images: 0.69, see the dataset's README)")
    return found


def read_patches(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray, side_px: float,
                 patch_px: int) -> np.ndarray:
    """The patches of the tiles of ``side_px`` slide pixels centred on the points, resampled to ``patch_px``.

    Shape: pixel_x, pixel_y (n,) -> uint8 (n, patch_px, patch_px, 3).
    """
    out = np.empty((len(pixel_x), patch_px, patch_px, 3), dtype=np.uint8)
    for i, (x_px, y_px) in enumerate(zip(pixel_x, pixel_y)):
        out[i] = cut_patch(image, float(x_px), float(y_px), side_px, patch_px)
    return out


def patch_batch_reader(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray,
                       slide_um_per_px: float, geometry: PatchGeometry, batch_size: int,
                       workers: int = 2, prefetch: int = 2) -> BatchReader:
    """A :class:`~brst.train.slide.reading.BatchReader` of model patches at the points, in order,
    reading from now on, ``prefetch`` batches ahead (0: each batch when asked for, in the caller's thread).

    Args:
        image: the slide's handle (reads by region).
        pixel_x, pixel_y: ``(N,)`` tile centres in slide pixels.
        slide_um_per_px: the slide's resolution.
        geometry: the model's patch geometry.
        batch_size: patches per batch.
        workers: reading threads.
        prefetch: batches read ahead of the consumer (memory bound).

    Yields (iterated): uint8 ``(b, patch_px, patch_px, 3)``, ``b <= batch_size``.
    """
    side_px = geometry.side_px(slide_um_per_px)

    def batch(index: int) -> np.ndarray:
        start = index * batch_size
        stop = start + batch_size
        return read_patches(image, pixel_x[start:stop], pixel_y[start:stop], side_px, geometry.patch_px)

    return BatchReader(batch, -(-len(pixel_x) // batch_size), workers=workers, depth=prefetch)


def iter_patch_batches(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray,
                       slide_um_per_px: float, geometry: PatchGeometry, batch_size: int,
                       workers: int = 2, prefetch: int = 2) -> Iterator[np.ndarray]:
    """:func:`patch_batch_reader`'s batches as a generator that closes the reader when it ends.

    Yields: uint8 ``(b, patch_px, patch_px, 3)``, ``b <= batch_size``.
    """
    with patch_batch_reader(image, pixel_x, pixel_y, slide_um_per_px, geometry, batch_size, workers,
                            prefetch) as reader:
        yield from reader
