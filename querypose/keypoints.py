"""Keypoint sets: what depends on which keypoints a model predicts.

A `KeypointSpec` holds the names, left/right flip pairs, OKS sigmas, the skeleton used for drawing, the part
division schemes of the paper's Table 2d / Figure 4 and the evaluation protocol. One index table per scheme
drives both the split of keypoints into parts and the merge of part outputs back into keypoint order, so no
scheme needs code of its own.

Every set comes from the same mapping (a YAML file), keyed by keypoint *names*:

    name: quadruped                    # default: the annotation file's category name
    annotations: train.json            # a COCO-format file whose keypoint category gives `keypoints` and `skeleton`
    keypoints: [nose, left_eye, ...]   # or list them here (must equal the file's when both are given)
    skeleton: [[nose, left_eye], ...]  # optional: replaces the file's (CrowdPose files carry COCO's)
    flip_pairs: [[left_eye, right_eye], ...]  # optional: inferred from left/right name tokens
    sigmas: {nose: 0.026, ...}         # required (OKS); or a list in keypoint order
    parts: {limbs6: [[nose, left_eye], ...], ...}  # each scheme covers every keypoint once; per_joint is implicit
    evaluation: coco                   # coco (pycocotools) or crowdpose (xtcocotools keypoints_crowd)

The built-in COCO-17 and CrowdPose-14 sets are two such files (`querypose/keypoint_sets/`). A resolved spec
always serialises to the complete mapping (`to_dict`), which is what model configs, weights files, shard
manifests and exported ONNX files carry.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BUILTIN_SETS = ("coco", "crowdpose")
BUILTIN_FOLDER = Path(__file__).parent / "keypoint_sets"
PART_SCHEMES = ("rigid7", "per_joint", "head_merged", "limbs5")  # the paper's schemes of the person sets
EVALUATION_PROTOCOLS = ("coco", "crowdpose")
SPEC_KEYS = ("name", "annotations", "keypoints", "skeleton", "flip_pairs", "sigmas", "parts", "evaluation")


class KeypointSetError(ValueError):
    """A keypoint-set file or mapping is malformed; the message names the file (or config key) and the field."""


@dataclass(frozen=True)
class KeypointSpec:
    name: str
    keypoint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint index pairs
    part_schemes: dict[str, tuple[tuple[int, ...], ...]] = field(hash=False)
    evaluation: str = "coco"

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
            raise ValueError(
                f"unknown part scheme {scheme!r} for keypoint set {self.name!r}; allowed: {', '.join(self.part_schemes)}"
            )
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

    # --- the mapping form -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The complete mapping, by names: `KeypointSpec.from_dict(spec.to_dict()) == spec`."""
        names = self.keypoint_names
        return {
            "name": self.name,
            "keypoints": list(names),
            "skeleton": [[names[a], names[b]] for a, b in self.skeleton],
            "flip_pairs": [[names[a], names[b]] for a, b in self.flip_pairs],
            "sigmas": list(self.sigmas),
            "parts": {
                scheme: [[names[k] for k in part] for part in parts] for scheme, parts in self.part_schemes.items()
            },
            "evaluation": self.evaluation,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "keypoint set", category: dict | None = None) -> KeypointSpec:
        """Validate a mapping (module docstring) into a spec; `category` is the annotation file's keypoint category
        when there is one (its `keypoints` and 1-based `skeleton`). Errors name `where` and the field."""
        return _build(data, where, category)

    def summary(self) -> str:
        """A few lines for people: what a converted or trained set is made of, flip pairs included."""
        names = self.keypoint_names
        paired = {k for pair in self.flip_pairs for k in pair}
        lines = [
            f"keypoint set {self.name!r}: {self.num_keypoints} keypoints, {len(self.skeleton)} skeleton edges, "
            f"{self.evaluation} evaluation",
            "  flip pairs: " + (", ".join(f"{names[a]}<->{names[b]}" for a, b in self.flip_pairs) or "none"),
            "  no mirror: " + (", ".join(n for k, n in enumerate(names) if k not in paired) or "none"),
            "  part schemes: " + ", ".join(f"{s} ({len(p)} parts)" for s, p in self.part_schemes.items()),
        ]
        return "\n".join(lines)


# --- building and validating -------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> KeypointSetError:
    return KeypointSetError(f"{where}: {message}")


def _names_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(where, f"{key}: expected a non-empty list of keypoint names, got {value!r}")
    seen: set[str] = set()
    for name in value:
        if name in seen:
            raise _fail(where, f"{key}: duplicate keypoint name {name!r}")
        seen.add(name)
    return list(value)


def _index_pairs(value: Any, where: str, key: str, index: dict[str, int]) -> list[tuple[int, int]]:
    """A list of [name, name] pairs -> index pairs; every name must be a keypoint of the set."""
    if not isinstance(value, list | tuple):
        raise _fail(where, f"{key}: expected a list of [name, name] pairs, got {value!r}")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _fail(where, f"{key}[{i}]: expected a pair [name, name], got {pair!r}")
        for name in pair:
            if name not in index:
                raise _fail(where, f"{key}[{i}]: unknown keypoint {name!r}")
        if pair[0] == pair[1]:
            raise _fail(where, f"{key}[{i}]: a keypoint cannot pair with itself ({pair[0]!r})")
        pairs.append((index[pair[0]], index[pair[1]]))
    return pairs


def _mirror_name(name: str) -> str | None:
    """left_front_paw -> right_front_paw (swapping the whole `left` / `right` token); None without one."""
    tokens = name.split("_")
    swapped = [{"left": "right", "right": "left"}.get(t, t) for t in tokens]
    return "_".join(swapped) if swapped != tokens else None


def infer_flip_pairs(names: list[str], where: str) -> list[tuple[int, int]]:
    """(left, right) index pairs from names whose `left` / `right` token swaps into another keypoint's name."""
    index = {name: k for k, name in enumerate(names)}
    pairs = []
    for k, name in enumerate(names):
        mirror = _mirror_name(name)
        if mirror is None:
            continue
        if mirror not in index:
            raise _fail(
                where,
                f"flip_pairs: not given, and {name!r} has no {mirror!r} to pair with: list the pairs "
                "(flip_pairs: [] when no keypoint swaps under a horizontal flip)",
            )
        if "left" in name.split("_"):
            pairs.append((k, index[mirror]))
    return pairs


def _sigmas(value: Any, where: str, names: list[str]) -> tuple[float, ...]:
    if value is None:
        raise _fail(where, "sigmas: missing (required for OKS evaluation: one per keypoint, by name or in order)")
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise _fail(where, f"sigmas.{unknown[0]}: unknown keypoint")
        absent = [n for n in names if n not in value]
        if absent:
            raise _fail(where, f"sigmas: no value for keypoint {absent[0]!r}")
        values, keys = [value[n] for n in names], [f"sigmas.{n}" for n in names]
    elif isinstance(value, list | tuple):
        if len(value) != len(names):
            raise _fail(where, f"sigmas: {len(value)} values for {len(names)} keypoints")
        values, keys = list(value), [f"sigmas[{i}]" for i in range(len(names))]
    else:
        raise _fail(where, f"sigmas: expected a mapping of keypoint name to sigma or a list, got {value!r}")
    for key, sigma in zip(keys, values, strict=True):
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
            raise _fail(where, f"{key}: expected a positive number, got {sigma!r}")
    return tuple(float(s) for s in values)


def _part_schemes(value: Any, where: str, names: list[str]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Scheme name -> parts as index tuples; each scheme holds every keypoint exactly once. per_joint (each keypoint
    its own part) is added when the mapping does not define it."""
    index = {name: k for k, name in enumerate(names)}
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise _fail(where, f"parts: expected a mapping of scheme name to a list of parts, got {value!r}")
    schemes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for scheme, parts in value.items():
        key = f"parts.{scheme}"
        if not isinstance(parts, list | tuple) or not parts:
            raise _fail(where, f"{key}: expected a non-empty list of parts (lists of keypoint names)")
        owner: dict[str, int] = {}
        built = []
        for i, part in enumerate(parts):
            if not isinstance(part, list | tuple) or not part:
                raise _fail(where, f"{key}[{i}]: expected a non-empty list of keypoint names, got {part!r}")
            for name in part:
                if name not in index:
                    raise _fail(where, f"{key}[{i}]: unknown keypoint {name!r}")
                if name in owner:
                    raise _fail(where, f"{key}[{i}]: keypoint {name!r} is already in part {owner[name]}")
                owner[name] = i
            built.append(tuple(index[name] for name in part))
        missing = [name for name in names if name not in owner]
        if missing:
            raise _fail(where, f"{key}: keypoints in no part: {', '.join(missing)} (each must be in exactly one)")
        schemes[str(scheme)] = tuple(built)
    schemes.setdefault("per_joint", tuple((k,) for k in range(len(names))))
    return schemes


def _category_skeleton(category: dict, where: str, names: list[str]) -> list[tuple[int, int]]:
    """An annotation file's category skeleton (1-based index pairs, as COCO files have them) -> 0-based pairs."""
    skeleton = []
    for i, edge in enumerate(category.get("skeleton") or []):
        if not (isinstance(edge, list | tuple) and len(edge) == 2 and all(isinstance(v, int) for v in edge)):
            raise _fail(where, f"categories.skeleton[{i}]: expected a pair of 1-based keypoint indices, got {edge!r}")
        for v in edge:
            if not 1 <= v <= len(names):
                raise _fail(
                    where,
                    f"categories.skeleton[{i}]: keypoint {v} is out of range 1..{len(names)} (skeletons are 1-based); "
                    "give the set's own `skeleton` in its YAML",
                )
        skeleton.append((edge[0] - 1, edge[1] - 1))
    return skeleton


def _build(data: Any, where: str, category: dict | None) -> KeypointSpec:
    if not isinstance(data, dict):
        raise _fail(where, f"expected a mapping of {', '.join(SPEC_KEYS)}, got {type(data).__name__}")
    unknown = [key for key in data if key not in SPEC_KEYS]
    if unknown:
        raise _fail(where, f"{unknown[0]}: unknown key; allowed keys: {', '.join(SPEC_KEYS)}")
    file_names = None if category is None else _names_list(category.get("keypoints"), where, "categories.keypoints")
    if data.get("keypoints") is not None:
        names = _names_list(data["keypoints"], where, "keypoints")
        if file_names is not None and names != file_names:
            raise _fail(where, f"keypoints: {names} differ from the annotation file's category keypoints {file_names}")
    elif file_names is not None:
        names = file_names
    else:
        raise _fail(where, "keypoints: missing: list the names, or name a COCO-format file in `annotations`")
    index = {name: k for k, name in enumerate(names)}

    name = data.get("name") or (category or {}).get("name")
    if not isinstance(name, str) or not name:
        raise _fail(where, f"name: expected the set's name (a non-empty string), got {name!r}")
    evaluation = data.get("evaluation", "coco")
    if evaluation not in EVALUATION_PROTOCOLS:
        raise _fail(
            where, f"evaluation: {evaluation!r} is not allowed; allowed values: {', '.join(EVALUATION_PROTOCOLS)}"
        )
    if data.get("skeleton") is not None:  # replaces the file's, which is then not read
        skeleton = _index_pairs(data["skeleton"], where, "skeleton", index)
    else:
        skeleton = [] if category is None else _category_skeleton(category, where, names)
    if data.get("flip_pairs") is not None:
        flip_pairs = _index_pairs(data["flip_pairs"], where, "flip_pairs", index)
        seen: dict[int, int] = {}
        for i, pair in enumerate(flip_pairs):
            for k in pair:
                if k in seen:
                    raise _fail(where, f"flip_pairs[{i}]: keypoint {names[k]!r} is already in pair {seen[k]}")
                seen[k] = i
    else:
        flip_pairs = infer_flip_pairs(names, where)
    return KeypointSpec(
        name=name,
        keypoint_names=tuple(names),
        flip_pairs=tuple(flip_pairs),
        sigmas=_sigmas(data.get("sigmas"), where, names),
        skeleton=tuple(skeleton),
        part_schemes=_part_schemes(data.get("parts"), where, names),
        evaluation=evaluation,
    )


# --- files -------------------------------------------------------------------------------------------------------


def keypoint_category(annotations: str | Path) -> dict:
    """The one category with keypoint names in a COCO-format annotation file (QueryPose is single-class)."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise KeypointSetError(f"{path}: not valid JSON: {error}") from None
    categories = [c for c in content.get("categories") or [] if isinstance(c, dict) and c.get("keypoints")]
    if len(categories) != 1:
        raise KeypointSetError(
            f"{path}: categories: {len(categories)} categories list keypoint names; QueryPose needs exactly one "
            "(it detects one class: merge them into one category)"
        )
    return categories[0]


def load_keypoint_set(path: str | Path, annotations: str | Path | None = None) -> KeypointSpec:
    """A spec from a keypoint-set YAML, or from a shard set's manifest.json that recorded one at conversion.

    The keypoint names and skeleton come from `annotations` when given (convert's --annotations), else from the
    file the YAML names in `annotations` (relative to the YAML), else from the YAML itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keypoint set file {path} does not exist")
    if path.suffix == ".json":
        manifest = json.loads(path.read_text())
        recorded = manifest.get("keypoints", {}).get("spec") if isinstance(manifest, dict) else None
        if not isinstance(recorded, dict):
            raise KeypointSetError(f"{path}: keypoints.spec: missing (not a shard manifest written by convert)")
        return _build(recorded, str(path), None)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise KeypointSetError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise _fail(str(path), f"expected a mapping of {', '.join(SPEC_KEYS)}")
    source = annotations if annotations is not None else data.get("annotations")
    if source is not None and not Path(source).is_absolute() and annotations is None:
        source = path.parent / source
    category = keypoint_category(source) if source is not None else None
    return _build(data, str(path), category)


@functools.cache
def get_spec(dataset: str) -> KeypointSpec:
    """A built-in keypoint set by name, read from its file in querypose/keypoint_sets/."""
    if dataset not in BUILTIN_SETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; allowed: {', '.join(BUILTIN_SETS)} (any other keypoint set: "
            "model.dataset=custom with model.keypoints)"
        )
    return load_keypoint_set(BUILTIN_FOLDER / f"{dataset}.yaml")


COCO = get_spec("coco")
CROWDPOSE = get_spec("crowdpose")
