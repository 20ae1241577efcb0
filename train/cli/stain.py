"""``brst-train stain fit | show``: fit a stain reference on an HDF5 dataset, and look at it.

    brst-train stain fit  --data her2st.h5 --method macenko --out stain.json
    brst-train stain show --reference stain.json --data her2st.h5 --out stain.png
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from brst.handlers.errors import BrstError
from brst.train.data.subsets import IndexPatches, spread_over_sections

from .params import PATH, split_names, stain_choice


def read_reference(path: Path):
    """Load a stain reference JSON as a normaliser; BrstError when it is not one."""
    from brst.handlers.stain import stain_from_json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BrstError(path, f"cannot read a stain reference JSON ({err})") from err
    try:
        return stain_from_json(data)
    except BrstError as err:
        raise BrstError(path, err.problem) from err


DATA_OPTION = click.option("--data", multiple=True, required=True, type=PATH, envvar="BRST_DATASET",
                           show_envvar=True, help="HDF5 dataset file(s) or folder(s) (repeat for several).")
SECTIONS_OPTION = click.option("--sections", multiple=True,
                               help="Sections to use (repeat or comma-separate); default all.")
DEVICE_OPTION = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
SEED_OPTION = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                           help="Seed for choosing patches.")


@click.group()
def stain() -> None:
    """Fit and show stain normalisation references (Macenko, Reinhard)."""


@stain.command("fit")
@DATA_OPTION
@click.option("--method", type=stain_choice(), default="macenko", show_default=True,
              help="Normalisation method.")
@click.option("--out", required=True, type=PATH, help="Reference JSON to write.")
@SECTIONS_OPTION
@click.option("--max-patches", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Patches to fit on, spread evenly over the sections.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Patches per batch.")
@DEVICE_OPTION
@SEED_OPTION
def fit(data: tuple[Path, ...], method: str, out: Path, sections: tuple[str, ...], max_patches: int,
        batch_size: int, device: str, seed: int) -> None:
    """Fit a stain reference JSON on an HDF5 dataset.

    The reference is the median of per-patch statistics over patches with tissue, so
    background, pen marks and one-stain patches cannot drag it.
    """
    from brst.handlers.stain import fit_stain
    from brst.train.atomic import write_json_atomic
    from brst.train.data import open_dataset
    from brst.train.fit.distributed import resolve_device

    index = open_dataset(list(data))
    chosen = spread_over_sections(index.spots["section"], split_names(sections), max_patches, seed)
    idx = np.concatenate(list(chosen.values()))
    module = fit_stain(method, IndexPatches(index, idx), batch_size=batch_size,
                       device=str(resolve_device(device)), progress=True)
    module.fit_info = {**module.fit_info, "sections": sorted(chosen), "data": [Path(f).name for f in index.files]}
    write_json_atomic(out, module.to_json())
    click.echo(f"{method} reference fitted on {module.fit_info.get('patches_used', 0)} of {len(idx)} patches "
               f"({', '.join(sorted(chosen))}) -> {out}")


@stain.command("show")
@click.option("--reference", required=True, type=PATH, help="Reference JSON written by 'stain fit'.")
@DATA_OPTION
@click.option("--out", required=True, type=PATH, help="PNG to write.")
@SECTIONS_OPTION
@click.option("--per-section", type=click.IntRange(1, 32), default=6, show_default=True,
              help="Patches shown per section.")
@DEVICE_OPTION
@SEED_OPTION
def show(reference: Path, data: tuple[Path, ...], out: Path, sections: tuple[str, ...], per_section: int,
         device: str, seed: int) -> None:
    """Draw a before/after PNG grid of each section's patches.

    Two rows per section: patches as stored, then stain-normalised with --reference.
    """
    import torch

    from brst.train.data import open_dataset
    from brst.train.evaluate.plots import save_png
    from brst.train.fit.distributed import resolve_device

    module = read_reference(reference).to(resolve_device(device))
    index = open_dataset(list(data))
    names = split_names(sections) or sorted(set(index.spots["section"]))
    rows = []
    for name, idx in spread_over_sections(index.spots["section"], names, per_section * len(names), seed).items():
        before = torch.from_numpy(index.patches(idx)).to(module.device).permute(0, 3, 1, 2)
        with torch.inference_mode():
            after, ok = module.forward_flagged(before)
        rows.append((name, before.cpu().numpy(), after.mul(255).round().byte().cpu().numpy(), ok.cpu().numpy()))
    save_png(before_after_figure(rows, title=reference_title(module)), out)
    passed = sum(int((~ok).sum()) for *_, ok in rows)
    click.echo(f"{sum(len(ok) for *_, ok in rows)} patches of {len(rows)} sections ({passed} passed through) -> {out}")


def reference_title(module) -> str:
    """One line naming the method and what the reference was fitted on."""
    info = module.fit_info
    fitted = (f"fitted on {info['patches_used']} patches of {', '.join(info.get('sections', []))}"
              if "patches_used" in info else "default reference")
    return f"stain normalisation: {module.method} ({fitted})"


def before_after_figure(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], title: str):
    """A grid with two rows per section (as stored, normalised); passed-through patches marked.

    Args:
        rows: ``(section, before uint8 (n, 3, P, P), after uint8 (n, 3, P, P), ok (n,) bool)`` per section.
        title: figure title.
    """
    from matplotlib.figure import Figure

    n_cols = max(len(ok) for *_, ok in rows)
    fig = Figure(figsize=(1.3 * n_cols + 1.2, 2.6 * len(rows) + 0.6))
    axes = fig.subplots(2 * len(rows), n_cols, squeeze=False)
    for r, (name, before, after, ok) in enumerate(rows):
        for kind, images in (("as stored", before), ("normalised", after)):
            row = 2 * r + (kind == "normalised")
            for c in range(n_cols):
                ax = axes[row, c]
                ax.set_xticks([]), ax.set_yticks([])
                if c < len(images):
                    ax.imshow(images[c].transpose(1, 2, 0))
                    if kind == "normalised" and not ok[c]:
                        ax.set_title("passed through", fontsize=7, color="tab:red")
                else:
                    ax.axis("off")
            axes[row, 0].set_ylabel(f"{name}\n{kind}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
