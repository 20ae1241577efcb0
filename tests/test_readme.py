"""The README's commands and links are real: every ``brst-train`` command in its code blocks names
a subcommand that exists and only options that subcommand has, and every relative link points to a
file in the repository.

The commands are checked against the click command objects (``brst.train.cli.main.cli``), not run:
their paths and servers are examples. ``--help`` stays fast because the CLI imports each stage only
when asked for it.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from brst.train.cli.main import DEFAULT_COMMAND, cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: ``evaluate`` passes any option it does not know to ``fit`` (cross-validation folds train)
FORWARDS_TO_FIT = {"evaluate"}


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(block: str) -> list[str]:
    """Shell lines of a code block, continuation lines joined and comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split(" #", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def brst_commands(text: str) -> list[list[str]]:
    """Every ``brst-train ...`` invocation in the README's code blocks, as its arguments."""
    commands = []
    for block in code_blocks(text):
        for line in command_lines(block):
            words = shlex.split(line.rstrip("&").strip())
            for i, word in enumerate(words):
                if word.endswith("brst-train") or word.endswith("brst-train)"):
                    commands.append(words[i + 1:])
    return commands


def resolve(args: list[str]) -> tuple[str, click.Command, list[str]]:
    """(name, command, remaining args) for a ``brst-train`` argument list, following groups."""
    ctx = click.Context(cli)
    if not args or args[0].startswith("-"):
        args = [DEFAULT_COMMAND, *args]
    command = cli.get_command(ctx, args[0])
    assert command is not None, f"README: brst-train {args[0]}: no such subcommand"
    name, rest = args[0], args[1:]
    while isinstance(command, click.Group):
        sub = command.get_command(ctx, rest[0]) if rest else None
        assert sub is not None, f"README: brst-train {name} {rest[:1]}: no such subcommand"
        name, command, rest = f"{name} {rest[0]}", sub, rest[1:]
    return name, command, rest


def option_names(command: click.Command) -> set[str]:
    """Every option spelling a command accepts (``--x``, ``--no-x``, ``-h``)."""
    names = set(command.get_help_option_names(click.Context(command)))
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


README_COMMANDS = brst_commands(README.read_text(encoding="utf-8"))


def test_readme_shows_a_command_per_stage():
    shown = {resolve(args)[0] for args in README_COMMANDS}
    stages = {"prepare", "fit", "evaluate", "archive", "serve", "predict", "predict-slide", "predict-cohort"}
    assert stages <= shown, f"README has no example of {sorted(stages - shown)}"


@pytest.mark.parametrize("args", README_COMMANDS, ids=lambda args: " ".join(args)[:60])
def test_readme_command_names_real_subcommand_and_options(args):
    name, command, rest = resolve(args)
    known = option_names(command)
    if name in FORWARDS_TO_FIT:
        known |= option_names(resolve([DEFAULT_COMMAND])[1])
    used = {word.split("=", 1)[0] for word in rest if word.startswith("-") and not word.startswith("---")}
    unknown = sorted(used - known)
    assert not unknown, f"README: brst-train {name}: no option {unknown}"


@pytest.mark.parametrize("args", README_COMMANDS, ids=lambda args: " ".join(args)[:60])
def test_readme_command_choices_are_valid(args):
    """A literal value given to an option with fixed choices is one of them."""
    name, command, rest = resolve(args)
    options = {opt: param for param in command.params if isinstance(param, click.Option) for opt in param.opts}
    for option, value in zip(rest, rest[1:]):
        param = options.get(option)
        if param is not None and isinstance(param.type, click.Choice) and not param.is_flag:
            assert value in param.type.choices, f"README: brst-train {name} {option} {value}: not in {param.type.choices}"


def test_readme_links_point_to_files():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)
    relative = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "README has no relative links"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_lines_are_short():
    long_lines = [n for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long_lines, f"README lines over 120 characters: {long_lines}"


def test_checker_catches_a_wrong_command():
    """The checks fail on a subcommand or option that does not exist (so the tests above can fail)."""
    with pytest.raises(AssertionError, match="no such subcommand"):
        resolve(["predict-slides", "--slide", "x.svs"])
    with pytest.raises(AssertionError, match="no option"):
        test_readme_command_names_real_subcommand_and_options(["fit", "--recipe", "small-cohort", "--stain-scopes", "slide"])
    assert brst_commands("```bash\nbrst-train fit --arch x \\\n    --epochs 2   # two\n```\n") == [
        ["fit", "--arch", "x", "--epochs", "2"]]
