"""Issue 15's data checks: are the phantom's left/right labels where they should be, and what does a
run predict for them?

1. ``phantom``: per P04/P05 case of the converted collection, each paired label's voxel count and
   mean x (RAS+ voxel axes: low x = the patient's left), its mean HU, and, from the generator, the
   share of each kidney label that is kidney tumour (the BTCV-like protocol labels tumour as kidney).
2. ``patches``: the validation patches of the fold (as :class:`Validator` draws them) and how many
   sampled training patches of P04 contain each kidney.
3. ``batches`` (``--iterations N``): the training batches exactly as a run gets them (the rank's
   source of :func:`multitalent.train.components.assemble`, augmented with the step's generator),
   per laterality mode: how many samples of each paired dataset hold the left label, the right
   label, both, and, of those with both, in how many the left label lies at lower x (the patient's
   left) than the right label. ``swap`` and ``off`` must keep it there in every sample (up to
   rotations of small structures); ``naive`` flips it in the x-mirrored half.
4. ``--run NAME``: the run's last checkpoint on those validation patches: target and predicted voxels,
   true positives, predicted voxels on the other side's target (left/right confused) and the highest
   probability inside the target, per paired class; then the Dice over the patches.

    .venv/bin/python bench/laterality_checks.py                       # 1, 2 and 3
    .venv/bin/python bench/laterality_checks.py --iterations 0 --run NAME --set run.storage_path=...
    .venv/bin/python bench/laterality_checks.py --set catalog=/abs/catalog.json --set shards.path=DIR

Pass the run's own settings with ``--set`` (catalog, shards.path, validation.patches_per_case,
run.seed) so that section 4 scores the run's validation patches.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAIRED = ("P04", "P05")
# P04's kidney labels include the kidney tumour (BTCV-like protocol): kidney ~200 HU, tumour ~90 HU
# (synth.anatomy: 180 and 70 HU, noise sd 14, P04's offset +20); the midpoint splits them.
KIDNEY_TUMOUR_BELOW_HU = 145


def phantom(setup) -> None:
    import zarr

    from multitalent.synth.anatomy import FOV_MM, Tissue, render_tissues, sample_anatomy
    from multitalent.synth.collection import SCANS, phantom_catalog
    from multitalent.synth.geometry import grid_affine

    cat = setup.catalog
    val_keys = {(v.dataset_id, v.case_id) for v in setup.val_cases}
    print("1. labels of the paired datasets (x: mean voxel x, low = patient's left; HU: mean image HU)")
    for ref in sorted(
        list(setup.train_cases) + list(setup.val_cases), key=lambda c: (c.dataset_id, c.case_id)
    ):
        if ref.dataset_id not in PAIRED:
            continue
        g = zarr.open_group(str(setup.root / "zarr" / ref.dataset_id / f"{ref.case_id}.zarr"), mode="r")
        label, image = np.asarray(g["label"]), np.asarray(g["image"]).astype(np.float64)
        d = cat.dataset(ref.dataset_id)
        split = "val" if (ref.dataset_id, ref.case_id) in val_keys else "train"
        parts = []
        for left, right in d.lateral_pairs:
            for name in (left, right):
                (value,) = next(c.raw_values for c in d.classes if c.name == name)
                where = np.argwhere(label == value)
                parts.append(
                    f"{name} n={len(where)} x={where[:, 2].mean():.0f} HU={image[label == value].mean():.0f}"
                )
        print(f"  {ref.dataset_id} {ref.case_id:11s} {split:5s} " + " | ".join(parts))
    # The grid and anatomy draws of synth.collection.make_case, to see tissues behind the labels.
    print("   kidney tumour share of each P04 kidney label (generator, seed 0):")
    # The generator seeds each case with the dataset's index in the phantom preset (not in a subset
    # catalog made from it).
    scan, index = SCANS["P04"], phantom_catalog().dataset_index("P04")
    for i in range(cat.dataset("P04").num_cases):
        anatomy_seq, grid_seq, _ = np.random.SeedSequence([0, index, i]).spawn(3)
        anatomy = sample_anatomy(np.random.default_rng(anatomy_seq), force_tumours=i == 0)
        rng = np.random.default_rng(grid_seq)
        spacing = round(float(rng.uniform(*scan.spacing_xy_mm)), 2)
        jx, jy = rng.uniform(-3.0, 3.0, 2)
        lo, hi = rng.uniform(0.0, 6.0, 2)
        shape, affine = grid_affine(
            axcodes=scan.axcodes,
            spacing_xyz_mm=(spacing, spacing, scan.spacing_z_mm),
            lo_xyz_mm=(FOV_MM["x"][0] + jx, FOV_MM["y"][0] + jy, FOV_MM["z"][0] + lo),
            hi_xyz_mm=(FOV_MM["x"][1] + jx, FOV_MM["y"][1] + jy, FOV_MM["z"][1] - hi),
        )
        t = render_tissues(anatomy, shape, affine)
        shares = []
        for side, kidney, tumour in (
            ("left", Tissue.KIDNEY_LEFT, Tissue.KIDNEY_TUMOUR_LEFT),
            ("right", Tissue.KIDNEY_RIGHT, Tissue.KIDNEY_TUMOUR_RIGHT),
        ):
            k, u = int((t == kidney).sum()), int((t == tumour).sum())
            shares.append(f"{side} {u / (k + u):.0%}")
        print(f"  P04 {i + 1:04d}  tumour share: " + ", ".join(shares))


def patches(job, setup, plan) -> None:
    from multitalent.train.components import zarr_source
    from multitalent.train.validation import Validator

    print("2. validation patches (voxels of each raw value) and P04 training patches")
    src = zarr_source(
        job, setup, cases=setup.val_cases, patch_zyx=plan.patch_zyx, batch_size=1, rank=0, world_size=1
    )
    val = Validator(
        src,
        seed=job.run.seed,
        patches_per_case=job.validation.patches_per_case,
        rank=0,
        world_size=1,
        batch_size=1,
        overlays=False,
    )
    for it in val.items:
        ds, case = src.refs[it.case_index]
        if ds in PAIRED:
            lab = np.asarray(src.read_sample(it.case_index, it.center_zyx).label_zyx)
            counts = {int(v): int((lab == v).sum()) for v in np.unique(lab) if v}
            print(f"  {ds} {case:11s} centre {it.center_zyx}: {counts}")
    train = zarr_source(
        job, setup, cases=setup.train_cases, patch_zyx=plan.patch_zyx, batch_size=2, rank=0, world_size=1
    )
    seen, n = Counter(), 0
    for epoch in range(100):
        train.set_epoch(epoch)
        stream = train.samples(worker=0, num_workers=1)
        for _ in range(train.batch_size):
            s = next(stream)
            if s.key.startswith("P04"):
                lab = np.asarray(s.label_zyx)
                n += 1
                seen.update(v for v in (2, 3) if (lab == v).any())
    print(
        f"  P04: {n} of {100 * train.batch_size} training patches; "
        f"right kidney in {seen[2]}, left kidney in {seen[3]}"
    )


def batches(job, iterations: int) -> None:
    """Section 3: left/right labels in the real, augmented training batches of each mode."""
    from multitalent.train.batches import step_generator
    from multitalent.train.components import assemble

    print(f"3. augmented training batches ({iterations} iterations x {job.workers.num_workers} ranks)")
    for mode in ("swap", "off", "naive"):
        mjob = job.model_copy(
            update={
                "data": job.data.model_copy(
                    update={"augmentation": job.data.augmentation.model_copy(update={"laterality": mode})}
                )
            }
        )
        counts: dict[str, Counter[str]] = {ds: Counter() for ds in PAIRED}
        for rank in range(job.workers.num_workers):
            parts = assemble(mjob, rank=rank)
            cat = parts.catalog
            values = {}
            for ds in PAIRED:
                d = cat.dataset(ds)
                ((left, right),) = d.lateral_pairs
                (lv,) = next(c.raw_values for c in d.classes if c.name == left)
                (rv,) = next(c.raw_values for c in d.classes if c.name == right)
                values[ds] = (cat.dataset_index(ds), lv, rv)
            for i, batch in parts.batches(0, iterations, loader_workers=0):
                if not parts.augment.in_loader:
                    batch = parts.augment.apply(batch, step_generator(job.run.seed, rank, i))
                for b in range(len(batch)):
                    for ds, (di, lv, rv) in values.items():
                        if int(batch.dataset_idx_b[b]) != di:
                            continue
                        lab = batch.label_bzyx[b].numpy()
                        c = counts[ds]
                        c["samples"] += 1
                        has_l, has_r = bool((lab == lv).any()), bool((lab == rv).any())
                        c["left"] += has_l
                        c["right"] += has_r
                        if has_l and has_r:
                            c["both"] += 1
                            xl = np.argwhere(lab == lv)[:, 2].mean()
                            xr = np.argwhere(lab == rv)[:, 2].mean()
                            c["left at lower x"] += bool(xl < xr)
        for ds in PAIRED:
            c = counts[ds]
            print(
                f"  {mode:5s} {ds}: {c['samples']} samples; left label in {c['left']}, right in "
                f"{c['right']}, both in {c['both']}, of which left at lower x in {c['left at lower x']}"
            )


def predictions(job, setup, plan, run: str) -> None:
    import torch

    from multitalent.data.batch import collate
    from multitalent.losses import targets_from_labels
    from multitalent.train.components import build_model, zarr_source
    from multitalent.train.validation import Validator

    ckpt = sorted((Path(job.run.storage_path) / run).glob("ckpt-it*"))[-1]
    print(f"4. predictions of {ckpt}")
    cat = setup.catalog
    model = build_model(job, cat, setup.spacing_zyx_mm)
    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu"))
    model.eval()
    src = zarr_source(
        job, setup, cases=setup.val_cases, patch_zyx=plan.patch_zyx, batch_size=1, rank=0, world_size=1
    )
    val = Validator(
        src,
        seed=job.run.seed,
        patches_per_case=job.validation.patches_per_case,
        rank=0,
        world_size=1,
        batch_size=1,
        overlays=False,
    )
    lut = torch.as_tensor(cat.region_lut())
    totals: dict[str, Counter[str]] = {}
    for it in val.items:
        ds, case = src.refs[it.case_index]
        if ds not in PAIRED:
            continue
        batch = collate([src.read_sample(it.case_index, it.center_zyx)], annotated_dk=src.annotated_dk)
        with torch.no_grad():
            out = model(batch.image_bczyx)
        prob = torch.sigmoid(out[0] if isinstance(out, list | tuple) else out)
        target = targets_from_labels(batch.label_bzyx, batch.dataset_idx_b, lut)
        norm = setup.plan.normalization
        dark = batch.image_bczyx[0, 0] * norm.std + norm.mean < KIDNEY_TUMOUR_BELOW_HU
        for left, right in cat.dataset(ds).lateral_pairs:
            for name, other in ((left, right), (right, left)):
                k = next(c.index for c in cat.classes if c.key == f"{ds}:{name}")
                k_other = next(c.index for c in cat.classes if c.key == f"{ds}:{other}")
                t, p, t_other = target[0, k], prob[0, k] > 0.5, target[0, k_other]
                top = float(prob[0, k][t].max()) if t.any() else float("nan")
                c = totals.setdefault(f"{ds} {name}", Counter())
                c.update(
                    target=int(t.sum()), predicted=int(p.sum()), tp=int((p & t).sum()),
                    on_other=int((p & t_other).sum()), dark=int((t & dark).sum()),
                    dark_tp=int((p & t & dark).sum()),
                )  # fmt: skip
                print(
                    f"  {ds} {case:11s} {tuple(it.center_zyx)!s:14s} {name:13s} target {int(t.sum()):5d} "
                    f"predicted {int(p.sum()):5d} tp {int((p & t).sum()):5d} on the other side's "
                    f"target {int((p & t_other).sum()):5d}; max p in target {top:.2f}"
                )
    print("   over the validation patches (Dice as the validator computes it):")
    for key, c in totals.items():
        dice = 2 * c["tp"] / (c["target"] + c["predicted"]) if c["target"] + c["predicted"] else float("nan")
        bright, bright_tp = c["target"] - c["dark"], c["tp"] - c["dark_tp"]
        tumour = (
            f"; recall {bright_tp / bright:.2f} on its bright part, {c['dark_tp'] / c['dark']:.2f} on its "
            f"part below {KIDNEY_TUMOUR_BELOW_HU} HU ({c['dark'] / c['target']:.0%} of the target: tumour)"
            if key.startswith("P04") and c["dark"] and bright
            else ""
        )
        print(
            f"  {key:16s} Dice {dice:.2f}; target {c['target']}, predicted {c['predicted']}, "
            f"of which {c['on_other']} on the other side's target{tumour}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="jobs/laterality_cpu.yaml")
    p.add_argument("--run", help="a finished run under the job's run.storage_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job override")
    p.add_argument("--iterations", type=int, default=50, help="training iterations for section 3 (0: skip)")
    args = p.parse_args()
    from multitalent.train.components import augment_plan, load_data_setup
    from multitalent.train.job import load_train_job

    job = load_train_job(REPO / args.job, args.set)
    setup = load_data_setup(job)
    plan = augment_plan(job)
    phantom(setup)
    patches(job, setup, plan)
    if args.iterations:
        batches(job, args.iterations)
    if args.run:
        predictions(job, setup, plan, args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
