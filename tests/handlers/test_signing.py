"""Archive authenticity: ``archive --sign``, and servers that trust one public key (issue 19, item 6)."""
from __future__ import annotations

import json
import logging
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from handler_context import make_context, unpack

from brst.handlers.errors import BrstError
from brst.handlers.runtime_check import check_archives, main
from brst.handlers.signing import PUBLIC_KEY_ENV, SIGNATURE_FILE, verify_directory, verify_mar
from brst.train.cli.main import cli

pytestmark = pytest.mark.slow  # the session's fit + archives
REPO_ROOT = Path(__file__).resolve().parents[2]


def keygen(folder: Path, name: str = "archive") -> tuple[Path, Path]:
    result = CliRunner().invoke(cli, ["keygen", "--out-dir", str(folder), "--name", name])
    assert result.exit_code == 0, result.output
    return folder / f"{name}.key", folder / f"{name}.pub"


def archive(checkpoint: Path, store: Path, *extra: str) -> Path:
    result = CliRunner().invoke(cli, ["archive", "--checkpoint", str(checkpoint), "--model-name", "brst",
                                      "--model-store", str(store), "--force", *extra])
    assert result.exit_code == 0, result.output
    return store / "brst.mar"


def replaced(mar: Path, member: str, content: bytes, out: Path) -> Path:
    """A copy of ``mar`` with ``member`` replaced by ``content``."""
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w") as copy:
        for item in source.infolist():
            copy.writestr(item, content if item.filename == member else source.read(item))
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return keygen(folder), keygen(folder, "other")


@pytest.fixture(scope="module")
def signed(served_checkpoint, keys, tmp_path_factory) -> Path:
    (private, _), _ = keys
    return archive(served_checkpoint, tmp_path_factory.mktemp("signed"), "--sign", str(private))


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    (private, public), _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    again = CliRunner().invoke(cli, ["keygen", "--out-dir", str(private.parent)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output


def test_a_signed_archive_verifies_and_names_its_key(signed, keys):
    (_, public), _ = keys
    document = json.loads(zipfile.ZipFile(signed).read(SIGNATURE_FILE))
    assert verify_mar(signed, public) == document["key_id"]
    check_archives([signed], public)


def test_unsigned_other_key_and_changed_files_are_refused(signed, served_archive, keys, tmp_path):
    (_, public), (_, other_public) = keys
    with pytest.raises(BrstError, match="is unsigned .* brst-train archive --sign KEY"):
        check_archives([served_archive], public)
    with pytest.raises(BrstError, match="is signed with key [0-9a-f]{16}, this server trusts"):
        verify_mar(signed, other_public)
    facts = json.loads(zipfile.ZipFile(signed).read("brst-model.json"))
    facts["genes"][0] = "TAMPERED"
    edited = replaced(signed, "brst-model.json", json.dumps(facts).encode(), tmp_path / "edited.mar")
    with pytest.raises(BrstError, match="brst-model.json changed after signing"):
        verify_mar(edited, public)
    document = json.loads(zipfile.ZipFile(signed).read(SIGNATURE_FILE))
    document["files"]["brst-model.json"] = "0" * 64  # the attacker updates the digest too
    forged = replaced(edited, SIGNATURE_FILE, json.dumps(document).encode(), tmp_path / "forged.mar")
    with pytest.raises(BrstError, match="does not verify"):
        verify_mar(forged, public)


def test_the_handler_refuses_an_unsigned_archive_with_one_log_line(served_archive, signed, keys, tmp_path,
                                                                    monkeypatch, caplog):
    from brst.handlers.brst_handler import BrstHandler

    (_, public), _ = keys
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    plain = unpack(served_archive, tmp_path / "plain")
    with caplog.at_level(logging.ERROR, logger="brst.handlers.brst_handler"), pytest.raises(BrstError):
        BrstHandler().initialize(make_context(plain, 1))
    assert [r.getMessage() for r in caplog.records if r.name == "brst.handlers.brst_handler"] == [f"refusing to load the archive: {plain}: is unsigned (no "
                                                        f"{SIGNATURE_FILE}); this server accepts only archives "
                                                        f"signed with key {verify_mar(signed, public)}: "
                                                        "brst-train archive --sign KEY"]
    handler = BrstHandler()
    handler.initialize(make_context(unpack(signed, tmp_path / "signed"), 1))
    assert handler.initialized and verify_directory(tmp_path / "signed", public)


def test_the_serving_entrypoint_check_reads_the_key_from_the_environment(served_archive, signed, keys,
                                                                          monkeypatch, capsys):
    (_, public), _ = keys
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    assert main([str(signed)]) == 0
    assert main([str(signed), str(served_archive)]) == 2
    assert capsys.readouterr().err.strip().endswith("brst-train archive --sign KEY")


def test_serve_with_a_public_key_refuses_unsigned_archives_before_starting(served_archive, keys, tmp_path):
    (_, public), _ = keys
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(served_archive, store / "brst.mar")
    result = CliRunner().invoke(cli, ["serve", "--model-store", str(store), "--public-key", str(public),
                                      "--config", str(REPO_ROOT / "deploy" / "config.properties"),
                                      "--run-dir", str(tmp_path / "run"), "--free-ports", "--check"])
    assert result.exit_code == 2 and "brst.mar: is unsigned" in result.output
    assert not (tmp_path / "run" / "logs").exists()
