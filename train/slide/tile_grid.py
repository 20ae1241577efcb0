"""A grid of tile centres over a slide's tissue, in physical units.

The tissue is :func:`brst.handlers.tissue.slide_tissue_mask` of the slide's thumbnail. Tile
centres lie on a square grid of ``step_um`` through a given origin (by default half a step from
the image's top-left corner; a measured section's spots when there is one), so the same slide
gives the same grid whatever the thumbnail size; a centre is kept when its whole tile is inside
the image and at least ``min_tissue`` of the tile is tissue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brst.handlers.errors import BrstError
from brst.handlers.tissue import TissueMask, box_tissue_fraction, slide_tissue_mask


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
        tile_um: side of the square each tile covers (the model's ``patch_um``).
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
    half = tile_px / 2 + 1  # a pixel of margin: a tile's patch box is centred on pixel centres (+0.5)
    inside = ((centre_x - half >= 0) & (centre_x + half <= width_px)
              & (centre_y - half >= 0) & (centre_y + half <= height_px))
    col, row, centre_x, centre_y = col[inside], row[inside], centre_x[inside], centre_y[inside]
    thumb_h, thumb_w = tissue.mask.shape

    def to_thumb(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.rint(values * tissue.thumb_px_per_slide_px).astype(np.int64), 0, limit)

    fraction = box_tissue_fraction(tissue.mask, to_thumb(centre_x - half, thumb_w), to_thumb(centre_y - half, thumb_h),
                          to_thumb(centre_x + half, thumb_w), to_thumb(centre_y + half, thumb_h))
    keep = fraction >= min_tissue
    return TileGrid(pixel_x=centre_x[keep], pixel_y=centre_y[keep], col=col[keep].astype(np.int64),
                    row=row[keep].astype(np.int64), tissue_fraction=fraction[keep],
                    step_px=float(step_px), tile_px=float(tile_px))


def find_tiles(thumbnail: np.ndarray, thumb_px_per_slide_px: float, width_px: int, height_px: int, um_per_px: float,
               step_um: float, tile_um: float, slide_name: str,
               origin_px: tuple[float, float] | None = None) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and tile grid of one slide; a slide with no tissue tile is a :class:`BrstError`."""
    tissue = slide_tissue_mask(thumbnail, thumb_px_per_slide_px, um_per_px)
    grid = tile_grid(tissue, width_px, height_px, um_per_px, step_um, tile_um, origin_px=origin_px)
    if len(grid) == 0:
        raise BrstError(slide_name, f"no tissue found (tissue covers {tissue.fraction:.1%} of the "
                                    f"thumbnail; no {tile_um:g} um tile is half tissue)")
    return tissue, grid
