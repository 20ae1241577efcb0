"""The one-way rule for real: ``brst.handlers`` (what a .mar needs) works without ``brst.train``.

A fresh interpreter in which importing ``brst.train`` fails loads the archived model with the
TorchServe handler and answers requests with the same values as the checkpoint in this process
(the static check of every import is tests/test_architecture.py).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from handler_context import unpack
from PIL import Image

TESTS_DIR = Path(__file__).resolve().parents[1]  # the shared helpers (handler_context.py)

#: run in a fresh interpreter: brst.train blocked, the archived model served through handle()
BLOCKED_RUN = r'''
import importlib.abc, json, sys
from pathlib import Path

class NoTrainingApplication(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "brst.train" or name.startswith("brst.train."):
            raise ModuleNotFoundError(f"{name} is blocked: the serving runtime must not need it", name=name)
        return None

sys.meta_path.insert(0, NoTrainingApplication())
sys.path.insert(0, sys.argv[1])
from handler_context import handle, make_context
from brst.handlers.brst_handler import BrstHandler

model_dir = Path(sys.argv[2])
bodies = json.loads(Path(sys.argv[3]).read_text())
handler = BrstHandler()
handler.initialize(make_context(model_dir, 1))
answers, statuses = handle(handler, [{"body": bytes.fromhex(body)} for body in bodies], model_dir)
loaded = sorted(name for name in sys.modules if name.startswith("brst."))
print(json.dumps({"values": [a["values"] for a in answers], "statuses": statuses, "loaded": loaded}))
'''


@pytest.mark.slow
def test_an_archive_is_served_with_the_training_application_unavailable(served_archive, heldout_patches,
                                                                        in_process, tmp_path):
    model_dir = unpack(served_archive, tmp_path / "model")
    bodies = []
    for patch in heldout_patches[:3]:
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, format="PNG")
        bodies.append(buffer.getvalue().hex())
    (tmp_path / "bodies.json").write_text(json.dumps(bodies))
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(TESTS_DIR), str(model_dir),
                           str(tmp_path / "bodies.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 200, 200]
    assert not [name for name in result["loaded"] if name.startswith("brst.train")]
    np.testing.assert_allclose(result["values"], in_process(heldout_patches[:3]), atol=1e-5)


def test_the_blocker_really_blocks(tmp_path):
    """The same interpreter set-up fails on a module that needs brst.train (the check can fail)."""
    script = BLOCKED_RUN.split("sys.path.insert")[0] + "import brst.train.checkpoint\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "is blocked" in done.stderr
