"""The synthetic phantom CT collection (catalog preset ``phantom``) and test-data writers.

No real CT can be downloaded here, so the phantom is the demo and test data: one world-space
anatomy, imaged by several datasets in every raw layout with their own spacings, orientations,
intensity offsets, sizes and annotation protocols.
"""

from multitalent.synth.bad_cases import FAULTS, WARNING_FAULTS, write_bad_cases
from multitalent.synth.collection import SCANS, make_case, write_phantom_collection
from multitalent.synth.writer import write_case, write_nifti

__all__ = [
    "FAULTS",
    "SCANS",
    "WARNING_FAULTS",
    "make_case",
    "write_bad_cases",
    "write_case",
    "write_nifti",
    "write_phantom_collection",
]
