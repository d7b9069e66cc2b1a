#!/usr/bin/env bash
# The whole path on embedded defaults (`multitalent demo`, platform/multitalent/demo/cli.py): the phantom CT
# collection -> shards -> pre-train a tiny MultiTalent on all phantom datasets but P03 (local Ray, 2 workers,
# DeepSpeed, MLflow in sqlite) -> publish it as models:/phantom-without-P03@champion -> fine-tune on P03 from
# that URI -> predict held-out cases as NIfTI -> evaluate; ends with the Dice/HD95 table. Arguments go to
# `multitalent demo` (e.g. --holdout P05); a rerun resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/multitalent demo "$@"
