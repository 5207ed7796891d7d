"""benchmarks/learning.py end to end on a tiny synthetic set: the curve it writes and its time-based lr decay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import learning  # noqa: E402

TINY = [
    "data.synthetic.train_images=6", "data.synthetic.val_images=2", "data.synthetic.image_size=96",
    "data.train_short_sides=[64]", "data.train_max_size=96", "data.crop_resize_sides=[64]", "data.crop_size=[48,64]",
    "model.test_short_side=64", "model.test_max_size=96", "model.backbone=resnet10t", "model.hidden_dim=32",
    "model.ffn_dim=64", "model.dynamic_dim=8", "model.tower_channels=16", "model.num_queries=4",
    "train.batch_size=2", "train.warmup_iters=0",
]  # fmt: skip


def test_learning_decays_the_lr_once_the_budget_fraction_is_trained(tmp_path):
    out = tmp_path / "learning.json"
    args = ["--minutes", "0.1", "--decay-at", "0.5", "--eval-every-iters", "1", "--threads", "1",
            "--synthetic-root", str(tmp_path / "synthetic"), "--json", str(out), *TINY]  # fmt: skip
    assert learning.main(args) == 0
    report = json.loads(out.read_text())
    base_lr = report["config"]["train"]["lr"]
    assert report["config"]["train"]["lr_steps"] == []  # the time milestone replaces the iteration ones
    decay = report["lr_decay"]
    assert decay["minutes"] >= 0.05 and decay["iteration"] >= 1
    curve = report["curve"]
    assert [p["iterations"] for p in curve] == list(range(1, len(curve) + 1))
    for point in curve:  # the lr at a point is that of the step that ended just before it
        expected = base_lr if point["iterations"] <= decay["iteration"] else base_lr * 0.1
        assert point["lr"] == pytest.approx(expected)
    assert curve[-1]["iterations"] > decay["iteration"] and curve[-1]["minutes"] >= 0.1
    assert {"AP", "AP50", "AR"} <= set(curve[-1])


def test_learning_rejects_a_decay_fraction_outside_the_budget(tmp_path, capsys):
    with pytest.raises(SystemExit):
        learning.main(["--decay-at", "1.5", "--synthetic-root", str(tmp_path)])
    assert "--decay-at: a fraction of the budget in [0, 1), got 1.5" in capsys.readouterr().err


def test_learning_scores_and_saves_the_ema_weights_when_asked(tmp_path):
    """--ema: the saved (and evaluated) weights are the moving average, not the last step's weights of the same
    (seeded) run."""
    from querypose.weights import load_weights

    saved = {}
    for name, extra in (("plain", []), ("ema", ["--ema", "0.9"])):
        saved[name] = tmp_path / f"{name}.pt"
        args = ["--iterations", "4", "--eval-every-iters", "4", "--decay-at", "0", "--threads", "1",
                "--synthetic-root", str(tmp_path / "synthetic"), "--save-weights", str(saved[name]),
                "--json", str(tmp_path / f"{name}.json"), *extra, *TINY]  # fmt: skip
        assert learning.main(args) == 0
    assert json.loads((tmp_path / "ema.json").read_text())["ema_decay"] == 0.9
    plain, _ = load_weights(saved["plain"])
    ema, _ = load_weights(saved["ema"])
    assert plain.keys() == ema.keys()
    moved = [k for k in plain if plain[k].is_floating_point() and not torch.equal(plain[k], ema[k])]
    assert any(k.startswith("box_stages.") for k in moved) and any(k.startswith("backbone.") for k in moved)


def test_learning_rejects_an_ema_decay_of_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        learning.main(["--ema", "1", "--synthetic-root", str(tmp_path)])
    assert "--ema: a decay in [0, 1) (0: off), got 1.0" in capsys.readouterr().err
