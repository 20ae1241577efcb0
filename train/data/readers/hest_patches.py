"""HEST-1k's own patches (``patches/<id>.h5``) as a sample's image when its WSI is not there.

HEST cuts one patch per spot (``hest.HESTData.dump_patches``)::

    img       (N, P, P, 3) uint8     P = 224 by default, at 0.5 µm/px (112 µm)
    barcode   (N, 1) bytes           the spot's obs name in st/<id>.h5ad
    coords    (N, 2) int             top-left corner (x, y) in full-resolution WSI pixels:
                                     spot centre - side // 2, side = the patch's WSI pixels

The side is HEST's default, ``P * 0.5 µm / (µm per WSI pixel)``, when the corners sit where it
puts them; else it is measured from the corners and the spot centres (twice their median
offset; a warning). A box can only be read from inside one patch (up to ``EDGE_TOLERANCE_PX``
past its edges, clamped: HEST's corners are whole pixels): ``prepare`` works up to the patches'
own field (``--patch-um 112`` for HEST's defaults), at any µm/px.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import scipy.spatial
from PIL import Image

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)

#: how far (in patch pixels) a box may reach past a patch edge (HEST rounds corners to whole pixels)
EDGE_TOLERANCE_PX = 2.5
#: HEST's default patch pixel size (``dump_patches(target_pixel_size=0.5)``)
HEST_PATCH_UM_PER_PX = 0.5


def read_patch_index(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Barcodes ``(N,)`` str, top-left corners ``(N, 2)`` float64 and the patch side P in pixels.

    Raises:
        BrstError: the file is missing, unreadable or lacks ``img``, ``barcode`` or ``coords``.
    """
    try:
        with h5py.File(path, "r") as handle:
            barcodes = np.asarray([b.decode() if isinstance(b, bytes) else str(b)
                                   for b in np.asarray(handle["barcode"][()]).reshape(-1)], dtype=object)
            coords = np.asarray(handle["coords"][()], dtype=np.float64).reshape(-1, 2)
            shape = handle["img"].shape
    except FileNotFoundError:
        raise BrstError(path, "file not found") from None
    except (OSError, KeyError, ValueError) as err:
        raise BrstError(path, f"not a HEST patches file with img, barcode, coords ({err})") from None
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or not len(barcodes) == len(coords) == shape[0]:
        raise BrstError(path, f"img {shape}, {len(barcodes)} barcodes and {len(coords)} coords do not agree")
    return barcodes, coords, int(shape[1])


class PatchesImage:
    """A sample's image made of HEST's spot patches (the SlideImage interface, WSI pixel coordinates).

    Args:
        path: ``patches/<id>.h5``.
        corners: ``(M, 2)`` top-left corners (x, y) of the patches used, in WSI pixels.
        rows: ``(M,)`` their rows in ``img``.
        side: WSI pixels one patch covers.
        patch_px: pixels of one stored patch (P).
    """

    def __init__(self, path: str | Path, corners: np.ndarray, rows: np.ndarray, side: float, patch_px: int) -> None:
        self.path = str(path)
        self.corners, self.rows, self.side, self.patch_px = corners, rows, float(side), int(patch_px)
        self.width = int(math.ceil(corners[:, 0].max() + side))
        self.height = int(math.ceil(corners[:, 1].max() + side))
        self._tree = scipy.spatial.cKDTree(corners + side / 2)
        self._handle: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def _patch(self, i: int) -> np.ndarray:
        if self._handle is None:
            self._handle = h5py.File(self.path, "r")
        return np.asarray(self._handle["img"][int(self.rows[i])])

    def _local_box(self, box: tuple[float, float, float, float]) -> tuple[int, tuple[float, ...]]:
        """The patch holding ``box`` (WSI pixels) and the box in that patch's pixels."""
        _, i = self._tree.query([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        scale = self.patch_px / self.side
        x0, y0 = self.corners[i]
        local = ((box[0] - x0) * scale, (box[1] - y0) * scale, (box[2] - x0) * scale, (box[3] - y0) * scale)
        if min(local) < -EDGE_TOLERANCE_PX or max(local) > self.patch_px + EDGE_TOLERANCE_PX:
            raise BrstError(self.path, f"a {box[2] - box[0]:.0f} px box at ({box[0]:.0f}, {box[1]:.0f}) is not inside "
                                       f"one HEST patch ({self.side:.0f} WSI px each): patches larger than "
                                       "HEST's cannot be cut from its patches; lower --patch-um or provide the WSI")
        return int(i), tuple(min(max(v, 0.0), float(self.patch_px)) for v in local)

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """The float ``box`` (WSI pixels, inside one patch) resampled to ``(out_px, out_px, 3)`` uint8."""
        i, local = self._local_box(box)
        return np.asarray(Image.fromarray(self._patch(i)).resize((out_px, out_px), Image.Resampling.BILINEAR,
                                                                 box=local))

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of the WSI-pixel box at (x0, y0), inside one patch."""
        i, local = self._local_box((x0, y0, x0 + width, y0 + height))
        return np.asarray(Image.fromarray(self._patch(i)).resize((width, height), Image.Resampling.BILINEAR,
                                                                 box=local))

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB ``(h, w, 3)`` mosaic of the patches on white, longer side ``max_px``, and its scale."""
        scale = max_px / max(self.width, self.height)
        canvas = Image.new("RGB", (max(1, round(self.width * scale)), max(1, round(self.height * scale))), "white")
        size = max(1, round(self.side * scale))
        for i, (x0, y0) in enumerate(self.corners):
            tile = Image.fromarray(self._patch(i)).resize((size, size), Image.Resampling.BOX)
            canvas.paste(tile, (round(x0 * scale), round(y0 * scale)))
        return np.asarray(canvas), canvas.width / self.width

    def close(self) -> None:
        """Close the HDF5 handle (reopened on next read)."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None


def patch_side(offset: np.ndarray, patch_px: int, um_per_px: float, path: object) -> float:
    """WSI pixels one patch covers: HEST's default when the corner offsets fit it, else measured.

    Shape: offset ``(M, 2)`` spot centre minus patch corner, WSI pixels.
    """
    nominal = patch_px * HEST_PATCH_UM_PER_PX / um_per_px
    if np.abs(offset - nominal // 2).max() <= 1.0:
        return nominal
    measured = 2 * float(np.median(offset)) - 1  # corner = int(centre - side // 2): offset ≈ side / 2 + 0.5
    log.warning("%s: patches are not HEST's default %g µm/px around the spots; measured %.1f WSI px per patch",
                path, HEST_PATCH_UM_PER_PX, measured)
    return measured


def patches_image(path: Path, spot_id: np.ndarray, pixel_x: np.ndarray, pixel_y: np.ndarray,
                  um_per_px: float) -> tuple[PatchesImage, np.ndarray]:
    """The patches of the spots ``spot_id`` as one image, and which spots have a patch.

    Shape: spot_id, pixel_x, pixel_y ``(N,)`` -> image, boolean ``(N,)`` mask of spots with a patch;
    ``um_per_px`` is the WSI's.

    Raises:
        BrstError: no spot has a patch, or the patches are not centred on their spots.
    """
    barcodes, corners, patch_px = read_patch_index(path)
    row_of = {barcode: row for row, barcode in enumerate(barcodes)}
    has = np.array([key in row_of for key in spot_id], dtype=bool)
    if not has.any():
        raise BrstError(path, f"no barcode matches a spot of the sample (barcodes look like {list(barcodes[:2])})")
    if not has.all():
        log.info("%s: %d of %d spots have a patch; the others are dropped", path, int(has.sum()), len(has))
    rows = np.array([row_of[key] for key in spot_id[has]])
    corners = corners[rows]
    offset = np.column_stack([pixel_x[has], pixel_y[has]]) - corners
    if np.abs(offset - offset.mean(0)).max() > 2:
        raise BrstError(path, "patch corners are not a fixed offset from their spot centres (not HEST patches?)")
    side = patch_side(offset, patch_px, um_per_px, path)
    log.info("%s: %d patches of %d px over %.1f WSI px", path, len(rows), patch_px, side)
    return PatchesImage(path, corners, rows, side, patch_px), has
