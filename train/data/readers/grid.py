"""The legacy ST array grid (HER2ST, ST-Net): spot keys and the pixel size they imply.

ST arrays (Ståhl et al. 2016) place 100 µm spots on a grid with 200 µm between centres,
so a straight-line fit of pixel coordinates on array coordinates gives the image's
micrometres per pixel without any scanner metadata.
"""
from __future__ import annotations

import numpy as np

from brst.handlers.errors import BrstError

ST_PITCH_UM = 200.0
ST_SPOT_DIAMETER_UM = 100.0


def spot_keys(array_x: np.ndarray, array_y: np.ndarray) -> np.ndarray:
    """``(N,)`` str keys ``"{x}x{y}"`` of integer array coordinates, as in ST counts tables."""
    return np.array([f"{int(round(x))}x{int(round(y))}" for x, y in zip(array_x, array_y)], dtype=object)


def parse_keys(keys: np.ndarray, subject: object) -> tuple[np.ndarray, np.ndarray]:
    """Split ``"{x}x{y}"`` keys into float64 array coordinates ``(N,)``, ``(N,)``."""
    try:
        pairs = np.array([str(key).split("x") for key in keys], dtype=np.float64)
    except ValueError:
        raise BrstError(subject, 'spot ids are not "{x}x{y}" array coordinates') from None
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise BrstError(subject, 'spot ids are not "{x}x{y}" array coordinates')
    return pairs[:, 0], pairs[:, 1]


def grid_um_per_px(array_x: np.ndarray, array_y: np.ndarray, pixel_x: np.ndarray, pixel_y: np.ndarray,
                   subject: object, pitch_um: float = ST_PITCH_UM) -> float:
    """Micrometres per image pixel from a least-squares fit of pixels on array coordinates.

    Args:
        array_x, array_y: ``(N,)`` grid coordinates (one step = ``pitch_um``).
        pixel_x, pixel_y: ``(N,)`` spot centres in image pixels.
        subject: named in the error when the spots do not span the grid.

    Returns:
        ``pitch_um`` divided by the mean length of one grid step in pixels.
    """
    design = np.column_stack([array_x, array_y, np.ones_like(array_x)])
    if len(array_x) < 3 or np.linalg.matrix_rank(design) < 3:
        raise BrstError(subject, "too few spots spread over the array to measure the pixel size")
    coef_x, *_ = np.linalg.lstsq(design, pixel_x, rcond=None)
    coef_y, *_ = np.linalg.lstsq(design, pixel_y, rcond=None)
    jacobian = np.array([coef_x[:2], coef_y[:2]])
    step_px = float(np.mean(np.linalg.norm(jacobian, axis=0)))
    if not step_px > 0:
        raise BrstError(subject, "spot pixel coordinates do not follow the array grid")
    return pitch_um / step_px
