"""Numpy augmentation: flip, resize, crop, the paper's training pipeline, test resize and the target tensors."""

import numpy as np
import pytest
import torch

from querypose import transforms as T
from querypose.keypoints import COCO


def make_sample(seed: int = 0, height: int = 60, width: int = 90) -> dict:
    rng = np.random.default_rng(seed)
    boxes = np.array([[5, 5, 40, 55], [30, 10, 85, 50]], np.float32)
    keypoints = np.zeros((2, 17, 3), np.float32)
    for p, (x1, y1, x2, y2) in enumerate(boxes):
        keypoints[p, :, 0] = rng.uniform(x1, x2, 17)
        keypoints[p, :, 1] = rng.uniform(y1, y2, 17)
        keypoints[p, :, 2] = 2
    keypoints[1, 4] = 0  # an unlabelled keypoint
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return {"image": image, "boxes": boxes, "keypoints": keypoints, "image_id": 7}


def test_flip_twice_is_the_identity_and_swaps_sides():
    sample = make_sample()
    once = T.hflip(sample, COCO.flip_index)
    twice = T.hflip(once, COCO.flip_index)
    np.testing.assert_array_equal(twice["image"], sample["image"])
    np.testing.assert_allclose(twice["boxes"], sample["boxes"])
    np.testing.assert_allclose(twice["keypoints"], sample["keypoints"], rtol=1e-5)
    np.testing.assert_array_equal(once["image"][:, 0], sample["image"][:, -1])
    np.testing.assert_allclose(once["boxes"][0], [90 - 40, 5, 90 - 5, 55])
    # the new left shoulder (5) is the old right shoulder (6), mirrored
    np.testing.assert_allclose(
        once["keypoints"][0, 5, :2], [90 - sample["keypoints"][0, 6, 0], sample["keypoints"][0, 6, 1]]
    )
    assert once["keypoints"][1, 3].tolist() == [0, 0, 0]  # the unlabelled right ear became the left ear, still 0
    assert once["image_id"] == 7


def test_resize_scales_coordinates_and_respects_the_sizes():
    sample = make_sample()
    out = T.resize(sample, short_side=120, max_size=1000)
    assert out["image"].shape == (120, 180, 3)
    np.testing.assert_allclose(out["boxes"], sample["boxes"] * 2, rtol=1e-6)
    np.testing.assert_allclose(out["keypoints"][..., :2], sample["keypoints"][..., :2] * 2, rtol=1e-6)
    np.testing.assert_array_equal(out["keypoints"][..., 2], sample["keypoints"][..., 2])
    capped = T.resize(sample, short_side=120, max_size=150)  # long side would be 180
    assert capped["image"].shape[:2] == (100, 150)
    assert out["boxes"].dtype == np.float32 and out["image"].dtype == np.uint8


def test_crop_hides_keypoints_that_leave_and_clips_boxes():
    sample = make_sample()
    out = T.crop(sample, x0=20, y0=0, width=40, height=60)
    assert out["image"].shape == (60, 40, 3)
    np.testing.assert_array_equal(out["image"], sample["image"][:, 20:60])
    boxes, keypoints = out["boxes"], out["keypoints"]
    np.testing.assert_allclose(boxes, [[0, 5, 20, 55], [10, 10, 40, 50]])
    original = sample["keypoints"]
    inside = (original[..., 0] >= 20) & (original[..., 0] < 60) & (original[..., 2] > 0)
    assert ((keypoints[..., 2] > 0) == inside).all()
    assert (keypoints[~inside] == 0).all()
    np.testing.assert_allclose(keypoints[inside][:, 0], original[inside][:, 0] - 20)


def test_crop_drops_people_left_without_a_box():
    sample = make_sample()
    out = T.crop(sample, x0=45, y0=0, width=45, height=60)  # person 0 ends at x = 40
    assert len(out["boxes"]) == len(out["keypoints"]) == 1
    np.testing.assert_allclose(out["boxes"][0], [0, 10, 40, 50])
    assert out["keypoints"].shape == (1, 17, 3)


def test_train_augment_is_seeded_and_keeps_annotations_in_the_image():
    sample = make_sample(height=300, width=400)
    sample["boxes"] *= 4
    sample["keypoints"][..., :2] *= 4
    kwargs = dict(short_sides=(96, 128), max_size=200, crop_resize_sides=(150, 200), crop_size=(80, 120))
    for seed in range(12):
        a = T.train_augment(sample, np.random.default_rng(seed), COCO.flip_index, **kwargs)
        b = T.train_augment(sample, np.random.default_rng(seed), COCO.flip_index, **kwargs)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
        height, width = a["image"].shape[:2]
        assert min(height, width) in (96, 128) or max(height, width) == 200
        assert max(height, width) <= 200
        assert (a["boxes"] >= 0).all() and (a["boxes"][:, [0, 2]] <= width).all()
        assert (a["boxes"][:, [1, 3]] <= height).all()
        labelled = a["keypoints"][..., 2] > 0
        assert (a["keypoints"][labelled][:, 0] <= width).all() and (a["keypoints"][labelled][:, 1] <= height).all()
    shapes = {
        T.train_augment(sample, np.random.default_rng(s), COCO.flip_index, **kwargs)["image"].shape for s in range(12)
    }
    assert len(shapes) > 1  # the seed changes the augmentation


def test_test_resize_records_the_scale():
    out = T.test_resize(make_sample(), short_side=30, max_size=1333)
    assert out["image"].shape[:2] == (30, 45)
    np.testing.assert_allclose(out["scale"], [0.5, 0.5])


def test_sample_to_target():
    image, target = T.sample_to_target(make_sample())
    assert image.shape == (3, 60, 90) and image.dtype == torch.float32 and float(image.max()) <= 255
    assert target["boxes"].shape == (2, 4) and target["keypoints"].shape == (2, 17, 3)
    empty = {"image": np.zeros((8, 8, 3), np.uint8), "boxes": np.zeros(0), "keypoints": np.zeros(0)}
    _, target = T.sample_to_target(empty, num_keypoints=17)
    assert target["boxes"].shape == (0, 4) and target["keypoints"].shape == (0, 17, 3)
    flat = {**make_sample(), "keypoints": make_sample()["keypoints"].reshape(2, 51)}
    assert T.sample_to_target(flat)[1]["keypoints"].shape == (2, 17, 3)
    with pytest.raises(ValueError, match="sample 7: field 'keypoints'"):
        T.sample_to_target({**make_sample(), "keypoints": np.zeros((3, 17, 3))})
    with pytest.raises(ValueError, match="field 'image'"):
        T.sample_to_target({**make_sample(), "image": np.zeros((8, 8))})


def test_pad_batch_pads_to_a_multiple_of_32():
    batch, sizes = T.pad_batch([torch.ones(3, 40, 50), torch.ones(3, 20, 70)])
    assert batch.shape == (2, 3, 64, 96) and sizes.tolist() == [[40, 50], [20, 70]]
    assert float(batch[1, :, 20:].abs().sum()) == 0.0


def test_pixel_centre_convention_makes_a_flip_exact_and_export_restores_coco_values():
    """COCO keypoints are pixel indices: loading adds 0.5, so mirroring a keypoint on pixel column i of a W-wide
    image lands it on column W - 1 - i, and exporting subtracts the 0.5 again (detectron2's convention)."""
    from querypose.engine import to_coco_results

    width = 10
    annotations = [
        {"bbox": [1, 2, 5, 6], "keypoints": [2, 3, 2] + [0, 0, 0] * 16, "iscrowd": 0},
        {"bbox": [0, 0, 10, 10], "keypoints": [4, 4, 2] * 17, "iscrowd": 1},  # a crowd region: not a person
    ]
    boxes, keypoints = T.people_arrays(annotations, 17)
    assert boxes.tolist() == [[1, 2, 6, 8]] and keypoints.shape == (1, 17, 3)
    assert keypoints[0, 0].tolist() == [2.5, 3.5, 2] and keypoints[0, 1].tolist() == [0, 0, 0]
    image = np.zeros((10, width, 3), np.uint8)
    flipped = T.hflip({"image": image, "boxes": boxes, "keypoints": keypoints}, COCO.flip_index)
    exported = to_coco_results({"keypoints": torch.from_numpy(flipped["keypoints"]), "scores": torch.ones(1)}, 1)
    assert exported[0]["keypoints"][:3] == [width - 1 - 2, 3, 2]  # column 2 mirrors to column 7
    assert T.has_people(annotations) and not T.has_people(annotations[1:])


def test_crop_sides_are_drawn_as_detectron2_absolute_range():
    """RandomCrop("absolute_range", (lo, hi)) draws each side uniformly in [min(side, lo), min(side, hi)]: a side
    shorter than lo is kept whole, one between lo and hi is cut to any size in [lo, side] (not clipped to it)."""
    rng = np.random.default_rng(0)
    windows = [T.crop_window(150, 60, (80, 200), rng) for _ in range(400)]
    heights = [h for _, _, _, h in windows]
    assert {w for _, _, w, _ in windows} == {60}
    assert min(heights) == 80 and max(heights) == 150 and len(set(heights)) > 50
    assert heights.count(150) < 20  # uniform over 71 sizes; min(side, U[lo, hi]) would give 150 about 40% of the time
    assert all(x0 >= 0 and x0 + w <= 60 and y0 >= 0 and y0 + h <= 150 for x0, y0, w, h in windows)
