#!/usr/bin/env bash
# The main job end to end on embedded defaults: the phantom CT collection -> preprocessed shards ->
# a tiny MultiTalent trained on 2 CPU workers (local Ray, DeepSpeed, MLflow in sqlite).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/multitalent convert jobs/convert.yaml "$@"
.venv/bin/multitalent train jobs/demo_cpu.yaml  # ends with the Dice table and the `mlflow ui` command
