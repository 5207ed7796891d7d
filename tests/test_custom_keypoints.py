"""A custom keypoint set end to end, without Ray: the synthetic quadrupeds' COCO-format file and keypoint YAML
through conversion, Ray Data's decode-and-augment function, a few training steps, evaluation with the set's
sigmas, saved weights and a drawing with the set's skeleton."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from querypose import build_model
from querypose.criterion import SetCriterion
from querypose.engine import coco_samples, evaluate, train_step
from querypose.evaluation import METRIC_NAMES
from querypose.keypoints import load_keypoint_set
from querypose.optim import build_optimizer, build_scheduler
from querypose.synthetic import write_synthetic_dataset
from querypose.weights import load_weights, save_weights
from querypose_platform.config import load_config
from querypose_platform.data import READ_COLUMNS, _decode_and_transform, collate_batch
from querypose_platform.shards import convert, read_annotations, shard_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

TINY = [
    "model.backbone=resnet10t", "model.hidden_dim=32", "model.ffn_dim=64", "model.num_heads=4",
    "model.dynamic_dim=8", "model.tower_channels=32", "model.tower_convs=1", "model.part_dim=32",
    "model.num_queries=6", "model.num_stages=2", "model.test_short_side=96", "model.test_max_size=128",
    "model.backbone_weights=none", "data.train_short_sides=[96]", "data.train_max_size=128",
    "data.crop_resize_sides=[96]", "data.crop_size=[64,96]", "data.flip_prob=1.0",
]  # fmt: skip


def test_custom_set_converts_trains_evaluates_and_draws(tmp_path):
    quadruped = load_keypoint_set(REPO / "experiments" / "configs" / "keypoints" / "quadruped.yaml")
    gt = write_synthetic_dataset(tmp_path / "raw", 4, quadruped, seed=0, image_size=96)

    # what a user has: a COCO-format file and a small YAML beside it
    spec = load_keypoint_set(gt.parent / "keypoints.yaml")
    assert spec == quadruped
    uri = str(tmp_path / "shards" / "train")
    manifest = convert(spec, gt, gt.parent / "images", uri)
    assert manifest["dataset"] == "quadruped" and manifest["keypoints"]["spec"] == spec.to_dict()
    category = read_annotations(uri)["categories"][0]
    assert category["name"] == "quadruped" and category["skeleton"] == [[a + 1, b + 1] for a, b in spec.skeleton]

    # the model config takes the set recorded in the shards' manifest
    cfg = load_config(None, [*TINY, "model.dataset=custom", f"model.keypoints={uri}/manifest.json",
                             "model.part_scheme=limbs6"])  # fmt: skip
    assert cfg.model.spec == spec

    # Ray Data's map function on the shard rows: flipped (flip_prob=1) with the set's own flip pairs
    columns = pq.read_table(shard_files(uri)[0], columns=READ_COLUMNS).to_pydict()
    rows = {key: np.empty(len(values), dtype=object) for key, values in columns.items()}
    for key, values in columns.items():
        for i, value in enumerate(values):  # 1-D object columns, as Ray Data's numpy batches hold them
            rows[key][i] = value
    rows["epoch"] = np.zeros(len(rows["image_id"]), np.int64)  # the column the train stream's reads add
    batch = collate_batch(_decode_and_transform(rows, cfg, train=True), spec.num_keypoints)
    assert batch.targets[0]["keypoints"].shape[1:] == (20, 3)

    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = SetCriterion.from_config(cfg.model)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, warmup_iters=1, warmup_factor=1.0)
    for _ in range(3):
        terms = train_step(model, criterion, optimizer, scheduler, batch.images, batch.image_sizes, batch.targets)
    assert np.isfinite(terms["loss"]) and "loss_rle_s1" in terms

    samples = list(coco_samples(gt, gt.parent / "images"))
    metrics = evaluate(model, samples, gt, cfg.model.spec)
    assert tuple(metrics) == METRIC_NAMES["coco"] and all(-1 <= v <= 1 for v in metrics.values())

    # saved weights carry the set: a model is rebuilt without the YAML, the annotation file or the shards
    _, saved = load_weights(save_weights(model, cfg.model, tmp_path / "model.pt"))
    assert saved == cfg.model and saved.spec == spec

    # predict.py's drawing follows the set's skeleton: every edge of a drawn animal is painted
    from predict import draw

    sample, i = max(((s, i) for s in samples for i in range(len(s["boxes"]))),
                    key=lambda pair: (pair[0]["keypoints"][pair[1], :, 2] > 0).sum())  # fmt: skip
    keypoints = torch.from_numpy(sample["keypoints"][i : i + 1])
    poses = {"boxes": torch.from_numpy(sample["boxes"][i : i + 1]), "keypoints": keypoints, "scores": torch.ones(1)}
    canvas = draw(np.zeros((*sample["image"].shape[:2], 3), np.uint8), poses, spec, min_score=0.5)
    labelled = keypoints[0, :, 2] > 0
    edges = [(a, b) for a, b in spec.skeleton if labelled[a] and labelled[b]]
    assert len(edges) >= 15
    for a, b in edges:
        x, y = ((keypoints[0, a, :2] + keypoints[0, b, :2]) / 2).round().int().tolist()
        assert canvas[y, x].any(), (spec.keypoint_names[a], spec.keypoint_names[b])
    cv2.imwrite(str(tmp_path / "drawn.jpg"), canvas)
