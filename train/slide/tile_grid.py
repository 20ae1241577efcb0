"""Tissue on a slide thumbnail, and a grid of tile centres over it in physical units.

The mask is Otsu's threshold on the smoothed HSV saturation of the thumbnail (stained
tissue is coloured, glass and background are grey or white), never below a floor so that
a blank slide finds nothing; holes are filled and specks removed. Tile centres lie on a
square grid of ``step_um`` through a given origin (by default half a step from the image's
top-left corner; a measured section's spots when there is one), so the same slide gives
the same grid whatever the thumbnail size; a centre is kept when its whole tile is
inside the image and at least ``min_tissue`` of the tile is tissue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brst.handlers.errors import BrstError
from brst.train.data.tissue import otsu_threshold

#: Saturation below this is never tissue (white, grey or black), whatever Otsu says.
MIN_SATURATION = 0.05
#: Gaussian smoothing of the saturation before thresholding (fills stroma gaps), micrometres.
SMOOTH_UM = 30.0
#: Connected tissue pieces smaller than this are dropped (dust, debris), square micrometres.
MIN_PIECE_UM2 = 40_000.0


@dataclass(frozen=True)
class TissueMask:
    """Where the tissue is, at thumbnail scale.

    Attributes:
        mask: ``(h, w)`` bool, True on tissue.
        thumbnail: ``(h, w, 3)`` uint8 RGB thumbnail the mask was computed on.
        scale: thumbnail pixels per slide pixel.
        threshold: the saturation threshold used.
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    scale: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the thumbnail that is tissue."""
        return float(self.mask.mean())


@dataclass(frozen=True)
class TileGrid:
    """Tile centres on tissue, in slide pixels, with their grid indices.

    Attributes:
        pixel_x: ``(N,)`` float64 centre column in slide pixels.
        pixel_y: ``(N,)`` float64 centre row in slide pixels.
        col: ``(N,)`` int64 grid column (``pixel_x = x_first + col * step_px``).
        row: ``(N,)`` int64 grid row.
        tissue_fraction: ``(N,)`` float64 share of the tile that is tissue.
        step_px: grid step in slide pixels.
        tile_px: tile side in slide pixels.
    """

    pixel_x: np.ndarray
    pixel_y: np.ndarray
    col: np.ndarray
    row: np.ndarray
    tissue_fraction: np.ndarray
    step_px: float
    tile_px: float

    def __len__(self) -> int:
        return int(self.pixel_x.shape[0])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of RGB pixels.

    Shape: ``(h, w, 3)`` uint8 -> ``(h, w)`` float32 in [0, 1] (0 where the pixel is black).
    """
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def _drop_small_pieces(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n_pieces = ndimage.label(mask)
    if n_pieces == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def detect_tissue(thumbnail: np.ndarray, scale: float, um_per_px: float,
                  min_saturation: float = MIN_SATURATION) -> TissueMask:
    """Tissue mask of a slide thumbnail.

    Args:
        thumbnail: ``(h, w, 3)`` uint8 RGB.
        scale: thumbnail pixels per slide pixel.
        um_per_px: micrometres per slide pixel.
        min_saturation: floor of the threshold (a blank slide has no tissue).
    """
    thumb_um_per_px = um_per_px / scale
    smooth = ndimage.gaussian_filter(saturation(thumbnail), sigma=SMOOTH_UM / thumb_um_per_px)
    if smooth.max() <= min_saturation:  # nothing coloured at all: a blank slide
        return TissueMask(mask=np.zeros(smooth.shape, bool), thumbnail=thumbnail, scale=float(scale),
                          threshold=min_saturation)
    threshold = max(otsu_threshold(np.rint(smooth * 255).astype(np.uint8)) / 255, min_saturation)
    mask = ndimage.binary_fill_holes(smooth > threshold)
    mask = _drop_small_pieces(mask, MIN_PIECE_UM2 / thumb_um_per_px**2)
    return TissueMask(mask=mask, thumbnail=thumbnail, scale=float(scale), threshold=threshold)


def _box_means(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
               y1: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over boxes ``[x0, x1) x [y0, y1)`` (integer thumbnail pixels), via an integral image."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


def _grid_positions(origin_px: float, step_px: float, extent_px: int) -> np.ndarray:
    """Positions ``origin + k * step`` inside ``[0, extent)``, ascending."""
    first = np.ceil(-origin_px / step_px)
    last = np.floor((extent_px - origin_px) / step_px)
    return origin_px + np.arange(first, last + 1) * step_px


def tile_grid(tissue: TissueMask, width_px: int, height_px: int, um_per_px: float,
              step_um: float, tile_um: float, min_tissue: float = 0.5,
              origin_px: tuple[float, float] | None = None) -> TileGrid:
    """Grid centres every ``step_um`` whose ``tile_um`` square is inside the slide and on tissue.

    Args:
        tissue: the slide's tissue mask.
        width_px, height_px: slide size in pixels.
        um_per_px: micrometres per slide pixel.
        step_um: grid step (200 ST pitch, 100 Visium, or denser).
        tile_um: side of the square each tile covers (the model's patch).
        min_tissue: least share of a tile that must be tissue.
        origin_px: ``(x, y)`` a point the grid passes through (e.g. a measured spot);
            default half a step from the top-left corner.
    """
    step_px = step_um / um_per_px
    tile_px = tile_um / um_per_px
    origin_x, origin_y = origin_px if origin_px is not None else (step_px / 2, step_px / 2)
    xs = _grid_positions(origin_x, step_px, width_px)
    ys = _grid_positions(origin_y, step_px, height_px)
    col, row = (a.ravel() for a in np.meshgrid(np.arange(xs.size), np.arange(ys.size)))
    centre_x, centre_y = xs[col], ys[row]
    half = tile_px / 2 + 1  # a pixel of margin: patch boxes are centred on pixel centres (+0.5)
    inside = ((centre_x - half >= 0) & (centre_x + half <= width_px)
              & (centre_y - half >= 0) & (centre_y + half <= height_px))
    col, row, centre_x, centre_y = col[inside], row[inside], centre_x[inside], centre_y[inside]
    thumb_h, thumb_w = tissue.mask.shape

    def to_thumb(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.rint(values * tissue.scale).astype(np.int64), 0, limit)

    fraction = _box_means(tissue.mask, to_thumb(centre_x - half, thumb_w), to_thumb(centre_y - half, thumb_h),
                          to_thumb(centre_x + half, thumb_w), to_thumb(centre_y + half, thumb_h))
    keep = fraction >= min_tissue
    return TileGrid(pixel_x=centre_x[keep], pixel_y=centre_y[keep], col=col[keep].astype(np.int64),
                    row=row[keep].astype(np.int64), tissue_fraction=fraction[keep],
                    step_px=float(step_px), tile_px=float(tile_px))


def find_tiles(thumbnail: np.ndarray, scale: float, width_px: int, height_px: int, um_per_px: float,
               step_um: float, tile_um: float, slide_name: str,
               origin_px: tuple[float, float] | None = None) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and tile grid of one slide; a slide with no tissue tile is a :class:`BrstError`."""
    tissue = detect_tissue(thumbnail, scale, um_per_px)
    grid = tile_grid(tissue, width_px, height_px, um_per_px, step_um, tile_um, origin_px=origin_px)
    if len(grid) == 0:
        raise BrstError(slide_name, f"no tissue found (tissue covers {tissue.fraction:.1%} of the "
                                    f"thumbnail; no {tile_um:g} um tile is half tissue)")
    return tissue, grid
