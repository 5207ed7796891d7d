import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from querypose import synthetic
from querypose.evaluation import evaluate_keypoints
from querypose.keypoints import COCO, CROWDPOSE, load_keypoint_set
from querypose.synthetic import render_sample, write_synthetic_dataset

QUADRUPED = load_keypoint_set(Path(__file__).resolve().parents[1] / "experiments/configs/keypoints/quadruped.yaml")


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn") / "coco", 12, "coco", seed=3, image_size=160)


def test_deterministic_for_a_seed(tmp_path, coco_set):
    again = write_synthetic_dataset(tmp_path / "again", 12, "coco", seed=3, image_size=160)
    assert again.read_bytes() == coco_set.read_bytes()
    first = sorted((coco_set.parent / "images").iterdir())
    second = sorted((again.parent / "images").iterdir())
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = write_synthetic_dataset(tmp_path / "other", 12, "coco", seed=4, image_size=160)
    assert other.read_bytes() != coco_set.read_bytes()


def test_max_people_caps_the_crowd_and_the_default_is_unchanged(tmp_path, coco_set):
    default = write_synthetic_dataset(tmp_path / "six", 12, "coco", seed=3, image_size=160, max_people=6)
    assert default.read_bytes() == coco_set.read_bytes()
    counts = {}
    for cap in (1, 2):
        gt = json.loads(write_synthetic_dataset(tmp_path / f"cap{cap}", 40, "coco", seed=3, max_people=cap).read_text())
        per_image = np.bincount([a["image_id"] for a in gt["annotations"]], minlength=41)[1:]
        assert per_image.max() <= cap
        counts[cap] = per_image
    assert (counts[2] == 2).any()  # the cap is a cap, not a fixed count
    with pytest.raises(ValueError, match="max_people must be in 1..6, got 7"):
        write_synthetic_dataset(tmp_path / "seven", 2, "coco", max_people=7)
    assert not (tmp_path / "seven").exists()


@pytest.mark.parametrize("spec", [COCO, CROWDPOSE, QUADRUPED], ids=["coco", "crowdpose", "quadruped"])
def test_annotations_are_consistent(spec):
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, people = render_sample(rng, spec, 200, 150)
        assert image.shape == (150, 200, 3) and image.dtype == np.uint8
        assert 1 <= len(people) <= 6
        for person in people:
            x, y, w, h = person["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 200 + 1e-6 and y + h <= 150 + 1e-6 and w > 0 and h > 0
            kp = np.array(person["keypoints"]).reshape(-1, 3)
            assert kp.shape == (spec.num_keypoints, 3)
            assert set(np.unique(kp[:, 2])) <= {0, 1, 2}
            unlabelled = kp[:, 2] == 0
            assert (kp[unlabelled, :2] == 0).all()
            labelled = kp[~unlabelled]
            assert person["num_keypoints"] == len(labelled) > 0
            assert (labelled[:, 0] >= x - 1e-3).all() and (labelled[:, 0] <= x + w + 1e-3).all()
            assert (labelled[:, 1] >= y - 1e-3).all() and (labelled[:, 1] <= y + h + 1e-3).all()


@pytest.mark.parametrize(
    ("spec", "markers"),
    [(COCO, synthetic.MARKERS), (QUADRUPED, synthetic.QUADRUPED_MARKERS)],
    ids=["coco", "quadruped"],
)
def test_keypoints_are_visible_in_the_pixels(spec, markers):
    """Each visible keypoint sits on its own marker colour, so the pixels there are that colour."""
    rng = np.random.default_rng(1)
    hits = total = 0
    for _ in range(10):
        image, people = render_sample(rng, spec, 320, 320)
        for person in people:
            kp = np.array(person["keypoints"]).reshape(-1, 3)
            for name, (x, y, v) in zip(spec.keypoint_names, kp, strict=True):
                if v != 2:
                    continue
                total += 1
                pixel = image[int(y), int(x)].astype(int)
                hits += np.abs(pixel - np.array(markers[name])).max() < 60
    assert total > 50 and hits / total > 0.8


def test_quadrupeds_come_with_their_keypoint_set(tmp_path):
    """A custom set's dataset is a COCO-format file (names, 1-based skeleton in its category) plus keypoints.yaml
    (sigmas, flip pairs, parts): together they give back the set it was drawn with."""
    path = write_synthetic_dataset(tmp_path / "q", 6, QUADRUPED, seed=0, image_size=128)
    category = json.loads(path.read_text())["categories"][0]
    assert category["name"] == "quadruped" and category["keypoints"] == list(QUADRUPED.keypoint_names)
    assert category["skeleton"] == [[a + 1, b + 1] for a, b in QUADRUPED.skeleton]
    assert load_keypoint_set(path.parent / "keypoints.yaml") == QUADRUPED
    fish = dataclasses.replace(CROWDPOSE, keypoint_names=("fin", *CROWDPOSE.keypoint_names[1:]))
    with pytest.raises(ValueError, match="draws people .* and quadrupeds"):
        write_synthetic_dataset(tmp_path / "x", 1, fish)
    assert not (tmp_path / "x").exists()


def test_occlusion_and_truncation_are_labelled():
    rng = np.random.default_rng(2)
    v = np.concatenate(
        [
            np.array(p["keypoints"]).reshape(-1, 3)[:, 2]
            for _ in range(40)
            for p in render_sample(rng, COCO, 240, 240)[1]
        ]
    )
    assert (v == 2).mean() > 0.6 and (v == 1).any() and (v == 0).any()


def test_crowdpose_files_look_like_the_real_ones(tmp_path):
    path = write_synthetic_dataset(tmp_path / "cp", 6, "crowdpose", seed=0, image_size=160)
    data = json.loads(path.read_text())
    assert all(0.0 <= image["crowdIndex"] <= 1.0 for image in data["images"])
    assert all("area" not in ann for ann in data["annotations"])
    assert data["categories"][0]["keypoints"] == list(CROWDPOSE.keypoint_names)
    assert data["categories"][0]["skeleton"] == [[a + 1, b + 1] for a, b in CROWDPOSE.skeleton]


@pytest.mark.parametrize("dataset", ["coco", "crowdpose", QUADRUPED], ids=["coco", "crowdpose", "quadruped"])
def test_ground_truth_as_predictions_scores_one(tmp_path, dataset):
    path = write_synthetic_dataset(tmp_path / "set", 8, dataset, seed=5, image_size=160)
    data = json.loads(path.read_text())
    preds = [{"image_id": a["image_id"], "keypoints": a["keypoints"], "score": 1.0} for a in data["annotations"]]
    metrics = evaluate_keypoints(path, preds, dataset)
    for name in ("AP", "AP50", "AP75", "AR"):
        assert metrics[name] == 1.0, name


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_sample

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_sample", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic_dataset(tmp_path / "out", 5, "coco")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_the_flag(tmp_path):
    path = write_synthetic_dataset(tmp_path / "d", 3, "coco", image_size=96)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(tmp_path / "d", 2, "coco")
    write_synthetic_dataset(tmp_path / "d", 2, "coco", overwrite=True, image_size=96)
    assert len(json.loads(path.read_text())["images"]) == 2


def test_command_line(tmp_path):
    script = [sys.executable, "experiments/make_synthetic.py", "--out", str(tmp_path / "d"), "--images", "3"]
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [*script, "--format", "crowdpose", "--size", "96"], capture_output=True, text=True, cwd=repo
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 crowdpose images" in result.stdout
    assert len(list((tmp_path / "d" / "images").glob("*.jpg"))) == 3
    again = subprocess.run(script, capture_output=True, text=True, cwd=repo)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_a_flip_contradicts_the_synthetic_sides_so_the_synthetic_configs_train_without_it():
    """hflip swaps the left and right labels (right for photos, where sides look alike); a synthetic figure's
    sides differ by colour, so after the flip the visible keypoints no longer sit on their own marker colour. The
    shipped synthetic configs therefore set data.flip_prob 0 (FIDELITY.md row 17)."""
    from querypose.transforms import hflip
    from querypose_platform.config import load_config

    rng = np.random.default_rng(3)
    on_marker = {"plain": [], "flipped": []}
    for _ in range(10):
        image, people = render_sample(rng, COCO, 224, 224)
        keypoints = np.stack([np.array(p["keypoints"], np.float32).reshape(-1, 3) for p in people])
        keypoints[..., :2] += 0.5  # continuous coordinates, as the loaders produce them
        sample = {"image": image, "boxes": np.zeros((len(people), 4), np.float32), "keypoints": keypoints}
        for name, case in (("plain", sample), ("flipped", hflip(sample, COCO.flip_index))):
            for person in case["keypoints"]:
                for keypoint, (x, y, v) in zip(COCO.keypoint_names, person, strict=True):
                    if v == 2 and keypoint not in synthetic.SMALL_MARKERS:
                        pixel = case["image"][int(y), int(x)].astype(int)
                        on_marker[name].append(np.abs(pixel - np.array(synthetic.MARKERS[keypoint])).max() < 60)
    assert np.mean(on_marker["plain"]) > 0.8 and np.mean(on_marker["flipped"]) < 0.2

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for name in ("synthetic.yaml", "ablation_synthetic.yaml", "quadruped_synthetic.yaml"):
        assert load_config(configs / name).data.flip_prob == 0.0, name
