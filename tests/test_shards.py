"""COCO / CrowdPose JSON -> Parquet shards: exact round trips of the real fixtures, skipped-and-reported bad
input, all-or-nothing output, the no-op rerun, and the convert.py command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from querypose_platform import shards
from querypose_platform.shards import convert, read_annotations, read_manifest, shard_files

REPO_ROOT = Path(__file__).resolve().parents[1]
PERSON_FIELDS = ("id", "bbox", "keypoints", "num_keypoints", "iscrowd")


def _by_id(records: list[dict]) -> dict[int, dict]:
    return {record["id"]: record for record in records}


def test_coco_fixture_round_trips_exactly(fixtures_dir, tmp_path):
    source = json.loads((fixtures_dir / "coco" / "person_keypoints.json").read_text())
    out = tmp_path / "coco"
    manifest = convert(
        "coco", fixtures_dir / "coco" / "person_keypoints.json", fixtures_dir / "coco" / "images", str(out)
    )

    assert manifest["num_images"] == len(source["images"]) == 4
    assert manifest["num_people"] == len(source["annotations"]) == 14
    assert manifest["skipped_images"] == [] and manifest["skipped_annotations"] == []
    assert manifest["keypoints"]["num_keypoints"] == 17
    back = read_annotations(str(out))
    images, original_images = _by_id(back["images"]), _by_id(source["images"])
    assert images.keys() == original_images.keys()
    for image_id, image in images.items():
        for key in ("file_name", "width", "height"):
            assert image[key] == original_images[image_id][key]
    people = _by_id(back["annotations"])
    assert people.keys() == _by_id(source["annotations"]).keys()
    for original in source["annotations"]:
        person = people[original["id"]]
        for key in (*PERSON_FIELDS, "area", "image_id"):
            assert person[key] == pytest.approx(original[key]), key
    # the encoded bytes are the original files, and the GT JSON is kept verbatim beside the shards
    table = pq.read_table(shard_files(str(out))[0], columns=["file_name", "image"])
    for name, data in zip(table["file_name"].to_pylist(), table["image"].to_pylist(), strict=True):
        assert data == (fixtures_dir / "coco" / "images" / name).read_bytes()
    assert json.loads((out / "annotations.json").read_text()) == source


def test_crowdpose_fixture_keeps_crowd_index_and_fills_area(fixtures_dir, tmp_path):
    source = json.loads((fixtures_dir / "crowdpose" / "crowdpose.json").read_text())
    out = tmp_path / "crowdpose"
    convert("crowdpose", fixtures_dir / "crowdpose" / "crowdpose.json", fixtures_dir / "crowdpose" / "images", str(out))

    back = read_annotations(str(out))
    crowd_index = {image["id"]: image["crowdIndex"] for image in back["images"]}
    assert crowd_index == {image["id"]: image["crowdIndex"] for image in source["images"]}
    assert sorted(crowd_index.values()) == [0.33, 0.39]
    people = _by_id(back["annotations"])
    assert len(people) == len(source["annotations"]) == 5
    for original in source["annotations"]:
        person = people[original["id"]]
        assert "area" not in original  # CrowdPose has none: 0.53 * box area stands in
        assert person["area"] == pytest.approx(0.53 * original["bbox"][2] * original["bbox"][3])
        for key in PERSON_FIELDS:
            assert person[key] == pytest.approx(original[key]), key
    # the category carries CrowdPose's own 14-keypoint skeleton, not the COCO one the file has
    assert max(max(edge) for edge in back["categories"][0]["skeleton"]) <= 14


def _dataset_with_problems(fixtures_dir: Path, folder: Path) -> Path:
    """The COCO fixture plus a corrupt JPEG, an image record whose file is missing and two bad annotations."""
    images = folder / "images"
    shutil.copytree(fixtures_dir / "coco" / "images", images)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    content = json.loads((fixtures_dir / "coco" / "person_keypoints.json").read_text())
    content["images"] += [
        {"id": 9001, "file_name": "corrupt.jpg", "width": 10, "height": 10},
        {"id": 9002, "file_name": "missing.jpg", "width": 10, "height": 10},
    ]
    good = content["annotations"][0]
    content["annotations"] += [
        {**good, "id": 7001, "keypoints": good["keypoints"][:-3]},  # 16 keypoints
        {**good, "id": 7002, "bbox": [0, 0, -5, 10]},
    ]
    path = folder / "annotations.json"
    path.write_text(json.dumps(content))
    return path


def test_bad_images_and_annotations_are_skipped_and_reported(fixtures_dir, tmp_path, capsys):
    annotations = _dataset_with_problems(fixtures_dir, tmp_path / "raw")
    manifest = convert("coco", annotations, tmp_path / "raw" / "images", str(tmp_path / "out"))

    assert manifest["num_images"] == 4 and manifest["num_people"] == 14  # every good image and person kept
    reasons = {entry["file_name"]: entry["reason"] for entry in manifest["skipped_images"]}
    assert reasons == {"corrupt.jpg": "does not decode as an image", "missing.jpg": "file not found"}
    skipped = {entry["id"]: entry["reason"] for entry in manifest["skipped_annotations"]}
    assert skipped.keys() == {7001, 7002}
    assert "expected 51 values, got 48" in skipped[7001] and "negative" in skipped[7002]
    assert "skipped 2 images and 2 annotations" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "out")) == manifest


def test_interrupted_conversion_leaves_nothing_at_the_destination(fixtures_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_problem = shards._image_problem

    def fail_on_third_image(data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_problem(data)

    monkeypatch.setattr(shards, "_image_problem", fail_on_third_image)
    with pytest.raises(KeyboardInterrupt):
        convert("coco", fixtures_dir / "coco" / "person_keypoints.json", fixtures_dir / "coco" / "images",
                str(tmp_path / "out"), shard_mb=0.05)  # fmt: skip
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == [], "neither the destination nor the staging folder is left behind"


def test_rerun_is_a_no_op_and_overwrite_replaces(fixtures_dir, tmp_path):
    args = ("coco", fixtures_dir / "coco" / "person_keypoints.json", fixtures_dir / "coco" / "images")
    out = tmp_path / "out"
    first = convert(*args, str(out), shard_mb=0.05)
    assert len(first["shards"]) > 1, "small shard_mb splits the set over several files"
    assert sum(shard["rows"] for shard in first["shards"]) == 4
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert convert(*args, str(out)) == first
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps

    replaced = convert(*args, str(out), overwrite=True)
    assert len(replaced["shards"]) == 1 and replaced["num_images"] == 4
    assert sorted(path.name for path in out.iterdir()) == ["annotations.json", "manifest.json", "part-00000.parquet"]


def test_bad_annotation_file_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        convert("coco", broken, tmp_path / "images", str(tmp_path / "out"))
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no_images.json: field 'images' is missing"):
        convert("coco", no_images, tmp_path / "images", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        convert("coco", tmp_path / "absent.json", tmp_path / "images", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_convert_command_line(fixtures_dir, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "experiments" / "convert.py"), "--dataset", "crowdpose",
               "--annotations", str(fixtures_dir / "crowdpose" / "crowdpose.json"),
               "--images", str(fixtures_dir / "crowdpose" / "images"), "--out", str(tmp_path / "cp")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 images, 5 people in 1 shards; skipped 0 images and 0 annotations" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already converted; nothing to do" in again.stdout

    bad = subprocess.run([*command[:-1], str(tmp_path / "x"), "--shard-mb", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--shard-mb must be > 0" in bad.stderr
    missing = [*command[:5], str(tmp_path / "absent.json"), *command[6:-1], str(tmp_path / "y")]
    gone = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and "absent.json does not exist" in gone.stderr
