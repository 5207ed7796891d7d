"""Export a trained QueryPose to ONNX: the whole NMS-free inference graph, for onnxruntime (CPU or GPU) and any
other ONNX runtime, without PyTorch.

    python experiments/export.py --weights outputs/model.pt --format onnx --dynamic --out outputs/querypose.onnx
    python experiments/export.py --weights models:/querypose-ablation-best/1 --format onnx --size 800 1344

The graph maps normalised, zero-padded images and their sizes to every query's box, keypoints, keypoint sigmas
and score (querypose/export.py documents inputs, outputs and pre-processing; the file's metadata carries the
constants and the keypoint set). --dynamic leaves batch, height and width free; without it the graph takes one
image of --size (default: the model's test size rounded up to a multiple of 32). After writing, the script runs
the file once with onnxruntime on a synthetic image and prints the largest difference from PyTorch.
experiments/onnx_predict.py runs an exported file on photos with onnxruntime alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights", required=True, help="weights file from training, models:/NAME/VERSION or an MLflow run id"
    )
    parser.add_argument("--config", type=Path, help="experiment YAML: the model section for a bare state_dict, "
                        "and the tracking URI for models:/ and run ids")  # fmt: skip
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--dynamic", action="store_true", help="free batch, height and width")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="static input size (multiples of 32)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "export" / "querypose.onnx")
    args = parser.parse_args(argv)

    from predict import build

    from querypose.export import export_onnx, padded_size

    try:
        model, cfg = build(args.weights, args.config)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = tuple(args.size) if args.size else padded_size(cfg.test_short_side, cfg.test_max_size)
    try:
        path = export_onnx(model, args.out, dynamic=args.dynamic, size=size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({'dynamic' if args.dynamic else f'{size[0]}x{size[1]}'}; {cfg.spec.name}, "
          f"{cfg.spec.num_keypoints} keypoints, {cfg.num_queries} queries)")  # fmt: skip
    for name, difference in check(model, path, size).items():
        print(f"  onnxruntime vs PyTorch, max |difference| of {name}: {difference:.2e}")
    return 0


def check(model, path: Path, size: tuple[int, int]) -> dict[str, float]:
    """Run the file once with onnxruntime on a noise image; the largest difference from PyTorch per output."""
    import numpy as np
    import onnxruntime
    import torch

    from querypose.export import OUTPUTS

    height, width = size
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 3, height, width)).astype(np.float32))
    images, image_sizes = model.normalise(pixels), torch.tensor([[height, width]])
    with torch.no_grad():
        expected = model.poses(images, image_sizes)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {"images": images.numpy(), "image_sizes": image_sizes.numpy()})
    return {name: float(np.abs(expected[name].numpy() - value).max()) for name, value in zip(OUTPUTS, got, strict=True)}


if __name__ == "__main__":
    raise SystemExit(main())
