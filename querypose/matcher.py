"""Hungarian matching between the N queries and the P people of each image (one-to-one assignment)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

from querypose.config import ModelConfig

EPS = 1e-8


class HungarianMatcher:
    """Assigns each person to one query by minimising, per image,

        cost = cls_weight * focal + l1_weight * L1(boxes / image size) + giou_weight * (-GIoU)
               [+ keypoint_cost * (1 - OKS) when keypoint_cost > 0 and predicted keypoints are given]

    The paper's weights are 2, 5, 2 and no OKS term. Queries left unassigned are trained as background.
    """

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
        if keypoint_cost > 0 and sigmas is None:
            raise ValueError("HungarianMatcher: keypoint_cost > 0 needs the dataset's OKS sigmas")
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.keypoint_cost = keypoint_cost
        self.sigmas = None if sigmas is None else torch.tensor(sigmas, dtype=torch.float32)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HungarianMatcher:
        return cls(
            cls_weight=cfg.cls_weight,
            l1_weight=cfg.l1_weight,
            giou_weight=cfg.giou_weight,
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
            keypoint_cost=cfg.keypoint_cost,
            sigmas=cfg.spec.sigmas,
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

        Params:
            logits: (B, N) person logits.
            boxes: (B, N, 4) predicted boxes, xyxy in input pixels.
            targets: B dicts with "boxes" (P_b, 4) xyxy pixels and "keypoints" (P_b, K, 3) [x, y, v] pixels.
            image_sizes: (B, 2) [height, width] of each unpadded image (the L1 term's normaliser).
            keypoints: optional (B, N, K, 2) predicted keypoints in pixels, used only when keypoint_cost > 0.

        Returns:
            B pairs (pred_idx, gt_idx) of int64 CPU tensors, sorted by pred_idx: query pred_idx[i] is assigned to
            person gt_idx[i]. For every image, len(pred_idx) == len(gt_idx) == min(N, P_b); images without
            people give two empty tensors.
        """
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} images")
        matches = []
        for b, target in enumerate(targets):
            if len(target["boxes"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            image_keypoints = None if keypoints is None else keypoints[b]
            cost = self.cost_matrix(logits[b], boxes[b], target, image_sizes[b], image_keypoints)
            cost = cost.cpu().numpy()
            if not np.isfinite(cost).all():
                raise FloatingPointError(f"HungarianMatcher: image {b} has a non-finite matching cost (NaN boxes?)")
            # Rows are queries: scipy returns them in increasing order, so pred_idx comes out sorted.
            pred_idx, gt_idx = linear_sum_assignment(cost)
            matches.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(gt_idx, dtype=torch.int64)))
        return matches

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        target: dict[str, torch.Tensor],
        image_size: torch.Tensor,
        keypoints: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, P) float32 matching cost for one image: logits (N,), boxes (N, 4), image_size (2,) [h, w]."""
        # float32 throughout: under bf16 autocast near-equal costs would tie and the assignment would jitter.
        prob = logits.float().sigmoid()[:, None]  # (N, 1)
        # Focal-style cost: the focal loss of calling the query a person minus that of calling it background,
        # so confident background queries are expensive to match and uncertain ones are not penalised twice.
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + EPS).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + EPS).log()
        boxes = boxes.float()
        gt_boxes = target["boxes"].to(boxes)  # (P, 4)
        whwh = image_size.flip(0).repeat(2).to(boxes)  # (4,) = (w, h, w, h)
        cost_l1 = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)  # (N, P)
        cost_giou = -generalized_box_iou(boxes, gt_boxes)  # (N, P)
        cost = self.cls_weight * (positive - negative) + self.l1_weight * cost_l1 + self.giou_weight * cost_giou
        if self.keypoint_cost > 0 and keypoints is not None:
            oks = object_keypoint_similarity(keypoints.float(), target, self.sigmas)
            cost = cost + self.keypoint_cost * (1 - oks)
        return cost


def object_keypoint_similarity(
    keypoints: torch.Tensor, target: dict[str, torch.Tensor], sigmas: torch.Tensor
) -> torch.Tensor:
    """OKS between predicted poses (N, K, 2) and people (P, K, 3) -> (N, P), over each person's labelled
    keypoints. The person's area is taken as 0.53 * box area (the CrowdPose convention; COCO's segment area
    is close to it), since targets carry no segmentation area."""
    gt = target["keypoints"].to(keypoints)
    boxes = target["boxes"].to(keypoints)
    area = 0.53 * (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (P,)
    squared = ((keypoints[:, None] - gt[None, :, :, :2]) ** 2).sum(-1)  # (N, P, K)
    variances = (2 * sigmas.to(keypoints)) ** 2  # (K,)
    similarity = torch.exp(-squared / (2 * variances * (area[None, :, None] + np.spacing(1))))  # (N, P, K)
    labelled = (gt[:, :, 2] > 0).to(keypoints)  # (P, K)
    return (similarity * labelled).sum(-1) / labelled.sum(-1).clamp_min(1)
