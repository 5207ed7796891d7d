"""End-to-end learning checks: a small QueryPose overfits two images, synthetic and real.

These fail when the matcher, the set losses, the RLE targets or the box/keypoint decoding are wrong: the boxes
would not converge onto the people, or the poses would not land on their keypoints.
"""

import dataclasses
from pathlib import Path

import torch
from torchvision.ops import box_iou

from querypose import ModelConfig, build_model
from querypose.criterion import SetCriterion
from querypose.engine import coco_samples, train_step
from querypose.keypoints import COCO
from querypose.matcher import object_keypoint_similarity
from querypose.optim import build_optimizer, build_scheduler
from querypose.synthetic import write_synthetic_dataset
from querypose.transforms import pad_batch, resize, sample_to_target

SMALL = ModelConfig(
    backbone="resnet18",
    hidden_dim=64,
    ffn_dim=128,
    num_heads=4,
    dynamic_dim=16,
    tower_channels=64,
    tower_convs=2,
    num_queries=10,
    num_stages=2,
    part_dim=32,
    test_short_side=160,
    test_max_size=400,
    # The paper's default ("matched") updates only matched queries' instance state in training, so on two images
    # the last stage's classifier learns "was updated" instead of "is a person" (its loss reaches 0) and a query
    # that fits a person can rank last at inference. "all" trains the state inference sees, and ranking is checked.
    keypoint_training_queries="all",
)


def overfit(samples: list[dict], cfg: ModelConfig, steps: int, lr: float = 1e-3) -> tuple[list[dict], list]:
    """Train on one fixed batch; returns the per-step loss terms and the model's predictions on the batch."""
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = SetCriterion.from_config(cfg)
    optimizer = build_optimizer(model, lr=lr, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, warmup_iters=20, warmup_factor=0.1)
    pairs = [sample_to_target(sample) for sample in samples]
    images, image_sizes = pad_batch([image for image, _ in pairs])
    targets = [target for _, target in pairs]
    history = [train_step(model, criterion, optimizer, scheduler, images, image_sizes, targets) for _ in range(steps)]
    return history, model.predict([image for image, _ in pairs])


def detection_loss(terms: dict[str, float]) -> float:
    """The weighted cls + L1 + GIoU part of the total (non-negative, unlike RLE's negative log-likelihood)."""
    weights = {"cls": 2.0, "l1": 5.0, "giou": 2.0}
    parts = [(name.split("_")[1], value) for name, value in terms.items() if name.count("_") == 2]
    return sum(weights[term] * value for term, value in parts if term in weights)


def rle_mean(terms: dict[str, float]) -> float:
    stages = [value for name, value in terms.items() if name.startswith("loss_rle_s")]
    return sum(stages) / len(stages)


def check_learned(history: list[dict], predictions: list[dict], samples: list[dict], min_oks: float) -> None:
    # One step's RLE swings by a nat or more on two images, so the end of training is the last 10 steps' mean.
    first = history[0]
    last = {name: sum(step[name] for step in history[-10:]) / 10 for name in first}
    # RLE is a log-likelihood that goes below zero, so test the parts: the detection losses must fall 5x, and the
    # stages' RLE (each a mean per keypoint) must gain 3 nats per keypoint on average. The stages' mean, because
    # the last stage alone starts at a different place on each pair (6 nats on the synthetic one, 1 on the
    # photos); its poses are checked below through OKS.
    assert detection_loss(last) < detection_loss(first) / 5, (first, last)
    assert rle_mean(last) < rle_mean(first) - 3, (first, last)
    sigmas = torch.tensor(COCO.sigmas)
    for sample, predicted in zip(samples, predictions, strict=True):
        target = {k: torch.from_numpy(sample[k]) for k in ("boxes", "keypoints")}
        with_keypoints = target["keypoints"][..., 2].gt(0).any(-1)
        # every person is found by a query in the top-scoring half...
        top = predicted["boxes"][: len(predicted["boxes"]) // 2]
        best_iou = box_iou(target["boxes"][with_keypoints], top).max(dim=1).values
        assert (best_iou > 0.7).all(), best_iou
        # ...and the query whose box fits best also carries that person's pose
        best_query = box_iou(target["boxes"], predicted["boxes"]).argmax(dim=1)
        oks = object_keypoint_similarity(predicted["keypoints"][best_query, :, :2], target, sigmas).diagonal()
        assert oks[with_keypoints].mean() > min_oks, oks


def test_overfits_two_synthetic_images(tmp_path):
    gt = write_synthetic_dataset(tmp_path / "synthetic", num_images=2, dataset="coco", seed=4, image_size=160)
    samples = list(coco_samples(gt, gt.parent / "images"))
    assert [len(s["boxes"]) for s in samples] == [2, 2]
    history, predictions = overfit(samples, SMALL, steps=140)
    check_learned(history, predictions, samples, min_oks=0.4)


def test_overfits_two_real_photos(fixtures_dir: Path):
    folder = fixtures_dir / "coco"
    wanted = {785, 40083}  # 1 person; 2 people + one unannotated-pose bystander
    samples = [resize(s, 256, 512) for s in coco_samples(folder / "person_keypoints.json", folder / "images")
               if s["image_id"] in wanted]  # fmt: skip
    assert len(samples) == 2
    cfg = dataclasses.replace(SMALL, test_short_side=256, test_max_size=512)
    # At short side 224 the two people's boxes stayed at IoU 0.68-0.73 after 180 steps; 256 fits them in 200 (one thread, as in the suite).
    history, predictions = overfit(samples, cfg, steps=200)
    check_learned(history, predictions, samples, min_oks=0.3)
