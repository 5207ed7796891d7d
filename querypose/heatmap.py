"""The authors' auxiliary keypoint-heatmap loss (`AUX_KPS_HEATMAP`, off in their configs and here by default).

A small head on P2 predicts one heatmap per keypoint; targets are CenterNet-style Gaussians at the labelled
keypoints (stride 4), and the loss is CornerNet's penalty-reduced focal loss. Training only: inference never runs
the head. The paper (section 4.3, Discussion) reports that this auxiliary loss does not help QueryPose.
"""

from __future__ import annotations

import torch
from torch import nn

P2_STRIDE = 4
HEATMAP_PRIOR_BIAS = -2.19  # CenterNet's heatmap bias: sigmoid(-2.19) ~ 0.1
MIN_OVERLAP = 0.7


class HeatmapHead(nn.Module):
    """P2 (B, d, H/4, W/4) -> keypoint heatmap logits (B, K, H/4, W/4): 3x3 conv + ReLU + 1x1 conv."""

    def __init__(self, dim: int, num_keypoints: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dim, num_keypoints, 1)
        )
        nn.init.constant_(self.net[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, p2: torch.Tensor) -> torch.Tensor:
        return self.net(p2)


def gaussian_radius(widths: torch.Tensor, heights: torch.Tensor, min_overlap: float = MIN_OVERLAP) -> torch.Tensor:
    """CenterNet's radius per box: the smallest of the three corner-shift cases that keep IoU >= min_overlap."""
    product, total = widths * heights, widths + heights
    r1 = (total + torch.sqrt(total**2 - 4 * product * (1 - min_overlap) / (1 + min_overlap))) / 2
    r2 = (2 * total + torch.sqrt((2 * total) ** 2 - 16 * (1 - min_overlap) * product)) / 2
    a3 = 4 * min_overlap
    r3 = -2 * min_overlap * total + torch.sqrt((2 * min_overlap * total) ** 2 - 4 * a3 * (min_overlap - 1) * product)
    return torch.minimum(torch.minimum(r1, r2), r3 / 2)


def render_heatmaps(
    targets: list[dict[str, torch.Tensor]], size: tuple[int, int], num_keypoints: int, box_scale: float = 1.0
) -> torch.Tensor:
    """Gaussian targets (B, K, h, w) at stride 4 for B target dicts ("boxes" (P, 4) xyxy, "keypoints" (P, K, 3)).

    As the authors draw them: the radius comes from each person's box in input pixels (times `box_scale`; 1/4
    measures the box in heatmap cells, as CenterNet does, for sharper peaks), the peak sits on the keypoint's
    integer stride-4 cell, sigma = (2r + 1) / 6, the square window of side 2r + 1 cuts the Gaussian, and
    overlapping people keep the maximum.
    """
    height, width = size
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :]
    maps = torch.zeros(len(targets), num_keypoints, height, width, device=device)
    for b, target in enumerate(targets):
        boxes, keypoints = target["boxes"].float(), target["keypoints"].float()
        if len(boxes) == 0:
            continue
        sizes = ((boxes[:, 2:] - boxes[:, :2]) * box_scale).ceil()
        radius = gaussian_radius(sizes[:, 0], sizes[:, 1]).clamp_min(0).floor()  # (P,)
        cells = torch.div(keypoints[..., :2], P2_STRIDE, rounding_mode="trunc")  # (P, K, 2)
        inside = (cells[..., 0] >= 0) & (cells[..., 0] < width) & (cells[..., 1] >= 0) & (cells[..., 1] < height)
        drawn = (keypoints[..., 2] > 0) & inside  # (P, K)
        person, joint = drawn.nonzero(as_tuple=True)
        if len(person) == 0:
            continue
        r = radius[person][:, None, None]  # (T, 1, 1)
        dx = xs[None] - cells[person, joint, 0][:, None, None]  # (T, 1, w)
        dy = ys[None] - cells[person, joint, 1][:, None, None]  # (T, h, 1)
        sigma = (2 * r + 1) / 6
        gauss = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))
        gauss = gauss * ((dx.abs() <= r) & (dy.abs() <= r))  # (T, h, w)
        per_joint = torch.zeros(num_keypoints, height, width, device=device)
        per_joint = per_joint.index_reduce(0, joint, gauss, "amax", include_self=True)
        maps[b] = per_joint
    return maps


def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet's penalty-reduced focal loss (alpha 2, beta 4), divided by the number of peaks (float32)."""
    prob = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    negative_weight = (1 - target) ** 4 * (1 - positive)
    positive_loss = (torch.log(prob) * (1 - prob) ** 2 * positive).sum()
    negative_loss = (torch.log(1 - prob) * prob**2 * negative_weight).sum()
    num_peaks = positive.sum()
    return -(positive_loss + negative_loss) / num_peaks.clamp_min(1.0)
