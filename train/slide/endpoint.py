"""A served model (TorchServe, HTTP or gRPC) as a slide predictor.

Tiles go out as lossless PNGs, ``tiles_per_request`` at a time in one JSON request
(``{"instances": [<base64 PNG>, ...], "um_per_px": ...}``), ``concurrency`` requests in
flight, so TorchServe's own batching fills its batches. Each tile is ``tile_px`` pixels
covering ``tile_um`` micrometres around its centre; the handler crops its model's field
from the centre and resamples it. When ``tile_um``/``tile_px`` are the model's own
``patch_um``/``patch_px`` (the defaults are the project's default geometry, 112 µm at
0.5 µm/px) the served model sees exactly the pixels the local model would.

An unreachable or failing server is retried with exponential back-off; after the last
attempt it is one clear :class:`~brst.handlers.errors.BrstError`. A request the model refuses
(HTTP 4xx, gRPC INVALID_ARGUMENT) is not retried: its message names the problem (for
example a field of view smaller than the model's).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.train.serve.client import HttpClient, RequestRejected, make_client

log = logging.getLogger(__name__)

#: the project's default patch: ``prepare``'s 112 µm at 0.5 µm/px
DEFAULT_TILE_UM = 112.0
DEFAULT_TILE_PX = 224
#: first back-off delay in seconds; doubled after each failed attempt
BACKOFF_S = 0.5


def png_base64(pixels: np.ndarray) -> str:
    """Lossless PNG of uint8 ``(H, W, 3)`` pixels, base64 text."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointPredictor:
    """Expression from a served brst model.

    Args:
        endpoint: ``http://HOST:PORT`` or ``grpc://HOST:PORT``.
        model_name: the model's name on the server.
        tile_um: field of view sent per tile, micrometres (at least the model's).
        tile_px: pixels a side of each sent tile.
        concurrency: requests in flight.
        tiles_per_request: tiles per JSON request (TorchServe's limit here: 64).
        timeout_s: per-request timeout.
        retries: attempts after the first when the server does not answer.
        token: inference token of a server with token authorization.
    """

    def __init__(self, endpoint: str, model_name: str, *, tile_um: float = DEFAULT_TILE_UM,
                 tile_px: int = DEFAULT_TILE_PX, concurrency: int = 8, tiles_per_request: int = 8,
                 timeout_s: float = 60.0, retries: int = 4, token: str | None = None) -> None:
        self.endpoint = endpoint
        self.client = make_client(endpoint, model_name, token, timeout_s)
        self._predict_options = {"mime": "application/json"} if isinstance(self.client, HttpClient) else {}
        self.geometry = PatchGeometry(patch_um=tile_um, um_per_px=tile_um / tile_px)
        self.tiles_per_request = tiles_per_request
        self.retries = retries
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="slide-request")
        probe = self._request(np.full((1, self.geometry.patch_px, self.geometry.patch_px, 3), 255, np.uint8))[0]
        self.genes = [str(g) for g in probe["genes"]]
        self.units = str(probe["units"])
        self.description = {"mode": "endpoint", "endpoint": endpoint, "model_name": model_name,
                            "model_version": str(probe.get("model_version", "")), "tile_um": tile_um,
                            "tile_px": tile_px}
        log.info("served model %s (%s), %d genes in %s", model_name, self.description["model_version"],
                 len(self.genes), self.units)

    def _send(self, body: bytes) -> list[dict]:
        """One request, retried with back-off while the server does not answer."""
        delay_s, attempt = BACKOFF_S, 0
        while True:
            try:
                answer = self.client.predict(body, subject="tile", **self._predict_options)
                return answer if isinstance(answer, list) else [answer]
            except RequestRejected as err:
                raise BrstError(f"--endpoint {self.endpoint}", f"the model refused a tile: {err.problem}") from None
            except BrstError as err:
                attempt += 1
                if attempt > self.retries:
                    raise BrstError(f"--endpoint {self.endpoint}",
                                    f"no answer after {attempt} attempts ({err.problem})") from None
                log.warning("endpoint attempt %d failed (%s); retrying in %.1f s", attempt, err.problem, delay_s)
                time.sleep(delay_s)
                delay_s *= 2

    def _request(self, tiles: np.ndarray) -> list[dict]:
        body = json.dumps({"instances": [png_base64(tile) for tile in tiles],
                           "um_per_px": self.geometry.um_per_px}).encode()
        answers = self._send(body)
        if len(answers) != len(tiles):
            raise BrstError(f"--endpoint {self.endpoint}", f"answered {len(answers)} results for {len(tiles)} tiles")
        return answers

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 ``(B, P, P, 3)`` -> float32 ``(B, G)``, requests sent concurrently."""
        chunks = [patches[i:i + self.tiles_per_request] for i in range(0, len(patches), self.tiles_per_request)]
        answers = [a for chunk in self.pool.map(self._request, chunks) for a in chunk]
        return np.asarray([a["values"] for a in answers], dtype=np.float32)

    def close(self) -> None:
        """Stop the request threads and close the connection."""
        self.pool.shutdown(wait=True)
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
