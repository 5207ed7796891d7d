"""AdamW with the flow at 10x learning rate, linear warm-up + step decay, full-model gradient clipping."""

from __future__ import annotations

import bisect

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, flow_lr_mult: float = 10.0) -> torch.optim.AdamW:
    """Two parameter groups: the RLE flow (lr x flow_lr_mult) and everything else; frozen parameters skipped."""
    flow, rest = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_flow = name.startswith("flow.") or ".flow." in name  # also under DDP's "module." prefix
        (flow if is_flow else rest).append(parameter)
    groups = [{"params": rest, "lr": lr, "name": "model"}]
    if flow:
        groups.append({"params": flow, "lr": lr * flow_lr_mult, "name": "flow"})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(iteration: int, warmup_iters: int, warmup_factor: float, steps: tuple[int, ...], gamma: float) -> float:
    """Multiplier of the base learning rate at `iteration`: linear warm-up from warmup_factor, x gamma per step."""
    decay = gamma ** bisect.bisect_right(sorted(steps), iteration)
    if iteration >= warmup_iters:
        return decay
    alpha = iteration / warmup_iters
    return decay * (warmup_factor * (1 - alpha) + alpha)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.01,
    steps: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    steps = tuple(steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, warmup_iters, warmup_factor, steps, gamma)
    )


def clip_gradients(model: nn.Module, max_norm: float = 1.0) -> float:
    """Clip the norm of all gradients together; returns the norm before clipping."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
