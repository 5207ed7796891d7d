"""A small, learnable COCO-format dataset: articulated stick people (or quadrupeds) on textured backgrounds.

Each person is a 2-D kinematic skeleton (random scale, position, lean and limb angles in human ranges) drawn
as thick limbs with one fixed colour per limb and a marker of one fixed colour per keypoint, so a keypoint's
position and identity (left/right included) can be read from the pixels. People drawn later cover earlier ones:
a keypoint covered by a later person's body is labelled v=1 (occluded), a visible one v=2. Keypoints outside
the image and a few random ones are unlabelled (v=0, x=y=0). This is the project's embedded default dataset.

The second body, a quadruped seen from the side (20 keypoints, experiments/configs/keypoints/quadruped.yaml), is
drawn the same way, so a custom keypoint set trains end to end without a download. Which body draws a keypoint
set follows from its keypoint names; a set that is not built in also gets a `keypoints.yaml` beside its
annotations (the sigmas, flip pairs and parts that a COCO-format file cannot hold).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from querypose.keypoints import BUILTIN_SETS, KeypointSpec, get_spec

PEOPLE_PER_IMAGE = np.array([0.25, 0.25, 0.2, 0.14, 0.1, 0.06])  # P(1..6 people); max_people cuts the tail
MAX_PEOPLE = len(PEOPLE_PER_IMAGE)
UNLABELLED_PROB = 0.03

# Limb colours (RGB) by limb; keypoint marker colours by joint name. Fixed, so identity is visible.
LIMBS = {
    ("left_shoulder", "left_elbow"): (230, 25, 75), ("left_elbow", "left_wrist"): (245, 130, 48),
    ("right_shoulder", "right_elbow"): (60, 180, 75), ("right_elbow", "right_wrist"): (70, 240, 240),
    ("left_hip", "left_knee"): (0, 130, 200), ("left_knee", "left_ankle"): (145, 30, 180),
    ("right_hip", "right_knee"): (240, 50, 230), ("right_knee", "right_ankle"): (210, 245, 60),
    ("left_shoulder", "right_shoulder"): (128, 128, 0), ("left_hip", "right_hip"): (0, 128, 128),
    ("left_shoulder", "left_hip"): (170, 110, 40), ("right_shoulder", "right_hip"): (128, 0, 0),
    ("neck", "head"): (255, 215, 180),
}  # fmt: skip
MARKERS = {
    "nose": (255, 0, 0), "left_eye": (0, 0, 255), "right_eye": (0, 255, 0), "left_ear": (255, 255, 0),
    "right_ear": (255, 0, 255), "left_shoulder": (255, 255, 255), "right_shoulder": (0, 0, 0),
    "left_elbow": (255, 128, 0), "right_elbow": (0, 128, 255), "left_wrist": (255, 255, 128),
    "right_wrist": (128, 255, 255), "left_hip": (255, 128, 255), "right_hip": (128, 0, 255),
    "left_knee": (128, 255, 0), "right_knee": (255, 0, 128), "left_ankle": (64, 64, 64),
    "right_ankle": (192, 192, 192), "head": (255, 64, 64), "neck": (64, 255, 64),
}  # fmt: skip

# The quadruped: legs per side ({side} is left or right), the trunk as (colour, width / body length), and
# markers by joint name.
QUADRUPED_LEGS = {
    ("{side}_shoulder", "{side}_front_knee"): {"left": (230, 25, 75), "right": (60, 180, 75)},
    ("{side}_front_knee", "{side}_front_paw"): {"left": (245, 130, 48), "right": (70, 240, 240)},
    ("{side}_hip", "{side}_back_knee"): {"left": (0, 130, 200), "right": (240, 50, 230)},
    ("{side}_back_knee", "{side}_back_paw"): {"left": (145, 30, 180), "right": (210, 245, 60)},
}  # fmt: skip
QUADRUPED_TRUNK = {
    ("withers", "croup"): ((150, 110, 70), 0.3), ("withers", "neck"): ((170, 120, 80), 0.14),
    ("neck", "head_center"): ((170, 120, 80), 0.14), ("tail_base", "tail_tip"): ((110, 80, 50), 0.09),
}  # fmt: skip
QUADRUPED_MARKERS = {
    "nose": (255, 0, 0), "left_eye": (0, 0, 255), "right_eye": (0, 255, 0), "left_ear": (255, 255, 0),
    "right_ear": (255, 0, 255), "neck": (64, 255, 64), "tail_base": (255, 64, 64), "tail_tip": (64, 64, 255),
    "left_shoulder": (255, 255, 255), "right_shoulder": (0, 0, 0), "left_front_knee": (255, 128, 0),
    "right_front_knee": (0, 128, 255), "left_front_paw": (255, 255, 128), "right_front_paw": (128, 255, 255),
    "left_hip": (255, 128, 255), "right_hip": (128, 0, 255), "left_back_knee": (128, 255, 0),
    "right_back_knee": (255, 0, 128), "left_back_paw": (64, 64, 64), "right_back_paw": (192, 192, 192),
}  # fmt: skip
SMALL_MARKERS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear")


def _rotate(vector: np.ndarray, degrees: float) -> np.ndarray:
    theta = np.deg2rad(degrees)
    c, s = np.cos(theta), np.sin(theta)
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1]])


def _leg(root, up, facing: float, rng, upper_range, lower_range, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Knee and paw of a leg hanging from `root`: angles (degrees from straight down, positive towards the head)
    drawn from the two ranges, upper first."""
    upper = _rotate(-up, -facing * rng.uniform(*upper_range))
    lower = _rotate(upper, -facing * rng.uniform(*lower_range))
    knee = root + upper * lengths[0]
    return knee, knee + lower * lengths[1]


def _skeleton(rng: np.random.Generator, hip_center: np.ndarray, height: float) -> dict[str, np.ndarray]:
    """Joint positions (image pixels, y down) of one person `height` pixels tall, facing the camera or away."""
    lean = rng.uniform(-15, 15)
    facing = 1.0 if rng.random() < 0.8 else -1.0  # the person's left is on the image right when facing us
    up = _rotate(np.array([0.0, -1.0]), lean)
    side = _rotate(np.array([facing, 0.0]), lean)
    neck = hip_center + up * 0.30 * height
    joints = {"neck": neck, "head": neck + _rotate(up, rng.uniform(-20, 20)) * 0.17 * height}
    head_center = neck + (joints["head"] - neck) * 0.55
    for sign, name in ((1, "left"), (-1, "right")):
        joints[f"{name}_shoulder"] = neck + side * sign * 0.11 * height
        joints[f"{name}_hip"] = hip_center + side * sign * 0.075 * height
        # Arms hang down and swing out; legs stand with moderate bends. Angles in degrees from "down".
        arm = _rotate(-up, sign * facing * rng.uniform(-40, 120))
        joints[f"{name}_elbow"] = joints[f"{name}_shoulder"] + arm * 0.16 * height
        forearm = _rotate(arm, sign * facing * rng.uniform(-10, 120))
        joints[f"{name}_wrist"] = joints[f"{name}_elbow"] + forearm * 0.14 * height
        thigh = _rotate(-up, sign * facing * rng.uniform(-15, 45))
        joints[f"{name}_knee"] = joints[f"{name}_hip"] + thigh * 0.24 * height
        shin = _rotate(thigh, -sign * facing * rng.uniform(0, 60))
        joints[f"{name}_ankle"] = joints[f"{name}_knee"] + shin * 0.23 * height
        joints[f"{name}_eye"] = head_center + side * sign * 0.028 * height - up * 0.01 * height
        joints[f"{name}_ear"] = head_center + side * sign * 0.055 * height + up * 0.005 * height
    joints["nose"] = head_center - up * 0.02 * height
    return joints


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour noise plus faint stripes: texture without anything that looks like a joint marker."""
    coarse = rng.uniform(40, 200, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    period, angle = rng.uniform(8, 40), rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    image += stripes[..., None] * rng.uniform(5, 20) + rng.normal(0, 4, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_person(canvas: np.ndarray, joints: dict[str, np.ndarray], height: float) -> None:
    """Draw limbs, head and markers on an RGB canvas (or a single-channel mask, all in white)."""
    mask = canvas.ndim == 2
    limb_width = max(2, round(0.045 * height))
    marker = max(2, round(0.022 * height))

    def point(name: str) -> tuple[int, int]:
        return tuple(int(round(v)) for v in joints[name] * 4)  # 2 fractional bits for sub-pixel drawing

    def colour(rgb: tuple[int, int, int]) -> tuple[int, ...]:
        return (255,) if mask else rgb

    for (a, b), rgb in LIMBS.items():
        cv2.line(canvas, point(a), point(b), colour(rgb), limb_width, cv2.LINE_AA, shift=2)
    head_center = (joints["neck"] + joints["head"]) / 2 + (joints["head"] - joints["neck"]) * 0.1
    axes = (int(0.075 * height * 4), int(0.095 * height * 4))
    center = tuple(int(round(v)) for v in head_center * 4)
    cv2.ellipse(canvas, center, axes, 0, 0, 360, colour((235, 190, 150)), -1, cv2.LINE_AA, shift=2)
    for name, rgb in MARKERS.items():
        radius = marker if name not in SMALL_MARKERS else marker * 0.7
        cv2.circle(canvas, point(name), int(radius * 4), colour(rgb), -1, cv2.LINE_AA, shift=2)


def _place_person(rng: np.random.Generator, width: int, height: int, crowd: int) -> tuple[dict, float]:
    """A person of a random height standing somewhere in the image; returns (joints, height in pixels)."""
    person_height = height * rng.uniform(0.45, 0.95) / (1 + 0.15 * (crowd - 1))
    hip = np.array([rng.uniform(-0.05, 1.05) * width, rng.uniform(0.35, 0.8) * height + 0.1 * person_height])
    return _skeleton(rng, hip, person_height), person_height


def _quadruped(rng: np.random.Generator, center: np.ndarray, length: float) -> dict[str, np.ndarray]:
    """Joint positions (image pixels, y down) of an animal seen from the side, `length` pixels from withers to
    croup. Facing the image right it shows its left side, facing left its right side, so a mirrored image is
    another valid animal once left and right swap (the flip augmentation's assumption)."""
    facing = 1.0 if rng.random() < 0.5 else -1.0
    tilt = rng.uniform(-10, 10)
    forward, up = _rotate(np.array([facing, 0.0]), tilt), _rotate(np.array([0.0, -1.0]), tilt)
    far = "right" if facing > 0 else "left"
    behind = (forward * 0.06 + up * 0.05) * length  # the far side's joints sit a little behind and above
    joints = {"withers": center + forward * 0.5 * length, "croup": center - forward * 0.5 * length}
    for side in ("left", "right"):
        offset = behind if side == far else 0.0
        # Leg angles in degrees from straight down, positive towards the head: the lower front leg swings back,
        # the hock forward.
        shoulder = joints["withers"] - up * 0.12 * length + offset
        knee, paw = _leg(shoulder, up, facing, rng, (-25, 30), (-35, 10), (0.28 * length, 0.27 * length))
        joints |= {f"{side}_shoulder": shoulder, f"{side}_front_knee": knee, f"{side}_front_paw": paw}
        hip = joints["croup"] - up * 0.12 * length + offset
        knee, paw = _leg(hip, up, facing, rng, (-30, 20), (-10, 40), (0.3 * length, 0.27 * length))
        joints |= {f"{side}_hip": hip, f"{side}_back_knee": knee, f"{side}_back_paw": paw}
    joints["neck"] = joints["withers"] + (up * 0.22 + forward * 0.08) * length
    lift = -facing * rng.uniform(0, 50)  # the head raised above the neck's line
    joints["head_center"] = joints["neck"] + _rotate(forward, lift) * 0.25 * length
    nod = lift + facing * rng.uniform(-20, 30)
    snout, crown = _rotate(forward, nod), _rotate(up, nod)
    head = joints["head_center"]
    joints["nose"] = head + snout * 0.17 * length
    for side in ("left", "right"):
        offset = behind * 0.4 if side == far else 0.0
        joints[f"{side}_eye"] = head + (snout * 0.05 + crown * 0.05) * length + offset
        joints[f"{side}_ear"] = head + (crown * 0.12 - snout * 0.05) * length + offset
    joints["tail_base"] = joints["croup"] + (up * 0.06 - forward * 0.08) * length
    joints["tail_tip"] = joints["tail_base"] + _rotate(-forward, facing * rng.uniform(-20, 60)) * 0.4 * length
    return joints


def _place_quadruped(rng: np.random.Generator, width: int, height: int, crowd: int) -> tuple[dict, float]:
    length = width * rng.uniform(0.25, 0.45) / (1 + 0.15 * (crowd - 1))
    center = np.array([rng.uniform(-0.05, 1.05) * width, rng.uniform(0.3, 0.75) * height])
    return _quadruped(rng, center, length), length


def _draw_quadruped(canvas: np.ndarray, joints: dict[str, np.ndarray], length: float) -> None:
    """Far legs, trunk, near legs, head, then the markers, on an RGB canvas (or a single-channel mask)."""
    mask = canvas.ndim == 2
    near = "left" if joints["withers"][0] > joints["croup"][0] else "right"  # facing the image right: left side near

    def point(name: str) -> tuple[int, int]:
        return tuple(int(round(v)) for v in joints[name] * 4)  # 2 fractional bits for sub-pixel drawing

    def line(a: str, b: str, rgb: tuple[int, int, int], width: float) -> None:
        cv2.line(canvas, point(a), point(b), (255,) if mask else rgb, max(2, round(width)), cv2.LINE_AA, shift=2)

    def legs(side: str) -> None:
        for (a, b), colours in QUADRUPED_LEGS.items():
            line(a.format(side=side), b.format(side=side), colours[side], 0.07 * length)

    legs("right" if near == "left" else "left")
    for (a, b), (rgb, width) in QUADRUPED_TRUNK.items():
        line(a, b, rgb, width * length)
    legs(near)
    axes = (int(0.12 * length * 4), int(0.08 * length * 4))
    center = tuple(int(round(v)) for v in joints["head_center"] * 4)
    cv2.ellipse(canvas, center, axes, 0, 0, 360, (255,) if mask else (190, 140, 90), -1, cv2.LINE_AA, shift=2)
    marker = max(2, round(0.035 * length))
    for name, rgb in QUADRUPED_MARKERS.items():
        radius = marker * 0.7 if name in SMALL_MARKERS else marker
        cv2.circle(canvas, point(name), int(radius * 4), (255,) if mask else rgb, -1, cv2.LINE_AA, shift=2)


# body name -> (place one in an image, draw it, the joints it has).
BODIES = {
    "person": (_place_person, _draw_person, set(MARKERS)),
    "quadruped": (_place_quadruped, _draw_quadruped, set(QUADRUPED_MARKERS)),
}


def body_for(spec: KeypointSpec) -> str:
    """The body whose joints include every keypoint of `spec`."""
    for name, (_, _, joints) in BODIES.items():
        if set(spec.keypoint_names) <= joints:
            return name
    raise ValueError(
        f"the synthetic generator draws people (the coco and crowdpose keypoints) and quadrupeds "
        f"({', '.join(QUADRUPED_MARKERS)}); keypoint set {spec.name!r} has keypoints neither body has"
    )


def people_count_probabilities(max_people: int = MAX_PEOPLE) -> np.ndarray:
    """P(1..max_people people in an image): the default distribution cut at max_people and renormalised."""
    if not 1 <= max_people <= MAX_PEOPLE:
        raise ValueError(f"max_people must be in 1..{MAX_PEOPLE}, got {max_people}")
    kept = PEOPLE_PER_IMAGE[:max_people]
    return kept / kept.sum()


def render_sample(
    rng: np.random.Generator, spec: KeypointSpec, width: int, height: int, max_people: int = MAX_PEOPLE
) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HxWx3 RGB) and its people (or animals) as COCO-style dicts (bbox xywh, keypoints K*3, ...).
    Fewer people per image (max_people) also makes them larger: the crowd shrinks everyone."""
    place, draw, _ = BODIES[body_for(spec)]
    image = _background(rng, width, height)
    probabilities = people_count_probabilities(max_people)
    num_people = int(rng.choice(len(probabilities), p=probabilities)) + 1
    people = []
    for _ in range(num_people):
        joints, size = place(rng, width, height, num_people)
        mask = np.zeros((height, width), np.uint8)
        draw(mask, joints, size)
        draw(image, joints, size)
        people.append((joints, mask))

    annotations = []
    for index, (joints, mask) in enumerate(people):
        covered = np.zeros_like(mask, dtype=bool)
        for _, later_mask in people[index + 1 :]:
            covered |= later_mask > 0
        keypoints = np.zeros((spec.num_keypoints, 3), np.float32)
        for k, name in enumerate(spec.keypoint_names):
            x, y = joints[name]
            if not (0 <= x < width and 0 <= y < height) or rng.random() < UNLABELLED_PROB:
                continue
            keypoints[k] = (x, y, 1 if covered[int(y), int(x)] else 2)
        ys, xs = np.nonzero((mask > 0) & ~covered)
        labelled = keypoints[:, 2] > 0
        if not labelled.any() or len(xs) == 0:
            continue
        x0 = min(xs.min(), keypoints[labelled, 0].min())
        y0 = min(ys.min(), keypoints[labelled, 1].min())
        x1 = max(xs.max() + 1, keypoints[labelled, 0].max())
        y1 = max(ys.max() + 1, keypoints[labelled, 1].max())
        annotations.append(
            {
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "keypoints": [round(float(v), 2) for v in keypoints.reshape(-1)],
                "num_keypoints": int(labelled.sum()),
                "iscrowd": 0,
                "category_id": 1,
            }
        )
    return image, annotations


def crowd_index(annotations: list[dict]) -> float:
    """CrowdPose's crowding measure: other people's keypoints inside each box over its own, averaged."""
    ratios = []
    for i, ann in enumerate(annotations):
        x, y, w, h = ann["bbox"]
        own = max(ann["num_keypoints"], 1)
        others = 0
        for j, other in enumerate(annotations):
            if i == j:
                continue
            kp = np.asarray(other["keypoints"]).reshape(-1, 3)
            inside = (kp[:, 2] > 0) & (kp[:, 0] >= x) & (kp[:, 0] <= x + w) & (kp[:, 1] >= y) & (kp[:, 1] <= y + h)
            others += int(inside.sum())
        ratios.append(others / own)
    return round(float(min(1.0, np.mean(ratios))) if ratios else 0.0, 2)


def write_synthetic_dataset(
    out_dir: str | Path,
    num_images: int,
    dataset: str | KeypointSpec = "coco",
    seed: int = 0,
    image_size: int = 320,
    overwrite: bool = False,
    max_people: int = MAX_PEOPLE,
) -> Path:
    """Write `out_dir/images/*.jpg` and `out_dir/annotations.json` (plus `out_dir/keypoints.yaml` for a set that
    is not built in) for a built-in set's name or a KeypointSpec; returns the annotations path. Images hold 1 to
    max_people people (the default 6 is the project's standard difficulty).

    Built in a temporary sibling directory and renamed into place when complete, so an interrupted run
    leaves nothing at `out_dir`. Deterministic for a seed.
    """
    out_dir = Path(out_dir)
    spec = get_spec(dataset) if isinstance(dataset, str) else dataset
    body_for(spec)  # fails before anything is written when no body has the set's keypoints
    people_count_probabilities(max_people)  # likewise for a bad max_people
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_into(staging, spec, num_images, seed, image_size, max_people)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "annotations.json"


def _write_into(root: Path, spec: KeypointSpec, num_images: int, seed: int, image_size: int, max_people: int) -> None:
    (root / "images").mkdir()
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        aspect = rng.uniform(0.75, 1.33)
        width, height = (round(image_size * aspect), image_size) if aspect >= 1 else (
            image_size, round(image_size / aspect))  # fmt: skip
        pixels, people = render_sample(rng, spec, width, height, max_people)
        file_name = f"{image_id:012d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"could not encode synthetic image {file_name}")
        (root / "images" / file_name).write_bytes(encoded.tobytes())
        record = {"id": image_id, "file_name": file_name, "width": width, "height": height}
        if spec.evaluation == "crowdpose":
            record["crowdIndex"] = crowd_index(people)
        images.append(record)
        for person in people:
            person = {"id": len(annotations) + 1, "image_id": image_id, **person}
            if spec.evaluation != "crowdpose":  # CrowdPose files carry no area; its evaluation uses 0.53 * w * h
                person["area"] = round(0.53 * person["bbox"][2] * person["bbox"][3], 2)
            annotations.append(person)
    category_name = "person" if body_for(spec) == "person" else spec.name
    category = {
        "id": 1,
        "name": category_name,
        "supercategory": category_name,
        "keypoints": list(spec.keypoint_names),
        "skeleton": [[a + 1, b + 1] for a, b in spec.skeleton],
    }
    content = {"images": images, "annotations": annotations, "categories": [category]}
    (root / "annotations.json").write_text(json.dumps(content))
    if spec.name not in BUILTIN_SETS:
        (root / "keypoints.yaml").write_text(keypoint_set_yaml(spec))


def keypoint_set_yaml(spec: KeypointSpec) -> str:
    """The small YAML a custom set needs beside its COCO-format file: what the file's category cannot hold."""
    extras = spec.to_dict()
    names = extras.pop("keypoints")
    del extras["skeleton"]
    extras["sigmas"] = dict(zip(names, spec.sigmas, strict=True))
    header = "# Keypoint set of annotations.json: names and skeleton come from its category, the rest from here.\n"
    return header + yaml.safe_dump(
        {"annotations": "annotations.json", **extras}, sort_keys=False, default_flow_style=None
    )
