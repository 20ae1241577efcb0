"""``brst-train fetch her2st``: download public HER2ST files, verified against SHA-256 checksums.

The default source is the ``data/`` folder of the public ``almaan/her2st`` repository at a
pinned commit, so the built-in checksums (patient C, sections C2-C6: the sections with
full-resolution images in that layout) stay valid. Downloads resume: bytes already in
``<file>.part`` are kept and the rest is asked for with an HTTP ``Range`` request (a server
that ignores it sends the whole file again). A finished file is checked, then renamed into
place; a file already present with the right checksum is not downloaded again.
"""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from brst.handlers.archive_facts import sha256_file
from brst.handlers.errors import BrstError
from brst.train.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec/data"
DEFAULT_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
CHUNK_BYTES = 1 << 20

#: relative path -> SHA-256 of the files at the pinned commit
MANIFEST: dict[str, str] = {
    "ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "ST-imgs/C/C5/5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "ST-imgs/C/C6/5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
    "ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
}


def section_files(sections: Sequence[str]) -> dict[str, str]:
    """The manifest entries of ``sections`` (counts, spot file, image of each)."""
    unknown = [name for name in sections if name not in DEFAULT_SECTIONS]
    if unknown:
        raise BrstError("--sections", f"no checksums for {unknown}; fetch knows {list(DEFAULT_SECTIONS)}")
    return {path: digest for path, digest in MANIFEST.items()
            if any(f"/{name}." in path or f"/{name}_" in path or f"/{name}/" in path for name in sections)}


def _open(url: str, offset: int, timeout_s: float):
    """Open ``url`` from byte ``offset``; returns the response and whether it resumes."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is already complete (or longer)
            return None, True
        raise BrstError(url, f"download failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise BrstError(url, f"cannot download ({reason}); offline? copy the data and use --root, "
                        "or point --base-url at a mirror") from None
    return response, response.status == 206


def download(url: str, target: Path, timeout_s: float, progress: tqdm) -> None:
    """Download ``url`` to ``target.part`` (resuming), leaving it there for the caller to check."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    response, resumed = _open(url, offset, timeout_s)
    if response is None:
        return
    with response, open(part, "ab" if resumed else "wb") as handle:
        if not resumed and offset:
            log.info("%s: server ignored the Range request; downloading from the start", url)
        try:
            for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                handle.write(block)
                progress.update(len(block))
        except (TimeoutError, OSError) as err:
            raise BrstError(url, f"download interrupted ({err}); run fetch again to resume") from None


def fetch_file(base_url: str, relative: str, digest: str, dest: Path, timeout_s: float, progress: tqdm) -> Path:
    """Make ``dest/relative`` hold the file with SHA-256 ``digest`` (download, resume, verify)."""
    target = dest / relative
    if target.exists() and sha256_file(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    url = f"{base_url.rstrip('/')}/{relative}"
    for attempt in ("resume", "restart"):
        download(url, target, timeout_s, progress)
        if sha256_file(part) == digest:
            os.replace(part, target)  # a stable .part name is what makes resuming possible
            return target
        part.unlink()
        log.warning("%s: checksum mismatch after %s", url, attempt)
    raise BrstError(url, f"checksum mismatch: the file is not the expected {relative} (sha256 {digest[:12]}...)")


def fetch_her2st(dest: str | Path, sections: Sequence[str] = DEFAULT_SECTIONS, base_url: str = DEFAULT_BASE_URL,
                 timeout_s: float = 60.0) -> list[Path]:
    """Download the HER2ST files of ``sections`` into ``dest`` (HER2ST ``data/`` layout); returns the files."""
    dest = Path(dest)
    files = section_files(sections)
    with tqdm(unit="B", unit_scale=True, desc="fetch her2st", dynamic_ncols=True) as progress:
        paths = [fetch_file(base_url, relative, digest, dest, timeout_s, progress) for relative, digest in files.items()]
    write_bytes_atomic(dest / "SHA256SUMS", "".join(f"{digest}  ./{path}\n" for path, digest in files.items()).encode())
    return paths
