"""Generate the synthetic COCO/CrowdPose-format dataset: DIR/images/*.jpg and DIR/annotations.json."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--format", choices=("coco", "crowdpose"), default="coco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320, help="short side of the images in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from querypose.synthetic import write_synthetic_dataset

    start = time.perf_counter()
    try:
        annotations = write_synthetic_dataset(
            args.out, args.images, dataset=args.format, seed=args.seed, image_size=args.size, overwrite=args.overwrite
        )
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.images} {args.format} images to {args.out} ({annotations}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
