"""One Sparse R-CNN box stage (paper eq. 1): RoIAlign 7x7 -> query self-attention -> DynamicConv -> FFN -> heads."""

from __future__ import annotations

import math

import torch
from torch import nn

from querypose.attention import MultiHeadAttention
from querypose.box_ops import MultiLevelRoIAlign, apply_deltas, image_of_rows, rois_from_boxes
from querypose.config import ModelConfig
from querypose.interactions import DynamicConv
from querypose.layers import xavier

BOX_POOL = 7
PRIOR_PROB = 0.01


def tower(dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [xavier(nn.Linear(dim, dim, bias=False)), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FeedForward(nn.Module):
    """x + FFN(x) followed by LayerNorm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(xavier(nn.Linear(dim, hidden)), nn.ReLU(inplace=True), xavier(nn.Linear(hidden, dim)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class BoxStage(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.pooler = MultiLevelRoIAlign(BOX_POOL)
        self.self_attention = MultiHeadAttention(dim, cfg.num_heads)
        self.norm_attention = nn.LayerNorm(dim)
        self.dynamic_conv = DynamicConv(dim, cfg.dynamic_dim, BOX_POOL * BOX_POOL)
        self.norm_dynamic = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.cls_tower = tower(dim, 1)
        self.reg_tower = tower(dim, 3)
        self.cls_logits = xavier(nn.Linear(dim, 1))
        self.bbox_deltas = xavier(nn.Linear(dim, 4))
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(
        self, features: list[torch.Tensor], boxes: torch.Tensor, queries: torch.Tensor, groups: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """boxes (B, N, 4) xyxy pixels (detached), queries (B, N, d) -> logits (B, N), boxes (B, N, 4), queries.

        With query groups (training only) B = images x groups: row b * groups + g is group g of image b, and the
        self-attention stays within a row, so within a group."""
        batch, num_queries, dim = queries.shape
        image_index = image_of_rows(torch.arange(batch, device=boxes.device), groups).repeat_interleave(num_queries)
        rois = rois_from_boxes(boxes.reshape(-1, 4), image_index)
        tokens = self.pooler(features, rois).flatten(2).transpose(1, 2)  # (B*N, 49, d)

        attended = self.self_attention(queries)  # among the N queries of an image
        queries = self.norm_attention(queries + attended).reshape(-1, dim)  # (B*N, d)
        queries = self.norm_dynamic(queries + self.dynamic_conv(queries, tokens))
        queries = self.ffn(queries)

        logits = self.cls_logits(self.cls_tower(queries)).view(batch, num_queries)
        deltas = self.bbox_deltas(self.reg_tower(queries))
        refined = apply_deltas(deltas, boxes.reshape(-1, 4)).view(batch, num_queries, 4)
        return logits, refined, queries.view(batch, num_queries, dim)
