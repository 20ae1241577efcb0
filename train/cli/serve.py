"""``brst-train archive``, ``serve`` and ``predict``: from a checkpoint to served predictions.

- ``archive``: checkpoint -> ``<model-store>/<name>.mar`` (:mod:`brst.train.serve.archiver`);
- ``serve``: TorchServe with archives from the model store, in the foreground until
  Ctrl-C or SIGTERM, READY before it prints its endpoints (:mod:`brst.train.serve.torchserve`);
- ``predict``: send images to a served model over HTTP or gRPC (:mod:`brst.train.serve.client`),
  one JSON line per image on stdout;
- ``keygen``: an Ed25519 key pair for ``archive --sign`` and ``serve --public-key``.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import click
from tqdm import tqdm

from brst.train.serve.settings import ServeSettings

from .params import DEFAULT_MODEL_NAME, endpoint_options, endpoint_transport, model_name_option

log = logging.getLogger(__name__)
#: ``archive``'s defaults are the settings' own (written once, in brst.train.serve.settings)
SETTINGS = ServeSettings()


@click.command()
@click.option("--checkpoint", required=True, envvar="BRST_CHECKPOINT",
              type=click.Path(exists=True, path_type=Path), help="Checkpoint file, or a run directory (its last.pt).")
@model_name_option("--name", help="Model name (URL path /predictions/NAME).")
@click.option("--model-store", default="model_store", show_default=True, envvar="BRST_MODEL_STORE",
              type=click.Path(file_okay=False, path_type=Path), help="Folder the .mar is written to.")
@click.option("--version", "model_version", default=None,
              help="Model version (default: ARCH-eEPOCH-<sha256 of the weights, 8 hex>).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=SETTINGS.batch_size, show_default=True,
              help="Requests TorchServe batches into one handler call.")
@click.option("--max-batch-delay-ms", type=click.IntRange(0, 60_000), default=SETTINGS.max_batch_delay_ms,
              show_default=True,
              help="How long TorchServe waits to fill a batch.")
@click.option("--workers", type=click.IntRange(1, 256), default=SETTINGS.workers, show_default=True,
              help="Worker processes (each with one torch thread on a shared CPU when several).")
@click.option("--response-timeout-s", type=click.IntRange(1, 3600), default=SETTINGS.response_timeout_s,
              show_default=True)
@click.option("--tta/--no-tta", default=SETTINGS.tta, show_default=True,
              help="Average the 8 flips/rotations and return a per-gene spread.")
@click.option("--sign", "signing_key", type=click.Path(path_type=Path), envvar="BRST_SIGNING_KEY",
              help="Ed25519 private key (PEM, from brst-train keygen): sign every entry, the name and the version.")
@click.option("--force", is_flag=True, help="Replace an existing archive of that name.")
def archive(checkpoint: Path, model_name: str, model_store: Path, model_version: str | None, batch_size: int,
            max_batch_delay_ms: int, workers: int, response_timeout_s: int, tta: bool, signing_key: Path | None,
            force: bool) -> None:
    """Archive a checkpoint for TorchServe: MODEL_STORE/NAME.mar."""
    from brst.train.serve.archiver import build_archive

    settings = ServeSettings(batch_size, max_batch_delay_ms, workers, response_timeout_s, tta)
    click.echo(str(build_archive(checkpoint, model_name, model_store, model_version, settings, force, signing_key)))


def _model_files(models: tuple[str, ...]) -> dict[str, str]:
    """``NAME`` or ``NAME=FILE.mar`` -> {name: archive file name}."""
    return dict(model.split("=", 1) if "=" in model else (model, f"{model}.mar") for model in models)


def _stop_on_sigterm() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@click.command()
@click.option("--model-store", default="model_store", show_default=True, envvar="BRST_MODEL_STORE",
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model-name", "--model", "models", multiple=True, default=(DEFAULT_MODEL_NAME,), show_default=True,
              help="NAME (serves MODEL_STORE/NAME.mar) or NAME=FILE.mar; repeat for several.")
@click.option("--config", default="deploy/config.properties", show_default=True, envvar="BRST_TS_CONFIG",
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="TorchServe config.properties.")
@click.option("--run-dir", default="runs/serve", show_default=True, envvar="BRST_SERVE_DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the effective config, endpoints.json and logs/ go.")
@click.option("--free-ports/--config-ports", default=False, show_default=True,
              help="Listen on free 127.0.0.1 ports instead of the config's.")
@click.option("--timeout-s", type=click.IntRange(10, 3600), default=300, show_default=True,
              help="How long to wait for the models to be READY.")
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(exists=True, path_type=Path),
              envvar="BRST_ARCHIVE_PUBLIC_KEY",
              help="Serve only archives signed with this Ed25519 public key (PEM file, or a folder of *.pub/*.pem); "
                   "repeat for a key ring (env: paths separated by the path separator). Without any: unsigned, "
                   "with a warning.")
@click.option("--model-version", "model_versions", multiple=True, envvar="BRST_MODEL_VERSIONS", metavar="NAME=VERSION",
              help="With a public key: serve model NAME only from an archive signed for VERSION (repeat per model).")
@click.option("--check", is_flag=True, help="Stop as soon as the models are READY (a smoke test).")
def serve(model_store: Path, models: tuple[str, ...], config: Path, run_dir: Path, free_ports: bool,
          timeout_s: int, public_keys: tuple[Path, ...], model_versions: tuple[str, ...], check: bool) -> None:
    """Serve archives with TorchServe until Ctrl-C / SIGTERM; prints the endpoints as JSON.

    The endpoints are also written to RUN_DIR/endpoints.json once every model is READY. With a
    public key, TorchServe serves checked copies of signed archives only; without one, it serves
    the archives unsigned and says so (the serving image refuses that unless BRST_ALLOW_UNSIGNED=1).
    """
    from brst.handlers.signed_mar import parse_versions
    from brst.train.serve.torchserve import TorchServe

    server = TorchServe(model_store, _model_files(models), run_dir, config, free_loopback_ports=free_ports,
                        public_keys=list(public_keys), model_versions=parse_versions(" ".join(model_versions)))
    _stop_on_sigterm()
    try:
        server.start(timeout_s)
        click.echo(json.dumps(server.endpoints.to_dict()))
        name = next(iter(server.models))
        log.info("try: curl -s -T patch.png %s/predictions/%s", server.endpoints.inference, name)
        while not check:
            server.raise_if_dead()
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        server.stop()


@click.command()
@click.option("--endpoint", required=True, envvar="BRST_ENDPOINT",
              help="http(s)://HOST[:PORT] (inference API) or grpc(s)://HOST[:PORT] (gRPC inference API).")
@model_name_option("--model", help="Served model name.")
@click.option("--um-per-px", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Scale of the images (µm per pixel); they are resampled to the model's.")
@click.option("--token", envvar="BRST_TS_TOKEN", default=None,
              help="Inference key of a TorchServe with token authorization (key_file.json), or user:password "
                   "for an Ingress with basic authentication.")
@endpoint_options
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True)
@click.option("--stain-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of the images' slide stain statistics (named fields, e.g. a predict-slide "
                   "summary.json's stain.slide_statistics), sent with every image.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def predict(endpoint: str, model_name: str, um_per_px: float | None, token: str | None, tls: bool,
            ca_file: Path | None, auth_scheme: str, credentials_file: Path | None, timeout_s: float,
            stain_json: Path | None, images: tuple[Path, ...]) -> None:
    """Predict gene expression for IMAGES (PNG/JPEG/TIFF patches): one JSON line each."""
    from brst.train.serve.client import make_client

    stain = None if stain_json is None else _stain_statistics(stain_json)
    transport = endpoint_transport(token, credentials_file, auth_scheme, tls, ca_file)
    client = make_client(endpoint, model_name, timeout_s=timeout_s, transport=transport)
    for image in tqdm(images, desc="predict", unit="image", disable=len(images) < 2):
        answer = client.predict(image.read_bytes(), um_per_px, subject=str(image), stain=stain)
        click.echo(json.dumps({"image": str(image), "prediction": answer}))


def _stain_statistics(path: Path) -> dict:
    """The JSON object in ``path`` (the server checks its fields against its model's normaliser)."""
    from brst.handlers.errors import BrstError

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BrstError(f"--stain-json {path}", f"is not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(doc, dict):
        raise BrstError(f"--stain-json {path}", "must hold a JSON object of named statistics "
                                                '(e.g. {"stain_matrix": ..., "max_concentration": ...})')
    return doc


@click.command()
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for NAME.key (private, mode 0600) and NAME.pub (public).")
@click.option("--name", "key_name", default="archive", show_default=True, help="File name of the key pair.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen(out_dir: Path, key_name: str, force: bool) -> None:
    """Make an Ed25519 key pair for signing archives; prints the key id."""
    from brst.train.serve.keys import generate_keys

    ident = generate_keys(out_dir / f"{key_name}.key", out_dir / f"{key_name}.pub", force)
    click.echo(f"{ident} {out_dir / f'{key_name}.key'} {out_dir / f'{key_name}.pub'}")
