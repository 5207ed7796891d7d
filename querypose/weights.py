"""Exported weights: a state_dict plus the model configuration it was trained with, in one torch file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from querypose.config import ModelConfig


def save_weights(model: nn.Module, cfg: ModelConfig, path: str | Path) -> Path:
    """Write {"model": state_dict, "model_config": dict} to `path` (through a temporary file and a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    module = model.module if hasattr(model, "module") else model
    torch.save({"model": module.state_dict(), "model_config": cfg.to_dict()}, staging)
    staging.replace(path)
    return path


def read_tensor_file(path: str | Path, what: str = "weights file") -> dict:
    """torch.load a dict of tensors safely (weights_only=True); every error names `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor files
        raise ValueError(f"{what} {path} could not be loaded: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{what} {path} does not hold a state_dict")
    return content


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Read weights saved by save_weights (or a bare state_dict); returns (state_dict, config or None)."""
    content = read_tensor_file(path)
    if "model" in content and isinstance(content["model"], dict):
        config = content.get("model_config")
        return content["model"], ModelConfig.from_dict(config) if config else None
    return content, None
