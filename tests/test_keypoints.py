import numpy as np
import pytest

from querypose.keypoints import COCO, CROWDPOSE, PART_SCHEMES, get_spec

SPECS = [COCO, CROWDPOSE]
IDS = ["coco", "crowdpose"]
EXPECTED_PARTS = {"rigid7": 7, "per_joint": None, "head_merged": 13, "limbs5": 5}


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
