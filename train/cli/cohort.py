"""``brst-train predict-cohort``: every slide of a manifest through ``predict-slide``'s code path.

Writes ``<out>/<slide_id>/`` per slide (``predict-slide``'s outputs and ``cohort.json``, the
identity they were made from), ``<out>/_cohort/status/shard-I-of-N.jsonl`` per shard and, with
``--summarize`` or at the end of a one-shard run, ``<out>/_cohort/cohort.csv``, ``cohort.h5ad``
and ``contact_sheet.png``. ``predict-slide``'s options (other than ``--slide``, ``--out``,
``--measured``, ``--section``, which the manifest gives per slide) apply to every slide.

Exit status: 0 when every slide of the shard is done or skipped, 1 when a slide failed (its
reason is in the status file), 2 for a bad option, 3 (:data:`MANIFEST_EXIT`) for a bad manifest.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from brst.handlers.errors import BrstError
from brst.train.cohort.manifest import MANIFEST_EXIT, ManifestError, read_manifest

from .params import PATH, split_names
from .slide import ENDPOINT_OPTIONS, allow_insecure_sources, check_model_sources, endpoint_settings, open_predictor, predict_slide

log = logging.getLogger(__name__)

#: predict-slide's options, by where they go: every one is used or given per slide by the manifest
MODEL_OPTIONS = ("checkpoint", "endpoint", "device", "gene_r", "allow_insecure")
JOB_OPTIONS = ("genes", "top_genes", "step_um", "batch_size", "um_per_px", "read_workers")
PER_SLIDE_OPTIONS = ("slide", "out_dir", "measured", "section")


def _shard(shard: str | None, shards: int | None) -> tuple[int, int]:
    """``(index, count)`` from ``--shard I/N``, or ``--shards N`` with ``$JOB_COMPLETION_INDEX``; else ``(0, 1)``."""
    from brst.train.cohort.shards import check_shard, parse_shard

    if shard is not None and shards is not None:
        raise BrstError("--shard/--shards", "give one: --shard I/N, or --shards N with $JOB_COMPLETION_INDEX")
    if shard is not None:
        return parse_shard(shard)
    if shards is None:
        return 0, 1
    index = os.environ.get("JOB_COMPLETION_INDEX", "")
    if not index.isdigit():
        raise BrstError("--shards", f"needs $JOB_COMPLETION_INDEX (an indexed Job's pod) or --shard I/N; got {index!r}")
    return check_shard(int(index), shards, "$JOB_COMPLETION_INDEX")


def _identity_options(options: dict, endpoint: bool) -> dict:
    """The settings that change a slide's outputs (recorded in its identity)."""
    from brst.handlers.archive_facts import sha256_file

    chosen = {"step_um": options["step_um"], "genes": split_names(options["genes"]),
              "top_genes": options["top_genes"],
              "gene_r_sha256": sha256_file(options["gene_r"]) if options["gene_r"] else None}
    if endpoint:
        chosen.update(tile_um=options["tile_um"], tile_px=options["tile_px"])
    return chosen


def _model(options: dict):
    """The predictor, the per-gene validation r and the model's identity."""
    from brst.train.checkpoint import resolve_checkpoint
    from brst.train.cohort.identity import checkpoint_identity, endpoint_identity
    from brst.train.slide.drawn_genes import table_validation_r

    check_model_sources(options["checkpoint"], options["endpoint"], None, None)
    allow_insecure_sources(options["allow_insecure"])
    predictor, validation = open_predictor(options["checkpoint"], options["endpoint"], options["device"],
                                           endpoint_settings(**{name: options[name] for name in ENDPOINT_OPTIONS}))
    if options["gene_r"] is not None:
        validation = table_validation_r(options["gene_r"])
    model = (checkpoint_identity(resolve_checkpoint(options["checkpoint"])) if options["checkpoint"] is not None
             else endpoint_identity(predictor.description))
    return predictor, validation, model


def _run(slides, out_dir: Path, index: int, n_shards: int, options: dict, metrics) -> dict[str, int]:
    """Run one shard; returns the count of each status."""
    from brst.train.cohort.run import ShardJob, run_shard
    from brst.train.cohort.shards import select
    from brst.train.cohort.status import shard_name
    from brst.train.slide.run import SlideJob

    template = SlideJob(slide="", out_dir=out_dir, genes=tuple(split_names(options["genes"]) or ()) or None,
                        **{name: options[name] for name in JOB_OPTIONS if name != "genes"})
    predictor, validation, model = _model(options)
    try:
        job = ShardJob(out_dir=out_dir, shard=shard_name(index, n_shards), slides=select(slides, index, n_shards),
                       template=template, model=model,
                       options=_identity_options(options, options["endpoint"] is not None))
        log.info("%s: %d of the manifest's %d slides", job.shard, len(job.slides), len(slides))
        return run_shard(job, predictor, validation, metrics)
    finally:
        predictor.close()


@click.command("predict-cohort")
@click.option("--manifest", required=True, type=PATH,
              help="CSV: slide_id, source (file, DICOM folder or dicomweb:// URL; relative to the manifest), "
                   "optional um_per_px, measured, section.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Cohort folder: <slide_id>/ per slide, _cohort/ for status and summary.")
@click.option("--shard", metavar="I/N", help="Run shard I of N (0-based): the slides whose id hashes to I.")
@click.option("--shards", type=click.IntRange(1, 100_000),
              help="Shard count; the index is $JOB_COMPLETION_INDEX (a Kubernetes indexed Job).")
@click.option("--summarize", is_flag=True,
              help="Only merge the shards' results: _cohort/cohort.csv, cohort.h5ad, contact_sheet.png.")
@click.option("--flag-share", type=click.FloatRange(0.0, 1.0), default=0.25, show_default=True,
              help="Summary: slides with more than this share of out-of-domain tiles are flagged and listed first.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Serve brst_cohort_slides_total{status} for Prometheus on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@click.pass_context
def predict_cohort(ctx: click.Context, manifest: Path, out_dir: Path, shard: str | None, shards: int | None,
                   summarize: bool, flag_share: float, metrics_port: int | None, metrics_host: str,
                   **slide_options) -> None:
    """Predict every slide of a manifest (resumable, shardable), then summarize the cohort.

    A slide whose outputs exist and were made from the same source, model and options is
    skipped; a failing slide is recorded with its reason and the others go on.
    """
    from brst.train.cohort.summary import summarize as write_summary

    try:
        slides = read_manifest(manifest)
    except ManifestError as err:
        click.echo(f"brst-train: error: {err}", err=True)
        ctx.exit(MANIFEST_EXIT)
    if summarize:
        _summarize(write_summary(slides, out_dir, flag_share), out_dir)
        return
    index, n_shards = _shard(shard, shards)
    counts = _with_metrics(metrics_port, metrics_host,
                           lambda metrics: _run(slides, out_dir, index, n_shards, slide_options, metrics))
    click.echo(f"{', '.join(f'{n} {status}' for status, n in counts.items())} of {sum(counts.values())} slides "
               f"(shard {index}/{n_shards}) -> {out_dir}")
    if n_shards == 1:
        _summarize(write_summary(slides, out_dir, flag_share), out_dir)
    if counts.get("failed"):
        click.echo(f"brst-train: {counts['failed']} slide(s) failed; reasons in {out_dir}/_cohort/status/", err=True)
        ctx.exit(1)


def _with_metrics(port: int | None, host: str, work):
    """``work(metrics)`` with the cohort counter served on ``host:port`` while it runs (when a port is given)."""
    from brst.train.cohort.metrics import CohortMetrics

    metrics = CohortMetrics()
    if port is not None:
        metrics.serve(port, host)
    try:
        return work(metrics)
    finally:
        metrics.close()


def _summarize(table, out_dir: Path) -> None:
    counts = table["status"].value_counts().to_dict()
    click.echo(f"cohort: {', '.join(f'{n} {s}' for s, n in counts.items())} -> {out_dir}/_cohort/cohort.csv")


predict_cohort.params.extend(p for p in predict_slide.params if p.name not in PER_SLIDE_OPTIONS)
