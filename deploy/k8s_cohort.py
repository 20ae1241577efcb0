"""A cohort of slides as an indexed Job on a real one-node Kubernetes cluster: ``make k8s-cohort`` (root).

Uses the k8s-local kit as ``make k8s-e2e`` does (``deploy/e2e_cluster.py``) and, in the order
:func:`run_all` states:

1. ``node-up.sh``; the training image built from the local Debian base and loaded into the node;
2. on this machine: a short real fit (resnet18, 64 px) on ``../shared/data/her2st``: the checkpoint;
3. the cohort, written onto the ``brst-slides`` volume (``k8s/jobs/common``) under ``cohort/``:
   sections C2-C6 as half-resolution JPEG copies, C2-C5 as tiled pyramidal TIFFs, C6 as a DICOM
   WSI folder (OrthancWSIDicomizer) and a file that is no image; ``manifest.csv`` and the
   checkpoint beside them;
4. ``k8s/local-node/cohort``: the production Job (``k8s/jobs/cohort``) with 3 shards, 2 at a time,
   the checkpoint instead of the Service, the output claim ReadWriteOnce; one shard's pod deleted
   mid-run (after its first slide); the Job ends with only the shard of the unreadable file failed,
   every readable slide's folder exactly once on ``brst-cohort``, the deleted shard resumed
   (its finished slides skipped by the next pod);
5. ``k8s/jobs/cohort-summary``: ``_cohort/cohort.csv``, ``cohort.h5ad``, ``contact_sheet.png``;
6. on this machine, one process (``brst-train predict-cohort`` with the Job's own arguments, one
   shard) on the same manifest: its ``cohort.csv`` (all but the ``seconds`` column; paths
   under ``/data`` read as the volume's host folder) and every slide's outputs equal the cluster's;
7. the Job run again: every readable slide skipped, the unreadable one failed again, no output touched;
8. ``down.sh --purge``.

Prints one line per check and a summary; writes it to ``$BRST_K8S_E2E_WORK/results-cohort.md``.
Environment: see ``deploy/e2e_cluster.py``.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2e_cluster import (
    REPO,
    TRAIN_IMAGE,
    WORK,
    build_images,
    cluster_up,
    load_images,
    run_on_cluster,
)
from e2e_report import Report
from k8s_e2e import prepare_her2st, short_fit
from kube import Failed, Kit, Kube, check, run, wait_for

OVERLAY = REPO / "k8s" / "local-node" / "cohort"
SUMMARY = REPO / "k8s" / "jobs" / "cohort-summary"
JOB = "brst-cohort"
COHORT_PODS = "app.kubernetes.io/component=cohort"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
#: where the Job's pods mount the two claims (k8s/jobs/cohort/job.yaml)
SLIDES_MOUNT, COHORT_MOUNT = "/data", "/cohort"
HER2ST_UM_PER_PX = 0.69
#: |cluster - one process| allowed in the tables (the pods' and this machine's float arithmetic)
RTOL, ATOL = 1e-5, 1e-6
JOB_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Cohort:
    """The cohort on the slides volume.

    Attributes:
        slides_dir: the host folder of the ``brst-slides`` claim (``/data`` in the pods).
        manifest: ``<slides_dir>/cohort/manifest.csv``.
        readable: the ids of the slides that must have outputs.
        unreadable: the id of the file that is no slide.
        shard_of: slide id -> the Job index that runs it.
        n_shards: the Job's completions.
    """

    slides_dir: Path
    manifest: Path
    readable: tuple[str, ...]
    unreadable: str
    shard_of: dict[str, int]
    n_shards: int


# --- 2. the model -------------------------------------------------------------------------------------

def make_checkpoint(report: Report) -> Path:
    with report.step("a short real fit on this machine: the cohort's checkpoint") as note:
        model_dir = WORK / "cohort-model"
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        checkpoint = short_fit(prepare_her2st(model_dir), model_dir / "run", steps=2, seed=1)
        note.append(f"{checkpoint} ({checkpoint.stat().st_size / 1e6:.0f} MB)")
    return checkpoint


# --- 3. the cohort on the slides volume ---------------------------------------------------------------

def job_spec(kube: Kube) -> dict:
    """The Job of the overlay as kustomize renders it."""
    import yaml

    rendered = kube.kubectl("kustomize", str(OVERLAY)).stdout
    return next(doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Job")


def write_slides(her2st: Path, folder: Path) -> list[tuple[str, str, str]]:
    """The slide files under ``folder``; returns the manifest rows (slide_id, source, um_per_px)."""
    sys.path[:0] = [str(REPO / "tests")]  # the tests' slide builders, reused rather than copied
    from orthanc_fixtures import dicomize
    from PIL import Image
    from slide_files import half_resolution, section_jpeg, write_generic_pyramid

    folder.mkdir(parents=True)
    half_um = 2 * HER2ST_UM_PER_PX
    rows = []
    for section in ("C2", "C3", "C4", "C5", "C6"):
        pixels = half_resolution(her2st, section)
        Image.fromarray(pixels).save(folder / f"{section}.jpg", quality=90)
        rows.append((f"{section}-jpeg", f"slides/{section}.jpg", f"{half_um}"))
        if section != "C6":
            write_generic_pyramid(pixels, folder / f"{section}.tif", half_um)
            rows.append((f"{section}-tiff", f"slides/{section}.tif", ""))
    jpeg = section_jpeg(her2st, "C6")
    with Image.open(jpeg) as header:
        width, height = header.size
    dicomize(jpeg, width, height, HER2ST_UM_PER_PX, folder / "C6-dicom")
    rows.append(("C6-dicom", "slides/C6-dicom", ""))
    (folder / "not-a-slide.svs").write_bytes(b"these bytes are no slide\n" * 100)
    rows.append(("not-a-slide", "slides/not-a-slide.svs", ""))
    return rows


def write_cohort(report: Report, kube: Kube, checkpoint: Path) -> Cohort:
    from brst.train.cohort.manifest import read_manifest
    from brst.train.cohort.shards import shard_of

    with report.step("the cohort on brst-slides: JPEG, tiled TIFF, a DICOM folder, a file that is no slide") as note:
        kube.apply(REPO / "k8s" / "jobs" / "common")
        slides_dir = kube.volume_dir("brst-slides")
        root = slides_dir / "cohort"
        shutil.rmtree(root, ignore_errors=True)
        rows = write_slides(REPO.parent / "shared" / "data" / "her2st", root / "slides")
        shutil.copy2(checkpoint, root / "model.pt")
        manifest = root / "manifest.csv"
        with open(manifest, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["slide_id", "source", "um_per_px"])
            writer.writerows(rows)
        n_shards = job_spec(kube)["spec"]["completions"]
        slides = read_manifest(manifest)
        cohort = Cohort(slides_dir, manifest, tuple(s.slide_id for s in slides[:-1]), slides[-1].slide_id,
                        {s.slide_id: shard_of(s.slide_id, n_shards) for s in slides}, n_shards)
        sizes = {i: sum(1 for v in cohort.shard_of.values() if v == i) for i in range(n_shards)}
        report.facts["cohort"] = f"{len(slides)} slides ({len(cohort.readable)} readable), shards {sizes}"
        note.append(f"{len(slides)} slides in {manifest}; slides per shard {sizes}; "
                    f"{cohort.unreadable} in shard {cohort.shard_of[cohort.unreadable]}")
    return cohort


# --- 4. the Job, a pod deleted mid-run ----------------------------------------------------------------

def status_lines(out_dir: Path) -> dict[str, list[dict]]:
    """Every shard's status lines, by file name (a torn last line left out)."""
    lines: dict[str, list[dict]] = {}
    for path in sorted((out_dir / "_cohort" / "status").glob("*.jsonl")):
        lines[path.name] = []
        for text in path.read_text().splitlines():
            try:
                lines[path.name].append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines


def shard_lines(out_dir: Path, index: int, n_shards: int) -> list[dict]:
    path = out_dir / "_cohort" / "status" / f"shard-{index}-of-{n_shards}.jsonl"
    return [json.loads(t) for t in path.read_text().splitlines()] if path.is_file() else []


def pod_mid_run(kube: Kube, cohort: Cohort, out_dir: Path) -> tuple[str, int, tuple[str, ...]] | None:
    """A running pod whose shard has finished some but not all of its slides: (pod, index, finished ids)."""
    for pod in kube.pods(COHORT_PODS):
        if pod["status"].get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        index = int(pod["metadata"]["labels"][INDEX_LABEL])
        finished = tuple(line["slide_id"] for line in shard_lines(out_dir, index, cohort.n_shards))
        if 0 < len(finished) < list(cohort.shard_of.values()).count(index):
            return pod["metadata"]["name"], index, finished
    return None


def published(out_dir: Path) -> set[str]:
    """The slide folders of a cohort's output (``_cohort`` is bookkeeping)."""
    return {p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("_")}


def check_job_outcome(kube: Kube, cohort: Cohort, out_dir: Path) -> str:
    """Only the unreadable file's shard failed; every readable slide has its folder once; no work left."""
    job, conditions = kube.job_conditions(JOB)
    bad = cohort.shard_of[cohort.unreadable]
    status = job["status"]
    check(conditions.get("Failed") == "True" and status.get("failedIndexes") == str(bad),
          f"expected only index {bad} failed: conditions {conditions}, status {status}")
    check(published(out_dir) == set(cohort.readable),
          f"slide folders {sorted(published(out_dir))} != readable {sorted(cohort.readable)}")
    work = out_dir / "_cohort" / "work"
    leftovers = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
    check(not leftovers, f"work folders left: {leftovers}")
    return (f"completed indexes {status.get('completedIndexes')}, failed {status.get('failedIndexes')}; "
            f"pods succeeded {status.get('succeeded', 0)}, failed {status.get('failed', 0)}")


def run_cohort_job(report: Report, kube: Kube, cohort: Cohort) -> Path:
    """The Job run with one pod deleted mid-run; returns its output folder (the host's side of brst-cohort)."""
    with report.step("cohort Job (k8s/local-node/cohort): 3 shards, 2 at a time; one pod deleted mid-run") as note:
        t0 = time.monotonic()
        kube.apply(OVERLAY)
        out_dir = kube.volume_dir("brst-cohort")
        pod, index, finished = wait_for("a shard's pod between two slides", lambda: pod_mid_run(kube, cohort, out_dir),
                                        JOB_TIMEOUT_S, 1)
        kube.in_namespace("delete", "pod", pod, "--wait=false")
        report.log(f"deleted {pod} (index {index}) after {finished}")
        kube.job_finished(JOB, JOB_TIMEOUT_S)
        wall_s = time.monotonic() - t0
        outcome = check_job_outcome(kube, cohort, out_dir)
        later = shard_lines(out_dir, index, cohort.n_shards)[len(finished):]
        resumed = {line["slide_id"] for line in later if line["status"] == "skipped"}
        check(set(finished) <= resumed | {cohort.unreadable},
              f"the next pod of index {index} did not skip {finished}: {later}")
        ran = list(cohort.shard_of.values()).count(index)
        report.facts["cohort Job, first run"] = f"{wall_s:.0f} s wall for {len(cohort.shard_of)} slides"
        report.facts["pod deleted mid-run"] = (f"index {index} after {len(finished)} of its {ran} slides; "
                                               f"its next pod skipped them and finished the rest")
        note.append(f"{wall_s:.0f} s; deleted {pod} after {list(finished)}; {outcome}; "
                    f"{len(published(out_dir))} slide folders")
    return out_dir


def summarize_on_cluster(report: Report, kube: Kube, out_dir: Path) -> None:
    with report.step("summary Job (k8s/jobs/cohort-summary): cohort.csv, cohort.h5ad, contact_sheet.png") as note:
        kube.apply(SUMMARY)
        kube.job_done("brst-cohort-summary", JOB_TIMEOUT_S)
        made = sorted(p.name for p in (out_dir / "_cohort").iterdir() if p.is_file())
        check({"cohort.csv", "cohort.h5ad", "contact_sheet.png"} <= set(made), f"_cohort/: {made}")
        note.append(f"_cohort/: {made}")


# --- 6. the same manifest in one process --------------------------------------------------------------

def local_command(job: dict, cohort: Cohort, out_dir: Path) -> list[str]:
    """The Job's ``predict-cohort`` arguments for one process here: paths on the host, one shard, no metrics port."""
    args = job["spec"]["template"]["spec"]["containers"][0]["command"][1:]
    dropped = {"--shards", "--metrics-port", "--metrics-host"}  # each with one value
    local = []
    for i, arg in enumerate(args):
        if arg in dropped or (i > 0 and args[i - 1] in dropped):
            continue
        if arg.startswith(SLIDES_MOUNT + "/"):
            arg = str(cohort.slides_dir) + arg[len(SLIDES_MOUNT):]
        elif arg == COHORT_MOUNT:
            arg = str(out_dir)
        local.append(arg)
    return [str(Path(sys.executable).with_name("brst-train")), *local]


def run_locally(report: Report, kube: Kube, cohort: Cohort) -> Path:
    with report.step("the same manifest in one process here (predict-cohort with the Job's arguments)") as note:
        out_dir = WORK / "cohort-one-process"
        shutil.rmtree(out_dir, ignore_errors=True)
        command = local_command(job_spec(kube), cohort, out_dir)
        t0 = time.monotonic()
        result = run(*command, timeout_s=JOB_TIMEOUT_S, check_rc=False)
        wall_s = time.monotonic() - t0
        check(result.returncode == 1 and cohort.unreadable in result.stderr + result.stdout,
              f"{' '.join(command)} -> {result.returncode} (expected 1: {cohort.unreadable} failed)\n"
              f"{result.stderr[-2000:]}")
        report.facts["one process here"] = f"{wall_s:.0f} s wall for {len(cohort.shard_of)} slides"
        note.append(f"{wall_s:.0f} s: {result.stdout.strip().splitlines()[-1]}")
    return out_dir


def cohort_table(out_dir: Path, slides_dir: Path | None = None):
    """``_cohort/cohort.csv`` without ``seconds``; with ``slides_dir``, paths under /data read as the host's."""
    import pandas as pd

    table = pd.read_csv(out_dir / "_cohort" / "cohort.csv").drop(columns="seconds")
    if slides_dir is not None:
        for column in table.select_dtypes(include="object").columns:
            table[column] = table[column].str.replace(f"{SLIDES_MOUNT}/", f"{slides_dir}/", regex=False)
    return table


def max_table_diff(cluster_table, local_table) -> float:
    """Max |difference| of the numeric columns; :class:`Failed` when anything else differs."""
    import pandas as pd

    check(list(cluster_table.columns) == list(local_table.columns),
          f"columns {list(cluster_table.columns)} != {list(local_table.columns)}")
    numeric = [c for c in cluster_table.columns if pd.api.types.is_float_dtype(cluster_table[c])]
    others = [c for c in cluster_table.columns if c not in numeric]
    check(cluster_table[others].astype(str).equals(local_table[others].astype(str)),
          f"non-numeric columns differ:\n{cluster_table[others]}\n{local_table[others]}")
    a, b = cluster_table[numeric].to_numpy(float), local_table[numeric].to_numpy(float)
    check(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True),
          f"numeric columns differ by up to {np.nanmax(np.abs(a - b))}")
    return float(np.nanmax(np.abs(a - b), initial=0.0))


#: what differs between two runs by nature: wall time, its rate, the clock
TIMING_KEYS = frozenset({"seconds", "tiles_per_s", "finished_utc"})


def json_diff(a, b, slides_dir: Path, where: str) -> float:
    """Max |difference| of two JSON values' numbers (timing keys left out, /data paths read as the
    host's); :class:`Failed` when anything else differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - TIMING_KEYS
        check(keys == set(b) - TIMING_KEYS, f"{where}: keys {sorted(keys ^ (set(b) - TIMING_KEYS))} in one only")
        return max((json_diff(a[k], b[k], slides_dir, f"{where}.{k}") for k in keys), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        check(len(a) == len(b), f"{where}: {len(a)} != {len(b)} items")
        return max((json_diff(x, y, slides_dir, where) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        check(bool(np.isclose(a, b, rtol=RTOL, atol=ATOL)), f"{where}: {a} != {b}")
        return abs(float(a) - float(b))
    if isinstance(a, str) and a.startswith(f"{SLIDES_MOUNT}/"):
        a = f"{slides_dir}{a[len(SLIDES_MOUNT):]}"
    check(a == b, f"{where}: {a!r} != {b!r}")
    return 0.0


def h5ad_diff(a: Path, b: Path) -> float:
    """Max |difference| of two AnnData files' X and numeric obs columns (same genes, tiles, columns)."""
    import anndata

    x, y = anndata.read_h5ad(a), anndata.read_h5ad(b)
    check(list(x.var_names) == list(y.var_names) and list(x.obs_names) == list(y.obs_names)
          and list(x.obs.columns) == list(y.obs.columns), f"{a.name}: {x} != {y}")
    numeric = [c for c in x.obs.columns if np.issubdtype(x.obs[c].dtype, np.number)]
    pairs = [(np.asarray(x.X, float), np.asarray(y.X, float)),
             (x.obs[numeric].to_numpy(float), y.obs[numeric].to_numpy(float))]
    for one, other in pairs:
        check(np.allclose(one, other, rtol=RTOL, atol=ATOL, equal_nan=True), f"{a} differs from {b}")
    return max(float(np.nanmax(np.abs(one - other), initial=0.0)) for one, other in pairs)


def file_diff(a: Path, b: Path, slides_dir: Path) -> float:
    """0 for equal bytes, else the max |difference| of the values (tables, JSON, AnnData, pictures)."""
    if a.read_bytes() == b.read_bytes():
        return 0.0
    if a.suffix == ".csv":
        import pandas as pd

        return max_table_diff(pd.read_csv(a), pd.read_csv(b))
    if a.suffix == ".json":
        return json_diff(json.loads(a.read_text()), json.loads(b.read_text()), slides_dir, a.name)
    if a.suffix == ".h5ad":
        return h5ad_diff(a, b)
    if a.suffix == ".png":
        from PIL import Image

        x, y = np.asarray(Image.open(a).convert("RGB"), int), np.asarray(Image.open(b).convert("RGB"), int)
        check(x.shape == y.shape, f"{a}: {x.shape} != {y.shape}")
        return float(np.abs(x - y).max())  # pixel levels; reported, not held to the tables' tolerance
    raise Failed(f"{a} and {b} differ")


def compare_outputs(report: Report, cohort: Cohort, cluster_dir: Path, local_dir: Path) -> None:
    with report.step("cluster = one process: cohort.csv (but seconds) and every slide's outputs") as note:
        table_diff = max_table_diff(cohort_table(cluster_dir, cohort.slides_dir), cohort_table(local_dir))
        check(published(local_dir) == published(cluster_dir), f"{published(local_dir)} != {published(cluster_dir)}")
        identical, diffs, png_levels = 0, [], []
        for slide_id in cohort.readable:
            files = {p.relative_to(cluster_dir / slide_id) for p in (cluster_dir / slide_id).rglob("*") if p.is_file()}
            local = {p.relative_to(local_dir / slide_id) for p in (local_dir / slide_id).rglob("*") if p.is_file()}
            check(files == local, f"{slide_id}: files {sorted(map(str, files ^ local))} in one output only")
            for name in sorted(files):
                ours, theirs = cluster_dir / slide_id / name, local_dir / slide_id / name
                identical += ours.read_bytes() == theirs.read_bytes()
                diff = file_diff(ours, theirs, cohort.slides_dir)
                (png_levels if name.suffix == ".png" else diffs).append(diff)
        n_files = len(diffs) + len(png_levels)
        report.facts["cluster vs one process"] = (f"cohort.csv max |diff| {table_diff:.1e}; {identical} of {n_files} "
                                                  f"slide files byte-identical")
        note.append(f"cohort.csv max |diff| {table_diff:.1e}; {identical}/{n_files} files byte-identical (the "
                    f"others differ in times and paths only), values max |diff| {max(diffs, default=0):.1e}, "
                    f"pictures max {max(png_levels, default=0):.0f} levels")


# --- 7. again: nothing to do --------------------------------------------------------------------------

def file_times(out_dir: Path, slide_ids: tuple[str, ...]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for s in slide_ids for p in (out_dir / s).rglob("*")}


def rerun_does_nothing(report: Report, kube: Kube, cohort: Cohort, out_dir: Path) -> None:
    with report.step("the Job again: every readable slide skipped, no output touched") as note:
        before_times = file_times(out_dir, cohort.readable)
        n_lines = {name: len(lines) for name, lines in status_lines(out_dir).items()}
        kube.in_namespace("delete", "job", JOB, "--wait=true", "--timeout=120s", timeout_s=150)
        t0 = time.monotonic()
        kube.apply(OVERLAY)
        kube.job_finished(JOB, JOB_TIMEOUT_S)
        wall_s = time.monotonic() - t0
        check_job_outcome(kube, cohort, out_dir)
        latest = {}
        for name, lines in status_lines(out_dir).items():
            for line in lines[n_lines.get(name, 0):]:
                latest.setdefault(line["slide_id"], set()).add(line["status"])
        expected = {**{s: {"skipped"} for s in cohort.readable}, cohort.unreadable: {"failed"}}
        check(latest == expected, f"this run's statuses {latest} != {expected}")
        check(file_times(out_dir, cohort.readable) == before_times, "an output changed on the rerun")
        report.facts["rerun"] = f"{wall_s:.0f} s wall; {len(cohort.readable)} skipped, {cohort.unreadable} failed again"
        note.append(f"{wall_s:.0f} s; {len(cohort.readable)} skipped, {cohort.unreadable} failed again; "
                    f"{len(before_times)} output files unchanged")


# --- the order ----------------------------------------------------------------------------------------

def run_all(report: Report, kit: Kit, kube: Kube) -> None:
    """Every step, in order; each takes what an earlier one returned."""
    cluster_up(report, kit, kube)
    build_images(report, (TRAIN_IMAGE,))
    load_images(report, kit, (TRAIN_IMAGE,))
    checkpoint = make_checkpoint(report)
    cohort = write_cohort(report, kube, checkpoint)
    out_dir = run_cohort_job(report, kube, cohort)
    summarize_on_cluster(report, kube, out_dir)
    local_dir = run_locally(report, kube, cohort)
    compare_outputs(report, cohort, out_dir, local_dir)
    rerun_does_nothing(report, kube, cohort, out_dir)


def cohort_pods_logs(report: Report, kube: Kube) -> None:
    """The cohort pods' last log lines, for a failed run's report."""
    logs = kube.in_namespace("logs", "-l", COHORT_PODS, "--prefix", "--tail=30", check_rc=False)
    report.log(f"cohort pods' logs:\n{logs[-6000:]}")


def main() -> int:
    return run_on_cluster("k8s-cohort", "results-cohort.md", run_all, diagnose=cohort_pods_logs)


if __name__ == "__main__":
    sys.exit(main())
