"""``fetch her2st`` against a local HTTP server on 127.0.0.1 serving ../shared/data."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.train.cli.main import cli
from brst.train.data.fetch import MANIFEST, fetch_her2st

IMAGE = "ST-imgs/C/C3/5714_HE_BT_D1.jpg"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single ``bytes=N-`` Range support (the stdlib handler has none)."""

    requests: list[tuple[str, str | None, int]] = []

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            RangeHandler.requests.append((self.path, spec, 200))
            return super().send_head()
        start = int(spec.removeprefix("bytes=").rstrip("-"))
        size = path.stat().st_size
        if start >= size:
            self.send_error(416)
            return None
        handle = open(path, "rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        RangeHandler.requests.append((self.path, spec, 206))
        return handle


class PlainHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(handler, directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/her2st"


@pytest.fixture()
def range_server(shared_data):
    RangeHandler.requests = []
    server, url = serve(RangeHandler, shared_data)
    yield url
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fetch_verifies_and_matches_the_source(range_server, her2st_root, tmp_path):
    paths = fetch_her2st(tmp_path, ["C3"], range_server)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == sorted(
        ["ST-cnts/C3.tsv.gz", "ST-spotfiles/C3_selection.tsv", IMAGE])
    for path in paths:
        assert path.read_bytes() == (her2st_root / path.relative_to(tmp_path)).read_bytes()
    assert not list(tmp_path.rglob("*.part"))
    assert (tmp_path / "SHA256SUMS").read_text().count("\n") == 3
    RangeHandler.requests = []
    fetch_her2st(tmp_path, ["C3"], range_server)
    assert RangeHandler.requests == []  # verified files are not fetched again


def test_fetch_resumes_with_range(range_server, her2st_root, tmp_path):
    data = (her2st_root / IMAGE).read_bytes()
    part = tmp_path / (IMAGE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])
    fetch_her2st(tmp_path, ["C3"], range_server)
    image_requests = [r for r in RangeHandler.requests if r[0].endswith(".jpg")]
    assert image_requests == [(f"/her2st/{IMAGE}", f"bytes={len(data) // 2}-", 206)]
    assert hashlib.sha256((tmp_path / IMAGE).read_bytes()).hexdigest() == MANIFEST[IMAGE]


def test_fetch_restarts_a_corrupt_partial(range_server, tmp_path):
    part = tmp_path / (IMAGE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)
    fetch_her2st(tmp_path, ["C3"], range_server)
    assert hashlib.sha256((tmp_path / IMAGE).read_bytes()).hexdigest() == MANIFEST[IMAGE]


def test_server_without_range_support(shared_data, her2st_root, tmp_path):
    server, url = serve(PlainHandler, shared_data)
    try:
        data = (her2st_root / IMAGE).read_bytes()
        part = tmp_path / (IMAGE + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(data[:1000])
        fetch_her2st(tmp_path, ["C3"], url)
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / IMAGE).read_bytes() == data


def test_wrong_content_is_rejected(tmp_path):
    fake = tmp_path / "mirror" / "her2st"
    for relative in MANIFEST:
        if "C4" in relative:
            (fake / relative).parent.mkdir(parents=True, exist_ok=True)
            (fake / relative).write_bytes(b"not the real file")
    server, url = serve(PlainHandler, tmp_path / "mirror")
    try:
        with pytest.raises(BrstError, match="checksum mismatch"):
            fetch_her2st(tmp_path / "out", ["C4"], url)
    finally:
        server.shutdown()
        server.server_close()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_offline_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(cli, ["fetch", "her2st", "--dest", str(tmp_path / "d"), "--sections", "C2",
                                      "--base-url", f"http://127.0.0.1:{free_port()}/her2st", "--timeout", "5"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("brst-train: error: http://127.0.0.1:") and "offline?" in lines[-1]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_file_on_server(range_server, tmp_path):
    with pytest.raises(BrstError, match="HTTP 404"):
        fetch_her2st(tmp_path, ["C2"], range_server.replace("/her2st", "/nowhere"))


def test_unknown_section(tmp_path):
    with pytest.raises(BrstError, match="no checksums for"):
        fetch_her2st(tmp_path, ["Z9"])
