"""Every command's registry choices are its registry's names, in the registry's order."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from brst.handlers.stain import METHODS
from brst.handlers.targets import KINDS
from brst.train.cli.data import prepare
from brst.train.cli.fit import fit
from brst.train.cli.main import cli
from brst.train.cli.stain import stain
from brst.train.data.readers import FORMATS
from brst.train.fit.optim import OPTIMIZERS
from brst.train.fit.recipes import RECIPES


def _option(command: click.Command, name: str) -> click.Option:
    return next(param for param in command.params if isinstance(param, click.Option) and name in param.opts)


@pytest.mark.parametrize(("command", "option", "registry"), [
    (fit, "--recipe", RECIPES), (fit, "--optimizer", OPTIMIZERS), (fit, "--target", KINDS),
    (fit, "--stain", METHODS),
])
def test_fit_choices_are_the_registries_names(command, option, registry):
    assert list(_option(command, option).type.choices) == registry.names()


def test_stain_fit_method_choices_are_the_stain_methods():
    assert list(_option(stain.commands["fit"], "--method").type.choices) == METHODS.names()


def test_prepare_formats_are_the_readers_and_an_unknown_one_is_a_one_line_error(tmp_path):
    assert _option(prepare, "--format").metavar == "|".join(FORMATS.names()) == "her2st|stnet|visium|hest"
    result = CliRunner().invoke(cli, ["prepare", "--format", "slideseq", "--root", str(tmp_path),
                                      "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "brst-train: error: --format slideseq: unknown format 'slideseq'; choose one of her2st, stnet, visium, hest"]
    assert not (tmp_path / "x.h5").exists()
