"""HungarianMatcher: exact matches, permutation equivariance, empty images, the optional OKS term."""

import math

import pytest
import torch

from querypose.config import ModelConfig
from querypose.keypoints import CROWDPOSE
from querypose.matcher import HungarianMatcher

SIZE = torch.tensor([[200, 300]])  # [h, w]


def people(boxes: list[list[float]], num_keypoints: int = 17) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    # keypoints spread over each box so OKS has something to compare
    grid = torch.linspace(0.1, 0.9, num_keypoints)
    xs = boxes[:, None, 0] + grid * (boxes[:, None, 2] - boxes[:, None, 0])
    ys = boxes[:, None, 1] + grid.flip(0) * (boxes[:, None, 3] - boxes[:, None, 1])
    keypoints = torch.stack([xs, ys, torch.full_like(xs, 2.0)], dim=-1)
    return {"boxes": boxes, "keypoints": keypoints}


GT = people([[10, 20, 60, 120], [100, 30, 180, 190], [200, 50, 290, 150]])
DECOYS = torch.tensor([[0, 0, 300, 200], [50, 50, 80, 90], [150, 10, 160, 40]], dtype=torch.float32)


def test_predictions_equal_to_people_are_matched_to_them():
    boxes = torch.cat([DECOYS[:2], GT["boxes"][2:3], GT["boxes"][0:1], DECOYS[2:], GT["boxes"][1:2]])[None]  # (1,6,4)
    logits = torch.zeros(1, 6)
    ((pred, gt),) = HungarianMatcher()(logits, boxes, [GT], SIZE)
    assert pred.tolist() == [2, 3, 5] and gt.tolist() == [2, 0, 1]
    assert pred.dtype == gt.dtype == torch.int64


def test_permuting_predictions_permutes_the_assignment():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(1, 12, 2, generator=generator) * 150
    boxes = torch.cat([xy, xy + 10 + torch.rand(1, 12, 2, generator=generator) * 100], dim=-1)
    logits = torch.randn(1, 12, generator=generator)
    matcher = HungarianMatcher()
    ((pred, gt),) = matcher(logits, boxes, [GT], SIZE)
    perm = torch.randperm(12, generator=generator)
    ((pred_p, gt_p),) = matcher(logits[:, perm], boxes[:, perm], [GT], SIZE)
    assert sorted(zip(perm[pred_p].tolist(), gt_p.tolist(), strict=True)) == sorted(
        zip(pred.tolist(), gt.tolist(), strict=True)
    )
    assert pred_p.tolist() == sorted(pred_p.tolist())  # sorted by query index


def test_images_without_people_and_more_people_than_queries():
    boxes = torch.cat([GT["boxes"][:2], DECOYS[:1]])[None].repeat(2, 1, 1)  # (2, 3, 4)
    no_one = {"boxes": torch.zeros(0, 4), "keypoints": torch.zeros(0, 17, 3)}
    crowd = people([[10, 10, 50, 50], [60, 10, 90, 50], [100, 10, 150, 60], [5, 100, 40, 190], [200, 90, 280, 180]])
    matches = HungarianMatcher()(torch.zeros(2, 3), boxes, [no_one, crowd], SIZE.repeat(2, 1))
    assert [m.tolist() for m in matches[0]] == [[], []]
    assert matches[0][0].dtype == torch.int64
    pred, gt = matches[1]
    assert len(pred) == len(gt) == 3 and pred.tolist() == [0, 1, 2]
    assert len(set(gt.tolist())) == 3


def test_cost_matches_the_formula():
    matcher = HungarianMatcher()
    box, person = torch.tensor([[10.0, 20, 70, 100]]), people([[20, 20, 60, 120]])
    cost = matcher.cost_matrix(torch.tensor([0.3]), box, person, SIZE[0])
    p = 1 / (1 + math.exp(-0.3))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    l1 = 10 / 300 + 0 / 200 + 10 / 300 + 20 / 200
    inter, union = 40 * 80, 60 * 80 + 40 * 100 - 40 * 80
    giou = inter / union - (60 * 100 - union) / (60 * 100)
    assert cost.item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, rel=1e-5)
    # a confident person costs less than an unsure one, all else equal
    assert matcher.cost_matrix(torch.tensor([3.0]), box, person, SIZE[0]) < cost


def test_keypoint_cost_breaks_box_ties():
    # Two people share one box; query 0's box is a hair closer to it, so boxes alone give the identity. The
    # queries' poses, however, are the other person's.
    a = people([[50, 40, 150, 190]])
    b = {"boxes": a["boxes"].clone(), "keypoints": a["keypoints"].flip(1)}
    b["keypoints"][..., 2] = 2.0
    target = {"boxes": torch.cat([a["boxes"], b["boxes"]]), "keypoints": torch.cat([a["keypoints"], b["keypoints"]])}
    boxes = torch.tensor([[[50.0, 40, 150, 190], [50.5, 40, 150, 190]]])
    poses = torch.stack([b["keypoints"][0, :, :2], a["keypoints"][0, :, :2]])[None]  # (1, 2, K, 2)
    plain = HungarianMatcher.from_config(ModelConfig())
    assert plain(torch.zeros(1, 2), boxes, [target], SIZE, keypoints=poses)[0][1].tolist() == [0, 1]
    with_oks = HungarianMatcher.from_config(ModelConfig(keypoint_cost=2.0))
    assert with_oks(torch.zeros(1, 2), boxes, [target], SIZE, keypoints=poses)[0][1].tolist() == [1, 0]


def test_from_config_takes_the_datasets_sigmas_and_weights():
    matcher = HungarianMatcher.from_config(ModelConfig(dataset="crowdpose", cls_weight=1.0, keypoint_cost=1.0))
    assert matcher.sigmas.tolist() == pytest.approx(CROWDPOSE.sigmas)
    assert matcher.cls_weight == 1.0 and matcher.l1_weight == 5.0 and matcher.giou_weight == 2.0


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        HungarianMatcher()(torch.zeros(1, 3), torch.zeros(1, 3, 4), [GT, GT], SIZE)
    boxes = torch.full((1, 3, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="image 0"):
        HungarianMatcher()(torch.zeros(1, 3), boxes, [GT], SIZE)


def test_confident_query_wins_between_equal_boxes():
    boxes = GT["boxes"][:1].repeat(1, 2, 1)  # (1, 2, 4): two queries, one box
    target = {"boxes": GT["boxes"][:1], "keypoints": GT["keypoints"][:1]}
    ((pred, _),) = HungarianMatcher()(torch.tensor([[-3.0, 3.0]]), boxes, [target], SIZE)
    assert pred.tolist() == [1]
