"""Convert a COCO-format keypoint dataset (JSON + image folder) into Parquet shards for Ray Data.

    python experiments/convert.py --dataset coco --annotations annotations/person_keypoints_train2017.json \
        --images train2017 --out data/coco/shards/train
    python experiments/convert.py --dataset crowdpose --annotations crowdpose_test.json --images images \
        --out s3://my-bucket/crowdpose/shards/val --shard-mb 512
    python experiments/convert.py --keypoints my_set.yaml --annotations train.json --images train \
        --out data/my_set/shards/train

--dataset names a built-in keypoint set; --keypoints gives a custom one: a YAML with the OKS sigmas, flip pairs
(inferred from left/right names when absent) and part schemes, the keypoint names and skeleton coming from the
annotation file's category. The set is printed (flip pairs included) and recorded in full in manifest.json.

The output (`<out>/part-NNNNN.parquet`, `manifest.json`, `annotations.json`) is written to a temporary sibling
and renamed into place when complete. Rerunning over a finished output does nothing unless --overwrite.
Images that are missing or do not decode, and annotations with a wrong keypoint count or a bad box, are skipped;
the summary line counts them and manifest.json lists each with its reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keypoint_set = parser.add_mutually_exclusive_group(required=True)
    keypoint_set.add_argument("--dataset", choices=["coco", "crowdpose"], help="a built-in keypoint set")
    keypoint_set.add_argument("--keypoints", type=Path, help="a custom keypoint set's YAML (README, Keypoint sets)")
    parser.add_argument("--annotations", type=Path, required=True, help="COCO-format keypoint JSON")
    parser.add_argument("--images", type=Path, required=True, help="folder the JSON's file_name entries are in")
    parser.add_argument("--out", required=True, help="output folder: a local path or an object-store URI")
    parser.add_argument("--shard-mb", type=float, default=256, help="target size of one shard file")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished output")
    args = parser.parse_args(argv)
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb must be > 0, got {args.shard_mb}")

    from querypose.keypoints import load_keypoint_set
    from querypose_platform.shards import convert, has_manifest

    if has_manifest(args.out) and not args.overwrite:
        print(f"[convert] {args.out} is already converted; nothing to do (--overwrite replaces it)")
        return 0
    try:
        spec = args.dataset or load_keypoint_set(args.keypoints, args.annotations)
        if args.keypoints:
            print(f"[convert] {spec.summary()}")
        convert(
            spec,
            args.annotations,
            args.images,
            args.out,
            shard_mb=args.shard_mb,
            overwrite=args.overwrite,
            progress=True,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
