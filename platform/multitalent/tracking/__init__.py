"""Experiment tracking on MLflow (rank 0 only) and the pictures logged with it.

``Tracker`` (``tracker.py``) is what training holds: an ``MlflowRun`` (``run.py``: open or resume,
params, tags, metrics, artifacts, end) whose sends wait in an ``Outbox`` (``outbox.py``: buffering,
back-off, spill while the store is down), plus the domain loggers (``loggers.py``: job, label
space, plan, images, curves). ``pictures.py`` draws the overlays and curves.

Importing this package is cheap: mlflow, Pillow and matplotlib load on first use.
"""

from multitalent.tracking.outbox import FlushPolicy, TrackingWarning
from multitalent.tracking.pictures import curves_png, overlay_png
from multitalent.tracking.tracker import Tracker

__all__ = ["FlushPolicy", "Tracker", "TrackingWarning", "curves_png", "overlay_png"]
