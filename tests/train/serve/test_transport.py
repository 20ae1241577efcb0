"""The clients speak TLS and send the credentials in the scheme the server asks for.

Servers here are real and on loopback, with a certificate from a CA the test makes itself
(``cryptography``): a gRPC server implementing TorchServe's inference service (the stubs from
``brst.train.serve.ts_grpc``; its answer is a fixed served-shaped JSON) and an HTTPS server
that acts as the hospital overlay's Ingress does (k8s/overlays/hospital/ingress.yaml: TLS,
``auth-type: basic``: a request without the right ``Authorization: Basic`` gets 401 with
``WWW-Authenticate: Basic realm="brst"``). TorchServe itself is not behind them: what is
tested is the client's side of the connection.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.train.cli.main import cli
from brst.train.serve.client import make_client
from brst.train.serve.transport import Auth, Transport

USER, PASSWORD = "radiology-viewer", "s3cret-token"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
ANSWER = {"genes": ["ERBB2"], "values": [1.5], "units": "log1p"}


def _certificate(subject: str, key, issuer_key, issuer_name, ca: bool, sans=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate it signed for localhost / 127.0.0.1, and another CA's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("brst test CA", ca_key, ca_key, None, ca=True)
    server = _certificate("localhost", server_key, ca_key, ca.subject, ca=False,
                          sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    other = _certificate("another CA", other_key, other_key, None, ca=True)
    (folder / "ca.pem").write_bytes(_pem(ca))
    (folder / "other-ca.pem").write_bytes(_pem(other))
    (folder / "server.pem").write_bytes(_pem(server))
    (folder / "server.key").write_bytes(_pem(server_key))
    return folder


@pytest.fixture(scope="module")
def grpc_tls(pki):
    """A TLS gRPC server with TorchServe's ``Predictions`` that wants ``authorization: Basic``; its port
    and the authorization values it received."""
    import grpc

    from brst.train.serve.ts_grpc import inference_pb2, inference_pb2_grpc

    received = []

    class Inference(inference_pb2_grpc.InferenceAPIsServiceServicer):
        def Predictions(self, request, context):  # noqa: N802 - the gRPC service's method name
            sent = dict(context.invocation_metadata()).get("authorization")
            received.append(sent)
            if sent != BASIC:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "401 Authorization Required")
            return inference_pb2.PredictionResponse(prediction=json.dumps(ANSWER).encode())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Inference(), server)
    credentials = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port, received
    server.stop(grace=None)


class IngressLike(BaseHTTPRequestHandler):
    """``POST /predictions/<model>``: 200 with the answer for the scheme ``self.server.wants``, else 401."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        sent = self.headers.get("Authorization")
        self.server.received.append(sent)
        wants = BASIC if self.server.wants == "basic" else f"Bearer {USER}:{PASSWORD}"
        body, status = (json.dumps(ANSWER).encode(), 200) if sent == wants else (b"<html>401</html>", 401)
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", f'{self.server.wants.capitalize()} realm="brst"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class KeepAliveIngress(IngressLike):
    """:class:`IngressLike` over HTTP/1.1 (the connection stays open between requests), noting the
    client address (one per connection) of each request."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.server.peers.append(self.client_address)
        super().do_POST()


@contextlib.contextmanager
def https_server(pki, handler: type[BaseHTTPRequestHandler], wants: str):
    """An HTTPS server on 127.0.0.1 asking for ``wants`` ("basic" or "bearer")."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.wants, server.received, server.peers = wants, [], []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["basic"])
def https(pki, request):
    """An HTTPS server on 127.0.0.1 asking for ``request.param`` ("basic" or "bearer")."""
    with https_server(pki, IngressLike, request.param) as server:
        yield server


def _basic(pki, **options) -> Transport:
    return Transport(**{"ca_file": pki / "ca.pem", "auth": Auth(f"{USER}:{PASSWORD}"), **options})


def test_grpcs_with_the_ca_file_sends_basic_credentials(grpc_tls, pki):
    port, received = grpc_tls
    client = make_client(f"grpcs://localhost:{port}", "brst", transport=_basic(pki))
    assert client.predict(b"\x89PNG...") == ANSWER
    assert received[-1] == BASIC
    client.close()


def test_tls_flag_turns_grpc_into_grpcs(grpc_tls, pki):
    port, _ = grpc_tls
    client = make_client(f"grpc://127.0.0.1:{port}", "brst", transport=_basic(pki, tls=True))
    assert client.predict(b"x") == ANSWER
    client.close()


@pytest.mark.parametrize("endpoint, transport, expected", [
    ("grpc://127.0.0.1:{port}", Transport(auth=Auth(f"{USER}:{PASSWORD}")),
     "UNAVAILABLE: .*; a TLS endpoint needs grpcs:// or --tls"),  # plaintext to a TLS port
    ("grpcs://127.0.0.1:{port}", Transport(auth=Auth(f"{USER}:{PASSWORD}")),
     r"UNAVAILABLE: .*; is the server's certificate signed by a CA in --ca-file"),  # the system's roots
    ("grpcs://127.0.0.1:{port}", "other-ca.pem", "UNAVAILABLE: .*--ca-file"),  # a CA that did not sign it
    ("grpcs://127.0.0.1:{port}", "bearer", r"refused Bearer credentials \(UNAUTHENTICATED\)"),
])
def test_grpc_failures_are_one_clear_error(grpc_tls, pki, endpoint, transport, expected):
    port, _ = grpc_tls
    if transport == "other-ca.pem":
        transport = Transport(ca_file=pki / "other-ca.pem", auth=Auth(f"{USER}:{PASSWORD}"))
    elif transport == "bearer":
        transport = Transport(ca_file=pki / "ca.pem", auth=Auth(f"{USER}:{PASSWORD}", "bearer"))
    client = make_client(endpoint.format(port=port), "brst", timeout_s=10, transport=transport)
    with pytest.raises(BrstError, match=expected) as caught:
        client.predict(b"x")
    assert str(caught.value).startswith(endpoint.format(port=port)) and PASSWORD not in str(caught.value)
    client.close()


def test_https_sends_basic_at_once_to_an_ingress_that_asks_for_it(https, pki):
    client = make_client(f"https://localhost:{https.server_port}", "brst", transport=_basic(pki))
    assert client.predict(b"x") == ANSWER and client.predict(b"y") == ANSWER
    assert https.received == [BASIC, BASIC]


@pytest.mark.parametrize("https", ["bearer"], indirect=True)
def test_a_401_asking_for_the_other_scheme_is_answered_in_it(https, pki):
    """user:password looks like Basic; the server's WWW-Authenticate asks for Bearer: retried once, then kept."""
    client = make_client(f"https://localhost:{https.server_port}", "brst", transport=_basic(pki))
    assert client.predict(b"x") == ANSWER and client.predict(b"y") == ANSWER
    bearer = f"Bearer {USER}:{PASSWORD}"
    assert https.received == [BASIC, bearer, bearer]


def test_https_refusals_name_the_scheme_sent_and_asked(https, pki):
    client = make_client(f"https://localhost:{https.server_port}", "brst",
                         transport=Transport(ca_file=pki / "ca.pem", auth=Auth("just-a-token")))
    with pytest.raises(BrstError, match=r'refused Bearer credentials \(401\) \(it asks for: Basic realm="brst"\)'):
        client.predict(b"x")
    assert https.received == ["Bearer just-a-token"]  # Basic needs a user: nothing to retry with
    untrusted = make_client(f"https://localhost:{https.server_port}", "brst", transport=_basic(pki, ca_file=None))
    with pytest.raises(BrstError, match="cannot reach the server: .*CERTIFICATE_VERIFY_FAILED"):
        untrusted.predict(b"x")


def test_each_thread_keeps_its_connection_alive(pki):
    """One session per thread: a thread's requests share one kept-alive TLS connection; each new thread
    opens its own; ``close`` ends them."""
    with https_server(pki, KeepAliveIngress, "basic") as server:
        client = make_client(f"https://localhost:{server.server_port}", "brst", transport=_basic(pki))
        assert [client.predict(body) for body in (b"a", b"b", b"c")] == [ANSWER] * 3
        assert len(server.peers) == 3 and len(set(server.peers)) == 1
        both_started = threading.Barrier(2)

        def two_requests(body: bytes) -> list:
            both_started.wait(timeout=10)
            return [client.predict(body), client.predict(body)]

        with ThreadPoolExecutor(max_workers=2) as pool:
            assert list(pool.map(two_requests, (b"x", b"y"))) == [[ANSWER] * 2] * 2
        assert len(server.peers) == 7 and len(set(server.peers)) == 3
        assert server.received == [BASIC] * 7
        client.close()
        assert client.predict(b"z") == ANSWER  # a closed client's thread opens a new session
        assert len(set(server.peers)) == 4


def test_basic_needs_a_user():
    with pytest.raises(BrstError, match="--auth-scheme basic: needs credentials of the form user:password"):
        Auth("token", "basic")


@pytest.mark.parametrize("protocol", ["https", "grpcs"])
def test_predict_command_through_an_ingress_like_endpoint(https, grpc_tls, pki, tmp_path: Path, protocol):
    """``brst-train predict`` as docs/DEPLOY.md gives it, with the credentials in a file."""
    patch = tmp_path / "patch.png"
    patch.write_bytes(b"\x89PNG not decoded by these servers")
    secret = tmp_path / "api-credentials"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    port = https.server_port if protocol == "https" else grpc_tls[0]
    result = CliRunner().invoke(cli, ["predict", "--endpoint", f"{protocol}://localhost:{port}", "--model", "brst",
                                      "--ca-file", str(pki / "ca.pem"), str(patch)],
                                env={"BRST_API_CREDENTIALS_FILE": str(secret), "BRST_TS_TOKEN": None})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"image": str(patch), "prediction": ANSWER}
    both = CliRunner().invoke(cli, ["predict", "--endpoint", f"{protocol}://localhost:{port}", "--token", "t",
                                    "--credentials-file", str(secret), str(patch)])
    assert both.exit_code == 2
    assert both.output.strip() == "brst-train: error: --token/--credentials-file: give one of them, not both"
