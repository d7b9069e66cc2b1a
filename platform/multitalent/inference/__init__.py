"""Inference: sliding window with mirroring, the way back to the input's geometry, the predictor.

``sliding_window`` and the predictor import torch; the export (:mod:`multitalent.inference.export`)
is numpy only.
"""
