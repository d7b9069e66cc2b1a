"""What a person sees when they make a mistake (issue 14): every command answers a user mistake with one
``error:`` line naming the file or path and the fix, exit status 2, and no traceback; a closed pipe ends
quietly. Each case runs the real ``multitalent`` command; none starts Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multitalent.catalog.cli import clip

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))
TINY_GPU = ["--set", "architecture.arch=unet", "--set", "architecture.size=tiny"]


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MULTITALENT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def test_catalog_show_unknown_preset_names_the_available_ones():
    assert_user_error(cli("catalog", "show", "--preset", "multitalent12"), "multitalent12", "multitalent13")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, ["does not exist", "preset"]),
        ('{"name": ', ["cannot be read as json", "line 1"]),
        ('{"name": "x"}', ["not a catalog", "'datasets'"]),
        ('{"datasets": [{"id": "A"}]}', ["missing field", "labels"]),
        ("datasets: [oops", ["not valid YAML"]),
    ],
    ids=["missing", "invalid-json", "no-datasets", "bad-dataset", "invalid-yaml"],
)
def test_catalog_file_mistakes_name_the_file(tmp_path, content, words):
    suffix = ".yaml" if "oops" in (content or "") else ".json"
    path = tmp_path / f"my_catalog{suffix}"
    if content is not None:
        path.write_text(content)
    assert_user_error(cli("catalog", "show", "--preset", str(path)), str(path), *words)


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [MULTITALENT, "catalog", "show", "--preset", "totalsegmentator"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that went away before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_convert_with_a_missing_catalog_file_writes_nothing(tmp_path):
    proc = cli(
        "convert",
        str(REPO / "jobs" / "convert.yaml"),
        "--set",
        f"catalog={tmp_path / 'nope.json'}",
        "--set",
        f"raw_root={tmp_path / 'raw'}",
        "--set",
        f"out={tmp_path / 'out'}",
    )
    assert_user_error(proc, "nope.json", "does not exist")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "out").exists()


def test_a_train_job_given_to_convert_says_so_in_one_line():
    proc = cli("convert", str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"))
    assert_user_error(proc, "this is a train job", "multitalent train")
    assert "Extra inputs" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_a_misspelt_job_key_gets_a_did_you_mean():
    proc = cli(
        "train", str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"), "--dry-run", "--set", "optimizer.lr=0.1"
    )
    assert_user_error(proc, "optimizer: unknown key; did you mean 'optimiser'?")
    proc = cli(
        "train", str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"), "--dry-run", "--set", "schedule.epoch=3"
    )
    assert_user_error(proc, "schedule.epoch: unknown key; did you mean 'epochs'?")


@pytest.mark.parametrize("command", ["convert", "train"])
def test_relative_paths_inside_a_submitted_ray_job_are_errors(tmp_path, command):
    """``ray job submit`` gives the driver its job config in the environment; relative outputs would land
    in the job's temporary working directory."""
    job = {"convert": "convert.yaml", "train": "pretrain_cpu_tiny.yaml"}[command]
    submitted = {
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}})
    }
    args = ["--set", f"raw_root={tmp_path}"] if command == "convert" else ["--set", f"shards.path={tmp_path}"]
    proc = cli(command, str(REPO / "jobs" / job), *args, env=submitted, cwd=tmp_path)
    field = {"convert": "out=data_shards/phantom", "train": "run.storage_path=runs"}[command]
    assert_user_error(proc, "submitted Ray job", field, "absolute")
    assert list(tmp_path.iterdir()) == []


def test_train_dry_run_of_a_gpu_job_on_a_machine_without_gpus_fails_like_the_real_run(tmp_path):
    """The dry run checks the resources a local Ray would have (this CPU machine) and exits 2, naming
    the demand and what the machine has; a missing shards folder is an error there too."""
    proc = cli(
        "train",
        str(REPO / "jobs" / "pretrain.yaml"),
        "--dry-run",
        *TINY_GPU,
        "--set",
        f"run.storage_path={tmp_path}",
        "--set",
        f"shards.path={tmp_path / 'shards'}",
    )
    assert_user_error(
        proc, "2 worker(s) x {CPU: 8, GPU: 1}", "GPU: 0}", "workers.use_gpu=false", "no plan.json"
    )
    assert "cluster: 1 node(s)" in proc.stdout and "this machine" in proc.stdout


def test_convert_with_a_wrong_raw_root_prints_the_summary_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    proc = cli(
        "convert",
        str(REPO / "jobs" / "convert.yaml"),
        "--set",
        f"raw_root={tmp_path / 'no_such_raw'}",
        "--set",
        f"out={out}",
        "--set",
        "synth=null",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: nothing converted: no valid case found" in proc.stderr
    assert "FAILED P01/*" in proc.stderr and "no_such_raw does not exist" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["cases_found"] == 0 and report["error"] and report["failed"] == len(report["failures"]) == 7
    assert "Started a local Ray" not in proc.stderr  # nothing to convert: no Ray


def test_help_texts():
    top = cli("--help").stdout
    assert "``multitalent`` command" not in top and "partially labelled" in top
    assert "shipped presets" in cli("catalog", "list", "--help").stdout
    assert "preset name" in cli("catalog", "show", "--help").stdout
    synth = cli("synth", "--help").stdout
    assert "random seed" in synth and "case count" in synth
    train = cli("train", "--help").stdout
    assert "--quiet" in train and "--jsonl" in train and "--wait-for-resources" in train
    assert "--dry-run" in cli("convert", "--help").stdout


def test_catalog_table_keeps_long_ids_aligned_and_marks_cut_names(tmp_path):
    long_name = "An Extremely Long Dataset Name That Does Not Fit The Column"
    catalog = {
        "name": "wide",
        "datasets": [
            {"id": "D1", "name": "short", "layout": "msd", "labels": {"1": "liver"}},
            {"id": "DATASET_WITH_LONG_ID", "name": long_name, "layout": "msd", "labels": {"1": "spleen"}},
        ],
    }
    path = tmp_path / "wide.json"
    path.write_text(json.dumps(catalog))
    proc = cli("catalog", "show", "--preset", str(path))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if " msd " in line]
    assert len(rows) == 2 and rows[0].index(" msd ") == rows[1].index(" msd ")  # columns line up
    assert "DATASET_WITH_LONG_ID" in rows[1] and clip(long_name, 32) in rows[1] and "\u2026" in rows[1]
    assert clip("abc", 3) == "abc" and clip("abcd", 3) == "ab\u2026"
