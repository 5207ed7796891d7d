"""The Ray Data pipeline over shards: fresh augmentation every epoch, reproducible from the seed, the val path
without augmentation, corrupt rows dropped and counted, and the padding collate_fn. The train stream at scale: the
first batch after a small share of the row groups is read, every image once per epoch in a new order, a resumed
stream past what its checkpoint consumed; each rank's val part reads only its own row groups."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from querypose.synthetic import write_synthetic_dataset
from querypose.transforms import has_people
from querypose_platform.config import load_config
from querypose_platform.data import (
    BatchCollator,
    _object_array,
    build_dataset,
    collate_batch,
    resume_offset,
    row_groups,
    train_items,
)
from querypose_platform.shards import MANIFEST, convert, ensure_synthetic_shards, read_manifest, shard_files
from querypose_platform.trainer import training_image_counts

SETTINGS = [
    "data.synthetic={train_images: 6, val_images: 3, image_size: 96}", "data.train_short_sides=[64, 80, 96]",
    "data.train_max_size=160", "data.crop_resize_sides=[96]", "data.crop_size=[48, 96]",
    "model.test_short_side=80", "model.test_max_size=128",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shards"
    ensure_synthetic_shards(load_config(None, [*SETTINGS, f"data.root={root}"]))
    return root


def config(root: Path, *overrides: str):
    return load_config(None, [*SETTINGS, f"data.root={root}", *overrides])


def rows_by_image(dataset) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    for row in dataset.take_all():
        by_image.setdefault(int(row["image_id"]), []).append(row)
    return by_image


def same_sample(a: dict, b: dict) -> bool:
    return (
        a["image"].shape == b["image"].shape
        and np.array_equal(a["image"], b["image"])
        and np.allclose(a["keypoints"], b["keypoints"])
    )


def test_generated_shards_follow_the_synthetic_settings_and_foreign_shards_are_named_not_replaced(tmp_path):
    root = tmp_path / "synthetic" / "shards"
    ensure_synthetic_shards(load_config(None, [*SETTINGS, f"data.root={root}"]))
    more_val = load_config(None, [*SETTINGS, f"data.root={root}", "data.synthetic.val_images=4"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_synthetic_shards(more_val)  # the YAML's data.synthetic changed: its own shards are rebuilt
    assert read_manifest(str(root / "val"))["num_images"] == 4
    assert read_manifest(str(root / "val"))["source"]["annotations"].endswith("coco_val_4x96_s1/annotations.json")
    assert read_manifest(str(root / "train"))["source"]["annotations"].endswith("coco_train_6x96_s0/annotations.json")
    assert (tmp_path / "synthetic" / "raw" / "coco_val_3x96_s1" / "annotations.json").is_file()  # kept

    foreign = tmp_path / "elsewhere"  # shards a user converted into data.root from their own files
    write_synthetic_dataset(foreign, 2, image_size=96, seed=5)
    convert("coco", foreign / "annotations.json", foreign / "images", str(root / "train"), overwrite=True)
    other = load_config(None, [*SETTINGS, f"data.root={root}", "data.synthetic.max_people=2"])
    with pytest.warns(UserWarning, match=r"converted from 'elsewhere', not .* \('coco_train_6x96_s0_p2'\)"):
        ensure_synthetic_shards(other)
    assert read_manifest(str(root / "train"))["num_images"] == 2


def test_each_epoch_augments_anew_and_the_seed_reproduces_it(ray_local, data_root):
    cfg = config(data_root)
    uri = cfg.data.split_uri("train")
    two_epochs = rows_by_image(build_dataset(uri, cfg, train=True, epochs=2))
    assert len(two_epochs) == 6 and all(len(rows) == 2 for rows in two_epochs.values())
    differing = sum(not same_sample(*rows) for rows in two_epochs.values())
    assert differing >= 4, "the second pass draws new flips, crops and scales"

    first, again = (next(iter(build_dataset(uri, cfg, train=True).iter_batches(batch_size=3))) for _ in range(2))
    assert first["image_id"].tolist() == again["image_id"].tolist()
    for i in range(3):
        assert np.array_equal(first["image"][i], again["image"][i]), "same seed: the same first batch"
        assert np.array_equal(first["keypoints"][i], again["keypoints"][i])
    once = rows_by_image(build_dataset(uri, cfg, train=True))
    reseeded = rows_by_image(build_dataset(uri, config(data_root, "train.seed=7"), train=True))
    assert sum(not same_sample(row, once[i][0]) for i, (row,) in reseeded.items()) >= 4


def test_validation_is_resized_only_and_keeps_image_ids(ray_local, data_root):
    cfg = config(data_root)
    uri = cfg.data.split_uri("val")
    gt = json.loads((Path(uri) / "annotations.json").read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    rows = build_dataset(uri, cfg, train=False).take_all()
    assert sorted(int(row["image_id"]) for row in rows) == sorted(sizes)
    for row in rows:
        height, width = sizes[int(row["image_id"])]
        assert row["valid"] and min(row["image"].shape[:2]) == 80  # model.test_short_side
        assert row["scale"] == pytest.approx([row["image"].shape[1] / width, row["image"].shape[0] / height])
    # a rank's part of the val set: disjoint, and together the whole set
    parts = [{int(r["image_id"]) for r in build_dataset(uri, cfg, train=False, part=(i, 2)).take_all()} for i in (0, 1)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(sizes)


def test_a_row_that_does_not_decode_is_dropped_and_counted(ray_local, data_root, tmp_path):
    source = data_root / "val"
    table = pq.read_table(shard_files(str(source))[0])
    images = table["image"].to_pylist()
    images[1] = b"\xff\xd8\xff corrupt after conversion"
    broken = tmp_path / "val"
    broken.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())),
                   broken / "part-00000.parquet")  # fmt: skip
    manifest = read_manifest(str(source))
    manifest["shards"] = [{"file": "part-00000.parquet", "rows": 3}]
    (broken / MANIFEST).write_text(json.dumps(manifest))

    cfg = config(data_root)
    batches = list(
        build_dataset(str(broken), cfg, train=False).iter_torch_batches(batch_size=3, collate_fn=BatchCollator(17))
    )
    assert sum(batch.dropped for batch in batches) == 1
    kept = torch.cat([batch.image_ids for batch in batches]).tolist()
    assert sorted(kept) == sorted(set(table["image_id"].to_pylist()) - {table["image_id"][1].as_py()})


def test_training_leaves_out_images_without_people_and_validation_keeps_them(ray_local, data_root, tmp_path):
    """As the authors (FILTER_EMPTY_ANNOTATIONS): an image whose only annotation is a crowd region, or that has
    none, is never a training sample; validation scores every image; the manifest and MLflow params count them."""
    raw = next((data_root.parent / "raw").glob("coco_train_*"))
    content = json.loads((raw / "annotations.json").read_text())
    ids = [image["id"] for image in content["images"]]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != ids[0]]  # no annotation
    for annotation in content["annotations"]:
        if annotation["image_id"] == ids[1]:
            annotation["iscrowd"] = 1  # a crowd region only
    (tmp_path / "annotations.json").write_text(json.dumps(content))
    uri = str(tmp_path / "shards" / "train")
    manifest = convert("coco", tmp_path / "annotations.json", raw / "images", uri)
    assert manifest["num_images"] == 6 and manifest["num_images_without_people"] == 2
    assert training_image_counts(manifest) == {"data.train_images": 4, "data.train_images_without_people_left_out": 2}

    cfg = config(data_root)
    trained = {int(row["image_id"]) for row in build_dataset(uri, cfg, train=True, epochs=2).take_all()}
    assert trained == set(ids[2:])
    validated = {int(row["image_id"]) for row in build_dataset(uri, cfg, train=False).take_all()}
    assert validated == set(ids)


def test_collate_pads_to_a_multiple_of_32_and_keeps_targets():
    def sample(image_id, height, width, people):
        return {"image_id": image_id, "image": np.full((height, width, 3), image_id, np.uint8),
                "boxes": np.tile(np.array([[1, 2, 20, 30]], np.float32), (people, 1)),
                "keypoints": np.ones((people, 17, 3), np.float32), "scale": np.ones(2, np.float32)}  # fmt: skip

    samples = [sample(1, 50, 70, 2), sample(2, 64, 33, 0), sample(3, 0, 0, 0)]
    batch = {key: _object_array([s[key] for s in samples]) for key in ("image", "boxes", "keypoints", "scale")}
    batch["image_id"] = np.array([1, 2, 3])
    batch["valid"] = np.array([True, True, False])
    out = collate_batch(batch, 17)
    assert out.dropped == 1 and out.image_ids.tolist() == [1, 2]
    assert out.images.shape == (2, 3, 64, 96)  # max (64, 70) rounded up to multiples of 32
    assert out.image_sizes.tolist() == [[50, 70], [64, 33]]
    assert torch.all(out.images[0, :, :50, :70] == 1) and torch.all(out.images[0, :, 50:, :] == 0)
    assert torch.all(out.images[1, :, :, 33:] == 0)
    assert [t["boxes"].shape for t in out.targets] == [(2, 4), (0, 4)]
    assert out.targets[0]["keypoints"].shape == (2, 17, 3) and out.targets[1]["keypoints"].shape == (0, 17, 3)

    empty = collate_batch({**batch, "valid": np.array([False, False, False])}, 17)
    assert empty.dropped == 3 and empty.images.shape[0] == 0 and empty.targets == []


# --- the stream at scale: a set spanning many shards and row groups -------------------------------------------------

FIRST_BATCH_READ_SHARE = 0.25  # of the run's row-group reads; the old union of passes read a whole pass (1/2) first


@pytest.fixture(scope="module")
def many_groups(tmp_path_factory) -> str:
    """80 images of 48 px in about 16 shards of 3 row groups of 2 images: about 48 row groups per epoch."""
    folder = tmp_path_factory.mktemp("many_groups")
    gt = write_synthetic_dataset(folder / "raw", num_images=80, dataset="coco", seed=5, image_size=48)
    uri = str(folder / "shards" / "train")
    convert("coco", gt, gt.parent / "images", uri, shard_mb=0.008, row_group_rows=2)
    return uri


def trainable_ids(groups: list[dict]) -> dict[tuple[str, int], list[int]]:
    """Image ids with a non-crowd person, by (file, row group)."""
    out = {}
    for group in groups:
        table = pq.ParquetFile(group["file"]).read_row_group(group["row_group"], columns=["image_id", "people"])
        out[group["file"], group["row_group"]] = [
            row["image_id"] for row in table.to_pylist() if has_people(row["people"])
        ]
    return out


def reads(trace: Path) -> list[int]:
    return sorted(int(path.name) for path in trace.iterdir())


def test_the_first_batch_comes_after_a_small_share_of_the_row_groups(ray_local, data_root, many_groups, tmp_path):
    cfg = config(data_root)
    groups = row_groups(shard_files(many_groups))
    assert len(shard_files(many_groups)) >= 10 and len(groups) >= 40
    dataset = build_dataset(many_groups, cfg, train=True, epochs=2, trace_reads=str(tmp_path))
    next(iter(dataset.iter_batches(batch_size=2)))
    read_before_first_batch = len(reads(tmp_path))  # the executor goes on reading: count at once
    assert 1 <= read_before_first_batch <= FIRST_BATCH_READ_SHARE * 2 * len(groups), read_before_first_batch


def test_two_epochs_yield_every_image_once_per_epoch_in_new_orders(ray_local, data_root, many_groups):
    cfg = config(data_root)
    groups = row_groups(shard_files(many_groups))
    expected = sorted(i for ids in trainable_ids(groups).values() for i in ids)
    items = train_items(groups, 2, cfg.train.seed)
    orders = [[(item["file"], item["row_group"]) for item in items if item["epoch"] == e] for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1], "each epoch: every group, a new order"
    assert train_items(groups, 2, cfg.train.seed) == items != train_items(groups, 2, cfg.train.seed + 1)

    arrived: dict[int, list[int]] = {0: [], 1: []}  # image ids per epoch, in the order the stream gave them
    for batch in build_dataset(many_groups, cfg, train=True, epochs=2).iter_batches(batch_size=8):
        for image_id, epoch in zip(batch["image_id"].tolist(), batch["epoch"].tolist(), strict=True):
            arrived[epoch].append(image_id)
    assert sorted(arrived[0]) == sorted(arrived[1]) == expected
    assert arrived[0] != arrived[1]


def test_a_resumed_stream_starts_past_the_row_groups_its_checkpoint_consumed(
    ray_local, data_root, many_groups, tmp_path
):
    cfg = config(data_root, "train.batch_size=4")
    groups = row_groups(shard_files(many_groups))
    items = train_items(groups, 2, cfg.train.seed)
    epoch_rows = sum(group["rows"] for group in groups)
    start_iteration = (3 * epoch_rows // 2) // 4  # half-way through the second epoch
    offset = resume_offset(items, start_iteration * 4)
    done = [sum(item["rows"] for item in items[:n]) for n in (offset, offset + 1)]
    assert done[0] <= start_iteration * 4 < done[1], "skips the items wholly consumed, and only those"
    assert len(groups) < offset < len(items)

    resumed = build_dataset(
        many_groups, cfg, train=True, epochs=2, start_iteration=start_iteration, trace_reads=str(tmp_path)
    ).take_all()
    assert reads(tmp_path) == list(range(offset, len(items))), "no row group before the resume point is read"
    by_group = trainable_ids(groups)
    expected = sorted(i for item in items[offset:] for i in by_group[item["file"], item["row_group"]])
    assert sorted(int(row["image_id"]) for row in resumed) == expected
    assert {int(row["epoch"]) for row in resumed} == {1}


def test_each_rank_reads_only_its_own_val_row_groups(ray_local, data_root, many_groups, tmp_path):
    cfg = config(data_root)
    groups = row_groups(shard_files(many_groups))
    all_ids = set(pq.read_table(shard_files(many_groups), columns=["image_id"])["image_id"].to_pylist())
    seen: list[set[int]] = []
    for rank in range(3):
        trace = tmp_path / f"rank{rank}"
        trace.mkdir()
        rows = build_dataset(many_groups, cfg, train=False, part=(rank, 3), trace_reads=str(trace)).take_all()
        assert reads(trace) == list(range(rank, len(groups), 3))
        own = {
            image_id
            for group in groups[rank::3]
            for image_id in pq.ParquetFile(group["file"]).read_row_group(group["row_group"])["image_id"].to_pylist()
        }
        assert {int(row["image_id"]) for row in rows} == own
        seen.append(own)
    assert sum(map(len, seen)) == len(all_ids) and set().union(*seen) == all_ids
