"""Run the TorchServe handler as a worker does, without the Java frontend: TorchServe's own Context.

Imports nothing of ``brst.train``, so tests/handlers/test_one_way.py can drive the handler in an
interpreter where the training application is unavailable.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml


def unpack(mar: Path, dest: Path) -> Path:
    """Unpack a .mar as TorchServe does (a zip file)."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(dest)
    return dest


def make_context(model_dir: Path, n_requests: int, yaml_overrides: dict | None = None, gpu_id: int | None = None):
    """TorchServe's Context for a batch of ``n_requests``, as the worker builds it (on GPU ``gpu_id``)."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = manifest["model"].get("configFile", "model-config.yaml")
    settings = {**yaml.safe_load((model_dir / config).read_text()), **(yaml_overrides or {})}
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "brst"
    context = Context("brst", str(model_dir), manifest, settings["batchSize"], gpu_id, "0.12.0",
                      metrics=metrics, model_yaml_config=settings)
    set_batch(context, n_requests)
    return context


def set_batch(context, n_requests: int) -> None:
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    context.request_ids = {i: f"request-{i}" for i in range(n_requests)}
    context.metrics.set_request_ids(context.request_ids)


def handle(handler, rows: list[dict], model_dir: Path) -> tuple[list, list[int]]:
    """``handle()`` one batch; the parsed answers and each request's status code."""
    context = make_context(model_dir, len(rows))
    answers = handler.handle(rows, context)
    return [json.loads(a) for a in answers], [context.get_response_status(i)[0] for i in range(len(rows))]
