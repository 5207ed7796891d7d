import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest

from querypose.evaluation import METRIC_NAMES, evaluate_keypoints


def _gt_as_predictions(gt_path):
    gt = json.loads(gt_path.read_text())
    return [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt["annotations"]
        if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0)
    ]


def _direct_coco(gt_path, dt_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(dt_path)), iouType="keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _direct_crowdpose(gt_path, dt_path):
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    sigmas = np.array(
        [0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(dt_path)), "keypoints_crowd", sigmas, use_area=False)
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_example_matches_pycocotools(fixtures_dir):
    gt, dt = fixtures_dir / "eval/example_coco_val.json", fixtures_dir / "eval/example_coco_preds.json"
    metrics = evaluate_keypoints(gt, dt, "coco")
    assert tuple(metrics) == METRIC_NAMES["coco"]
    np.testing.assert_allclose(list(metrics.values()), _direct_coco(gt, dt), rtol=0, atol=1e-12)
    assert 0.5 < metrics["AP"] < 1.0  # a real, imperfect prediction set


def test_crowdpose_example_matches_xtcocotools(fixtures_dir):
    gt, dt = fixtures_dir / "eval/example_crowdpose_val.json", fixtures_dir / "eval/example_crowdpose_preds.json"
    metrics = evaluate_keypoints(gt, dt, "crowdpose")
    assert tuple(metrics) == METRIC_NAMES["crowdpose"]
    # The example has at most 20 predictions per image, so the top-20 rule changes nothing here.
    np.testing.assert_allclose(list(metrics.values()), _direct_crowdpose(gt, dt), rtol=0, atol=1e-12)
    assert metrics["APe"] != metrics["APh"]


@pytest.mark.parametrize(
    ("relative", "dataset"),
    [
        ("coco/person_keypoints.json", "coco"),
        ("eval/example_coco_val.json", "coco"),
        ("crowdpose/crowdpose.json", "crowdpose"),
        ("eval/example_crowdpose_val.json", "crowdpose"),
    ],
)
def test_ground_truth_scores_one(fixtures_dir, relative, dataset):
    gt = fixtures_dir / relative
    metrics = evaluate_keypoints(gt, _gt_as_predictions(gt), dataset)
    crowd = {image.get("crowdIndex") for image in json.loads(gt.read_text())["images"]}
    for name, value in metrics.items():
        empty_subset = (name == "APe" and not any(c is not None and c < 0.1 for c in crowd)) or (
            name == "APh" and not any(c is not None and c > 0.8 for c in crowd)
        )
        assert value == (-1.0 if empty_subset else 1.0), name


def test_crowdpose_keeps_only_top_20_per_image(fixtures_dir):
    gt = fixtures_dir / "crowdpose/crowdpose.json"
    perfect = _gt_as_predictions(gt)
    # 30 confident but wrong poses per image would push the true ones out of the top 20.
    image_ids = sorted({p["image_id"] for p in perfect})
    junk = [
        {"image_id": i, "keypoints": [1.0, 1.0, 1.0] * 14, "score": 2.0 + j / 100} for i in image_ids for j in range(30)
    ]
    assert evaluate_keypoints(gt, perfect + junk, "crowdpose")["AP"] == 0.0
    low_junk = [{**r, "score": 0.5} for r in junk]
    assert evaluate_keypoints(gt, perfect + low_junk, "crowdpose")["AP"] == 1.0


def test_empty_predictions_score_zero(fixtures_dir):
    metrics = evaluate_keypoints(fixtures_dir / "coco/person_keypoints.json", [], "coco")
    assert metrics == dict.fromkeys(METRIC_NAMES["coco"], 0.0)


def test_predictions_from_a_file(fixtures_dir, tmp_path):
    gt = fixtures_dir / "coco/person_keypoints.json"
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(_gt_as_predictions(gt)))
    assert evaluate_keypoints(gt, path, "coco")["AP"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_id": 123456789}, "prediction 0: image_id 123456789 is not in the ground truth"),
        ({"keypoints": [1.0] * 50}, "prediction 0: keypoints has 50 values, expected 51"),
        ({"score": float("nan")}, "prediction 0 (image 785): keypoints or score is NaN"),
        ({"keypoints": [float("inf")] * 51}, "keypoints or score is NaN or infinite"),
    ],
)
def test_bad_predictions_name_the_record(fixtures_dir, change, message):
    gt = fixtures_dir / "coco/person_keypoints.json"
    record = {**_gt_as_predictions(gt)[0], **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate_keypoints(gt, [record], "coco")


def test_missing_field_and_bad_dataset(fixtures_dir):
    gt = fixtures_dir / "coco/person_keypoints.json"
    with pytest.raises(ValueError, match="prediction 0: missing field 'score'"):
        evaluate_keypoints(gt, [{"image_id": 785, "keypoints": [0.0] * 51}], "coco")
    with pytest.raises(ValueError, match="unknown dataset 'mpii'"):
        evaluate_keypoints(gt, [], "mpii")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_keypoints(gt.parent / "nope.json", [], "coco")


def test_a_custom_set_is_scored_with_its_own_sigmas_and_category(tmp_path):
    """A quadruped file whose category id is 7: predictions take that category, and OKS uses the set's sigmas
    (the same 2-pixel error scores lower with sigmas a fifth as large)."""
    from pathlib import Path

    from querypose.keypoints import load_keypoint_set
    from querypose.synthetic import write_synthetic_dataset

    spec = load_keypoint_set(Path(__file__).resolve().parents[1] / "experiments/configs/keypoints/quadruped.yaml")
    gt = write_synthetic_dataset(tmp_path / "q", 6, spec, seed=1, image_size=128)
    content = json.loads(gt.read_text())
    content["categories"][0]["id"] = 7
    for annotation in content["annotations"]:
        annotation["category_id"] = 7
    gt.write_text(json.dumps(content))
    perfect = _gt_as_predictions(gt)
    assert evaluate_keypoints(gt, perfect, spec)["AP"] == 1.0
    shifted = [{**r, "keypoints": [v + 2.0 * (i % 3 < 2) for i, v in enumerate(r["keypoints"])]} for r in perfect]
    narrow = dataclasses.replace(spec, sigmas=tuple(s / 5 for s in spec.sigmas))
    assert evaluate_keypoints(gt, shifted, narrow)["AP"] < evaluate_keypoints(gt, shifted, spec)["AP"]
