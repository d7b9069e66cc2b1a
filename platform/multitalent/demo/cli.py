"""``multitalent demo``: the whole path on the phantom collection, stage by stage (``./scripts/demo.sh``).

Stages (one local Ray for all of them; every stage resumes on a rerun):

1. phantom: write the phantom collection (``data_shards/raw/phantom``) unless it is there;
2. convert: every dataset but ``--holdout`` into Zarr + WebDataset shards with its own plan;
3. pre-train: ``jobs/demo_cpu.yaml`` (2 Ray Train workers, DeepSpeed, MLflow sqlite) on them;
4. publish: the run's newest verified checkpoint as ``models:/phantom-without-<holdout>@champion``;
5. convert held-out: the held-out dataset with the champion's plan;
6. fine-tune: ``jobs/demo_finetune_cpu.yaml``, ``init.model`` = the champion URI (backbone transfer);
7. predict: fold 0's validation cases, the pre-trained model (from the registry) on its datasets' and
   the fine-tuned run on the held-out dataset's, as NIfTI label maps (``multitalent predict``);
8. evaluate: Dice and HD95 of both (``multitalent evaluate``, logged to each model's MLflow run);
9. overlay: a PNG of one fine-tuned prediction with its ground truth.

Then the table of both evaluations, the registry URI, the output folder and the ``mlflow ui`` command.
Each stage prints a line when it starts and one when it ends; the training stages draw a progress bar.
The commands' own output goes to ``runs/demo/logs/<n>-<stage>.log``; a failing stage is named, with its
log and what to do. Exit status: 0 done, 1 a stage failed, 2 a mistake in the arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from multitalent.demo import ALIAS, DEFAULT_HOLDOUT, FOLD

if TYPE_CHECKING:
    from multitalent.demo.layout import DemoLayout

REPO_JOBS = Path(__file__).resolve().parents[3] / "jobs"
PRETRAIN_JOB = "demo_cpu.yaml"
FINETUNE_JOB = "demo_finetune_cpu.yaml"

# key, title, what to do when it fails (besides reading its log)
STAGES: tuple[tuple[str, str, str], ...] = (
    ("phantom", "phantom collection", "check that the working directory is writable and has ~100 MB free"),
    ("convert", "convert", "see report.json in the shards folder; fix or delete the named files, then rerun"),
    (
        "pretrain",
        "pre-train",
        "rerun to resume from the last checkpoint; `--pretrain-set KEY=VALUE` changes the job "
        f"(jobs/{PRETRAIN_JOB})",
    ),
    ("publish", "publish", "check the MLflow store (runs/mlflow.db) is writable; rerun to publish again"),
    ("convert-heldout", "convert held-out", "see report.json in the held-out shards folder; rerun"),
    (
        "finetune",
        "fine-tune",
        "rerun to resume from the last checkpoint; `--finetune-set KEY=VALUE` changes the job "
        f"(jobs/{FINETUNE_JOB})",
    ),
    ("predict", "predict", "see predictions.json in the prediction folder; rerun to predict the rest"),
    ("evaluate", "evaluate", "the log names the case and the reason; rerun after fixing it"),
    ("overlay", "overlay", "rerun; the predictions and tables are already written"),
)


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        default=".",
        help="where data_shards/ and runs/ are (default: the current directory)",
    )
    p.add_argument(
        "--holdout",
        default=DEFAULT_HOLDOUT,
        help="phantom dataset held out of pre-training and fine-tuned on (default: %(default)s)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="phantom collection size factor (default 1: 48 cases); others get their own folders",
    )
    p.add_argument(
        "--jobs", default=str(REPO_JOBS), help="folder of the two job files (default: %(default)s)"
    )
    p.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field of jobs/{PRETRAIN_JOB} (repeatable), e.g. schedule.epochs=4",
    )
    p.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field of jobs/{FINETUNE_JOB} (repeatable)",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="predict with 8-way mirroring (nnU-Net's test-time augmentation; ~8x the predict time)",
    )


class StageFailed(Exception):
    def __init__(self, number: int, title: str, reason: str, hint: str, log: Path | None) -> None:
        super().__init__(reason)
        self.number, self.title, self.reason, self.hint, self.log = number, title, reason, hint, log


@dataclass
class StageReport:
    """What a stage tells the console when it ends (``summary``) and the final report (``facts``)."""

    summary: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _relative(path: Path | str) -> str:
    """``path`` relative to the current directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(p)


def _store(tracking_uri: str) -> str:
    """A sqlite store's URI with its path relative to the current directory when it lies below it."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{_relative(tracking_uri.removeprefix('sqlite:///'))}"
    return tracking_uri


def _mlflow_command(tracking_uri: str) -> str:
    mlflow = Path(sys.executable).with_name("mlflow")
    exe = "mlflow" if shutil.which("mlflow") == str(mlflow) else _relative(mlflow)
    return f"{exe} ui --backend-store-uri {_store(tracking_uri)}"


class Demo:
    def __init__(self, layout: DemoLayout, args: argparse.Namespace, console: IO[str]) -> None:
        from multitalent.demo.layout import demo_catalogs

        self.layout, self.args, self.console = layout, args, console
        self.jobs = Path(args.jobs)
        for name in (PRETRAIN_JOB, FINETUNE_JOB, "convert.yaml"):
            if not (self.jobs / name).is_file():
                from multitalent.jobs import UserError

                raise UserError(
                    f"{self.jobs / name}: missing (pass --jobs with the repository's jobs folder)"
                )
        self.pretrain_catalog, self.target_catalog = demo_catalogs(layout.holdout, scale=layout.scale)
        # Both jobs are read now: a mistake in them (or in --pretrain-set / --finetune-set) stops the demo
        # before anything runs.
        self.train_jobs = {key: self.train_job(key) for key in ("pretrain", "finetune")}
        self.facts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.exits = contextlib.ExitStack()
        self.ray_started = False

    # ------------------------------------------------------------------------------------ plumbing
    def say(self, text: str) -> None:
        print(text, file=self.console, flush=True)

    @contextlib.contextmanager
    def stage(self, key: str, doing: str, *, bars: bool = False) -> Iterator[StageReport]:
        """Run a stage: a start line, its commands' output into its log (stderr too unless ``bars``: the
        converter's and predictor's progress bars), then an end line with ``StageReport.summary``; any
        exception becomes a :class:`StageFailed` naming the stage, its log and what to do."""
        number = next(i for i, s in enumerate(STAGES, start=1) if s[0] == key)
        _, title, hint = STAGES[number - 1]
        logs = self.layout.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{number}-{key}.log"
        head = f"[{number}/{len(STAGES)}] {title}"
        self.say(f"{head}: {doing}")
        report = StageReport()
        t = time.monotonic()
        with contextlib.ExitStack() as into_log:
            log = into_log.enter_context(open(log_path, "a"))
            into_log.enter_context(contextlib.redirect_stdout(log))
            if not bars:
                into_log.enter_context(contextlib.redirect_stderr(log))
            print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}: {doing}", flush=True)
            try:
                yield report
            except StageFailed as e:
                print(f"FAILED: {e.reason}", flush=True)
                raise
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                self.say(f"\ninterrupted in {head}; the same command resumes from there")
                raise
            except Exception as e:
                import traceback

                from multitalent.cli import is_user_error

                traceback.print_exc(file=log)
                reason = str(e) if is_user_error(e) else f"{type(e).__name__}: {e}"
                lines = reason.strip().splitlines() or [type(e).__name__]
                if len(lines) > 3:  # e.g. Ray's out-of-memory report: the whole text is in the log
                    lines = [*lines[:3], f"... ({len(lines) - 3} more lines in the log)"]
                raise StageFailed(number, title, "\n  ".join(lines), hint, log_path) from e
        self.seconds[key] = time.monotonic() - t
        self.facts[key] = report.facts
        self.say(f"      done in {_duration(self.seconds[key])}: {report.summary}")

    def fail(self, key: str, reason: str) -> StageFailed:
        number = next(i for i, s in enumerate(STAGES, start=1) if s[0] == key)
        _, title, hint = STAGES[number - 1]
        return StageFailed(number, title, reason, hint, self.layout.out / "logs" / f"{number}-{key}.log")

    def command(self, argv: list[str]) -> int:
        """Run ``multitalent ARGV`` in this process (its output into the stage's log)."""
        from multitalent.cli import main

        print(f"$ multitalent {' '.join(argv)}", flush=True)
        return main(argv)

    # -------------------------------------------------------------------------------------- stages
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        load_start = os.getloadavg()
        lay = self.layout
        held = lay.holdout
        rest = " ".join(self.pretrain_catalog.dataset_ids)
        self.say(
            f"MultiTalent demo: pre-train a tiny U-Net on the phantom datasets {rest}, publish it, "
            f"fine-tune it on the held-out {held}, predict and evaluate held-out cases (fold {FOLD}). Logs: "
            f"{_relative(lay.out / 'logs')}"
        )
        with self.exits:
            self.phantom()
            self.convert_pretrain()
            pretrain = self.train("pretrain")
            version = self.publish(pretrain)
            self.convert_target(version)
            finetune = self.train("finetune", version=version)
            self.predict(finetune)
            results = self.evaluate(pretrain, finetune)
            self.overlay()
        total = time.monotonic() - t0
        return self.final_report(results, version, pretrain, finetune, total, load_start)

    def phantom(self) -> None:
        from multitalent.demo.layout import write_phantom

        raw = self.layout.raw
        with self.stage("phantom", f"synthetic CT collection in {_relative(raw)}") as r:
            if raw.exists():
                r.summary = f"already there ({_relative(raw)})"
            else:
                n = write_phantom(raw, seed=0, scale=self.layout.scale)
                r.summary = f"{n} cases in 7 datasets, 5 raw layouts, written to {_relative(raw)}"
            r.facts = {"raw": str(raw)}

    def _convert(self, key: str, catalog: Any, catalog_file: Path, out: Path, plan: str | None) -> None:
        from multitalent.convert.job import ConvertJob
        from multitalent.convert.pipeline import run_conversion
        from multitalent.demo.layout import write_catalog
        from multitalent.jobs import load_job
        from multitalent.raycluster import ray_session

        lay = self.layout
        write_catalog(catalog, catalog_file)
        overrides = [f"raw_root={lay.raw}", f"out={out}", f"catalog={catalog_file}", "synth=null"]
        if plan is not None:
            overrides += [f"plan={plan}", f"tracking_uri={lay.tracking_uri}"]
        job = load_job(self.jobs / "convert.yaml", ConvertJob, overrides)
        if not self.ray_started:  # one local Ray for every stage, stopped when the demo ends
            self.exits.enter_context(ray_session())
            self.ray_started = True
        summary = run_conversion(job, log=lambda line: print(line, flush=True))
        if not summary.ok:
            reasons = [f"{f['dataset_id']}/{f['case_id']}: {f['reason']}" for f in summary.failures[:3]]
            raise self.fail(key, f"{len(summary.failures)} case(s) failed ({'; '.join(reasons)})")

    def convert_pretrain(self) -> None:
        lay, cat = self.layout, self.pretrain_catalog
        with self.stage(
            "convert", f"{len(cat.datasets)} datasets into Zarr + WebDataset shards", bars=True
        ) as r:
            self._convert("convert", cat, lay.pretrain_catalog_file, lay.pretrain_shards, plan=None)
            n = _manifest_cases(lay.pretrain_shards)
            r.summary = f"{n} cases, plan and splits in {_relative(lay.pretrain_shards)}"

    def convert_target(self, version: str) -> None:
        lay, cat = self.layout, self.target_catalog
        pinned = f"models:/{lay.model_name}/{version}"
        with self.stage("convert-heldout", f"{lay.holdout} with the plan of {pinned}", bars=True) as r:
            self._convert("convert-heldout", cat, lay.target_catalog_file, lay.target_shards, plan=pinned)
            n = _manifest_cases(lay.target_shards)
            r.summary = f"{n} cases in {_relative(lay.target_shards)}"

    def train_job(self, key: str) -> Any:
        """The pre-training or fine-tuning job: the job file, the demo's paths, then ``--*-set``."""
        from multitalent.train.job import load_train_job

        lay = self.layout
        if key == "pretrain":
            job_file, extra = self.jobs / PRETRAIN_JOB, list(self.args.pretrain_set)
            overrides = [
                f"catalog={lay.pretrain_catalog_file}",
                f"shards.path={lay.pretrain_shards}",
                f"run.name={lay.pretrain_run}",
            ]
        else:
            job_file, extra = self.jobs / FINETUNE_JOB, list(self.args.finetune_set)
            overrides = [
                f"catalog={lay.target_catalog_file}",
                f"shards.path={lay.target_shards}",
                f"run.name={lay.finetune_run}",
                f"init.model={lay.champion}",
            ]
        return load_train_job(job_file, [*overrides, f"run.storage_path={lay.runs}", *extra])

    def train(self, key: str, *, version: str | None = None) -> Any:
        """Train (or find finished) the pre-training or fine-tuning run; returns its RunCheckpoint."""
        from multitalent.demo.report import TrainingBar
        from multitalent.train.launch import run_training
        from multitalent.train.publish import find_checkpoint

        lay = self.layout
        job = self.train_jobs[key]
        total = job.schedule.total_iterations
        w = job.workers
        doing = (
            f"{total} iterations of the {job.architecture.size} {job.architecture.arch} "
            f"({job.schedule.epochs} epochs x {job.schedule.iterations_per_epoch}, global batch "
            f"{job.batch.global_size}) on {w.num_workers} Ray Train workers, DeepSpeed ZeRO-{job.zero_stage}"
        )
        if key == "finetune":
            doing += f", from {lay.champion} (backbone; heads, warm-up, poly)"
        with self.stage(key, doing, bars=True) as r:
            if key == "finetune":
                _check_parent(job, f"{lay.model_name}/{version}")
            _check_same_job(job, lay.out / f"{job.run.name}.job.json")
            ckpt = _finished(job)
            if ckpt is not None:
                r.summary = f"already trained ({ckpt.iteration} iterations) in {_relative(job.run_dir)}"
            else:
                label = "pre-train" if key == "pretrain" else "fine-tune"
                with TrainingBar(label, stream=self.console) as bar:
                    result = run_training(job, on_progress=bar)
                ckpt = find_checkpoint(job.run_dir)
                dice = result.validation.get("val/dice_mean/class")
                shown = f"validation Dice {dice:.3f} (mean of classes), " if dice is not None else ""
                r.summary = f"{result.iterations} iterations, {shown}run {_relative(job.run_dir)}"
            r.facts = {
                "run_dir": str(job.run_dir),
                "iterations": ckpt.iteration,
                "mlflow_run_id": ckpt.mlflow_run_id,
                "checkpoint": str(ckpt.folder),
                "catalog_file": job.catalog,
            }
        return ckpt

    def publish(self, pretrain: Any) -> str:
        from multitalent.demo.layout import write_json_atomic
        from multitalent.registry.store import ModelRef, RegistryError, resolve
        from multitalent.train.publish import publish_run

        lay = self.layout
        state_file = lay.out / "published.json"
        with self.stage("publish", f"{_relative(pretrain.folder)} to the registry as {lay.champion}") as r:
            previous = _read_json(state_file)
            version = None
            if previous and previous.get("checkpoint") == str(pretrain.folder):
                try:
                    now = resolve(ModelRef.parse(lay.champion), tracking_uri=lay.tracking_uri).version
                except RegistryError:
                    now = None
                if now == previous.get("version"):
                    version = now
                    r.summary = f"already published: {lay.champion} = models:/{lay.model_name}/{version}"
            if version is None:
                done = publish_run(
                    pretrain.folder.parent, name=lay.model_name, alias=ALIAS, tracking_uri=lay.tracking_uri
                )
                version = done.version
                write_json_atomic(
                    state_file,
                    {
                        "checkpoint": str(pretrain.folder),
                        "version": version,
                        "uri": done.uri,
                        "digest": done.digest,
                    },
                )
                r.summary = f"{lay.champion} = {done.uri} (package sha256 {done.digest[:12]})"
            r.facts = {"version": version, "uri": f"models:/{lay.model_name}/{version}"}
        return version

    def predict(self, finetune: Any) -> None:
        from multitalent.demo.layout import heldout_cases, link_inputs

        lay = self.layout
        mirror = [] if self.args.mirror else ["--no-mirror"]
        with self.stage(
            "predict",
            f"fold {FOLD}'s validation cases as NIfTI label maps, by {lay.champion} (its datasets) and by "
            f"the fine-tuned run ({lay.holdout})" + ("" if self.args.mirror else ", no mirroring"),
            bars=True,
        ) as r:
            pre_cases = heldout_cases(lay.pretrain_shards, self.pretrain_catalog, lay.raw)
            tgt_cases = heldout_cases(lay.target_shards, self.target_catalog, lay.raw)
            if not pre_cases or not tgt_cases:
                which = "the pre-training datasets" if not pre_cases else lay.holdout
                raise self.fail("predict", f"fold {FOLD} has no validation case of {which} (too few cases)")
            jobs = (
                ("pretrained", pre_cases, lay.champion),
                ("finetuned", tgt_cases, str(finetune.folder.parent)),
            )
            for name, cases, model in jobs:
                inputs = link_inputs(cases, lay.out / "inputs" / name)
                argv = ["predict", "-i", str(inputs), "-o", str(lay.out / name), "--model", model]
                with _environment(MLFLOW_TRACKING_URI=lay.tracking_uri):
                    status = self.command([*argv, *mirror, "--overwrite"])
                if status != 0:
                    raise self.fail("predict", f"multitalent predict ({name}) exited with status {status}")
            r.summary = (
                f"{len(pre_cases)} + {len(tgt_cases)} cases, label maps in "
                f"{_relative(lay.out / 'pretrained')}, {_relative(lay.out / 'finetuned')}"
            )
            r.facts = {
                "pretrained_cases": [f"{c.dataset_id}/{c.case_id}" for c in pre_cases],
                "finetuned_cases": [f"{c.dataset_id}/{c.case_id}" for c in tgt_cases],
            }

    def evaluate(self, pretrain: Any, finetune: Any) -> list[Any]:
        import json

        from multitalent.demo.report import ModelResult

        lay = self.layout
        results = []
        with self.stage(
            "evaluate", "Dice and HD95 against the raw ground truth, logged to both MLflow runs"
        ) as r:
            for name, label, ckpt, catalog_file, shards in (
                ("pretrained", "pre-trained", pretrain, lay.pretrain_catalog_file, lay.pretrain_shards),
                ("finetuned", "fine-tuned", finetune, lay.target_catalog_file, lay.target_shards),
            ):
                argv = [
                    "evaluate",
                    "--pred", str(lay.out / name),
                    "--gt", str(lay.raw),
                    "--catalog", str(catalog_file),
                    "--splits", str(shards / "splits.json"),
                    "--fold", str(FOLD),
                ]  # fmt: skip
                if ckpt.mlflow_run_id:
                    argv += ["--mlflow", ckpt.mlflow_run_id, "--tracking-uri", lay.tracking_uri]
                status = self.command(argv)
                if status != 0:
                    raise self.fail("evaluate", f"multitalent evaluate ({name}) exited with status {status}")
                summary = json.loads((lay.out / name / "evaluation.json").read_text())["summary"]
                results.append(ModelResult(label, summary))
            means = ", ".join(f"{m.label} {m.summary['class_average']['dice']:.3f}" for m in results)
            r.summary = f"class-average Dice {means}; tables in {_relative(lay.out)}/*/evaluation.md"
        return results

    def overlay(self) -> None:
        from multitalent.demo.layout import heldout_cases
        from multitalent.demo.report import write_overlay
        from multitalent.rawio.naming import case_name

        lay = self.layout
        out = lay.out / "overlay.png"
        with self.stage("overlay", f"one {lay.holdout} case, fine-tuned prediction over ground truth") as r:
            case = heldout_cases(lay.target_shards, self.target_catalog, lay.raw)[0]
            write_overlay(
                raw_case=case,
                dataset_id=lay.holdout,
                catalog=self.target_catalog,
                prediction=lay.out / "finetuned" / case_name(case.image_path) / f"{lay.holdout}.nii.gz",
                out=out,
                title=f"{lay.holdout} {case.case_id}, fine-tuned",
            )
            r.summary = f"{_relative(out)} ({lay.holdout} {case.case_id})"
            r.facts = {"png": str(out), "case": f"{lay.holdout}/{case.case_id}"}

    # -------------------------------------------------------------------------------------- report
    def final_report(
        self,
        results: list[Any],
        version: str,
        pretrain: Any,
        finetune: Any,
        total: float,
        load_start: tuple[float, float, float],
    ) -> dict[str, Any]:
        from multitalent.demo.layout import write_json_atomic
        from multitalent.demo.report import results_table

        lay = self.layout
        pre_ids = " ".join(self.pretrain_catalog.dataset_ids)
        table = results_table(results, [self.pretrain_catalog, self.target_catalog])
        unscored = [
            d
            for d in self.pretrain_catalog.dataset_ids
            if not any(k.startswith(f"{d}:") for k in results[0].summary.get("per_class", {}))
        ]
        notes = [
            f"pre-trained: {pretrain.iteration} iterations on {pre_ids}; scored on their fold-{FOLD} "
            f"validation cases"
            + (f" ({', '.join(unscored)}: too few cases to hold any out)" if unscored else ""),
            f"fine-tuned: {finetune.iteration} iterations on {lay.holdout} from {lay.champion} "
            f"(= models:/{lay.model_name}/{version}); scored on {lay.holdout}'s fold-{FOLD} validation cases",
        ]
        load_end = os.getloadavg()
        footer = [
            f"registry: {lay.champion} = models:/{lay.model_name}/{version} in {_store(lay.tracking_uri)}",
            f"output:   {_relative(lay.out)} (predictions, evaluation.md/csv per model, overlay.png, "
            "results.md, logs/)",
            f"MLflow:   {_mlflow_command(lay.tracking_uri)}   (then http://127.0.0.1:5000)",
            f"time:     {_duration(total)} (load average {load_start[0]:.1f} at the start, "
            f"{load_end[0]:.1f} at the end, {os.cpu_count()} CPUs)",
        ]
        lines = ["", "Held-out evaluation: Dice, HD95 (mm) per dataset and class", "", *table, "", *notes, ""]
        lines += footer
        self.say("\n".join(lines))
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "holdout": lay.holdout,
            "registry": {"uri": lay.champion, "version": version, "tracking_uri": lay.tracking_uri},
            "output": str(lay.out),
            "seconds": {"total": round(total, 1), **{k: round(v, 1) for k, v in self.seconds.items()}},
            "load_average": {"start": load_start, "end": load_end},
            "stages": self.facts,
            "evaluation": {m.label: m.summary for m in results},
        }
        write_json_atomic(lay.out / "results.json", report)
        md = ["# MultiTalent demo", "", "```", *lines[1:], "```", ""]
        (lay.out / ".tmp-results.md").write_text("\n".join(md))
        (lay.out / ".tmp-results.md").replace(lay.out / "results.md")
        return report


# ------------------------------------------------------------------------------------------- helpers
def _duration(seconds: float) -> str:
    from multitalent.train.progress import duration

    return duration(seconds)


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _manifest_cases(shards: Path) -> int:
    data = _read_json(shards / "manifest.json")
    return len(data.get("cases", [])) if isinstance(data, dict) else 0


def _finished(job: Any) -> Any:
    """The run's newest verified checkpoint when it has done every iteration of the job, else None."""
    from multitalent.train.publish import find_checkpoint

    try:
        ckpt = find_checkpoint(job.run_dir)
    except FileNotFoundError:
        return None
    return ckpt if ckpt.iteration >= job.schedule.total_iterations else None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def _check_same_job(job: Any, stamp: Path) -> None:
    """A run the demo started with another job (a changed job file or ``--*-set``) is not resumed or
    reused silently: the message names the fields that differ. Records the job for the next time."""
    from multitalent.demo.layout import write_json_atomic
    from multitalent.jobs import UserError
    from multitalent.train.checkpoint import run_checkpoints

    current = job.model_dump(mode="json")
    previous = _read_json(stamp)
    if isinstance(previous, dict) and previous != current and run_checkpoints(job.run_dir):
        old, new = _flat(previous), _flat(current)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise UserError(
            f"{job.run_dir} was trained by the demo with another job (changed: {', '.join(changed[:6])}); "
            "delete that folder to train it again with this job, or undo the change"
        )
    write_json_atomic(stamp, current)


def _check_parent(job: Any, champion: str) -> None:
    """A fine-tuning run that started from another model version than the champion cannot resume."""
    from multitalent.jobs import UserError
    from multitalent.train.publish import find_checkpoint

    try:
        parent = find_checkpoint(job.run_dir).info.get("parent")
    except FileNotFoundError:
        return
    if parent not in (None, champion):
        raise UserError(
            f"{job.run_dir} was fine-tuned from {parent}, but the champion is now {champion}: delete that "
            "folder to fine-tune the new champion"
        )


def run(args: argparse.Namespace) -> int:
    from multitalent.demo.layout import DemoLayout

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the registry downloads
    layout = DemoLayout(workdir=Path(args.workdir).resolve(), holdout=args.holdout, scale=args.scale)
    console = sys.stdout
    try:
        Demo(layout, args, console).run()
    except StageFailed as e:
        print(f"\nerror: stage {e.number}/{len(STAGES)} ({e.title}) failed: {e.reason}", file=sys.stderr)
        if e.log is not None:
            print(f"  its log: {_relative(e.log)}", file=sys.stderr)
        print(f"  what to do: {e.hint}", file=sys.stderr)
        print("  a rerun of the same command resumes: finished stages are not redone", file=sys.stderr)
        return 1
    return 0
