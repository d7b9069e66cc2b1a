"""The steps of an experiment, in the order they run, each a ``multitalent`` command (or one of two
internal steps: linking the held-out scans, writing the report).

Folder layout under the job's ``out`` (:class:`Layout`)::

    shards/all, shards/<dataset>     converted collection, and each dataset alone (arm "single")
    inputs/fold<F>/                  links to the raw scans of the fold's validation cases
    inputs/fold<F>-<dataset>/        that dataset's, and the timing cases (arm "single")
    runs/<run>                       training runs (one MLflow store: runs/mlflow.db)
    predictions/<run>, evaluations/<run>
    steps/<step>.json                one record per finished step: command, exit status, times
    logs/<step>.log                  each command's output
    results.json, results.md         the report

Run names: ``s<seed>-multitalent-it<N>``, ``s<seed>-naive_merge-it<N>``, ``s<seed>-single-<dataset>-it<n>``
(``N``/``n``: the run's iterations, so another budget never reuses a run).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from multitalent.experiment.job import ExperimentJob

if TYPE_CHECKING:
    from multitalent.convert.job import ConvertJob

StepKind = Literal["convert", "inputs", "train", "predict", "evaluate", "report"]
OUTPUT_OF_ARM = {"multitalent": "sigmoid_heads", "naive_merge": "merged_softmax", "single": "sigmoid_heads"}


@dataclass(frozen=True)
class Layout:
    out: Path

    def shards(self, part: str = "all") -> Path:
        return self.out / "shards" / part

    def inputs(self, fold: int, dataset: str | None = None) -> Path:
        """Links to the fold's held-out scans: all of them, or ``dataset``'s and the timing cases."""
        return self.out / "inputs" / (f"fold{fold}" if dataset is None else f"fold{fold}-{dataset}")

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def predictions(self, run: str) -> Path:
        return self.out / "predictions" / run

    def evaluations(self, run: str) -> Path:
        return self.out / "evaluations" / run

    def record(self, step: str) -> Path:
        return self.out / "steps" / f"{step}.json"

    def log(self, step: str) -> Path:
        return self.out / "logs" / f"{step}.log"

    @property
    def results_json(self) -> Path:
        return self.out / "results.json"

    @property
    def results_md(self) -> Path:
        return self.out / "results.md"


@dataclass(frozen=True)
class RunSpec:
    """One training run: its arm, seed, label space (``catalog``, ``datasets``) and budget."""

    name: str
    arm: str
    seed: int
    catalog: str
    datasets: tuple[str, ...]
    shards: Path
    epochs: int
    iterations_per_epoch: int
    validate_every: int

    @property
    def output(self) -> str:
        return OUTPUT_OF_ARM[self.arm]

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


@dataclass(frozen=True)
class Step:
    """``argv``: the ``multitalent`` command's arguments (empty for internal steps)."""

    name: str
    kind: StepKind
    argv: tuple[str, ...] = ()
    run: RunSpec | None = None
    requires: tuple[str, ...] = field(default=())  # e.g. the dataset whose held-out cases it scores

    @property
    def command(self) -> str:
        return "multitalent " + shlex.join(self.argv) if self.argv else f"(internal: {self.kind})"


@dataclass(frozen=True)
class ExperimentPlan:
    job: ExperimentJob
    convert: ConvertJob
    layout: Layout
    datasets: tuple[str, ...]  # the collection's datasets, in catalog order
    runs: tuple[RunSpec, ...]
    steps: tuple[Step, ...]

    def runs_of(self, arm: str, seed: int) -> list[RunSpec]:
        return [r for r in self.runs if r.arm == arm and r.seed == seed]


def single_catalog(catalog: str, dataset_id: str) -> str:
    """The catalog spec of one dataset alone (:func:`multitalent.catalog.load_catalog`'s ``SPEC[ID]``)."""
    return f"{catalog}[{dataset_id}]"


def plan_runs(job: ExperimentJob, catalog: str, datasets: Sequence[str], layout: Layout) -> list[RunSpec]:
    b = job.budget
    full = b.epochs()
    single = b.epochs(b.single_fraction(len(datasets)))
    runs: list[RunSpec] = []
    for seed in job.seeds:
        for arm in job.arms:
            if arm == "single":
                for d in datasets:
                    runs.append(
                        RunSpec(
                            f"s{seed}-single-{d}-it{single * b.iterations_per_epoch}",
                            arm,
                            seed,
                            single_catalog(catalog, d),
                            (d,),
                            layout.shards(d),
                            single,
                            b.iterations_per_epoch,
                            single // b.validations,
                        )
                    )
            else:
                runs.append(
                    RunSpec(
                        f"s{seed}-{arm}-it{full * b.iterations_per_epoch}",
                        arm,
                        seed,
                        catalog,
                        tuple(datasets),
                        layout.shards("all"),
                        full,
                        b.iterations_per_epoch,
                        full // b.validations,
                    )
                )
    return runs


def train_argv(job: ExperimentJob, run: RunSpec, layout: Layout) -> tuple[str, ...]:
    sets = [
        *job.train_set,
        f"catalog={run.catalog}",
        f"shards.path={run.shards}",
        f"architecture.output={run.output}",
        f"schedule.epochs={run.epochs}",
        f"schedule.iterations_per_epoch={run.iterations_per_epoch}",
        "schedule.stop_after_iterations=null",
        f"validation.fold={job.evaluation.fold}",
        f"validation.every_epochs={run.validate_every}",
        f"run.storage_path={layout.runs}",
        f"run.name={run.name}",
        f"run.seed={run.seed}",
    ]
    return ("train", job.train, *[a for s in sets for a in ("--set", s)], "--jsonl")


def plan_steps(job: ExperimentJob) -> ExperimentPlan:
    """Every step of ``job`` (loaded by :func:`load_experiment_job`: absolute ``convert``/``train``)."""
    from multitalent.catalog import load_catalog
    from multitalent.convert.job import ConvertJob
    from multitalent.jobs import load_job

    convert = load_job(job.convert, ConvertJob)
    catalog = load_catalog(convert.catalog)
    if convert.datasets:
        catalog = catalog.subset(convert.datasets)
    datasets = catalog.dataset_ids
    layout = Layout(Path(job.out).expanduser().resolve())
    raw_root = str(Path(convert.raw_root).expanduser().resolve())
    steps: list[Step] = [
        Step(
            "convert-all",
            "convert",
            ("convert", job.convert, "--set", f"raw_root={raw_root}", "--set", f"out={layout.shards('all')}"),
        )
    ]
    if "single" in job.arms:
        for d in datasets:
            sets = [f"catalog={single_catalog(convert.catalog, d)}", "datasets=null", f"raw_root={raw_root}"]
            sets.append(f"out={layout.shards(d)}")
            argv = ("convert", job.convert, *[a for s in sets for a in ("--set", s)])
            steps.append(Step(f"convert-{d}", "convert", argv))
    fold = job.evaluation.fold
    steps.append(Step(f"inputs-fold{fold}", "inputs"))
    runs = plan_runs(job, convert.catalog, datasets, layout)
    splits = layout.shards("all") / "splits.json"
    for seed in job.seeds:
        mine = [r for r in runs if r.seed == seed]
        steps += [Step(f"train-{r.name}", "train", train_argv(job, r, layout), r) for r in mine]
        for r in mine:
            source = layout.inputs(fold, r.datasets[0] if r.arm == "single" else None)
            predict = ["predict", "-i", str(source), "-o", str(layout.predictions(r.name))]
            predict += ["--model", str(layout.runs / r.name)]
            predict += [] if job.evaluation.mirror else ["--no-mirror"]
            steps.append(Step(f"predict-{r.name}", "predict", tuple(predict), r))
            evaluate = (
                "evaluate", "--pred", str(layout.predictions(r.name)), "--gt", raw_root,
                "--splits", str(splits), "--fold", str(fold), "--out", str(layout.evaluations(r.name)),
            )  # fmt: skip
            steps.append(Step(f"evaluate-{r.name}", "evaluate", evaluate, r, requires=r.datasets))
    steps.append(Step("report", "report"))
    return ExperimentPlan(job, convert, layout, tuple(datasets), tuple(runs), tuple(steps))
