"""Pin an overlay's image to the digest of an image you pushed: ``make pin-images OVERLAY=... IMAGE=...``.

    python deploy/pin_images.py k8s/overlays/hospital registry.hospital.example/brst/brst-serve:0.2.0

reads the registry digest Docker recorded when it pushed (or pulled) IMAGE (``docker image
inspect``, ``RepoDigests``) and writes it as the ``digest:`` of the overlay's ``images:`` entry for
that repository, in place (comments kept). ``--digest sha256:...`` takes the digest from elsewhere
(``docker buildx imagetools inspect``, ``crane digest``). One line on stderr and exit status 2 when
Docker has no registry digest for IMAGE (it was built here and never pushed) or the overlay has no
entry for its repository.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class PinError(Exception):
    """A problem that ends the script with one line."""


def repository(image: str) -> str:
    """``host:5000/a/b:tag`` or ``a/b@sha256:...`` -> ``host:5000/a/b``."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def pushed_digest(image: str) -> str:
    """The registry digest Docker holds for ``image`` (``RepoDigests`` of ``docker image inspect``)."""
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", image],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PinError(f"docker image inspect {image}: {(done.stderr or done.stdout).strip()}")
    digests = [ref.split("@", 1)[1] for ref in json.loads(done.stdout) or [] if repository(ref) == repository(image)]
    if not digests:
        raise PinError(f"{image}: Docker has no registry digest for {repository(image)}: push it first "
                       "(docker push), or give --digest")
    return digests[0]


def pin(kustomization: Path, repo: str, digest: str) -> None:
    """Set the ``digest:`` of the ``images:`` entry whose ``newName`` (or ``name``) is ``repo``."""
    if not DIGEST.fullmatch(digest):
        raise PinError(f"{digest!r} is not a sha256:<64 hex> digest")
    text = kustomization.read_text(encoding="utf-8")
    entry = re.compile(rf"(^\s*-?\s*(?:newName|name):\s*{re.escape(repo)}\s*\n(?:\s+\w+:.*\n)*?\s+digest:\s*)"
                       rf"sha256:[0-9a-f]{{64}}", re.MULTILINE)
    pinned, count = entry.subn(lambda match: match.group(1) + digest, text)
    if count != 1:
        raise PinError(f"{kustomization}: {count} images: entries with name or newName {repo} and a digest (need 1)")
    if not any(image.get("digest") == digest for image in yaml.safe_load(pinned).get("images", [])):
        raise PinError(f"{kustomization}: the digest line found for {repo} is not in images:")
    kustomization.write_text(pinned, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path, help="folder of the kustomization.yaml to edit")
    parser.add_argument("image", help="the pushed image, REPOSITORY:TAG")
    parser.add_argument("--digest", help="sha256:... instead of asking Docker")
    args = parser.parse_args(argv)
    try:
        digest = args.digest or pushed_digest(args.image)
        pin(args.overlay / "kustomization.yaml", repository(args.image), digest)
    except PinError as err:
        print(f"pin_images: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.overlay}: {repository(args.image)}@{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
