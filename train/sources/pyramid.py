"""What every pyramidal slide handle shares: pick the best level, read a region of it, resample.

A pyramid is level 0 (full resolution) and coarser copies of it. :class:`PyramidImage` turns
one primitive, "read this box of level *k*" (:meth:`PyramidImage._read`), into the
:class:`~brst.train.sources.slide_image.SlideImage` calls: a patch is read from the coarsest
level that is still at least as fine as the patch asks for, with a two-pixel margin, and
resampled sub-pixel exactly; a thumbnail from the smallest level at least as large as asked,
read region by region when that level is large (a one-level 60000 x 60000 slide is never held
whole: at most :data:`THUMBNAIL_READ_PX` level pixels at a time).
TIFF (tifffile), OpenSlide and DICOM handles subclass it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR
#: level pixels read around a resampled box, so bilinear weights at its edge see real pixels
MARGIN_PX = 2
#: most level pixels a thumbnail reads at once (16 megapixels: 48 MB of RGB)
THUMBNAIL_READ_PX = 1 << 24


def resample_array(region: np.ndarray, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
    """Resample the float ``box`` (in ``region`` pixels) of an RGB array to ``(out_px, out_px, 3)`` uint8."""
    return np.asarray(Image.fromarray(region).resize((out_px, out_px), RESAMPLE, box=box))


def fit_thumbnail(pixels: Image.Image, width: int, max_px: int) -> tuple[np.ndarray, float]:
    """Shrink ``pixels`` so its longer side is ``max_px``; scale is relative to ``width``.

    Returns: RGB uint8 ``(h, w, 3)`` and thumbnail px per level-0 px.
    """
    scale = max_px / max(pixels.size)
    size = (max(1, round(pixels.width * scale)), max(1, round(pixels.height * scale)))
    thumb = pixels.resize(size, Image.Resampling.BOX) if scale < 1 else pixels
    return np.asarray(thumb.convert("RGB")), thumb.width / width


class PyramidImage:
    """Base of the pyramidal handles; a subclass sets the attributes and implements :meth:`_read`.

    Attributes:
        path: the source as shown in messages (file, folder or URL without credentials).
        width, height: level-0 size in pixels.
        level_sizes: ``[(width, height)]`` of each level, level 0 first.
        downsamples: level-0 pixels per level pixel, ascending (``downsamples[0] == 1``).
        um_per_px: level-0 micrometres per pixel from the slide's metadata, or ``None``.
    """

    path: str
    width: int
    height: int
    level_sizes: list[tuple[int, int]]
    downsamples: list[float]
    um_per_px: float | None

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB uint8 ``(y1 - y0, x1 - x0, 3)`` of level ``level``'s box (inside the level)."""
        raise NotImplementedError

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of the full-resolution box at (x0, y0)."""
        return self._read(0, x0, y0, x0 + width, y0 + height)

    def best_level(self, level0_px_per_out_px: float) -> int:
        """The coarsest level whose downsample is at most ``level0_px_per_out_px`` (0 when upsampling)."""
        return max(i for i, d in enumerate(self.downsamples) if d <= max(level0_px_per_out_px, 1.0))

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """The float ``box`` (level-0 pixels) resampled to ``(out_px, out_px, 3)`` uint8, from the best level."""
        level = self.best_level((box[2] - box[0]) / out_px)
        d = self.downsamples[level]
        level_width, level_height = self.level_sizes[level]
        x0, y0 = max(0, math.floor(box[0] / d) - MARGIN_PX), max(0, math.floor(box[1] / d) - MARGIN_PX)
        x1 = min(level_width, math.ceil(box[2] / d) + MARGIN_PX)
        y1 = min(level_height, math.ceil(box[3] / d) + MARGIN_PX)
        region = self._read(level, x0, y0, x1, y1)
        local = (box[0] / d - x0, box[1] / d - y0, box[2] / d - x0, box[3] / d - y0)
        return resample_array(region, local, out_px)

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail ``(h, w, 3)`` with longer side ``max_px``, from the smallest sufficient level.

        A level larger than :data:`THUMBNAIL_READ_PX` is shrunk tile by tile (:meth:`_thumbnail_by_tiles`).
        """
        sizes = [max(self.width, self.height) / d for d in self.downsamples]
        level = max(i for i, size in enumerate(sizes) if size >= max_px or i == 0)
        level_width, level_height = self.level_sizes[level]
        if level_width * level_height > THUMBNAIL_READ_PX:
            return self._thumbnail_by_tiles(level, max_px)
        pixels = Image.fromarray(self._read(level, 0, 0, level_width, level_height))
        return fit_thumbnail(pixels, self.width, max_px)

    def _thumbnail_by_tiles(self, level: int, max_px: int) -> tuple[np.ndarray, float]:
        """What :func:`fit_thumbnail` makes of the whole level, built from regions of at most
        :data:`THUMBNAIL_READ_PX` level pixels, each box-filtered into its part of the thumbnail."""
        level_width, level_height = self.level_sizes[level]
        scale = min(max_px / max(level_width, level_height), 1.0)
        out_width, out_height = max(1, round(level_width * scale)), max(1, round(level_height * scale))
        x_scale, y_scale = out_width / level_width, out_height / level_height  # thumbnail px per level px
        read_side = math.isqrt(THUMBNAIL_READ_PX) - 2  # a read covers the tile's box plus a partial pixel each side
        tile_px = max(1, math.floor(read_side * min(x_scale, y_scale)))
        thumb = np.empty((out_height, out_width, 3), np.uint8)
        for top in range(0, out_height, tile_px):
            for left in range(0, out_width, tile_px):
                right, bottom = min(left + tile_px, out_width), min(top + tile_px, out_height)
                box = (left / x_scale, top / y_scale, right / x_scale, bottom / y_scale)  # level pixels
                x0, y0 = math.floor(box[0]), math.floor(box[1])
                x1, y1 = min(level_width, math.ceil(box[2])), min(level_height, math.ceil(box[3]))
                region = Image.fromarray(self._read(level, x0, y0, x1, y1))
                local = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
                thumb[top:bottom, left:right] = np.asarray(
                    region.resize((right - left, bottom - top), Image.Resampling.BOX, box=local))
        return thumb, out_width / self.width
