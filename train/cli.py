"""The ``brst-train`` command line: a click group whose subcommands load lazily.

``brst-train --arch inception_v3 ...`` (no subcommand) means ``brst-train fit ...``,
so the product card's command works as typed. Each subcommand lives in its own
module (``cli_<topic>.py``) and is imported only when used, so ``--help`` is fast.
A :class:`~brst.train.errors.BrstError` raised anywhere becomes one line on stderr and exit
status 2 (also under click's ``CliRunner``).
"""
from __future__ import annotations

import importlib
import logging
import click

from .errors import BrstError

#: subcommand name -> "module:attribute" (relative to brst.train)
SUBCOMMANDS: dict[str, str] = {
    "fetch": "cli_data:fetch",
    "prepare": "cli_data:prepare",
    "inspect": "cli_data:inspect_cmd",
    "stain": "cli_stain:stain",
    "fit": "cli_fit:fit",
    "evaluate": "cli_evaluate:evaluate",
    "archive": "cli_serve:archive",
    "serve": "cli_serve:serve",
    "predict": "cli_serve:predict",
    "predict-slide": "cli_slide:predict_slide",
}
DEFAULT_COMMAND = "fit"


class LazyDefaultGroup(click.Group):
    """A group that imports subcommands on first use and defaults to ``fit``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        return getattr(module, attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("--") and args[0] not in ("--help", "--version", "--log-level"):
            args = [DEFAULT_COMMAND, *args]
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

    Without a subcommand, options go to ``fit``: ``brst-train --arch inception_v3``.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="brst-train")
