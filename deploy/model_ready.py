"""Readiness check: exit 0 only when every registered model has a READY worker.

TorchServe 0.12 answers ``/ping`` with 200 "Healthy" while a worker is still loading its model
(a worker counts as healthy unless it has been failing for longer than maxRetryTimeoutInSec),
so ``/ping`` serves as the liveness check and this script, run by the kubelet as an exec probe,
asks the management API (bound to 127.0.0.1 inside the pod) for the workers' states.

Standard library only, so it starts fast with ``python -I -S``. Environment:
``BRST_MANAGEMENT_URL`` (default ``http://127.0.0.1:8081``), ``BRST_REQUIRED_MODELS``
(space-separated model names that must be registered; default: at least one model).
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 3.0


def get_json(url: str):
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return json.load(response)


def registered_models(base_url: str) -> list[str]:
    """Names of all models registered with TorchServe, following its pagination."""
    names, token = [], None
    while True:
        query = "?limit=100" + (f"&next_page_token={token}" if token else "")
        page = get_json(f"{base_url}/models{query}")
        names += [model["modelName"] for model in page.get("models", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def model_problem(base_url: str, name: str) -> str | None:
    """Why the default version of model ``name`` is not ready, or None when it is."""
    versions = get_json(f"{base_url}/models/{urllib.parse.quote(name, safe='')}")
    for version in versions:
        ready = sum(worker.get("status") == "READY" for worker in version.get("workers", []))
        wanted = max(1, int(version.get("minWorkers", 1)))
        if ready < wanted:
            return f"{name}: {ready} of {wanted} workers READY"
    return None


def readiness_problem(base_url: str, required: list[str]) -> str | None:
    """Why the server is not ready to serve, or None when it is."""
    names = registered_models(base_url)
    missing = [name for name in required if name not in names]
    if missing:
        return f"model not registered: {' '.join(missing)}"
    if not names:
        return "no model registered"
    problems = [problem for name in names if (problem := model_problem(base_url, name))]
    return "; ".join(problems) or None


def main() -> int:
    base_url = os.environ.get("BRST_MANAGEMENT_URL", "http://127.0.0.1:8081").rstrip("/")
    required = os.environ.get("BRST_REQUIRED_MODELS", "").split()
    try:
        problem = readiness_problem(base_url, required)
    except (OSError, ValueError, KeyError) as error:
        problem = f"management API {base_url}: {error}"
    if problem:
        sys.stderr.write(f"not ready: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
