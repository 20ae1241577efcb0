"""PNG encoding, one way: pixels, a PIL image or a matplotlib figure -> PNG bytes, or a PNG file
written atomically (:mod:`brst.train.atomic`: a reader never sees a half-written file)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_bytes_atomic


def png_bytes(image, **options) -> bytes:
    """PNG bytes of ``image``.

    Args:
        image: uint8 pixels ``(H, W, 3)`` or ``(H, W)``, a PIL image, or a matplotlib figure
            (anything with ``savefig``; it needs a canvas, e.g. ``FigureCanvasAgg(fig)``).
        options: PIL's PNG options (``compress_level=1`` for speed, ``bits=1`` with a palette) or,
            for a figure, ``savefig``'s (``dpi``).
    """
    buffer = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buffer, format="png", **options)
    else:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image, **options) -> Path:
    """Write :func:`png_bytes` of ``image`` to ``path`` atomically; returns ``path``."""
    write_bytes_atomic(path, png_bytes(image, **options))
    return Path(path)
