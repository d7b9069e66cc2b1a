"""docs/reproduce.md (issue 10): every ``multitalent`` command in it parses with the real command-line
parser, every job it names exists, the training jobs dry-run (everything built; only the data is missing),
the convert commands dry-run on an empty-file tree laid out as its section 2 says (the converter finds
every dataset), and its predict/evaluate commands validate. The 13 datasets are not here: reading images,
training and the numbers are what this cannot check."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from multitalent.catalog import load_catalog
from multitalent.cli import build_parser, main
from multitalent.train import dry_run, load_train_job

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reproduce.md"


def doc_commands() -> list[list[str]]:
    """The ``multitalent`` command lines of the doc's bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("multitalent "):
                commands.append(shlex.split(line)[1:])
    return commands


COMMANDS = doc_commands()


def of(kind: str) -> list[list[str]]:
    return [c for c in COMMANDS if c[0] == kind]


def sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_the_doc_has_the_whole_path():
    assert {c[0] for c in COMMANDS} == {"convert", "train", "predict", "evaluate", "publish"}
    assert len(of("train")) >= 4 and len(of("convert")) >= 4


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_every_command_parses(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of saying "unknown flag"
        pytest.fail(f"multitalent {' '.join(argv)}: does not parse ({e})")
    assert args.command == argv[0]


def test_every_job_named_exists():
    named = set(re.findall(r"jobs/[\w.-]+\.yaml", DOC.read_text()))
    assert {"jobs/convert_multitalent13.yaml", "jobs/pretrain.yaml", "jobs/predict.yaml"} <= named
    for job in named:
        assert (REPO / job).is_file(), job


@pytest.mark.parametrize("argv", of("train"), ids=lambda a: " ".join(a)[:70])
def test_training_commands_dry_run(argv, tmp_path):
    """Built as the workers would build them: model, loss, optimiser, schedule, DeepSpeed config. Only the
    converted data is missing (and, for fine-tuning, the published backbone: a warning in a dry run)."""
    job = load_train_job(REPO / argv[1], [*sets(argv), f"run.storage_path={tmp_path}"])
    report = dry_run(job)
    text = report.text()
    assert "model: " in text and "deepspeed: " in text
    assert job.catalog in text
    assert all("no plan.json" in e for e in report.errors), report.errors
    assert all(w.startswith("init:") for w in report.warnings), report.warnings
    if job.architecture.size == "paper" and job.architecture.arch == "resenc_unet" and job.init is None:
        # the paper's ResEnc U-Net, one head per class of the job's label space
        assert f"{load_catalog(job.catalog).num_classes} classes" in text


def placeholder_tree(root: Path) -> None:
    """Empty files in the layouts of docs/reproduce.md, section 2 (two cases per dataset)."""
    catalog = load_catalog("multitalent13")
    for d in catalog.datasets:
        base = root / d.location
        labels = {str(v): n for v, n in d.labels.items()}
        if d.layout == "msd":
            (base / "imagesTr").mkdir(parents=True)
            (base / "labelsTr").mkdir()
            (base / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **labels}}))
            for i in range(2):
                (base / "imagesTr" / f"case_{i}.nii.gz").touch()
                (base / "labelsTr" / f"case_{i}.nii.gz").touch()
        elif d.layout == "nnunet_v2":
            (base / "imagesTr").mkdir(parents=True)
            (base / "labelsTr").mkdir()
            names = {"background": 0, **{n: int(v) for v, n in labels.items()}}
            (base / "dataset.json").write_text(json.dumps({"labels": names, "file_ending": ".nii.gz"}))
            for i in range(2):
                (base / "imagesTr" / f"case_{i:03d}_0000.nii.gz").touch()
                (base / "labelsTr" / f"case_{i:03d}.nii.gz").touch()
        elif d.layout == "btcv":
            (base / "img").mkdir(parents=True)
            (base / "label").mkdir()
            for i in range(1, 3):
                (base / "img" / f"img{i:04d}.nii.gz").touch()
                (base / "label" / f"label{i:04d}.nii.gz").touch()
        elif d.layout == "kits19":
            for i in range(2):
                case = base / f"case_{i:05d}"
                case.mkdir(parents=True)
                (case / "imaging.nii.gz").touch()
                (case / "segmentation.nii.gz").touch()
        else:  # pragma: no cover - the preset has no other layout
            raise AssertionError(d.layout)


@pytest.mark.parametrize("argv", of("convert"), ids=lambda a: " ".join(a)[:70])
def test_convert_commands_dry_run_on_the_documented_layout(argv, tmp_path, capsys):
    raw = tmp_path / "raw"
    placeholder_tree(raw)
    extra = ["--set", f"raw_root={raw}", "--set", f"out={tmp_path / 'out'}"]
    argv = [a for a in argv if a != "--dry-run"]
    assert main([*argv, *extra, "--dry-run"]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    catalog = next((s.split("=", 1)[1] for s in sets(argv) if s.startswith("catalog=")), "multitalent13")
    n = len(load_catalog(catalog).datasets)
    assert f"{2 * n} cases found in {n} of {n} datasets; 0 problem(s)" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", of("predict") + of("evaluate"), ids=lambda a: " ".join(a)[:70])
def test_predict_and_evaluate_commands_validate(argv):
    """The job each command describes validates (paths, datasets, fold and splits together)."""
    from multitalent.evaluation.cli import load_command_job as evaluate_job
    from multitalent.inference.cli import load_command_job as predict_job

    args = build_parser().parse_args(argv)
    job = predict_job(args) if argv[0] == "predict" else evaluate_job(args)
    if argv[0] == "predict":
        assert job.model and job.out and job.input
        if job.datasets:
            assert set(job.datasets) <= set(load_catalog("multitalent13").dataset_ids)
    else:
        assert job.fold == 0 and job.splits.endswith("splits.json")
