"""The training step and the evaluation pass, shared by the single-process loop and the Ray Train loop."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from querypose.evaluation import evaluate_keypoints
from querypose.keypoints import KeypointSpec
from querypose.optim import clip_gradients
from querypose.transforms import KEYPOINT_PIXEL_CENTRE, collate, has_people, people_arrays, train_augment


def unwrap(model: nn.Module) -> nn.Module:
    """The QueryPose module inside a DistributedDataParallel (or any `.module`) wrapper."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    max_grad_norm: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimisation step: forward (with matching), set losses, backward, full-model gradient clipping,
    optimiser step, scheduler step.

    images (B, 3, H, W) float 0..255 zero-padded, image_sizes (B, 2) [h, w], targets B dicts with "boxes" (P, 4)
    and "keypoints" (P, K, 3), all on the model's device. `model` may be DDP-wrapped. `autocast_dtype` (e.g.
    torch.bfloat16 on GPU) runs the forward under autocast; the losses are always float32.

    Returns the loss terms as floats plus "lr" (the model group's) and "grad_norm" (before clipping). A
    non-finite loss raises FloatingPointError before any parameter changes.
    """
    model.train()
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        outputs = model(images, image_sizes, targets)
    losses = criterion(outputs, targets, image_sizes, unwrap(model).flow)
    logged = {name: float(value.detach()) for name, value in losses.items()}
    if not math.isfinite(logged["loss"]):
        raise FloatingPointError(f"non-finite loss at this step: {logged}")
    optimizer.zero_grad(set_to_none=True)
    (losses["loss"] + _touch_all_parameters(model)).backward()
    logged["grad_norm"] = clip_gradients(model, max_grad_norm)
    optimizer.step()
    scheduler.step()
    logged["lr"] = optimizer.param_groups[0]["lr"]
    return logged


def _touch_all_parameters(model: nn.Module) -> torch.Tensor:
    """Zero that depends on every trainable parameter. A batch without people leaves the keypoint heads unused
    on that rank; DDP (find_unused_parameters=False, which the flow's use outside forward requires) then waits
    for gradients that never come. A zero-weighted touch gives each parameter a zero gradient instead."""
    return sum(p[(0,) * p.dim()] for p in model.parameters() if p.requires_grad) * 0.0


# --- evaluation ----------------------------------------------------------------------------------------------


def to_coco_results(poses: dict[str, torch.Tensor], image_id: int, max_dets: int | None = None) -> list[dict]:
    """One image's predicted poses (keypoints (N, K, 3) in continuous original-image pixels, scores (N,)) -> COCO
    keypoint result records, with x, y back in COCO's pixel-index convention; with `max_dets`, only the
    highest-scoring max_dets poses (evaluation.MAX_DETS: what the protocols score), best first."""
    if max_dets is not None:
        keep = poses["scores"].argsort(descending=True)[:max_dets]
        poses = {"keypoints": poses["keypoints"][keep], "scores": poses["scores"][keep]}
    keypoints = poses["keypoints"].clone()
    keypoints[..., :2] -= KEYPOINT_PIXEL_CENTRE
    records = []
    for points, score in zip(keypoints.tolist(), poses["scores"].tolist(), strict=True):
        flat = [round(v, 2) for point in points for v in point]
        records.append({"image_id": int(image_id), "category_id": 1, "keypoints": flat, "score": round(score, 5)})
    return records


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file into an (H, W, 3) uint8 RGB array."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {path} is missing or cannot be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def coco_samples(gt_json: str | Path, image_dir: str | Path, only_with_people: bool = False) -> Iterator[dict]:
    """The images of a COCO-format keypoint file as samples: {"image_id", "image" (H, W, 3) uint8 RGB,
    "boxes" (P, 4) float32 xyxy pixels, "keypoints" (P, K, 3) float32 continuous coordinates}. Crowd regions are
    left out; `only_with_people` also leaves out images without a non-crowd person (for training)."""
    content = json.loads(Path(gt_json).read_text())
    num_keypoints = len(content["categories"][0]["keypoints"])
    annotations_of: dict[int, list[dict]] = {}
    for annotation in content["annotations"]:
        annotations_of.setdefault(annotation["image_id"], []).append(annotation)
    for record in content["images"]:
        annotations = annotations_of.get(record["id"], [])
        if only_with_people and not has_people(annotations):
            continue
        boxes, keypoints = people_arrays(annotations, num_keypoints)
        yield {
            "image_id": record["id"],
            "image": load_rgb(Path(image_dir) / record["file_name"]),
            "boxes": boxes,
            "keypoints": keypoints,
        }


def augmented_batches(
    samples: list[dict], batch_size: int, flip_index: np.ndarray, rng: np.random.Generator, **augment
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """Endless training batches from in-memory samples: a fresh shuffle every epoch, each sample through
    `train_augment(**augment)`, collated into (images (B, 3, H, W), image_sizes (B, 2), targets). The Ray Data
    pipeline (querypose_platform.data) does the same over shards."""
    num_keypoints = samples[0]["keypoints"].shape[1]
    while True:
        order = rng.permutation(len(samples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = [train_augment(samples[i], rng, flip_index, **augment) for i in order[start : start + batch_size]]
            yield collate(batch, num_keypoints)


def _to_chw(image: np.ndarray | torch.Tensor, image_id: object) -> torch.Tensor:
    if isinstance(image, torch.Tensor):  # already CHW
        return image.float()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {image_id}: field 'image' must be (H, W, 3) RGB, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


@torch.no_grad()
def predict_samples(model: nn.Module, samples: Iterable[dict], batch_size: int = 4) -> list[dict]:
    """Run `model.predict` over samples {"image_id", "image" (H, W, 3) uint8 RGB or CHW tensor} in original
    pixels; returns COCO keypoint result records (all N candidates per image, best first)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[dict] = []
    chunk: list[dict] = []

    def flush() -> None:
        pixels = [_to_chw(s["image"], s.get("image_id")).to(device) for s in chunk]
        for sample, poses in zip(chunk, model.predict(pixels), strict=True):
            results.extend(to_coco_results({k: v.cpu() for k, v in poses.items()}, sample["image_id"]))
        chunk.clear()

    for sample in samples:
        for field in ("image_id", "image"):
            if field not in sample:
                raise ValueError(f"evaluation sample {sample.get('image_id', '?')}: missing field {field!r}")
        chunk.append(sample)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    model.train(was_training)
    return results


def evaluate(
    model: nn.Module,
    samples: Iterable[dict],
    gt_json: str | Path,
    keypoint_set: str | KeypointSpec,
    batch_size: int = 4,
    results_path: str | Path | None = None,
) -> dict[str, float]:
    """Predict every sample and score the poses against `gt_json` with the keypoint set's OKS protocol and sigmas
    (querypose.evaluation; a built-in set's name or a KeypointSpec). `samples` is any iterable of {"image_id", "image"} dicts, e.g. `coco_samples(...)` or a
    data loader's rows; the predictions are written to `results_path` when given."""
    results = predict_samples(model, samples, batch_size)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    return evaluate_keypoints(gt_json, results, keypoint_set)
