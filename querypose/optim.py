"""AdamW with the flow at 10x learning rate, linear warm-up + step decay, full-model gradient clipping."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    flow_lr_mult: float = 10.0,
    flow: nn.Module | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in two groups: "model" at `lr` and "flow" at `lr * flow_lr_mult`.

    The flow's parameters are those of `flow` when given, else every parameter whose name has a `flow.`
    component (`flow.s.0.weight`, or `module.flow...` under DistributedDataParallel). Frozen parameters
    (requires_grad=False, e.g. the frozen backbone stem) are left out.
    """
    flow_ids = {id(p) for p in flow.parameters()} if flow is not None else set()
    flow_params, rest = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_flow = id(parameter) in flow_ids if flow is not None else "flow" in name.split(".")[:-1]
        (flow_params if is_flow else rest).append(parameter)
    if flow is not None:  # a flow outside the model (e.g. owned by the criterion) is trained too
        known = {id(p) for p in flow_params}
        flow_params += [p for p in flow.parameters() if p.requires_grad and id(p) not in known]
    groups = [{"params": rest, "lr": lr, "name": "model"}]
    if flow_params:
        groups.append({"params": flow_params, "lr": lr * flow_lr_mult, "name": "flow"})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(iteration: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at `iteration`: linear warm-up from `warmup_factor` to 1 over
    `warmup_iters`, times `gamma` for every milestone in `steps` already reached (detectron2's WarmupMultiStep)."""
    decay = gamma ** bisect.bisect_right(sorted(steps), iteration)
    if iteration >= warmup_iters:
        return decay
    alpha = iteration / warmup_iters
    return decay * (warmup_factor * (1 - alpha) + alpha)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.01,
    steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: call `scheduler.step()` after every optimiser step. Every group keeps its own
    base lr (the flow stays at 10x)."""
    if warmup_iters < 0 or not 0 < warmup_factor <= 1:
        raise ValueError(f"build_scheduler: need warmup_iters >= 0 and 0 < warmup_factor <= 1, got "
                         f"{warmup_iters}, {warmup_factor}")  # fmt: skip
    steps = tuple(steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, warmup_iters, warmup_factor, steps, gamma)
    )


def clip_gradients(model: nn.Module, max_norm: float = 1.0) -> float:
    """Clip the norm of all gradients together (one norm over the whole model); returns the norm before
    clipping. `max_norm <= 0` only measures."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        return 0.0
    if max_norm <= 0:
        return float(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s weights and buffers (the plain module, not a DDP wrapper): call
    `ema.update_parameters(model)` after each optimiser step and evaluate `ema.module`. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n
    updates so far (timm's ModelEmaV3 warm-up), so the early average is not dominated by the initial weights."""
    if not 0 < decay < 1:
        raise ValueError(f"build_ema: decay must be in (0, 1), got {decay}")

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floating:  # the tensors come grouped by dtype: a group may hold only integer buffers
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():  # e.g. BatchNorm's num_batches_tracked
                a.copy_(c)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)
