"""Set losses for every stage: focal classification, L1 and GIoU on boxes, RLE on the matched people's poses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from querypose.box_ops import coordinate_grid
from querypose.config import ModelConfig
from querypose.flow import RealNVP, rle_loss
from querypose.heatmap import heatmap_focal_loss, render_heatmaps
from querypose.matcher import object_keypoint_similarity
from querypose.model import decode_keypoints, encode_keypoints, per_group_rows


class SetCriterion(nn.Module):
    """Losses of the matched sets, stage by stage (the matching itself happens in the model's forward, since
    the keypoint decoder runs only on the matched queries).

    Per stage s the unweighted terms are `loss_cls_s{s}`, `loss_l1_s{s}`, `loss_giou_s{s}`, `loss_rle_s{s}`;
    `loss` is the weighted sum over all stages. Every term is divided by the number of people in the batch,
    averaged over workers when torch.distributed is initialised, and the RLE term also by the number of keypoints
    K, as the authors do (`num_boxes * 17` on COCO): it is a mean per keypoint, not per person. With the model's
    auxiliary heatmap head on, `loss_aux_heatmap` (CornerNet focal loss, once per batch) joins the total; with
    `readout_map_weight` > 0 and the soft-argmax readout, `loss_readout_s{s}` (per keypoint, as RLE) does.
    """

    def __init__(
        self,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        rle_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_heatmap_weight: float = 0.5,
        cls_target: str = "binary",
        sigmas: tuple[float, ...] | None = None,
        readout_map_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if cls_target == "oks" and sigmas is None:
            raise ValueError("SetCriterion: cls_target='oks' needs the dataset's OKS sigmas")
        self.weights = {"cls": cls_weight, "l1": l1_weight, "giou": giou_weight, "rle": rle_weight,
                        "readout": readout_map_weight}  # fmt: skip
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.aux_heatmap_weight = aux_heatmap_weight
        self.cls_target = cls_target
        self.sigmas = None if sigmas is None else torch.tensor(sigmas, dtype=torch.float32)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SetCriterion:
        return cls(
            cfg.cls_weight, cfg.l1_weight, cfg.giou_weight, cfg.rle_weight, cfg.focal_alpha, cfg.focal_gamma,
            cfg.aux_heatmap_weight, cfg.cls_target, cfg.spec.sigmas, cfg.readout_map_weight,
        )  # fmt: skip

    def forward(
        self,
        outputs: dict[str, list[dict]],
        targets: list[dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
        flow: RealNVP,
    ) -> dict[str, torch.Tensor]:
        """Params:
            outputs: {"stages": [stage, ...]}, each stage with logits (B, N), boxes (B, N, 4) xyxy pixels,
                indices (B pairs (pred_idx, gt_idx)), keypoint_mu / keypoint_sigma (T, K, 2) box-relative for the
                T matched pairs in indices order, keypoint_boxes (T, 4) the detached boxes they are relative to;
                optionally "heatmap" (B, K, H/4, W/4) logits of the auxiliary head.
            targets: B dicts with "boxes" (P_b, 4) xyxy pixels and "keypoints" (P_b, K, 3) [x, y, v] pixels.
            image_sizes: (B, 2) [h, w] of the unpadded images.
            flow: the RLE density (the model's `flow`).

        Returns float32 scalars: the unweighted terms per stage and the weighted total `loss`.
        """
        device = outputs["stages"][0]["logits"].device
        image_sizes = image_sizes.to(device)
        # With G query groups each person is matched once per group: the terms are means over the G matchings.
        groups = outputs.get("query_groups", 1)
        num_people = self.num_people(targets, device) * groups
        people = targets
        targets, image_sizes = per_group_rows(targets, image_sizes, groups)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        for s, stage in enumerate(outputs["stages"]):
            num_keypoints = stage["keypoint_mu"].shape[1]
            matched = _matched_targets(stage["indices"], targets, num_keypoints, device)
            terms = {
                "cls": self.loss_cls(stage["logits"], matched, self.matched_quality(stage, matched)),
                **self.loss_boxes(stage["boxes"], matched, image_sizes),
                "rle": self.loss_rle(stage, matched, flow),
            }
            if self.weights["readout"] > 0 and "keypoint_readout_logits" in stage:
                terms["readout"] = self.loss_readout_map(stage, matched)
            for name, value in terms.items():
                if name in ("rle", "readout"):  # means per keypoint, as the authors' RLE normaliser
                    value = value / num_keypoints
                losses[f"loss_{name}_s{s}"] = value / num_people
                total = total + self.weights[name] * losses[f"loss_{name}_s{s}"]
        if "heatmap" in outputs:
            heatmap = outputs["heatmap"]
            target = render_heatmaps(people, tuple(heatmap.shape[-2:]), heatmap.shape[1])
            losses["loss_aux_heatmap"] = heatmap_focal_loss(heatmap, target.to(heatmap.device))
            total = total + self.aux_heatmap_weight * losses["loss_aux_heatmap"]
        losses["loss"] = total
        return losses

    def loss_cls(self, logits: torch.Tensor, matched: dict[str, torch.Tensor], quality: torch.Tensor) -> torch.Tensor:
        """Sigmoid focal loss over all B * N queries: matched ones are people (target `quality`, 1 for the paper's
        binary target), the rest background (0). Summed."""
        labels = torch.zeros_like(logits, dtype=torch.float32)  # (B, N)
        labels[matched["batch"], matched["query"]] = quality
        return sigmoid_focal_loss(logits.float(), labels, self.focal_alpha, self.focal_gamma, reduction="sum")

    @torch.no_grad()
    def matched_quality(self, stage: dict, matched: dict[str, torch.Tensor]) -> torch.Tensor:
        """(T,) classification targets of the matched queries: 1, or their box IoU / pose OKS with their person."""
        if self.cls_target == "binary":
            return torch.ones(len(matched["query"]), device=matched["boxes"].device)
        if self.cls_target == "iou":
            predicted = stage["boxes"][matched["batch"], matched["query"]].float()
            return box_iou(predicted, matched["boxes"]).diagonal().clamp_min(0)
        pixels = decode_keypoints(stage["keypoint_mu"].float(), stage["keypoint_boxes"].float())  # (T, K, 2)
        people = {"keypoints": matched["keypoints"], "boxes": matched["boxes"]}
        return object_keypoint_similarity(pixels, people, self.sigmas.to(pixels.device)).diagonal()

    def loss_boxes(
        self, boxes: torch.Tensor, matched: dict[str, torch.Tensor], image_sizes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """L1 on boxes divided by the image's (w, h, w, h), and GIoU loss, over the matched pairs. Summed."""
        predicted = boxes[matched["batch"], matched["query"]].float()  # (T, 4)
        whwh = image_sizes[matched["batch"]].flip(1).repeat(1, 2).float()  # (T, 4)
        l1 = (predicted / whwh - matched["boxes"] / whwh).abs().sum()
        giou = generalized_box_iou_loss(predicted, matched["boxes"], reduction="sum")
        return {"l1": l1, "giou": giou}

    def loss_rle(self, stage: dict, matched: dict[str, torch.Tensor], flow: RealNVP) -> torch.Tensor:
        """RLE on the matched poses. Summed."""
        target, weight = _box_relative_targets(stage, matched)
        return rle_loss(stage["keypoint_mu"], stage["keypoint_sigma"], target, weight.unsqueeze(-1), flow, 1.0)

    def loss_readout_map(self, stage: dict, matched: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of each matched keypoint's readout map (T, K, S*S logits) against a Gaussian of one cell's
        standard deviation at its target, normalised over the cells. Summed over the weighted keypoints."""
        logits = stage["keypoint_readout_logits"].float()
        size = round(logits.shape[-1] ** 0.5)
        target, weight = _box_relative_targets(stage, matched)
        centres = coordinate_grid(size, logits).flatten(2)[0].T  # (S*S, 2) as (x, y)
        cells_squared = ((target[..., None, :] - centres) ** 2).sum(-1) * size**2  # (T, K, S*S) in cells^2
        soft_target = (-cells_squared / 2).softmax(dim=-1)
        cross_entropy = -(soft_target * logits.log_softmax(dim=-1)).sum(-1)  # (T, K)
        return (cross_entropy * weight).sum()

    @staticmethod
    def num_people(targets: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """People in the batch, averaged over workers so every rank divides by the same number; at least 1."""
        count = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp_min(1.0)


def _box_relative_targets(stage: dict, matched: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The matched keypoints relative to the detached predicted box they were decoded from (T, K, 2), and which
    count (T, K): labelled and inside that box."""
    target = encode_keypoints(matched["keypoints"][..., :2], stage["keypoint_boxes"].detach().float())
    inside = ((target >= -0.5) & (target <= 0.5)).all(-1)
    return target, (matched["keypoints"][..., 2] > 0) & inside


def _matched_targets(
    indices: list[tuple[torch.Tensor, torch.Tensor]],
    targets: list[dict[str, torch.Tensor]],
    num_keypoints: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Flatten the per-image matches, image by image in indices order (the order of keypoint_mu's rows):
    batch/query (T,) indices of the matched queries and their people's boxes (T, 4) and keypoints (T, K, 3)."""
    if len(indices) != len(targets):
        raise ValueError(f"SetCriterion: {len(indices)} matched images for {len(targets)} targets")
    batch = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)]).to(device)
    query = torch.cat([pred for pred, _ in indices]).to(device)
    boxes, keypoints = [], []
    for t, (_, gt) in zip(targets, indices, strict=True):
        # reshape: an image without people may arrive as an empty (0,) tensor
        boxes.append(t["boxes"].reshape(-1, 4)[gt.to(t["boxes"].device)])
        keypoints.append(t["keypoints"].reshape(-1, num_keypoints, 3)[gt.to(t["keypoints"].device)])
    return {
        "batch": batch,
        "query": query,
        "boxes": torch.cat(boxes).to(device, torch.float32),
        "keypoints": torch.cat(keypoints).to(device, torch.float32),
    }
