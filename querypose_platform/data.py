"""Ray Data pipeline over the Parquet shards: a driver-side list of row groups -> read one row group per task ->
decode + augment in map_batches (numpy) -> padded torch batches in the train workers' `iter_torch_batches(collate_fn=
...)`.

The train stream is ONE dataset for the whole run: every epoch's row groups in an order of its own (a permutation
seeded by (train.seed, epoch)), read lazily by Ray Data's streaming executor, whose backpressure bounds the bytes in
flight however many images there are; the train workers' local shuffle buffer mixes rows of nearby row groups. No
all-to-all step (`randomize_block_order`, `random_shuffle`) and no union of per-epoch passes: those wait for every
block of a pass before the first batch. Each row carries its epoch, which seeds its augmentation with the image id.
A resumed run starts at the first row group its checkpoint's iterations had not wholly consumed (`resume_offset`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def _decode_and_transform(rows: dict[str, np.ndarray], cfg: ExperimentConfig, train: bool) -> dict[str, np.ndarray]:
    """numpy batch of shard rows (READ_COLUMNS + "epoch") -> numpy batch of model-ready samples; undecodable rows
    come out invalid. Training leaves out images without a non-crowd person before decoding them (the manifest
    counts them) and augments with a generator seeded by (train.seed, epoch, image_id)."""
    # One thread: the task holds a fraction of a CPU (data.cpus_per_task); OpenCV's default pool would take them all.
    cv2.setNumThreads(1)
    spec = cfg.model.spec
    data = cfg.data
    out: dict[str, list] = {"image_id": [], "epoch": [], "image": [], "boxes": [], "keypoints": [], "scale": [],
                            "valid": []}  # fmt: skip
    for image_id, epoch, encoded, people in zip(
        rows["image_id"], rows["epoch"], rows["image"], rows["people"], strict=True
    ):
        if train and not has_people(people):
            continue
        sample = _sample(int(image_id), encoded, people, spec.num_keypoints)
        if sample is None:
            sample = {"image": np.zeros((0, 0, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
                      "keypoints": np.zeros((0, spec.num_keypoints, 3), np.float32), "scale": np.ones(2, np.float32)}  # fmt: skip
            valid = False
        elif train:
            rng = np.random.default_rng([cfg.train.seed, int(epoch), int(image_id)])
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
        out["epoch"].append(int(epoch))
        out["valid"].append(valid)
        for key in ("image", "boxes", "keypoints", "scale"):
            out[key].append(sample[key])
    return {
        "image_id": np.array(out["image_id"], np.int64),
        "epoch": np.array(out["epoch"], np.int64),
        "valid": np.array(out["valid"], bool),
        **{key: _object_array(out[key]) for key in ("image", "boxes", "keypoints", "scale")},
    }


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def row_groups(files: list[str]) -> list[dict]:
    """Every Parquet row group of the shard files as {"file", "row_group", "rows"}, counted from the files' footers."""
    groups = []
    for file in files:
        fs, path = filesystem(file)
        with fs.open_input_file(path) as stream:
            metadata = pq.ParquetFile(stream).metadata
        groups.extend(
            {"file": file, "row_group": index, "rows": metadata.row_group(index).num_rows}
            for index in range(metadata.num_row_groups)
        )
    return groups


def train_items(groups: list[dict], epochs: int, seed: int) -> list[dict]:
    """The train stream's work list: every row group once per epoch, each epoch in an order of its own (a
    permutation seeded by (seed, epoch): a file-level shuffle at row-group granularity). Entries are the groups'
    dicts plus "epoch" and "item" (their index in this list)."""
    items = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(groups))
        items.extend({**groups[i], "epoch": epoch} for i in order)
    return [{**item, "item": index} for index, item in enumerate(items)]


def resume_offset(items: list[dict], images_done: int) -> int:
    """How many leading items `images_done` trained images have wholly consumed: a resumed stream starts there.

    Approximate by design, and on the side of replaying: the count uses the row groups' row counts, which include
    images without people that training leaves out, and it ignores the rows that the streaming executor, the
    workers' shuffle buffers and `drop_last` had in flight at the checkpoint. So a resumed run sees again at most
    about one row group per worker plus what was buffered, and never skips a row group it has not trained on."""
    ends = np.cumsum([item["rows"] for item in items])
    return int(np.searchsorted(ends, images_done, side="right"))


def read_shards(items: list[dict], num_cpus: float, trace: str | None = None) -> ray.data.Dataset:
    """The rows (READ_COLUMNS + "epoch") of the listed row groups, one read task and one block per item, read in
    the list's order as the streaming executor asks for more.

    Not `ray.data.read_parquet`: its file-listing task always asks Ray for a whole CPU, which a 2-CPU cluster
    whose train worker holds one CPU never has free, so training would wait for data forever. Here the groups
    come listed from the driver and every task that reads them asks for `num_cpus` (a fraction).

    `trace`: a local folder where every read leaves an empty file named by its item index, for the tests and
    benchmarks/stream_memory.py to count what was read when."""
    return ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
        _read_row_groups, fn_kwargs={"trace": trace}, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus
    )


def _read_row_groups(items: pa.Table, trace: str | None) -> Iterator[pa.Table]:
    for item in items.to_pylist():
        if trace is not None:
            (Path(trace) / f"{item['item']:07d}").touch()
        fs, path = filesystem(item["file"])
        with fs.open_input_file(path) as stream:  # one thread, as the decode: the task holds a fraction of a CPU
            table = pq.ParquetFile(stream).read_row_group(item["row_group"], columns=READ_COLUMNS, use_threads=False)
        yield table.append_column("epoch", pa.array(np.full(len(table), item["epoch"], np.int64)))


def build_dataset(
    shard_uri: str,
    cfg: ExperimentConfig,
    *,
    train: bool,
    epochs: int = 1,
    part: tuple[int, int] | None = None,
    start_iteration: int = 0,
    trace_reads: str | None = None,
) -> ray.data.Dataset:
    """The shard set as a Ray Dataset of decoded samples.

    train: `epochs` epochs in one stream (see the module docstring), fresh augmentation each, starting after the
    row groups that `start_iteration` global batches of train.batch_size wholly consumed (`resume_offset`).
    val: the test-time resize, once. `part=(i, n)` keeps items i, i + n, i + 2n, ... (for val: row groups), so rank
    i of n reads only its own share of the shards. `trace_reads`: see `read_shards`."""
    groups = row_groups(shard_files(shard_uri))
    if train:
        items = train_items(groups, epochs, cfg.train.seed)
        items = items[resume_offset(items, start_iteration * cfg.train.batch_size) :]
    else:
        items = [{**group, "epoch": 0, "item": index} for index, group in enumerate(groups)]
    if part is not None:
        index, count = part
        items = items[index::count]
    task_cpus = cfg.data.cpus_per_task
    # batch_size=None: a row group is decoded as one batch. Ray fuses the read and the decode into one task whose
    # input bundle is the larger batch size of the two, counted in items: batch_size=8 would read 8 row groups per
    # task.
    return read_shards(items, task_cpus, trace_reads).map_batches(
        _decode_and_transform,
        fn_kwargs={"cfg": cfg, "train": train},
        batch_format="numpy",
        batch_size=None,
        num_cpus=task_cpus,
    )


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
