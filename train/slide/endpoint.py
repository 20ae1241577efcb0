"""A served model (TorchServe, HTTP or gRPC) as a slide predictor.

The patches of the tiles go out ``tiles_per_request`` at a time (one patch per tile),
``concurrency`` requests in flight, so TorchServe's own batching fills its batches. With
``transfer="npy"`` (the default) a request is one NumPy ``.npy`` file of the patches' uint8
pixels ``(n, P, P, 3)`` (HTTP: a multipart file part beside the ``um_per_px`` field; gRPC: the
``data`` and ``um_per_px`` inputs): nothing to encode or decode. With ``transfer="png"`` it is
JSON ``{"instances": [<base64 PNG>, ...], "um_per_px": ...}``, lossless PNGs that any brst
server reads; a server that refuses the NPY probe (one from before NPY requests) is used with
PNG, with a warning. Each patch is ``tile_px`` pixels covering the tile's ``tile_um``
micrometres around its centre; the handler crops its model's field from the centre and
resamples it. When ``tile_um``/``tile_px`` are the model's own ``patch_um``/``patch_px`` (the
defaults are the project's default geometry, 112 µm at 0.5 µm/px) the served model sees exactly
the pixels the local model would.

:meth:`EndpointPredictor.stream` sends each batch's requests as soon as the batch is read and
keeps up to ``BATCHES_IN_FLIGHT`` batches outstanding, so the server is not idle while the
client reads the next patches.

Every answer names the archive's stain policy (docs/CONTRACTS.md, "Served response"); when it is
slide-scope, ``slide_stain`` is a normaliser of the served method and parameters that estimates a
slide's statistics here (on the patches it sends), and after :meth:`EndpointPredictor.use_slide_stain`
every request carries them (``stain``: a form field or gRPC input beside NPY patches, a JSON field
beside PNG ones).

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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from brst.handlers.decode import DecodeLimits
from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.handlers.stain import StainNormalizer, make_stain, statistics_from_dict
from brst.handlers.wire import INSTANCES_KEY, SCALE_KEY, STAIN_KEY
from brst.train.png import png_bytes
from brst.train.serve.client import HttpClient, RequestRejected, make_client
from brst.train.serve.transport import Transport

log = logging.getLogger(__name__)

#: the project's default patch: ``prepare``'s 112 µm at 0.5 µm/px
DEFAULT_TILE_UM = 112.0
DEFAULT_TILE_PX = 224
#: first back-off delay in seconds; doubled after each failed attempt
BACKOFF_S = 0.5
#: how patches travel: ``npy`` (raw uint8 pixels) or ``png`` (base64 PNGs in JSON)
TRANSFERS = ("npy", "png")
#: batches whose requests may be outstanding at once in :meth:`EndpointPredictor.stream`
BATCHES_IN_FLIGHT = 2
#: bytes an NPY request may hold (the handler's default body limit) less room for its header
NPY_MAX_BYTES = DecodeLimits().max_body_bytes - 4096


def png_base64(pixels: np.ndarray) -> str:
    """Lossless PNG of uint8 ``(H, W, 3)`` pixels (fastest compression), base64 text."""
    return base64.b64encode(png_bytes(pixels, compress_level=1)).decode("ascii")


def npy_bytes(patches: np.ndarray) -> bytes:
    """A ``.npy`` file of uint8 ``(n, P, P, 3)`` patches."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(patches, dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()


class EndpointPredictor:
    """Expression from a served brst model.

    Args:
        endpoint: ``http://HOST:PORT`` or ``grpc://HOST:PORT``.
        model_name: the model's name on the server.
        tile_um: field of view sent per patch, micrometres (at least the model's).
        tile_px: pixels a side of each sent patch.
        concurrency: requests in flight.
        tiles_per_request: patches per request (the handler's limit: 64; NPY requests also stay
            under its 8 MiB body limit).
        timeout_s: per-request timeout.
        retries: attempts after the first when the server does not answer.
        token: inference token of a server with token authorization.
        transport: TLS and credentials (:mod:`brst.train.serve.transport`); ``token`` is its credential
            when it has none.
        transfer: ``npy`` (uint8 pixels, falls back to PNG on a server that refuses them) or ``png``.
    """

    def __init__(self, endpoint: str, model_name: str, *, tile_um: float = DEFAULT_TILE_UM,
                 tile_px: int = DEFAULT_TILE_PX, concurrency: int = 8, tiles_per_request: int = 8,
                 timeout_s: float = 60.0, retries: int = 4, token: str | None = None,
                 transfer: str = "npy", transport: Transport | None = None) -> None:
        if transfer not in TRANSFERS:
            raise BrstError("--transfer", f"{transfer!r} is not one of {', '.join(TRANSFERS)}")
        self.endpoint = endpoint
        self.client = make_client(endpoint, model_name, token, timeout_s, transport)
        self.geometry = PatchGeometry(patch_um=tile_um, um_per_px=tile_um / tile_px)
        self.transfer = transfer
        self.tiles_per_request = tiles_per_request
        self.retries = retries
        self._stain_fields: dict | None = None  # the slide's statistics, sent once use_slide_stain gives them
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="slide-request")
        probe = self.pool.submit(self._probe).result()  # on a pool thread, whose connection close() ends
        self.genes = [str(g) for g in probe["genes"]]
        self.units = str(probe["units"])
        domain = probe.get("domain")
        self.domain_threshold = None if domain is None else float(domain["threshold"])
        self.stain_policy = _served_policy(probe.get("stain"))
        self.slide_stain = _slide_estimator(self.stain_policy, endpoint)
        self.description = {"mode": "endpoint", "endpoint": endpoint, "model_name": model_name,
                            "model_version": str(probe.get("model_version", "")), "tile_um": tile_um,
                            "sent_patch_px": tile_px, "transfer": self.transfer}
        log.info("served model %s (%s), %d genes in %s, patches sent as %s", model_name,
                 self.description["model_version"], len(self.genes), self.units, self.transfer)

    def use_slide_stain(self, statistics: dict) -> None:
        """Send these slide statistics (``slide_stain``'s named fields, checked here first) with every
        following request."""
        if self.slide_stain is None:
            raise BrstError("slide stain", f"the model at {self.endpoint} does not take slide statistics")
        statistics_from_dict(self.slide_stain, statistics, "slide stain")
        self._stain_fields = statistics

    def _probe(self) -> dict:
        """The answer for one white patch; a server refusing NPY is then used with PNG."""
        patch = np.full((1, self.geometry.patch_px, self.geometry.patch_px, 3), 255, np.uint8)
        if self.transfer == "npy":
            try:
                return self._answers(patch)[0]
            except RequestRejected as err:
                log.warning("%s refused patches as NPY (%s); sending PNG instead (an older brst server?)",
                            self.endpoint, err.problem)
                self.transfer = "png"
        return self._request(patch)[0]

    def _encoded(self, patches: np.ndarray) -> tuple[bytes, dict]:
        """The request body for uint8 ``(n, P, P, 3)`` patches and the client's options for it."""
        if self.transfer == "npy":
            return npy_bytes(patches), {"um_per_px": self.geometry.um_per_px, "stain": self._stain_fields}
        doc = {INSTANCES_KEY: [png_base64(patch) for patch in patches], SCALE_KEY: self.geometry.um_per_px}
        if self._stain_fields is not None:
            doc[STAIN_KEY] = self._stain_fields
        body = json.dumps(doc).encode()
        return body, {"mime": "application/json"} if isinstance(self.client, HttpClient) else {}

    def _answers(self, patches: np.ndarray) -> list[dict]:
        """One request's answers, retried with back-off while the server does not answer;
        a refusal raises :class:`RequestRejected`."""
        body, options = self._encoded(patches)
        delay_s, attempt = BACKOFF_S, 0
        while True:
            try:
                answer = self.client.predict(body, subject="patch", **options)
                break
            except RequestRejected:
                raise
            except BrstError as err:
                attempt += 1
                if attempt > self.retries:
                    raise BrstError(f"--endpoint {self.endpoint}",
                                    f"no answer after {attempt} attempts ({err.problem})") from None
                log.warning("endpoint attempt %d failed (%s); retrying in %.1f s", attempt, err.problem, delay_s)
                time.sleep(delay_s)
                delay_s *= 2
        answers = answer if isinstance(answer, list) else [answer]
        if len(answers) != len(patches):
            raise BrstError(f"--endpoint {self.endpoint}", f"answered {len(answers)} results for {len(patches)} patches")
        return answers

    def _request(self, patches: np.ndarray) -> list[dict]:
        """One request's answers; a refusal is a :class:`BrstError` naming the endpoint."""
        try:
            return self._answers(patches)
        except RequestRejected as err:
            raise BrstError(f"--endpoint {self.endpoint}", f"the model refused a patch: {err.problem}") from None

    def _per_request(self) -> int:
        """Patches per request: ``tiles_per_request``, fewer where an NPY body would pass the limit."""
        if self.transfer == "png":
            return self.tiles_per_request
        patch_bytes = self.geometry.patch_px ** 2 * 3
        return max(1, min(self.tiles_per_request, NPY_MAX_BYTES // patch_bytes))

    def _submit(self, patches: np.ndarray) -> list[Future]:
        """Send uint8 ``(B, P, P, 3)`` patches as requests on the pool; their futures in order."""
        step = self._per_request()
        return [self.pool.submit(self._request, patches[i:i + step]) for i in range(0, len(patches), step)]

    @staticmethod
    def _collect(futures: list[Future]) -> tuple[np.ndarray, np.ndarray]:
        """The answers of one batch's requests: expression float32 ``(B, G)`` and in-domain scores
        float32 ``(B,)`` (NaN where an answer has none)."""
        answers = [a for f in futures for a in f.result()]
        scores = [np.nan if a.get("domain") is None else a["domain"]["score"] for a in answers]
        return np.asarray([a["values"] for a in answers], dtype=np.float32), np.asarray(scores, dtype=np.float32)

    def stream_scored(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """uint8 ``(B, P, P, 3)`` batches -> (float32 ``(B, G)``, float32 ``(B,)`` in-domain scores) each,
        in order; each batch's requests are sent as soon as it arrives, up to ``BATCHES_IN_FLIGHT``
        batches outstanding."""
        pending: deque[list[Future]] = deque()
        try:
            for patches in batches:
                pending.append(self._submit(patches))
                if len(pending) >= BATCHES_IN_FLIGHT:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            for future in (f for futures in pending for f in futures):
                future.cancel()

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """uint8 ``(B, P, P, 3)`` batches -> float32 ``(B, G)`` each, in order (see :meth:`stream_scored`)."""
        return (values for values, _ in self.stream_scored(batches))

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 ``(B, P, P, 3)`` -> float32 ``(B, G)``, requests sent concurrently."""
        return self._collect(self._submit(patches))[0]

    def close(self) -> None:
        """Stop the request threads and close the connection."""
        self.pool.shutdown(wait=True)
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def _served_policy(answer: object) -> dict | None:
    """The archive's stain policy ``{"method", "scope", "fallback", "params"}`` from an answer's
    ``stain``, or None for a server that does not say (one from before slide stain)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("policy"), dict):
        return None
    return {"method": answer.get("method"), **answer["policy"]}


def _slide_estimator(policy: dict | None, endpoint: str) -> StainNormalizer | None:
    """A normaliser of the served method and parameters to estimate slide statistics with, when the
    served policy is slide-scope (None otherwise)."""
    if policy is None or policy.get("scope") != "slide" or policy.get("method") == "none":
        return None
    try:
        params = policy.get("params") or {}
        return make_stain(str(policy["method"]), **params).with_scope("slide", str(policy.get("fallback")))
    except (BrstError, TypeError, ValueError) as err:
        raise BrstError(f"--endpoint {endpoint}", f"declares a stain policy this client cannot use: {err}") from None
