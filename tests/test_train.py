"""Ray Train end to end on a tiny synthetic set: DDP over gloo, MLflow tracking, checkpoints, faults, resume,
and the one-off eval job reproducing the training loop's own evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from querypose_platform.config import load_config
from querypose_platform.shards import convert, ensure_synthetic_shards
from querypose_platform.trainer import fit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "experiments"))

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.ffn_dim=64", "model.num_heads=4",
    "model.dynamic_dim=8", "model.tower_channels=32", "model.tower_convs=1", "model.part_dim=32",
    "model.num_queries=6", "model.num_stages=2", "model.test_short_side=96", "model.test_max_size=128",
    "data.train_short_sides=[96]", "data.train_max_size=128", "data.crop_resize_sides=[96]",
    "data.crop_size=[64,96]", "train.lr=1e-3", "train.warmup_iters=2", "train.lr_steps=[]", "train.log_every=1",
    "tracking.system_metrics=false", "model.backbone_weights=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 train / 4 val synthetic images of 96 px, converted to shards once for the module."""
    root = tmp_path_factory.mktemp("shards")
    cfg = load_config(
        None, [*TINY, f"data.root={root}", "data.synthetic={train_images: 8, val_images: 4, image_size: 96}"]
    )
    ensure_synthetic_shards(cfg)
    return root


def tiny_config(tmp_path: Path, data_root: Path, *overrides: str):
    return load_config(None, [
        *TINY, f"data.root={data_root}", f"run.storage_path={tmp_path / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", f"tracking.artifact_location={tmp_path / 'artifacts'}",
        *overrides,
    ])  # fmt: skip


def runs_of(cfg) -> list:
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def steps(cfg, run_id: str, metric: str) -> list[int]:
    return [point.step for point in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, metric)]


@pytest.fixture(scope="module")
def two_worker_run(ray_local, shards, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two_workers")
    cfg = tiny_config(
        tmp_path, shards, "scaling.num_workers=2", "train.batch_size=2", "train.max_iters=4",
        "train.checkpoint_every=2", "train.eval_every=4", "run.name=two",
    )  # fmt: skip
    return cfg, fit(cfg)


def test_two_workers_train_checkpoint_and_log_one_mlflow_run(two_worker_run):
    cfg, outcome = two_worker_run
    assert outcome.metrics["iteration"] == 4
    assert 0.0 <= outcome.metrics["AP"] <= 1.0
    checkpoint = Path(outcome.checkpoint_path)
    assert (checkpoint / "state.pt").is_file() and (checkpoint / "config.yaml").is_file()
    # both ranks wrote their data provenance into the merged checkpoint; their images are disjoint
    rank0 = set(json.loads((checkpoint / "data" / "rank0.json").read_text())["image_ids"])
    rank1 = set(json.loads((checkpoint / "data" / "rank1.json").read_text())["image_ids"])
    assert rank0 and rank1 and not rank0 & rank1

    runs = runs_of(cfg)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == outcome.run_id and run.info.status == "FINISHED"
    assert run.data.params["model.part_dim"] == "32" and run.data.params["scaling.num_workers"] == "2"
    assert steps(cfg, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    assert steps(cfg, run.info.run_id, "val/AP") == [4]
    for metric in (
        "train/lr",
        "train/images_per_s",
        "train/data_wait_share",
        "train/dropped_rows",
        "train/loss_rle_s1",
    ):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["train/dropped_rows"] == 0
    artifacts = MlflowClient(cfg.tracking.uri)
    listed = {
        a.path
        for folder in ("config", "model", "eval", "plots")
        for a in artifacts.list_artifacts(run.info.run_id, folder)
    }
    assert {"config/resolved.yaml", "model/model.pt", "model/config.yaml", "plots/curves.png",
            "plots/spegm_attention.png", "eval/metrics_0000004.json", "eval/predictions_0000004.json"} <= listed  # fmt: skip


def test_evaluate_job_reproduces_the_training_eval(two_worker_run, tmp_path):
    import evaluate

    cfg, outcome = two_worker_run
    tracking = [f"tracking.uri={cfg.tracking.uri}", f"tracking.artifact_location={cfg.tracking.artifact_location}"]
    code = evaluate.main(["--run-id", outcome.run_id, "--data", cfg.data.root, "--out", str(tmp_path), *tracking])
    assert code == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    client = MlflowClient(cfg.tracking.uri)
    trained = client.get_run(outcome.run_id).data.metrics
    for name, value in report["metrics"].items():
        assert value == pytest.approx(trained[f"val/{name}"], abs=1e-9), name
    # the same poses, image by image: the eval job and the training loop share preprocessing and weights
    folder = client.download_artifacts(outcome.run_id, "eval/predictions_0000004.json", str(tmp_path / "dl"))
    expected = sorted(json.loads(Path(folder).read_text()), key=lambda r: (r["image_id"], -r["score"]))
    actual = sorted(json.loads((tmp_path / "predictions.json").read_text()), key=lambda r: (r["image_id"], -r["score"]))
    assert len(actual) == len(expected) == 4 * 6
    for got, want in zip(actual, expected, strict=True):
        assert got["image_id"] == want["image_id"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert got["keypoints"] == pytest.approx(want["keypoints"], abs=0.05)
    evals = [r for r in runs_of(cfg) if r.data.tags.get("querypose.source_run") == outcome.run_id]
    assert len(evals) == 1 and evals[0].data.metrics["val/AP"] == pytest.approx(report["metrics"]["AP"])


@pytest.fixture(scope="module")
def identical_images(tmp_path_factory) -> Path:
    """One synthetic image repeated under 4 ids: every split of a batch over workers sees the same pixels."""
    from querypose.synthetic import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("identical")
    gt = write_synthetic_dataset(folder / "raw", num_images=1, dataset="coco", seed=3, image_size=96)
    content = json.loads(gt.read_text())
    image, people = content["images"][0], [a for a in content["annotations"]]
    content["images"] = [{**image, "id": i + 1} for i in range(4)]
    content["annotations"] = [
        {**person, "id": 100 * (i + 1) + j, "image_id": i + 1} for i in range(4) for j, person in enumerate(people)
    ]
    gt.write_text(json.dumps(content))
    for split in ("train", "val"):
        convert("coco", gt, gt.parent / "images", str(folder / "shards" / split))
    return folder / "shards"


def test_one_worker_batch_2b_equals_two_workers_batch_b(ray_local, identical_images, tmp_path):
    common = ["train.max_iters=2", "train.checkpoint_every=2", "train.eval_every=100", "data.flip_prob=0",
              "data.crop_prob=0"]  # fmt: skip
    one = fit(tiny_config(tmp_path / "one", identical_images, *common, "scaling.num_workers=1", "train.batch_size=2"))
    two = fit(tiny_config(tmp_path / "two", identical_images, *common, "scaling.num_workers=2", "train.batch_size=2"))
    # the loss after the first step: same data, same init, shared normaliser and DDP's gradient mean
    assert one.metrics["iteration"] == two.metrics["iteration"] == 2
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4, abs=1e-4)
    for name in ("loss_cls_s1", "loss_giou_s1", "loss_rle_s1"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], rel=1e-4, abs=1e-4), name


def test_killed_worker_is_retried_from_its_checkpoint_into_the_same_run(ray_local, shards, tmp_path):
    cfg = tiny_config(
        tmp_path, shards, "train.batch_size=1", "train.max_iters=4", "train.checkpoint_every=2",
        "train.eval_every=100", "train.fail_at_iter=3", "run.max_failures=1", "run.name=fault",
    )  # fmt: skip
    outcome = fit(cfg)
    assert outcome.metrics["iteration"] == 4
    runs = runs_of(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # iteration 3 died before it was logged; the retry resumed at 2 (not 0) and logged 3 and 4 once each
    assert runs[0].data.tags["querypose.resumed_from_iteration"] == "2"
    assert steps(cfg, outcome.run_id, "train/loss") == [1, 2, 3, 4]


def test_rerunning_a_stopped_job_continues_from_its_last_checkpoint(ray_local, shards, tmp_path):
    overrides = ["train.batch_size=1", "train.max_iters=4", "train.checkpoint_every=2", "train.eval_every=100",
                 "train.fail_at_iter=3", "run.max_failures=0", "run.name=stopped"]  # fmt: skip
    cfg = tiny_config(tmp_path, shards, *overrides)
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death in its own error types
        fit(cfg)
    (failed,) = runs_of(cfg)
    assert failed.info.status == "FAILED" and "querypose.error" in failed.data.tags

    outcome = fit(tiny_config(tmp_path, shards, *overrides))  # the same command again
    (run,) = runs_of(cfg)
    assert run.info.run_id == failed.info.run_id == outcome.run_id
    assert run.info.status == "FINISHED" and run.data.tags["querypose.resumed_from_iteration"] == "2"
    assert outcome.metrics["iteration"] == 4
    assert steps(cfg, outcome.run_id, "train/loss") == [1, 2, 3, 4]
