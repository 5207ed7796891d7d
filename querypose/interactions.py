"""How queries read RoI features: the interaction variants of the paper's Table 1.

Every interaction maps queries (R, Q, C) and RoI tokens (R, L, C) to embeddings (R, Q, C): one per query.
With instance queries Q = 1 and C = d; with part queries Q = M and C = d_p (tokens projected to d_p first).
SPEGM (spegm.py) and spatial attention read the RoI as a feature map (tokens reshaped back to 14 x 14).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from querypose.attention import MultiHeadAttention
from querypose.layers import xavier
from querypose.spegm import SPEGM


class DynamicConv(nn.Module):
    """Sparse R-CNN's dynamic interaction (DyMLP-channel): each query generates a 2-layer MLP for the tokens.

    query (R, C), tokens (R, L, C) -> (R, C).
    """

    def __init__(self, dim: int, dynamic_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.dim, self.dynamic_dim = dim, dynamic_dim
        self.generate = xavier(nn.Linear(dim, 2 * dim * dynamic_dim))
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.out = xavier(nn.Linear(num_tokens * dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        params = self.generate(query)  # (R, 2 * C * D)
        w1 = params[:, : self.dim * self.dynamic_dim].view(-1, self.dim, self.dynamic_dim)  # (R, C, D)
        w2 = params[:, self.dim * self.dynamic_dim :].view(-1, self.dynamic_dim, self.dim)  # (R, D, C)
        x = F.relu(self.norm1(torch.bmm(tokens, w1)))  # (R, L, D)
        x = F.relu(self.norm2(torch.bmm(x, w2)))  # (R, L, C)
        return F.relu(self.norm3(self.out(x.flatten(1))))  # (R, C)


class DynamicChannelInteraction(nn.Module):
    """DyMLP-channel for any number of queries per RoI: one DynamicConv per query over the shared tokens."""

    def __init__(self, dim: int, dynamic_dim: int, num_tokens: int, num_heads: int) -> None:
        super().__init__()
        self.dynamic_conv = DynamicConv(dim, dynamic_dim, num_tokens)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        num_rois, num_queries, dim = queries.shape
        shared = tokens.repeat_interleave(num_queries, dim=0)  # (R*Q, L, C)
        return self.dynamic_conv(queries.reshape(-1, dim), shared).view(num_rois, num_queries, dim)


class SelfAttentionInteraction(nn.Module):
    """MHSA over [queries; tokens], keeping the queries' outputs."""

    def __init__(self, dim: int, dynamic_dim: int, num_tokens: int, num_heads: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, num_heads)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.attention(queries, torch.cat([queries, tokens], dim=1))  # keys/values (R, Q + L, C)


class DynamicSpatialInteraction(nn.Module):
    """DyMLP-spatial: each query generates an MLP that mixes the L token positions (L -> D -> L), then pools."""

    def __init__(self, dim: int, dynamic_dim: int, num_tokens: int, num_heads: int) -> None:
        super().__init__()
        self.num_tokens, self.dynamic_dim = num_tokens, dynamic_dim
        self.generate = xavier(nn.Linear(dim, 2 * num_tokens * dynamic_dim))
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(num_tokens)
        self.out = xavier(nn.Linear(dim, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        num_rois, num_queries, dim = queries.shape
        params = self.generate(queries.reshape(-1, dim))  # (R*Q, 2 * L * D)
        split = self.num_tokens * self.dynamic_dim
        w1 = params[:, :split].view(-1, self.num_tokens, self.dynamic_dim)  # (R*Q, L, D)
        w2 = params[:, split:].view(-1, self.dynamic_dim, self.num_tokens)  # (R*Q, D, L)
        channels_first = tokens.transpose(1, 2).repeat_interleave(num_queries, dim=0)  # (R*Q, C, L)
        x = F.relu(self.norm1(torch.bmm(channels_first, w1)))  # (R*Q, C, D)
        x = F.relu(self.norm2(torch.bmm(x, w2)))  # (R*Q, C, L)
        return self.out(x.mean(dim=2)).view(num_rois, num_queries, dim)


class SpatialAttentionInteraction(nn.Module):
    """ "Spatial Attn." of Table 1: one global spatial attention map over the upsampled RoI pools it into a single
    embedding that enhances the instance query; SPEGM's mechanism with one map instead of one per part."""

    def __init__(self, dim: int, dynamic_dim: int, num_tokens: int, num_heads: int) -> None:
        super().__init__()
        self.side = math.isqrt(num_tokens)
        self.pool = SPEGM(dim, dim, num_parts=1)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = tokens.transpose(1, 2).unflatten(2, (self.side, self.side))  # (R, C, 14, 14)
        embedding, _ = self.pool(features)  # (R, 1, C)
        return embedding.expand(-1, queries.shape[1], -1)


# The Table 1 variants that read tokens; `spegm` is built by the keypoint decoder from spegm.py.
TOKEN_INTERACTIONS = {
    "mhsa": SelfAttentionInteraction,
    "dymlp_channel": DynamicChannelInteraction,
    "dymlp_spatial": DynamicSpatialInteraction,
    "spatial_attention": SpatialAttentionInteraction,
}
