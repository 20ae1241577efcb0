"""Open an image with Pillow without its process-wide decompression-bomb guard: the caller checks the size.

``PIL.Image.open`` refuses images over ``PIL.Image.MAX_IMAGE_PIXELS``, a module global. Code
that must open larger images (whole H&E scans of ~92 megapixels) would have to change that
global, which changes it for every thread of the process (the serving handler's decoder among
them). :func:`pil_open` identifies and opens the image exactly as ``Image.open`` does, restricted
to the formats named, but does not consult the global: the caller checks ``image.size`` against
its own limit (:func:`brst.handlers.decode.check_pixels` for requests) before any pixel is decoded.
The global is never read or written here.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import IO, Sequence

from PIL import Image, ImageFile, UnidentifiedImageError

#: bytes Pillow's format checks look at (as ``Image.open`` reads them)
PREFIX_BYTES = 16


def pil_open(source: str | Path | IO[bytes], formats: Sequence[str]) -> ImageFile.ImageFile:
    """The image at ``source`` (a path or a binary stream), header read, pixels not yet decoded.

    Use as ``Image.open``'s result (a context manager that closes a file it opened).

    Raises:
        FileNotFoundError / OSError: a path that cannot be read.
        UnidentifiedImageError: no format in ``formats`` takes the bytes.
    """
    if any(fmt not in Image.OPEN for fmt in formats):
        Image.init()
    is_path = isinstance(source, (str, os.PathLike))
    if is_path:
        with open(source, "rb") as stream:
            prefix = stream.read(PREFIX_BYTES)
    else:
        source.seek(0)
        prefix = source.read(PREFIX_BYTES)
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        taken = accept(prefix) if accept else True
        if not taken or isinstance(taken, str):  # a str: "looks like this format, unsupported"
            continue
        if not is_path:
            source.seek(0)
        try:
            return factory(source)
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes as "not this format"
            continue
    raise UnidentifiedImageError(f"cannot identify image {source if is_path else 'data'} as {'/'.join(formats)}")

