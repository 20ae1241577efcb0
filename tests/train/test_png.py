"""PNG encoding, one way: pixels, images and figures to lossless PNG bytes, or to a file written atomically."""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from brst.train.png import png_bytes, write_png


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture()
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)


def test_pixels_and_images_round_trip_losslessly_at_any_compression(pixels):
    fast, small = png_bytes(pixels, compress_level=1), png_bytes(pixels, compress_level=9)
    assert fast.startswith(b"\x89PNG\r\n\x1a\n") and fast != small
    for data in (fast, small, png_bytes(Image.fromarray(pixels))):
        image = _decoded(data)
        assert image.format == "PNG" and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), pixels)
    grey = pixels[..., 0]
    assert np.array_equal(np.asarray(_decoded(png_bytes(grey))), grey)


def test_palette_options_pass_through():
    image = Image.new("P", (64, 32))
    image.putpalette([200, 150, 180, 90, 60, 120])
    decoded = _decoded(png_bytes(image, bits=1))
    assert decoded.mode in ("P", "1") and decoded.size == (64, 32)


def test_a_figure_renders_at_its_dpi():
    fig = Figure(figsize=(2, 1))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    assert _decoded(png_bytes(fig, dpi=50)).size == (100, 50)
    assert _decoded(png_bytes(fig, dpi=100)).size == (200, 100)


def test_write_png_replaces_the_file_whole_and_leaves_no_temporary(pixels, tmp_path):
    path = tmp_path / "out" / "patch.png"
    assert write_png(path, pixels) == path
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_png(path, np.zeros((4, 4, 3), dtype=np.complex64))  # not encodable: nothing written
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["patch.png"]
