"""The one-node cohort run (``make k8s-cohort``, deploy/k8s_cohort.py): its overlay is the production
cohort Job but for what a one-node cluster without DNS needs, and the one-process run it is compared
with gets the Job's own arguments.
"""
from __future__ import annotations

import sys
from pathlib import Path

import k8s_checks as k8s

sys.path.insert(0, str(k8s.DEPLOY_DIR))

from k8s_cohort import SLIDES_MOUNT, Cohort, local_command  # noqa: E402


def the_job(folder: str) -> dict:
    [job] = [obj for obj in k8s.build(folder) if obj["kind"] == "Job"]
    return job


def claim(folder: str, name: str) -> dict:
    [found] = [obj for obj in k8s.build(folder) if obj["kind"] == "PersistentVolumeClaim"
               and obj["metadata"]["name"] == name]
    return found


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_overlay_is_the_production_job_with_three_shards_two_at_a_time_and_a_checkpoint():
    production, local = the_job("jobs/cohort"), the_job("local-node/cohort")
    command = local["spec"]["template"]["spec"]["containers"][0]["command"]
    assert (local["spec"]["completions"], local["spec"]["parallelism"]) == (3, 2)
    assert int(option(command, "--shards")) == local["spec"]["completions"]
    # the model is a checkpoint on the read-only slides volume, not the Service (no DNS on the node)
    assert "--endpoint" not in command and option(command, "--checkpoint").startswith(f"{SLIDES_MOUNT}/")
    production_command = production["spec"]["template"]["spec"]["containers"][0]["command"]
    for name in ("--manifest", "--out", "--metrics-port", "--metrics-host"):
        assert option(command, name) == option(production_command, name)
    # retries, failure policy, security and volumes are the production Job's
    for key in ("completionMode", "backoffLimitPerIndex", "podFailurePolicy"):
        assert local["spec"][key] == production["spec"][key]
    for key in ("securityContext", "volumes", "serviceAccountName", "automountServiceAccountToken"):
        assert local["spec"]["template"]["spec"][key] == production["spec"]["template"]["spec"][key]
    # two pods fit a 2-CPU node
    cpu = local["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert local["spec"]["parallelism"] * cores <= 1.5


def test_the_overlay_asks_local_storage_for_a_read_write_once_claim():
    assert claim("jobs/cohort", "brst-cohort")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim("local-node/cohort", "brst-cohort")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_one_process_run_gets_the_jobs_arguments_with_host_paths_and_one_shard(tmp_path: Path):
    from brst.train.cli.cohort import predict_cohort

    slides_dir = tmp_path / "slides-volume"
    job = the_job("local-node/cohort")
    cohort = Cohort(slides_dir, slides_dir / "cohort" / "manifest.csv", ("a",), "b", {"a": 0, "b": 1}, 3)
    out = tmp_path / "out"
    command = local_command(job, cohort, out)
    assert Path(command[0]).name == "brst-train" and command[1] == "predict-cohort"
    args = command[2:]
    assert option(args, "--manifest") == str(slides_dir / "cohort" / "manifest.csv")
    assert option(args, "--checkpoint") == str(slides_dir / "cohort" / "model.pt")
    assert option(args, "--out") == str(out)
    assert not {"--shards", "--metrics-port", "--metrics-host", "3", "9400", "0.0.0.0"} & set(args)
    job_args = job["spec"]["template"]["spec"]["containers"][0]["command"]
    for name in ("--step-um", "--batch-size", "--top-genes", "--device"):
        assert option(args, name) == option(job_args, name)
    # and predict-cohort parses them (the files must exist for its path options)
    (slides_dir / "cohort").mkdir(parents=True)
    for path in ("manifest.csv", "model.pt"):
        (slides_dir / "cohort" / path).write_text("x")
    context = predict_cohort.make_context("predict-cohort", list(args))
    assert context.params["shards"] is None and context.params["out_dir"] == out
