"""An overlay PNG of one prediction: ``multitalent predict``'s label map over its scan, with the ground truth.

Reuses the validation overlay renderer (:func:`multitalent.tracking.pictures.overlay_png`): fill = ground
truth, outline = prediction, one colour per class of the dataset, axial slices in canonical orientation.

    PYTHONPATH=platform .venv/bin/python scripts/prediction_overlay.py --image scan.nii.gz \
        --pred OUT/<case>/<dataset>.nii.gz --gt label.nii.gz --catalog phantom --dataset P05 --out docs/x.png
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--pred", required=True, help="a label map written by multitalent predict")
    p.add_argument("--gt", help="the raw ground-truth label map (default: none, fill = prediction)")
    p.add_argument("--catalog", default="phantom")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args()

    from multitalent.catalog import load_catalog
    from multitalent.preprocess.orientation import to_canonical_zyx
    from multitalent.rawio import read_volume
    from multitalent.tracking.pictures import overlay_png

    dataset = load_catalog(args.catalog).dataset(args.dataset)
    image, affine = read_volume(args.image)
    pred, _ = read_volume(args.pred, what="prediction")
    gt = read_volume(args.gt, what="label")[0] if args.gt else pred
    canon = [to_canonical_zyx(np.asarray(v), affine)[0] for v in (image, pred, gt)]
    pred_k = np.stack([np.isin(canon[1], c.raw_values) for c in dataset.classes])
    gt_k = np.stack([np.isin(canon[2], c.raw_values) for c in dataset.classes])
    picture = overlay_png(
        canon[0].astype(np.float32), pred_k, gt_k, [c.name for c in dataset.classes], title=args.title
    )
    picture.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
