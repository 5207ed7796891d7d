"""Augmentation and test-time resizing on (image, boxes, keypoints), shared by training, data and predict."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def pad_batch(images: list[torch.Tensor], size_divisor: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad CHW images to a common size, a multiple of `size_divisor`, bottom/right.

    Returns (images (B,3,H,W), image_sizes (B,2) long as [height, width] of each unpadded image).
    """
    sizes = torch.tensor([[img.shape[-2], img.shape[-1]] for img in images], dtype=torch.long)
    height, width = (int(-(-s // size_divisor) * size_divisor) for s in sizes.max(dim=0).values.tolist())
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    return batch, sizes


# --- annotations and numpy augmentation -------------------------------------------------------------------------
# A sample is a dict: "image" uint8 (H, W, 3) RGB, "boxes" float32 (P, 4) xyxy pixels, "keypoints" float32
# (P, K, 3) [x, y, v] with x = y = 0 where v = 0; other keys pass through unchanged. Coordinates are continuous:
# pixel i covers [i, i + 1). COCO files give keypoints as pixel indices (pixel i's centre is i), so loading adds
# 0.5 (detectron2's convention, the authors' too) and export subtracts it; a flip x -> width - x is then exact.
KEYPOINT_PIXEL_CENTRE = 0.5


def people_arrays(annotations: list[dict], num_keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO person annotations (bbox xywh, keypoints K*3 pixel indices) -> boxes (P, 4) xyxy and keypoints
    (P, K, 3) in continuous coordinates, float32. Crowd regions are not people to detect and are left out."""
    people = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = np.array([a["bbox"] for a in people], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    keypoints = np.array([a["keypoints"] for a in people], np.float32).reshape(-1, num_keypoints, 3)
    keypoints[..., :2] += np.where(keypoints[..., 2:] > 0, KEYPOINT_PIXEL_CENTRE, 0.0).astype(np.float32)
    return boxes, keypoints


def has_people(annotations: list[dict]) -> bool:
    """Whether an image has a person to train on: the authors (FILTER_EMPTY_ANNOTATIONS) train only on those."""
    return any(not a.get("iscrowd", 0) for a in annotations)


def hflip(sample: dict, flip_index: np.ndarray) -> dict:
    """Mirror horizontally: x -> width - x, left and right keypoints swapped."""
    width = sample["image"].shape[1]
    boxes = sample["boxes"].copy()
    boxes[:, [0, 2]] = width - sample["boxes"][:, [2, 0]]
    keypoints = sample["keypoints"][:, flip_index].copy()
    labelled = keypoints[..., 2] > 0
    keypoints[..., 0] = np.where(labelled, width - keypoints[..., 0], 0.0)
    return {**sample, "image": np.ascontiguousarray(sample["image"][:, ::-1]), "boxes": boxes, "keypoints": keypoints}


def resize_scale(height: int, width: int, short_side: int, max_size: int) -> float:
    return min(short_side / min(height, width), max_size / max(height, width))


def resize(sample: dict, short_side: int, max_size: int) -> dict:
    """Resize so the short side is `short_side` and the long side at most `max_size`, keeping the aspect ratio."""
    height, width = sample["image"].shape[:2]
    scale = resize_scale(height, width, short_side, max_size)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = cv2.resize(sample["image"], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    sx, sy = new_w / width, new_h / height
    boxes = sample["boxes"] * np.array([sx, sy, sx, sy], np.float32)
    keypoints = sample["keypoints"].copy()
    keypoints[..., 0] *= sx
    keypoints[..., 1] *= sy
    return {**sample, "image": image, "boxes": boxes.astype(np.float32), "keypoints": keypoints}


def crop(sample: dict, x0: int, y0: int, width: int, height: int) -> dict:
    """Cut the window [x0, x0 + width) x [y0, y0 + height); keypoints outside become unlabelled, boxes are
    clipped, and people whose box is left empty are dropped."""
    image = sample["image"][y0 : y0 + height, x0 : x0 + width]
    height, width = image.shape[:2]
    offset = np.array([x0, y0, x0, y0], np.float32)
    boxes = (sample["boxes"] - offset).clip(0, np.array([width, height, width, height], np.float32))
    keypoints = sample["keypoints"].copy()
    keypoints[..., 0] -= x0
    keypoints[..., 1] -= y0
    inside = (
        (keypoints[..., 0] >= 0)
        & (keypoints[..., 0] <= width)
        & (keypoints[..., 1] >= 0)
        & (keypoints[..., 1] <= height)
    )
    keep_point = inside & (keypoints[..., 2] > 0)
    keypoints[~keep_point] = 0.0
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # zero-area boxes lie outside the crop
    return {**sample, "image": np.ascontiguousarray(image), "boxes": boxes[keep], "keypoints": keypoints[keep]}


def crop_window(height: int, width: int, crop_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, ...]:
    """(x0, y0, width, height) of a random window, its sides drawn as detectron2's RandomCrop("absolute_range",
    crop_size): uniform in [min(side, lo), min(side, hi)], so a side shorter than lo is kept whole."""
    crop_h = int(rng.integers(min(height, crop_size[0]), min(height, crop_size[1]) + 1))
    crop_w = int(rng.integers(min(width, crop_size[0]), min(width, crop_size[1]) + 1))
    return int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1)), crop_w, crop_h


def train_augment(
    sample: dict,
    rng: np.random.Generator,
    flip_index: np.ndarray,
    short_sides: tuple[int, ...] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
    crop_resize_sides: tuple[int, ...] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
) -> dict:
    """The paper's training augmentation: flip, with probability crop_prob a crop (resize the short side to one
    of crop_resize_sides, cut a random `crop_window`), then the multi-scale resize."""
    if rng.random() < flip_prob:
        sample = hflip(sample, flip_index)
    if rng.random() < crop_prob:
        sample = resize(sample, int(rng.choice(crop_resize_sides)), 1 << 30)
        height, width = sample["image"].shape[:2]
        sample = crop(sample, *crop_window(height, width, crop_size, rng))
    return resize(sample, int(rng.choice(short_sides)), max_size)


def test_resize(sample: dict, short_side: int = 800, max_size: int = 1333) -> dict:
    """Test-time resize; records the scale (resized / original) so predictions map back to original pixels."""
    height, width = sample["image"].shape[:2]
    resized = resize(sample, short_side, max_size)
    new_h, new_w = resized["image"].shape[:2]
    return {**resized, "scale": np.array([new_w / width, new_h / height], np.float32)}


test_resize.__test__ = False  # its name starts with "test": keep pytest from collecting it where it is imported


def sample_to_target(sample: dict, num_keypoints: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(CHW float32 0..255 image tensor, {"boxes": (P, 4), "keypoints": (P, K, 3)}) for the model.

    `num_keypoints` gives an image without people its (0, K, 3) shape when its arrays arrive empty and flat.
    """
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {sample.get('image_id', '?')}: field 'image' must be (H, W, 3), got {image.shape}")
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
    keypoints = np.asarray(sample["keypoints"], np.float32)
    if keypoints.size == 0 and len(boxes) == 0:
        keypoints = keypoints.reshape(0, num_keypoints or 0, 3)
    elif keypoints.ndim == 2 and len(boxes):  # flat COCO lists, (P, 3K)
        keypoints = keypoints.reshape(len(boxes), -1, 3)
    shape_ok = keypoints.ndim == 3 and keypoints.shape[0] == len(boxes) and keypoints.shape[2] == 3
    if not shape_ok or (len(boxes) and num_keypoints is not None and keypoints.shape[1] != num_keypoints):
        raise ValueError(
            f"sample {sample.get('image_id', '?')}: field 'keypoints' must be (P, K, 3) with P = {len(boxes)} "
            f"boxes, got {keypoints.shape}"
        )
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # arrays handed over by Ray Data are read-only views
        image = image.copy()
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()
    return pixels, {"boxes": torch.from_numpy(boxes), "keypoints": torch.from_numpy(keypoints)}


def collate(samples: list[dict], num_keypoints: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Samples -> (images (B, 3, H, W) float 0..255 zero-padded to a multiple of 32, image_sizes (B, 2) [h, w],
    B target dicts), the training forward's inputs."""
    pairs = [sample_to_target(sample, num_keypoints) for sample in samples]
    images, image_sizes = pad_batch([image for image, _ in pairs])
    return images, image_sizes, [target for _, target in pairs]
