"""Build normalisers by method name: fit them to patches, or rebuild them from their JSON."""
from __future__ import annotations

import math
from typing import Any

from brst.handlers.errors import BrstError

from .base import JSON_VERSION, NoStain, PatchSource, StainNormalizer
from .macenko import Macenko
from .reinhard import Reinhard

#: method name -> normaliser class
METHODS: dict[str, type[StainNormalizer]] = {cls.method: cls for cls in (Macenko, Reinhard, NoStain)}


def make_stain(method: str, **params: Any) -> StainNormalizer:
    """An unfitted normaliser (the method's default reference) with the given parameters.

    Raises:
        BrstError: unknown method or parameter.
    """
    cls = METHODS.get(method)
    if cls is None:
        raise BrstError("stain method", f"unknown {method!r}; choose one of {sorted(METHODS)}")
    unknown = set(params) - set(cls.PARAMS)
    if unknown:
        raise BrstError("stain parameters", f"{sorted(unknown)} are not parameters of {method} "
                        f"(it takes {list(cls.PARAMS)})")
    return cls(**params)


def fit_stain(method: str, patches: PatchSource, *, batch_size: int = 64, device: str = "cpu",
              progress: bool = False, **params: Any) -> StainNormalizer:
    """Fit a normaliser to many patches (median of per-patch statistics over patches with tissue).

    Args:
        method: ``"macenko"``, ``"reinhard"`` or ``"none"``.
        patches: uint8 ``(N, H, W, 3)``: numpy, torch or h5py (anything with ``len`` and slices).
        batch_size: patches per batch.
        device: where the statistics are computed.
        progress: show a tqdm bar.
        params: the method's parameters (e.g. ``beta``, ``min_tissue``).

    Returns:
        the fitted module (on ``device``).
    """
    return make_stain(method, **params).to(device).fit(patches, batch_size=batch_size, progress=progress)


def stain_from_json(data: dict[str, Any]) -> StainNormalizer:
    """Rebuild a normaliser from :meth:`StainNormalizer.to_json` output.

    Raises:
        BrstError: not a stain reference, unknown method or version, or bad reference values.
    """
    if not isinstance(data, dict) or "method" not in data:
        raise BrstError("stain reference", "expected a JSON object with a 'method' field")
    if data.get("version", JSON_VERSION) != JSON_VERSION:
        raise BrstError("stain reference", f"version {data.get('version')!r} is not supported "
                        f"(this brst reads version {JSON_VERSION})")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise BrstError("stain reference", "'params' must be an object")
    module = make_stain(data["method"], **params)
    reference = data.get("reference", {})
    if not isinstance(reference, dict):
        raise BrstError("stain reference", "'reference' must be an object")
    _load_reference(module, reference)
    module.fit_info = dict(data.get("fit_info", {}))
    return module


def _load_reference(module: StainNormalizer, reference: dict[str, Any]) -> None:
    """Copy reference values into the module's buffers, checking names, shapes and values."""
    buffers = dict(module.named_buffers())
    if set(reference) != set(buffers):
        raise BrstError("stain reference", f"{module.method} needs reference fields {sorted(buffers)}, "
                        f"got {sorted(reference)}")
    for name, values in reference.items():
        try:
            tensor = buffers[name].new_tensor(values)
        except (TypeError, ValueError) as err:
            raise BrstError("stain reference", f"{name!r} is not a list of numbers ({err})") from err
        if tensor.shape != buffers[name].shape:
            raise BrstError("stain reference", f"{name!r} has shape {list(tensor.shape)}, "
                            f"expected {list(buffers[name].shape)}")
        if not all(math.isfinite(v) for v in tensor.flatten().tolist()):
            raise BrstError("stain reference", f"{name!r} holds non-finite values")
        if name in module.POSITIVE and not bool((tensor > 0).all()):
            raise BrstError("stain reference", f"{name!r} must be positive, got {values}")
        buffers[name].copy_(tensor)
