import pytest
import torch

from querypose import ModelConfig, build_model
from querypose.optim import build_ema, build_optimizer, build_scheduler, clip_gradients, lr_factor


def test_flow_gets_ten_times_the_learning_rate_and_frozen_params_are_skipped():
    model = build_model(ModelConfig(backbone="resnet10t", hidden_dim=32, ffn_dim=32, tower_channels=32,
                                    tower_convs=1, num_queries=4, num_stages=1, part_dim=32, dynamic_dim=8,
                                    backbone_norm="frozen_bn"))  # fmt: skip
    optimizer = build_optimizer(model, lr=2.5e-5, weight_decay=1e-4)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["flow"]["lr"] == pytest.approx(2.5e-4) and groups["model"]["lr"] == pytest.approx(2.5e-5)
    assert sum(p.numel() for p in groups["flow"]["params"]) == 53_784
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.backbone.body.conv1[0].weight) not in ids  # frozen stem


def test_warmup_and_steps():
    assert lr_factor(0, 1000, 0.01, (110, 130), 0.1) == pytest.approx(0.01 * 0.1**0)
    assert lr_factor(500, 1000, 0.01, (), 0.1) == pytest.approx(0.505)
    assert lr_factor(1000, 1000, 0.01, (2000, 3000), 0.1) == 1.0
    assert lr_factor(2000, 1000, 0.01, (2000, 3000), 0.1) == pytest.approx(0.1)
    assert lr_factor(3500, 1000, 0.01, (2000, 3000), 0.1) == pytest.approx(0.01)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_iters=4, warmup_factor=0.2, steps=(6,), gamma=0.5)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.5, 0.5])


def test_clip_gradients_limits_the_total_norm():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    module = torch.nn.Module()
    module.a, module.b = a, b
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = clip_gradients(module, 1.0)
    assert norm == pytest.approx((27 + 64) ** 0.5)
    total = torch.cat([a.grad, b.grad]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-4)


def test_ema_follows_the_weights_with_a_warm_up_and_copies_integer_buffers():
    module = torch.nn.BatchNorm1d(2)  # a float weight and running stats, an integer num_batches_tracked
    ema = build_ema(module, decay=0.9)
    expected = torch.ones(2)  # the first update copies
    for step, value in enumerate([1.0, 3.0, 5.0, 7.0]):
        with torch.no_grad():
            module.weight.fill_(value)
        module.num_batches_tracked.fill_(step + 1)
        ema.update_parameters(module)
        if step:
            decay = min(0.9, (1 + step) / (10 + step))  # n = step updates averaged so far
            expected = decay * expected + (1 - decay) * value
        assert torch.allclose(ema.module.weight, expected), step
    assert int(ema.module.num_batches_tracked) == 4
    assert module.weight[0] == 7.0  # the trained module is untouched
    with pytest.raises(ValueError, match="decay must be in"):
        build_ema(module, decay=1.0)
