"""timm backbone (features at strides 4, 8, 16, 32) + torchvision FPN -> P2..P5 with `hidden_dim` channels."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from timm.layers import GroupNorm, freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from querypose.config import ModelConfig
from querypose.weights import read_tensor_file

# config name -> (timm model name, out_indices of the stride 4/8/16/32 features, extra timm kwargs)
TIMM_BACKBONES = {
    "resnet10t": ("resnet10t", (1, 2, 3, 4), {}),
    "resnet18": ("resnet18", (1, 2, 3, 4), {}),
    "resnet34": ("resnet34", (1, 2, 3, 4), {}),
    "resnet50": ("resnet50", (1, 2, 3, 4), {}),
    "resnet101": ("resnet101", (1, 2, 3, 4), {}),
    "hrnet_w32": ("hrnet_w32", (1, 2, 3, 4), {}),
    "hrnet_w48": ("hrnet_w48", (1, 2, 3, 4), {}),
    "swin_large": ("swin_large_patch4_window12_384", (0, 1, 2, 3), {"strict_img_size": False}),
}
# Stem and first stage modules frozen by `freeze_backbone_at` (detectron2's FREEZE_AT) for ResNets.
RESNET_FREEZE_ORDER = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


class Backbone(nn.Module):
    """images (B, 3, H, W), normalised -> [P2, P3, P4, P5], each (B, hidden_dim, H / s, W / s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        timm_name, out_indices, kwargs = TIMM_BACKBONES[cfg.backbone]
        norm = cfg.resolved_backbone_norm
        if norm == "group_norm":
            kwargs = {**kwargs, "norm_layer": group_norm}
        elif norm == "frozen_bn":
            # timm zero-initialises each block's last BN scale; frozen at zero, every residual branch would stay
            # dead when no weights file overwrites it.
            kwargs = {**kwargs, "zero_init_last": False}
        self.body = timm.create_model(
            timm_name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs
        )
        if cfg.backbone_weights:
            load_backbone_weights(self.body, cfg.backbone_weights)
        if norm == "frozen_bn":
            self.body = freeze_batch_norm_2d(self.body)
            self._freeze(cfg.freeze_backbone_at)
        self.channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(self.channels, cfg.hidden_dim)

    def _freeze(self, freeze_at: int) -> None:
        for names in RESNET_FREEZE_ORDER[:freeze_at]:
            for name in names:
                for parameter in getattr(self.body, name).parameters():
                    parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(images)
        # Swin returns channels-last maps: bring every level to (B, C, H, W).
        features = [
            f.permute(0, 3, 1, 2) if f.shape[1] != c else f for f, c in zip(features, self.channels, strict=True)
        ]
        pyramid = self.fpn(OrderedDict((f"p{i + 2}", f) for i, f in enumerate(features)))
        return list(pyramid.values())


def group_norm(num_channels: int, **kwargs) -> GroupNorm:
    """GroupNorm with 32 groups, or fewer where the width does not divide (resnet10t's 24-channel stem)."""
    return GroupNorm(num_channels, num_groups=math.gcd(32, num_channels), **kwargs)


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a local timm checkpoint into the features-only backbone, naming the file in every error."""
    state = read_tensor_file(path, "backbone weights file")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    # BatchNorm's step counter means nothing to frozen statistics; a classification checkpoint's head (fc.*) has
    # no place in a features-only model.
    expected = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {
        k: v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked") and (k in expected or not k.startswith(("fc.", "head", "classifier")))
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"backbone weights file {path} does not match the backbone: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    body.load_state_dict(state, strict=False)
