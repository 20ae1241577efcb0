"""Benchmark the served request decoder against a bare Pillow decode of the same images.

ours:      patches/s of :func:`brst.handlers.envelopes.decode_request` on one JSON request of
           base64 PNGs (``{"instances": [...]}``): every check (sizes, the request's pixel
           budget, colour mode, scale), one image decoded, resampled and released at a time.
reference: patches/s of the bare minimum on the same base64 strings: ``base64.b64decode``,
           ``Image.open``, ``convert("RGB")`` and the same ``resize`` (box and filter), no checks;
           both give the very same patches (checked).
Ratio = ours / reference (1.0: the decoder's checks cost nothing). Two requests
of real H&E (HER2ST section C3, spots under tissue): ``--patches`` patches at the model's size
(224 px, 0.5 um/px) and ``--patches // 8`` tiles of 4x that side sent with ``um_per_px`` (cropped
and resampled). Rounds interleave the two sides; each figure is the best of ``--rounds``.
Also: the time to refuse the request of 64 palette PNGs of 4096 x 4096 px (1.07 Gpx declared
in ~180 KB) for its budget.

    python benchmarks/bench_decode.py [--patches 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from brst.handlers.envelopes import decode_request
from brst.handlers.errors import RejectedInput
from brst.handlers.geometry import PatchGeometry
from brst.train.data.patches import cut_patch
from brst.train.data.readers.her2st import read_sections
from brst.train.png import png_bytes

log = logging.getLogger("bench_decode")
REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("BRST_DATA", REPO.parent / "shared" / "data" / "her2st"))
GEOMETRY = PatchGeometry.from_pixels(224, 0.5)
#: tiles sent with um_per_px are this many times the patch's side (cropped to the field, resampled)
TILE_FACTOR = 4


def real_tiles(n: int, side_px: int) -> list[str]:
    """``n`` base64 PNGs of ``side_px`` square real H&E around spots of section C3 (at 0.5 um/px)."""
    section = next(read_sections(ROOT, ["C3"]))
    tile = PatchGeometry.from_pixels(side_px, GEOMETRY.um_per_px)
    side_scan_px = tile.side_um / section.um_per_px
    inside = np.flatnonzero(tile.inside(section.image.width, section.image.height, section.pixel_x, section.pixel_y,
                                        section.um_per_px))
    rows = inside[np.linspace(0, len(inside) - 1, n).round().astype(int)]
    tiles = []
    for row in rows:
        pixels = cut_patch(section.image, section.pixel_x[row], section.pixel_y[row], side_scan_px, side_px)
        tiles.append(base64.b64encode(png_bytes(pixels)).decode())
    section.image.close()
    return tiles


def bare_decode(tiles: list[str], box: tuple[float, float, float, float] | None) -> np.ndarray:
    """The reference: decode, convert and resize each tile with Pillow alone."""
    patches = []
    for tile in tiles:
        with Image.open(io.BytesIO(base64.b64decode(tile))) as image:
            rgb = image.convert("RGB")
            if box is None and rgb.width == GEOMETRY.patch_px:
                patches.append(np.asarray(rgb))
            else:
                size = (GEOMETRY.patch_px, GEOMETRY.patch_px)
                patches.append(np.asarray(rgb.resize(size, Image.Resampling.BILINEAR, box=box)))
    return np.stack(patches)


def best_seconds(run, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def compare(name: str, tiles: list[str], um_per_px: float | None, rounds: int) -> dict:
    """Best-of-rounds seconds of ours and the reference on one request; their patches must agree."""
    side_px = Image.open(io.BytesIO(base64.b64decode(tiles[0]))).width
    field_px = GEOMETRY.side_um / um_per_px if um_per_px else side_px
    box = None if um_per_px is None else ((side_px - field_px) / 2,) * 2 + ((side_px + field_px) / 2,) * 2
    row = {"body": {"instances": tiles, "um_per_px": um_per_px} if um_per_px else {"instances": tiles}}
    ours_patches = np.stack(decode_request(row, GEOMETRY).patches)
    np.testing.assert_array_equal(ours_patches, bare_decode(tiles, box))
    ours, reference = float("inf"), float("inf")
    for _ in range(rounds):  # interleaved, so a busy moment hits both sides
        ours = min(ours, best_seconds(lambda: decode_request(row, GEOMETRY), 1))
        reference = min(reference, best_seconds(lambda: bare_decode(tiles, box), 1))
    result = {"case": name, "images": len(tiles), "side_px": side_px, "ours": round(len(tiles) / ours, 1),
              "reference": round(len(tiles) / reference, 1), "ratio": round(reference / ours, 3)}
    log.info("%s", json.dumps(result))
    return result


def refusal_seconds(rounds: int) -> float:
    """Best-of-rounds seconds to refuse the 64-image palette request for its budget."""
    image = Image.new("P", (4096, 4096))
    image.putpalette([200, 150, 180, 90, 60, 120])
    row = {"body": {"instances": [base64.b64encode(png_bytes(image, bits=1)).decode()] * 64}}

    def refuse() -> None:
        try:
            decode_request(row, GEOMETRY)
        except RejectedInput as err:
            assert err.reason == "over_budget", err
            return
        raise AssertionError("the 64-image request was accepted")
    return best_seconds(refuse, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=64, help="patches in the patch-size request")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tile_px = GEOMETRY.patch_px * TILE_FACTOR
    results = [compare("patches", real_tiles(args.patches, GEOMETRY.patch_px), None, args.rounds),
               compare("tiles_with_um_per_px", real_tiles(max(1, args.patches // 8), tile_px),
                       GEOMETRY.um_per_px, args.rounds)]
    refusal = refusal_seconds(args.rounds)
    log.info("refusing the 64-image palette request (1.07 Gpx declared): %.4f s", refusal)
    patches, tiles = results
    print(json.dumps({"name": "decode_request", "ours": patches["ours"], "reference": patches["reference"],
                      "unit": "patches/s", "ratio": patches["ratio"], "tiles_with_um_per_px": tiles,
                      "refuse_64_palette_4096_s": round(refusal, 4), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
