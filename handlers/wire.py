"""A served request on the wire: the body formats by their first bytes, and the field names.

Both sides use these: the server's decoder (:mod:`brst.handlers.decode`,
:mod:`brst.handlers.envelopes`, :mod:`brst.handlers.stain_request`) and the clients
(:mod:`brst.train.serve.client`, :mod:`brst.train.slide.endpoint`). Nothing here imports numpy,
torch or Pillow, so a client imports it without loading them. docs/CONTRACTS.md ("Served
request") describes the envelopes these names appear in.
"""
from __future__ import annotations

#: the first bytes of a NumPy ``.npy`` file
NPY_MAGIC = b"\x93NUMPY"
#: first bytes -> (format name, MIME type) of every body a request may carry
MAGIC_NUMBERS = (
    (b"\x89PNG", "PNG", "image/png"),
    (b"\xff\xd8\xff", "JPEG", "image/jpeg"),
    (b"II*\x00", "TIFF", "image/tiff"),
    (b"MM\x00*", "TIFF", "image/tiff"),
    (NPY_MAGIC, "NPY", "application/x-npy"),
)
#: the MIME type of a body no magic number names
UNKNOWN_MIME = "application/octet-stream"

# Fields beside the image: a JSON field, a form field, a gRPC input or a KServe v2 ``parameters`` entry
#: the micrometres per pixel of the image
SCALE_KEY = "um_per_px"
#: the slide's stain statistics (named fields, as JSON)
STAIN_KEY = "stain"
#: the form part or gRPC input the clients send the image in
IMAGE_KEY = "data"
#: the fields the server takes an image from, in order of preference
IMAGE_KEYS = (IMAGE_KEY, "body", "image", "file", "b64")
#: JSON field holding a list of patches
INSTANCES_KEY = "instances"


def body_format(body: bytes) -> tuple[str, str] | None:
    """``(format name, MIME type)`` of a body from its first bytes, or ``None`` when none matches."""
    return next(((name, mime) for magic, name, mime in MAGIC_NUMBERS if body.startswith(magic)), None)
