import dataclasses
import math

import pytest
import torch
from torch import nn

from querypose import ModelConfig, build_model
from querypose.attention import MultiHeadAttention
from querypose.box_ops import coordinate_grid
from querypose.criterion import SetCriterion
from querypose.engine import train_step
from querypose.interactions import DynamicConv
from querypose.keypoint_decoder import NormLinear, PartHeads, SoftArgmaxReadout
from querypose.keypoints import COCO, CROWDPOSE, PART_SCHEMES
from querypose.model import decode_keypoints, encode_keypoints
from querypose.optim import build_optimizer, build_scheduler
from querypose.spegm import SPEGM

TINY = ModelConfig(
    backbone="resnet10t",
    hidden_dim=32,
    ffn_dim=64,
    dynamic_dim=8,
    tower_channels=32,
    tower_convs=2,
    num_queries=6,
    num_stages=2,
    part_dim=32,
    test_short_side=96,
    test_max_size=128,
)


def _batch(num_keypoints=17):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 96, 128) * 255
    image_sizes = torch.tensor([[96, 128], [80, 100]])
    keypoints = torch.rand(2, num_keypoints, 3) * 40 + 20
    keypoints[..., 2] = 2
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 70.0, 90.0], [50.0, 5.0, 120.0, 80.0]]), "keypoints": keypoints},
        {"boxes": torch.zeros(0, 4), "keypoints": torch.zeros(0, num_keypoints, 3)},
    ]
    return images, image_sizes, targets


VARIANTS = [
    {},
    {"query_type": "instance", "interaction": "mhsa", "iteration": "none"},
    {"query_type": "instance", "interaction": "dymlp_channel", "iteration": "none"},
    {"query_type": "instance", "interaction": "dymlp_spatial", "iteration": "none"},
    {"query_type": "instance", "interaction": "spatial_attention", "iteration": "none"},
    {"interaction": "mhsa"},
    {"interaction": "dymlp_channel"},
    {"interaction": "dymlp_spatial"},
    *({"iteration": it} for it in ("sum", "concat", "none")),
    *({"part_dim": d} for d in (32, 64, 128, 256)),
    *({"part_scheme": s, "dataset": ds} for s in PART_SCHEMES for ds in ("coco", "crowdpose")),
    {"instance_pipeline": "box_only"},
    {"keypoint_head": "conv_gap_baseline"},
    {"num_queries": 3},
    {"num_stages": 1},
    {"num_stages": 3},
    {"keypoint_cost": 1.0},
    {"keypoint_training_queries": "all"},
    {"aux_heatmap": True},
    {"init_boxes": "grid"},
    {"roi_coordinates": "tower"},
    {"roi_coordinates": "tower", "query_type": "instance", "interaction": "mhsa", "iteration": "none"},
    {"roi_coordinates": "spegm"},
    {"keypoint_readout": "soft_argmax"},
    {"keypoint_readout": "soft_argmax", "interaction": "mhsa", "part_scheme": "per_joint"},
    {"keypoint_readout": "soft_argmax", "query_type": "instance", "interaction": "mhsa", "iteration": "none"},
]


@pytest.mark.parametrize("change", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_every_variant_trains_and_predicts(change):
    """Every ablation variant: a real training step under CPU bf16 autocast (train.amp), the outputs' shapes, and
    prediction."""
    cfg = dataclasses.replace(TINY, **change)
    model = build_model(cfg)
    for stage in model.box_stages:  # boxes stay the whole image: every keypoint lies inside and trains the poses
        nn.init.zeros_(stage.bbox_deltas.weight)
        nn.init.zeros_(stage.bbox_deltas.bias)
    num_keypoints = 17 if cfg.dataset == "coco" else 14
    images, image_sizes, targets = _batch(num_keypoints)
    optimizer = build_optimizer(model, 1e-4, 1e-4)
    before = {n: p.detach().clone() for n, p in model.keypoint_stages[-1].named_parameters()}
    terms = train_step(
        model, SetCriterion.from_config(cfg), optimizer, build_scheduler(optimizer, warmup_iters=0), images,
        image_sizes, targets, autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    assert math.isfinite(terms["loss"]) and terms["grad_norm"] > 0
    assert ("loss_aux_heatmap" in terms) == cfg.aux_heatmap
    moved = [n for n, p in model.keypoint_stages[-1].named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the last keypoint stage did not train"

    outputs = model(images, image_sizes, targets)
    assert len(outputs["stages"]) == cfg.num_stages
    loss = 0.0
    for stage in outputs["stages"]:
        assert stage["logits"].shape == (2, cfg.num_queries)
        assert stage["boxes"].shape == (2, cfg.num_queries, 4)
        matched = sum(len(p) for p, _ in stage["indices"])
        assert matched == min(cfg.num_queries, 2)
        assert stage["keypoint_mu"].shape == (matched, num_keypoints, 2)
        assert stage["keypoint_sigma"].shape == (matched, num_keypoints, 2)
        assert stage["keypoint_boxes"].shape == (matched, 4)
        assert not stage["keypoint_boxes"].requires_grad
        loss = (
            loss
            + stage["logits"].sum()
            + stage["boxes"].sum()
            + stage["keypoint_mu"].sum()
            + stage["keypoint_sigma"].sum()
        )
    loss.backward()
    grads = [p.grad for p in model.keypoint_stages[-1].parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    poses = model.predict([images[0], images[1, :, :80, :100]])
    assert poses[1]["keypoints"].shape == (cfg.num_queries, num_keypoints, 3)


def test_default_coco_model_builds_in_one_call():
    model = build_model(ModelConfig())
    assert model.cfg.backbone == "resnet50" and len(model.box_stages) == len(model.keypoint_stages) == 6
    assert all(stage.spegm is not None and stage.sim is not None for stage in model.keypoint_stages)
    assert model.init_boxes.weight.shape == (100, 4) and model.init_part_queries.weight.shape == (7, 128)
    # no weights file: GroupNorm, trained whole
    assert isinstance(model.backbone.body.bn1, nn.GroupNorm)
    assert all(p.requires_grad for p in model.backbone.body.parameters())


def test_spegm_and_flow_parameter_counts():
    assert sum(p.numel() for p in SPEGM(256, 128, 7).parameters()) == 1_098_119
    assert sum(p.numel() for p in build_model(TINY).flow.parameters()) == 53_784


def test_norm_linear_is_scale_invariant():
    layer = NormLinear(16, 4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), layer(7.5 * x))
    expected = x @ layer.weight.T / x.norm(dim=-1, keepdim=True) + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_sim_gates_and_spegm_attention():
    model = build_model(TINY).eval()
    images, image_sizes, _ = _batch()
    poses = model.inference(images, image_sizes, return_attention=True)
    attention = poses[0]["attention"]  # (N, M, 28, 28)
    assert attention.shape == (TINY.num_queries, 7, 28, 28)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(TINY.num_queries, 7))
    gates = model.keypoint_stages[-1].sim.last_gates
    assert gates is not None and (gates > 0).all() and (gates < 1).all()
    assert model.keypoint_stages[-1].spegm is not None
    no_sim = build_model(dataclasses.replace(TINY, iteration="sum"))
    assert no_sim.keypoint_stages[0].sim is None


def test_keypoint_decoding_round_trip():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 50.0, 30.0]])
    pixels = torch.tensor([[[60.0, 120.0], [10.0, 20.0]], [[25.0, 15.0], [49.0, 1.0]]])
    relative = encode_keypoints(pixels, boxes)
    assert relative[0, 0].tolist() == [0.0, 0.0] and relative[0, 1].tolist() == [-0.5, -0.5]
    torch.testing.assert_close(decode_keypoints(relative, boxes), pixels)


@pytest.mark.parametrize("spec", [COCO, CROWDPOSE], ids=["coco", "crowdpose"])
@pytest.mark.parametrize("scheme", PART_SCHEMES)
def test_part_heads_output_in_keypoint_order(spec, scheme):
    """Keypoint k's output comes from the part that holds k, so flipping parts flips keypoints consistently."""
    heads = PartHeads(8, spec, scheme)
    parts = spec.parts(scheme)
    queries = torch.zeros(1, len(parts), 8)
    for m in range(len(parts)):
        queries[0, m, m % 8] = 1.0 + m  # a distinct query per part
    with torch.no_grad():
        heads.mu_weight.zero_()
        heads.mu_bias.zero_()
        heads.sigma_weight.fill_(0.0)
        for j, m in enumerate(heads.part_of_output.tolist()):
            heads.sigma_bias[j] = float(m)  # sigma encodes the part id in keypoint order after the scatter
    _, sigma = heads(queries)
    part_of = {k: m for m, part in enumerate(parts) for k in part}
    expected = torch.sigmoid(torch.tensor([float(part_of[k]) for k in range(spec.num_keypoints)]))
    torch.testing.assert_close(sigma[0, :, 0], expected)
    # the mirror part of keypoint k's part holds the mirror keypoint of k
    mirror = spec.mirror_parts(scheme)
    for k in range(spec.num_keypoints):
        assert part_of[int(spec.flip_index[k])] == mirror[part_of[k]]


def test_part_state_stays_with_its_query():
    """After a matched-subset update, an unmatched query's part state is untouched and a matched query gets
    exactly its own row's update (the authors' code pairs rows positionally instead)."""
    model = build_model(TINY).eval()  # eval: SPEGM's BatchNorm would otherwise mix statistics across RoIs
    images, image_sizes, targets = _batch()
    features = model._features(model.normalise(images), image_sizes)
    boxes, instance, parts = model._initial_state(image_sizes)
    parts = parts + torch.randn_like(parts)  # distinct state per query
    batch_index = torch.tensor([0, 1])
    query_index = torch.tensor([4, 1])
    out, new_instance, new_parts = model._keypoint_stage(
        0, features[0], boxes, instance, parts, batch_index, query_index
    )
    changed = (new_parts != parts).flatten(2).any(-1)  # (B, N)
    assert changed.nonzero().tolist() == [[0, 4], [1, 1]]
    torch.testing.assert_close(new_parts[0, 4], out["part_queries"][0])
    torch.testing.assert_close(new_parts[1, 1], out["part_queries"][1])
    # the same query alone gives the same update: its result depends on its own state only
    alone, _, _ = model._keypoint_stage(0, features[0], boxes, instance, parts, batch_index[1:], query_index[1:])
    torch.testing.assert_close(alone["part_queries"][0], out["part_queries"][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries, agrees", [("all", True), ("matched", False)])
def test_training_forward_sees_the_inference_query_state(queries, agrees):
    """With keypoint_training_queries='all' the training forward's last-stage boxes are inference's; with
    'matched' (the paper) only the matched queries' instance state is updated before the next box stage, so
    under the serial pipeline training sees a different query state than inference."""
    model = build_model(dataclasses.replace(TINY, keypoint_training_queries=queries)).eval()
    images, image_sizes, targets = _batch()
    with torch.no_grad():
        trained = model(images, image_sizes, targets)["stages"][-1]["boxes"][0]  # (N, 4), query order
        inferred = model.inference(images, image_sizes)[0]["boxes"]  # (N, 4), score order
    by_x1 = lambda boxes: boxes[boxes[:, 0].argsort()]  # noqa: E731
    assert torch.allclose(by_x1(trained), by_x1(inferred), atol=1e-4) == agrees


def test_predict_maps_back_to_each_image():
    model = build_model(TINY).eval()
    images = [torch.rand(3, 60, 90) * 255, torch.rand(3, 300, 200) * 255]
    poses = model.predict(images)
    for image, pose in zip(images, poses, strict=True):
        height, width = image.shape[1:]
        assert pose["boxes"].shape == (TINY.num_queries, 4)
        assert (pose["boxes"][:, 0::2] <= width).all() and (pose["boxes"][:, 1::2] <= height).all()
        assert (pose["scores"][:-1] >= pose["scores"][1:]).all()
        assert ((pose["scores"] >= 0) & (pose["scores"] <= 1)).all()


def test_pruning_keeps_top_queries():
    model = build_model(dataclasses.replace(TINY, num_stages=3, prune_queries_after_stage=1, prune_keep=2)).eval()
    images, image_sizes, _ = _batch()
    poses = model.inference(images, image_sizes, return_attention=True)
    assert poses[0]["boxes"].shape == (2, 4) and poses[0]["attention"].shape[0] == 2


def test_random_init_resnet_trains_every_block():
    """From scratch the ResNet gets GroupNorm and trains whole; with frozen BatchNorm (the recipe for pretrained
    weights) no residual branch may be left dead behind a frozen zero scale."""
    scratch = build_model(TINY).backbone.body
    assert isinstance(scratch.layer1[0].bn2, nn.GroupNorm)
    assert all(p.requires_grad for p in scratch.parameters())
    optimizer = torch.optim.SGD(scratch.parameters(), lr=0.1)
    images = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # timm zero-inits the last norm scale of each block; one step wakes the branch up
        optimizer.zero_grad()
        sum(f.square().mean() for f in scratch(images)).backward()
        optimizer.step()
    assert [n for n, p in scratch.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []

    frozen = build_model(dataclasses.replace(TINY, backbone_norm="frozen_bn")).backbone.body
    assert frozen.layer1[0].bn2.weight.abs().min() > 0
    frozen_names = {n.split(".")[0] for n, p in frozen.named_parameters() if not p.requires_grad}
    assert frozen_names == {"conv1", "layer1"}  # freeze_backbone_at=2: stem and first stage
    sum(f.square().mean() for f in frozen(images)).backward()
    trainable = [(n, p) for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()] == []


def test_fused_attention_matches_torch_multihead_attention():
    """MultiHeadAttention loads nn.MultiheadAttention's state dict and gives its outputs and input gradients,
    through scaled_dot_product_attention and through the explicit softmax path."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(32, 8, batch_first=True)
    attention = MultiHeadAttention(32, 8)
    attention.load_state_dict(reference.state_dict())
    assert sum(p.numel() for p in attention.parameters()) == sum(p.numel() for p in reference.parameters())
    for context_length in (None, 11):  # self-attention; queries reading a longer context (the mhsa interaction)
        query = torch.randn(3, 5, 32, requires_grad=True)
        context = None if context_length is None else torch.randn(3, context_length, 32)
        keys = query if context is None else context
        expected = reference(query, keys, keys, need_weights=False)[0]
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), query)
        for fused in (True, False):
            attention.fused = fused
            out = attention(query, context)
            (grad,) = torch.autograd.grad(out.square().sum(), query)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"channels_last": True, "fused_attention": True},
        {"channels_last": True, "fused_attention": False},
        {"channels_last": False, "fused_attention": True},
    ],
    ids=lambda o: ",".join(k for k, v in o.items() if v),
)
def test_inference_options_keep_outputs(options):
    """channels_last and fused attention change how the model computes, not what: every output of a resnet18
    model matches the plain path (NCHW, explicit softmax attention) to float tolerance."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, backbone="resnet18")).eval()
    images, image_sizes, _ = _batch()
    plain = model.set_inference_options(channels_last=False, fused_attention=False).inference(
        images, image_sizes, return_attention=True
    )
    model.set_inference_options(**options)
    tower_weight = model.keypoint_stages[0].tower[0].weight
    assert tower_weight.is_contiguous(memory_format=torch.channels_last) == options["channels_last"]
    assert all(m.fused == options["fused_attention"] for m in model.modules() if isinstance(m, MultiHeadAttention))
    fast = model.inference(images, image_sizes, return_attention=True)
    for a, b in zip(plain, fast, strict=True):
        assert a.keys() == b.keys() == {"boxes", "keypoints", "scores", "attention"}
        for name in a:
            # boxes and keypoints are pixels, up to ~1000 on this untrained model: 0.01 px of float noise
            atol = 1e-2 if name in ("boxes", "keypoints") else 1e-3
            torch.testing.assert_close(b[name], a[name], atol=atol, rtol=1e-4, msg=name)
    # the training forward accepts the same settings (SDPA's backward, NHWC gradients)
    _, _, targets = _batch()
    outputs = model.train()(images, image_sizes, targets)
    outputs["stages"][-1]["keypoint_mu"].sum().backward()
    assert model.keypoint_stages[-1].tower[0].weight.grad.abs().sum() > 0


def test_inference_runs_only_keypoint_stages_whose_state_is_read():
    """With the box-only pipeline and no part iteration, stages 1..S-1 of the keypoint decoder feed nothing
    forward, so inference runs only the last one; the poses equal those of running every stage."""
    cfg = dataclasses.replace(TINY, num_stages=3, instance_pipeline="box_only", iteration="none")
    model = build_model(cfg).eval()
    assert not model.keypoint_stages_carry_state
    calls = []
    for index, stage in enumerate(model.keypoint_stages):
        stage.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    images, image_sizes, _ = _batch()
    skipped = model.inference(images, image_sizes)
    assert calls == [2]
    model.keypoint_stages_carry_state = True  # force every stage, as before the shortcut
    every = model.inference(images, image_sizes)
    assert calls == [2, 0, 1, 2]
    for a, b in zip(skipped, every, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)
    # state that later stages read keeps every stage running; without iteration no part state is carried, token
    # interactions included
    for change in ({}, {"instance_pipeline": "box_only"}, {"iteration": "none"}):
        assert build_model(dataclasses.replace(TINY, **change)).keypoint_stages_carry_state, change
    mhsa = dataclasses.replace(TINY, instance_pipeline="box_only", iteration="none", interaction="mhsa")
    assert not build_model(mhsa).keypoint_stages_carry_state


def _xavier_bound(weight: torch.Tensor) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(6.0 / (fan_in + fan_out))


# Weights that hold one small layer per part (rows in part order): each block has its own xavier bound.
PER_PART_BLOCKS = {"instance_to_parts.weight": "part_dim", "heads.mu_weight": "part", "heads.sigma_weight": "part"}


def test_decoder_weights_start_xavier_uniform_as_the_authors_reset_leaves_them():
    """The authors' decoder runs xavier_uniform_ over every >= 2-D weight of all box and keypoint stages; here each
    layer is built that way. Every such weight lies within its xavier bound and fills it (a default kaiming init
    has bound 1/sqrt(fan_in), which differs for every layer here)."""
    cfg = dataclasses.replace(TINY, hidden_dim=64, part_dim=32, tower_channels=64)
    model = build_model(cfg)
    parts = COCO.parts(cfg.part_scheme)
    checked = 0
    for stages in (model.box_stages, model.keypoint_stages):
        for name, weight in stages.named_parameters():
            if weight.dim() < 2:
                continue
            suffix = name.split(".", 1)[1]  # without the stage index
            if suffix in PER_PART_BLOCKS:
                rows = (
                    [cfg.part_dim] * len(parts)
                    if PER_PART_BLOCKS[suffix] == "part_dim"
                    else [2 * len(p) for p in parts]
                )
                blocks = weight.detach().split(rows)
            else:
                blocks = [weight.detach()]
            for block in blocks:
                bound = _xavier_bound(block)
                assert block.abs().max() <= bound * (1 + 1e-6), name
                if block.numel() >= 256:  # a uniform sample this large reaches close to its bound
                    assert block.abs().max() >= 0.9 * bound, name
                    assert block.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
            checked += 1
    assert checked > 40
    # the box classifier's focal prior; the RoI towers' biases at zero (MSRA-fill's, which the reset keeps)
    assert torch.allclose(model.box_stages[0].cls_logits.bias, torch.tensor(-math.log(99.0)))
    assert all(layer.bias.abs().sum() == 0 for layer in model.keypoint_stages[0].tower if isinstance(layer, nn.Conv2d))
    # outside the decoder: the flow keeps Linear's own init (the authors never call its small-gain _init)
    flow_layer = model.flow.scale_nets[0][2]
    assert flow_layer.weight.abs().max() <= 64**-0.5 and flow_layer.weight.abs().max() > 0.9 * 64**-0.5


def test_without_iteration_no_part_state_crosses_stages():
    """iteration=none: every keypoint stage starts from Q_P^0 (token interactions too), so the part queries a stage
    receives are the learnt initial ones whatever the previous stage computed."""
    for interaction in ("spegm", "mhsa", "dymlp_channel"):
        cfg = dataclasses.replace(TINY, iteration="none", interaction=interaction, num_stages=3)
        model = build_model(cfg)
        received = []
        for stage in model.keypoint_stages:
            stage.register_forward_hook(lambda module, args, output, into=received: into.append(args[4].detach()))
        images, image_sizes, targets = _batch()
        model(images, image_sizes, targets)
        initial = model.init_part_queries.weight.detach()
        assert len(received) == 3
        for parts in received:
            torch.testing.assert_close(parts, initial.expand_as(parts))
    iterated = build_model(dataclasses.replace(TINY, iteration="sum", num_stages=2))
    assert iterated.carries_part_state and not build_model(cfg).carries_part_state


def test_instance_rows_have_one_interaction_branch():
    """Table 1's instance rows: the row's interaction is the instance branch itself (one DyMLP-channel for the
    DyMLP-channel row), and spatial attention pools the RoI with one SPEGM-style map."""

    def stage_of(interaction):
        cfg = dataclasses.replace(TINY, query_type="instance", iteration="none", interaction=interaction)
        return build_model(cfg).keypoint_stages[0]

    assert sum(isinstance(m, DynamicConv) for m in stage_of("dymlp_channel").modules()) == 1
    assert not any(isinstance(m, DynamicConv) for m in stage_of("mhsa").modules())
    stage = stage_of("spatial_attention")
    spegms = [m for m in stage.modules() if isinstance(m, SPEGM)]
    assert len(spegms) == 1 and spegms[0].attention.out_channels == 1
    # the part model keeps the serial pipeline's DyMLP-channel instance branch
    assert sum(isinstance(m, DynamicConv) for m in build_model(TINY).keypoint_stages[0].modules()) == 1


@pytest.mark.parametrize("part_dim", [32, 64, 128, 256])
def test_sim_hidden_width_is_a_quarter_of_the_part_dim(part_dim):
    sim = build_model(dataclasses.replace(TINY, part_dim=part_dim, num_stages=1)).keypoint_stages[0].sim
    assert sim.reduce.out_features == part_dim // 4 and sim.expand.out_features == 2 * part_dim


def test_query_groups_are_matched_apart_and_inference_reads_group_0():
    """query_groups=G (one-to-many supervision, beyond the paper): every image's G groups are matched to its people
    one-to-one each, no group reads another (group 0's training state is inference's), and G identical groups
    give exactly the loss of one group."""
    groups = 3
    cfg = dataclasses.replace(TINY, query_groups=groups, keypoint_training_queries="all")
    model = build_model(cfg).eval()  # eval: SPEGM's BatchNorm would otherwise mix statistics across rows
    assert model.init_boxes.weight.shape == (groups * cfg.num_queries, 4)
    with torch.no_grad():  # other groups get their own queries: they must not move group 0
        model.init_features.weight[cfg.num_queries :].normal_()
        model.init_boxes.weight[cfg.num_queries :].uniform_(0.2, 0.8)
    images, image_sizes, targets = _batch()
    with torch.no_grad():
        outputs = model(images, image_sizes, targets)
        inferred = model.inference(images, image_sizes)
    assert outputs["query_groups"] == groups
    last = outputs["stages"][-1]
    assert last["logits"].shape == (2 * groups, cfg.num_queries)
    assert [len(pred) for pred, _ in last["indices"]] == [2] * groups + [0] * groups
    by_x1 = lambda boxes: boxes[boxes[:, 0].argsort()]  # noqa: E731
    for image in range(2):
        torch.testing.assert_close(by_x1(last["boxes"][image * groups]), by_x1(inferred[image]["boxes"]))
        assert not torch.allclose(last["boxes"][image * groups + 1], last["boxes"][image * groups])

    single = build_model(dataclasses.replace(cfg, query_groups=1)).eval()
    state = single.state_dict()
    for name in ("init_boxes.weight", "init_features.weight"):  # G copies of the single model's queries
        state[name] = state[name].repeat(groups, 1)
    model.load_state_dict(state)
    criterion = SetCriterion.from_config(cfg)
    with torch.no_grad():
        grouped = criterion(model(images, image_sizes, targets), targets, image_sizes, model.flow)
        alone = criterion(single(images, image_sizes, targets), targets, image_sizes, single.flow)
    assert grouped.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(grouped[name], alone[name], msg=name)


def test_query_groups_train_every_group():
    cfg = dataclasses.replace(TINY, query_groups=2)
    model = build_model(cfg)
    optimizer = build_optimizer(model, 1e-3, 1e-4)
    images, image_sizes, targets = _batch()
    before = model.init_features.weight.detach().clone()
    terms = train_step(model, SetCriterion.from_config(cfg), optimizer, build_scheduler(optimizer, warmup_iters=0),
                       images, image_sizes, targets)  # fmt: skip
    assert math.isfinite(terms["loss"])
    moved = (model.init_features.weight != before).any(-1).view(2, cfg.num_queries).any(-1)
    assert moved.tolist() == [True, True]
    model.eval()
    assert model.predict([images[0]])[0]["keypoints"].shape == (cfg.num_queries, 17, 3)


def test_grid_init_boxes_tile_the_image_and_image_init_covers_it():
    """model.init_boxes: "image" starts every proposal as the whole image (Sparse R-CNN); "grid" puts the N centres
    on a near-square grid, boxes two cells wide and high, so the first stage pools N different RoIs."""
    image_sizes = torch.tensor([[90, 120]])
    whole = build_model(dataclasses.replace(TINY, num_queries=6))._initial_state(image_sizes)[0][0]
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 120.0, 90.0]]).expand(6, 4))
    grid = build_model(dataclasses.replace(TINY, num_queries=6, init_boxes="grid", query_groups=2))
    boxes = grid._initial_state(image_sizes)[0][0]  # 6 queries: 3 columns x 2 rows
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert torch.allclose(centres[:, 0], torch.tensor([20.0, 60.0, 100.0] * 2))
    assert torch.allclose(centres[:, 1], torch.tensor([22.5] * 3 + [67.5] * 3))
    assert torch.allclose(boxes[:, 2:] - boxes[:, :2], torch.tensor([80.0, 90.0]).expand(6, 2))
    # Every query group starts from the same grid.
    assert torch.equal(grid.init_boxes.weight[:6], grid.init_boxes.weight[6:])


def test_spegm_coordinates_are_each_attention_maps_expected_position():
    """model.roi_coordinates=spegm: a part's embedding holds its attention map's soft-argmax, (x, y) relative to
    the RoI in mu's units, through the projection's last two columns."""
    spegm = SPEGM(dim=16, part_dim=8, num_parts=2, coordinates=True).eval()
    logits = torch.full((1, 2, 28, 28), -1e4)
    logits[0, 0, 7, 21] = 0.0  # part 0 looks at row 7, column 21 only
    logits[0, 1, :, 0] = 0.0  # part 1 spreads evenly over the left column

    class FixedMaps(nn.Module):
        def forward(self, upsampled):
            return logits.expand(len(upsampled), -1, -1, -1)

    spegm.attention = FixedMaps()
    with torch.no_grad():
        spegm.project.weight.zero_()
        spegm.project.weight[:2, 16:] = torch.eye(2)
    embeddings, _ = spegm(torch.randn(3, 16, 14, 14))
    cell = lambda i: (i + 0.5) / 28 - 0.5  # noqa: E731
    assert torch.allclose(embeddings[:, 0, :2], torch.tensor([cell(21), cell(7)]).expand(3, 2), atol=1e-6)
    assert torch.allclose(embeddings[:, 1, :2], torch.tensor([cell(0), 0.0]).expand(3, 2), atol=1e-6)
    assert torch.count_nonzero(embeddings[..., 2:]) == 0


@pytest.mark.parametrize("coordinates", ["none", "tower"])
def test_tower_coordinates_tell_interior_positions_apart(coordinates):
    """Without coordinates a RoI of constant features gives every interior cell the same tower output (the
    convolutions see position only through zero padding); model.roi_coordinates=tower adds x, y channels."""
    model = build_model(dataclasses.replace(TINY, roi_coordinates=coordinates))
    stage, parts = model.keypoint_stages[0], model.init_part_queries.weight[None]
    outputs = {}
    stage.tower.register_forward_hook(lambda module, args, out: outputs.update(tower=out))
    p2 = torch.ones(1, TINY.hidden_dim, 32, 32)
    stage(p2, torch.tensor([[16.0, 16.0, 72.0, 72.0]]), torch.zeros(1, dtype=torch.long), torch.randn(1, 32), parts)
    interior = outputs["tower"][0, :, 3:11, 3:11].flatten(1)  # farther from the border than the tower reaches
    spread = (interior - interior[:, :1]).abs().max()
    assert (spread < 1e-5) if coordinates == "none" else (spread > 1e-3)


def test_soft_argmax_readout_is_the_attended_cells_position():
    """model.keypoint_readout=soft_argmax: a keypoint whose key matches one token lands on that token's cell
    centre, in keypoint order whatever the scheme's part order; a key matching nothing gives the RoI's centre."""
    readout = SoftArgmaxReadout.for_parts(dim=4, part_dim=2, spec=COCO, scheme="rigid7")
    size, dim = 14, 4
    tokens = torch.zeros(1, size * size, dim)
    tokens[0, 3 * size + 10, 0] = 1e3  # row 3, column 10: only this token has feature 0
    with torch.no_grad():
        readout.keys.zero_()
        left_wrist = 9  # COCO's keypoint 9
        part_slot = int((readout.to_keypoint_order == left_wrist).nonzero())  # its row in part order
        readout.keys[part_slot, 0, 0] = 1.0
    queries = torch.zeros(1, len(COCO.parts("rigid7")), 2)
    queries[..., 0] = 1.0
    positions, logits = readout(queries, tokens)  # (1, 17, 2), (1, 17, 196)
    cell = lambda i: (i + 0.5) / size - 0.5  # noqa: E731
    assert positions.shape == (1, 17, 2) and logits.shape == (1, 17, size * size)
    assert int(logits[0, left_wrist].argmax()) == 3 * size + 10  # the maps come in keypoint order too
    assert torch.allclose(positions[0, left_wrist], torch.tensor([cell(10), cell(3)]), atol=1e-5)
    others = torch.cat([positions[0, :left_wrist], positions[0, left_wrist + 1 :]])
    assert torch.allclose(others, torch.zeros_like(others), atol=1e-6)


@pytest.mark.parametrize("query_type", ["part", "instance"])
def test_soft_argmax_readout_starts_as_the_pure_soft_argmax(query_type):
    """The regression head's mu is a residual that starts at zero, so the first predictions lie in the RoI."""
    change = {"query_type": "instance", "interaction": "mhsa", "iteration": "none"} if query_type == "instance" else {}
    model = build_model(dataclasses.replace(TINY, keypoint_readout="soft_argmax", **change))
    stage, parts = model.keypoint_stages[0], model.init_part_queries.weight[None] if query_type == "part" else None
    out = stage(torch.randn(1, TINY.hidden_dim, 32, 32), torch.tensor([[16.0, 16.0, 72.0, 72.0]]),
                torch.zeros(1, dtype=torch.long), torch.randn(1, 32), parts)  # fmt: skip
    assert out["mu"].shape == (1, 17, 2)
    assert out["mu"].abs().max() < 0.5  # expected cell centres of a 14x14 RoI lie within (-0.5, 0.5)
    assert out["mu"].std() > 1e-4  # and depend on the keypoint


@pytest.mark.parametrize("training_queries", ["matched", "all"])
@pytest.mark.parametrize("query_type", ["part", "instance"])
def test_soft_argmax_training_outputs_carry_the_matched_rows_readout_maps(training_queries, query_type):
    """The readout maps the criterion's model.readout_map_weight term trains: one (K, 196) map per matched query
    per stage, in the matched order of keypoint_mu, on both keypoint-training paths."""
    change = {"query_type": "instance", "interaction": "mhsa", "iteration": "none"} if query_type == "instance" else {}
    cfg = dataclasses.replace(TINY, keypoint_readout="soft_argmax", readout_map_weight=1.0,
                              keypoint_training_queries=training_queries, **change)  # fmt: skip
    model = build_model(cfg)
    images, image_sizes, targets = _batch()
    outputs = model(images, image_sizes, targets)
    for stage in outputs["stages"]:
        matched = sum(len(pred) for pred, _ in stage["indices"])
        assert stage["keypoint_readout_logits"].shape == (matched, 17, 196)
        positions = stage["keypoint_readout_logits"].softmax(-1) @ coordinate_grid(14, images).flatten(2)[0].T
        # with the residual head at zero the soft-argmax of these maps is the predicted position itself
        assert torch.allclose(positions, stage["keypoint_mu"], atol=1e-5)


def test_readout_peak_window_reads_the_peak_of_a_two_mode_map_at_inference_only():
    """model.readout_peak_window: a map split between two cells (the stronger at row 3, column 10) reads a point
    between them over the whole RoI, and the stronger cell's centre within a window around the peak; training
    keeps the whole-RoI expectation the RLE and map losses were written for."""
    readout = SoftArgmaxReadout.for_instance(dim=2, num_keypoints=1, peak_window=1)
    size = 14
    tokens = torch.zeros(1, size * size, 2)
    tokens[0, 3 * size + 10, 0] = 30.0
    tokens[0, 11 * size + 2, 0] = 29.0  # a second mode far away
    with torch.no_grad():
        readout.keys.zero_()
        readout.keys[0, 0, 0] = 1.0
    queries = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    cell = lambda i: (i + 0.5) / size - 0.5  # noqa: E731
    peak = torch.tensor([cell(10), cell(3)])
    whole, _ = readout.train()(queries, tokens)
    windowed, _ = readout.eval()(queries, tokens)
    assert torch.allclose(windowed[0, 0], peak, atol=1e-4)
    assert (whole[0, 0] - peak).norm() > 0.1  # pulled towards the second mode
    readout.peak_window = 0
    assert torch.allclose(readout(queries, tokens)[0], whole)


def test_readout_peak_window_needs_the_soft_argmax_readout():
    with pytest.raises(ValueError, match="model.readout_peak_window=2 windows the soft-argmax readout"):
        ModelConfig(readout_peak_window=2)
    with pytest.raises(ValueError, match="model.readout_peak_window: must be >= 0"):
        ModelConfig(keypoint_readout="soft_argmax", readout_peak_window=-1)
