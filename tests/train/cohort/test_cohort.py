"""``brst-train predict-cohort`` on a cohort made from the real HER2ST sections.

The cohort (fixture ``cohort_root``): C2 and C3 as half-resolution JPEG copies (resolution given
in the manifest), C4 as a tiled pyramidal TIFF (resolution in its tags, none in the manifest),
a file that is not an image and a source that does not exist. (A DICOM folder needs Orthanc's
dicomizer, which this machine lacks; here a folder's identity is checked on its own.) The model
is the serving tests' checkpoint (a real short fit on ``her2st_h5``); slides are mapped on a
coarse 400 um grid to keep the runs short.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fit_helpers import free_port
from PIL import Image
from slide_files import half_resolution, write_generic_pyramid

from brst.train.cli.main import cli
from brst.train.cohort.manifest import CohortSlide
from brst.train.cohort.shards import select, shard_of

HER2ST_UM_PER_PX = 0.69
STEP_UM = "400"
READABLE = ("C2-jpeg", "C3-jpeg", "C4-tiff")
UNREADABLE = ("not-an-image", "missing")


@pytest.fixture(scope="module")
def cohort_root(her2st_root: Path, tmp_path_factory) -> Path:
    """``<root>/manifest.csv`` and ``<root>/slides/``: the cohort, with sources relative to the manifest."""
    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    slides.mkdir()
    for section in ("C2", "C3"):
        Image.fromarray(half_resolution(her2st_root, section)).save(slides / f"{section}.jpg", quality=90)
    write_generic_pyramid(half_resolution(her2st_root, "C4"), slides / "C4.tif", 2 * HER2ST_UM_PER_PX)
    (slides / "not-an-image.svs").write_bytes(b"these bytes are no slide\n" * 100)
    rows = [("C2-jpeg", "slides/C2.jpg", 2 * HER2ST_UM_PER_PX), ("C3-jpeg", "slides/C3.jpg", 2 * HER2ST_UM_PER_PX),
            ("C4-tiff", "slides/C4.tif", ""), ("not-an-image", "slides/not-an-image.svs", ""),
            ("missing", "slides/gone.jpg", "")]
    write_manifest(root / "manifest.csv", rows)
    return root


def write_manifest(path: Path, rows) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["slide_id", "source", "um_per_px"])
        writer.writerows(rows)
    return path


def run_cohort(*args: object, env: dict | None = None):
    return CliRunner().invoke(cli, ["predict-cohort", *map(str, args)], env=env, catch_exceptions=False)


def cohort_args(root: Path, out: Path, checkpoint: Path, *extra: object) -> list:
    return ["--manifest", root / "manifest.csv", "--out", out, "--checkpoint", checkpoint, "--step-um", STEP_UM,
            "--device", "cpu", "--batch-size", "32", "--top-genes", "2", *extra]


def status_lines(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "_cohort" / "status").glob("*.jsonl"))
            for line in path.read_text().splitlines()]


def last_run_statuses(out: Path, run_lines: int) -> dict[str, str]:
    return {line["slide_id"]: line["status"] for line in status_lines(out)[-run_lines:]}


def published(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")}


@pytest.fixture(scope="module")
def one_process(cohort_root: Path, served_checkpoint: Path, tmp_path_factory) -> tuple[Path, object]:
    """The whole cohort in one process (one shard, so it ends with the summary)."""
    out = tmp_path_factory.mktemp("one_process") / "out"
    result = run_cohort(*cohort_args(cohort_root, out, served_checkpoint))
    return out, result


# --- sharding and the manifest -------------------------------------------------------------------

def test_shards_are_deterministic_disjoint_and_complete():
    slides = [CohortSlide(f"slide-{k:04d}", f"/data/{k}.svs") for k in range(500)]
    for n_shards in (1, 2, 3, 7):
        shards = [select(slides, index, n_shards) for index in range(n_shards)]
        ids = [s.slide_id for shard in shards for s in shard]
        assert sorted(ids) == sorted(s.slide_id for s in slides) and len(ids) == len(set(ids))
        # a slide's shard does not depend on the manifest's order or on the other slides
        assert [select(slides[::-1], i, n_shards) for i in range(n_shards)] == [shard[::-1] for shard in shards]
        assert [select(slides[:10], i, n_shards) for i in range(n_shards)] == \
            [[s for s in shard if s in slides[:10]] for shard in shards]
        if n_shards > 1:  # the hash spreads the slides (each shard within 30 % of an even share)
            assert min(map(len, shards)) > 0.7 * len(slides) / n_shards
    # ... nor on the process: another interpreter with another string hash seed agrees
    code = ("from brst.train.cohort.shards import shard_of; "
            "print([shard_of(f'slide-{k:04d}', 7) for k in range(500)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == [shard_of(s.slide_id, 7) for s in slides]


@pytest.mark.parametrize("rows, words", [
    ([("a", "x.jpg", ""), ("A", "y.jpg", "")], ("'A' appears more than once",)),
    ([("_cohort", "x.jpg", "")], ("slide_id '_cohort'",)),
    ([("a", "x.jpg", "fine")], ("line 2", "um_per_px 'fine' is not a number")),
    ([("a", "", "")], ("source is empty",)),
    ([], ("lists no slide",)),
])
def test_a_bad_manifest_stops_with_its_own_exit_status(tmp_path: Path, rows, words):
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict-cohort", "--manifest", str(manifest), "--out", str(out),
                                      "--checkpoint", str(tmp_path / "none.pt")])
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brst-train: error: ") and str(manifest) in lines[0], lines
    for word in words:
        assert word in lines[0]
    assert not out.exists()


def test_a_manifest_without_its_columns_or_file_is_refused(tmp_path: Path):
    (tmp_path / "m.csv").write_text("id,path\na,b.jpg\n")
    result = CliRunner().invoke(cli, ["predict-cohort", "--manifest", str(tmp_path / "m.csv"), "--out",
                                      str(tmp_path / "out"), "--summarize"])
    assert result.exit_code == 3 and "no slide_id, source column" in result.output
    result = CliRunner().invoke(cli, ["predict-cohort", "--manifest", str(tmp_path / "none.csv"), "--out",
                                      str(tmp_path / "out"), "--summarize"])
    assert result.exit_code == 3 and "cannot be read as a CSV manifest" in result.output


def test_every_predict_slide_option_is_used_or_given_by_the_manifest():
    """A new predict-slide option must be wired into the cohort (or named per slide), never ignored."""
    from brst.train.cli import cohort
    from brst.train.cli.slide import predict_slide

    placed = cohort.MODEL_OPTIONS + cohort.ENDPOINT_OPTIONS + cohort.JOB_OPTIONS + cohort.PER_SLIDE_OPTIONS
    assert sorted(placed) == sorted(p.name for p in predict_slide.params)
    reused = [p.name for p in predict_slide.params if any(p is q for q in cohort.predict_cohort.params)]
    assert sorted(reused) == sorted(set(placed) - set(cohort.PER_SLIDE_OPTIONS))  # the same option objects


# --- one process: outputs, failures, summary -----------------------------------------------------

def test_one_process_maps_every_readable_slide_and_records_the_failures(one_process, cohort_root: Path,
                                                                      served_checkpoint: Path):
    out, result = one_process
    assert result.exit_code == 1, result.output  # two slides failed
    assert "3 done, 0 skipped, 2 failed of 5 slides" in result.output
    assert published(out) == set(READABLE)
    for slide_id in READABLE:
        folder = out / slide_id
        assert {"predictions.csv", "predictions.h5ad", "summary.json", "cohort.json", "heatmaps"} <= \
            {p.name for p in folder.iterdir()}
        assert len(list((folder / "heatmaps").glob("*.png"))) == 2
    assert not list((out / "_cohort" / "work").iterdir())  # no work folder left behind
    lines = {line["slide_id"]: line for line in status_lines(out)}
    assert {k: v["status"] for k, v in lines.items()} == {**dict.fromkeys(READABLE, "done"),
                                                          **dict.fromkeys(UNREADABLE, "failed")}
    assert "gone.jpg" in lines["missing"]["reason"] and "no such file" in lines["missing"]["reason"].lower()
    assert "not-an-image.svs" in lines["not-an-image"]["reason"]
    # the same outputs as predict-slide run on its own
    alone = out.parent / "alone"
    single = CliRunner().invoke(cli, ["predict-slide", "--checkpoint", str(served_checkpoint),
                                      "--slide", str(cohort_root / "slides" / "C3.jpg"), "--out", str(alone),
                                      "--um-per-px", repr(2 * HER2ST_UM_PER_PX), "--step-um", STEP_UM,
                                      "--device", "cpu", "--batch-size", "32", "--top-genes", "2"])
    assert single.exit_code == 0, single.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "C3-jpeg" / "predictions.csv"),
                                  pd.read_csv(alone / "predictions.csv"))


def test_the_summary_tables_every_slide_and_scanpy_reads_the_means(one_process):
    import scanpy as sc

    out, _ = one_process
    table = pd.read_csv(out / "_cohort" / "cohort.csv", keep_default_na=False, na_values=[""])
    assert list(table["slide_id"]) == ["C2-jpeg", "C3-jpeg", "C4-tiff", "not-an-image", "missing"]
    failed = table.set_index("slide_id").loc[list(UNREADABLE)]
    assert (failed["status"] == "failed").all() and failed["reason"].str.len().min() > 10
    done = table[table["status"] == "done"].set_index("slide_id")
    genes = list(table.columns[table.columns.get_loc("units") + 1:])
    assert len(genes) == 250
    for slide_id in READABLE:
        tiles = pd.read_csv(out / slide_id / "predictions.csv")
        assert done.loc[slide_id, "tiles"] == len(tiles) > 20
        np.testing.assert_allclose(done.loc[slide_id, genes].to_numpy(float), tiles[genes].mean().to_numpy(),
                                   rtol=1e-6)
        summary = json.loads((out / slide_id / "summary.json").read_text())
        area_px = summary["tissue_fraction"] * summary["width_px"] * summary["height_px"]
        area_mm2 = area_px * summary["um_per_px"] ** 2 / 1e6
        assert done.loc[slide_id, "tissue_area_mm2"] == pytest.approx(area_mm2, rel=1e-6)
    # the tissue mask's area agrees with the tiles' (one tile per grid cell of STEP_UM on tissue)
    cells_mm2 = done["tiles"] * (float(STEP_UM) / 1000) ** 2
    assert (done["tissue_area_mm2"] / cells_mm2).between(0.6, 1.6).all(), done[["tissue_area_mm2", "tiles"]]
    assert done["model"].str.startswith("sha256:").all() and done["seconds"].gt(0).all()
    adata = sc.read_h5ad(out / "_cohort" / "cohort.h5ad")
    assert list(adata.obs_names) == list(done.index) and list(adata.var_names) == genes
    np.testing.assert_allclose(adata.X, done[genes].to_numpy(np.float32), rtol=1e-6)
    sheet = Image.open(out / "_cohort" / "contact_sheet.png")
    assert sheet.height > 3 * 100 and sheet.width > 2 * 300


def test_slides_with_many_out_of_domain_tiles_are_flagged_and_listed_first(one_process, cohort_root: Path,
                                                                           tmp_path: Path):
    """Tables carry predict-slide's per-tile ``out_of_domain`` flag (set here in copies of the real
    outputs) and give a share per slide; slides above --flag-share come first."""
    out = tmp_path / "out"
    shutil.copytree(one_process[0], out)
    shares = {"C2-jpeg": 0.0, "C3-jpeg": 0.5, "C4-tiff": 0.1}
    for slide_id, share in shares.items():
        table = pd.read_csv(out / slide_id / "predictions.csv")
        flagged = round(share * len(table))
        table["out_of_domain"] = [True] * flagged + [False] * (len(table) - flagged)
        table.to_csv(out / slide_id / "predictions.csv", index=False)
        shares[slide_id] = flagged / len(table)
    result = run_cohort("--manifest", cohort_root / "manifest.csv", "--out", out, "--summarize", "--flag-share", 0.25)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "_cohort" / "cohort.csv")
    assert list(summary["slide_id"]) == ["C3-jpeg", "C2-jpeg", "C4-tiff", "not-an-image", "missing"]
    done = summary.set_index("slide_id").loc[list(shares)]
    assert done["out_of_domain_share"].to_dict() == pytest.approx(shares)
    assert done["flagged"].to_dict() == {"C2-jpeg": False, "C3-jpeg": True, "C4-tiff": False}
    genes = summary.columns[summary.columns.get_loc("units") + 1:]
    assert "out_of_domain" not in genes and len(genes) == 250


def test_two_shards_summarize_to_the_one_process_values(one_process, cohort_root: Path, served_checkpoint: Path,
                                                        tmp_path: Path):
    one_out, _ = one_process
    out = tmp_path / "out"
    ids = {sid: shard_of(sid, 2) for sid in READABLE + UNREADABLE}
    for index in (0, 1):
        env = {"JOB_COMPLETION_INDEX": str(index)}
        result = run_cohort(*cohort_args(cohort_root, out, served_checkpoint, "--shards", 2), env=env)
        mine = {sid for sid, shard in ids.items() if shard == index}
        assert result.exit_code == (1 if mine & set(UNREADABLE) else 0), result.output
        assert published(out) & mine == mine & set(READABLE)  # this shard's readable slides
        assert not (out / "_cohort" / "cohort.csv").exists()  # a shard of several does not summarize
    assert published(out) == set(READABLE)
    result = run_cohort("--manifest", cohort_root / "manifest.csv", "--out", out, "--summarize")
    assert result.exit_code == 0, result.output
    two = pd.read_csv(out / "_cohort" / "cohort.csv")
    one = pd.read_csv(one_out / "_cohort" / "cohort.csv")
    assert two["seconds"].notna().sum() == 3
    pd.testing.assert_frame_equal(two.drop(columns="seconds"), one.drop(columns="seconds"), check_exact=True)


def test_a_second_run_does_nothing(one_process, cohort_root: Path, served_checkpoint: Path):
    out, _ = one_process
    before = {sid: os.stat(out / sid / "predictions.h5ad") for sid in READABLE}
    result = run_cohort(*cohort_args(cohort_root, out, served_checkpoint))
    assert result.exit_code == 1 and "0 done, 3 skipped, 2 failed" in result.output
    assert last_run_statuses(out, 5) == {**dict.fromkeys(READABLE, "skipped"), **dict.fromkeys(UNREADABLE, "failed")}
    for sid, stat in before.items():
        now = os.stat(out / sid / "predictions.h5ad")
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


# --- resume: what changed is redone, atomically -----------------------------------------------------

@pytest.fixture()
def copied(one_process, cohort_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the cohort (sources keep their size and mtime) and of its outputs, readable slides only."""
    out, _ = one_process
    root = tmp_path / "root"
    shutil.copytree(cohort_root, root)  # copy2: sizes and modification times kept
    write_manifest(root / "manifest.csv", [("C3-jpeg", "slides/C3.jpg", 2 * HER2ST_UM_PER_PX),
                                           ("C4-tiff", "slides/C4.tif", "")])
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return root, copy


def test_a_changed_source_is_redone_and_the_rest_skipped(copied, served_checkpoint: Path):
    root, out = copied
    result = run_cohort(*cohort_args(root, out, served_checkpoint))
    assert result.exit_code == 0 and "0 done, 2 skipped" in result.output, result.output  # a copy is the same slide
    old = pd.read_csv(out / "C3-jpeg" / "predictions.csv")
    stat = (root / "slides" / "C3.jpg").stat()
    os.utime(root / "slides" / "C3.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (out / "_cohort" / "work" / "shard-0-of-1.C4-tiff.crashed").mkdir()  # as an interrupted run leaves it
    result = run_cohort(*cohort_args(root, out, served_checkpoint))
    assert result.exit_code == 0 and "1 done, 1 skipped" in result.output, result.output
    assert last_run_statuses(out, 2) == {"C3-jpeg": "done", "C4-tiff": "skipped"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "C3-jpeg" / "predictions.csv"), old)
    assert not list((out / "_cohort" / "work").iterdir())
    # changed options redo every slide
    result = run_cohort(*cohort_args(root, out, served_checkpoint, "--top-genes", "3"))
    assert result.exit_code == 0 and "2 done, 0 skipped" in result.output, result.output


def test_a_changed_model_is_redone(copied, served_checkpoint: Path):
    from brst.handlers.archive_facts import sha256_file
    from brst.train.checkpoint import load_checkpoint, save_checkpoint

    root, out = copied
    ckpt = load_checkpoint(served_checkpoint)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    other = save_checkpoint(out.parent / "other.pt", ckpt)
    result = run_cohort(*cohort_args(root, out, other))
    assert result.exit_code == 0 and "2 done, 0 skipped" in result.output, result.output
    table = pd.read_csv(out / "_cohort" / "cohort.csv")
    assert list(table["model"]) == [f"sha256:{sha256_file(other)[:12]}"] * 2
    assert sha256_file(other) != sha256_file(served_checkpoint)


def test_a_slide_that_fails_while_writing_keeps_its_previous_outputs(copied, served_checkpoint: Path, monkeypatch):
    """A failure after some outputs are written (simulated: the heatmap writer raises; a disk error
    cannot be produced on demand here) publishes nothing: the previous folder stays as it was."""
    import brst.train.slide.run as slide_run

    root, out = copied
    before = (out / "C3-jpeg" / "predictions.csv").read_bytes()
    stat = (root / "slides" / "C3.jpg").stat()
    os.utime(root / "slides" / "C3.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(slide_run, "write_heatmaps", broken)
    result = run_cohort(*cohort_args(root, out, served_checkpoint))
    assert result.exit_code == 1 and "0 done, 1 skipped, 1 failed" in result.output, result.output
    assert (out / "C3-jpeg" / "predictions.csv").read_bytes() == before
    assert not list((out / "_cohort" / "work").iterdir())
    assert "No space left" in [line for line in status_lines(out) if line["slide_id"] == "C3-jpeg"][-1]["reason"]


def test_a_folder_source_changes_identity_with_any_of_its_files(tmp_path: Path):
    from brst.train.cohort.identity import source_identity

    folder = tmp_path / "series"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.dcm", "sub/b.dcm"):
        (folder / name).write_bytes(b"frame" * 10)
    first = source_identity(str(folder))
    assert source_identity(str(folder)) == first and first["kind"] == "folder"
    (folder / "sub" / "b.dcm").write_bytes(b"frame" * 11)
    assert source_identity(str(folder)) != first
    url = "dicomweb://pacs:8042/dicom-web/studies/1.2.3/series/4.5.6"
    assert source_identity(url) == {"kind": "dicomweb", "study_uid": "1.2.3", "series_uid": "4.5.6"}


@pytest.mark.serve
@pytest.mark.slow
def test_the_served_model_gives_the_local_numbers_and_its_version_is_the_identity(one_process, cohort_root: Path,
                                                                                  served_model, tmp_path: Path):
    """The cohort through a real TorchServe (HTTP, tiles at the model's geometry) equals local mode."""
    from brst.train.checkpoint import load_checkpoint

    local_out, _ = one_process
    config = load_checkpoint(served_model.checkpoint)["data_config"]
    write_manifest(cohort_root / "served.csv", [("C2-jpeg", "slides/C2.jpg", 2 * HER2ST_UM_PER_PX),
                                                ("C4-tiff", "slides/C4.tif", "")])
    out = tmp_path / "out"
    args = ["--manifest", cohort_root / "served.csv", "--out", out, "--endpoint", served_model.endpoints.inference,
            "--model-name", served_model.name, "--tile-um", config["patch_um"], "--tile-px", config["patch_px"],
            "--step-um", STEP_UM, "--top-genes", "2"]
    result = run_cohort(*args)
    assert result.exit_code == 0 and "2 done, 0 skipped" in result.output, result.output
    for slide_id in ("C2-jpeg", "C4-tiff"):
        served, local = (pd.read_csv(folder / slide_id / "predictions.csv") for folder in (out, local_out))
        assert list(served["tile"]) == list(local["tile"])
        values = [c for c in served.columns[served.columns.get_loc("tissue_fraction") + 1:] if c != "out_of_domain"]
        np.testing.assert_allclose(served[values].to_numpy(), local[values].to_numpy(), atol=1e-4)
        assert list(served["out_of_domain"]) == list(local["out_of_domain"])
    record = json.loads((out / "C2-jpeg" / "cohort.json").read_text())
    assert record["identity"]["model"]["kind"] == "endpoint" and record["identity"]["model"]["model_version"]
    table = pd.read_csv(out / "_cohort" / "cohort.csv")
    assert set(table["model"]) == {f"{served_model.name}:{record['identity']['model']['model_version']}"}
    result = run_cohort(*args)  # the same served model: nothing to do
    assert result.exit_code == 0 and "0 done, 2 skipped" in result.output, result.output


# --- the counter ---------------------------------------------------------------------------------

def test_the_counter_is_served_for_prometheus():
    from brst.train.cohort.metrics import CohortMetrics

    metrics, port = CohortMetrics(), free_port()
    metrics.serve(port)
    try:
        for status in ("done", "done", "failed"):
            metrics.count(status)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert 'brst_cohort_slides_total{status="done"} 2.0' in text
    assert 'brst_cohort_slides_total{status="failed"} 1.0' in text
    assert 'brst_cohort_slides_total{status="skipped"} 0.0' in text
