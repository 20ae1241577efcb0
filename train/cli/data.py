"""``brst-train fetch | prepare | inspect``: get data, build HDF5 patch datasets, look at them."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from brst.train.data.cutting import default_threads
from brst.train.data.readers import FORMATS

from .params import PATH, split_names

log = logging.getLogger(__name__)


def _check_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    FORMATS.get(value, subject=f"--format {value}")
    return value


@click.command()
@click.option("--format", "format_name", required=True, callback=_check_format, metavar="|".join(FORMATS.names()),
              help=f"Layout of --root: one of {', '.join(FORMATS.names())}.")
@click.option("--root", required=True, type=PATH, envvar="BRST_DATA", show_envvar=True,
              help="Data folder (HER2ST data/, ST-Net release, Space Ranger outs/ or a folder of them, "
                   "HEST-1k folder of st/, wsis/, metadata/).")
@click.option("--out", type=PATH, help="Write one HDF5 file.")
@click.option("--out-dir", type=PATH, help="Write one HDF5 file per section into this folder.")
@click.option("--sections", multiple=True, help="Sections to use (repeat or comma-separate); default all.")
@click.option("--patch-um", type=click.FloatRange(min=1, min_open=False), default=112.0, show_default=True,
              help="Physical side of a patch in micrometres.")
@click.option("--um-per-px", type=click.FloatRange(min=0.05), default=0.5, show_default=True,
              help="Pixel size of stored patches (patch_px = patch_um / um_per_px).")
@click.option("--min-counts", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Drop spots with fewer total counts.")
@click.option("--min-expressed-frac", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Keep genes with count > 0 in at least this fraction of spots.")
@click.option("--panel-size", type=click.IntRange(min=1), default=250, show_default=True,
              help="Main-head genes: the top N kept genes by mean count.")
@click.option("--genes", "genes_file", type=PATH, help="Text file of panel genes (one per line), instead of top N.")
@click.option("--otsu/--no-otsu", default=False, show_default=True, help="Drop spots over background (Otsu).")
@click.option("--min-tissue-frac", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="With --otsu: tissue share a patch needs.")
@click.option("--workers", type=click.IntRange(min=1), default=default_threads(), show_default="2 with 2+ CPUs",
              help="Sections decoded and cut at once, on threads (the first start while counts are read).")
@click.option("--plan", "plan_path", type=PATH, help="Use the genes and panel of this gene plan JSON.")
@click.option("--write-plan", type=PATH, help="Only compute the gene plan (JSON) for these sections; no patches.")
@click.option("--missing-genes", type=click.Choice(["zero", "error"]), default="zero", show_default=True,
              help="With --plan: a plan gene a section does not measure (ST count files omit genes with no "
                   "counts) is stored as zero counts, with a warning naming how many; or is an error.")
@click.option("--image", "fullres_image", type=PATH,
              help="visium: the full-resolution H&E image of the (one) section.")
@click.option("--scaled-image", type=click.Choice(["hires", "lowres"]), default="hires", show_default=True,
              help="visium without --image: which Space Ranger image to cut patches from.")
def prepare(format_name: str, root: Path, out: Path | None, out_dir: Path | None, sections: tuple[str, ...],
            patch_um: float, um_per_px: float, min_counts: int, min_expressed_frac: float, panel_size: int,
            genes_file: Path | None, otsu: bool, min_tissue_frac: float, workers: int, plan_path: Path | None,
            write_plan: Path | None, missing_genes: str, fullres_image: Path | None, scaled_image: str) -> None:
    """Build an HDF5 patch dataset from spatial-transcriptomics sections.

    \b
    brst-train prepare --format her2st --root ../shared/data/her2st --out her2st.h5
    brst-train prepare --format visium --root outs/ --image slide.tif --out visium.h5
    """
    from brst.train.data.prepare import PrepareOptions
    from brst.train.data.prepare import prepare as run_prepare

    options = PrepareOptions(patch_um=patch_um, um_per_px=um_per_px, min_counts=min_counts,
                             min_expressed_frac=min_expressed_frac, panel_size=panel_size,
                             genes_file=str(genes_file) if genes_file else None, otsu=otsu,
                             min_tissue_frac=min_tissue_frac, workers=workers, missing_genes=missing_genes)
    reader_options = {"fullres_image": fullres_image, "scaled": scaled_image} if format_name == "visium" else {}
    files, reports, plan = run_prepare(format_name, root, out=out, out_dir=out_dir, sections=split_names(sections),
                                       options=options, plan_path=plan_path, write_plan=write_plan,
                                       reader_options=reader_options)
    for report in reports:
        click.echo(f"{report.section}: {report.read} spots read, {report.min_counts} with >= {min_counts} counts, "
                   f"{report.inside} inside the image, {report.tissue} kept")
    kept = sum(report.tissue for report in reports)
    click.echo(f"{kept} spots, {len(plan.genes)} genes, panel {len(plan.panel)} -> "
               + ", ".join(str(path) for path in files))


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=PATH)
@click.option("--contact-sheet", type=PATH, help="Also write a PNG grid of patches labelled with spot ids.")
@click.option("--export-patches", type=PATH, help="Also save the same patches as PNG files in this folder.")
@click.option("--n", "n_patches", type=click.IntRange(1, 400), default=48, show_default=True,
              help="Patches on the contact sheet / exported (spread over the sections).")
@click.option("--panel-head", type=click.IntRange(0), default=10, show_default=True, help="Panel genes to list.")
def inspect_cmd(paths: tuple[Path, ...], contact_sheet: Path | None, export_patches: Path | None,
                n_patches: int, panel_head: int) -> None:
    """Describe HDF5 patch dataset(s) (files or folders of shards); optionally a contact sheet."""
    from brst.train.data import open_dataset
    from brst.train.data.inspect import export_patches as write_patches
    from brst.train.data.inspect import summary_lines, write_contact_sheet

    index = open_dataset(list(paths))
    for line in summary_lines(index, panel_head):
        click.echo(line)
    if contact_sheet is not None:
        write_contact_sheet(index, contact_sheet, n_patches)
        click.echo(f"contact sheet: {contact_sheet}")
    if export_patches is not None:
        written = write_patches(index, export_patches, n_patches)
        click.echo(f"{len(written)} patches: {export_patches}")


@click.command()
@click.argument("dataset", type=click.Choice(["her2st"]))
@click.option("--dest", type=PATH, default=Path("data/her2st"), show_default=True, envvar="BRST_DATA",
              show_envvar=True, help="Folder to download into (HER2ST data/ layout).")
@click.option("--sections", multiple=True, help="Sections to fetch (repeat or comma-separate); default C2..C6.")
@click.option("--base-url", default=None, envvar="BRST_FETCH_URL", show_envvar=True,
              help="Where the files are (default: the almaan/her2st repository on GitHub).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Network timeout per request, seconds.")
def fetch(dataset: str, dest: Path, sections: tuple[str, ...], base_url: str | None, timeout_s: float) -> None:
    """Download public HER2ST files (checksums verified, resumable)."""
    from brst.train.data.fetch import DEFAULT_BASE_URL, DEFAULT_SECTIONS, fetch_her2st

    paths = fetch_her2st(dest, split_names(sections) or list(DEFAULT_SECTIONS), base_url or DEFAULT_BASE_URL,
                         timeout_s)
    click.echo(f"{len(paths)} files verified in {dest}")
