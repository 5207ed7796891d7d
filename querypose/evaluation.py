"""OKS keypoint evaluation with the datasets' own protocols, and the keypoint set's own OKS sigmas.

The keypoint set's `evaluation` names the protocol. coco: pycocotools `COCOeval(iouType="keypoints")` with
`params.kpt_oks_sigmas` set to the set's sigmas, 10 stats. crowdpose: xtcocotools
`COCOeval(..., "keypoints_crowd", sigmas, use_area=False)`, 9 stats, top-20 detections per image; a difficulty
subset (easy/medium/hard crowd index) with no ground truth scores -1, as the library reports it. Predictions take
the ground truth's keypoint category (QueryPose detects one class; a custom file's category id need not be 1).

Predictions are checked before they reach the libraries, so bad input fails with a message naming the record
and field instead of an error deep inside pycocotools. An empty prediction list scores 0.0 on every metric.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from querypose.keypoints import KeypointSpec, get_spec

METRIC_NAMES = {  # by evaluation protocol (KeypointSpec.evaluation)
    "coco": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
    "crowdpose": ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "APe", "APm", "APh"),
}
# Both protocols score at most the 20 best poses of an image (COCOeval's keypoint maxDets = [20]; CrowdPose's
# top-20): predictions are cut to this before they are gathered or written (ranks, artifacts, eval job).
MAX_DETS = 20
CROWDPOSE_MAX_DETS = MAX_DETS


def evaluate_keypoints(
    gt_json: str | Path,
    predictions: str | Path | list[dict[str, Any]],
    keypoint_set: str | KeypointSpec,
    verbose: bool = False,
) -> dict[str, float]:
    """Score COCO-format keypoint results against a ground-truth file with the keypoint set's protocol and sigmas
    (`keypoint_set`: a built-in set's name or a KeypointSpec); returns {metric name: value}."""
    spec = get_spec(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
    protocol = spec.evaluation
    gt_path = Path(gt_json)
    if not gt_path.is_file():
        raise FileNotFoundError(f"ground-truth file {gt_path} does not exist")
    results = _load_predictions(predictions)
    gt = json.loads(gt_path.read_text())
    image_ids = {image["id"] for image in gt.get("images", [])}
    keypoint_categories = [c["id"] for c in gt.get("categories", []) if c.get("keypoints")]
    category = keypoint_categories[0] if len(keypoint_categories) == 1 else 1
    results = _validate(results, image_ids, spec.num_keypoints, category)
    if not results:
        return dict.fromkeys(METRIC_NAMES[protocol], 0.0)
    if protocol == "crowdpose":
        results = _top_per_image(results, CROWDPOSE_MAX_DETS)
    sigmas = np.array(spec.sigmas)
    output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with output:
        if protocol == "coco":
            stats = _run_coco(gt_path, results, sigmas, category)
        else:
            stats = _run_crowdpose(gt_path, results, sigmas)
    return dict(zip(METRIC_NAMES[protocol], (float(s) for s in stats), strict=True))


def _load_predictions(predictions: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(predictions, str | Path):
        path = Path(predictions)
        if not path.is_file():
            raise FileNotFoundError(f"predictions file {path} does not exist")
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, list):
            raise ValueError(f"predictions file {path}: expected a JSON list of result records")
        return loaded
    return list(predictions)


def _validate(
    results: list[dict[str, Any]], image_ids: set[int], num_keypoints: int, category: int
) -> list[dict[str, Any]]:
    clean = []
    for i, record in enumerate(results):
        for field in ("image_id", "keypoints", "score"):
            if field not in record:
                raise ValueError(f"prediction {i}: missing field {field!r}")
        if record["image_id"] not in image_ids:
            raise ValueError(f"prediction {i}: image_id {record['image_id']!r} is not in the ground truth")
        keypoints = [float(v) for v in record["keypoints"]]
        if len(keypoints) != 3 * num_keypoints:
            raise ValueError(
                f"prediction {i}: keypoints has {len(keypoints)} values, expected {3 * num_keypoints} "
                f"({num_keypoints} keypoints x 3)"
            )
        score = float(record["score"])
        if not all(math.isfinite(v) for v in keypoints) or not math.isfinite(score):
            raise ValueError(f"prediction {i} (image {record['image_id']}): keypoints or score is NaN or infinite")
        clean.append({**record, "category_id": category, "keypoints": keypoints, "score": score})
    return clean


def _top_per_image(results: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    by_image: dict[int, list[dict[str, Any]]] = {}
    for record in results:
        by_image.setdefault(record["image_id"], []).append(record)
    return [r for recs in by_image.values() for r in sorted(recs, key=lambda r: -r["score"])[:k]]


def _run_coco(gt_path: Path, results: list[dict[str, Any]], sigmas: np.ndarray, category: int) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
    evaluator.params.kpt_oks_sigmas = sigmas
    evaluator.params.catIds = [category]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _run_crowdpose(gt_path: Path, results: list[dict[str, Any]], sigmas: np.ndarray) -> np.ndarray:
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, "keypoints_crowd", sigmas, use_area=False)
    evaluator.params.useSegm = None
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats
