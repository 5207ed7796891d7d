import torch

from querypose.matcher import HungarianMatcher

GT = {
    "boxes": torch.tensor([[10.0, 10.0, 50.0, 90.0], [60.0, 20.0, 100.0, 60.0], [5.0, 60.0, 30.0, 95.0]]),
    "keypoints": torch.zeros(3, 17, 3),
}
SIZES = torch.tensor([[100, 120]])


def _predictions():
    boxes = torch.tensor([[0.0, 0.0, 120.0, 100.0], [60.0, 20.0, 100.0, 60.0], [5.0, 60.0, 30.0, 95.0],
                          [10.0, 10.0, 50.0, 90.0], [40.0, 40.0, 45.0, 45.0]])[None]  # fmt: skip
    return torch.zeros(1, 5), boxes


def test_identical_predictions_match_their_people():
    logits, boxes = _predictions()
    (pred, gt), = HungarianMatcher()(logits, boxes, [GT], SIZES)
    assert pred.tolist() == [1, 2, 3] and gt.tolist() == [1, 2, 0]
    assert pred.dtype == gt.dtype == torch.int64


def test_permuting_predictions_permutes_the_assignment():
    logits, boxes = _predictions()
    perm = torch.tensor([4, 2, 0, 3, 1])
    (pred, gt), = HungarianMatcher()(logits[:, perm], boxes[:, perm], [GT], SIZES)
    (pred0, gt0), = HungarianMatcher()(logits, boxes, [GT], SIZES)
    inverse = torch.argsort(perm)
    assert sorted(zip(perm[pred].tolist(), gt.tolist(), strict=True)) == sorted(zip(pred0.tolist(), gt0.tolist(), strict=True))
    assert sorted(inverse[pred0].tolist()) == pred.tolist()


def test_images_without_people_and_more_people_than_queries():
    logits, boxes = _predictions()
    empty = {"boxes": torch.zeros(0, 4), "keypoints": torch.zeros(0, 17, 3)}
    matches = HungarianMatcher()(logits.repeat(2, 1), boxes.repeat(2, 1, 1), [empty, GT], SIZES.repeat(2, 1))
    assert [len(p) for p, _ in matches] == [0, 3]
    (pred, gt), = HungarianMatcher()(logits[:, :2], boxes[:, :2], [GT], SIZES)
    assert len(pred) == len(gt) == 2 and len(set(gt.tolist())) == 2


def test_keypoint_cost_breaks_box_ties():
    box = torch.tensor([10.0, 10.0, 60.0, 90.0])
    boxes = box.repeat(1, 2, 1)  # two queries with the same box
    gt_kp = torch.zeros(1, 17, 3)
    gt_kp[0, :, 0] = torch.linspace(15, 55, 17)
    gt_kp[0, :, 1] = 50.0
    gt_kp[0, :, 2] = 2
    target = {"boxes": box[None], "keypoints": gt_kp}
    predicted = torch.stack([gt_kp[0, :, :2] + 30.0, gt_kp[0, :, :2]])[None]  # query 1 has the right pose
    matcher = HungarianMatcher(keypoint_cost=5.0, sigmas=(0.05,) * 17)
    (pred, _), = matcher(torch.zeros(1, 2), boxes, [target], SIZES, keypoints=predicted)
    assert pred.tolist() == [1]
    reversed_pose = predicted.flip(1)
    (pred, _), = matcher(torch.zeros(1, 2), boxes, [target], SIZES, keypoints=reversed_pose)
    assert pred.tolist() == [0]


def test_confident_query_wins_between_equal_boxes():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 90.0]]).repeat(1, 2, 1)
    logits = torch.tensor([[-3.0, 3.0]])
    target = {"boxes": GT["boxes"][:1], "keypoints": GT["keypoints"][:1]}
    (pred, _), = HungarianMatcher()(logits, boxes, [target], SIZES)
    assert pred.tolist() == [1]
