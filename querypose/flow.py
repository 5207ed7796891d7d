"""RealNVP density for 2-D keypoint residuals and the residual log-likelihood (RLE) loss (Li et al., ICCV 2021).

The flow learns the distribution of normalised residuals x_bar = (mu - gt) / sigma. It is used in training only:
inference reads mu and sigma straight from the keypoint heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _coupling_net(final: nn.Module | None) -> nn.Sequential:
    layers = [nn.Linear(2, 64), nn.LeakyReLU(), nn.Linear(64, 64), nn.LeakyReLU(), nn.Linear(64, 2)]
    return nn.Sequential(*layers, *([final] if final is not None else []))


class RealNVP(nn.Module):
    """Six affine coupling layers on 2-D points with alternating masks and a standard normal prior."""

    def __init__(self, num_couplings: int = 6) -> None:
        super().__init__()
        masks = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(num_couplings // 2, 1)  # (6, 2)
        self.register_buffer("masks", masks, persistent=False)
        self.scale_nets = nn.ModuleList(_coupling_net(nn.Tanh()) for _ in range(num_couplings))
        # Linear's own initialisation: the authors' flow has a small-gain xavier init (`_init`) that is never
        # called, and it sits outside the decoder their global xavier loop reaches.
        self.shift_nets = nn.ModuleList(_coupling_net(None) for _ in range(num_couplings))

    def to_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data x (..., 2) to the prior's space; returns (z, log|det dz/dx|) with shapes (..., 2), (...)."""
        log_det = x.new_zeros(x.shape[:-1])
        z = x
        for i in reversed(range(len(self.masks))):
            mask = self.masks[i]
            kept = z * mask
            scale = self.scale_nets[i](kept) * (1 - mask)
            shift = self.shift_nets[i](kept) * (1 - mask)
            z = (1 - mask) * (z - shift) * torch.exp(-scale) + kept
            log_det = log_det - scale.sum(-1)
        return z, log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for points x (..., 2) -> (...)."""
        z, log_det = self.to_latent(x)
        prior = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
        return prior + log_det


def rle_loss(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    flow: RealNVP,
    num_instances: float | torch.Tensor,
) -> torch.Tensor:
    """Residual log-likelihood loss, summed over weighted coordinates and divided by `num_instances`.

    mu, sigma, target: (T, K, 2) box-relative coordinates; weight: (T, K, 1) or (T, K, 2) in {0, 1}, 0 for
    unlabelled keypoints (they get exactly zero gradient). With x_bar = (mu - target) / sigma, per coordinate:
        flow term     log(sigma) - log p_flow(x_bar)
        residual term log(sigma * sqrt(2 pi)) + |target - mu| / (sqrt(2) sigma + 1e-9)
    Always computed in float32, also under autocast: the flow's log-density is unstable in bf16.
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu, sigma, target = mu.float(), sigma.float(), target.float()
        weight = weight.float().expand_as(mu)
        used = weight > 0  # (T, K, 2)
        # Masked coordinates become a harmless point (mu = target = 0, sigma = 1) *before* any arithmetic:
        # masking only the result would still send 0 * inf = NaN gradients back from log(0) or a garbage mu.
        mu = torch.where(used, mu, torch.zeros_like(mu))
        target = torch.where(used, target, torch.zeros_like(target))
        sigma = torch.where(used, sigma.clamp_min(1e-9), torch.ones_like(sigma))
        residual = (mu - target) / sigma  # x_bar, (T, K, 2)
        # One log-density per keypoint, charged to each of its coordinates as in the RLE formulation.
        flow_term = torch.log(sigma) - flow.log_prob(residual).unsqueeze(-1)
        laplace_term = torch.log(sigma * math.sqrt(2 * math.pi)) + (target - mu).abs() / (math.sqrt(2) * sigma + 1e-9)
        loss = torch.where(used, (flow_term + laplace_term) * weight, torch.zeros_like(mu))
        return loss.sum() / num_instances
