"""Experiments that compare training methods on the platform: every number from a platform command.

``multitalent experiment JOB.yaml`` (:mod:`multitalent.experiment.cli`) converts the collection, trains
each arm with ``multitalent train``, predicts the held-out cases with ``multitalent predict`` and scores
them with ``multitalent evaluate``, one subprocess per step, each recorded; a rerun skips finished steps.
:mod:`multitalent.experiment.report` turns the steps' outputs into the comparison tables.
"""

from multitalent.experiment.job import ExperimentJob, load_experiment_job
from multitalent.experiment.plan import Step, plan_steps

__all__ = ["ExperimentJob", "Step", "load_experiment_job", "plan_steps"]
