"""Heatmap pretraining of a backbone on keypoint data: the embedded default's stand-in for ImageNet weights.

The paper starts every model from pretrained weights and reports that a backbone pretrained on keypoint heatmaps
suits QueryPose better than ImageNet's (section 4.3, Discussion, with HRNet). Where nothing can be downloaded,
the embedded default pretrains its small backbone that second way, on its own synthetic training split: backbone +
FPN + a heatmap head on P2, CenterNet Gaussians at stride 4 measured in heatmap cells, CornerNet's focal loss. Only
the backbone body is kept; it loads as `model.backbone_weights` like any checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from querypose.backbone import Backbone
from querypose.config import ModelConfig
from querypose.heatmap import P2_STRIDE, HeatmapHead, heatmap_focal_loss, render_heatmaps
from querypose.model import PIXEL_MEAN, PIXEL_STD


def pretrain_backbone(
    cfg: ModelConfig,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]],
    iterations: int,
    lr: float = 1e-3,
    log: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train `Backbone(cfg)` (random init) with a keypoint heatmap head for `iterations` batches of (images
    (B, 3, H, W) 0..255, image_sizes, targets); returns the body's state_dict (timm names)."""
    backbone = Backbone(cfg)
    head = HeatmapHead(cfg.hidden_dim, cfg.spec.num_keypoints)
    parameters = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    started = time.perf_counter()
    for iteration in range(1, iterations + 1):
        images, _, targets = next(batches)
        logits = head(backbone((images - mean) / std)[0])  # (B, K, H/4, W/4)
        target = render_heatmaps(targets, tuple(logits.shape[-2:]), logits.shape[1], box_scale=1 / P2_STRIDE)
        loss = heatmap_focal_loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()
        if log is not None and (iteration % 50 == 0 or iteration == iterations):
            log(f"[pretrain] it {iteration}/{iterations} heatmap loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return backbone.body.state_dict()


def save_backbone(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a backbone state_dict through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    torch.save(state, staging)
    staging.replace(path)
    return path
