"""Helpers shared by the training tests (test_fit, test_resume, test_distributed).

The tests train ``test_efficientnet`` / ``test_vit`` (timm's tiny versions of the real
architectures) at 32 px on the real HER2ST patches (fixture ``her2st_h5``), so a whole
epoch (22 steps of 32 spots) takes seconds on a shared 2-core CPU.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from brst.train.cli.main import cli

#: a tiny real architecture at a small input: one epoch in seconds
TINY = ("--input-size", "32", "--workers", "0")


@pytest.fixture()
def one_thread():
    """One intra-op thread: on an oversubscribed CPU, far faster than two (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: object, env: dict | None = None) -> Result:
    """``brst-train ARGS`` in-process; exceptions other than clean exits propagate."""
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: metrics that measure time, not the computation
TIMING = frozenset({"seconds", "samples_per_s", "data_wait_frac"})


def computed(row: dict) -> dict:
    """A metrics row without its timing fields."""
    return {key: value for key, value in row.items() if key not in TIMING}


def max_weight_difference(first: dict, second: dict) -> float:
    """Largest absolute difference between two state dicts' floating tensors."""
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item()
               for k in first if first[k].is_floating_point())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_line_error(result, *fragments: str) -> str:
    """A CliRunner result that failed as a user error: exit 2, no traceback, one ``brst-train: error:``
    line naming every fragment; returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("brst-train: error: "), result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line
