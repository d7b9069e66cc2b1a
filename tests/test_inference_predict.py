"""``multitalent predict`` on files and folders: model resolution from a run folder, outputs, errors,
reruns, another model's folder; a cohort on a real local Ray with one bad file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from multitalent.catalog import load_catalog
from multitalent.cli import main
from multitalent.preprocess import Plan
from multitalent.train.checkpoint import STATE_FILE, WEIGHTS_FILE, TrainerState, write_rank_manifest

PATCH = (16, 32, 32)


def fake_run(root: Path, *, seed: int = 0, name: str = "run") -> Path:
    """A training run folder as training leaves it: a verified checkpoint with model.pt, and the MLflow
    artifacts model.json / plan.json / label_space.json (an untrained tiny U-Net)."""
    from multitalent.models import build_network

    catalog = load_catalog("phantom")
    plan = Plan.for_catalog(catalog)
    torch.manual_seed(seed)
    net = build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=PATCH)
    run = root / name
    ckpt = run / "ckpt-it000000012-abc"
    ckpt.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / STATE_FILE).write_text(TrainerState(iteration=12, mlflow_run_id="r1").to_json())
    write_rank_manifest(ckpt, 0)
    art = run / "mlartifacts" / "r1" / "artifacts"
    art.mkdir(parents=True)
    (art / "model.json").write_text(json.dumps(net.describe()))
    plan.save(art / "plan.json")
    (art / "label_space.json").write_text(json.dumps(catalog.to_dict()))
    return run


def write_scan(path: Path, shape=(40, 36, 20), affine=None, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 2:-2] = rng.normal(40, 30, (shape[0] - 8, shape[1] - 8, shape[2] - 4)).astype(np.int16)
    affine = np.diag([-1.0, -1.0, 2.5, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("runs"))


def test_predict_one_file(tmp_path, run_dir, capsys):
    scan = write_scan(tmp_path / "in" / "scan_0000.nii.gz")
    out = tmp_path / "out"
    args = ["predict", "-i", str(scan), "-o", str(out), "--model", str(run_dir), "--datasets", "P01", "P03"]
    assert main([*args, "--masks", "--no-mirror"]) == 0
    case = out / "scan"  # the nnU-Net channel suffix is not part of the case name
    names = sorted(p.relative_to(case).as_posix() for p in case.rglob("*.nii.gz"))
    assert names == [
        "P01.nii.gz",
        "P01/liver.nii.gz",
        "P01/liver_tumour.nii.gz",
        "P03.nii.gz",
        "P03/kidney_tumour.nii.gz",
        "P03/kidneys.nii.gz",
    ]
    img = nib.load(scan)
    for p in case.rglob("*.nii.gz"):
        assert nib.load(p).shape == img.shape and np.array_equal(nib.load(p).affine, img.affine)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"]["source"]["checkpoint"] == "ckpt-it000000012-abc"
    assert summary["model"]["id"].startswith("sha256:")
    assert summary["classes"] == ["P01:liver", "P01:liver tumour", "P03:kidneys", "P03:kidney tumour"]
    assert summary["cases"]["scan"]["files"][0] == "P01.nii.gz"
    assert summary["settings"]["mirror_axes"] == []
    text = capsys.readouterr()
    assert "scan:" in text.err + text.out and "classes found" in text.err + text.out

    # a rerun skips the finished case
    assert main([*args, "--masks", "--no-mirror"]) == 0
    assert "already predicted" in capsys.readouterr().out

    # another model's predictions: refused, unless --overwrite
    other = fake_run(tmp_path / "other", seed=1)
    again = [
        "predict",
        "-i",
        str(scan),
        "-o",
        str(out),
        "--model",
        str(other),
        "--datasets",
        "P01",
        "--no-mirror",
    ]
    assert main(again) == 2
    assert "another model" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0


def test_predict_folder_reports_bad_files_and_finishes_the_others(tmp_path, run_dir, capsys):
    folder = tmp_path / "in"
    write_scan(folder / "good_a.nii.gz")
    write_scan(folder / "case_00007" / "imaging.nii.gz", seed=2)  # KiTS19-style folder
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), folder / "series4d.nii.gz")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "-i",
            str(folder),
            "-o",
            str(out),
            "--model",
            str(run_dir),
            "--classes",
            "P02:spleen",
            "--no-mirror",
        ]
    )
    assert code == 1
    summary = json.loads((out / "predictions.json").read_text())
    assert sorted(summary["cases"]) == ["case_00007", "good_a"]
    failures = {f["case"]: f["error"] for f in summary["failures"]}
    assert sorted(failures) == ["broken", "series4d"]
    assert "broken.nii.gz" in failures["broken"] and "corrupt" in failures["broken"]
    assert "series4d.nii.gz" in failures["series4d"] and "4-D" in failures["series4d"]
    assert (out / "good_a" / "P02.nii.gz").is_file()
    assert not list(out.rglob(".tmp-*"))
    err = capsys.readouterr().err
    assert "FAILED broken" in err


def test_predict_usage_errors(tmp_path, run_dir, capsys):
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(run_dir)]) == 2
    assert "no NIfTI scans" in capsys.readouterr().err
    scan = write_scan(tmp_path / "s.nii.gz")
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "o")]) == 2
    assert "--model required" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "-i",
                str(scan),
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(run_dir),
                "--classes",
                "nope",
            ]
        )
        == 2
    )
    assert "unknown classes" in capsys.readouterr().err


def test_predict_job_file_loads():
    from multitalent.inference.job import load_predict_job

    job = load_predict_job(Path(__file__).resolve().parents[1] / "jobs" / "predict.yaml")
    assert job.kind == "predict" and job.ray.enabled and job.inference.mirror_axes == [0, 1, 2]


@pytest.mark.slow
def test_cohort_on_local_ray_with_one_bad_file(tmp_path, run_dir):
    import ray

    from multitalent.inference.cli import resolve_model
    from multitalent.inference.cohort import CohortRequest, RaySlots, predict_ray
    from multitalent.inference.predictor import PredictSettings

    folder = tmp_path / "in"
    scans = [write_scan(folder / f"c{i}.nii.gz", seed=i) for i in range(3)]
    bad = folder / "bad.nii.gz"
    bad.write_bytes(b"junk")
    request = CohortRequest(
        inputs=[*scans, bad],
        out=tmp_path / "out",
        model=resolve_model(str(run_dir)),
        settings=PredictSettings(mirror_axes=(), device="cpu"),
        datasets=["P02"],
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = predict_ray(request, ray, RaySlots(num_workers=2, cpus_per_worker=1), log=lambda _: None)
        assert sorted(summary.done) == ["c0", "c1", "c2"]
        assert [f["case"] for f in summary.failures] == ["bad"]
        assert "bad.nii.gz" in summary.failures[0]["error"]
        # a rerun skips the three finished cases and retries the bad one only
        again = predict_ray(request, ray, RaySlots(num_workers=2), log=lambda _: None)
        assert sorted(again.skipped) == ["c0", "c1", "c2"] and len(again.failures) == 1
    finally:
        ray.shutdown()
    for i in range(3):
        assert nib.load(tmp_path / "out" / f"c{i}" / "P02.nii.gz").shape == nib.load(scans[i]).shape
