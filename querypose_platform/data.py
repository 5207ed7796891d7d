"""Ray Data pipeline over the Parquet shards: read -> decode + augment in map_batches (numpy) -> padded torch
batches in the train workers' `iter_torch_batches(collate_fn=...)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from querypose.transforms import collate, has_people, people_arrays, test_resize, train_augment
from querypose_platform.config import ExperimentConfig
from querypose_platform.shards import shard_files
from querypose_platform.storage import filesystem

READ_COLUMNS = ["image_id", "image", "people"]


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float 0..255, zero-padded to a multiple of 32
    image_sizes: torch.Tensor  # (B, 2) [h, w] before padding
    targets: list[dict[str, torch.Tensor]]  # "boxes" (P, 4) xyxy, "keypoints" (P, K, 3)
    image_ids: torch.Tensor  # (B,)
    scales: torch.Tensor  # (B, 2) [sx, sy] = transformed / original size
    dropped: int  # rows of this batch that failed to decode and were left out

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True),
            self.image_sizes.to(device),
            [{k: v.to(device) for k, v in t.items()} for t in self.targets],
            self.image_ids,
            self.scales,
            self.dropped,
        )


def _sample(row_id: int, encoded: bytes, people, num_keypoints: int) -> dict | None:
    """A decoded training sample (crowd regions are not targets), or None when the bytes do not decode."""
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR) if encoded is not None else None
    if image is None:
        return None
    boxes, keypoints = people_arrays(people, num_keypoints)
    return {"image_id": row_id, "image": cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "boxes": boxes, "keypoints": keypoints}


def _decode_and_transform(
    rows: dict[str, np.ndarray], cfg: ExperimentConfig, train: bool, epoch: int
) -> dict[str, np.ndarray]:
    """numpy batch of shard rows -> numpy batch of model-ready samples; undecodable rows come out invalid. Training
    leaves out images without a non-crowd person before decoding them (the manifest counts them)."""
    spec = cfg.model.spec
    data = cfg.data
    out: dict[str, list] = {"image_id": [], "image": [], "boxes": [], "keypoints": [], "scale": [], "valid": []}
    for image_id, encoded, people in zip(rows["image_id"], rows["image"], rows["people"], strict=True):
        if train and not has_people(people):
            continue
        sample = _sample(int(image_id), encoded, people, spec.num_keypoints)
        if sample is None:
            sample = {"image": np.zeros((0, 0, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
                      "keypoints": np.zeros((0, spec.num_keypoints, 3), np.float32), "scale": np.ones(2, np.float32)}  # fmt: skip
            valid = False
        elif train:
            rng = np.random.default_rng([cfg.train.seed, epoch, int(image_id)])
            sample = train_augment(
                sample, rng, spec.flip_index, short_sides=tuple(data.train_short_sides), max_size=data.train_max_size,
                flip_prob=data.flip_prob, crop_prob=data.crop_prob, crop_resize_sides=tuple(data.crop_resize_sides),
                crop_size=tuple(data.crop_size),
            )  # fmt: skip
            sample["scale"] = np.ones(2, np.float32)
            valid = True
        else:
            sample = test_resize(sample, cfg.model.test_short_side, cfg.model.test_max_size)
            valid = True
        out["image_id"].append(int(image_id))
        out["valid"].append(valid)
        for key in ("image", "boxes", "keypoints", "scale"):
            out[key].append(sample[key])
    return {
        "image_id": np.array(out["image_id"], np.int64),
        "valid": np.array(out["valid"], bool),
        **{key: _object_array(out[key]) for key in ("image", "boxes", "keypoints", "scale")},
    }


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def row_groups(files: list[str]) -> list[dict]:
    """Every Parquet row group of the shard files as {"file", "row_group"}, counted from the files' footers."""
    groups = []
    for file in files:
        fs, path = filesystem(file)
        with fs.open_input_file(path) as stream:
            count = pq.ParquetFile(stream).metadata.num_row_groups
        groups.extend({"file": file, "row_group": index} for index in range(count))
    return groups


def read_shards(groups: list[dict], num_cpus: float) -> ray.data.Dataset:
    """The rows (READ_COLUMNS) of the given row groups, one block per row group.

    Not `ray.data.read_parquet`: its file-listing task always asks Ray for a whole CPU, which a 2-CPU cluster
    whose train worker holds one CPU never has free, so training would wait for data forever. Here the groups
    come listed from the driver and every task that reads them asks for `num_cpus` (a fraction)."""
    return ray.data.from_items(groups, override_num_blocks=max(len(groups), 1)).map_batches(
        _read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus
    )


def _read_row_groups(items: pa.Table) -> Iterator[pa.Table]:
    for file, index in zip(items["file"].to_pylist(), items["row_group"].to_pylist(), strict=True):
        fs, path = filesystem(file)
        with fs.open_input_file(path) as stream:
            yield pq.ParquetFile(stream).read_row_group(index, columns=READ_COLUMNS)


def build_dataset(
    shard_uri: str, cfg: ExperimentConfig, *, train: bool, epochs: int = 1, part: tuple[int, int] | None = None
) -> ray.data.Dataset:
    """The shard set as a Ray Dataset of decoded samples: for train, `epochs` passes with fresh augmentation
    each (seeded by (train.seed, epoch, image_id)); for val, the test-time resize once. `part=(i, n)` keeps the
    images with image_id % n == i (filtered before decoding)."""
    groups = row_groups(shard_files(shard_uri))

    def one_pass(epoch: int) -> ray.data.Dataset:
        task_cpus = cfg.data.cpus_per_task
        ds = read_shards(groups, task_cpus)
        if part is not None:
            index, count = part
            ds = ds.filter(lambda row: row["image_id"] % count == index, num_cpus=task_cpus)
        if train:
            ds = ds.randomize_block_order(seed=cfg.train.seed + epoch)
        return ds.map_batches(
            _decode_and_transform,
            fn_kwargs={"cfg": cfg, "train": train, "epoch": epoch},
            batch_format="numpy",
            batch_size=8,
            num_cpus=task_cpus,
        )

    passes = [one_pass(epoch) for epoch in range(epochs if train else 1)]
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


def collate_batch(batch: dict[str, np.ndarray], num_keypoints: int) -> Batch:
    """iter_torch_batches' collate_fn: drop (and count) invalid rows, pad the rest into model inputs."""
    valid = np.asarray(batch["valid"], bool)
    keep = np.flatnonzero(valid)
    samples = [
        {"image_id": int(batch["image_id"][i]), "image": batch["image"][i], "boxes": batch["boxes"][i],
         "keypoints": batch["keypoints"][i]}
        for i in keep
    ]  # fmt: skip
    if samples:
        images, image_sizes, targets = collate(samples, num_keypoints)
    else:
        images, image_sizes, targets = torch.zeros(0, 3, 32, 32), torch.zeros(0, 2, dtype=torch.long), []
    scales = np.stack([np.asarray(batch["scale"][i], np.float32) for i in keep]) if len(keep) else np.zeros((0, 2))
    return Batch(
        images=images,
        image_sizes=image_sizes,
        targets=targets,
        image_ids=torch.as_tensor(np.asarray(batch["image_id"])[keep], dtype=torch.long),
        scales=torch.as_tensor(scales, dtype=torch.float32),
        dropped=int((~valid).sum()),
    )


class BatchCollator(NumpyBatchCollateFn):
    """`collate_batch` as the callable class that `iter_torch_batches(collate_fn=...)` takes."""

    def __init__(self, num_keypoints: int):
        self.num_keypoints = num_keypoints

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return collate_batch(batch, self.num_keypoints)
