"""Build normalisers by method name: fit them to patches, or rebuild them from their JSON."""
from __future__ import annotations

import math
from typing import Any

import torch

from brst.handlers.errors import BrstError
from brst.handlers.registry import Registry

from .base import JSON_VERSION, NoStain, PatchSource, StainNormalizer
from .macenko import Macenko
from .reinhard import Reinhard

#: method name -> normaliser class; a new stain method registers here
METHODS: Registry[type[StainNormalizer]] = Registry("stain method")
METHODS.register(Macenko.method, Macenko)
METHODS.register(Reinhard.method, Reinhard)
METHODS.register(NoStain.method, NoStain)


def make_stain(method: str, **params: Any) -> StainNormalizer:
    """An unfitted normaliser (the method's default reference) with the given parameters.

    Raises:
        BrstError: unknown method or parameter.
    """
    cls = METHODS[method]
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
    for name, tensor in checked_fields(module, reference, "stain reference").items():
        getattr(module, name).copy_(tensor)
    module.with_scope(data.get("scope", "patch"), data.get("fallback", "patch"))
    module.fit_info = dict(data.get("fit_info", {}))
    return module


def statistics_from_dict(module: StainNormalizer, values: Any, subject: str = "stain statistics") -> torch.Tensor:
    """A slide's source statistics from their named form (:meth:`StainNormalizer.statistics_dict`).

    Checked like a reference (field names, shapes, finite, positive where they must be) and
    canonicalised; a Macenko matrix whose stain vectors are (nearly) parallel is refused.

    Returns:
        float64 ``(K,)`` on the CPU (the module may be on any device).

    Raises:
        BrstError: naming ``subject`` and what is wrong.
    """
    if not isinstance(values, dict):
        raise BrstError(subject, f"expected an object with fields {sorted(dict(module.named_buffers()))}")
    fields = checked_fields(module, values, subject)
    stats = module.canonical_statistics(torch.cat([fields[name].double().flatten()
                                                   for name, _ in module.named_buffers()]))
    probe = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8, device=module.device)
    _, ok = module.from_source(probe, stats.float().unsqueeze(0).to(module.device))
    if not bool(ok.all()):
        raise BrstError(subject, f"{module.method} statistics are degenerate (parallel stain vectors, "
                                 "near-zero concentrations or a flat channel)")
    return stats.cpu()


def checked_fields(module: StainNormalizer, values: dict[str, Any], subject: str) -> dict[str, torch.Tensor]:
    """Each of the module's buffer fields in ``values`` as a float32 tensor of the buffer's shape.

    Raises:
        BrstError: missing or extra fields, not numbers, wrong shape, non-finite, not positive.
    """
    buffers = dict(module.named_buffers())
    if set(values) != set(buffers):
        raise BrstError(subject, f"{module.method} needs reference fields {sorted(buffers)}, got {sorted(map(str, values))[:8]}")
    fields = {}
    for name, value in values.items():
        try:
            tensor = buffers[name].new_tensor(value)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise BrstError(subject, f"{name!r} is not a list of numbers ({type(err).__name__})") from None
        if tensor.shape != buffers[name].shape:
            raise BrstError(subject, f"{name!r} has shape {list(tensor.shape)}, expected {list(buffers[name].shape)}")
        if not all(math.isfinite(v) for v in tensor.flatten().tolist()):
            raise BrstError(subject, f"{name!r} holds non-finite values")
        if name in module.POSITIVE and not bool((tensor > 0).all()):
            raise BrstError(subject, f"{name!r} must be positive")
        fields[name] = tensor
    return fields
