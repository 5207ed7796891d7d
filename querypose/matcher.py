"""Hungarian matching between the N queries and the P people of each image (one-to-one assignment)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

from querypose.config import ModelConfig
from querypose.keypoints import get_spec

EPS = 1e-8


class HungarianMatcher:
    """cost = 2 focal + 5 L1 (boxes / image size) + 2 (-GIoU) [+ keypoint_cost (1 - OKS)], per image."""

    def __init__(
        self,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        keypoint_cost: float = 0.0,
        sigmas: tuple[float, ...] | None = None,
    ) -> None:
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.keypoint_cost = keypoint_cost
        self.sigmas = None if sigmas is None else torch.tensor(sigmas)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HungarianMatcher:
        return cls(
            cfg.cls_weight,
            cfg.l1_weight,
            cfg.giou_weight,
            cfg.focal_alpha,
            cfg.focal_gamma,
            cfg.keypoint_cost,
            get_spec(cfg.dataset).sigmas,
        )

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
        keypoints: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match predictions to people.

        logits (B, N) person logits; boxes (B, N, 4) xyxy pixels; targets: B dicts with "boxes" (P, 4) xyxy pixels
        and "keypoints" (P, K, 3); image_sizes (B, 2) [h, w]; keypoints (B, N, K, 2) predicted pixels, used only
        when keypoint_cost > 0.

        Returns B pairs (pred_idx, gt_idx) of int64 tensors sorted by pred_idx, each of length min(N, P_b):
        query pred_idx[i] is assigned to person gt_idx[i].
        """
        matches = []
        for b, target in enumerate(targets):
            gt_boxes = target["boxes"].to(boxes.dtype)
            if len(gt_boxes) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(
                logits[b], boxes[b], target, image_sizes[b], None if keypoints is None else keypoints[b]
            )
            pred_idx, gt_idx = linear_sum_assignment(cost.float().cpu().numpy())
            matches.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(gt_idx, dtype=torch.int64)))
        return matches

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        target: dict[str, torch.Tensor],
        image_size: torch.Tensor,
        keypoints: torch.Tensor | None,
    ) -> torch.Tensor:
        """(N, P) matching cost for one image."""
        prob = logits.float().sigmoid()[:, None]  # (N, 1)
        # Focal-style classification cost: the positive focal term minus the negative one.
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + EPS).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + EPS).log()
        gt_boxes = target["boxes"].to(boxes)
        scale = image_size.flip(0).repeat(2).to(boxes)  # (w, h, w, h)
        cost_l1 = torch.cdist(boxes / scale, gt_boxes / scale, p=1)  # (N, P)
        cost_giou = -generalized_box_iou(boxes, gt_boxes)
        cost = self.cls_weight * (positive - negative) + self.l1_weight * cost_l1 + self.giou_weight * cost_giou
        if self.keypoint_cost > 0 and keypoints is not None:
            cost = cost + self.keypoint_cost * (1 - object_keypoint_similarity(keypoints, target, self.sigmas))
        return cost


def object_keypoint_similarity(
    keypoints: torch.Tensor, target: dict[str, torch.Tensor], sigmas: torch.Tensor
) -> torch.Tensor:
    """OKS between predicted poses (N, K, 2) and people (P, K, 3), with area 0.53 * box area -> (N, P)."""
    gt = target["keypoints"].to(keypoints)
    boxes = target["boxes"].to(keypoints)
    area = 0.53 * (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (P,)
    squared = ((keypoints[:, None] - gt[None, :, :, :2]) ** 2).sum(-1)  # (N, P, K)
    variances = (2 * sigmas.to(keypoints)) ** 2  # (K,)
    similarity = torch.exp(-squared / (2 * variances * (area[None, :, None] + np.spacing(1))))
    visible = (gt[:, :, 2] > 0).to(keypoints)  # (P, K)
    return (similarity * visible).sum(-1) / visible.sum(-1).clamp_min(1)
