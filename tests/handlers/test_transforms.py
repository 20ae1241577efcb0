"""The shared tensor pipeline (ModelInput) and the dihedral augmentation, on a real H&E crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brst.handlers.pillow_open import pil_open
from brst.handlers.transforms import ModelInput, channels_first, dihedral, normalize, random_dihedral_codes, resize


@pytest.fixture(scope="module")
def patches(her2st_root) -> torch.Tensor:
    """Four real 96 px tissue crops from section C2, uint8 (4, 96, 96, 3)."""
    path = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    with pil_open(path, ("JPEG",)) as image:  # a ~92 Mpx scan: over Pillow's own limit
        image.draft("RGB", (image.width // 4, image.height // 4))
        array = np.asarray(image.convert("RGB"))
    centre_y, centre_x = array.shape[0] // 2, array.shape[1] // 2
    crops = [array[centre_y + dy:centre_y + dy + 96, centre_x + dx:centre_x + dx + 96]
             for dy, dx in [(0, 0), (100, 0), (0, 100), (-100, -100)]]
    return torch.from_numpy(np.stack(crops))


def unit_bchw(patches: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [0, 1]."""
    return channels_first(patches).float() / 255.0


def test_layouts_agree(patches, device):
    x = patches.to(device)
    last = channels_first(x)
    first = channels_first(x.permute(0, 3, 1, 2).contiguous())
    assert last.shape == (4, 3, 96, 96) and torch.equal(last, first)


def test_bad_layout_raises():
    with pytest.raises(ValueError, match="expected"):
        channels_first(torch.zeros(2, 96, 96, dtype=torch.uint8))


def test_model_input_shapes_and_statistics(patches, device):
    module = ModelInput(None, [3, 64, 64], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).to(device)
    out = module(patches.to(device))
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.float32
    expected = normalize(resize(unit_bchw(patches.to(device)), 64),
                         torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))
    assert torch.allclose(out, expected)
    assert abs(out.mean().item() - ((patches.float() / 255).mean().item() - 0.5) / 0.25) < 0.05


def test_resize_is_a_no_op_at_size(patches):
    x = unit_bchw(patches)
    assert resize(x, 96) is x


def test_dihedral_group(patches):
    x = unit_bchw(patches)[:1]
    images = [dihedral(x, k) for k in range(8)]
    assert len({tuple(im.flatten()[:500].tolist()) for im in images}) == 8
    batch = x.expand(8, -1, -1, -1)
    assert torch.equal(dihedral(batch, torch.arange(8)), torch.cat(images))
    assert torch.equal(dihedral(x, 1), x.flip(-1)) and torch.equal(dihedral(x, 2), x.flip(-2))
    assert torch.equal(dihedral(x, 4 | 1), torch.rot90(x, -1, dims=(-2, -1)))


def test_augmentation_sits_between_stain_and_resize(patches):
    module = ModelInput(None, 64, [0.0] * 3, [1.0] * 3)
    codes = torch.tensor([0, 3, 5, 6])
    expected = torch.stack([dihedral(im[None], int(k))[0] for im, k in zip(module(patches), codes)])
    assert torch.allclose(module(patches, dihedral_codes=codes), expected, atol=1e-6)


def test_random_dihedral_is_reproducible_and_keeps_pixels(patches):
    x = unit_bchw(patches)
    codes = random_dihedral_codes(len(x), generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, random_dihedral_codes(len(x), generator=torch.Generator().manual_seed(0)))
    assert codes.min() >= 0 and codes.max() < 8
    first = dihedral(x, codes)
    assert torch.allclose(first.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))


def test_non_square_rejected():
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(1, 3, 4, 5), 1)
