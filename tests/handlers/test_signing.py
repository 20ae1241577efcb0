"""Archive signatures: every entry, the model name and version, a key ring; refusals before any archive code runs.

Archives are built by ``brst-train archive --sign`` (the real torch-model-archiver); tampered
copies are what an attacker with write access to the model store could make: an entry edited,
added (also through torch-model-archiver itself) or repeated, with the original signature kept.
The shell-level checks run ``python -m brst.handlers.runtime_check`` and
``python -m brst.handlers.serving_store`` (the serving image's entrypoint) as subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from handler_context import make_context, unpack

from brst.handlers.errors import BrstError
from brst.handlers.runtime_check import check_archives
from brst.handlers.serving_store import plan_serving
from brst.handlers.signed_mar import MANIFEST, Expected, verify_directory, verify_mar
from brst.handlers.signing import ALLOW_UNSIGNED_ENV, PUBLIC_KEY_ENV, SIGNATURE_FILE, KeyRing
from brst.train.cli.main import cli

pytestmark = pytest.mark.slow  # the session's fit + archives
REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER_FILE = "brst_handler.py"
EVIL_LINE = b"\nimport os\nos.environ['BRST_PWNED'] = '1'\n"


def keygen(folder: Path, name: str = "archive") -> tuple[Path, Path]:
    result = CliRunner().invoke(cli, ["keygen", "--out-dir", str(folder), "--name", name])
    assert result.exit_code == 0, result.output
    return folder / f"{name}.key", folder / f"{name}.pub"


def archive(checkpoint: Path, store: Path, *extra: str, name: str = "brst") -> Path:
    result = CliRunner().invoke(cli, ["archive", "--checkpoint", str(checkpoint), "--model-name", name,
                                      "--model-store", str(store), "--force", *extra])
    assert result.exit_code == 0, result.output
    return store / f"{name}.mar"


def rewritten(mar: Path, out: Path, replace: dict[str, bytes] | None = None,
              add: list[tuple[str, bytes]] | None = None, before: list[tuple[str, bytes]] | None = None) -> Path:
    """A copy of ``mar`` (its signature kept) with entries replaced, added at the end, or added first."""
    replace = replace or {}
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w") as copy:
        for name, content in before or []:
            copy.writestr(name, content)
        for item in source.infolist():
            copy.writestr(item, replace.get(item.filename, source.read(item)))
        for name, content in add or []:
            copy.writestr(name, content)
    return out


def rearchived_with_package(signed: Path, work: Path) -> Path:
    """``signed`` rebuilt by torch-model-archiver with an added ``brst/handlers/__init__.py`` (which
    would shadow the installed package on the worker's path) and the original signature put back."""
    files = unpack(signed, work / "unpacked")
    package = work / "package"  # torch-model-archiver adds a folder's contents at the archive's root
    (package / "brst" / "handlers").mkdir(parents=True)
    (package / "brst" / "handlers" / "__init__.py").write_bytes(EVIL_LINE)
    model = json.loads((files / MANIFEST).read_text())["model"]
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", model["modelName"],
                    "--version", model["modelVersion"], "--serialized-file", str(files / "brst-weights.pt"),
                    "--handler", str(files / HANDLER_FILE), "--config-file", str(files / "model-config.yaml"),
                    "--extra-files", f"{files / 'brst-model.json'},{files / SIGNATURE_FILE},{package}",
                    "--export-path", str(work), "--force"], check=True, capture_output=True, timeout=300)
    built = work / f"{model['modelName']}.mar"
    assert "brst/handlers/__init__.py" in zipfile.ZipFile(built).namelist()
    return built


def runtime_check(env_keys: str, *archives: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m brst.handlers.runtime_check`` with ``BRST_ARCHIVE_PUBLIC_KEY=env_keys``."""
    return subprocess.run([sys.executable, "-m", "brst.handlers.runtime_check", *map(str, archives)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, PUBLIC_KEY_ENV: env_keys, **env})


def serving_store(store: Path, private_parent: Path, *models: str, **env: str) -> subprocess.CompletedProcess:
    """The serving image's check (``python -m brst.handlers.serving_store``), environment ``env`` only."""
    clean = {key: value for key, value in os.environ.items() if key not in (PUBLIC_KEY_ENV, ALLOW_UNSIGNED_ENV)}
    return subprocess.run([sys.executable, "-m", "brst.handlers.serving_store", "--model-store", str(store),
                           "--private-parent", str(private_parent), *models],
                          capture_output=True, text=True, timeout=120, env={**clean, **env})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return keygen(folder), keygen(folder, "other")


@pytest.fixture(scope="module")
def signed(served_checkpoint, keys, tmp_path_factory) -> Path:
    (private, _), _ = keys
    return archive(served_checkpoint, tmp_path_factory.mktemp("signed"), "--sign", str(private), "--version", "v2")


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    (private, public), _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    again = CliRunner().invoke(cli, ["keygen", "--out-dir", str(private.parent)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output


def test_the_signature_lists_every_entry_the_name_and_version_and_names_its_key(signed, keys):
    (_, public), _ = keys
    with zipfile.ZipFile(signed) as mar:
        document = json.loads(mar.read(SIGNATURE_FILE))
        others = {info.filename: info.file_size for info in mar.infolist() if info.filename != SIGNATURE_FILE}
    assert {name: entry["size"] for name, entry in document["entries"].items()} == others
    assert {HANDLER_FILE, "model-config.yaml", MANIFEST, "brst-weights.pt", "brst-model.json"} <= set(others)
    assert (document["model_name"], document["model_version"]) == ("brst", "v2")
    assert verify_mar(signed, KeyRing.load([public])).key_id == document["key_id"]
    assert runtime_check(str(public), signed).returncode == 0


TAMPERING = {
    "edited handler": lambda mar, work: rewritten(mar, work / "brst.mar", replace={
        HANDLER_FILE: zipfile.ZipFile(mar).read(HANDLER_FILE) + EVIL_LINE}),
    "model-config.yaml gained limits": lambda mar, work: rewritten(mar, work / "brst.mar", replace={
        "model-config.yaml": zipfile.ZipFile(mar).read("model-config.yaml")
        + b"\nhandler:\n  limits:\n    max_pixels: 1000000000000\n"}),
    "added brst/handlers/__init__.py": lambda mar, work: rearchived_with_package(mar, work),
    "repeated entry name": lambda mar, work: rewritten(mar, work / "brst.mar", before=[
        (HANDLER_FILE, zipfile.ZipFile(mar).read(HANDLER_FILE) + EVIL_LINE)]),
    "absolute path": lambda mar, work: rewritten(mar, work / "brst.mar", add=[("/etc/brst/x.py", b"")]),
    "dot-dot path": lambda mar, work: rewritten(mar, work / "brst.mar", add=[("../x.py", b"")]),
}
REFUSAL = {
    "edited handler": f"entry '{HANDLER_FILE}' changed after signing",
    "model-config.yaml gained limits": "entry 'model-config.yaml' changed after signing",
    "added brst/handlers/__init__.py": "holds 'brst/handlers/__init__.py', which its signature does not list",
    "repeated entry name": f"entry '{HANDLER_FILE}' appears more than once",
    "absolute path": "entry '/etc/brst/x.py' is an absolute or Windows path",
    "dot-dot path": "entry '../x.py' is a path with an empty, '.' or '..' part",
}


@pytest.mark.filterwarnings("ignore:Duplicate name")  # Python's zip writer, making the repeated entry
@pytest.mark.parametrize("damage", sorted(TAMPERING))
def test_a_tampered_signed_archive_is_refused_before_any_of_its_code_runs(signed, keys, tmp_path, damage):
    (_, public), _ = keys
    tampered = TAMPERING[damage](signed, tmp_path)
    done = runtime_check(str(public), tampered)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"brst: error: {tampered}: ") and REFUSAL[damage] in line, line


def _with_entry_mode(mar: Path, out: Path, entry: zipfile.ZipInfo, content: bytes) -> Path:
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w") as copy:
        for item in source.infolist():
            copy.writestr(item, source.read(item))
        copy.writestr(entry, content)
    return out


def test_links_and_directory_entries_are_refused(signed, keys, tmp_path):
    (_, public), _ = keys
    link = zipfile.ZipInfo("brst/handlers/__init__.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    folder = zipfile.ZipInfo("brst/")
    folder.external_attr = (stat.S_IFDIR | 0o755) << 16
    keyring = KeyRing.load([public])
    with pytest.raises(BrstError, match="entry 'brst/handlers/__init__.py' is a symbolic link"):
        verify_mar(_with_entry_mode(signed, tmp_path / "link.mar", link, b"/usr/lib/evil.py"), keyring)
    with pytest.raises(BrstError, match="entry 'brst/' is a directory entry"):
        verify_mar(_with_entry_mode(signed, tmp_path / "dir.mar", folder, b""), keyring)


def test_unsigned_other_key_and_forged_documents_are_refused(signed, served_archive, keys, tmp_path):
    (_, public), (_, other_public) = keys
    keyring = KeyRing.load([public])
    with pytest.raises(BrstError, match="is unsigned .* brst-train archive --sign KEY"):
        check_archives([served_archive], keyring)
    with pytest.raises(BrstError, match="is signed with key [0-9a-f]{16}, this server trusts [0-9a-f]{16}$"):
        verify_mar(signed, KeyRing.load([other_public]))
    document = json.loads(zipfile.ZipFile(signed).read(SIGNATURE_FILE))
    handler = zipfile.ZipFile(signed).read(HANDLER_FILE) + EVIL_LINE
    document["entries"][HANDLER_FILE]["size"] = len(handler)  # the attacker updates the manifest too
    forged = rewritten(signed, tmp_path / "forged.mar", replace={HANDLER_FILE: handler,
                                                                 SIGNATURE_FILE: json.dumps(document).encode()})
    with pytest.raises(BrstError, match="does not verify"):
        verify_mar(forged, keyring)


def test_an_archive_signed_for_another_version_or_name_is_refused(served_checkpoint, signed, keys, tmp_path):
    """A withdrawn archive, validly signed, cannot stand in for the pinned version or another model."""
    (private, public), _ = keys
    withdrawn = archive(served_checkpoint, tmp_path / "old", "--sign", str(private), "--version", "v1")
    assert runtime_check(str(public), withdrawn).returncode == 0  # nothing pinned: any signed version
    done = runtime_check(str(public), withdrawn, BRST_MODEL_VERSIONS="brst=v2")
    assert done.returncode == 2 and "is signed for version 'v1' of 'brst'; this server expects version 'v2'" in done.stderr
    assert runtime_check(str(public), signed, BRST_MODEL_VERSIONS="brst=v2").returncode == 0
    renamed = tmp_path / "other.mar"
    shutil.copy(signed, renamed)
    done = runtime_check(str(public), renamed)
    assert done.returncode == 2 and "is signed for model 'brst', served here as 'other'" in done.stderr


def test_a_key_ring_accepts_every_listed_key_and_no_removed_one(served_checkpoint, signed, keys, tmp_path):
    (_, old_public), (new_private, new_public) = keys
    by_new = archive(served_checkpoint, tmp_path / "new", "--sign", str(new_private))
    both = os.pathsep.join([str(old_public), str(new_public)])
    assert runtime_check(both, signed, by_new).returncode == 0
    ring_dir = tmp_path / "ring"
    ring_dir.mkdir()
    shutil.copy(old_public, ring_dir / "2025.pub")
    shutil.copy(new_public, ring_dir / "2026.pem")
    assert runtime_check(str(ring_dir), signed, by_new).returncode == 0
    (ring_dir / "2025.pub").unlink()  # the old key is retired
    done = runtime_check(str(ring_dir), signed)
    assert done.returncode == 2 and "is signed with key" in done.stderr and "this server trusts" in done.stderr
    assert runtime_check(str(ring_dir), by_new).returncode == 0


def test_the_serving_image_fails_closed_without_a_key_unless_told_to_serve_unsigned(served_archive, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(served_archive, store / "brst.mar")
    refused = serving_store(store, tmp_path, "brst=brst.mar")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"brst: error: no archive public key: set {PUBLIC_KEY_ENV} to the trusted public key(s), or "
        f"{ALLOW_UNSIGNED_ENV}=1 to serve unsigned archives"]
    allowed = serving_store(store, tmp_path, "brst=brst.mar", **{ALLOW_UNSIGNED_ENV: "1"})
    assert allowed.returncode == 0 and allowed.stdout.splitlines() == [str(store), "brst=brst.mar"]
    assert "WARNING: serving UNSIGNED archives" in allowed.stderr


@pytest.mark.parametrize("other", ["old.tar.gz", "old.model", "unpacked"])
def test_with_a_key_models_all_serves_signed_mar_files_only(signed, keys, tmp_path, other):
    (_, public), _ = keys
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(signed, store / "brst.mar")
    if other == "unpacked":
        unpack(signed, store / other)
    else:
        (store / other).write_bytes(b"an archive TorchServe would load unchecked")
    done = serving_store(store, tmp_path, "all", **{PUBLIC_KEY_ENV: str(public)})
    assert done.returncode == 2, done.stdout
    assert f"{store / other}: is not a signed .mar archive" in done.stderr.strip().splitlines()[-1]
    shutil.rmtree(store / other) if other == "unpacked" else (store / other).unlink()
    done = serving_store(store, tmp_path, "all", **{PUBLIC_KEY_ENV: str(public)})
    assert done.returncode == 0, done.stderr
    served_store, registration = done.stdout.splitlines()
    assert registration == "brst=brst.mar" and Path(served_store).parent == tmp_path


def test_a_registration_names_a_file_of_the_store_only(signed, keys, tmp_path):
    (_, public), _ = keys
    (tmp_path / "store").mkdir()
    with pytest.raises(BrstError, match="must name a file in the model store, not a path"):
        plan_serving(tmp_path / "store", {"brst": f"../{signed.parent.name}/brst.mar"}, tmp_path / "private",
                     KeyRing.load([public]), unsigned_allowed=False)
    assert not list((tmp_path / "private").iterdir())


def test_a_swap_on_the_shared_store_after_the_check_is_not_served(signed, keys, tmp_path):
    (_, public), _ = keys
    store, private = tmp_path / "store", tmp_path / "private"
    store.mkdir()
    shutil.copy(signed, store / "brst.mar")
    plan = plan_serving(store, {"brst": "brst.mar"}, private, KeyRing.load([public]), unsigned_allowed=False)
    rewritten(signed, store / "brst.mar", replace={HANDLER_FILE: zipfile.ZipFile(signed).read(HANDLER_FILE) + EVIL_LINE})
    served = plan.store / plan.models["brst"]
    assert plan.store == private and stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE(served.stat().st_mode) == 0o400
    assert zipfile.ZipFile(served).read(HANDLER_FILE) == zipfile.ZipFile(signed).read(HANDLER_FILE)
    assert verify_mar(served, KeyRing.load([public]), Expected("brst", "v2")).model_version == "v2"
    with pytest.raises(BrstError, match="changed after signing"):
        verify_mar(store / "brst.mar", KeyRing.load([public]))


def test_the_worker_refuses_an_unpacked_archive_its_signature_does_not_cover(served_archive, signed, keys,
                                                                            tmp_path, monkeypatch, caplog):
    from brst.handlers.brst_handler import BrstHandler

    (_, public), _ = keys
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    added = unpack(signed, tmp_path / "added")
    (added / "brst").mkdir()
    (added / "brst" / "__init__.py").write_bytes(EVIL_LINE)
    plain = unpack(served_archive, tmp_path / "plain")
    for model_dir, problem in ((plain, "is unsigned"), (added, "holds 'brst/__init__.py', which its signature")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="brst.handlers.brst_handler"), pytest.raises(BrstError):
            BrstHandler().initialize(make_context(model_dir, 1))
        [message] = [r.getMessage() for r in caplog.records if r.name == "brst.handlers.brst_handler"]
        assert message.startswith(f"refusing to load the archive: {model_dir}: {problem}"), message
    good = unpack(signed, tmp_path / "signed")
    (good / "__pycache__").mkdir()  # written by Python when the worker imports the handler file
    (good / "__pycache__" / "brst_handler.cpython-311.pyc").write_bytes(b"bytecode")
    handler = BrstHandler()
    handler.initialize(make_context(good, 1))
    assert handler.initialized and verify_directory(good, KeyRing.load([public]), Expected("brst", "v2"))


def test_serve_with_a_public_key_refuses_a_tampered_archive_before_starting(signed, keys, tmp_path):
    (_, public), _ = keys
    store = tmp_path / "store"
    store.mkdir()
    TAMPERING["model-config.yaml gained limits"](signed, store)
    result = CliRunner().invoke(cli, ["serve", "--model-store", str(store), "--public-key", str(public),
                                      "--config", str(REPO_ROOT / "deploy" / "config.properties"),
                                      "--run-dir", str(tmp_path / "run"), "--free-ports", "--check"])
    assert result.exit_code == 2 and "brst.mar: entry 'model-config.yaml' changed after signing" in result.output
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.serve
def test_a_real_torchserve_serves_the_checked_copy_and_never_starts_on_a_tampered_archive(signed, keys, tmp_path,
                                                                                          heldout_patches):
    from serve_fixtures import encode, start_serve, stop_serve

    from brst.train.serve.client import HttpClient

    (_, public), _ = keys
    ident = verify_mar(signed, KeyRing.load([public])).key_id
    bad_store, store = tmp_path / "bad", tmp_path / "store"
    bad_store.mkdir()
    store.mkdir()
    TAMPERING["edited handler"](signed, bad_store)
    refused = subprocess.run([str(Path(sys.executable).with_name("brst-train")), "serve", "--model-store", str(bad_store),
                              "--public-key", str(public), "--config", str(REPO_ROOT / "deploy" / "config.properties"),
                              "--run-dir", str(tmp_path / "bad-run"), "--free-ports", "--check"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"entry '{HANDLER_FILE}' changed after signing" in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "bad-run" / "logs").exists()  # TorchServe never started

    shutil.copy(signed, store / "brst.mar")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process, endpoints, started = start_serve(store, run_dir, "--public-key", str(public), "--model-version", "brst=v2")
    try:
        stores = [proc.cmdline()[proc.cmdline().index("--model-store") + 1] for proc in started
                  if "--model-store" in proc.cmdline()]
        assert stores and str(store) not in stores, stores  # TorchServe reads the private checked copy
        answer = HttpClient(endpoints.inference, "brst").predict(encode(heldout_patches[0], "PNG"))
        assert answer["model_version"] == "v2" and len(answer["values"]) == len(answer["genes"])
    finally:
        stop_serve(process, started, run_dir)
    assert f"serving only archives signed with key(s) {ident}" in (run_dir / "serve.err").read_text()
    worker_log = (run_dir / "logs" / "model_log.log").read_text()
    assert f"archive signed with key {ident} for brst version v2" in worker_log  # the worker's own check
