"""Multi-head attention on torch.nn.functional.scaled_dot_product_attention (fused kernels).

Used for self-attention among instance queries, among part queries, and the `mhsa` interaction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from querypose.layers import xavier


class MultiHeadAttention(nn.Module):
    """nn.MultiheadAttention (batch_first, no dropout) computed with scaled_dot_product_attention.

    The parameters have nn.MultiheadAttention's names and shapes (in_proj_weight, in_proj_bias, out_proj), so
    checkpoints of either load into the other; out_proj starts xavier-uniform like every decoder weight. `fused = False` computes softmax(QK^T / sqrt(c)) V
    explicitly instead: the reference the fused path is tested against, and the benchmark's baseline.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = xavier(nn.Linear(dim, dim))  # the decoder's init; nn.MultiheadAttention keeps Linear's
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.fused = True

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, C) attends to context (B, Lk, C), or to itself when context is None -> (B, Lq, C)."""
        if context is None:  # one projection for q, k and v
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            weight_q, weight_kv = self.in_proj_weight.split([self.dim, 2 * self.dim])
            bias_q, bias_kv = self.in_proj_bias.split([self.dim, 2 * self.dim])
            q = F.linear(query, weight_q, bias_q)
            k, v = F.linear(context, weight_kv, bias_kv).chunk(2, dim=-1)
        q, k, v = (self._split_heads(x) for x in (q, k, v))  # (B, H, L, C / H)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, Lq, Lk)
            out = weights @ v
        batch, length = query.shape[:2]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim // self.num_heads).transpose(1, 2)  # B may be 0
