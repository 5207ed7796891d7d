"""The embedded default: what `make demo` runs on a fresh machine with no dataset and no GPU.

1. Generates the synthetic COCO-format dataset (train + val) under data/synthetic/.
2. Scores the validation ground truth against itself with the COCO and CrowdPose rules (a sanity check of the
   evaluation path: every metric is 1.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def gt_as_predictions(gt_json: Path) -> list[dict]:
    """Every non-crowd ground-truth person as a COCO result with score 1."""
    gt = json.loads(gt_json.read_text())
    return [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt["annotations"]
        if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) > 0
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "synthetic")
    parser.add_argument("--images", type=int, default=40, help="validation images per dataset format")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from querypose.evaluation import evaluate_keypoints
    from querypose.synthetic import write_synthetic_dataset

    for dataset in ("coco", "crowdpose"):
        out = args.out / f"{dataset}_val"
        start = time.perf_counter()
        if (out / "annotations.json").is_file():
            print(f"[demo] {dataset}: reusing {out}")
        else:
            write_synthetic_dataset(out, args.images, dataset=dataset, seed=args.seed)
            print(f"[demo] {dataset}: wrote {args.images} images to {out} in {time.perf_counter() - start:.1f}s")
        gt = out / "annotations.json"
        metrics = evaluate_keypoints(gt, gt_as_predictions(gt), dataset)
        print(f"[demo] {dataset}: ground truth scored as predictions:")
        print("       " + "  ".join(f"{name}={value:.3f}" for name, value in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
