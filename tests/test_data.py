"""The Ray Data pipeline over shards: fresh augmentation every epoch, reproducible from the seed, the val path
without augmentation, corrupt rows dropped and counted, and the padding collate_fn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from querypose_platform.config import load_config
from querypose_platform.data import BatchCollator, _object_array, build_dataset, collate_batch
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
