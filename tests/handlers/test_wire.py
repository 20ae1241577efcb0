"""The wire constants: numpy-free, right about real encoded bodies, and the ones both sides use."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from serve_fixtures import encode, npy_file

from brst.handlers import wire
from brst.handlers.decode import IMAGE_FORMATS, decode_image
from brst.handlers.envelopes import decode_request
from brst.handlers.errors import RejectedInput
from brst.handlers.geometry import PatchGeometry
from brst.train.serve.client import content_type

HEAVY = ("numpy", "torch", "PIL", "timm")


@pytest.mark.parametrize("module", ["brst.handlers.wire", "brst.train.serve.client"])
def test_importing_the_wire_side_loads_nothing_heavy(module):
    """A fresh interpreter importing the constants (or the client built on them) loads no numpy, torch or Pillow."""
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def big_endian_tiff(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, byteorder=">", photometric="rgb")
    return buffer.getvalue()


def test_every_body_format_is_named_from_real_bytes(he_patches):
    pixels = he_patches.pixels[0]
    bodies = {"PNG": encode(pixels, "PNG"), "JPEG": encode(pixels, "JPEG"), "TIFF": encode(pixels, "TIFF"),
              "big-endian TIFF": big_endian_tiff(pixels), "NPY": npy_file(pixels)}
    found = {name: wire.body_format(body) for name, body in bodies.items()}
    assert found == {"PNG": ("PNG", "image/png"), "JPEG": ("JPEG", "image/jpeg"), "TIFF": ("TIFF", "image/tiff"),
                     "big-endian TIFF": ("TIFF", "image/tiff"), "NPY": ("NPY", "application/x-npy")}
    assert {name: content_type(body) for name, body in bodies.items()} == {
        name: mime for name, (_, mime) in found.items()}
    assert wire.body_format(b"GIF89a") is None
    assert content_type(b"GIF89a") == wire.UNKNOWN_MIME


def test_the_server_decodes_every_image_format_the_client_names(he_patches):
    """Each image format of the magic numbers is one the decoder tries, and a body of it decodes; a body
    of its magic number alone is refused as that format cut short, the NPY magic as no image at all."""
    pixels = he_patches.pixels[0]
    images = {name for _, name, mime in wire.MAGIC_NUMBERS if mime.startswith("image/")}
    assert images == set(IMAGE_FORMATS)
    for name in sorted(images):
        assert decode_image(encode(pixels, name)).shape == pixels.shape
    for magic, name, _ in wire.MAGIC_NUMBERS:
        with pytest.raises(RejectedInput) as refused:
            decode_image(magic)
        expected = ("not_an_image", "is not a") if name == "NPY" else ("corrupt", f"starts like {name} but")
        assert (refused.value.reason, expected[1] in str(refused.value)) == (expected[0], True)


def test_the_field_names_are_the_ones_the_server_reads(he_patches):
    """A JSON list of patches written with the wire's names (as the slide endpoint writes it), sent in the
    client's image field, is read as a list and with its scale: the centre of each patch, not all of it.
    The names themselves are the served contract (docs/CONTRACTS.md): clients of other versions send them."""
    assert (wire.IMAGE_KEY, wire.SCALE_KEY, wire.STAIN_KEY, wire.INSTANCES_KEY) == ("data", "um_per_px", "stain",
                                                                                    "instances")
    pixels = he_patches.pixels[0]
    half = pixels.shape[0] // 2
    geometry = PatchGeometry.from_pixels(half, he_patches.um_per_px)
    png = base64.b64encode(encode(pixels, "PNG")).decode()
    doc = {wire.INSTANCES_KEY: [png, png], wire.SCALE_KEY: he_patches.um_per_px}
    decoded = decode_request({wire.IMAGE_KEY: json.dumps(doc).encode()}, geometry)
    assert decoded.many and len(decoded.patches) == 2
    top = (pixels.shape[0] - half) // 2
    centre = pixels[top:top + half, top:top + half]
    np.testing.assert_allclose(decoded.patches[1].astype(int), centre.astype(int), atol=1)
