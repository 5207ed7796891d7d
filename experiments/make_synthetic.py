"""Generate a synthetic COCO-format keypoint dataset: DIR/images/*.jpg and DIR/annotations.json.

    python experiments/make_synthetic.py --out data/synthetic/coco_train --images 200 --format coco
    python experiments/make_synthetic.py --out data/quadruped/train --images 200 --format quadruped

`coco` and `crowdpose` draw people with those keypoint sets; `quadruped` draws four-legged animals with the
custom keypoint set experiments/configs/keypoints/quadruped.yaml and writes DIR/keypoints.yaml beside the
annotations (its sigmas, flip pairs and part schemes), ready for `convert.py --keypoints`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

QUADRUPED = Path(__file__).resolve().parent / "configs" / "keypoints" / "quadruped.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--format", choices=("coco", "crowdpose", "quadruped"), default="coco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320, help="short side of the images in pixels")
    parser.add_argument(
        "--max-people", type=int, default=6, help="at most this many people per image (1..6; 6 is the standard)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from querypose.keypoints import load_keypoint_set
    from querypose.synthetic import write_synthetic_dataset

    keypoint_set = load_keypoint_set(QUADRUPED) if args.format == "quadruped" else args.format
    start = time.perf_counter()
    try:
        annotations = write_synthetic_dataset(
            args.out, args.images, dataset=keypoint_set, seed=args.seed, image_size=args.size,
            overwrite=args.overwrite, max_people=args.max_people,
        )  # fmt: skip
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.images} {args.format} images to {args.out} ({annotations}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
