"""Check an unpacked device site without a GPU: imports, a local Ray cluster running a task, MLflow in sqlite.

    PYTHONPATH=/tmp/site:platform python3.12 bench/device_site_check.py

Run by a Python of the archive's version beside the device's other packages (bench/build_device_site.sh
builds for 3.12); modules that need torch are reported, not required, since a CPU torch for that Python
may not be at hand.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time

NEEDED = [
    "ray",
    "ray.train",
    "mlflow",
    "mlflow.tracking",
    "zarr",
    "numcodecs",
    "nibabel",
    "webdataset",
    "pydantic",
    "sqlalchemy",
    "alembic",
    "isal.isal_zlib",
    "braceexpand",
    "yaml",
    "multitalent.catalog",
    "multitalent.shards",
]
WITH_TORCH = ["deepspeed", "dynamic_network_architectures", "ray.train.torch", "multitalent.train.launch"]


def main() -> None:
    for m in NEEDED:
        t = time.perf_counter()
        importlib.import_module(m)
        print(f"import {m}: ok ({time.perf_counter() - t:.1f} s)")
    for m in WITH_TORCH:
        try:
            importlib.import_module(m)
            print(f"import {m}: ok")
        except Exception as e:
            print(f"import {m}: {type(e).__name__}: {str(e)[:100]}")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def double(x: int) -> int:
        return 2 * x

    print("ray task:", ray.get(double.remote(21)))
    ray.shutdown()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    run = client.create_run(client.create_experiment("check"))
    client.log_metric(run.info.run_id, "loss", 1.0, step=0)
    client.set_terminated(run.info.run_id)
    print("mlflow sqlite:", client.get_metric_history(run.info.run_id, "loss")[0].value)
    print("python", sys.version.split()[0])


if __name__ == "__main__":
    main()
