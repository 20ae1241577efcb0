"""``brst-train prepare``: sections of a spatial-transcriptomics format -> HDF5 patch dataset.

Steps: read sections (counts, spots, lazy images) -> spot filter (minimum total counts,
patch inside the image, optionally Otsu tissue) -> gene filter and panel (a
:class:`~brst.train.data.genes.GenePlan`, computed or loaded) -> cut patches and estimate each
section's slide stain (each image decoded once; :mod:`~brst.train.data.cutting` decodes, cuts and
estimates ``workers`` sections at once on threads, starting while later sections' counts are still
being read, and the HDF5 writing overlaps them) -> one HDF5 file, or one file per section
(``out_dir``), each written under a temporary name and renamed when complete.

A large cohort is prepared as independent jobs: one ``--write-plan plan.json`` run over
all sections (counts only, no pixels decoded unless ``otsu``), then one job per section
with ``--plan plan.json --sections S --out-dir shards/``; ``open_dataset("shards/")``
reads the shards as one dataset. A plan gene that a section does not measure (its count file
omits genes with no counts) is stored as zero there, with a warning naming how many
(``missing_genes="zero"``), or stops ``prepare`` (``"error"``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.train.atomic import atomic_path

from .cutting import CutSection, SectionCutter, default_threads
from .genes import MISSING_GENES, GenePlan, choose_genes, read_gene_list, stack_counts, unmeasured_genes
from .readers import iter_sections, reader
from .readers.base import Section
from .tissue import tissue_fraction
from .writer import DatasetWriter

log = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    """Filters and geometry of ``prepare`` (defaults: the BrST-Net recipe; see README).

    Attributes:
        patch_um: physical side of a patch (112 µm: the 100 µm ST spot plus a margin).
        um_per_px: pixel size of stored patches (0.5 µm/px, "20x"), so patches are 224 px.
        min_counts: keep spots with at least this many total counts.
        min_expressed_frac: keep genes expressed in at least this fraction of kept spots.
        panel_size: main-head genes (top mean raw count) when ``genes_file`` is not given.
        genes_file: a text file naming the panel genes.
        otsu: drop spots whose patch has less than ``min_tissue_frac`` tissue (Otsu).
        min_tissue_frac: tissue share needed with ``otsu``.
        workers: sections decoded and cut at once, on threads (default: 2 where there are 2 CPUs).
        missing_genes: with a plan, what a plan gene a section does not measure becomes:
            ``"zero"`` (zero counts, with a warning) or ``"error"``.
    """

    patch_um: float = 112.0
    um_per_px: float = 0.5
    min_counts: int = 1000
    min_expressed_frac: float = 0.1
    panel_size: int = 250
    genes_file: str | None = None
    otsu: bool = False
    min_tissue_frac: float = 0.25
    workers: int = field(default_factory=default_threads)
    missing_genes: str = "zero"

    @property
    def geometry(self) -> PatchGeometry:
        return PatchGeometry(self.patch_um, self.um_per_px)

    def filters(self) -> dict:
        """The filter settings stored in the dataset's ``filters`` attribute."""
        keys = ("min_counts", "min_expressed_frac", "panel_size", "genes_file", "otsu", "min_tissue_frac",
                "missing_genes")
        return {key: value for key, value in asdict(self).items() if key in keys}


@dataclass
class SpotReport:
    """Spots of one section through the filters."""

    section: str
    patient: str
    read: int
    min_counts: int
    inside: int
    tissue: int
    source_um_per_px: float
    kept_rows: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))


def filter_spots(section: Section, options: PrepareOptions) -> SpotReport:
    """Apply the spot filters to one section; ``kept_rows`` indexes the section's spots."""
    enough = section.library_size >= options.min_counts
    inside = options.geometry.inside(section.image.width, section.image.height, section.pixel_x, section.pixel_y, section.um_per_px)
    keep = enough & inside
    if options.otsu:
        fraction = tissue_fraction(section.image, section.pixel_x, section.pixel_y,
                                   options.geometry.side_px(section.um_per_px))
        keep &= fraction >= options.min_tissue_frac
    return SpotReport(section.section, section.patient, section.n_spots, int(enough.sum()),
                      int((enough & inside).sum()), int(keep.sum()), section.um_per_px, np.flatnonzero(keep))


def dataset_attrs(format_name: str, sections: Sequence[Section], options: PrepareOptions,
                  plan: GenePlan, root: Path) -> dict:
    """HDF5 attributes of the schema (``filters`` as a dict; the writer stores JSON).

    ``filters["zero_filled_genes"]``: per section, how many plan genes it does not measure
    (stored as zero counts).
    """
    geometry = options.geometry
    zero_filled = {section.section: len(unmeasured_genes(section, plan.genes)) for section in sections}
    return {
        "source_format": format_name, "reader_version": reader(format_name).READER_VERSION,
        "um_per_px": geometry.um_per_px, "patch_px": geometry.patch_px, "patch_um": geometry.side_um,
        "spot_diameter_um": float(sections[0].spot_diameter_um), "source_root": str(root.resolve()),
        "filters": {**options.filters(), "gene_rule": plan.rule,
                    "zero_filled_genes": {name: n for name, n in zero_filled.items() if n}},
    }


def write_dataset(path: Path, attrs: dict, sections: Sequence[Section], plan: GenePlan,
                  cuts: Iterator[CutSection], progress: tqdm | None = None) -> Path:
    """Write ``sections`` (already spot-filtered) with their patches and slide stains (``cuts``, one per
    section) to ``path``."""
    total = sum(section.n_spots for section in sections)
    patch_bytes = total * int(attrs["patch_px"]) ** 2 * 3  # uncompressed uint8: the bulk of the file
    with atomic_path(path, needed_bytes=patch_bytes) as tmp, \
            DatasetWriter(tmp, total, plan.genes, plan.panel, attrs) as writer:
        for section, cut in zip(sections, cuts):
            writer.append(section, cut.patches, stack_counts([section], plan.genes, zero_missing=True),
                          section.library_size, cut.stain)
            if progress is not None:
                progress.update(section.n_spots)
        writer.finish()
    return path


def _check_plan_genes(sections: Sequence[Section], plan: GenePlan, source: object, missing_genes: str) -> None:
    """Plan genes a section does not measure: a warning naming how many (``zero``) or BrstError (``error``)."""
    if missing_genes not in MISSING_GENES:
        raise BrstError(f"--missing-genes {missing_genes}", f"expected one of {', '.join(MISSING_GENES)}")
    for section in sections:
        missing = unmeasured_genes(section, plan.genes)
        if not missing:
            continue
        if missing_genes == "error":
            raise BrstError(source, f"{len(missing)} plan gene(s) not measured in section {section.section}: "
                            f"{missing[:5]} (--missing-genes zero stores them as zero counts)")
        log.warning("section %s does not measure %d of the %d plan genes (e.g. %s): stored as zero counts "
                    "(its count table omits genes with no counts; --missing-genes error refuses instead)",
                    section.section, len(missing), len(plan.genes), ", ".join(missing[:3]))


def make_plan(sections: Sequence[Section], options: PrepareOptions, panel: list[str] | None) -> GenePlan:
    """The gene filter and panel for (spot-filtered) ``sections``; ``panel`` from ``--genes`` if given."""
    source = str(options.genes_file) if options.genes_file else "top mean count"
    return choose_genes(sections, options.min_expressed_frac, options.panel_size, panel, source)


def select_spots(format_name: str, root: Path, section_names: Sequence[str] | None, options: PrepareOptions,
                 reader_options: dict, on_read: Callable[[Section], None] = lambda section: None
                 ) -> tuple[list[Section], list[SpotReport]]:
    """Read sections and apply the spot filters; sections left without spots are dropped.

    ``on_read`` is called with each section as soon as it is read, before the next one is.
    """
    sections = []
    for section in iter_sections(format_name, root, section_names, **reader_options):
        on_read(section)
        sections.append(section)
    reports = [filter_spots(section, options) for section in sections]
    for report in reports:
        log.debug("%s: %d spots, %d with >= %d counts, %d with the patch inside the image, %d kept",
                 report.section, report.read, report.min_counts, options.min_counts, report.inside, report.tissue)
    kept = [section.take(report.kept_rows) for section, report in zip(sections, reports) if report.tissue]
    if not kept:
        raise BrstError(root, "no spot passes the filters (see --min-counts, --patch-um, --otsu)")
    return kept, reports


def prepare(format_name: str, root: str | Path, out: str | Path | None = None, out_dir: str | Path | None = None,
            sections: Sequence[str] | None = None, options: PrepareOptions | None = None,
            plan_path: str | Path | None = None, write_plan: str | Path | None = None,
            reader_options: dict | None = None) -> tuple[list[Path], list[SpotReport], GenePlan]:
    """Build the dataset; returns the files written, the per-section spot reports and the plan.

    Exactly one of ``out`` (one file), ``out_dir`` (one file per section) or ``write_plan``
    (only the gene plan, no patches) is given. ``plan_path`` loads genes and panel instead
    of computing them.
    """
    if sum(x is not None for x in (out, out_dir, write_plan)) != 1:
        raise BrstError("prepare", "give exactly one of --out FILE.h5, --out-dir DIR or --write-plan FILE.json")
    options, root = options or PrepareOptions(), Path(root)
    geometry = options.geometry  # checked before any slow work, like the files below
    plan = GenePlan.from_json(plan_path) if plan_path is not None else None
    panel = read_gene_list(options.genes_file) if options.genes_file and plan is None else None
    with SectionCutter(geometry, options.workers) as cutter:
        warm = cutter.warm if write_plan is None else (lambda section: None)
        kept, reports = select_spots(format_name, root, sections, options, reader_options or {}, warm)
        if plan is None:
            plan = make_plan(kept, options, panel)
        else:
            _check_plan_genes(kept, plan, plan_path, options.missing_genes)
        log.info("%d genes kept, panel of %d (%s)", len(plan.genes), len(plan.panel), plan.rule.get("panel"))
        if write_plan is not None:
            plan.to_json(write_plan)
            return [Path(write_plan)], reports, plan
        attrs = dataset_attrs(format_name, kept, options, plan, root)
        with tqdm(total=sum(s.n_spots for s in kept), unit="spot", desc="prepare", dynamic_ncols=True) as progress:
            cuts = cutter.cut(kept)
            if out is not None:
                return [write_dataset(Path(out), attrs, kept, plan, cuts, progress)], reports, plan
            files = [write_dataset(Path(out_dir) / f"{section.section}.h5", attrs, [section], plan, iter([cut]),
                                   progress) for section, cut in zip(kept, cuts)]
    return files, reports, plan
