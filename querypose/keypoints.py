"""Keypoint specifications: COCO-17 and CrowdPose-14.

A spec holds everything that depends on the keypoint set: names, left/right flip pairs, OKS sigmas, the
skeleton used for drawing, and the part division schemes of the paper's Table 2d / Figure 4. One index table
per scheme drives both the split of keypoints into parts and the merge of part outputs back into keypoint
order, so no scheme needs code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PART_SCHEMES = ("rigid7", "per_joint", "head_merged", "limbs5")


@dataclass(frozen=True)
class KeypointSpec:
    name: str
    keypoint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint index pairs
    part_schemes: dict[str, tuple[tuple[int, ...], ...]] = field(hash=False)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def flip_index(self) -> np.ndarray:
        """Permutation p such that a horizontally flipped pose has keypoint k at slot p[k]."""
        index = np.arange(self.num_keypoints)
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        return index

    def parts(self, scheme: str) -> tuple[tuple[int, ...], ...]:
        if scheme not in self.part_schemes:
            raise ValueError(f"unknown part scheme {scheme!r}; allowed: {', '.join(PART_SCHEMES)}")
        return self.part_schemes[scheme]

    def part_order(self, scheme: str) -> np.ndarray:
        """Keypoint indices in part order: concatenating the parts' outputs gives keypoints in this order.

        `outputs[..., inverse_part_order(scheme), :]` puts concatenated part outputs back into keypoint order.
        """
        return np.array([k for part in self.parts(scheme) for k in part], dtype=np.int64)

    def inverse_part_order(self, scheme: str) -> np.ndarray:
        return np.argsort(self.part_order(scheme))

    def mirror_parts(self, scheme: str) -> np.ndarray:
        """For each part, the index of the part that holds its keypoints after a horizontal flip."""
        parts = self.parts(scheme)
        flip = self.flip_index
        by_members = {frozenset(part): i for i, part in enumerate(parts)}
        return np.array([by_members[frozenset(int(flip[k]) for k in part)] for part in parts], dtype=np.int64)

    def flip_keypoints(self, keypoints: np.ndarray, image_width: float) -> np.ndarray:
        """Mirror poses (..., K, 3) of an image `image_width` pixels wide: x -> width - x, left <-> right."""
        flipped = keypoints[..., self.flip_index, :].copy()
        flipped[..., 0] = image_width - flipped[..., 0]
        return flipped


def _singletons(indices) -> tuple[tuple[int, ...], ...]:
    return tuple((k,) for k in indices)


COCO = KeypointSpec(
    name="coco",
    keypoint_names=(
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ),  # fmt: skip
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    sigmas=(
        0.026,
        0.025,
        0.025,
        0.035,
        0.035,
        0.079,
        0.079,
        0.072,
        0.072,
        0.062,
        0.062,
        0.107,
        0.107,
        0.087,
        0.087,
        0.089,
        0.089,
    ),  # fmt: skip
    skeleton=(
        (15, 13),
        (13, 11),
        (16, 14),
        (14, 12),
        (11, 12),
        (5, 11),
        (6, 12),
        (5, 6),
        (5, 7),
        (6, 8),
        (7, 9),
        (8, 10),
        (1, 2),
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 4),
        (3, 5),
        (4, 6),
    ),  # fmt: skip
    part_schemes={
        "rigid7": ((0, 1, 2, 3, 4), (5, 6), (7, 9), (8, 10), (11, 12), (13, 15), (14, 16)),
        "per_joint": _singletons(range(17)),
        "head_merged": ((0, 1, 2, 3, 4),) + _singletons(range(5, 17)),
        "limbs5": ((0, 1, 2, 3, 4), (5, 7, 9), (6, 8, 10), (11, 13, 15), (12, 14, 16)),
    },
)

CROWDPOSE = KeypointSpec(
    name="crowdpose",
    keypoint_names=(
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
        "head",
        "neck",
    ),  # fmt: skip
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
    # CrowdPose's own skeleton; its annotation files carry COCO's 17-keypoint one, which is wrong here.
    skeleton=(
        (12, 13),
        (13, 0),
        (13, 1),
        (0, 2),
        (2, 4),
        (1, 3),
        (3, 5),
        (0, 6),
        (1, 7),
        (6, 7),
        (6, 8),
        (8, 10),
        (7, 9),
        (9, 11),
    ),  # fmt: skip
    part_schemes={
        "rigid7": ((12, 13), (0, 1), (2, 4), (3, 5), (6, 7), (8, 10), (9, 11)),
        "per_joint": _singletons(range(14)),
        "head_merged": ((12, 13),) + _singletons(range(12)),
        "limbs5": ((12, 13), (0, 2, 4), (1, 3, 5), (6, 8, 10), (7, 9, 11)),
    },
)

SPECS = {"coco": COCO, "crowdpose": CROWDPOSE}


def get_spec(dataset: str) -> KeypointSpec:
    if dataset not in SPECS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(SPECS)}")
    return SPECS[dataset]
