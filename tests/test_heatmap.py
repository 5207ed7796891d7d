"""The authors' auxiliary heatmap loss: CenterNet Gaussian targets at stride 4 and CornerNet's focal loss."""

import math

import pytest
import torch

from querypose.heatmap import HeatmapHead, gaussian_radius, heatmap_focal_loss, render_heatmaps


def test_radius_is_centernets_smallest_overlap_case():
    # box 40 x 100 at min_overlap 0.7: the three corner cases give 134.8, 261.7 and 15.9 -> 15.9
    w, h, m = 40.0, 100.0, 0.7
    r3 = (-2 * m * (w + h) + math.sqrt((2 * m * (w + h)) ** 2 + 16 * m * (1 - m) * w * h)) / 2
    assert gaussian_radius(torch.tensor([w]), torch.tensor([h])).item() == pytest.approx(r3, rel=1e-6)
    assert r3 == pytest.approx(15.86, abs=0.01)


def test_targets_peak_at_each_labelled_keypoint_cell_and_overlaps_keep_the_maximum():
    keypoints = torch.zeros(2, 17, 3)
    keypoints[0, 0] = torch.tensor([21.3, 41.9, 2.0])  # cell (x 5, y 10) at stride 4
    keypoints[1, 0] = torch.tensor([29.0, 41.0, 1.0])  # the same joint of a second person, cell (7, 10)
    keypoints[0, 1] = torch.tensor([500.0, 10.0, 2.0])  # outside the map: nothing drawn
    boxes = torch.tensor([[0.0, 0.0, 8.0, 20.0], [0.0, 0.0, 8.0, 20.0]])
    maps = render_heatmaps([{"boxes": boxes, "keypoints": keypoints}], (24, 32), 17)
    assert maps.shape == (1, 17, 24, 32)
    radius = int(gaussian_radius(torch.tensor([8.0]), torch.tensor([20.0])).item())  # 3
    assert radius == 3
    joint = maps[0, 0]
    assert joint[10, 5] == 1 and joint[10, 7] == 1 and (joint == 1).sum() == 2
    sigma = (2 * radius + 1) / 6
    assert joint[10, 6].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-5)  # max of both people
    assert joint[10, 1].item() == 0 and joint[14, 5].item() == 0  # beyond the (2r + 1) window
    assert maps[0, 1:].sum() == 0


def test_focal_loss_rewards_the_target_and_is_normalised_by_peaks():
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 3, 3] = 1.0
    target[0, 0, 3, 4] = 0.6
    good = torch.full_like(target, -9.0)
    good[0, 0, 3, 3] = 9.0
    bad = -good
    assert heatmap_focal_loss(good, target) < 0.05 < heatmap_focal_loss(bad, target)
    prob = 0.1
    no_peaks = heatmap_focal_loss(torch.full((1, 1, 2, 2), math.log(0.1 / 0.9)), torch.zeros(1, 1, 2, 2))
    assert no_peaks.item() == pytest.approx(-4 * math.log(1 - prob) * prob**2, rel=1e-4)  # summed, divided by 1


def test_head_starts_at_the_prior():
    head = HeatmapHead(16, 17)
    assert head(torch.zeros(1, 16, 5, 5)).shape == (1, 17, 5, 5)
    assert torch.equal(head.net[-1].bias, torch.full((17,), -2.19))  # sigmoid(-2.19) ~ 0.1 everywhere at the start
