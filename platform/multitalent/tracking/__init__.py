"""Experiment tracking on MLflow (rank 0 only) and the pictures logged with it.

Importing this package is cheap: mlflow, Pillow and matplotlib load on first use.
"""

from multitalent.tracking.pictures import curves_png, overlay_png
from multitalent.tracking.tracker import FlushPolicy, Tracker, TrackingWarning

__all__ = ["FlushPolicy", "Tracker", "TrackingWarning", "curves_png", "overlay_png"]
