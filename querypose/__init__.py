"""QueryPose: sparse end-to-end multi-person pose regression (PyTorch only).

`build_model(ModelConfig(...))` returns the network. The heavy imports happen on first use, so importing
`querypose.config` (and validating a configuration) stays fast.
"""

from querypose.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "QueryPose", "build_model"]


def __getattr__(name: str):
    if name in ("QueryPose", "build_model"):
        from querypose import model

        return getattr(model, name)
    raise AttributeError(f"module 'querypose' has no attribute {name!r}")
