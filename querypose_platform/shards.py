"""COCO-format keypoint JSON + image folder -> Parquet shards (one row per image, encoded bytes) + manifest.json +
a copy of the GT JSON. The manifest records the keypoint set (built in, or custom from its YAML) in full. Built in
a temporary sibling folder and renamed into place when complete; local paths and object-store URIs both go
through pyarrow.fs."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from querypose.keypoints import KeypointSpec, get_spec
from querypose.transforms import has_people
from querypose_platform.config import ExperimentConfig, SyntheticConfig, is_uri
from querypose_platform.storage import cache_dir, fetch_to_local, filesystem

MANIFEST = "manifest.json"
GT_JSON = "annotations.json"
CROWDPOSE_AREA_FACTOR = 0.53  # CrowdPose scores with 0.53 * box area where an annotation has no area
ROW_GROUP_ROWS = 64  # Ray Data reads a row group per block: small groups keep blocks (and memory) small

PERSON = pa.struct(
    [
        ("id", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("keypoints", pa.list_(pa.float64())),
        ("num_keypoints", pa.int32()),
        ("iscrowd", pa.int8()),
        ("area", pa.float64()),
    ]
)
SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("crowd_index", pa.float64()),
        ("people", pa.list_(PERSON)),
    ]
)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def has_manifest(uri: str) -> bool:
    fs, root = filesystem(uri)
    return _exists(fs, f"{root}/{MANIFEST}")


def read_manifest(uri: str) -> dict[str, Any]:
    fs, root = filesystem(uri)
    path = f"{root}/{MANIFEST}"
    if not _exists(fs, path):
        raise FileNotFoundError(f"no shard set at {uri}: {MANIFEST} is missing (convert the data first)")
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def shard_files(uri: str) -> list[str]:
    """The shard files of a set, as URIs/paths that ray.data.read_parquet takes."""
    manifest = read_manifest(uri)
    base = uri.rstrip("/")
    return [f"{base}/{shard['file']}" for shard in manifest["shards"]]


def gt_json_path(uri: str) -> Path:
    """A local path to the GT JSON kept beside the shards (a node-local copy for object-store URIs)."""
    fs, root = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        path = Path(root) / GT_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no ground truth beside the shards: {path} is missing")
        return path
    return fetch_to_local(f"{uri.rstrip('/')}/{GT_JSON}")


def _person_problem(annotation: dict, num_keypoints: int) -> str | None:
    for key in ("id", "image_id"):
        if not isinstance(annotation.get(key), int):
            return f"{key}: expected an integer, got {annotation.get(key)!r}"
    keypoints = annotation.get("keypoints")
    if not isinstance(keypoints, list) or len(keypoints) != 3 * num_keypoints:
        got = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
        return f"keypoints: expected {3 * num_keypoints} values, got {got}"
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"bbox: expected [x, y, w, h], got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0 or not all(np.isfinite(bbox)):
        return f"bbox: negative or non-finite size {bbox}"
    return None


def _image_problem(data: bytes | None) -> str | None:
    if data is None:
        return "file not found"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return "does not decode as an image" if decoded is None else None


def _people_rows(annotations: list[dict], crowdpose_area: bool) -> list[dict]:
    rows = []
    for a in annotations:
        area = a.get("area")
        if area is None and crowdpose_area:
            area = CROWDPOSE_AREA_FACTOR * a["bbox"][2] * a["bbox"][3]
        keypoints = [float(v) for v in a["keypoints"]]
        rows.append(
            {
                "id": int(a["id"]),
                "bbox": [float(v) for v in a["bbox"]],
                "keypoints": keypoints,
                "num_keypoints": int(a.get("num_keypoints", sum(v > 0 for v in keypoints[2::3]))),
                "iscrowd": int(a.get("iscrowd", 0)),
                "area": float(area if area is not None else a["bbox"][2] * a["bbox"][3]),
            }
        )
    return rows


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.started = total, enabled and sys.stderr.isatty(), time.perf_counter()

    def update(self, done: int) -> None:
        if self.enabled:
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            print(f"\r[convert] {done}/{self.total} images  {rate:.1f} images/s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def convert(
    keypoint_set: str | KeypointSpec,
    annotations: str | Path,
    images: str | Path,
    out_uri: str,
    shard_mb: float = 256,
    overwrite: bool = False,
    progress: bool = False,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, Any]:
    """Write the shard set of a built-in set's name or a KeypointSpec; returns its manifest. A finished output is
    left alone unless `overwrite`. Annotations of another category than the file's keypoint category are skipped.
    Shards hold about `shard_mb` of image bytes each, in row groups of `row_group_rows` images (the unit that the
    train stream shuffles, reads and resumes by)."""
    spec = get_spec(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotations file {annotations} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    fs, root = filesystem(out_uri)
    if _exists(fs, f"{root}/{MANIFEST}") and not overwrite:
        return read_manifest(out_uri)
    try:
        content = json.loads(annotations.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"annotations file {annotations}: not valid JSON: {error}") from None
    for key in ("images", "annotations"):
        if not isinstance(content.get(key), list):
            raise ValueError(f"annotations file {annotations}: field {key!r} is missing or not a list")
    category = _keypoint_category(content, spec, annotations)

    people: dict[int, list[dict]] = defaultdict(list)
    skipped_annotations = []
    for a in content["annotations"]:
        problem = _person_problem(a, spec.num_keypoints)
        if problem is None and a.get("category_id", category["id"]) != category["id"]:
            problem = f"category_id {a['category_id']} is not the keypoint category {category['id']}"
        if problem:
            skipped_annotations.append({"id": a.get("id"), "image_id": a.get("image_id"), "reason": problem})
        else:
            people[a["image_id"]].append(a)

    # A local output is built in a sibling folder and renamed into place. Object stores cannot rename a folder:
    # there the files go straight to their place and the manifest, written last, marks the set complete.
    local = isinstance(fs, pafs.LocalFileSystem)
    staging = f"{root}.tmp-{uuid.uuid4().hex[:8]}" if local else root
    if _exists(fs, staging):
        fs.delete_dir(staging)  # on an object store: the set being overwritten, or an interrupted one's files
    fs.create_dir(staging, recursive=True)
    try:
        manifest = _write_shards(fs, staging, content, people, images, spec, shard_mb, progress, row_group_rows)
        manifest["category"] = category
        manifest["skipped_annotations"] = skipped_annotations
        manifest["source"] = {"annotations": str(annotations), "images": str(images)}
        with fs.open_output_stream(f"{staging}/{GT_JSON}") as stream:
            stream.write(annotations.read_bytes())
        if local:
            with fs.open_output_stream(f"{staging}/{MANIFEST}") as stream:
                stream.write(json.dumps(manifest, indent=2).encode())
            if _exists(fs, root):
                fs.delete_dir(root)
            fs.move(staging, root)
        else:
            with fs.open_output_stream(f"{root}/{MANIFEST}") as stream:
                stream.write(json.dumps(manifest, indent=2).encode())
    except BaseException:
        if _exists(fs, staging):
            fs.delete_dir(staging)
        raise
    print(
        f"[convert] {out_uri}: {manifest['num_images']} images, {manifest['num_people']} people in "
        f"{len(manifest['shards'])} shards; skipped {len(manifest['skipped_images'])} images and "
        f"{len(skipped_annotations)} annotations (reasons in {MANIFEST})"
    )
    return manifest


def _keypoint_category(content: dict, spec: KeypointSpec, path: Path) -> dict:
    """The file's keypoint category (id, name, supercategory), checked against the keypoint set's names."""
    categories = [c for c in content.get("categories") or [] if isinstance(c, dict) and c.get("keypoints")]
    if len(categories) > 1:
        raise ValueError(f"annotations file {path}: categories: {len(categories)} list keypoints; QueryPose needs one")
    if not categories:  # a file without a category: the set alone says what its keypoints are
        return {"id": 1, "name": "person", "supercategory": "person"}
    category = categories[0]
    if list(category["keypoints"]) != list(spec.keypoint_names):
        raise ValueError(
            f"annotations file {path}: categories: keypoints {category['keypoints']} are not those of keypoint set "
            f"{spec.name!r} ({list(spec.keypoint_names)})"
        )
    return {key: category.get(key) for key in ("id", "name", "supercategory")}


def manifest_spec(manifest: dict[str, Any]) -> KeypointSpec:
    """The keypoint set a shard set was converted with (older manifests name a built-in set only)."""
    recorded = manifest.get("keypoints", {}).get("spec")
    if isinstance(recorded, dict):
        return KeypointSpec.from_dict(recorded, f"{MANIFEST}: keypoints.spec")
    return get_spec(manifest["dataset"])


def _write_shards(
    fs, staging, content, people, images: Path, spec: KeypointSpec, shard_mb: float, progress: bool, group_rows: int
):
    limit = shard_mb * 1024 * 1024
    shards: list[dict] = []
    skipped_images: list[dict] = []
    rows: list[dict] = []
    size = num_images = num_people = num_without_people = 0

    def flush() -> None:
        nonlocal rows, size
        if not rows:
            return
        name = f"part-{len(shards):05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=group_rows)
        data = sink.getvalue().to_pybytes()
        with fs.open_output_stream(f"{staging}/{name}") as stream:
            stream.write(data)
        shards.append({"file": name, "rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        rows, size = [], 0

    bar = _Progress(len(content["images"]), progress)
    for done, record in enumerate(content["images"], 1):
        if not isinstance(record.get("id"), int) or not isinstance(record.get("file_name"), str):
            data, problem = None, "image record needs an integer 'id' and a string 'file_name'"
        else:
            path = images / record["file_name"]
            data = path.read_bytes() if path.is_file() else None
            problem = _image_problem(data)
        if problem:
            skipped_images.append(
                {"image_id": record.get("id"), "file_name": record.get("file_name"), "reason": problem}
            )
            continue
        annotations = people.get(record["id"], [])
        crowd_index = record.get("crowdIndex", record.get("crowd_index"))
        rows.append(
            {
                "image_id": int(record["id"]),
                "file_name": record["file_name"],
                "width": int(record.get("width", 0)),
                "height": int(record.get("height", 0)),
                "image": data,
                "crowd_index": float(crowd_index) if crowd_index is not None else None,
                "people": _people_rows(annotations, crowdpose_area=spec.evaluation == "crowdpose"),
            }
        )
        num_images += 1
        num_people += len(annotations)
        num_without_people += not has_people(annotations)
        size += len(data)
        if size >= limit:
            flush()
        bar.update(done)
    flush()
    bar.close()
    return {
        "dataset": spec.name,
        "keypoints": {
            "name": spec.name,
            "num_keypoints": spec.num_keypoints,
            "names": list(spec.keypoint_names),
            "spec": spec.to_dict(),
        },
        "num_images": num_images,
        "num_people": num_people,
        # Images without a non-crowd person: kept for validation, left out of training (data.py).
        "num_images_without_people": num_without_people,
        "shards": shards,
        "skipped_images": skipped_images,
    }


def read_annotations(uri: str) -> dict[str, Any]:
    """The COCO-format dict (images, annotations, categories) rebuilt from the shards alone."""
    manifest = read_manifest(uri)
    spec = manifest_spec(manifest)
    category = manifest.get("category") or {"id": 1, "name": "person"}
    images, annotations = [], []
    for file in shard_files(uri):
        fs, path = filesystem(file)
        table = pq.read_table(
            path, filesystem=fs, columns=["image_id", "file_name", "width", "height", "crowd_index", "people"]
        )
        for row in table.to_pylist():
            image = {
                "id": row["image_id"],
                "file_name": row["file_name"],
                "width": row["width"],
                "height": row["height"],
            }
            if row["crowd_index"] is not None:
                image["crowdIndex"] = row["crowd_index"]
            images.append(image)
            annotations.extend(
                {**person, "image_id": row["image_id"], "category_id": category["id"]} for person in row["people"]
            )
    category = {
        **category,
        "keypoints": list(spec.keypoint_names),
        "skeleton": [[a + 1, b + 1] for a, b in spec.skeleton],  # 1-based, as in COCO files
    }
    return {"images": images, "annotations": annotations, "categories": [category]}


def ensure_synthetic_shards(cfg: ExperimentConfig) -> None:
    """Generate the synthetic train/val sets and convert them under data.root, unless already there."""
    from querypose.synthetic import write_synthetic_dataset

    settings = cfg.data.synthetic or SyntheticConfig()
    spec = cfg.model.spec
    splits = ((cfg.data.train_split, settings.train_images, settings.seed),
              (cfg.data.val_split, settings.val_images, settings.seed + 1))  # fmt: skip  # val: held-out people
    # The generated images are converted from a local folder: beside a local root, else in the node's cache.
    raw_root = cache_dir() / "synthetic" if is_uri(cfg.data.root) else Path(cfg.data.root).parent / "raw"
    for split, count, seed in splits:
        uri = cfg.data.split_uri(split)
        name = settings.folder_name(spec.name, split, count, seed)
        raw = raw_root / name
        if has_manifest(uri):
            source = Path(read_manifest(uri).get("source", {}).get("annotations", "")).parent
            if source.name == name:
                continue
            if source.parent.resolve() != raw_root.resolve():
                warnings.warn(
                    f"{uri} holds shards converted from {source.name!r}, not from the synthetic set that "
                    f"data.synthetic describes ({name!r}); training uses the shards as they are. Delete {uri} "
                    "(or set another data.root) to generate the described set.",
                    stacklevel=2,
                )
                continue
            # Shards this function made from another generated set (the YAML's data.synthetic changed since):
            # rebuilt from the described set; the old set's generated images stay in raw_root.
            print(f"[synthetic] {uri} was converted from {source.name!r}; rebuilding it from {name!r}")
        if not (raw / "annotations.json").is_file():
            write_synthetic_dataset(
                raw, count, dataset=spec, seed=seed, image_size=settings.image_size, max_people=settings.max_people
            )
        convert(spec, raw / "annotations.json", raw / "images", uri, overwrite=True)
