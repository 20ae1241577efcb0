"""Shared test fixtures: real data from ../shared/data, device and dtype from the environment.

``BRST_SHARED_DATA`` overrides where the real data lives (default: ``../shared/data``
beside the checkout, as CI lays it). ``BRST_TEST_DEVICE`` (``cpu``/``cuda``) and
``BRST_TEST_DTYPE`` (``float32``/``float64``) let the same tests run on a GPU machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: the real-TorchServe session fixtures (served_model, served_metrics_text) live in tests/serve_fixtures.py,
#: the real Orthanc (DICOMweb) ones (orthanc, c2_dicom, c2_dicomweb) in tests/orthanc_fixtures.py
pytest_plugins = ["serve_fixtures", "orthanc_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder holding ``her2st/`` and ``visium-spaceranger-1.0.0/`` (read in place)."""
    if not (SHARED_DATA / "her2st").is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (set BRST_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st_root(shared_data: Path) -> Path:
    return shared_data / "her2st"


@pytest.fixture(scope="session")
def visium_root(shared_data: Path) -> Path:
    return shared_data / "visium-spaceranger-1.0.0"


@pytest.fixture(scope="session")
def device():
    import torch

    return torch.device(os.environ.get("BRST_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def dtype():
    import torch

    return getattr(torch, os.environ.get("BRST_TEST_DTYPE", "float32"))


@pytest.fixture(scope="session")
def her2st_h5(her2st_root: Path, tmp_path_factory) -> Path:
    """The five real HER2ST sections prepared with default filters into small 56 px patches.

    Geometry: patch_um 112 at 2.0 um/px (patch_px 56); min_counts 1000; 890 spots;
    panel = top 250 genes by mean count. Session-scoped: built once (10-30 s on the shared 2-core box).
    """
    from brst.train.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("her2st") / "her2st.h5"
    prepare("her2st", her2st_root, out=out, options=PrepareOptions(um_per_px=2.0))
    return out
