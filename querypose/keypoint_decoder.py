"""One keypoint stage (paper eq. 2, Figure 3b): RoI tower -> instance branch -> part embeddings -> iteration ->
part self-attention -> per-part heads. The variants of Tables 1, 2 and 3 are switches of this one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from querypose.attention import MultiHeadAttention
from querypose.box_decoder import FeedForward
from querypose.box_ops import coordinate_grid, rois_from_boxes
from querypose.config import ModelConfig
from querypose.interactions import TOKEN_INTERACTIONS
from querypose.iteration import ITERATIONS, SelectiveIteration
from querypose.keypoints import KeypointSpec
from querypose.layers import linear_default_bias, xavier, xavier_blocks
from querypose.spegm import SPEGM

POSE_POOL = 14
P2_STRIDE = 4
NUM_TOKENS = POSE_POOL * POSE_POOL


def norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ W^T / ||x|| + b: the product is divided by the input's L2 norm, so the output ignores x's scale."""
    return F.linear(x, weight) / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) + bias


class NormLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_linear(x, self.weight, self.bias)


class PartHeads(nn.Module):
    """Non-shared linear heads, one per part: part m regresses (mu, sigma) for its own |part m| keypoints.

    All parts' weights sit in one tensor and each output coordinate gathers its part's query, so the heads
    run as one batched op; each part's rows are initialised as its own xavier-uniform Linear(d_p, 2 |part m|)
    with Linear's bias. queries (R, M, d_p) -> mu, sigma (R, K, 2) in keypoint order.
    """

    def __init__(self, part_dim: int, spec: KeypointSpec, scheme: str) -> None:
        super().__init__()
        parts = spec.parts(scheme)
        part_of_keypoint = [m for m, part in enumerate(parts) for _ in part]  # in part order
        self.register_buffer("part_of_output", torch.tensor(part_of_keypoint).repeat_interleave(2), persistent=False)
        self.register_buffer("to_keypoint_order", torch.from_numpy(spec.inverse_part_order(scheme)), persistent=False)
        outputs = 2 * spec.num_keypoints
        self.mu_weight = nn.Parameter(torch.empty(outputs, part_dim))
        self.mu_bias = nn.Parameter(torch.empty(outputs))
        self.sigma_weight = nn.Parameter(torch.empty(outputs, part_dim))
        self.sigma_bias = nn.Parameter(torch.empty(outputs))
        rows_per_part = [2 * len(part) for part in parts]
        for weight, bias in ((self.mu_weight, self.mu_bias), (self.sigma_weight, self.sigma_bias)):
            xavier_blocks(weight, rows_per_part)
            linear_default_bias(bias, part_dim)

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_output = queries[:, self.part_of_output]  # (R, 2K, d_p): each coordinate's own part query
        norm = per_output.norm(dim=-1).clamp_min(1e-6)
        mu = (per_output * self.mu_weight).sum(-1) / norm + self.mu_bias  # (R, 2K)
        sigma = torch.sigmoid((per_output * self.sigma_weight).sum(-1) + self.sigma_bias)
        shape = (queries.shape[0], len(self.to_keypoint_order), 2)  # R may be 0: an image without people
        mu = mu.view(shape)[:, self.to_keypoint_order]
        sigma = sigma.view(shape)[:, self.to_keypoint_order]
        return mu, sigma


class SoftArgmaxReadout(nn.Module):
    """Beyond the paper (model.keypoint_readout=soft_argmax): each keypoint's position read from the RoI.

    Keypoint k's query (its part query, or the instance query for instance rows), projected by the keypoint's own
    (d_q -> d) matrix, attends over the RoI tokens; the attention map's expected cell centre (its soft-argmax) is
    the keypoint's position, to which the regression head's mu adds a residual. A linear head must learn positions
    as directions in query space; here the tokens that look like the keypoint point at it, which a randomly
    initialised model learns in far fewer steps.
    With peak_window r > 0, inference (not training) takes the expectation over the (2r + 1)^2 cells around each
    map's peak only, so a map with a second mode (the same joint of a neighbour in the RoI) reads its peak's
    position instead of a point between the two.
    queries (R, Q, d_q), tokens (R, S*S, d) -> positions (R, K, 2) box-relative (-0.5 .. 0.5) and the maps'
    logits (R, K, S*S), both in keypoint order.
    """

    def __init__(
        self,
        dim: int,
        query_dim: int,
        query_of_keypoint: list[int],
        to_keypoint_order: torch.Tensor,
        peak_window: int = 0,
    ):
        super().__init__()
        self.peak_window = peak_window
        self.register_buffer("query_of_keypoint", torch.tensor(query_of_keypoint), persistent=False)
        self.register_buffer("to_keypoint_order", to_keypoint_order, persistent=False)
        self.keys = nn.Parameter(torch.empty(len(query_of_keypoint), dim, query_dim))
        for key in self.keys:
            nn.init.xavier_uniform_(key)

    @classmethod
    def for_parts(
        cls, dim: int, part_dim: int, spec: KeypointSpec, scheme: str, peak_window: int = 0
    ) -> SoftArgmaxReadout:
        """Part queries (R, M, d_p) in the scheme's part order; keys are held in that order."""
        parts = spec.parts(scheme)
        part_of_keypoint = [m for m, part in enumerate(parts) for _ in part]
        return cls(dim, part_dim, part_of_keypoint, torch.from_numpy(spec.inverse_part_order(scheme)), peak_window)

    @classmethod
    def for_instance(cls, dim: int, num_keypoints: int, peak_window: int = 0) -> SoftArgmaxReadout:
        """One instance query (R, 1, d) for every keypoint."""
        return cls(dim, dim, [0] * num_keypoints, torch.arange(num_keypoints), peak_window)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = int(tokens.shape[1] ** 0.5)
        per_keypoint = queries[:, self.query_of_keypoint]  # (R, K, d_q): each keypoint's own query
        keys = torch.einsum("rkq,kdq->rkd", per_keypoint, self.keys)  # (R, K, d)
        logits = torch.bmm(keys, tokens.transpose(1, 2)) / tokens.shape[-1] ** 0.5  # (R, K, S*S)
        centres = coordinate_grid(size, tokens).flatten(2)[0].T  # (S*S, 2) as (x, y)
        weights = logits
        if self.peak_window and not self.training:
            peak = centres[logits.argmax(dim=-1)]  # (R, K, 2)
            near = ((centres - peak[..., None, :]).abs() * size < self.peak_window + 0.5).all(-1)  # (R, K, S*S)
            weights = logits.masked_fill(~near, float("-inf"))
        positions = weights.softmax(dim=-1) @ centres  # (R, K, 2)
        return positions[:, self.to_keypoint_order], logits[:, self.to_keypoint_order]


def roi_tower(dim: int, hidden: int, depth: int, extra_inputs: int = 0) -> nn.Sequential:
    """depth x (3x3 conv + ReLU): dim (+ extra_inputs) -> hidden -> ... -> hidden -> dim."""
    channels = [dim + extra_inputs] + [hidden] * (depth - 1) + [dim]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [xavier(nn.Conv2d(c_in, c_out, 3, padding=1), zero_bias=True), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class KeypointStage(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: KeypointSpec) -> None:
        super().__init__()
        dim, part_dim = cfg.hidden_dim, cfg.part_dim
        self.num_keypoints = spec.num_keypoints
        self.mode = "baseline" if cfg.keypoint_head == "conv_gap_baseline" else cfg.query_type
        self.tower_coordinates = cfg.roi_coordinates == "tower"
        self.tower = roi_tower(dim, cfg.tower_channels, cfg.tower_convs, extra_inputs=2 * self.tower_coordinates)
        self.serial = cfg.instance_pipeline == "serial"
        # The instance branch: Q_I reads the pose RoI. Under the serial pipeline (Fig. 3b) the updated Q_I goes on
        # to the next box stage; part rows and the baseline read with DyMLP-channel as the authors do. Instance
        # rows (Table 1) regress from Q_I, and the row's interaction is their one branch, so the DyMLP-channel
        # row has a single DyMLP-channel, not the serial branch's plus another.
        if self.serial or self.mode == "instance":
            branch = cfg.interaction if self.mode == "instance" else "dymlp_channel"
            self.instance_interaction = TOKEN_INTERACTIONS[branch](dim, cfg.dynamic_dim, NUM_TOKENS, cfg.num_heads)
            self.instance_norm = nn.LayerNorm(dim)
            self.instance_ffn = FeedForward(dim, cfg.ffn_dim)

        if self.mode == "baseline":
            self.baseline_head = xavier(nn.Linear(dim, 4 * spec.num_keypoints))
        elif self.mode == "instance":
            self.mu_head = xavier(NormLinear(dim, 2 * spec.num_keypoints))
            if cfg.keypoint_readout == "soft_argmax":
                self.readout = SoftArgmaxReadout.for_instance(dim, spec.num_keypoints, cfg.readout_peak_window)
                # The regression starts as a zero residual on the soft-argmax (gradients still reach the weights).
                nn.init.zeros_(self.mu_head.weight)
                nn.init.zeros_(self.mu_head.bias)
            self.sigma_head = xavier(nn.Linear(dim, 2 * spec.num_keypoints))
        else:
            num_parts = len(spec.parts(cfg.part_scheme))
            self.num_parts, self.part_dim = num_parts, part_dim
            # Q_I's contribution to each part: one Linear(d, d_p) per part, stored as one.
            self.instance_to_parts = nn.Linear(dim, num_parts * part_dim)
            xavier_blocks(self.instance_to_parts.weight, [part_dim] * num_parts)
            if cfg.interaction == "spegm":
                self.spegm = SPEGM(dim, part_dim, num_parts, coordinates=cfg.roi_coordinates == "spegm")
            else:
                self.token_projection = xavier(nn.Linear(dim, part_dim))
                self.interaction = TOKEN_INTERACTIONS[cfg.interaction](
                    part_dim, cfg.dynamic_dim, NUM_TOKENS, cfg.num_heads
                )
            self.iteration = ITERATIONS[cfg.iteration](part_dim)
            self.part_attention = MultiHeadAttention(part_dim, cfg.num_heads)
            self.part_norm = nn.LayerNorm(part_dim)
            self.part_ffn = FeedForward(part_dim, cfg.ffn_dim)
            self.heads = PartHeads(part_dim, spec, cfg.part_scheme)
            if cfg.keypoint_readout == "soft_argmax":
                self.readout = SoftArgmaxReadout.for_parts(
                    dim, part_dim, spec, cfg.part_scheme, cfg.readout_peak_window
                )
                # The regression starts as a zero residual on the soft-argmax (gradients still reach the weights).
                nn.init.zeros_(self.heads.mu_weight)
                nn.init.zeros_(self.heads.mu_bias)

    @property
    def sim(self) -> SelectiveIteration | None:
        iteration = getattr(self, "iteration", None)
        return iteration if isinstance(iteration, SelectiveIteration) else None

    def forward(
        self,
        p2: torch.Tensor,
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        instance_queries: torch.Tensor,
        part_queries: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """p2 (B, d, H/4, W/4); for R selected queries: boxes (R, 4) xyxy pixels, image_index (R,),
        instance_queries (R, d), part_queries (R, M, d_p) or None.

        Returns mu, sigma (R, K, 2) box-relative, the instance_queries (R, d) the next box stage reads (updated
        under the serial pipeline), for part queries part_queries (R, M, d_p) and attention (R, M, 28, 28) when
        SPEGM is used, and with the soft-argmax readout its maps' readout_logits (R, K, 196).
        """
        rois = rois_from_boxes(boxes, image_index)
        pooled = roi_align(p2, rois, POSE_POOL, spatial_scale=1 / P2_STRIDE, sampling_ratio=2, aligned=True)
        if self.tower_coordinates:
            grid = coordinate_grid(POSE_POOL, pooled).expand(len(pooled), -1, -1, -1)
            pooled = torch.cat([pooled, grid], dim=1)  # (R, d + 2, 14, 14)
        features = self.tower(pooled)  # (R, d, 14, 14)
        tokens = features.flatten(2).transpose(1, 2)  # (R, 196, d)
        updated = instance_queries
        if hasattr(self, "instance_interaction"):
            query = instance_queries[:, None]  # (R, 1, d)
            query = self.instance_norm(query + self.instance_interaction(query, tokens))
            updated = self.instance_ffn(query)[:, 0]
        out = {"instance_queries": updated if self.serial else instance_queries}

        if self.mode == "baseline":
            raw = self.baseline_head(features.mean(dim=(2, 3))).view(-1, self.num_keypoints, 4)
            out["mu"], out["sigma"] = raw[..., :2], torch.sigmoid(raw[..., 2:])
        elif self.mode == "instance":
            out["mu"] = self.mu_head(updated).view(-1, self.num_keypoints, 2)
            if hasattr(self, "readout"):
                positions, out["readout_logits"] = self.readout(updated[:, None], tokens)
                out["mu"] = out["mu"] + positions
            out["sigma"] = torch.sigmoid(self.sigma_head(updated)).view(-1, self.num_keypoints, 2)
        else:
            out.update(self._part_forward(features, tokens, updated, part_queries))
        return out

    def _part_forward(
        self, features: torch.Tensor, tokens: torch.Tensor, instance_queries: torch.Tensor, previous: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        context = self.instance_to_parts(instance_queries).view(-1, self.num_parts, self.part_dim)  # (R, M, d_p)
        out = {}
        if hasattr(self, "spegm"):
            embeddings, out["attention"] = self.spegm(features)
            embeddings = embeddings + context
        else:
            embeddings = self.interaction(previous + context, self.token_projection(tokens))
        queries = self.iteration(embeddings, previous)  # (R, M, d_p)
        attended = self.part_attention(queries)  # among the M parts of an instance
        queries = self.part_ffn(self.part_norm(queries + attended))
        out["part_queries"] = queries
        out["mu"], out["sigma"] = self.heads(queries)
        if hasattr(self, "readout"):
            positions, out["readout_logits"] = self.readout(queries, tokens)
            out["mu"] = out["mu"] + positions
        return out
