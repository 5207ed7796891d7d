"""ONNX export of the inference graph: normalised, zero-padded images -> every query's box, keypoints, keypoint
sigmas and score. QueryPose has no NMS and no grouping, so the graph has fixed-size outputs; a runtime adds only
the pre-processing below and a sort by score (experiments/onnx_predict.py does both with onnxruntime alone).

Inputs
    images       (B, 3, H, W) float32: RGB 0..255, resized (bilinear) so the short side is `short_side` and the
                 long side at most `max_size`, normalised per channel as (x - pixel_mean) / pixel_std, zero-padded
                 bottom/right to a multiple of 32 (a static export takes exactly its H x W: resize to fit, pad)
    image_sizes  (B, 2) int64: [h, w] of each image before padding
Outputs (all N queries, unsorted)
    boxes            (B, N, 4) x1, y1, x2, y2 in input pixels
    keypoints        (B, N, K, 2) x, y in input pixels, continuous (pixel i spans [i, i + 1): subtract 0.5 for
                     COCO-format results)
    keypoint_sigmas  (B, N, K, 2) RLE's scale per coordinate; a keypoint's confidence is 1 - mean over x, y
    scores           (B, N) sigmoid(cls) * mean over keypoints of their confidence
Divide x by the resize factor of the width and y by that of the height for original-image pixels.

The file's metadata holds what a runtime needs without this package: `querypose.preprocessing` (the constants
above, and the static input size or null), `querypose.keypoint_set` (names, skeleton, flip pairs, sigmas, parts)
and `querypose.model_config`, each as JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from querypose.model import PIXEL_MEAN, PIXEL_STD, QueryPose

# RoiAlign with half_pixel coordinates (torchvision's aligned=True) exists from opset 16; onnxruntime runs every
# operator of this graph at opset 18 on its CPU and CUDA providers.
OPSET = 18
INPUTS = ("images", "image_sizes")
OUTPUTS = ("boxes", "keypoints", "keypoint_sigmas", "scores")
SIZE_DIVISOR = 32
SINGLE_FILE_BYTES = int(1.8 * 2**30)  # protobuf caps a file at 2 GiB: larger weights go to a `.data` file beside it


class InferenceGraph(nn.Module):
    """QueryPose.poses with the outputs as a tuple in OUTPUTS order."""

    def __init__(self, model: QueryPose) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        poses = self.model.poses(images, image_sizes)
        return tuple(poses[name] for name in OUTPUTS)


def padded_size(short_side: int, max_size: int) -> tuple[int, int]:
    """The landscape input a static export takes by default: short x long side, rounded up to a multiple of 32."""
    return tuple(-(-side // SIZE_DIVISOR) * SIZE_DIVISOR for side in (short_side, max_size))


def export_onnx(model: QueryPose, path: str | Path, dynamic: bool = False, size: tuple[int, int] | None = None) -> Path:
    """Write `model`'s inference graph to `path` (a temporary folder renamed into place); returns the path.

    dynamic: batch, height and width are free; otherwise the graph takes one image of `size` (h, w), by default
    the model's test size rounded up to a multiple of 32 (portrait images are resized to fit and padded).
    """
    path = Path(path)
    model = model.eval()
    cfg = model.cfg
    height, width = size or padded_size(cfg.test_short_side, cfg.test_max_size)
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
        raise ValueError(f"export size {height}x{width}: both sides must be multiples of {SIZE_DIVISOR}")
    # torch.export treats a size-1 dimension as static, so a dynamic export traces a batch of two.
    batch = 2 if dynamic else 1
    images = torch.zeros(batch, 3, height, width)
    image_sizes = torch.tensor([[height, width]] * batch)
    dynamic_shapes = None
    if dynamic:
        images_batch = torch.export.Dim("batch")
        dynamic_shapes = {
            "images": {0: images_batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},
            "image_sizes": {0: images_batch},
        }
    with torch.no_grad():
        program = torch.onnx.export(
            InferenceGraph(model).eval(),
            (images, image_sizes),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic_shapes,
        )
    program.model.metadata_props.update(metadata(model, None if dynamic else (height, width)))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        program.save(staging / path.name, external_data=weight_bytes > SINGLE_FILE_BYTES)
        for written in sorted(staging.iterdir(), key=lambda p: p.name == path.name):  # the graph last
            written.replace(path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def metadata(model: QueryPose, static_size: tuple[int, int] | None) -> dict[str, str]:
    cfg = model.cfg
    preprocessing = {
        "color": "RGB",
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "short_side": cfg.test_short_side,
        "max_size": cfg.test_max_size,
        "size_divisor": SIZE_DIVISOR,
        "input_size": list(static_size) if static_size else None,
        "keypoint_pixel_centre": 0.5,
    }
    return {
        "querypose.preprocessing": json.dumps(preprocessing),
        "querypose.keypoint_set": json.dumps(cfg.spec.to_dict()),
        "querypose.model_config": json.dumps(cfg.to_dict()),
        "querypose.outputs": ", ".join(OUTPUTS),
    }
