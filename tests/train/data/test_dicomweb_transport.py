"""DICOMweb credentials never travel unencrypted to another machine unless that is asked for.

The refusal comes before any connection, so no server is needed to see it; with
``--allow-insecure`` the open goes on (a warning first) and reaches the network, where the host
``pacs.invalid`` (a reserved name, RFC 2606) does not resolve. Loopback stays allowed: the
Orthanc tests (tests/orthanc_fixtures.py) send credentials to 127.0.0.1 over plain HTTP.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.train.cli.main import cli
from brst.train.sources.dicom_image import DicomWebSeries, check_transport
from brst.train.sources.open import open_image

SERIES = "studies/1.2.3/series/4.5.6"
REMOTE = f"dicomweb://pacs.invalid:8042/dicom-web/{SERIES}"


def _decide(url: str, credentials: str | None) -> None:
    check_transport(url, DicomWebSeries.parse(url).root, credentials)


@pytest.mark.parametrize("url, credentials", [
    (REMOTE, None),                                              # nothing secret to send
    (f"dicomwebs://pacs.invalid/dicom-web/{SERIES}", "alice:pw"),  # HTTPS
    (f"dicomweb://127.0.0.1:8042/dicom-web/{SERIES}", "alice:pw"),  # this machine
    (f"dicomweb://localhost/dicom-web/{SERIES}", "Bearer t"),
    (f"dicomweb://[::1]:8042/dicom-web/{SERIES}", "alice:pw"),
])
def test_allowed_without_asking(url, credentials, monkeypatch, caplog):
    monkeypatch.delenv("BRST_ALLOW_INSECURE", raising=False)
    with caplog.at_level(logging.WARNING):
        _decide(url, credentials)
    assert not caplog.records


@pytest.mark.parametrize("credentials", ["alice:pw", "Bearer t"])
@pytest.mark.parametrize("host", ["pacs.invalid:8042", "10.1.2.3", "[fd00::1]"])
def test_credentials_over_plain_http_to_another_machine_are_refused(host, credentials, monkeypatch):
    monkeypatch.delenv("BRST_ALLOW_INSECURE", raising=False)
    url = f"dicomweb://{host}/dicom-web/{SERIES}"
    with pytest.raises(BrstError, match="unencrypted") as caught:
        _decide(url, credentials)
    assert str(caught.value).startswith(url) and "pw" not in str(caught.value)
    monkeypatch.setenv("BRST_ALLOW_INSECURE", "0")
    with pytest.raises(BrstError, match="unencrypted"):
        _decide(url, credentials)


def test_opening_refuses_before_connecting_and_goes_on_when_allowed(monkeypatch, caplog):
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS", "alice:pw")
    monkeypatch.delenv("BRST_ALLOW_INSECURE", raising=False)
    with pytest.raises(BrstError, match="would send the DICOMweb credentials unencrypted"):
        open_image(REMOTE)
    monkeypatch.setenv("BRST_ALLOW_INSECURE", "1")
    with caplog.at_level(logging.WARNING), pytest.raises(BrstError, match="no DICOMweb server answers"):
        open_image(REMOTE)
    assert any("over plain HTTP (BRST_ALLOW_INSECURE=1)" in r.getMessage() for r in caplog.records)


def test_predict_slide_says_so_in_one_line_and_allow_insecure_goes_on(served_checkpoint: Path, tmp_path: Path,
                                                                      monkeypatch):
    monkeypatch.delenv("BRST_ALLOW_INSECURE", raising=False)
    args = ["predict-slide", "--checkpoint", str(served_checkpoint), "--slide", REMOTE, "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    env = {"BRST_DICOMWEB_CREDENTIALS": "alice:pw"}
    refused = CliRunner().invoke(cli, args, env=env)
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1] == (
        f"brst-train: error: {REMOTE}: would send the DICOMweb credentials unencrypted (plain HTTP); use "
        "dicomwebs:// (HTTPS), or --allow-insecure (BRST_ALLOW_INSECURE=1) on a network you trust")
    allowed = CliRunner().invoke(cli, [*args, "--allow-insecure"], env=env)
    assert allowed.exit_code == 2
    assert "no DICOMweb server answers" in allowed.output.strip().splitlines()[-1]
    assert not (tmp_path / "o" / "summary.json").exists()
