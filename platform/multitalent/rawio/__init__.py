"""Raw dataset layouts (MSD / nnU-Net v1, nnU-Net v2, KiTS19, BTCV, TotalSegmentator) and validated loading.

Everything goes through nibabel. ``discover_cases`` lists what is on disk without opening image data;
``load_case`` reads one case eagerly and raises :class:`CaseError` naming the file and the reason for
anything the converter must not ingest.
"""

from multitalent.rawio.cases import CaseError, LoadedCase, RawCase
from multitalent.rawio.layouts import (
    discover_cases,
    expected_label_path,
    read_dataset_json,
    read_totalseg_meta,
)
from multitalent.rawio.load import load_case
from multitalent.rawio.nifti import read_volume

__all__ = [
    "CaseError",
    "LoadedCase",
    "RawCase",
    "discover_cases",
    "expected_label_path",
    "load_case",
    "read_dataset_json",
    "read_totalseg_meta",
    "read_volume",
]
