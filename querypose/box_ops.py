"""Box helpers shared by the decoders, the matcher and the criterion."""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
SCALE_CLAMP = math.log(100000.0 / 16)  # the authors' clamp (Sparse R-CNN's); detectron2 uses 1000 / 16


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Refine xyxy boxes (..., 4) by (dx, dy, dw, dh) deltas (..., 4) with weights (2, 2, 1, 1)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = DELTA_WEIGHTS
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=-1,
    )


def image_of_rows(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Image index of query-state rows: with query groups (training) row b * groups + g belongs to image b."""
    return rows.div(groups, rounding_mode="floor") if groups > 1 else rows


def rois_from_boxes(boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """(R, 4) xyxy boxes and (R,) image indices -> (R, 5) RoIs in torchvision's (index, x1, y1, x2, y2) form."""
    return torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)


class MultiLevelRoIAlign(torch.nn.Module):
    """RoIAlign over P2..P5 with the FPN level rule (canonical box 224 at level 4) and aligned=True.

    torchvision's MultiScaleRoIAlign calls roi_align with aligned=False, so only its level mapping is reused.
    """

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.strides = strides
        self.sampling_ratio = sampling_ratio
        levels = [int(math.log2(s)) for s in strides]
        self.mapper = LevelMapper(k_min=levels[0], k_max=levels[-1], canonical_scale=224, canonical_level=4)

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features: P2..P5 (B, C, H_l, W_l); rois (R, 5) -> pooled (R, C, S, S)."""
        level_of_roi = self.mapper([rois[:, 1:]])  # (R,) level indices 0..3
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            # No skip for a level without RoIs: roi_align and index_copy_ take zero rows, and a branch on the
            # data-dependent count is what torch.export (the ONNX export) cannot trace.
            selected = torch.nonzero(level_of_roi == level).squeeze(1)
            pooled = roi_align(
                feature,
                rois[selected],
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            out.index_copy_(0, selected, pooled.to(out.dtype))
        return out


def coordinate_grid(size: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 2, size, size): the (x, y) of each cell's centre in a size x size RoI grid, relative to the RoI as
    keypoint mu is (-0.5 .. 0.5), in `like`'s dtype and device."""
    centres = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) / size - 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y])[None]
