"""Write the stain-shift stress test: per-section CSV, summary JSON, a picture, a printed table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brst.train.atomic import write_bytes_atomic

from .fold import write_csv_atomic
from .plots import save_png
from .stain_shift import ShiftScore, per_section_margins, shift_rows, summarize_shift


def shift_figure(scores: list[ShiftScore], title: str):
    """Mean r of the model and darkness against the magnitude (left), and each section's margin (right)."""
    from matplotlib.figure import Figure

    summary = summarize_shift(scores)
    magnitudes = [row["magnitude"] for row in summary]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    left.plot(magnitudes, [row["model_r"] for row in summary], "o-", label="model")
    left.plot(magnitudes, [row["darkness_r"] for row in summary], "s--", label="darkness (image only)")
    left.set(xlabel="stain shift magnitude (HED scale +/- s, shift +/- 0.2 s)", ylabel="mean r over genes",
             title="mean over held-out sections and draws")
    left.legend()
    for section, row in sorted(per_section_margins(scores).items()):
        right.plot(sorted(row), [row[m] for m in sorted(row)], "o-", label=section)
    right.axhline(0.0, color="grey", lw=0.8)
    right.set(xlabel="stain shift magnitude", ylabel="model r - darkness r", title="margin per held-out section")
    right.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_stain_shift(out_dir: str | Path, scores: list[ShiftScore], title: str) -> dict:
    """``stain_shift.csv`` (every section, magnitude, draw), ``stain_shift.json`` (summary per
    magnitude and per section) and ``stain_shift.png``; returns the summary."""
    out_dir = Path(out_dir)
    write_csv_atomic(out_dir / "stain_shift.csv", shift_rows(scores))
    summary = {"per_magnitude": summarize_shift(scores), "per_section_margin": per_section_margins(scores)}
    write_bytes_atomic(out_dir / "stain_shift.json", json.dumps(summary, indent=1, default=float).encode())
    save_png(shift_figure(scores, title), out_dir / "stain_shift.png")
    return summary


def format_shift(summary: dict) -> str:
    """The per-magnitude table as text."""
    lines = ["stain shift   model r   darkness r   margin   worst section   margin kept   model MAE   |bias|"]
    for row in summary["per_magnitude"]:
        kept = row["margin_kept"]
        lines.append(f"{row['magnitude']:11.2f}   {row['model_r']:7.3f}   {row['darkness_r']:10.3f}   "
                     f"{row['margin']:+6.3f}   {row['worst_section_margin']:+13.3f}   "
                     f"{'' if np.isnan(kept) else f'{kept:11.0%}'}   {row['model_mae']:9.3f}   "
                     f"{row['model_abs_bias']:6.3f}")
    return "\n".join(lines)
