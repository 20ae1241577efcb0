"""What counts as tissue: one definition per input, and the tissue fraction under boxes.

Three masks, because they answer three questions on three kinds of input:

- :func:`stain_tissue_mask` (per pixel of a patch, on the device): which pixels a stain
  normaliser estimates its statistics from. Macenko's reference (and torchstain) keep pixels
  whose optical density is at least ``beta`` in every channel; changing the rule would change
  every stain reference and served value. :func:`enough_tissue` says which patches have enough
  of those pixels to be normalised at all.
- :func:`spot_tissue_mask` (a measured section's thumbnail): which spot patches ``prepare
  --otsu`` keeps. The BrST-Net paper's rule, Otsu's threshold on grey levels: on a section cut
  to the array, tissue and glass are the two classes.
- :func:`slide_tissue_mask` (a whole slide's thumbnail): where ``predict-slide`` lays its tiles.
  A whole slide also holds large glass areas, pen marks, dust and dark borders, which grey levels
  would count as tissue; stained tissue is coloured, so Otsu runs on the smoothed HSV saturation
  (never below a floor, so a blank slide finds nothing), holes are filled and specks dropped.

Both thumbnail masks share :func:`otsu_threshold`, and both fractions "share of a box that is
tissue" (a spot's patch, a grid tile) are :func:`box_tissue_fraction`; each caller chooses how
its boxes round to thumbnail pixels. scipy is imported only for :func:`slide_tissue_mask`: the
serving worker needs the stain mask, never a slide's, and starts without scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Saturation below this is never slide tissue (white, grey or black), whatever Otsu says.
MIN_SATURATION = 0.05
#: Gaussian smoothing of the saturation before thresholding (fills stroma gaps), micrometres.
SMOOTH_UM = 30.0
#: Connected tissue pieces smaller than this are dropped (dust, debris), square micrometres.
MIN_PIECE_UM2 = 40_000.0


def stain_tissue_mask(od: torch.Tensor, beta: float) -> torch.Tensor:
    """Pixels whose optical density is at least ``beta`` in every channel (not background).

    Shape: ``(B, 3, N)`` -> ``(B, N)`` bool.
    """
    return od.amin(dim=1) >= beta  # 5-10x faster than (od >= beta).all(dim=1) on the CPU


def enough_tissue(tissue: torch.Tensor, min_tissue: float, min_px: int = 16) -> torch.Tensor:
    """True for patches with at least a ``min_tissue`` fraction (and ``min_px``) of tissue pixels.

    Shape: ``(B, N)`` -> ``(B,)`` bool.
    """
    needed = max(min_px, math.ceil(min_tissue * tissue.shape[-1]))
    return tissue.sum(dim=-1) >= needed


def otsu_threshold(grey: np.ndarray) -> float:
    """Otsu's threshold of uint8 grey values (any shape): maximises between-class variance.

    A constant image has one class only: its value is returned (nothing is darker than it).
    """
    histogram = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(histogram)
    total = weight[-1]
    mass = np.cumsum(histogram * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass / weight
        mean_high = (mass[-1] - mass) / (total - weight)
        between = weight * (total - weight) * (mean_low - mean_high) ** 2
    between = between[:-1]
    if np.isnan(between).all():
        return float(grey.flat[0]) if grey.size else 0.0
    return float(np.nanargmax(between))


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB uint8 ``(..., 3)`` -> uint8 ``(...)``."""
    return (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)


def spot_tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Pixels darker than the thumbnail's Otsu threshold on grey levels (``prepare --otsu``).

    Shape: ``(h, w, 3)`` uint8 RGB -> ``(h, w)`` bool.
    """
    grey = to_grey(thumbnail)
    return grey < otsu_threshold(grey)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of RGB pixels.

    Shape: ``(h, w, 3)`` uint8 -> ``(h, w)`` float32 in [0, 1] (0 where the pixel is black).
    """
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class TissueMask:
    """Where a slide's tissue is, at thumbnail resolution.

    Attributes:
        mask: ``(h, w)`` bool, True on tissue.
        thumbnail: ``(h, w, 3)`` uint8 RGB thumbnail the mask was computed on.
        thumb_px_per_slide_px: thumbnail pixels per slide pixel.
        threshold: the saturation threshold used.
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    thumb_px_per_slide_px: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the thumbnail that is tissue."""
        return float(self.mask.mean())


def slide_tissue_mask(thumbnail: np.ndarray, thumb_px_per_slide_px: float, um_per_px: float,
                      min_saturation: float = MIN_SATURATION) -> TissueMask:
    """Tissue of a whole slide's thumbnail: Otsu on smoothed saturation, holes filled, specks dropped.

    Args:
        thumbnail: ``(h, w, 3)`` uint8 RGB.
        thumb_px_per_slide_px: thumbnail pixels per slide pixel.
        um_per_px: micrometres per slide pixel.
        min_saturation: floor of the threshold (a blank slide has no tissue).
    """
    from scipy import ndimage

    thumb_um_per_px = um_per_px / thumb_px_per_slide_px
    smooth = ndimage.gaussian_filter(saturation(thumbnail), sigma=SMOOTH_UM / thumb_um_per_px)
    if smooth.max() <= min_saturation:  # nothing coloured at all: a blank slide
        return TissueMask(mask=np.zeros(smooth.shape, bool), thumbnail=thumbnail,
                          thumb_px_per_slide_px=float(thumb_px_per_slide_px), threshold=min_saturation)
    threshold = max(otsu_threshold(np.rint(smooth * 255).astype(np.uint8)) / 255, min_saturation)
    mask = ndimage.binary_fill_holes(smooth > threshold)
    mask = _drop_small_pieces(mask, MIN_PIECE_UM2 / thumb_um_per_px**2)
    return TissueMask(mask=mask, thumbnail=thumbnail, thumb_px_per_slide_px=float(thumb_px_per_slide_px),
                      threshold=threshold)


def _drop_small_pieces(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage

    labels, n_pieces = ndimage.label(mask)
    if n_pieces == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def box_tissue_fraction(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
                        y1: np.ndarray) -> np.ndarray:
    """Share of ``mask`` that is True in each box ``[x0, x1) x [y0, y1)``, via an integral image.

    Bounds are integer mask pixels inside ``[0, w] x [0, h]`` with ``x0 <= x1``, ``y0 <= y1``;
    an empty box gives 0.

    Shape: ``(h, w)`` mask, ``(N,)`` bounds -> ``(N,)`` float64 in [0, 1].
    """
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area
