"""Pytest plugin: a real Orthanc (DICOM server) with its DICOMweb plugin on loopback, and HER2ST
sections converted to DICOM whole-slide images by Orthanc's own dicomizer.

Register it from ``tests/conftest.py`` (``pytest_plugins``). Fixtures:

- ``orthanc`` (session): ``Orthanc`` started on a free loopback port with a temporary storage
  folder, basic-auth credentials and remote access off (Orthanc 1.10 cannot choose its
  listening address, so it refuses non-loopback clients instead), no DICOM (DIMSE) listener;
  stopped by its PID at the end (checked: it exits);
- ``c2_dicom`` (session): section C2's JPEG converted to a DICOM WSI folder (5 levels, 256 px
  JPEG frames, 0.69 µm/px) by ``OrthancWSIDicomizer``;
- ``c2_dicomweb``: that series uploaded to ``orthanc``; its ``dicomweb://`` URL.

The Debian packages ``orthanc``, ``orthanc-dicomweb`` and ``orthanc-wsi`` come from
``deploy/install-test-servers.sh`` (``make test`` runs it). When they are missing the tests that
need them fail with that instruction: they never skip silently.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMIZER = "OrthancWSIDicomizer"
INSTALL = "run `bash deploy/install-test-servers.sh` (apt-get install orthanc orthanc-dicomweb orthanc-wsi)"
USER, PASSWORD = "brst", "brst-test-secret"
#: the dicomizer's DICOM dataset: wsidicom needs ImageType VOLUME to find the pyramid levels
DATASET = {"PatientID": "HER2ST-C", "PatientName": "HER2ST^C", "StudyID": "C2", "SeriesNumber": "1",
           "ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE"}
#: HER2ST's scan resolution (the dataset README's figure), written into the DICOM pixel spacing
C2_UM_PER_PX = 0.69
START_TIMEOUT_S = 30.0


def require(executable: str) -> str:
    """The executable's path, or fail the test naming the install script."""
    found = shutil.which(executable) or (executable if Path(executable).is_file() else None)
    if found is None:
        pytest.fail(f"{executable} is not installed: {INSTALL}", pytrace=False)
    return found


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its REST root, DICOMweb root (both http://127.0.0.1:PORT/...) and credentials."""

    url: str
    dicomweb_root: str
    user: str
    password: str
    pid: int

    @property
    def credentials(self) -> str:
        return f"{self.user}:{self.password}"

    def upload(self, files: list[Path]) -> tuple[str, str]:
        """POST DICOM files to ``/instances``; returns the (StudyInstanceUID, SeriesInstanceUID) they form."""
        import requests

        series = set()
        with requests.Session() as session:
            session.auth = (self.user, self.password)
            for path in files:
                answer = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
                answer.raise_for_status()
                series.add(answer.json()["ParentSeries"])
            assert len(series) == 1, series
            tags = session.get(f"{self.url}/series/{series.pop()}/shared-tags?simplify", timeout=60).json()
        return tags["StudyInstanceUID"], tags["SeriesInstanceUID"]

    def series_url(self, study_uid: str, series_uid: str) -> str:
        """The ``dicomweb://`` URL brst reads the series from."""
        return f"{self.dicomweb_root.replace('http://', 'dicomweb://', 1)}/studies/{study_uid}/series/{series_uid}"


def _wait_until_up(process: subprocess.Popen, url: str, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}", pytrace=False)
        try:
            if requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    pytest.fail(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s: {log_path.read_text()[-2000:]}",
                pytrace=False)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Iterator[OrthancServer]:
    """A real Orthanc + DICOMweb on a free loopback port; stopped (by PID) at the end."""
    from brst.train.serve.torchserve import free_ports

    executable = require(ORTHANC)
    if not DICOMWEB_PLUGIN.is_file():
        pytest.fail(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is not installed: {INSTALL}", pytrace=False)
    folder = tmp_path_factory.mktemp("orthanc")
    (http_port,) = free_ports(1)
    config = {"Name": "brst-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log_path = folder / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([executable, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_until_up(process, url, log_path)
        yield OrthancServer(url, f"{url}/dicom-web", USER, PASSWORD, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def dicomize(image: Path, width_px: int, height_px: int, um_per_px: float, out: Path) -> list[Path]:
    """Convert a JPEG/PNG/TIFF to a DICOM WSI folder (pyramid of 5 levels, 256 px JPEG frames).

    OrthancWSIDicomizer 1.1 swaps ``--imaged-width`` and ``--imaged-height`` when it computes the
    pixel spacing, so they are passed swapped to get ``um_per_px`` on both axes.
    """
    executable = require(DICOMIZER)
    out.mkdir(parents=True, exist_ok=True)
    dataset = out.parent / f"{out.name}-dataset.json"
    dataset.write_text(json.dumps(DATASET))
    imaged_width_mm, imaged_height_mm = width_px * um_per_px / 1000, height_px * um_per_px / 1000
    command = [executable, "--dataset", str(dataset), "--pyramid", "1", "--levels", "5", "--tile-width", "256",
               "--tile-height", "256", "--compression", "jpeg", "--jpeg-quality", "90", "--threads", "2",
               "--imaged-width", repr(imaged_height_mm), "--imaged-height", repr(imaged_width_mm),
               "--folder", str(out), str(image)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return sorted(out.glob("*.dcm"))


@pytest.fixture(scope="session")
def c2_dicom(her2st_root: Path, tmp_path_factory) -> Path:
    """Section C2 as a DICOM WSI folder at 0.69 µm/px (about 3 s to convert)."""
    from PIL import Image

    jpeg = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a known ~92 Mpx scan
        with Image.open(jpeg) as header:  # the header only
            width, height = header.size
    folder = tmp_path_factory.mktemp("c2_dicom") / "C2"
    assert len(dicomize(jpeg, width, height, C2_UM_PER_PX, folder)) == 5
    return folder


@pytest.fixture(scope="session")
def c2_dicomweb(orthanc: OrthancServer, c2_dicom: Path) -> str:
    """C2's DICOM WSI uploaded to the running Orthanc: its ``dicomweb://`` series URL."""
    return orthanc.series_url(*orthanc.upload(sorted(c2_dicom.glob("*.dcm"))))
