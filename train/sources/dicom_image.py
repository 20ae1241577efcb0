"""DICOM whole-slide images (VL Whole Slide Microscopy) through wsidicom, as hospitals store slides.

Two sources:

* a folder of DICOM files (one series: its pyramid levels, maybe label and overview);
* a series on a DICOMweb server, named by one URL:
  ``dicomweb://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``
  (``dicomwebs://`` for HTTPS), i.e. the series' own DICOMweb path with the scheme replaced.
  ``PREFIX`` is the server's DICOMweb root (Orthanc: ``dicom-web``). Credentials never go in
  the URL or on the command line: ``BRST_DICOMWEB_CREDENTIALS`` holds ``user:password``
  (HTTP basic) or ``Bearer <token>``, or ``BRST_DICOMWEB_CREDENTIALS_FILE`` names a file whose
  first line does. Credentials never travel unencrypted to another machine either: with
  credentials, ``dicomweb://`` (plain HTTP) is refused unless the host is this machine (loopback)
  or ``BRST_ALLOW_INSECURE=1`` (``predict-slide --allow-insecure``) says so, and then each open
  logs a warning.

Regions are read from the best level, frame by frame (wsidicom fetches only the frames under a
region and caches them). µm/px is level 0's pixel spacing. Server failures are one
:class:`BrstError` naming the URL: no answer, credentials refused, no such series, not a WSI.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from brst.handlers.errors import BrstError

from .pyramid import PyramidImage

log = logging.getLogger(__name__)

#: URL schemes of a DICOMweb series and the HTTP scheme each stands for
DICOMWEB_SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
CREDENTIALS_ENV, CREDENTIALS_FILE_ENV = "BRST_DICOMWEB_CREDENTIALS", "BRST_DICOMWEB_CREDENTIALS_FILE"
#: set to 1 to send credentials over plain HTTP anyway (with a warning)
ALLOW_INSECURE_ENV = "BRST_ALLOW_INSECURE"
#: seconds to wait for the server to connect and for each answer
HTTP_TIMEOUT_S = 60.0
_SERIES_URL = re.compile(r"^(dicomwebs?)://([^/]+)(/.*?)?/studies/([0-9.]+)/series/([0-9.]+)/?$")


def is_dicomweb_url(source: str) -> bool:
    """Whether ``source`` names a DICOMweb series (``dicomweb://`` or ``dicomwebs://``)."""
    return source.split("://", 1)[0].lower() in DICOMWEB_SCHEMES if "://" in source else False


@dataclass(frozen=True)
class DicomWebSeries:
    """A series on a DICOMweb server.

    Attributes:
        root: the server's DICOMweb root over HTTP(S), e.g. ``http://pacs:8042/dicom-web``.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
    """

    root: str
    study_uid: str
    series_uid: str

    @classmethod
    def parse(cls, url: str) -> "DicomWebSeries":
        """Parse ``dicomweb[s]://HOST[:PORT]/PREFIX/studies/<uid>/series/<uid>``; a bad URL is a :class:`BrstError`."""
        found = _SERIES_URL.match(url)
        if found is None:
            raise BrstError(url, "expected dicomweb://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>/series/"
                                 "<SeriesInstanceUID> (dicomwebs:// for HTTPS)")
        scheme, host, prefix, study, series = found.groups()
        if "@" in host:
            shown = f"{scheme}://***@{host.rsplit('@', 1)[1]}{url[found.end(2):]}"
            raise BrstError(shown, f"credentials do not go in the URL (they would show in process lists); "
                                 f"set {CREDENTIALS_ENV} or {CREDENTIALS_FILE_ENV}")
        return cls(f"{DICOMWEB_SCHEMES[scheme]}://{host}{prefix or ''}", study, series)


def read_credentials() -> str | None:
    """``user:password`` or ``Bearer <token>`` from the environment or the file it names, else ``None``."""
    value = os.environ.get(CREDENTIALS_ENV)
    file_name = os.environ.get(CREDENTIALS_FILE_ENV)
    if not value and file_name:
        try:
            value = Path(file_name).read_text().splitlines()[0] if Path(file_name).stat().st_size else ""
        except OSError as err:
            raise BrstError(file_name, f"cannot read the DICOMweb credentials file ({err.strerror})") from None
    value = (value or "").strip()
    if value and not value.startswith("Bearer ") and ":" not in value:
        raise BrstError(CREDENTIALS_ENV, "expected user:password or 'Bearer <token>'")
    return value or None


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ::1): traffic to it never crosses a network."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_allowed() -> bool:
    """Whether ``BRST_ALLOW_INSECURE=1`` lets credentials go over plain HTTP/gRPC (with a warning)."""
    return os.environ.get(ALLOW_INSECURE_ENV, "").strip() == "1"


def check_transport(url: str, root: str, credentials: str | None) -> None:
    """Refuse to send ``credentials`` to ``root`` over plain HTTP, unless to loopback or allowed.

    Raises:
        BrstError: naming ``url``: credentials, ``http``, another machine, no ``BRST_ALLOW_INSECURE=1``.
    """
    parts = urlsplit(root)
    if credentials is None or parts.scheme != "http" or is_loopback(parts.hostname):
        return
    if not insecure_allowed():
        raise BrstError(url, "would send the DICOMweb credentials unencrypted (plain HTTP); use dicomwebs:// "
                             f"(HTTPS), or --allow-insecure ({ALLOW_INSECURE_ENV}=1) on a network you trust")
    log.warning("%s: sending the DICOMweb credentials over plain HTTP (%s=1)", url, ALLOW_INSECURE_ENV)


def _session(credentials: str | None):
    """A ``requests`` session with the credentials and a default timeout on every request."""
    import requests

    class TimeoutSession(requests.Session):
        def request(self, *args, **kwargs):  # dicomweb-client passes no timeout: never wait for ever
            kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
            return super().request(*args, **kwargs)

    session = TimeoutSession()
    if credentials and credentials.startswith("Bearer "):
        session.headers["Authorization"] = credentials
    elif credentials:
        user, password = credentials.split(":", 1)
        session.auth = (user, password)
    return session


def server_problem(err: Exception) -> str | None:
    """One line for a DICOMweb transport or HTTP failure, ``None`` when ``err`` is neither."""
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return (f"the DICOMweb server refused the credentials (HTTP {status}); "
                    f"set {CREDENTIALS_ENV} or {CREDENTIALS_FILE_ENV}")
        return f"the DICOMweb server answered HTTP {status} {err.response.reason}"
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return f"no DICOMweb server answers ({type(err).__name__})"
    return None


def _open_wsi(source: str | Path):
    """``wsidicom.WsiDicom`` of a folder or a DICOMweb URL; every failure a :class:`BrstError`."""
    import pydicom.errors
    import wsidicom
    from wsidicom import errors

    text = str(source)
    try:
        with warnings.catch_warnings():  # DICOMweb metadata leaves bulk data (e.g. ICC profiles) unfetched
            warnings.simplefilter("ignore", UserWarning)
            if is_dicomweb_url(text):
                series = DicomWebSeries.parse(text)
                credentials = read_credentials()
                check_transport(text, series.root, credentials)
                return wsidicom.WsiDicom.open_web(_web_client(series, credentials), series.study_uid,
                                                  series.series_uid)
            return wsidicom.WsiDicom.open(text)
    except errors.WsiDicomNotFoundError:
        raise BrstError(text, "not a DICOM whole-slide image series: no VL Whole Slide Microscopy "
                              "pyramid levels in it") from None
    except (errors.WsiDicomError, errors.WsiDicomNotSupportedError, errors.WsiDicomFileError,
            errors.WsiDicomMatchError) as err:
        raise BrstError(text, f"not a DICOM whole-slide image series ({type(err).__name__}: {err})") from None
    except pydicom.errors.InvalidDicomError as err:
        raise BrstError(text, f"not readable DICOM ({err})") from None
    except OSError as err:
        raise BrstError(text, server_problem(err) or f"cannot read the DICOM files ({err})") from None


def _web_client(series: DicomWebSeries, credentials: str | None):
    """A wsidicom client of the server, with our session and no silent retries (a down server fails at once)."""
    from dicomweb_client.web import DICOMwebClient
    from wsidicom import WsiDicomWebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # it logs every request at INFO
    client = DICOMwebClient(series.root, session=_session(credentials))
    client.set_http_retry_params(retry=False)
    return WsiDicomWebClient(client)


class DicomImage(PyramidImage):
    """A DICOM WSI series from a folder or a DICOMweb server, read by region from the best level.

    Args:
        source: a folder of the series' DICOM files, or its ``dicomweb[s]://`` URL (see the module).
    """

    def __init__(self, source: str | Path) -> None:
        self.path = str(source)
        self._wsi = None
        wsi = self._handle()
        levels = list(wsi.levels)
        self._level_numbers = [level.level for level in levels]  # wsidicom's pyramid index (log2 of the scale)
        self.level_sizes = [(int(level.size.width), int(level.size.height)) for level in levels]
        self.width, self.height = self.level_sizes[0]
        self.downsamples = [self.width / width for width, _ in self.level_sizes]
        mpp = levels[0].mpp
        self.um_per_px = float(mpp.width) if mpp is not None and mpp.width else None
        log.info("%s: DICOM WSI %d x %d px, %d levels, %s um/px", self.path, self.width, self.height,
                 len(levels), self.um_per_px)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_wsi": None}

    def _handle(self):
        if self._wsi is None:
            self._wsi = _open_wsi(self.path)
        return self._wsi

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB uint8 ``(y1 - y0, x1 - x0, 3)`` of level ``level``'s box (in that level's pixels)."""
        try:
            pixels = self._handle().read_region((x0, y0), self._level_numbers[level], (x1 - x0, y1 - y0),
                                                as_array=True)
        except OSError as err:
            raise BrstError(self.path, server_problem(err) or f"cannot read the slide's frames ({err})") from None
        return np.ascontiguousarray(np.asarray(pixels)[..., :3], dtype=np.uint8)

    def close(self) -> None:
        """Close files and connections (reopened on next read)."""
        if self._wsi is not None:
            self._wsi.close()
        self._wsi = None
