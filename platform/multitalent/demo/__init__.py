"""The README's first command (``multitalent demo``, ``./scripts/demo.sh``): the whole path on the phantom.

phantom collection -> convert every dataset but one -> pre-train (local Ray, 2 workers, DeepSpeed, MLflow
in sqlite) -> publish to the registry with alias ``champion`` -> convert the held-out dataset with the
champion's plan -> fine-tune on it from ``models:/<name>@champion`` -> predict the fold-0 validation cases
of both models as NIfTI -> evaluate (Dice, HD95) -> an overlay PNG; then one table.

:mod:`multitalent.demo.layout` says where everything lives and which cases are held out;
:mod:`multitalent.demo.report` draws the training progress bar, the final table and the overlay;
:mod:`multitalent.demo.cli` runs the stages (it sits with the other commands: it calls them).
"""

DEFAULT_HOLDOUT = "P03"  # the KiTS19-layout kidneys + kidney tumour
ALIAS = "champion"
FOLD = 0  # the held-out cases: this fold's validation split (splits.json of the converted shards)
