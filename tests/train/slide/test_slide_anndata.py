"""The `.h5ad` of a slide map keeps the run's provenance and the grid's own facts apart.

An endpoint run records the pixels of each patch it sent (``sent_patch_px``, from ``--tile-px``);
the grid's tile side in slide pixels is ``tile_px``. Built on a real HER2ST section's tissue grid.
"""
from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest

from brst.train.slide.outputs import SlideMap, to_anndata, write_h5ad
from brst.train.slide.tile_grid import find_tiles
from brst.train.sources.open import open_image

UM_PER_PX = 0.5
TILE_UM = 224.0


@pytest.fixture(scope="module")
def slide_map(her2st_root: Path) -> SlideMap:
    section = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    image = open_image(section)
    thumbnail, thumb_px_per_slide_px = image.thumbnail(512)
    _, grid = find_tiles(thumbnail, thumb_px_per_slide_px, image.width, image.height, UM_PER_PX, 400.0, TILE_UM,
                         section.name)
    values = np.random.default_rng(0).random((len(grid), 2), dtype=np.float32)
    provenance = {"mode": "endpoint", "model_name": "brst", "tile_um": TILE_UM, "sent_patch_px": 224}
    return SlideMap(slide=str(section), library_id="C2", grid=grid, genes=["ERBB2", "ESR1"], values=values,
                    units="log1p(count)", thumbnail=thumbnail, thumb_px_per_slide_px=thumb_px_per_slide_px,
                    um_per_px=UM_PER_PX, provenance=provenance)


def test_the_h5ad_holds_the_sent_patch_pixels_and_the_grid_tile_side(slide_map, tmp_path):
    adata = anndata.read_h5ad(write_h5ad(slide_map, tmp_path / "C2.h5ad"))
    brst = adata.uns["brst"]
    assert brst["sent_patch_px"] == 224
    assert brst["tile_px"] == pytest.approx(TILE_UM / UM_PER_PX)
    assert brst["step_px"] == pytest.approx(400.0 / UM_PER_PX)
    assert adata.n_obs == len(slide_map.grid) > 10


def test_provenance_cannot_overwrite_the_grid_facts(slide_map):
    clashing = SlideMap(**{**slide_map.__dict__, "provenance": {**slide_map.provenance, "tile_px": 224}})
    with pytest.raises(ValueError, match=r"\['tile_px'\] would overwrite"):
        to_anndata(clashing)
