"""Archives this runtime cannot load are refused before TorchServe starts, with the rebuild command."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.handlers.runtime_check import MANIFEST, check_archives, main, missing_imports
from brst.train.cli.main import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the imports of the handler that brst 0.1 put into its archives
OLD_HANDLER = '''from brst.handlers.decode import DecodedBatch, DecodeLimits, PatchSpec, decode_batch
from brst.handlers.transforms import N_DIHEDRAL, ModelInput, dihedral
from brst.train.archive import WEIGHTS_FILE, load_archived_model
from brst.train.targets import TargetTransform
'''


def with_handler(archive: Path, source: str, out: Path) -> Path:
    """A copy of ``archive`` whose handler file holds ``source``."""
    with zipfile.ZipFile(archive) as mar:
        handler = json.loads(mar.read(MANIFEST))["model"]["handler"]
        with zipfile.ZipFile(out, "w") as copy:
            for item in mar.infolist():
                copy.writestr(item, source if item.filename == handler else mar.read(item))
    return out


def test_missing_imports_names_what_is_gone():
    assert missing_imports(OLD_HANDLER) == ["brst.handlers.decode (DecodedBatch, DecodeLimits, PatchSpec, decode_batch)",
                                            "brst.train.archive (WEIGHTS_FILE, load_archived_model)",
                                            "brst.train.targets (TargetTransform)"]
    assert missing_imports("from brst.handlers.transforms import dihedral, no_such_name\n") == [
        "brst.handlers.transforms (dihedral, no_such_name)"]
    assert missing_imports("import torch\nfrom ts.torch_handler.base_handler import BaseHandler\n") == []


@pytest.mark.slow
def test_current_archives_pass_and_old_ones_fail_with_the_rebuild_command(served_archive, tmp_path):
    check_archives([served_archive])
    old = with_handler(served_archive, OLD_HANDLER, tmp_path / "old.mar")
    with pytest.raises(BrstError, match=r"imports brst\.handlers\.decode .*brst-train archive --checkpoint"):
        check_archives([served_archive, old])
    assert main([str(old)]) == 2 and main([str(served_archive)]) == 0


def test_a_file_that_is_not_an_archive_is_named(tmp_path):
    junk = tmp_path / "junk.mar"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BrstError, match="junk.mar: is not a readable TorchServe archive"):
        check_archives([junk])


@pytest.mark.slow
def test_serve_refuses_an_old_archive_before_starting_torchserve(served_archive, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with_handler(served_archive, OLD_HANDLER, store / "brst.mar")
    shutil.copy(REPO_ROOT / "deploy" / "config.properties", tmp_path / "config.properties")
    result = CliRunner().invoke(cli, ["serve", "--model-store", str(store), "--config", str(tmp_path / "config.properties"),
                                      "--run-dir", str(tmp_path / "run"), "--free-ports", "--check"])
    assert result.exit_code == 2
    assert "brst.mar: was built by another brst version" in result.output
    assert "brst-train archive --checkpoint CKPT --model-name NAME --force" in result.output
    assert not (tmp_path / "run" / "logs").exists()  # TorchServe was never started
