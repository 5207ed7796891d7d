"""SetCriterion: named terms per stage, weighting, normaliser, masking, and good predictions scoring lower."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from querypose.config import ModelConfig
from querypose.criterion import SetCriterion
from querypose.flow import RealNVP
from querypose.model import encode_keypoints

K = 17
SIZES = torch.tensor([[120, 160], [100, 100]])  # [h, w]


def make_targets() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 70.0, 110.0], [80.0, 20.0, 150.0, 100.0], [20.0, 30.0, 60.0, 90.0]])
    lo, size = boxes[:, None, :2], boxes[:, None, 2:] - boxes[:, None, :2]
    xy = lo + (0.1 + 0.8 * torch.rand(3, K, 2, generator=generator)) * size
    keypoints = torch.cat([xy, torch.full((3, K, 1), 2.0)], dim=-1)
    keypoints[0, :3] = 0.0  # unlabelled
    return [
        {"boxes": boxes[:2], "keypoints": keypoints[:2]},
        {"boxes": boxes[2:], "keypoints": keypoints[2:]},
    ]


def make_outputs(targets, num_stages=2, box_noise=0.0, mu_noise=0.0, confident=False, sigma=0.1):
    """Predictions for N = 4 queries per image; query 1 and 3 of image 0 and query 0 of image 1 are matched."""
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([0]), torch.tensor([0]))]
    generator = torch.Generator().manual_seed(1)
    stages = []
    for _ in range(num_stages):
        boxes = torch.tensor([[0.0, 0.0, 160.0, 120.0]]).repeat(2, 4, 1)
        logits = torch.full((2, 4), -4.0 if confident else 0.0)
        for b, (pred, gt) in enumerate(indices):
            boxes[b, pred] = targets[b]["boxes"][gt] + box_noise * torch.randn(len(pred), 4, generator=generator)
            logits[b, pred] = 4.0 if confident else 0.0
        boxes.requires_grad_()
        keypoint_boxes = torch.cat([boxes[b, pred] for b, (pred, _) in enumerate(indices)]).detach()
        gt_kp = torch.cat([targets[b]["keypoints"][gt] for b, (_, gt) in enumerate(indices)])
        mu = encode_keypoints(gt_kp[..., :2], keypoint_boxes) + mu_noise * torch.randn(3, K, 2, generator=generator)
        stages.append(
            {
                "logits": logits.requires_grad_(),
                "boxes": boxes,
                "indices": indices,
                "keypoint_mu": mu.requires_grad_(),
                "keypoint_sigma": torch.full((3, K, 2), sigma, requires_grad=True),
                "keypoint_boxes": keypoint_boxes,
            }
        )
    return {"stages": stages}


def test_terms_per_stage_and_weighted_total():
    targets = make_targets()
    outputs = make_outputs(targets, num_stages=3, box_noise=3.0, mu_noise=0.05)
    criterion = SetCriterion.from_config(ModelConfig(cls_weight=1.5, l1_weight=4.0, giou_weight=3.0, rle_weight=0.5))
    losses = criterion(outputs, targets, SIZES, RealNVP())
    names = {f"loss_{t}_s{s}" for t in ("cls", "l1", "giou", "rle") for s in range(3)}
    assert set(losses) == names | {"loss"}
    weights = {"cls": 1.5, "l1": 4.0, "giou": 3.0, "rle": 0.5}
    expected = sum(weights[name.split("_")[1]] * losses[name] for name in names)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in losses.values())


def test_box_and_class_terms_match_torchvision_divided_by_people():
    targets = make_targets()
    outputs = make_outputs(targets, num_stages=1, box_noise=4.0)
    stage = outputs["stages"][0]
    losses = SetCriterion()(outputs, targets, SIZES, RealNVP())
    labels = torch.zeros(2, 4)
    labels[0, [1, 3]] = labels[1, 0] = 1.0
    focal = sigmoid_focal_loss(stage["logits"], labels, 0.25, 2.0, reduction="sum")
    assert losses["loss_cls_s0"].item() == pytest.approx(focal.item() / 3, rel=1e-6)
    predicted = torch.cat([stage["boxes"][0, [1, 3]], stage["boxes"][1, [0]]])
    gt = torch.cat([targets[0]["boxes"][[1, 0]], targets[1]["boxes"]])
    whwh = torch.tensor([[160.0, 120, 160, 120]] * 2 + [[100.0, 100, 100, 100]])
    assert losses["loss_l1_s0"].item() == pytest.approx((predicted / whwh - gt / whwh).abs().sum().item() / 3)
    giou = generalized_box_iou_loss(predicted, gt, reduction="sum")
    assert losses["loss_giou_s0"].item() == pytest.approx(giou.item() / 3, rel=1e-6)


def test_good_predictions_score_lower_than_bad_ones():
    targets = make_targets()
    flow, criterion = RealNVP(), SetCriterion()
    good = criterion(make_outputs(targets, confident=True, sigma=0.02), targets, SIZES, flow)
    bad = criterion(make_outputs(targets, box_noise=15.0, mu_noise=0.2, sigma=0.02), targets, SIZES, flow)
    for term in ("cls", "l1", "giou", "rle"):
        assert good[f"loss_{term}_s1"] < bad[f"loss_{term}_s1"], term
    assert good["loss_l1_s0"].item() == 0.0 and good["loss_giou_s0"].item() == pytest.approx(0.0, abs=1e-6)


def test_unlabelled_and_out_of_box_keypoints_carry_no_gradient():
    targets = make_targets()
    targets[1]["keypoints"][0, 5, :2] = torch.tensor([5.0, 5.0])  # labelled but outside its box
    outputs = make_outputs(targets, num_stages=1, mu_noise=0.1)
    SetCriterion()(outputs, targets, SIZES, RealNVP())["loss"].backward()
    stage = outputs["stages"][0]
    # row order: image 0's queries 1 and 3 (people 1, 0), then image 1's query 0 (person 0)
    grad = stage["keypoint_mu"].grad
    assert (grad[1, :3] == 0).all()  # person 0 of image 0: keypoints 0..2 unlabelled
    assert (grad[2, 5] == 0).all() and (stage["keypoint_sigma"].grad[2, 5] == 0).all()
    assert (grad[0] != 0).all() and (grad[1, 3:] != 0).any()
    assert stage["boxes"].grad is not None and stage["logits"].grad is not None


def test_normaliser_is_the_number_of_people_and_at_least_one():
    targets = make_targets()
    outputs = make_outputs(targets, num_stages=1, box_noise=2.0, mu_noise=0.1)
    flow = RealNVP()
    full = SetCriterion()(outputs, targets, SIZES, flow)
    # Same matched pairs, but one more (unmatched) person in image 1: every term is divided by 4 instead of 3.
    extra = [targets[0], {k: torch.cat([v, v]) for k, v in targets[1].items()}]
    more = SetCriterion()(outputs, extra, SIZES, flow)
    for name in ("loss_l1_s0", "loss_giou_s0", "loss_rle_s0", "loss_cls_s0"):
        assert more[name].item() == pytest.approx(full[name].item() * 3 / 4, rel=1e-5)
    assert float(SetCriterion.num_people([{"boxes": torch.zeros(0, 4)}], torch.device("cpu"))) == 1.0


def test_batch_without_people():
    empty = [{"boxes": torch.zeros(0, 4), "keypoints": torch.zeros(0)} for _ in range(2)]
    outputs = {
        "stages": [
            {
                "logits": torch.zeros(2, 4, requires_grad=True),
                "boxes": torch.rand(2, 4, 4),
                "indices": [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * 2,
                "keypoint_mu": torch.zeros(0, K, 2),
                "keypoint_sigma": torch.zeros(0, K, 2),
                "keypoint_boxes": torch.zeros(0, 4),
            }
        ]
    }
    losses = SetCriterion()(outputs, empty, SIZES, RealNVP())
    expected = sigmoid_focal_loss(torch.zeros(2, 4), torch.zeros(2, 4), reduction="sum")  # all background
    assert losses["loss_cls_s0"].item() == pytest.approx(expected.item())
    assert losses["loss_l1_s0"].item() == losses["loss_rle_s0"].item() == 0.0


def _count_people(rank: int, world_size: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    targets = [{"boxes": torch.zeros(1 + 2 * rank, 4)}]  # rank 0: 1 person, rank 1: 3 people
    queue.put((rank, float(SetCriterion.num_people(targets, torch.device("cpu")))))
    dist.destroy_process_group()


def test_normaliser_is_averaged_over_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_count_people, args=(2, port, queue), nprocs=2, start_method="spawn")
    assert sorted(queue.get() for _ in range(2)) == [(0, 2.0), (1, 2.0)]


def test_rle_term_is_the_authors_formula_per_keypoint():
    """Two matched people with masked keypoints (unlabelled, and outside the predicted box): loss_rle equals the
    authors' loss.py written out by hand, summed over used coordinates and divided by num_boxes * K."""
    targets = make_targets()
    targets[1]["keypoints"][0, 5, :2] = torch.tensor([5.0, 5.0])  # labelled but outside its predicted box
    outputs = make_outputs(targets, num_stages=1, box_noise=1.0, mu_noise=0.2, sigma=0.3)
    stage = outputs["stages"][0]
    indices = [(torch.tensor([3]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]  # two people
    keep = torch.tensor([1, 2])  # rows of the two matches in the stage's matched order
    stage.update(
        indices=indices,
        keypoint_mu=stage["keypoint_mu"][keep],
        keypoint_sigma=stage["keypoint_sigma"][keep],
        keypoint_boxes=stage["keypoint_boxes"][keep],
    )
    flow = RealNVP()
    got = SetCriterion()(outputs, targets, SIZES, flow)["loss_rle_s0"]

    gt = torch.stack([targets[0]["keypoints"][0], targets[1]["keypoints"][0]])  # (2, K, 3)
    boxes = stage["keypoint_boxes"]
    mu, sigma = stage["keypoint_mu"].detach(), stage["keypoint_sigma"].detach()
    expected = 0.0
    for i in range(2):
        x1, y1, x2, y2 = boxes[i].tolist()
        for k in range(K):
            x, y, v = gt[i, k].tolist()
            if v == 0 or not (x1 <= x <= x2 and y1 <= y <= y2):
                continue
            target = ((x - x1) / (x2 - x1) - 0.5, (y - y1) / (y2 - y1) - 0.5)
            bar = ((mu[i, k] - torch.tensor(target)) / sigma[i, k])[None]
            log_phi = float(flow.log_prob(bar).detach()[0])
            for c in range(2):
                s, m = float(sigma[i, k, c]), float(mu[i, k, c])
                expected += math.log(s) - log_phi  # nf_loss, one log-density charged to each coordinate
                expected += math.log(s * math.sqrt(2 * math.pi)) + abs(target[c] - m) / (math.sqrt(2) * s + 1e-9)
    num_people = 3  # every person in the batch, matched or not
    assert got.item() == pytest.approx(expected / (num_people * K), rel=1e-5)


@pytest.mark.parametrize("target", ["iou", "oks"])
def test_quality_targets_train_matched_queries_towards_their_box_iou_or_pose_oks(target):
    from torchvision.ops import box_iou

    from querypose.keypoints import COCO
    from querypose.matcher import object_keypoint_similarity
    from querypose.model import decode_keypoints

    targets = make_targets()
    outputs = make_outputs(targets, num_stages=1, box_noise=6.0, mu_noise=0.1)
    stage = outputs["stages"][0]
    got = SetCriterion(cls_target=target, sigmas=COCO.sigmas)(outputs, targets, SIZES, RealNVP())["loss_cls_s0"]
    labels = torch.zeros(2, 4)
    gt_boxes = torch.stack([targets[0]["boxes"][1], targets[0]["boxes"][0], targets[1]["boxes"][0]])
    gt_keypoints = torch.stack([targets[0]["keypoints"][1], targets[0]["keypoints"][0], targets[1]["keypoints"][0]])
    rows = [(0, 1), (0, 3), (1, 0)]
    if target == "iou":
        predicted = torch.stack([stage["boxes"][b, q] for b, q in rows]).detach()
        quality = box_iou(predicted, gt_boxes).diagonal()
    else:
        pixels = decode_keypoints(stage["keypoint_mu"].detach(), stage["keypoint_boxes"])
        quality = object_keypoint_similarity(pixels, {"keypoints": gt_keypoints, "boxes": gt_boxes},
                                             torch.tensor(COCO.sigmas)).diagonal()  # fmt: skip
    assert quality.min() > 0.02 and quality.max() < 0.99  # soft targets, not 0 or 1
    for (b, q), value in zip(rows, quality, strict=True):
        labels[b, q] = value
    expected = sigmoid_focal_loss(stage["logits"].detach(), labels, 0.25, 2.0, reduction="sum") / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    binary = SetCriterion()(outputs, targets, SIZES, RealNVP())["loss_cls_s0"]
    assert binary.item() != pytest.approx(got.item(), rel=1e-3)


def _with_readout_maps(outputs, logits_of):
    """Attach (T, K, 196) readout logits made by logits_of(stage) to every stage."""
    for stage in outputs["stages"]:
        stage["keypoint_readout_logits"] = logits_of(stage).requires_grad_()
    return outputs


def test_readout_map_term_is_a_cross_entropy_to_a_one_cell_gaussian_per_keypoint():
    """model.readout_map_weight: each labelled keypoint inside its box pays -sum_c g_c log softmax(logits)_c, g a
    normalised Gaussian (sd one cell) at its target; the sum is divided by people x K and weighted into the total."""
    targets = make_targets()
    targets[1]["keypoints"][0, 5, :2] = torch.tensor([5.0, 5.0])  # labelled but outside its predicted box
    generator = torch.Generator().manual_seed(2)
    outputs = _with_readout_maps(make_outputs(targets, num_stages=2, box_noise=1.0),
                                 lambda stage: torch.randn(3, K, 196, generator=generator))  # fmt: skip
    flow = RealNVP()
    losses = SetCriterion(readout_map_weight=0.5)(outputs, targets, SIZES, flow)
    assert {"loss_readout_s0", "loss_readout_s1"} <= set(losses)
    without = SetCriterion()(outputs, targets, SIZES, flow)
    assert "loss_readout_s0" not in without
    added = 0.5 * (losses["loss_readout_s0"] + losses["loss_readout_s1"])
    assert losses["loss"].item() == pytest.approx((without["loss"] + added).item(), rel=1e-5)

    stage = outputs["stages"][0]
    gt = torch.cat([targets[0]["keypoints"][[1, 0]], targets[1]["keypoints"][[0]]])  # matched order
    expected = 0.0
    for t in range(3):
        x1, y1, x2, y2 = stage["keypoint_boxes"][t].tolist()
        for k in range(K):
            x, y, v = gt[t, k].tolist()
            if v == 0 or not (x1 <= x <= x2 and y1 <= y <= y2):
                continue
            column, row = (x - x1) / (x2 - x1) * 14, (y - y1) / (y2 - y1) * 14  # in cells
            log_p = stage["keypoint_readout_logits"][t, k].detach().log_softmax(0)
            weights = torch.tensor([math.exp(-((c + 0.5 - column) ** 2 + (r + 0.5 - row) ** 2) / 2)
                                    for r in range(14) for c in range(14)])  # fmt: skip
            expected -= float((weights / weights.sum() * log_p).sum())
    assert losses["loss_readout_s0"].item() == pytest.approx(expected / (3 * K), rel=1e-5)


def test_readout_map_term_is_lowest_for_maps_on_the_keypoints_and_trains_them():
    targets = make_targets()
    outputs = make_outputs(targets, num_stages=1)
    stage = outputs["stages"][0]
    gt = torch.cat([targets[0]["keypoints"][[1, 0]], targets[1]["keypoints"][[0]]])
    relative = encode_keypoints(gt[..., :2], stage["keypoint_boxes"])  # (3, K, 2)
    cells = ((relative + 0.5) * 14).floor().clamp(0, 13).long()
    rows, columns = torch.arange(196) // 14, torch.arange(196) % 14

    def peaked_at(row, column):  # (3, K, 196) log-Gaussian maps around the given cells
        return -((rows - row[..., None]) ** 2 + (columns - column[..., None]) ** 2) / 2.0

    on_target = peaked_at(cells[..., 1], cells[..., 0])
    off_target = peaked_at((cells[..., 1] + 3) % 14, (cells[..., 0] + 3) % 14)  # every peak three cells away
    criterion = SetCriterion(readout_map_weight=1.0)

    def term(logits):
        maps = _with_readout_maps(make_outputs(targets, num_stages=1), lambda _: logits.clone())
        return criterion(maps, targets, SIZES, RealNVP())["loss_readout_s0"], maps["stages"][0]

    good, _ = term(on_target)
    bad, bad_stage = term(off_target)
    assert good.item() < 0.5 * bad.item()
    bad.backward()
    gradient = bad_stage["keypoint_readout_logits"].grad
    labelled = gt[..., 2] > 0
    target_cell = (cells[..., 1] * 14 + cells[..., 0])[labelled]
    # descending the gradient raises the logit of the keypoint's own cell and ignores unlabelled keypoints
    assert (gradient[labelled].gather(-1, target_cell[:, None]) < 0).all()
    assert (gradient[~labelled] == 0).all()


def test_readout_map_weight_needs_the_soft_argmax_readout():
    with pytest.raises(ValueError, match="model.readout_map_weight=0.5 trains the soft-argmax readout"):
        ModelConfig(readout_map_weight=0.5)
    with pytest.raises(ValueError, match="model.readout_map_weight: must be >= 0"):
        ModelConfig(keypoint_readout="soft_argmax", readout_map_weight=-1.0)
