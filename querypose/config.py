"""Typed model configuration: every ablation switch of the paper is one validated field.

`ModelConfig()` is the paper's COCO R50 model. Ablation variants are enum-like strings (typing.Literal);
`ModelConfig.from_dict` rejects unknown keys, wrong types, values outside the allowed set and invalid
combinations with one `ConfigError` that names the dotted key and what is allowed.

The keypoint set is `dataset` (a built-in set) or, with `dataset: custom`, `keypoints`: a keypoint-set YAML or
shard manifest path, or the set's mapping (querypose.keypoints). A path is read when the config is validated and
replaced by the complete mapping, so every config that leaves the process (Ray workers, MLflow params, weights
files, ONNX metadata) carries the set itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from querypose.keypoints import KeypointSpec, get_spec, load_keypoint_set

QueryType = Literal["part", "instance"]
Interaction = Literal["spegm", "mhsa", "dymlp_channel", "dymlp_spatial", "spatial_attention"]
Iteration = Literal["selective", "sum", "concat", "none"]
PartDim = Literal[128, 32, 64, 256]
InstancePipeline = Literal["serial", "box_only"]
KeypointTrainingQueries = Literal["matched", "all"]
KeypointHead = Literal["queries", "conv_gap_baseline"]
ClassificationTarget = Literal["binary", "iou", "oks"]
InitBoxes = Literal["image", "grid"]
RoICoordinates = Literal["none", "tower", "spegm"]
KeypointReadout = Literal["regression", "soft_argmax"]
BackboneNorm = Literal["auto", "frozen_bn", "group_norm"]
Backbone = Literal["resnet50", "resnet18", "resnet10t", "resnet34", "resnet101", "hrnet_w32", "hrnet_w48", "swin_large"]
Dataset = Literal["coco", "crowdpose", "custom"]


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped, out of range or inconsistent; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    # The paper's ablation axes (Tables 1-6); defaults are the full COCO R50 model.
    query_type: QueryType = "part"
    interaction: Interaction = "spegm"
    iteration: Iteration = "selective"
    part_dim: PartDim = 128
    part_scheme: str = "rigid7"  # a scheme of the keypoint set: rigid7, per_joint, head_merged, limbs5 for people
    instance_pipeline: InstancePipeline = "serial"
    keypoint_head: KeypointHead = "queries"  # conv_gap_baseline ignores query_type/interaction/iteration
    num_queries: int = 100
    backbone: Backbone = "resnet50"
    num_stages: int = 6
    dataset: Dataset = "coco"  # a built-in keypoint set, or "custom" for the set in `keypoints`
    # The custom keypoint set: a path (keypoint-set YAML or a shard manifest.json) on input, its complete mapping
    # once validated. hash=False: a mapping is not hashable.
    keypoints: str | dict[str, Any] | None = field(default=None, hash=False)

    # Pretrained backbone weights: a timm model-hub name ("timm/resnet50.tv_in1k", fetched once into the Hugging
    # Face cache), a local checkpoint file, or "none" for random init on purpose. Object-store URIs (s3://, gs://)
    # are fetched to a local file by the platform before the model is built. None = not given: random init, which
    # the experiment config refuses for real data.
    backbone_weights: str | None = None
    # ResNet normalisation. frozen_bn is detectron2's recipe for pretrained weights (frozen statistics, stem and
    # first `freeze_backbone_at` stages frozen); group_norm trains from scratch (He et al., "Rethinking ImageNet
    # Pre-training") and is batch-size independent. auto = frozen_bn with backbone_weights, group_norm without.
    backbone_norm: BackboneNorm = "auto"
    freeze_backbone_at: int = (
        2  # detectron2's FREEZE_AT: stem + stages frozen (5 = all), frozen_bn or pretrained ResNets
    )

    # Widths. The paper's values; tests and CPU demos shrink them.
    hidden_dim: int = 256
    ffn_dim: int = 2048
    num_heads: int = 8
    dynamic_dim: int = 64
    tower_channels: int = 512
    tower_convs: int = 6

    # Set loss and matching (ARCHITECTURE.md section 2 "Losses").
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    rle_weight: float = 1.0
    keypoint_cost: float = 0.0  # weight of a (1 - OKS) matching term; 0 = the paper
    # Which queries the keypoint stages run on in training. "matched" (the paper, ~95% less tower compute) updates
    # only the matched queries' instance state, so under the serial pipeline the next box stage can tell matched
    # from unmatched queries by that update alone, a cue absent at inference where every query is updated.
    # "all" (beyond the paper) runs every query as inference does. keypoint_cost > 0 implies "all".
    keypoint_training_queries: KeypointTrainingQueries = "matched"
    # One-to-many supervision in training (beyond the paper; Group DETR, Chen et al. 2023): G groups of N queries,
    # each group matched one-to-one to the people on its own and attending only within itself, so every person
    # trains G queries per stage instead of one. Inference runs group 0 alone: the same N queries, still NMS-free.
    # 1 = the paper.
    query_groups: int = 1
    # Where the learned proposal boxes start. "image" (Sparse R-CNN's and the authors' default): every query's box
    # is the whole image, so the first stage's queries all pool the same RoI. "grid" (Sparse R-CNN's Table 6
    # alternative): centres on a near-square grid over the image, each box two cells wide and high, so the first
    # stage already pools local features.
    init_boxes: InitBoxes = "image"
    # Where the keypoint stages see positions within the RoI (beyond the paper). "none" (the paper): only through
    # the convolutions' zero padding, which the features learn to read slowly. "tower": two coordinate channels
    # (x, y relative to the RoI) join the pose RoI features before the tower, for every keypoint head. "spegm":
    # each SPEGM attention map's expected position (its soft-argmax) joins its part embedding.
    roi_coordinates: RoICoordinates = "none"
    # How part queries give keypoint positions (beyond the paper). "regression" (the paper): a linear head per part.
    # "soft_argmax": each keypoint's query-conditioned attention over the RoI tokens (its part query, or the
    # instance query), the map's expected position, plus the linear head's output as a residual
    # (querypose.keypoint_decoder.SoftArgmaxReadout).
    keypoint_readout: KeypointReadout = "regression"
    # Beyond the paper, with the soft-argmax readout: weight of a cross-entropy that pulls each keypoint's readout
    # attention over the RoI towards a Gaussian (one cell wide) at its labelled position, as integral pose
    # regression pairs its soft-argmax with a heatmap loss. The expected position alone cannot tell a map split
    # between two people's joints from one on the right joint; this term can. 0 = off.
    readout_map_weight: float = 0.0
    # Beyond the paper, inference only: with r > 0 the soft-argmax readout averages over the (2r + 1)^2 cells around
    # each map's peak instead of the whole RoI (a map with a second mode on a neighbour's joint reads its peak).
    # 0 = the whole RoI, as in training.
    readout_peak_window: int = 0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # What a matched query's classification is trained towards. "binary" (the paper): 1. "iou" / "oks" (beyond the
    # paper, quality-aware): the matched prediction's box IoU / pose OKS with its person, so that the score, and
    # with it the ranking of poses at inference, follows how good the pose is.
    cls_target: ClassificationTarget = "binary"
    # The authors' auxiliary keypoint-heatmap loss (AUX_KPS_HEATMAP), off in their configs: a heatmap head on P2
    # trained with CornerNet's focal loss on Gaussian targets; training only.
    aux_heatmap: bool = False
    aux_heatmap_weight: float = 0.5

    # Inference.
    test_short_side: int = 800
    test_max_size: int = 1333
    prune_queries_after_stage: int | None = None  # beyond the paper: keep top-k queries from this stage on
    prune_keep: int = 20

    def __post_init__(self) -> None:
        validate_fields(self, "model")
        # A frozen dataclass: the resolved set is cached with object.__setattr__ (not a field: equality and
        # serialisation go by `keypoints`).
        object.__setattr__(self, "_spec", self._resolve_keypoints())
        self._check_ranges()
        self._check_combinations()

    @property
    def spec(self) -> KeypointSpec:
        """The keypoint set the model predicts."""
        return self._spec

    def _resolve_keypoints(self) -> KeypointSpec:
        if self.dataset != "custom":
            if self.keypoints is not None:
                raise ConfigError(
                    f"model.keypoints: given, but model.dataset={self.dataset!r} is a built-in keypoint set; set "
                    "model.dataset=custom to use the keypoints given, or drop model.keypoints"
                )
            spec = get_spec(self.dataset)
        elif self.keypoints is None:
            raise ConfigError(
                "model.keypoints: missing: model.dataset=custom needs its keypoint set: a keypoint-set YAML, a "
                "converted shard set's manifest.json, or the set as a mapping"
            )
        else:
            try:
                if isinstance(self.keypoints, str):
                    spec = load_keypoint_set(self.keypoints)
                else:
                    spec = KeypointSpec.from_dict(self.keypoints, "model.keypoints")
            except (OSError, ValueError) as error:
                message = str(error)
                raise ConfigError(message if message.startswith("model.") else f"model.keypoints: {message}") from None
            object.__setattr__(self, "keypoints", spec.to_dict())
        if self.part_scheme not in spec.part_schemes:
            raise ConfigError(
                f"model.part_scheme: {self.part_scheme!r} is not allowed; allowed values: "
                f"{', '.join(map(repr, spec.part_schemes))} (the schemes of keypoint set {spec.name!r})"
            )
        return spec

    def _check_ranges(self) -> None:
        positive = ("num_queries", "query_groups", "num_stages", "hidden_dim", "ffn_dim", "num_heads", "dynamic_dim",
                    "tower_channels", "tower_convs", "test_short_side", "test_max_size", "prune_keep")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        weights = ("cls_weight", "l1_weight", "giou_weight", "rle_weight", "keypoint_cost", "aux_heatmap_weight",
                   "readout_map_weight")  # fmt: skip
        for name in weights:
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"model.hidden_dim: {self.hidden_dim} is not divisible by model.num_heads")
        if self.part_dim % self.num_heads:
            raise ConfigError(f"model.part_dim: {self.part_dim} is not divisible by model.num_heads")
        if not 0 <= self.freeze_backbone_at <= 5:
            raise ConfigError(f"model.freeze_backbone_at: must be in 0..5, got {self.freeze_backbone_at}")
        if self.test_max_size < self.test_short_side:
            raise ConfigError("model.test_max_size: must be >= model.test_short_side")
        stage = self.prune_queries_after_stage
        if stage is not None and not 1 <= stage < self.num_stages:
            raise ConfigError(
                f"model.prune_queries_after_stage: must be in 1..{self.num_stages - 1} "
                f"(model.num_stages={self.num_stages}) or null, got {stage}"
            )
        if stage is not None and self.prune_keep > self.num_queries:
            raise ConfigError(f"model.prune_keep: {self.prune_keep} exceeds model.num_queries={self.num_queries}")

    @property
    def resolved_backbone_norm(self) -> str | None:
        """The ResNet normalisation to build; None for the other backbones, which keep their own."""
        if not self.backbone.startswith("resnet"):
            return None
        if self.backbone_norm != "auto":
            return self.backbone_norm
        return "frozen_bn" if self.has_backbone_weights else "group_norm"

    @property
    def has_backbone_weights(self) -> bool:
        return self.backbone_weights is not None and self.backbone_weights.lower() != "none"

    def _check_combinations(self) -> None:
        if self.backbone_norm != "auto" and not self.backbone.startswith("resnet"):
            raise ConfigError(
                f"model.backbone_norm={self.backbone_norm!r} applies to ResNet backbones; "
                f"model.backbone={self.backbone!r} keeps its own normalisation, use 'auto'"
            )
        uses_spegm = self.keypoint_head == "queries" and self.query_type == "part" and self.interaction == "spegm"
        if self.roi_coordinates == "spegm" and not uses_spegm:
            raise ConfigError(
                "model.roi_coordinates='spegm' adds SPEGM's attention positions and needs part queries with "
                "model.interaction='spegm'; for the other keypoint heads use model.roi_coordinates='tower'"
            )
        if self.keypoint_readout == "soft_argmax" and self.keypoint_head != "queries":
            raise ConfigError(
                "model.keypoint_readout='soft_argmax' reads positions with the keypoint queries and needs "
                "model.keypoint_head='queries'; with the conv_gap_baseline head use 'regression'"
            )
        if self.readout_peak_window < 0:
            raise ConfigError(
                f"model.readout_peak_window: must be >= 0 (0: the whole RoI), got {self.readout_peak_window}"
            )
        if self.readout_peak_window > 0 and self.keypoint_readout != "soft_argmax":
            raise ConfigError(
                f"model.readout_peak_window={self.readout_peak_window} windows the soft-argmax readout and needs "
                "model.keypoint_readout='soft_argmax' (or readout_peak_window=0)"
            )
        if self.readout_map_weight > 0 and self.keypoint_readout != "soft_argmax":
            raise ConfigError(
                f"model.readout_map_weight={self.readout_map_weight} trains the soft-argmax readout's attention "
                "maps and needs model.keypoint_readout='soft_argmax' (or readout_map_weight=0)"
            )
        if self.keypoint_head == "conv_gap_baseline":
            return
        if self.query_type == "instance" and self.interaction == "spegm":
            raise ConfigError(
                "model.query_type='instance' cannot use model.interaction='spegm' (SPEGM makes part "
                "embeddings); with instance queries use one of: mhsa, dymlp_channel, dymlp_spatial, "
                "spatial_attention"
            )
        if self.query_type == "part" and self.interaction == "spatial_attention":
            raise ConfigError(
                "model.query_type='part' cannot use model.interaction='spatial_attention' (a single map for "
                "the instance query); with part queries use one of: spegm, mhsa, dymlp_channel, dymlp_spatial"
            )
        if self.query_type == "instance" and self.iteration != "none":
            raise ConfigError(
                f"model.iteration={self.iteration!r} iterates part queries and needs model.query_type='part'; "
                "with model.query_type='instance' set model.iteration='none'"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        return build_dataclass(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- generic typed loading, shared with querypose_platform.config --------------------------------------------


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a plain dict, checking keys and types; errors name `prefix.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(prefix, unknown[0])}: unknown key; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def validate_fields(instance: Any, prefix: str) -> None:
    """Type-check an already built dataclass (catches values passed straight to the constructor)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        _coerce(hints[f.name], getattr(instance, f.name), f"{prefix}.{f.name}")


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return build_dataclass(annotation, value, key)
    if origin is Literal:
        # bool is an int in Python; keep True from passing as 1.
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {annotation}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        value_type = args[1] if args else Any
        return {k: _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")
