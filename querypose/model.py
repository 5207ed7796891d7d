"""QueryPose: backbone + FPN, S box stages and S keypoint stages, matched in training, NMS-free at inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from querypose.attention import MultiHeadAttention
from querypose.backbone import Backbone
from querypose.box_decoder import BoxStage
from querypose.box_ops import image_of_rows
from querypose.config import ModelConfig
from querypose.flow import RealNVP
from querypose.heatmap import HeatmapHead
from querypose.keypoint_decoder import KeypointStage
from querypose.matcher import HungarianMatcher
from querypose.transforms import pad_batch

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def decode_keypoints(mu: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Box-relative mu (R, K, 2) -> pixels: x = (mu_x + 0.5) * w + x1, likewise y."""
    size = (boxes[:, 2:] - boxes[:, :2])[:, None]  # (R, 1, 2)
    return (mu + 0.5) * size + boxes[:, None, :2]


def encode_keypoints(keypoints: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Pixels (R, K, 2) -> box-relative targets (x - x1) / w - 0.5; the inverse of decode_keypoints."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)[:, None]
    return (keypoints - boxes[:, None, :2]) / size - 0.5


class QueryPose(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = cfg.spec
        self.uses_part_queries = cfg.keypoint_head == "queries" and cfg.query_type == "part"
        # Part queries carry over to the next stage only when they are iterated (SIM/sum/concat, Table 2a). With
        # iteration "none" every stage starts from Q_P^0, token interactions (MHSA, DyMLP) included.
        self.carries_part_state = self.uses_part_queries and cfg.iteration != "none"
        # Whether a keypoint stage updates state that later stages read: the serial pipeline's instance queries,
        # or iterated part queries.
        self.keypoint_stages_carry_state = cfg.instance_pipeline == "serial" or self.carries_part_state
        self.channels_last = False
        num_parts = len(self.spec.parts(cfg.part_scheme))
        self.backbone = Backbone(cfg)
        self.box_stages = nn.ModuleList(BoxStage(cfg) for _ in range(cfg.num_stages))
        self.keypoint_stages = nn.ModuleList(KeypointStage(cfg, self.spec) for _ in range(cfg.num_stages))
        # query_groups x N rows: group g is rows g*N..(g+1)*N; inference reads group 0.
        self.init_boxes = nn.Embedding(cfg.query_groups * cfg.num_queries, 4)
        self.init_features = nn.Embedding(cfg.query_groups * cfg.num_queries, cfg.hidden_dim)
        if self.uses_part_queries:
            self.init_part_queries = nn.Embedding(num_parts, cfg.part_dim)
        self.flow = RealNVP()  # training only: the RLE loss's density of residuals
        if cfg.aux_heatmap:  # training only
            self.heatmap_head = HeatmapHead(cfg.hidden_dim, self.spec.num_keypoints)
        self.matcher = HungarianMatcher.from_config(cfg)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        with torch.no_grad():
            self.init_boxes.weight.copy_(initial_unit_boxes(self.cfg).repeat(self.cfg.query_groups, 1))

    # --- shared by training and inference -------------------------------------------------------------------

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """0..255 RGB (B, 3, H, W) -> (x - PIXEL_MEAN) / PIXEL_STD per channel."""
        return (images - self.pixel_mean) / self.pixel_std

    def _features(self, normalised: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        # Padding stays zero after normalisation, as if the image had been normalised before padding.
        device = normalised.device
        rows = torch.arange(normalised.shape[2], device=device)[None, :, None] < image_sizes[:, 0, None, None]
        cols = torch.arange(normalised.shape[3], device=device)[None, None, :] < image_sizes[:, 1, None, None]
        normalised = normalised * (rows & cols)[:, None].to(normalised.dtype)
        if self.channels_last:
            normalised = normalised.contiguous(memory_format=torch.channels_last)
        # roi_align reads NCHW and would copy a channels-last level in every stage's call: convert once here.
        return [level.contiguous() for level in self.backbone(normalised)]

    def set_inference_options(self, *, channels_last: bool = True, fused_attention: bool = True) -> QueryPose:
        """Execution options that leave the outputs equal to float tolerance (tests/test_model.py checks both).

        channels_last: NHWC convolutions in the backbone, FPN, RoI towers and SPEGM (their weights converted;
        activations follow the weights, and the RoI tower's (R, 196, d) tokens become a free view).
        fused_attention: scaled_dot_product_attention instead of explicit softmax(QK^T)V.
        Both on is the fast setting, both off the plain path; a new model has channels_last off and fused
        attention on. Returns self.
        """
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=memory_format)
        self.keypoint_stages.to(memory_format=memory_format)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.fused = fused_attention
        return self

    def _initial_state(
        self, image_sizes: torch.Tensor, groups: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first `groups` query groups of every image as (B * groups, N, ...) rows (row b * groups + g): boxes
        (B G, N, 4), instance (B G, N, d), parts (B G, N, M, d_p) or None."""
        batch, num_queries = image_sizes.shape[0], self.cfg.num_queries
        rows = groups * num_queries
        whwh = image_sizes.flip(1).repeat(1, 2).to(self.init_boxes.weight)  # (B, 4) = (w, h, w, h)
        unit_boxes = box_convert(self.init_boxes.weight[:rows], "cxcywh", "xyxy").view(1, groups, num_queries, 4)
        boxes = (unit_boxes * whwh[:, None, None]).flatten(0, 1)  # (B*G, N, 4)
        instance = self.init_features.weight[:rows].view(1, groups, num_queries, -1)
        instance = instance.expand(batch, -1, -1, -1).flatten(0, 1)  # (B*G, N, d)
        parts = None
        if self.uses_part_queries:
            parts = self.init_part_queries.weight[None, None].expand(batch * groups, num_queries, -1, -1)
        return boxes, instance, parts

    def _keypoint_stage(self, stage, p2, boxes, instance, parts, batch_index, query_index, groups=1):
        """Run keypoint stage `stage` on the selected (batch_index, query_index) queries and scatter the updated
        query state back, so each query's part state stays its own across stages. batch_index counts rows of
        the (B * groups, N) state; its image is batch_index // groups."""
        out = self.keypoint_stages[stage](
            p2,
            boxes[batch_index, query_index],
            image_of_rows(batch_index, groups),
            instance[batch_index, query_index],
            None if parts is None else parts[batch_index, query_index],
        )
        # Under autocast the updates may come back in bf16; the state keeps its own dtype.
        instance = instance.index_put((batch_index, query_index), out["instance_queries"].to(instance.dtype))
        if self.carries_part_state:
            parts = parts.index_put((batch_index, query_index), out["part_queries"].to(parts.dtype))
        return out, instance, parts

    # --- training ------------------------------------------------------------------------------------------

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, list[dict]]:
        """images (B, 3, H, W) float 0..255 RGB, zero-padded; image_sizes (B, 2) [h, w]; targets: B dicts with
        "boxes" (P, 4) xyxy pixels and "keypoints" (P, K, 3).

        Returns {"stages": [...], "query_groups": G}, per stage: logits (B G, N), boxes (B G, N, 4), indices
        (B G pairs of matched (pred_idx, gt_idx); row b G + g is query group g of image b, matched to image b's
        people), keypoint_mu / keypoint_sigma (T, K, 2) for the T matched queries in indices order,
        keypoint_boxes (T, 4) the detached boxes they are relative to, and with the soft-argmax readout
        keypoint_readout_logits (T, K, 196) its maps; with model.aux_heatmap also "heatmap" (B, K, H/4, W/4) logits. G = model.query_groups (1: the paper).
        """
        groups = self.cfg.query_groups
        targets, image_sizes = per_group_rows(targets, image_sizes, groups)
        features = self._features(self.normalise(images), image_sizes[::groups])
        boxes, instance, parts = self._initial_state(image_sizes[::groups], groups)
        stages = []
        for stage in range(self.cfg.num_stages):
            logits, refined, instance = self.box_stages[stage](features, boxes, instance, groups)
            boxes = refined.detach()
            if self.cfg.keypoint_cost > 0 or self.cfg.keypoint_training_queries == "all":
                stage_out = self._match_after_all_queries(
                    stage, features[0], logits, boxes, instance, parts, targets, image_sizes, groups
                )
                out, instance, parts, indices, batch_index, query_index = stage_out
            else:
                indices = self.matcher(logits, refined, targets, image_sizes)
                batch_index, query_index = _flatten_indices(indices, boxes.device)
                out, instance, parts = self._keypoint_stage(
                    stage, features[0], boxes, instance, parts, batch_index, query_index, groups
                )
            stages.append(
                {
                    "logits": logits,
                    "boxes": refined,
                    "indices": indices,
                    "keypoint_mu": out["mu"],
                    "keypoint_sigma": out["sigma"],
                    "keypoint_boxes": boxes[batch_index, query_index],
                }
            )
            if "readout_logits" in out:
                stages[-1]["keypoint_readout_logits"] = out["readout_logits"]
        outputs = {"stages": stages, "query_groups": groups}
        if self.cfg.aux_heatmap:
            outputs["heatmap"] = self.heatmap_head(features[0])
        return outputs

    def _match_after_all_queries(self, stage, p2, logits, boxes, instance, parts, targets, image_sizes, groups):
        """Run keypoint stage `stage` on all N queries (poses at stage s depend only on B^s), then match, on boxes
        and, with keypoint_cost > 0, on poses too; keep the matched rows' outputs."""
        batch, num_queries = logits.shape
        out, instance, parts = self._keypoint_stage_all(stage, p2, boxes, instance, parts, groups)
        pixels = None
        if self.cfg.keypoint_cost > 0:
            pixels = decode_keypoints(out["mu"], boxes.reshape(-1, 4)).view(batch, num_queries, -1, 2)
        indices = self.matcher(logits, boxes, targets, image_sizes, keypoints=pixels)
        batch_index, query_index = _flatten_indices(indices, boxes.device)
        rows = batch_index * num_queries + query_index
        selected = {name: out[name][rows] for name in ("mu", "sigma", "readout_logits") if name in out}
        return selected, instance, parts, indices, batch_index, query_index

    # --- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def inference(
        self, images: torch.Tensor, image_sizes: torch.Tensor, return_attention: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """All queries through every stage; the last stage's poses per image, best first, no NMS.

        images (B, 3, H, W) float 0..255 RGB, zero-padded; image_sizes (B, 2) [h, w]. Returns per image: boxes
        (N', 4) and keypoints (N', K, 3) [x, y, 1 - sigma] in input pixels, scores (N',) = sigmoid(cls) *
        mean_k(1 - sigma_k), and attention (N', M, 28, 28) on request (SPEGM models). N' = N, or prune_keep when
        prune_queries_after_stage is set.
        """
        poses = self.poses(self.normalise(images), image_sizes, return_attention)
        sigma = poses.pop("keypoint_sigmas")
        confidence = 1 - sigma.mean(-1, keepdim=True)  # (B, N, K, 1)
        poses["keypoints"] = torch.cat([poses["keypoints"], confidence], dim=-1)
        order = poses["scores"].argsort(dim=1, descending=True)  # (B, N), best first
        ranked = {name: _gather(value, order) for name, value in poses.items()}
        return [{name: value[b] for name, value in ranked.items()} for b in range(len(order))]

    def poses(
        self, normalised: torch.Tensor, image_sizes: torch.Tensor, return_attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """The inference graph (what experiments/export.py writes to ONNX): every query's pose, unsorted.

        normalised (B, 3, H, W) = self.normalise(0..255 RGB), zero-padded; image_sizes (B, 2) [h, w] before padding.
        Returns boxes (B, N', 4) xyxy and keypoints (B, N', K, 2) in input pixels (continuous: pixel i spans
        [i, i + 1)), keypoint_sigmas (B, N', K, 2) (RLE's per-coordinate scale, relative to the box), scores
        (B, N') = sigmoid(cls) * mean_k(1 - mean(sigma_k)), and attention (B, N', M, 28, 28) on request.
        """
        features = self._features(normalised, image_sizes)
        boxes, instance, parts = self._initial_state(image_sizes)
        for stage in range(self.cfg.num_stages):
            logits, boxes, instance = self.box_stages[stage](features, boxes, instance)
            # Only the last stage's poses are returned: an earlier keypoint stage runs only when the next stages
            # read the query state it updates (the serial pipeline's Q_I, iterated part queries).
            if stage == self.cfg.num_stages - 1 or self.keypoint_stages_carry_state:
                out, instance, parts = self._keypoint_stage_all(stage, features[0], boxes, instance, parts)
            if self.cfg.prune_queries_after_stage == stage + 1:  # never the last stage: `out` is recomputed
                keep = logits.topk(self.cfg.prune_keep, dim=1).indices  # (B, k)
                boxes, instance, logits = _gather(boxes, keep), _gather(instance, keep), _gather(logits, keep)
                parts = None if parts is None else _gather(parts, keep)
        batch, num_queries = logits.shape
        sigma = out["sigma"].view(batch, num_queries, -1, 2)
        poses = {
            "boxes": boxes,
            "keypoints": decode_keypoints(out["mu"], boxes.reshape(-1, 4)).view(batch, num_queries, -1, 2),
            "keypoint_sigmas": sigma,
            "scores": logits.sigmoid() * (1 - sigma.mean(-1)).mean(-1),
        }
        if return_attention and "attention" in out:
            poses["attention"] = out["attention"].view(batch, num_queries, *out["attention"].shape[1:])
        return poses

    def _keypoint_stage_all(self, stage, p2, boxes, instance, parts, groups=1):
        """Keypoint stage `stage` on every query of every image: the (B, N, ...) state reshaped, no gather or
        scatter. boxes (B, N, 4), instance (B, N, d), parts (B, N, M, d_p) or None; with query groups B counts
        (image, group) rows, image = row // groups."""
        batch, num_queries = boxes.shape[:2]
        image_index = image_of_rows(torch.arange(batch, device=boxes.device), groups).repeat_interleave(num_queries)
        out = self.keypoint_stages[stage](
            p2,
            boxes.reshape(-1, 4),
            image_index,
            instance.flatten(0, 1),
            None if parts is None else parts.flatten(0, 1),
        )
        instance = out["instance_queries"].view(batch, num_queries, -1)
        if self.carries_part_state:
            parts = out["part_queries"].view(batch, num_queries, *parts.shape[2:])
        return out, instance, parts

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], return_attention: bool = False) -> list[dict[str, torch.Tensor]]:
        """CHW float 0..255 RGB images of any sizes -> per image poses in that image's own pixels."""
        device = self.pixel_mean.device
        resized, scales = [], []
        for image in images:
            height, width = image.shape[-2:]
            scale = min(self.cfg.test_short_side / min(height, width), self.cfg.test_max_size / max(height, width))
            size = (round(height * scale), round(width * scale))
            resized.append(
                F.interpolate(image[None].float().to(device), size=size, mode="bilinear", align_corners=False)[0]
            )
            scales.append(torch.tensor([size[1] / width, size[0] / height], device=device))
        batch, image_sizes = pad_batch(resized)
        results = self.inference(batch, image_sizes.to(device), return_attention)
        for result, (sx, sy), image in zip(results, scales, images, strict=True):
            height, width = image.shape[-2:]
            result["boxes"] = result["boxes"] / torch.stack([sx, sy, sx, sy])
            result["boxes"][:, 0::2] = result["boxes"][:, 0::2].clamp(0, width)
            result["boxes"][:, 1::2] = result["boxes"][:, 1::2].clamp(0, height)
            result["keypoints"][..., 0] /= sx
            result["keypoints"][..., 1] /= sy
        return results


def initial_unit_boxes(cfg: ModelConfig) -> torch.Tensor:
    """The proposal boxes' starting values (N, 4) as (cx, cy, w, h) relative to the image (model.init_boxes)."""
    num_queries = cfg.num_queries
    if cfg.init_boxes == "image":
        return torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_queries, 1)
    cols = math.ceil(math.sqrt(num_queries))
    rows = math.ceil(num_queries / cols)
    cells = torch.arange(num_queries)
    cx, cy = (cells % cols + 0.5) / cols, (cells // cols + 0.5) / rows
    size = torch.tensor([min(1.0, 2 / cols), min(1.0, 2 / rows)]).expand(num_queries, 2)
    return torch.cat([torch.stack([cx, cy], dim=1), size], dim=1)


def per_group_rows(
    targets: list[dict[str, torch.Tensor]], image_sizes: torch.Tensor, groups: int
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Targets and image sizes for the (B * groups) query-group rows, row b * groups + g holding image b's: every
    group is matched to the same people."""
    if groups == 1:
        return targets, image_sizes
    return [target for target in targets for _ in range(groups)], image_sizes.repeat_interleave(groups, dim=0)


def _flatten_indices(indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched pairs per image -> (batch_index, query_index), image by image in indices order."""
    batch_index = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)]).to(device)
    query_index = torch.cat([pred for pred, _ in indices]).to(device)
    return batch_index, query_index


def _gather(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) and keep (B, k) -> (B, k, ...)."""
    index = keep.view(*keep.shape, *([1] * (x.dim() - 2))).expand(*keep.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def build_model(cfg: ModelConfig) -> QueryPose:
    return QueryPose(cfg)
