"""Set losses for every stage: focal classification, L1 and GIoU on boxes, RLE on the matched people's poses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from querypose.config import ModelConfig
from querypose.flow import RealNVP, rle_loss
from querypose.model import encode_keypoints


class SetCriterion(nn.Module):
    def __init__(
        self,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        rle_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.weights = {"cls": cls_weight, "l1": l1_weight, "giou": giou_weight, "rle": rle_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SetCriterion:
        return cls(cfg.cls_weight, cfg.l1_weight, cfg.giou_weight, cfg.rle_weight, cfg.focal_alpha, cfg.focal_gamma)

    def forward(
        self,
        outputs: dict[str, list[dict]],
        targets: list[dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
        flow: RealNVP,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms per stage (`loss_cls_s0`, ..., unweighted) plus `loss`, the weighted total."""
        num_people = self._num_people(targets, image_sizes.device)
        losses: dict[str, torch.Tensor] = {}
        total = image_sizes.new_zeros((), dtype=torch.float32)
        for s, stage in enumerate(outputs["stages"]):
            terms = self.stage_losses(stage, targets, image_sizes, flow, num_people)
            for name, value in terms.items():
                losses[f"loss_{name}_s{s}"] = value
                total = total + self.weights[name] * value
        losses["loss"] = total
        return losses

    def stage_losses(self, stage, targets, image_sizes, flow, num_people) -> dict[str, torch.Tensor]:
        logits, boxes, indices = stage["logits"], stage["boxes"], stage["indices"]
        batch_index = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)]).to(logits.device)
        query_index = torch.cat([pred for pred, _ in indices]).to(logits.device)
        gt_boxes = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, indices, strict=True)]).to(boxes)
        gt_keypoints = torch.cat([t["keypoints"][gt] for t, (_, gt) in zip(targets, indices, strict=True)]).to(boxes)

        labels = torch.zeros_like(logits)
        labels[batch_index, query_index] = 1.0
        loss_cls = sigmoid_focal_loss(
            logits.float(), labels, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )

        matched = boxes[batch_index, query_index]  # (T, 4)
        scale = image_sizes[batch_index].flip(1).repeat(1, 2).to(boxes)  # (T, 4) = (w, h, w, h)
        loss_l1 = (matched / scale - gt_boxes / scale).abs().sum()
        loss_giou = generalized_box_iou_loss(matched, gt_boxes, reduction="sum")

        # Targets relative to the detached predicted box; unlabelled or out-of-box keypoints carry no weight.
        kp_boxes = stage["keypoint_boxes"]
        target = encode_keypoints(gt_keypoints[..., :2], kp_boxes)  # (T, K, 2)
        inside = ((target > -0.5) & (target < 0.5)).all(-1)
        weight = ((gt_keypoints[..., 2] > 0) & inside).unsqueeze(-1).float()  # (T, K, 1)
        loss_rle = rle_loss(stage["keypoint_mu"], stage["keypoint_sigma"], target, weight, flow, num_people)
        return {
            "cls": loss_cls / num_people,
            "l1": loss_l1 / num_people,
            "giou": loss_giou / num_people,
            "rle": loss_rle,
        }

    @staticmethod
    def _num_people(targets: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """People in the batch, averaged over workers so every rank normalises by the same number."""
        count = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp_min(1.0)
