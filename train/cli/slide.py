"""``brst-train predict-slide``: a whole-slide expression map from a checkpoint or a served model.

Writes into ``--out``: ``predictions.csv`` (one row per tile), ``predictions.h5ad`` (AnnData
for scanpy/squidpy), ``heatmaps/<gene>.png``, ``summary.json``, and for a model with an in-domain
score its map ``domain_score.png`` (per-tile ``domain_score``/``out_of_domain`` in the table and
``obs``); with ``--measured`` also ``gene_r.csv``, ``measured_spots.csv`` and ``measured_vs_predicted.png``.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from brst.handlers.errors import BrstError
from brst.train.slide.endpoint import TRANSFERS

from .params import endpoint_options, endpoint_transport, model_name_option, split_names


def check_model_sources(checkpoint: Path | None, endpoint: str | None, measured: Path | None,
                        section: str | None) -> None:
    """The model options name exactly one model (``--checkpoint`` or ``--endpoint``), and ``--measured``
    comes with ``--section``; otherwise a :class:`BrstError` naming the options."""
    if (checkpoint is None) == (endpoint is None):
        raise BrstError("--checkpoint/--endpoint", "give exactly one: a checkpoint to run here, or a served endpoint")
    if (measured is None) != (section is None):
        raise BrstError("--measured/--section", "give both: the prepared dataset and the section of this slide")


def open_predictor(checkpoint: Path | None, endpoint: str | None, device: str, endpoint_options: dict):
    """The predictor of the chosen mode and the checkpoint's per-gene validation r (empty if none)."""
    if checkpoint is not None:
        from brst.train.checkpoint import load_checkpoint
        from brst.train.fit.distributed import resolve_device
        from brst.train.slide.drawn_genes import checkpoint_validation_r
        from brst.train.slide.predictors import LocalPredictor

        ckpt = load_checkpoint(checkpoint)
        return LocalPredictor(ckpt, resolve_device(device)), checkpoint_validation_r(ckpt)
    from brst.train.slide.endpoint import EndpointPredictor

    return EndpointPredictor(endpoint, **endpoint_options), {}


#: predict-slide's options that set up the endpoint client (:func:`endpoint_settings`)
ENDPOINT_OPTIONS = ("model_name", "tile_um", "tile_px", "concurrency", "tiles_per_request", "transfer", "retries",
                    "timeout_s", "token", "tls", "ca_file", "auth_scheme", "credentials_file")


def endpoint_settings(*, token: str | None, tls: bool, ca_file: Path | None, auth_scheme: str,
                      credentials_file: Path | None, **client: object) -> dict:
    """The :class:`~brst.train.slide.endpoint.EndpointPredictor` keyword arguments from the
    :data:`ENDPOINT_OPTIONS` values: the client settings as they are, and the transport."""
    return {**client, "transport": endpoint_transport(token, credentials_file, auth_scheme, tls, ca_file)}


def allow_insecure_sources(allow: bool) -> None:
    """``--allow-insecure``: through the environment, which reaches every place (and process) that opens a slide."""
    from brst.train.sources.dicom_image import ALLOW_INSECURE_ENV

    if allow:
        os.environ[ALLOW_INSECURE_ENV] = "1"


@click.command("predict-slide")
@click.option("--checkpoint", type=click.Path(path_type=Path), envvar="BRST_CHECKPOINT",
              help="Checkpoint file or run directory (its last.pt): run the model here.")
@click.option("--endpoint", help="Served model instead: http(s)://HOST[:PORT] or grpc(s)://HOST[:PORT].")
@model_name_option(help="Model name on the endpoint.")
@click.option("--slide", required=True, metavar="SOURCE",
              help="H&E slide: JPEG, PNG, (OME-)TIFF, any OpenSlide format (SVS, NDPI, MRXS, SCN, BIF, Philips "
                   "TIFF), a folder of DICOM files, or dicomweb://HOST[:PORT]/PREFIX/studies/UID/series/UID "
                   "(credentials: $BRST_DICOMWEB_CREDENTIALS or $BRST_DICOMWEB_CREDENTIALS_FILE).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder.")
@click.option("--genes", help="Comma-separated genes to draw [default: the best validated].")
@click.option("--top-genes", type=click.IntRange(1, 100), default=6, show_default=True,
              help="How many genes to draw when --genes is not given.")
@click.option("--step-um", type=click.FloatRange(10.0, 5000.0), default=200.0, show_default=True,
              help="Grid step in micrometres: 200 = ST spot pitch, 100 = Visium, or denser.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (local mode).")
@click.option("--um-per-px", type=click.FloatRange(0.01, 100.0),
              help="Micrometres per slide pixel [default: from the image metadata].")
@click.option("--measured", type=click.Path(path_type=Path),
              help="Prepared dataset (.h5) holding this slide's section: measured next to predicted.")
@click.option("--section", help="The slide's section id in --measured.")
@click.option("--gene-r", type=click.Path(path_type=Path),
              help="Per-gene r table ranking the genes to draw (evaluate's genes_cv.csv) [default: the checkpoint's].")
@click.option("--tile-um", type=click.FloatRange(10.0, 2000.0), default=112.0, show_default=True,
              help="Endpoint mode: field of view sent per tile (at least the served model's patch_um).")
@click.option("--tile-px", type=click.IntRange(16, 2048), default=224, show_default=True,
              help="Endpoint mode: pixels a side of each sent tile.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Endpoint mode: requests in flight.")
@click.option("--tiles-per-request", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Endpoint mode: tiles in one request.")
@click.option("--transfer", type=click.Choice(TRANSFERS), default=TRANSFERS[0], show_default=True,
              help="Endpoint mode: how tiles travel: npy = raw uint8 pixels (a .npy file per request, nothing to "
                   "encode; a server that refuses it gets png, with a warning), png = base64 PNGs in JSON.")
@click.option("--retries", type=click.IntRange(0, 20), default=4, show_default=True,
              help="Endpoint mode: attempts after the first (back-off 0.5 s, doubling) before giving up.")
@click.option("--timeout-s", type=click.FloatRange(0.1, 3600.0), default=60.0, show_default=True,
              help="Endpoint mode: per-request timeout.")
@click.option("--token", envvar="BRST_TS_TOKEN",
              help="Endpoint mode: inference token (token auth on), or user:password (an Ingress's basic auth).")
@endpoint_options
@click.option("--read-workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Threads reading tiles from the slide.")
@click.option("--allow-insecure", is_flag=True, envvar="BRST_ALLOW_INSECURE",
              help="Send DICOMweb credentials over plain HTTP (dicomweb://) to another machine anyway, with a "
                   "warning [env BRST_ALLOW_INSECURE=1]; refused otherwise (use dicomwebs://).")
def predict_slide(checkpoint: Path | None, endpoint: str | None, model_name: str, slide: str, out_dir: Path,
                  genes: str | None, top_genes: int, step_um: float, batch_size: int, device: str,
                  um_per_px: float | None, measured: Path | None, section: str | None, gene_r: Path | None,
                  tile_um: float, tile_px: int, concurrency: int, tiles_per_request: int, transfer: str,
                  retries: int, timeout_s: float, token: str | None, tls: bool, ca_file: Path | None,
                  auth_scheme: str, credentials_file: Path | None, read_workers: int, allow_insecure: bool) -> None:
    """Predict expression over a whole slide: table, AnnData and heatmaps.

    Tissue is found on a thumbnail; tiles of the model's patch size sit every --step-um
    on it, are read at the model's um/px whatever the slide's, and go through the local
    model (GPU when present) or the served endpoint in batches.
    """
    from brst.train.slide.drawn_genes import table_validation_r
    from brst.train.slide.run import SlideJob, run_slide

    allow_insecure_sources(allow_insecure)
    check_model_sources(checkpoint, endpoint, measured, section)
    predictor, validation = open_predictor(checkpoint, endpoint, device, endpoint_settings(
        model_name=model_name, tile_um=tile_um, tile_px=tile_px, concurrency=concurrency,
        tiles_per_request=tiles_per_request, transfer=transfer, retries=retries, timeout_s=timeout_s, token=token,
        tls=tls, ca_file=ca_file, auth_scheme=auth_scheme, credentials_file=credentials_file))
    if gene_r is not None:
        validation = table_validation_r(gene_r)
    job = SlideJob(slide=slide, out_dir=out_dir, um_per_px=um_per_px, step_um=step_um, batch_size=batch_size,
                   genes=tuple(split_names(genes) or ()) or None, top_genes=top_genes, measured=measured,
                   section=section, read_workers=read_workers)
    try:
        summary = run_slide(job, predictor, validation)
    finally:
        predictor.close()
    click.echo(f"{summary['tiles']} tiles at {summary['tiles_per_s']:.1f} tiles/s -> {out_dir}")
    if "measured" in summary:
        m = summary["measured"]
        click.echo(f"section {m['section']}: {m['spots']} spots, {m['genes']} genes, mean r {m['mean_r']:.3f}, "
                   f"{m['n_positive']} genes with r > 0 (gene_r.csv)")
