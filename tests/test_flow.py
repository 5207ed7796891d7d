import math

import torch

from querypose.flow import RealNVP, rle_loss


def _case(offset=0.3):
    torch.manual_seed(0)
    target = torch.rand(4, 5, 2) - 0.5
    mu = (target + offset).requires_grad_()
    sigma = torch.full((4, 5, 2), 0.2, requires_grad=True)
    weight = torch.ones(4, 5, 1)
    return mu, sigma, target, weight


def test_parameter_count_and_density_normalises():
    flow = RealNVP()
    assert sum(p.numel() for p in flow.parameters()) == 53_784
    # the density integrates to ~1 over the plane (grid quadrature)
    axis = torch.linspace(-6, 6, 241)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass) - 1.0) < 0.01


def test_loss_decreases_as_mu_approaches_the_target():
    flow = RealNVP()
    losses = [float(rle_loss(*_case(offset)[:4], flow, 4).detach()) for offset in (0.4, 0.2, 0.05, 0.0)]
    assert losses == sorted(losses, reverse=True)


def test_masked_keypoints_get_exactly_zero_gradient():
    flow = RealNVP()
    mu, sigma, target, weight = _case()
    weight[:, 2] = 0
    mu.data[:, 2] = float("nan")  # even garbage at a masked keypoint must not leak
    loss = rle_loss(mu, sigma, target, weight, flow, 4)
    loss.backward()
    assert torch.isfinite(loss)
    assert (mu.grad[:, 2] == 0).all() and (sigma.grad[:, 2] == 0).all()
    assert (mu.grad[:, [0, 1, 3, 4]] != 0).all()


def test_hand_computed_value():
    flow = RealNVP()
    mu = torch.tensor([[[0.1, -0.2]]])
    sigma = torch.tensor([[[0.5, 0.25]]])
    target = torch.tensor([[[0.0, 0.0]]])
    residual = (mu - target) / sigma
    log_p = float(flow.log_prob(residual).detach()[0, 0])
    expected = 0.0
    for m, s in ((0.1, 0.5), (-0.2, 0.25)):
        expected += math.log(s) - log_p  # flow term, one log-density per keypoint on each coordinate
        expected += math.log(s * math.sqrt(2 * math.pi)) + abs(m) / (math.sqrt(2) * s + 1e-9)
    loss = rle_loss(mu, sigma, target, torch.ones(1, 1, 1), flow, num_instances=2)
    assert abs(float(loss) - expected / 2) < 1e-5


def test_float32_under_bf16_autocast():
    flow = RealNVP()
    mu, sigma, target, weight = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rle_loss(mu.bfloat16(), sigma.bfloat16(), target, weight, flow, 4)
    assert loss.dtype == torch.float32
