"""On-disk formats of a converted collection: per-case Zarr v3 stores, WebDataset tar shards (writer
and reader), the manifest, and content digests. The user-facing contract is ``data_shards/README.md``.

Importing this package is cheap: zarr, numcodecs, fsspec and webdataset are imported inside the
functions that need them.
"""

from multitalent.shards._common import FORMAT_VERSION, ShardError, remove_temp_entries
from multitalent.shards.digest import case_digest, file_sha256
from multitalent.shards.manifest import MANIFEST_NAME, Manifest, load_manifest, manifest_dict, write_manifest
from multitalent.shards.wds_reader import (
    CaseArrays,
    decode_wds_sample,
    enable_fsspec_urls,
    expand_shard_urls,
    iter_shard_samples,
    open_shard,
    shard_urls,
)
from multitalent.shards.wds_shards import ShardInfo, write_shards
from multitalent.shards.zarr_store import (
    DEFAULT_LAYOUT,
    CaseLike,
    CaseRecord,
    ZarrCase,
    ZarrLayout,
    check_case_zarr,
    open_case_zarr,
    verify_case_zarr,
    write_case_zarr,
    zarr_case_location,
    zarr_case_path,
)

__all__ = [
    "DEFAULT_LAYOUT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CaseArrays",
    "CaseLike",
    "CaseRecord",
    "Manifest",
    "ShardError",
    "ShardInfo",
    "ZarrCase",
    "ZarrLayout",
    "case_digest",
    "check_case_zarr",
    "decode_wds_sample",
    "enable_fsspec_urls",
    "expand_shard_urls",
    "file_sha256",
    "iter_shard_samples",
    "load_manifest",
    "manifest_dict",
    "open_case_zarr",
    "open_shard",
    "remove_temp_entries",
    "shard_urls",
    "verify_case_zarr",
    "write_case_zarr",
    "write_manifest",
    "write_shards",
    "zarr_case_location",
    "zarr_case_path",
]
