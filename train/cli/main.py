"""The ``brst-train`` command line: a click group whose subcommands load lazily.

``brst-train --arch inception_v3 ...`` (no subcommand) means ``brst-train fit ...``,
so the product card's command works as typed. Each subcommand lives in its own
module (``brst.train.cli.<stage>``) and is imported only when used, so ``--help`` is fast.
A :class:`~brst.handlers.errors.BrstError` raised anywhere becomes one line on stderr and exit
status 2 (also under click's ``CliRunner``).
"""
from __future__ import annotations

import importlib
import logging

import click

from brst.handlers.errors import BrstError

#: subcommand name -> ("module:attribute" relative to brst.train.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("data:fetch", "Download public HER2ST files (checksums verified, resumable)."),
    "prepare": ("data:prepare", "Cut spot patches and counts from slides into an HDF5 dataset."),
    "inspect": ("data:inspect_cmd", "Summarise an HDF5 dataset; optionally a contact sheet PNG."),
    "stain": ("stain:stain", "Fit and show stain normalisation references."),
    "fit": ("fit:fit", "Train a model (the default: brst-train --arch inception_v3)."),
    "evaluate": ("evaluate:evaluate", "Per-gene correlations, baselines, cross-validation."),
    "archive": ("serve:archive", "Package a checkpoint as a TorchServe .mar archive."),
    "serve": ("serve:serve", "Run TorchServe on an archive until stopped."),
    "predict": ("serve:predict", "Send patches to a served model over HTTP or gRPC."),
    "predict-slide": ("slide:predict_slide", "Expression maps for a whole slide."),
    "predict-cohort": ("cohort:predict_cohort", "predict-slide over a manifest of slides (resumable, sharded)."),
    "keygen": ("serve:keygen", "Make an Ed25519 key pair for signing archives."),
}
DEFAULT_COMMAND = "fit"


class LazyDefaultGroup(click.Group):
    """A group that imports subcommands on first use and defaults to ``fit``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        module_name, attr = SUBCOMMANDS[cmd_name][0].split(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List subcommands from the static table, so ``--help`` imports nothing heavy."""
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        start = 2 if args[:1] == ["--log-level"] else 0
        rest = args[start:]
        if rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help", "--version"):
            args = [*args[:start], DEFAULT_COMMAND, *rest]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrstError as err:
            click.echo(f"brst-train: error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=LazyDefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brst")
@click.option("--log-level", default="INFO", show_default=True, envvar="BRST_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Predict gene expression from H&E patches (BrST-Net): prepare, train, evaluate, serve.

    Without a subcommand, options go to fit:  brst-train --arch inception_v3
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="brst-train")
