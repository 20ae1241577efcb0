"""Which genes a dataset keeps (the gene filter) and which of them the main head predicts (the panel).

Rules (BrST-Net / ST-Net): keep a gene when it is present in every section and expressed
(count > 0) in at least ``min_expressed_frac`` of the kept spots; the panel is the
``panel_size`` kept genes with the highest mean raw count, or a user's list (``--genes FILE``).
A :class:`GenePlan` is saved as JSON so that many independent ``prepare`` jobs (one per
section) write files with the same genes and panel, which then open as one dataset.

A plan applied to a section that does not measure some of its genes (ST count files omit
genes with no count in the section, so a plan made on other patients names genes a new
section lacks) gives those genes zero counts there (``missing_genes="zero"``, the default
of ``prepare --missing-genes``) or refuses the section (``"error"``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse

from brst.handlers.errors import BrstError
from brst.train.atomic import write_json_atomic

from .readers.base import Section

PLAN_FORMAT = "brst-gene-plan"
#: what to do with a plan gene a section does not measure: store zeros, or refuse the section
MISSING_GENES = ("zero", "error")


@dataclass
class GenePlan:
    """Kept genes and the panel, with the rule that chose them.

    Attributes:
        genes: kept genes, in the order columns are stored.
        panel: main-head genes (a subset of ``genes``); the others are auxiliary.
        rule: how they were chosen (filters, panel source, spot and section counts).
    """

    genes: list[str]
    panel: list[str]
    rule: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        write_json_atomic(path, {"format": PLAN_FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, path: str | Path) -> "GenePlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise BrstError(path, "gene plan not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BrstError(path, f"not a gene plan JSON file ({err})") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise BrstError(path, f"not a gene plan (expected \"format\": \"{PLAN_FORMAT}\")")
        plan = cls(genes=list(data["genes"]), panel=list(data["panel"]), rule=dict(data.get("rule", {})))
        stray = sorted(set(plan.panel) - set(plan.genes))
        if stray:
            raise BrstError(path, f"panel genes not among kept genes: {stray[:5]}")
        return plan


def read_gene_list(path: str | Path) -> list[str]:
    """Gene names from a text file: one per line (or comma/tab separated); ``#`` starts a comment."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BrstError(path, "gene list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BrstError(path, f"cannot read gene list ({err})") from None
    names = [name.strip() for line in text.splitlines() for name in line.split("#")[0].replace("\t", ",").split(",")]
    genes = list(dict.fromkeys(name for name in names if name))
    if not genes:
        raise BrstError(path, "gene list is empty")
    return genes


def common_genes(sections: Sequence[Section]) -> list[str]:
    """Genes present in every section, in the first section's order."""
    shared = set(sections[0].genes).intersection(*(set(s.genes) for s in sections[1:]))
    return [gene for gene in sections[0].genes if gene in shared]


def unmeasured_genes(section: Section, genes: Sequence[str]) -> list[str]:
    """The ``genes`` that ``section`` does not measure (not in its count table), in order."""
    measured = set(section.genes)
    return [gene for gene in genes if gene not in measured]


def section_counts(section: Section, genes: Sequence[str], zero_missing: bool = False) -> scipy.sparse.csr_matrix:
    """``(N, len(genes))`` CSR counts of ``genes`` in one section.

    Args:
        zero_missing: genes the section does not measure get zero counts (else BrstError).
    """
    column = {gene: i for i, gene in enumerate(section.genes)}
    present = [k for k, gene in enumerate(genes) if gene in column]
    if len(present) == len(genes):
        return section.counts[:, [column[gene] for gene in genes]]
    if not zero_missing:
        missing = unmeasured_genes(section, genes)
        raise BrstError(f"section {section.section}", f"does not measure {len(missing)} gene(s): {missing[:5]}")
    picked = section.counts[:, [column[genes[k]] for k in present]].tocoo()
    positions = np.asarray(present, dtype=np.int64)[picked.col]
    return scipy.sparse.csr_matrix((picked.data, (picked.row, positions)), shape=(section.n_spots, len(genes)),
                                   dtype=section.counts.dtype)


def stack_counts(sections: Sequence[Section], genes: Sequence[str],
                 zero_missing: bool = False) -> scipy.sparse.csr_matrix:
    """``(sum N, len(genes))`` CSR int32 counts of ``genes`` over all sections' spots.

    Args:
        zero_missing: genes a section does not measure get zero counts there (else BrstError).
    """
    blocks = [section_counts(section, genes, zero_missing) for section in sections]
    return scipy.sparse.vstack(blocks, format="csr")


def choose_genes(sections: Sequence[Section], min_expressed_frac: float = 0.1, panel_size: int = 250,
                 panel_genes: Sequence[str] | None = None, panel_source: str = "top mean count") -> GenePlan:
    """Apply the gene filter to the (already spot-filtered) ``sections`` and pick the panel.

    Args:
        sections: sections holding only the spots that will be stored.
        min_expressed_frac: keep genes with count > 0 in at least this fraction of spots.
        panel_size: panel length when ``panel_genes`` is not given.
        panel_genes: the user's panel; every gene must exist in every section. These genes are
            kept even when they fail the expression filter.
        panel_source: recorded in the plan's rule (e.g. the gene list's path).

    Raises:
        BrstError: unknown panel genes, or nothing left after filtering.
    """
    shared = common_genes(sections)
    counts = stack_counts(sections, shared)
    expressed = np.asarray((counts > 0).sum(axis=0)).ravel() / counts.shape[0]
    mean = np.asarray(counts.mean(axis=0)).ravel()
    keep = expressed >= min_expressed_frac
    if panel_genes is not None:
        position = {gene: i for i, gene in enumerate(shared)}
        unknown = [gene for gene in panel_genes if gene not in position]
        if unknown:
            raise BrstError(panel_source, f"{len(unknown)} gene(s) not measured in every section: {unknown[:5]}")
        keep[[position[gene] for gene in panel_genes]] = True
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise BrstError("--min-expressed-frac", f"no gene is expressed in {min_expressed_frac:.0%} of the spots")
    genes = [shared[i] for i in kept]
    if panel_genes is None:
        order = kept[np.argsort(-mean[kept], kind="stable")][:panel_size]
        panel = [shared[i] for i in order]
    else:
        panel = list(panel_genes)
    rule = {"min_expressed_frac": min_expressed_frac, "panel": panel_source, "panel_size": len(panel),
            "n_spots": int(counts.shape[0]), "sections": [s.section for s in sections],
            "n_common_genes": len(shared)}
    return GenePlan(genes=genes, panel=panel, rule=rule)
