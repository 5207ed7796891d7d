"""How part queries carry over from stage to stage: SIM (paper section 3.3) and the Table 2a alternatives.

Every variant maps the new part embeddings E (R, M, d_p) and the previous part queries Q (R, M, d_p) to the
updated queries (R, M, d_p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from querypose.layers import xavier


class SelectiveIteration(nn.Module):
    """SIM: gates from sigmoid(MLP(E + Q)) weigh the new embeddings against the previous queries. The MLP's
    hidden width is part_dim / 4 (the authors' reduction factor)."""

    def __init__(self, part_dim: int) -> None:
        super().__init__()
        hidden = part_dim // 4
        self.reduce = xavier(nn.Linear(part_dim, hidden, bias=False))
        self.norm = nn.LayerNorm(hidden)
        self.expand = xavier(nn.Linear(hidden, 2 * part_dim))
        self.last_gates: torch.Tensor | None = None  # (R, M, 2 d_p), kept for inspection and tests

    def forward(self, embeddings: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.expand(F.relu(self.norm(self.reduce(embeddings + previous)))))
        self.last_gates = gates.detach()
        gate_embedding, gate_previous = gates.chunk(2, dim=-1)
        return gate_embedding * embeddings + gate_previous * previous


class SumIteration(nn.Module):
    def __init__(self, part_dim: int) -> None:
        super().__init__()

    def forward(self, embeddings: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return embeddings + previous


class ConcatIteration(nn.Module):
    def __init__(self, part_dim: int) -> None:
        super().__init__()
        self.fuse = xavier(nn.Linear(2 * part_dim, part_dim))

    def forward(self, embeddings: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([embeddings, previous], dim=-1))


class NoIteration(nn.Module):
    def __init__(self, part_dim: int) -> None:
        super().__init__()

    def forward(self, embeddings: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return embeddings


ITERATIONS = {
    "selective": SelectiveIteration,
    "sum": SumIteration,
    "concat": ConcatIteration,
    "none": NoIteration,
}
