"""ONNX export: one dynamic export of a tiny model, run by onnxruntime on the real photos at two sizes against
PyTorch, through the documented pre-processing against `QueryPose.predict`, and by the onnxruntime-only example
script, which must not import torch.

Tolerances (float32, CPU): the graph's boxes within 0.01 px + 1e-4 x the value (RoiAlign and the convolutions
accumulate in other orders; the largest difference seen is ~0.01 px), keypoints within 0.05 px + 1e-4 x the
value (the random model's SPEGM coordinates pass those differences on through the norm-divided heads to
keypoints up to 200 px away; the largest seen is 0.024 px), sigmas within 1e-4,
scores within 1e-5. The whole pipeline (OpenCV's bilinear resize instead of PyTorch's) within 0.1 px.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from querypose import ModelConfig, build_model
from querypose.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
# With the learning benchmark's switches beyond the paper (grid proposals, SPEGM coordinates, the soft-argmax
# readout with its peak window), so that the graph holds them too.
TINY = ModelConfig(backbone="resnet10t", hidden_dim=32, ffn_dim=64, dynamic_dim=8, tower_channels=32, tower_convs=1,
                   num_queries=5, num_stages=1, part_dim=32, test_short_side=128, test_max_size=192,
                   init_boxes="grid", roi_coordinates="spegm", keypoint_readout="soft_argmax",
                   readout_peak_window=2)  # fmt: skip
OUTPUTS = ("boxes", "keypoints", "keypoint_sigmas", "scores")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import export

    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    weights = save_weights(model, TINY, folder / "model.pt")
    out = folder / "tiny.onnx"
    assert export.main(["--weights", str(weights), "--format", "onnx", "--dynamic", "--out", str(out)]) == 0
    return model, out


def _photos(fixtures_dir: Path) -> list[np.ndarray]:
    return [
        cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((fixtures_dir / "coco/images").iterdir())
    ]


def test_onnxruntime_matches_pytorch_at_two_sizes(exported, fixtures_dir):
    import onnx_predict

    model, path = exported
    session, preprocessing, keypoint_set = onnx_predict.load(path)
    assert keypoint_set == TINY.spec.to_dict() and preprocessing["input_size"] is None
    shapes = set()
    for short_side, max_size in ((128, 192), (224, 320)):
        for rgb in _photos(fixtures_dir):
            pre = {**preprocessing, "short_side": short_side, "max_size": max_size}
            images, image_sizes, _ = onnx_predict.preprocess(rgb, pre)
            shapes.add(images.shape)
            got = session.run(list(OUTPUTS), {"images": images, "image_sizes": image_sizes})
            with torch.no_grad():
                expected = model.poses(torch.from_numpy(images), torch.from_numpy(image_sizes))
            for name, value in zip(OUTPUTS, got, strict=True):
                want = expected[name].numpy()
                assert value.shape == want.shape, name
                if name in ("boxes", "keypoints"):
                    atol = 0.05 if name == "keypoints" else 0.01
                    np.testing.assert_allclose(value, want, rtol=1e-4, atol=atol, err_msg=name)
                else:
                    np.testing.assert_allclose(value, want, rtol=0, atol=1e-4 if name == "keypoint_sigmas" else 1e-5)
    assert {shape[2:] for shape in shapes} == {(128, 192), (224, 320)}


def test_documented_preprocessing_reproduces_predict(exported, fixtures_dir):
    import onnx_predict

    model, path = exported
    session, preprocessing, _ = onnx_predict.load(path)
    for rgb in _photos(fixtures_dir):
        got = onnx_predict.predict(session, preprocessing, rgb)
        with torch.no_grad():
            want = model.predict([torch.from_numpy(rgb).permute(2, 0, 1).float()])[0]
        np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["boxes"], want["boxes"].numpy(), rtol=0, atol=0.1)
        np.testing.assert_allclose(got["keypoints"][..., :2], want["keypoints"][..., :2].numpy(), rtol=0, atol=0.1)
        np.testing.assert_allclose(got["keypoints"][..., 2], want["keypoints"][..., 2].numpy(), rtol=0, atol=1e-4)


def test_onnx_predict_draws_the_photos_without_torch(exported, fixtures_dir, tmp_path):
    _, path = exported
    photos = fixtures_dir / "coco" / "images"
    argv = [
        str(REPO / "experiments/onnx_predict.py"),
        str(path),
        str(photos),
        "--out",
        str(tmp_path),
        "--min-score",
        "0",
    ]
    code = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('torch', 'querypose') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]" and "4 images, 20 poses (coco" in result.stdout
    for original in sorted(photos.iterdir()):
        drawn = cv2.imread(str(tmp_path / original.name))
        assert drawn.shape == cv2.imread(str(original)).shape
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 20 and all(len(r["keypoints"]) == 51 for r in results)
