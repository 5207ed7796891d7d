"""The decoder's initialisation, applied where each layer is built.

The authors' decoder runs `xavier_uniform_` over every weight with two or more dimensions of all box and keypoint
stages after building them, which overrides the layers' own initialisations (their heads' gain 0.01, the RoI
towers' MSRA fill, SPEGM's small normals). Here each layer is built with the initialisation it ends up with there;
biases keep what the layer's constructor gives unless the builder says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def xavier(layer: nn.Module, zero_bias: bool = False) -> nn.Module:
    """xavier_uniform_ on `layer.weight` (and zeros on its bias when asked); returns the layer."""
    nn.init.xavier_uniform_(layer.weight)
    if zero_bias and getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


@torch.no_grad()
def xavier_blocks(weight: torch.Tensor, rows_per_block: Sequence[int]) -> None:
    """xavier_uniform_ on consecutive row blocks of a (sum(rows), in) weight, each block with its own fans.

    Several small linear layers stored as one tensor (e.g. one per part) get the bounds the separate layers
    would have had."""
    for block in weight.split(list(rows_per_block), dim=0):
        nn.init.xavier_uniform_(block)


@torch.no_grad()
def linear_default_bias(bias: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's own bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for biases held as raw tensors."""
    bound = fan_in**-0.5
    nn.init.uniform_(bias, -bound, bound)
