import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from querypose import ModelConfig, build_model
from querypose.weights import load_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = """
model:
  backbone: resnet10t
  hidden_dim: 32
  ffn_dim: 64
  dynamic_dim: 8
  tower_channels: 32
  tower_convs: 1
  num_queries: 5
  num_stages: 1
  part_dim: 32
  test_short_side: 128
  test_max_size: 192
"""


def _run(*args):
    return subprocess.run(
        [sys.executable, "experiments/predict.py", *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


def test_predict_on_real_photos_writes_pictures_and_coco_results(tmp_path, fixtures_dir):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    photos = fixtures_dir / "coco" / "images"
    result = _run(photos, "--config", config, "--out", tmp_path / "out", "--min-score", "0")
    assert result.returncode == 0, result.stderr
    assert "randomly initialised" in result.stderr
    pictures = sorted((tmp_path / "out").glob("*.jpg"))
    assert [p.stem for p in pictures] == sorted(p.stem for p in photos.glob("*.jpg"))
    for picture, original in zip(pictures, sorted(photos.glob("*.jpg")), strict=True):
        assert cv2.imread(str(picture)).shape == cv2.imread(str(original)).shape
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 4 * 5
    # the results load into pycocotools against a GT built for these image ids
    from pycocotools.coco import COCO

    images = json.loads((tmp_path / "out" / "inputs.json").read_text())
    gt = COCO()
    gt.dataset = {
        "images": [{"id": r["image_id"], "width": 640, "height": 480} for r in images],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}],
    }
    gt.createIndex()
    dt = gt.loadRes(results)
    assert len(dt.getAnnIds()) == 20


def test_predict_reads_a_video_and_saved_weights(tmp_path):
    cfg = ModelConfig(backbone="resnet10t", hidden_dim=32, ffn_dim=64, dynamic_dim=8, tower_channels=32, tower_convs=1,
                      num_queries=3, num_stages=1, part_dim=32, test_short_side=64, test_max_size=96)  # fmt: skip
    weights = save_weights(build_model(cfg), cfg, tmp_path / "model.pt")
    state, saved = load_weights(weights)
    assert saved == cfg and "init_boxes.weight" in state
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (80, 60))
    for i in range(3):
        writer.write(np.full((60, 80, 3), 40 * i, np.uint8))
    writer.release()
    result = _run(video, "--weights", weights, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "3 frames, 9 poses" in result.stdout
    assert (tmp_path / "out" / "clip.mp4").stat().st_size > 0


def test_bad_inputs_are_named(tmp_path):
    result = _run(tmp_path / "missing.jpg", "--out", tmp_path / "out")
    assert result.returncode != 0 and "missing.jpg does not exist" in result.stderr
    (tmp_path / "junk.pt").write_text("nope")
    with pytest.raises(ValueError, match="junk.pt could not be loaded"):
        load_weights(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_weights(tmp_path / "list.pt")
