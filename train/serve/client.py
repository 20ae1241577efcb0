"""Clients for a served brst model, over HTTP (TorchServe's REST API) or gRPC.

Both send one encoded image (PNG/JPEG/TIFF bytes) or a NumPy ``.npy`` file of uint8 pixels
(``(H, W, 3)`` or ``(N, H, W, 3)``, sent as ``application/x-npy``) per request, with an optional
``um_per_px`` (HTTP: a multipart form field beside the image, as TorchServe 0.12 drops query
parameters on ``/predictions``; gRPC: an ``input`` field), and return the served
JSON (docs/CONTRACTS.md, "Served response"). A request the model refuses raises
:class:`RequestRejected` (an :class:`~brst.handlers.errors.InputError`) carrying the HTTP
status or gRPC code and the server's ``{"code", "type", "message"}``; an unreachable or
failing server raises :class:`~brst.handlers.errors.BrstError`. A production TorchServe
with token authorization needs ``token`` (the inference key from its ``key_file.json``),
sent as ``Authorization: Bearer <token>`` (HTTP header or gRPC metadata).

The HTTP client keeps one persistent connection per thread, so it can be shared by a
thread pool (as the benchmark does).
"""
from __future__ import annotations

import http.client
import json
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from brst.handlers.errors import BrstError, InputError

#: magic number -> MIME type (NPY: ``brst.handlers.images.NPY_MAGIC``, not imported to keep numpy out)
IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"II*\x00", "image/tiff"),
               (b"MM\x00*", "image/tiff"), (b"\x93NUMPY", "application/x-npy"))
SCALE_KEY = "um_per_px"
GRPC_IMAGE_KEY = "data"


class RequestRejected(InputError):
    """The server refused the request's content (HTTP 4xx / gRPC INVALID_ARGUMENT ...).

    Attributes:
        status: the HTTP status (int) or the gRPC status code name (str).
        error: the server's JSON error (``{"code", "type", "message"}``), or ``{}``.
    """

    def __init__(self, subject: object, status: int | str, error: dict) -> None:
        self.status = status
        self.error = error
        super().__init__(subject, f"rejected ({status}): {error.get('message', error) or 'no message'}")


@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def content_type(image: bytes) -> str:
    """The body's MIME type from its magic number (``application/octet-stream`` if unknown)."""
    return next((mime for magic, mime in IMAGE_TYPES if image.startswith(magic)), "application/octet-stream")


def error_json(body: bytes) -> dict:
    """The ``{"code", "type", "message"}`` in an error body, or ``{"message": <text>}``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {"message": body.decode("utf-8", "replace")[:500]}
    return doc if isinstance(doc, dict) else {"message": str(doc)[:500]}


def multipart_form(fields: dict[str, tuple[bytes, str | None]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type; a field with a MIME type is a file part."""
    boundary = f"brst-{uuid.uuid4().hex}"
    parts = []
    for name, (value, mime) in fields.items():
        head = f'Content-Disposition: form-data; name="{name}"'
        head += f'; filename="{name}"\r\nContent-Type: {mime}' if mime else ""
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def served_error(doc: object) -> bool:
    """Whether a successfully delivered body is in fact an error (see brst_handler's docstring)."""
    return isinstance(doc, dict) and "genes" not in doc and isinstance(doc.get("code"), int) and doc["code"] >= 400


class HttpConnections:
    """One persistent ``http.client`` connection per thread to ``base_url``."""

    def __init__(self, base_url: str, timeout_s: float = 60) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrstError(base_url, "is not an http(s)://HOST:PORT URL")
        self.base_url = base_url.rstrip("/")
        self._parts = parts
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            factory = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            conn = factory(self._parts.hostname, self._parts.port, timeout=self._timeout_s)
            self._local.conn = conn
        return conn

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> HttpResult:
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return HttpResult(response.status, response.read())
        except OSError:
            conn.close()
            raise

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> HttpResult:
        """Send a request; once more on a fresh connection if the server closed an idle one."""
        try:
            try:
                return self._send(method, path, body, headers or {})
            except (ConnectionResetError, BrokenPipeError):  # incl. http.client.RemoteDisconnected
                return self._send(method, path, body, headers or {})
        except OSError as err:
            raise BrstError(self.base_url, f"cannot reach the server: {err}") from err


def bearer(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header TorchServe's token authorization expects (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_json(url: str, timeout_s: float = 30, token: str | None = None) -> object:
    """GET ``url`` (with a bearer ``token`` if given) and parse its JSON; anything but 200 raises BrstError."""
    parts = urlsplit(url)
    result = HttpConnections(f"{parts.scheme}://{parts.netloc}", timeout_s).request(
        "GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=bearer(token))
    if result.status != 200:
        raise BrstError(url, f"answered {result.status}: {error_json(result.body).get('message', '')}")
    return result.json()


class HttpClient:
    """Predictions over TorchServe's inference API (``POST /predictions/<model>``)."""

    def __init__(self, base_url: str, model: str, token: str | None = None, timeout_s: float = 60) -> None:
        self.connections = HttpConnections(base_url, timeout_s)
        self.model = model
        self.headers = bearer(token)

    def post(self, body: bytes, um_per_px: float | None = None, mime: str | None = None) -> HttpResult:
        """The raw answer to one request (no status check).

        With ``um_per_px`` the image goes as multipart/form-data (part ``data`` + field
        ``um_per_px``): TorchServe 0.12 drops query parameters on ``/predictions``.
        """
        mime = mime or content_type(body)
        if um_per_px is not None:
            body, mime = multipart_form({GRPC_IMAGE_KEY: (body, mime), SCALE_KEY: (repr(um_per_px).encode(), None)})
        headers = {**self.headers, "Content-Type": mime}
        return self.connections.request("POST", f"/predictions/{quote(self.model)}", body, headers)

    def predict(self, image: bytes, um_per_px: float | None = None, subject: str = "image",
                mime: str | None = None) -> dict | list:
        """The served JSON for one request; refusals raise :class:`RequestRejected`."""
        result = self.post(image, um_per_px, mime)
        if 400 <= result.status < 500:
            raise RequestRejected(subject, result.status, error_json(result.body))
        if result.status != 200:
            raise BrstError(self.connections.base_url, f"server error {result.status}: "
                                                       f"{error_json(result.body).get('message', '')}")
        return result.json()


class GrpcClient:
    """Predictions over TorchServe's gRPC inference API (``Predictions``), stubs from
    :mod:`brst.train.serve.grpc_stubs`."""

    def __init__(self, target: str, model: str, token: str | None = None, timeout_s: float = 60) -> None:
        import grpc

        from .grpc_stubs import load_stubs

        self._grpc = grpc
        self.stubs = load_stubs()
        self.target = target
        self.model = model
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                              ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, inputs: dict[str, bytes]) -> bytes:
        """The raw ``prediction`` bytes of one ``Predictions`` call (gRPC errors propagate)."""
        request = self.stubs.inference_pb2.PredictionsRequest(model_name=self.model, input=inputs)
        return self.stub.Predictions(request, timeout=self.timeout_s, metadata=self.metadata).prediction

    def predict(self, image: bytes, um_per_px: float | None = None, subject: str = "image") -> dict | list:
        """The served JSON for one request; refusals raise :class:`RequestRejected`."""
        inputs = {GRPC_IMAGE_KEY: image}
        if um_per_px is not None:
            inputs[SCALE_KEY] = repr(um_per_px).encode()
        try:
            body = self.call(inputs)
        except self._grpc.RpcError as err:
            code, details = err.code(), (err.details() or "").splitlines()
            message = details[0] if details else code.name  # TorchServe appends its exception's class
            if code in (self._grpc.StatusCode.INVALID_ARGUMENT, self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                        self._grpc.StatusCode.NOT_FOUND):
                raise RequestRejected(subject, code.name, {"message": message}) from err
            raise BrstError(f"grpc://{self.target}", f"{code.name}: {message}") from err
        doc = json.loads(body)
        if served_error(doc):
            raise RequestRejected(subject, "INVALID_ARGUMENT", doc)
        return doc


def make_client(endpoint: str, model: str, token: str | None = None, timeout_s: float = 60
                ) -> HttpClient | GrpcClient:
    """A client for ``http://HOST:PORT`` (or https) or ``grpc://HOST:PORT``."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("http", "https") and parts.netloc:
        return HttpClient(endpoint, model, token, timeout_s)
    if parts.scheme == "grpc" and parts.netloc:
        return GrpcClient(parts.netloc, model, token, timeout_s)
    raise BrstError(f"--endpoint {endpoint}", "must be http://HOST:PORT or grpc://HOST:PORT")
