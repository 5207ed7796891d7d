"""The training step and the evaluation pass, shared by the single-process loop and the Ray Train loop."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cv2
import torch
from torch import nn

from querypose.evaluation import evaluate_keypoints
from querypose.optim import clip_gradients


def unwrap(model: nn.Module) -> nn.Module:
    """The QueryPose module inside a DistributedDataParallel (or any `.module`) wrapper."""
    return model.module if hasattr(model, "module") else model


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
    """Forward, losses, backward, clip, optimiser and scheduler step; returns the loss terms, lr and grad norm."""
    model.train()
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        outputs = model(images, image_sizes, targets)
    losses = criterion(outputs, targets, image_sizes, unwrap(model).flow)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = clip_gradients(model, max_grad_norm)
    optimizer.step()
    scheduler.step()
    logged = {name: float(value.detach()) for name, value in losses.items()}
    logged["lr"] = optimizer.param_groups[0]["lr"]
    logged["grad_norm"] = grad_norm
    return logged


def to_coco_results(poses: dict[str, torch.Tensor], image_id: int, min_score: float = 0.0) -> list[dict]:
    """One image's predicted poses -> COCO keypoint result records."""
    records = []
    for keypoints, score in zip(poses["keypoints"].tolist(), poses["scores"].tolist(), strict=True):
        if score < min_score:
            continue
        flat = [round(v, 2) for point in keypoints for v in point]
        records.append({"image_id": int(image_id), "category_id": 1, "keypoints": flat, "score": round(score, 5)})
    return records


def load_rgb(path: str | Path) -> torch.Tensor:
    """Read an image file into a CHW float tensor (0..255, RGB)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {path} is missing or cannot be decoded")
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float()


@torch.no_grad()
def evaluate_folder(
    model: nn.Module, gt_json: str | Path, image_dir: str | Path, dataset: str, batch_size: int = 4
) -> tuple[dict[str, float], list[dict]]:
    """Predict every image of a COCO-format ground truth and score it; returns (metrics, results)."""
    model = unwrap(model)
    model.eval()
    images = json.loads(Path(gt_json).read_text())["images"]
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        device = next(model.parameters()).device
        pixels = [load_rgb(Path(image_dir) / record["file_name"]).to(device) for record in chunk]
        for record, poses in zip(chunk, model.predict(pixels), strict=True):
            results.extend(to_coco_results({k: v.cpu() for k, v in poses.items()}, record["id"]))
    return evaluate_keypoints(gt_json, results, dataset), results
