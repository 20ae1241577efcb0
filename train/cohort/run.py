"""One shard of a cohort: every slide of the shard through ``predict-slide``'s code path.

For each slide, in manifest order: its identity (:mod:`.identity`) is compared with the one
recorded in ``<out>/<slide_id>/cohort.json``; when equal the slide is skipped, otherwise it is
predicted by :func:`brst.train.slide.run.run_slide` into a work folder that replaces
``<out>/<slide_id>`` only when complete (:mod:`.publish`). A slide that fails for any reason (a
missing or unreadable source, no tissue, an endpoint that does not answer after its retries) is
recorded with its reason and the shard goes on. Each outcome is one status line
(:mod:`.status`), a tick of the Prometheus counter and of the progress bar, and a log line
with the counts and the rate.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from brst.handlers.errors import BrstError
from brst.train.atomic import write_json_atomic
from brst.train.slide.predictors import SlidePredictor
from brst.train.slide.run import SlideJob, run_slide

from .identity import model_label, same, source_identity
from .manifest import CohortSlide
from .metrics import CohortMetrics
from .publish import clear_stale_work, slide_folder
from .status import DONE, FAILED, SKIPPED, STATUSES, StatusLog, status_path

log = logging.getLogger(__name__)

#: the record of what a slide's outputs were made from, inside its folder
RECORD = "cohort.json"


@dataclass(frozen=True)
class ShardJob:
    """What one shard runs and how.

    Attributes:
        out_dir: the cohort's output folder.
        shard: the shard's name (``shard-I-of-N``).
        slides: the shard's slides.
        template: ``predict-slide``'s settings for every slide (its ``slide``, ``out_dir``,
            ``measured`` and ``section`` are set per slide; its ``um_per_px`` is the default of
            slides whose manifest row gives none).
        model: the model's identity (:func:`.identity.checkpoint_identity` or ``endpoint_identity``).
        options: the settings that change the outputs, recorded in each slide's identity.
    """

    out_dir: Path
    shard: str
    slides: list[CohortSlide]
    template: SlideJob
    model: dict
    options: dict


def slide_um_per_px(job: ShardJob, slide: CohortSlide) -> float | None:
    """The manifest's resolution of the slide, else the command's (``None``: the image metadata's)."""
    return slide.um_per_px if slide.um_per_px is not None else job.template.um_per_px


def slide_job(job: ShardJob, slide: CohortSlide, out_dir: Path) -> SlideJob:
    """``predict-slide``'s job for one slide of the cohort."""
    return dataclasses.replace(job.template, slide=slide.source, out_dir=out_dir, um_per_px=slide_um_per_px(job, slide),
                               measured=slide.measured, section=slide.section)


def slide_identity(job: ShardJob, slide: CohortSlide) -> dict:
    """What the slide's outputs are made from: source, model and the per-slide options."""
    per_slide = {"um_per_px": slide_um_per_px(job, slide),
                 "measured": str(slide.measured) if slide.measured else None, "section": slide.section}
    return {"source": source_identity(slide.source), "model": job.model, "options": {**job.options, **per_slide}}


def read_record(folder: Path) -> dict | None:
    """A slide folder's ``cohort.json``, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _predict(job: ShardJob, slide: CohortSlide, identity: dict, predictor: SlidePredictor,
             validation_r: dict[str, float]) -> float:
    """Predict one slide into its folder (complete or not at all); returns the seconds taken."""
    started = time.perf_counter()
    with slide_folder(job.out_dir, slide.slide_id, job.shard) as work:
        run_slide(slide_job(job, slide, work), predictor, validation_r)
        seconds = time.perf_counter() - started
        write_json_atomic(work / RECORD, {
            "slide_id": slide.slide_id, "source": slide.source, "identity": identity, "seconds": seconds,
            "model": model_label(job.model), "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return seconds


def run_one(job: ShardJob, slide: CohortSlide, predictor: SlidePredictor,
            validation_r: dict[str, float]) -> tuple[str, float, str]:
    """``(status, seconds, reason)`` of one slide: skipped, done, or failed with its reason."""
    started = time.perf_counter()
    try:
        identity = slide_identity(job, slide)
        recorded = read_record(job.out_dir / slide.slide_id)
        if recorded is not None and same(recorded["identity"], identity):
            return SKIPPED, time.perf_counter() - started, ""
        return DONE, _predict(job, slide, identity, predictor, validation_r), ""
    except Exception as err:  # one slide's failure, whatever it is, must not stop the cohort
        reason = str(err) if isinstance(err, BrstError) else f"{type(err).__name__}: {err}"
        log.warning("%s failed: %s", slide.slide_id, reason)
        log.debug("%s failed", slide.slide_id, exc_info=True)
        return FAILED, time.perf_counter() - started, reason


def run_shard(job: ShardJob, predictor: SlidePredictor, validation_r: dict[str, float] | None = None,
              metrics: CohortMetrics | None = None) -> dict[str, int]:
    """Run every slide of the shard; returns the count of each status."""
    clear_stale_work(job.out_dir, job.shard)
    counts = collections.Counter({status: 0 for status in STATUSES})
    status_log = StatusLog(status_path(job.out_dir, job.shard))
    started = time.perf_counter()
    label = model_label(job.model)
    try:
        with tqdm(total=len(job.slides), desc=job.shard, unit="slide") as bar:
            for number, slide in enumerate(job.slides, 1):
                status, seconds, reason = run_one(job, slide, predictor, validation_r or {})
                status_log.record(slide.slide_id, status, seconds, label, reason)
                counts[status] += 1
                if metrics is not None:
                    metrics.count(status)
                bar.set_postfix(counts, refresh=False)
                bar.update()
                rate_per_h = 3600 * number / (time.perf_counter() - started)
                log.info("%s: %d/%d slides (%s) at %.0f slides/h; %s %s in %.1f s", job.shard, number,
                         len(job.slides), ", ".join(f"{k} {v}" for k, v in counts.items()), rate_per_h,
                         slide.slide_id, status, seconds)
    finally:
        status_log.close()
    return dict(counts)
