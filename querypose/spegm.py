"""Spatial Part Embedding Generation Module (paper section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from querypose.box_ops import coordinate_grid
from querypose.layers import xavier


class SPEGM(nn.Module):
    """RoI features -> M part embeddings through M spatial attention maps on an upsampled RoI.

    features (R, d, 14, 14) -> embeddings (R, M, d_p) and attention maps (R, M, 28, 28), each map summing to 1.
    With M = 7, d = 256, d_p = 128 it holds 1,098,119 parameters (the paper's 1.1M). With `coordinates` (beyond
    the paper, model.roi_coordinates=spegm) each map's expected position in the RoI, its soft-argmax, is
    projected into the embedding beside the pooled features.
    """

    def __init__(self, dim: int, part_dim: int, num_parts: int, coordinates: bool = False) -> None:
        super().__init__()
        self.coordinates = coordinates
        self.upsample = nn.Sequential(
            xavier(nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False)),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.attention = xavier(nn.Conv2d(dim, num_parts, kernel_size=3, padding=1), zero_bias=True)
        self.project = xavier(nn.Linear(dim + 2 * coordinates, part_dim), zero_bias=True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        upsampled = self.upsample(features)  # (R, d, 28, 28)
        logits = self.attention(upsampled)  # (R, M, 28, 28)
        attention = logits.flatten(2).softmax(dim=-1)  # (R, M, 784)
        values = upsampled.flatten(2)  # (R, d, 784)
        if self.coordinates:  # each part's attention-weighted mean position joins its embedding
            grid = coordinate_grid(upsampled.shape[-1], upsampled).flatten(2).expand(len(values), -1, -1)
            values = torch.cat([values, grid], dim=1)  # (R, d + 2, 784)
        pooled = torch.bmm(attention, values.transpose(1, 2))  # (R, M, d [+ 2])
        return self.project(pooled), attention.view_as(logits)
