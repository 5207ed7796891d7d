from pathlib import Path

import numpy as np
import pytest
import yaml

from querypose.keypoints import COCO, CROWDPOSE, PART_SCHEMES, KeypointSpec, get_spec, load_keypoint_set

SPECS = [COCO, CROWDPOSE]
IDS = ["coco", "crowdpose"]
EXPECTED_PARTS = {"rigid7": 7, "per_joint": None, "head_merged": 13, "limbs5": 5}
QUADRUPED_YAML = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "keypoints" / "quadruped.yaml"


def _singletons(indices) -> tuple[tuple[int, ...], ...]:
    return tuple((k,) for k in indices)


# The tables querypose/keypoints.py held as Python literals before keypoint sets came from files.
FORMER = {
    "coco": KeypointSpec(
        name="coco",
        keypoint_names=("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                        "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                        "right_knee", "left_ankle", "right_ankle"),
        flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
        sigmas=(0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
                0.087, 0.089, 0.089),
        skeleton=((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                  (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)),
        part_schemes={
            "rigid7": ((0, 1, 2, 3, 4), (5, 6), (7, 9), (8, 10), (11, 12), (13, 15), (14, 16)),
            "per_joint": _singletons(range(17)),
            "head_merged": ((0, 1, 2, 3, 4),) + _singletons(range(5, 17)),
            "limbs5": ((0, 1, 2, 3, 4), (5, 7, 9), (6, 8, 10), (11, 13, 15), (12, 14, 16)),
        },
        evaluation="coco",
    ),
    "crowdpose": KeypointSpec(
        name="crowdpose",
        keypoint_names=("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                        "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head",
                        "neck"),
        flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
        sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
        skeleton=((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (0, 6), (1, 7), (6, 7), (6, 8),
                  (8, 10), (7, 9), (9, 11)),
        part_schemes={
            "rigid7": ((12, 13), (0, 1), (2, 4), (3, 5), (6, 7), (8, 10), (9, 11)),
            "per_joint": _singletons(range(14)),
            "head_merged": ((12, 13),) + _singletons(range(12)),
            "limbs5": ((12, 13), (0, 2, 4), (1, 3, 5), (6, 8, 10), (7, 9, 11)),
        },
        evaluation="crowdpose",
    ),
}  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("scheme", PART_SCHEMES)
def test_every_scheme_covers_each_keypoint_once(spec, scheme):
    members = [k for part in spec.parts(scheme) for k in part]
    assert sorted(members) == list(range(spec.num_keypoints))
    expected = EXPECTED_PARTS[scheme] or spec.num_keypoints
    assert len(spec.parts(scheme)) == expected


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_flipping_twice_is_the_identity(spec):
    rng = np.random.default_rng(0)
    poses = rng.uniform(0, 100, size=(3, spec.num_keypoints, 3))
    once = spec.flip_keypoints(poses, 100.0)
    assert not np.allclose(once, poses)
    np.testing.assert_allclose(spec.flip_keypoints(once, 100.0), poses)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_flip_swaps_left_and_right_names(spec):
    for k, name in enumerate(spec.keypoint_names):
        mirror = spec.keypoint_names[spec.flip_index[k]]
        assert mirror == name.replace("left", "#").replace("right", "left").replace("#", "right")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("scheme", PART_SCHEMES)
def test_flip_maps_each_part_onto_its_mirror(spec, scheme):
    parts = spec.parts(scheme)
    mirror = spec.mirror_parts(scheme)
    np.testing.assert_array_equal(mirror[mirror], np.arange(len(parts)))  # an involution
    for i, part in enumerate(parts):
        flipped = sorted(int(spec.flip_index[k]) for k in part)
        assert flipped == sorted(parts[mirror[i]])
        names = [spec.keypoint_names[k] for k in part]
        if all(n.startswith("left_") for n in names):
            assert all(spec.keypoint_names[k].startswith("right_") for k in parts[mirror[i]])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("scheme", PART_SCHEMES)
def test_part_order_round_trip(spec, scheme):
    values = np.arange(spec.num_keypoints) * 10
    in_part_order = values[spec.part_order(scheme)]
    np.testing.assert_array_equal(in_part_order[spec.inverse_part_order(scheme)], values)


def test_specs_have_consistent_tables():
    for spec in SPECS:
        assert len(spec.sigmas) == spec.num_keypoints
        assert all(0 <= a < spec.num_keypoints and 0 <= b < spec.num_keypoints for a, b in spec.skeleton)
    coco_names = set(COCO.keypoint_names)
    # CrowdPose's skeleton links its own head and neck: it is not COCO's copied over.
    assert (12, 13) in CROWDPOSE.skeleton and {"head", "neck"} - coco_names == {"head", "neck"}
    assert set(CROWDPOSE.skeleton) != set(COCO.skeleton)
    assert CROWDPOSE.sigmas[:2] == (0.079, 0.079) and COCO.sigmas[0] == 0.026


def test_unknown_names_list_the_allowed_values():
    with pytest.raises(ValueError, match="unknown dataset 'mpii'; allowed: coco, crowdpose"):
        get_spec("mpii")
    with pytest.raises(ValueError, match="allowed: rigid7, per_joint, head_merged, limbs5"):
        COCO.parts("ten_parts")


@pytest.mark.parametrize("name", IDS)
def test_builtin_sets_from_their_files_equal_the_former_tables(name):
    assert get_spec(name) == FORMER[name]
    assert KeypointSpec.from_dict(get_spec(name).to_dict()) == FORMER[name]  # the mapping form round-trips


@pytest.mark.parametrize(("name", "relative"), [("coco", "coco/person_keypoints.json"),
                                                ("crowdpose", "crowdpose/crowdpose.json")])  # fmt: skip
def test_sets_from_annotation_files_and_a_small_yaml_equal_the_builtins(fixtures_dir, tmp_path, name, relative):
    """Names and skeleton from the file's category, flip pairs inferred from the names; the YAML holds the sigmas
    and parts (and CrowdPose's own skeleton: its files carry COCO's, which a set of 14 keypoints refuses)."""
    extras = get_spec(name).to_dict()
    del extras["keypoints"], extras["flip_pairs"]
    if name == "coco":
        del extras["skeleton"]
    extras["sigmas"] = dict(zip(get_spec(name).keypoint_names, get_spec(name).sigmas, strict=True))
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(extras))
    assert load_keypoint_set(path, fixtures_dir / relative) == FORMER[name]
    if name == "crowdpose":
        del extras["skeleton"]
        path.write_text(yaml.safe_dump(extras))
        with pytest.raises(ValueError, match=r"categories.skeleton\[0\]: keypoint 16 is out of range 1..14"):
            load_keypoint_set(path, fixtures_dir / relative)


def test_quadruped_flip_pairs_are_inferred_from_its_names():
    spec = load_keypoint_set(QUADRUPED_YAML)
    names = spec.keypoint_names
    assert [(names[a], names[b]) for a, b in spec.flip_pairs][:3] == [
        ("left_eye", "right_eye"), ("left_ear", "right_ear"), ("left_shoulder", "right_shoulder")]  # fmt: skip
    assert len(spec.flip_pairs) == 8 and {names[k] for k in range(20) if spec.flip_index[k] == k} == {
        "nose", "neck", "tail_base", "tail_tip"}  # fmt: skip
    assert list(spec.part_schemes) == ["limbs6", "per_joint"]  # per_joint comes with every set
    mirror = spec.mirror_parts("limbs6")
    assert mirror.tolist() == [0, 1, 3, 2, 5, 4]  # left legs <-> right legs


SMALL = {
    "name": "critter",
    "keypoints": ["nose", "left_eye", "right_eye", "left_paw", "right_paw"],
    "sigmas": {"nose": 0.03, "left_eye": 0.02, "right_eye": 0.02, "left_paw": 0.08, "right_paw": 0.08},
    "parts": {"two": [["nose", "left_eye", "right_eye"], ["left_paw", "right_paw"]]},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parts": {"two": [["nose", "left_eye"], ["left_eye", "right_eye", "left_paw", "right_paw"]]}},
         "parts.two[1]: keypoint 'left_eye' is already in part 0"),
        ({"parts": {"two": [["nose", "left_eye", "right_eye"], ["left_paw"]]}},
         "parts.two: keypoints in no part: right_paw"),
        ({"flip_pairs": [["left_eye", "right_eye"], ["left_paw", "right_hand"]]},
         "flip_pairs[1]: unknown keypoint 'right_hand'"),
        ({"sigmas": None}, "sigmas: missing (required for OKS evaluation"),
        ({"sigmas": [0.1, 0.1]}, "sigmas: 2 values for 5 keypoints"),
        ({"keypoints": ["nose", "left_eye", "right_eye", "left_paw", "right_foot"]},
         "has no 'right_paw' to pair with"),
        ({"skeleton": [["nose", "tail"]]}, "skeleton[0]: unknown keypoint 'tail'"),
        ({"evaluation": "mpii"}, "evaluation: 'mpii' is not allowed; allowed values: coco, crowdpose"),
        ({"colour": "red"}, "colour: unknown key"),
    ],
)  # fmt: skip
def test_bad_keypoint_sets_name_the_file_and_field(tmp_path, change, message):
    path = tmp_path / "keypoints.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in {**SMALL, **change}.items() if value is not None}))
    with pytest.raises(ValueError) as error:
        load_keypoint_set(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
