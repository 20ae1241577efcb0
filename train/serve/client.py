"""Clients for a served brst model, over HTTP (TorchServe's REST API) or gRPC.

Both send one encoded image (PNG/JPEG/TIFF bytes) or a NumPy ``.npy`` file of uint8 pixels
(``(H, W, 3)`` or ``(N, H, W, 3)``, sent as ``application/x-npy``) per request, with an optional
``um_per_px`` (HTTP: a multipart form field beside the image, as TorchServe 0.12 drops query
parameters on ``/predictions``; gRPC: an ``input`` field) and optionally the slide's stain
statistics ``stain`` (named fields, sent as JSON text in a form field or a gRPC ``input`` beside
the image), and return the served JSON (docs/CONTRACTS.md, "Served response"). A request the model refuses raises
:class:`RequestRejected` (an :class:`~brst.handlers.errors.InputError`) carrying the HTTP
status or gRPC code and the server's ``{"code", "type", "message"}``; an unreachable or
failing server raises :class:`~brst.handlers.errors.BrstError`. A production TorchServe
with token authorization needs ``token`` (the inference key from its ``key_file.json``),
sent as ``Authorization: Bearer <token>`` (HTTP header or gRPC metadata); an Ingress with
basic authentication takes ``user:password`` as Basic. TLS (``https://``, ``grpcs://`` or
``--tls``, optionally with a CA file) and the choice of scheme: :mod:`brst.train.serve.transport`.

The HTTP client is ``requests``: one :class:`requests.Session` per thread (its pool keeps the
connection alive between requests), so a client can be shared by a thread pool (as the slide
predictor and the benchmarks do); multipart bodies are urllib3's encoder. TLS verification is the
transport's own context (the CA file's roots, or the system's), and the environment's proxies and
``.netrc`` are not consulted.
"""
from __future__ import annotations

import http.client
import json
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import encode_multipart_formdata

from brst.handlers.errors import BrstError, InputError
from brst.handlers.wire import IMAGE_KEY, SCALE_KEY, STAIN_KEY, UNKNOWN_MIME, body_format

from .transport import Auth, Transport

#: endpoint URL scheme -> (client kind, TLS)
ENDPOINT_SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False),
                    "grpcs": ("grpc", True)}
HTTPS_PORT = 443
UNTRUSTED_HINT = "is the server's certificate signed by a CA in --ca-file (or the system's) and for this host?"
PLAINTEXT_HINT = "a TLS endpoint needs grpcs:// or --tls"


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
    challenge: str | None = None  # a 401's WWW-Authenticate

    def json(self) -> object:
        return json.loads(self.body)


def content_type(image: bytes) -> str:
    """The body's MIME type from its magic number (``application/octet-stream`` if unknown)."""
    return (body_format(image) or ("", UNKNOWN_MIME))[1]


def error_json(body: bytes) -> dict:
    """The ``{"code", "type", "message"}`` in an error body, or ``{"message": <text>}``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {"message": body.decode("utf-8", "replace")[:500]}
    return doc if isinstance(doc, dict) else {"message": str(doc)[:500]}


def multipart_form(fields: dict[str, tuple[bytes, str | None]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type; a field with a MIME type is a file part
    (its file name is the field's name)."""
    parts = {name: (name, value, mime) if mime else value for name, (value, mime) in fields.items()}
    return encode_multipart_formdata(parts)


def served_error(doc: object) -> bool:
    """Whether a successfully delivered body is in fact an error (see brst_handler's docstring)."""
    return isinstance(doc, dict) and "genes" not in doc and isinstance(doc.get("code"), int) and doc["code"] >= 400


class _ContextAdapter(HTTPAdapter):
    """Verifies HTTPS servers with one :class:`ssl.SSLContext` alone (no certifi bundle added)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        if self._context is not None:
            kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn, url: str, verify, cert) -> None:
        """Nothing to add: the context holds the roots and verifies (certificate and host name)."""


#: the errors of a kept-alive connection the server had closed: the request is sent once more
_DROPPED = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


def _causes(err: BaseException):
    """``err`` and what it wraps (``args``, ``__cause__``, ``__context__``), outermost first."""
    seen, stack = set(), [err]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [a for a in current.args if isinstance(a, BaseException)]
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]


def _reason(err: requests.RequestException) -> str:
    """The socket-level cause of a failed request (``[Errno 111] Connection refused``, ``timed out``,
    the TLS verification failure), else requests' own message."""
    socket_errors = [e for e in _causes(err) if isinstance(e, OSError) and not isinstance(e, requests.RequestException)]
    return str(socket_errors[-1]) if socket_errors else str(err)


class HttpConnections:
    """One :class:`requests.Session` per thread to ``base_url`` (keep-alive connections, pooled)."""

    def __init__(self, base_url: str, timeout_s: float = 60, transport: Transport | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrstError(base_url, "is not an http(s)://HOST:PORT URL")
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._ssl = (transport or Transport()).ssl_context() if parts.scheme == "https" else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def _session(self) -> requests.Session:
        """This thread's session (a new one after :meth:`close`)."""
        session = getattr(self._local, "session", None)
        if session is None or session not in self._sessions:
            session = requests.Session()
            session.trust_env = False  # no proxies, CA bundle or .netrc credentials from the environment
            session.mount("https://", _ContextAdapter(self._ssl))
            with self._sessions_lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> HttpResult:
        response = self._session().request(method, self.base_url + path, data=body, headers=headers,
                                           timeout=self._timeout_s, allow_redirects=False)
        return HttpResult(response.status_code, response.content, response.headers.get("WWW-Authenticate"))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> HttpResult:
        """Send a request; once more if the server had closed the kept-alive connection."""
        try:
            try:
                return self._send(method, path, body, headers or {})
            except requests.ConnectionError as err:
                if not any(isinstance(cause, _DROPPED) for cause in _causes(err)):
                    raise
                return self._send(method, path, body, headers or {})
        except requests.RequestException as err:
            raise BrstError(self.base_url, f"cannot reach the server: {_reason(err)}") from err

    def close(self) -> None:
        """Close every thread's session and its connections."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def bearer(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header TorchServe's token authorization expects (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_json(url: str, timeout_s: float = 30, token: str | None = None) -> object:
    """GET ``url`` (with a bearer ``token`` if given) and parse its JSON; anything but 200 raises BrstError."""
    parts = urlsplit(url)
    connections = HttpConnections(f"{parts.scheme}://{parts.netloc}", timeout_s)
    try:
        result = connections.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                                     headers=bearer(token))
    finally:
        connections.close()
    if result.status != 200:
        raise BrstError(url, f"answered {result.status}: {error_json(result.body).get('message', '')}")
    return result.json()


def transport_with_token(transport: Transport | None, token: str | None) -> Transport:
    """``transport`` with ``token`` as its credentials (scheme chosen by the secret's form) when it has none."""
    transport = transport or Transport()
    if token and transport.auth is None:
        return Transport(transport.tls, transport.ca_file, Auth(token))
    return transport


class HttpClient:
    """Predictions over TorchServe's inference API (``POST /predictions/<model>``)."""

    def __init__(self, base_url: str, model: str, token: str | None = None, timeout_s: float = 60,
                 transport: Transport | None = None) -> None:
        transport = transport_with_token(transport, token)
        self.connections = HttpConnections(base_url, timeout_s, transport)
        self.model = model
        self.auth = transport.auth
        self.scheme = self.auth.first_scheme if self.auth else None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.auth.header(self.scheme)} if self.auth else {}

    def post(self, body: bytes, um_per_px: float | None = None, mime: str | None = None,
             stain: dict | None = None) -> HttpResult:
        """The raw answer to one request (no status check).

        With ``um_per_px`` or ``stain`` the image goes as multipart/form-data (part ``data`` + fields
        ``um_per_px``, ``stain`` as JSON text): TorchServe 0.12 drops query parameters on ``/predictions``.
        """
        mime = mime or content_type(body)
        if um_per_px is not None or stain is not None:
            fields = {IMAGE_KEY: (body, mime)}
            if um_per_px is not None:
                fields[SCALE_KEY] = (repr(um_per_px).encode(), None)
            if stain is not None:
                fields[STAIN_KEY] = (json.dumps(stain).encode(), None)
            body, mime = multipart_form(fields)
        path = f"/predictions/{quote(self.model)}"
        result = self.connections.request("POST", path, body, {**self._headers(), "Content-Type": mime})
        retry = self.auth.answer_to(result.challenge, self.scheme) if self.auth and result.status == 401 else None
        if retry is not None:  # the server asks for the other scheme: answer in it, and keep it
            self.scheme = retry
            result = self.connections.request("POST", path, body, {**self._headers(), "Content-Type": mime})
        return result

    def predict(self, image: bytes, um_per_px: float | None = None, subject: str = "image",
                mime: str | None = None, stain: dict | None = None) -> dict | list:
        """The served JSON for one request; refusals raise :class:`RequestRejected`."""
        result = self.post(image, um_per_px, mime, stain)
        if result.status in (401, 403):
            raise BrstError(self.connections.base_url, unauthorized(result.status, result.challenge, self.scheme))
        if 400 <= result.status < 500:
            raise RequestRejected(subject, result.status, error_json(result.body))
        if result.status != 200:
            raise BrstError(self.connections.base_url, f"server error {result.status}: "
                                                       f"{error_json(result.body).get('message', '')}")
        return result.json()

    def close(self) -> None:
        """Close the connections of every thread that used this client."""
        self.connections.close()


class GrpcClient:
    """Predictions over TorchServe's gRPC inference API (``Predictions``), stubs from
    :mod:`brst.train.serve.ts_grpc`."""

    def __init__(self, target: str, model: str, token: str | None = None, timeout_s: float = 60,
                 transport: Transport | None = None) -> None:
        import grpc

        from .ts_grpc import inference_pb2, inference_pb2_grpc

        transport = transport_with_token(transport, token)
        self._grpc = grpc
        self._request = inference_pb2.PredictionsRequest
        self.target = target
        self.url = f"{'grpcs' if transport.tls else 'grpc'}://{target}"
        self.model = model
        self.timeout_s = timeout_s
        auth = transport.auth
        self.scheme = auth.first_scheme if auth else None
        self.metadata = (("authorization", auth.header(self.scheme)),) if auth else ()
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (grpc.secure_channel(target, transport.grpc_credentials(), options=options) if transport.tls
                        else grpc.insecure_channel(target, options=options))
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, inputs: dict[str, bytes]) -> bytes:
        """The raw ``prediction`` bytes of one ``Predictions`` call (gRPC errors propagate)."""
        request = self._request(model_name=self.model, input=inputs)
        return self.stub.Predictions(request, timeout=self.timeout_s, metadata=self.metadata).prediction

    def predict(self, image: bytes, um_per_px: float | None = None, subject: str = "image",
                stain: dict | None = None) -> dict | list:
        """The served JSON for one request; refusals raise :class:`RequestRejected`."""
        inputs = {IMAGE_KEY: image}
        if um_per_px is not None:
            inputs[SCALE_KEY] = repr(um_per_px).encode()
        if stain is not None:
            inputs[STAIN_KEY] = json.dumps(stain).encode()
        try:
            body = self.call(inputs)
        except self._grpc.RpcError as err:
            code, details = err.code(), (err.details() or "").splitlines()
            message = details[0] if details else code.name  # TorchServe appends its exception's class
            if code in (self._grpc.StatusCode.INVALID_ARGUMENT, self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                        self._grpc.StatusCode.NOT_FOUND):
                raise RequestRejected(subject, code.name, {"message": message}) from err
            if code in (self._grpc.StatusCode.UNAUTHENTICATED, self._grpc.StatusCode.PERMISSION_DENIED):
                raise BrstError(self.url, unauthorized(code.name, None, self.scheme)) from err
            if code == self._grpc.StatusCode.UNAVAILABLE:
                message += "; " + (UNTRUSTED_HINT if self.url.startswith("grpcs") else PLAINTEXT_HINT)
            raise BrstError(self.url, f"{code.name}: {message}") from err
        doc = json.loads(body)
        if served_error(doc):
            raise RequestRejected(subject, "INVALID_ARGUMENT", doc)
        return doc


def unauthorized(status: int | str, challenge: str | None, scheme: str | None) -> str:
    """One line for a refused credential: what was sent, what the server asks for."""
    sent = f"{scheme.capitalize()} credentials" if scheme else "no credentials"
    asks = f" (it asks for: {challenge[:200]})" if challenge else ""
    return (f"refused {sent} ({status}){asks}; set --token / --credentials-file (a token, or user:password "
            "for Basic) and --auth-scheme")


def make_client(endpoint: str, model: str, token: str | None = None, timeout_s: float = 60,
                transport: Transport | None = None) -> HttpClient | GrpcClient:
    """A client for ``http(s)://HOST[:PORT]`` or ``grpc(s)://HOST[:PORT]``; ``transport.tls`` makes
    ``http``/``grpc`` use TLS too."""
    transport = transport or Transport()
    parts = urlsplit(endpoint)
    kind, tls = ENDPOINT_SCHEMES.get(parts.scheme, (None, False))
    if kind is None or not parts.hostname:
        raise BrstError(f"--endpoint {endpoint}", "must be http(s)://HOST:PORT or grpc(s)://HOST:PORT")
    transport = Transport(tls or transport.tls, transport.ca_file, transport.auth)
    if kind == "http":
        base = f"{'https' if transport.tls else 'http'}://{parts.netloc}{parts.path}"
        return HttpClient(base, model, token, timeout_s, transport)
    target = parts.netloc if parts.port or not transport.tls else f"{parts.netloc}:{HTTPS_PORT}"
    return GrpcClient(target, model, token, timeout_s, transport)
