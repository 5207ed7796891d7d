"""timm backbone (features at strides 4, 8, 16, 32) + torchvision FPN -> P2..P5 with `hidden_dim` channels.

Pretrained weights come through timm's own loader (`pretrained_cfg_overlay`): a model-hub name is fetched once into
the Hugging Face cache (and read from it offline), a local file is read with `weights_only=True`; timm drops the
classifier and adapts what the architecture needs (e.g. Swin's relative-position tables).
"""

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

# config name -> (timm model name, out_indices of the stride 4/8/16/32 features, extra timm kwargs)
TIMM_BACKBONES = {
    "resnet10t": ("resnet10t", (1, 2, 3, 4), {}),
    "resnet18": ("resnet18", (1, 2, 3, 4), {}),
    "resnet34": ("resnet34", (1, 2, 3, 4), {}),
    "resnet50": ("resnet50", (1, 2, 3, 4), {}),
    "resnet101": ("resnet101", (1, 2, 3, 4), {}),
    # The four branches themselves (W32: 32/64/128/256 channels), as the authors' FPN reads them, not timm's
    # default "incre" modules (128..1024).
    "hrnet_w32": ("hrnet_w32", (1, 2, 3, 4), {"feature_location": ""}),
    "hrnet_w48": ("hrnet_w48", (1, 2, 3, 4), {"feature_location": ""}),
    # Window 7 at 224 px with stochastic depth 0.2: the authors' Swin-L (ImageNet-22k swin_large_patch4_window7_224).
    "swin_large": ("swin_large_patch4_window7_224", (0, 1, 2, 3), {"strict_img_size": False, "drop_path_rate": 0.2}),
}
HUB_PREFIXES = ("timm/", "hf-hub:")
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
            # dead when no weights overwrite it.
            kwargs = {**kwargs, "zero_init_last": False}
        self.body = create_body(cfg, timm_name, out_indices, kwargs)
        if norm == "frozen_bn":
            self.body = freeze_batch_norm_2d(self.body)
        if norm == "frozen_bn" or (norm is not None and cfg.has_backbone_weights):  # detectron2's FREEZE_AT
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


def weights_overlay(weights: str | None, timm_name: str) -> dict | None:
    """`model.backbone_weights` -> timm's pretrained_cfg_overlay ({"hf_hub_id": ...} or {"file": ...}), or None for
    random init. Errors name the key."""
    if weights is None or weights.lower() == "none":
        return None
    if "://" in weights:
        raise ValueError(
            f"model.backbone_weights={weights!r}: object-store URIs are fetched to a local file by the platform "
            "(querypose_platform) before the model is built; pass that local path here"
        )
    if weights.startswith(HUB_PREFIXES) and not Path(weights).is_file():
        hub_id = weights.removeprefix("hf-hub:")
        architecture = hub_id.split("/", 1)[-1].split(".", 1)[0]
        if hub_id.startswith("timm/") and architecture != timm_name:
            raise ValueError(
                f"model.backbone_weights={weights!r} holds timm's {architecture!r}, but the backbone is {timm_name!r}"
            )
        return {"hf_hub_id": hub_id}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: file {path} does not exist")
    return {"file": str(path.resolve())}


def create_body(cfg: ModelConfig, timm_name: str, out_indices: tuple[int, ...], kwargs: dict) -> nn.Module:
    """The timm features-only model with the configured pretrained weights, every randomly initialised
    parameter of it loaded from them."""
    overlay = weights_overlay(cfg.backbone_weights, timm_name)

    def create(seed: int, **pretrained) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(timm_name, features_only=True, out_indices=out_indices, **pretrained, **kwargs)

    if overlay is None:
        return timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
    try:
        body = create(0, pretrained=True, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        where = "in the Hugging Face cache or on the hub" if "hf_hub_id" in overlay else "a checkpoint for it"
        raise ValueError(
            f"model.backbone_weights={cfg.backbone_weights!r}: could not load weights for {timm_name!r} (is it "
            f"{where}?): {type(error).__name__}: {str(error)[:500]}"
        ) from error
    # timm loads into a features-only model non-strictly (the classifier is dropped), so a checkpoint that lacks
    # layers loads silently. A parameter still at its seed-0 random init was not in the file; parameters whose
    # init is constant (norm scales, zero biases) are the same for every seed and cannot be told apart.
    seed0, seed1 = _fingerprints(create(0)), _fingerprints(create(1))
    now = _fingerprints(body)
    missing = [name for name, print0 in seed0.items() if print0 != seed1[name] and now[name] == print0]
    if missing:
        raise ValueError(
            f"model.backbone_weights={cfg.backbone_weights!r} does not fit {timm_name!r}: {len(missing)} parameters "
            f"were not in it, e.g. {', '.join(missing[:5])}"
        )
    return body


def _fingerprints(module: nn.Module) -> dict[str, tuple[float, float]]:
    with torch.no_grad():
        return {
            name: (float(p.double().sum()), float(p.double().square().sum())) for name, p in module.named_parameters()
        }
