"""Spatial Part Embedding Generation Module (paper section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from querypose.layers import xavier


class SPEGM(nn.Module):
    """RoI features -> M part embeddings through M spatial attention maps on an upsampled RoI.

    features (R, d, 14, 14) -> embeddings (R, M, d_p) and attention maps (R, M, 28, 28), each map summing to 1.
    With M = 7, d = 256, d_p = 128 it holds 1,098,119 parameters (the paper's 1.1M).
    """

    def __init__(self, dim: int, part_dim: int, num_parts: int) -> None:
        super().__init__()
        self.upsample = nn.Sequential(
            xavier(nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False)),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.attention = xavier(nn.Conv2d(dim, num_parts, kernel_size=3, padding=1), zero_bias=True)
        self.project = xavier(nn.Linear(dim, part_dim), zero_bias=True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        upsampled = self.upsample(features)  # (R, d, 28, 28)
        logits = self.attention(upsampled)  # (R, M, 28, 28)
        attention = logits.flatten(2).softmax(dim=-1)  # (R, M, 784)
        pooled = torch.bmm(attention, upsampled.flatten(2).transpose(1, 2))  # (R, M, d)
        return self.project(pooled), attention.view_as(logits)
