"""The record of an end-to-end run: one line per step as it ends, facts, and a Markdown table at the end."""
from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path

from kube import Failed


class Report:
    """Steps (PASS/FAIL, seconds, notes) and facts of one run, printed and written to ``path``."""

    def __init__(self, title: str, path: Path) -> None:
        self.title = title
        self.path = path
        self.results: list[tuple[str, str, float, str]] = []
        self.facts: dict[str, str] = {}
        self.start = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{self.title} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str, required: bool = True):
        """A timed step; yields a list the step appends its notes to. A failure is recorded and,
        when ``required``, raised again (the run stops)."""
        self.log(f"--- {name}")
        t0 = time.monotonic()
        note: list[str] = []
        try:
            yield note
        except Exception as error:  # noqa: BLE001 - every failure is reported, then re-raised if required
            seconds = time.monotonic() - t0
            text = f"{type(error).__name__}: {error}"
            self.results.append(("FAIL", name, seconds, text[:600]))
            self.log(f"FAIL {name} ({seconds:.0f} s): {text[:2000]}")
            if not isinstance(error, Failed):
                traceback.print_exc()
            if required:
                raise
            return
        seconds = time.monotonic() - t0
        self.results.append(("PASS", name, seconds, "; ".join(note)))
        self.log(f"PASS {name} ({seconds:.0f} s) {'; '.join(note)}")

    def write(self) -> int:
        """Prints and writes the summary; 0 when every step passed, else 1."""
        lines = [f"# make {self.title}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
                 f"{time.monotonic() - self.start:.0f} s in all", ""]
        lines += [f"- {key}: {value}" for key, value in self.facts.items()]
        lines += ["", "| result | step | s | notes |", "| --- | --- | --- | --- |"]
        lines += [f"| {r} | {name} | {s:.0f} | {notes.replace('|', '/')} |" for r, name, s, notes in self.results]
        text = "\n".join(lines) + "\n"
        print(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        return 0 if all(r == "PASS" for r, *_ in self.results) else 1
