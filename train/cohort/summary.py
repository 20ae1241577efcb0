"""The cohort's results in one place: a table, an AnnData of per-slide means, a contact sheet.

Written into ``<out>/_cohort/``:

- ``cohort.csv``: one row per manifest slide: ``slide_id``, ``status`` (done, failed or pending:
  not run yet), ``reason`` (why it failed), ``source``, ``tiles``, ``tissue_area_mm2``, when the
  slides' tables carry a per-tile ``out_of_domain`` flag its share ``out_of_domain_share`` and
  ``flagged`` (share above ``flag_share``), ``seconds`` (the slide's prediction time), ``model``,
  ``units``, then the mean prediction over the slide's tiles of every gene of the panel. Flagged
  slides come first (most flagged first), then the manifest's order.
- ``cohort.h5ad``: the done slides by genes, ``X`` = the per-slide means (float32), ``obs`` = the
  table's other columns; scanpy reads it (``sc.read_h5ad``).
- ``contact_sheet.png``: :mod:`.contact_sheet` of the done slides.

A slide whose latest status line over every shard (:func:`.status.latest_status`) says it failed
is failed (an older folder of it, from another model or source, is not shown); otherwise a slide
with a published folder is done, and one without is pending.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from brst.train.atomic import atomic_path
from brst.train.slide.run import H5AD, SUMMARY, TABLE

from .contact_sheet import write_contact_sheet
from .manifest import CohortSlide
from .publish import COHORT_DIR
from .run import read_record
from .status import DONE, FAILED, latest_status

log = logging.getLogger(__name__)

PENDING = "pending"
OUT_OF_DOMAIN = "out_of_domain"
#: share of out-of-domain tiles above which a slide is flagged (listed first)
DEFAULT_FLAG_SHARE = 0.25
#: the table's columns before the genes, in order
META_COLUMNS = ("slide_id", "status", "reason", "source", "tiles", "tissue_area_mm2", "out_of_domain_share", "flagged",
                "seconds", "model", "units")
TABLE_CSV, MEANS_H5AD, CONTACT_SHEET = "cohort.csv", "cohort.h5ad", "contact_sheet.png"


def _out_of_domain(folder: Path, obs: pd.DataFrame) -> pd.Series | None:
    """The per-tile ``out_of_domain`` flags of a slide (its table, else AnnData ``obs``), if present."""
    with open(folder / TABLE, encoding="utf-8") as stream:
        header = stream.readline().rstrip("\n").split(",")
    if OUT_OF_DOMAIN in header:
        return pd.read_csv(folder / TABLE, usecols=[OUT_OF_DOMAIN])[OUT_OF_DOMAIN]
    return obs[OUT_OF_DOMAIN] if OUT_OF_DOMAIN in obs.columns else None


def slide_row(folder: Path) -> tuple[dict, pd.Series, list[str]]:
    """A published slide's facts, its per-gene mean prediction and the genes it drew."""
    import anndata

    summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    record = read_record(folder)
    adata = anndata.read_h5ad(folder / H5AD)
    means = pd.Series(np.asarray(adata.X, dtype=np.float64).mean(axis=0), index=adata.var_names.astype(str))
    area_px = summary["tissue_fraction"] * summary["width_px"] * summary["height_px"]
    facts = {"tiles": int(summary["tiles"]), "tissue_area_mm2": area_px * summary["um_per_px"] ** 2 / 1e6,
             "seconds": record["seconds"], "model": record["model"],
             "units": summary["units"]}
    flags = _out_of_domain(folder, adata.obs)
    if flags is not None:
        facts["out_of_domain_share"] = float(np.mean(flags.astype(bool))) if len(flags) else 0.0
    return facts, means, list(summary["genes_drawn"])


def cohort_table(slides: list[CohortSlide], out_dir: Path, flag_share: float) -> tuple[pd.DataFrame, dict]:
    """The cohort table (module docstring) and, per done slide, the genes it drew."""
    status = latest_status(out_dir)
    rows, drawn = [], {}
    for order, slide in enumerate(slides):
        line = status.get(slide.slide_id)
        folder = out_dir / slide.slide_id
        row = {"slide_id": slide.slide_id, "status": PENDING, "reason": "", "source": slide.source, "order": order}
        if line is not None and line["status"] == FAILED:
            row.update(status=FAILED, reason=line["reason"], model=line["model"])
        elif read_record(folder) is not None:
            facts, means, drawn[slide.slide_id] = slide_row(folder)
            row.update(status=DONE, **facts, **means.to_dict())
        rows.append(row)
    table = pd.DataFrame(rows)
    if "out_of_domain_share" in table.columns:
        table.insert(table.columns.get_loc("out_of_domain_share") + 1, "flagged",
                     table["out_of_domain_share"] > flag_share)
        table["rank"] = table["out_of_domain_share"].where(table["flagged"], -1.0)  # unflagged: manifest order
        table = table.sort_values(["rank", "order"], ascending=[False, True], kind="stable").drop(columns="rank")
    return table.drop(columns="order").reset_index(drop=True), drawn


def write_means_h5ad(table: pd.DataFrame, meta: list[str], genes: list[str], path: Path) -> Path:
    """The done slides' per-gene means as AnnData (slides by genes; ``obs`` = the ``meta`` columns)."""
    import anndata

    done = table[table["status"] == DONE].set_index("slide_id")
    obs = done[[c for c in meta if c not in ("slide_id", "status", "reason")]].copy()
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str)
    adata = anndata.AnnData(X=done[genes].to_numpy(np.float32), obs=obs,
                            var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def summarize(slides: list[CohortSlide], out_dir: Path, flag_share: float = DEFAULT_FLAG_SHARE) -> pd.DataFrame:
    """Write the cohort's table, AnnData and contact sheet into ``out_dir/_cohort``; returns the table."""
    table, drawn = cohort_table(slides, out_dir, flag_share)
    meta = [c for c in META_COLUMNS if c in table.columns]
    genes = [c for c in table.columns if c not in META_COLUMNS]
    table = table[meta + genes]
    target = out_dir / COHORT_DIR
    with atomic_path(target / TABLE_CSV) as tmp:
        table.to_csv(tmp, index=False, float_format="%.9g")
    if drawn:
        write_means_h5ad(table, meta, genes, target / MEANS_H5AD)
        flagged = table["flagged"] if "flagged" in table.columns else pd.Series(False, index=table.index)
        rows = [(slide_id + ("\nflagged" if bool(flag) else ""), out_dir / slide_id, drawn[slide_id])
                for slide_id, flag in zip(table["slide_id"], flagged) if slide_id in drawn]
        write_contact_sheet(rows, target / CONTACT_SHEET)
    log.info("cohort of %d slides: %s -> %s", len(table), table["status"].value_counts().to_dict(),
             target / TABLE_CSV)
    return table
