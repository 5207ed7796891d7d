"""Build and fit the TorchTrainer for one experiment config; shared by experiments/train.py and the Tune grid."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from querypose_platform.config import ExperimentConfig
from querypose_platform.data import build_dataset
from querypose_platform.ray_runtime import check_cluster, warn_if_no_cpu_for_data
from querypose_platform.shards import ensure_synthetic_shards, read_manifest
from querypose_platform.tracking import RunSpec, find_run_id, flatten, mark_failed
from querypose_platform.train_loop import epochs_for, train_loop_per_worker, val_dataset_name

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str | None  # None only when MLflow could not be reached at the end
    metrics: dict[str, Any]
    checkpoint_path: str | None


def default_run_key(cfg: ExperimentConfig) -> str:
    """Ray Train resumes a run by storage path + name, so the same pair names the same MLflow run."""
    return f"train:{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def build_datasets(cfg: ExperimentConfig) -> dict[str, ray.data.Dataset | Callable[[], ray.data.Dataset]]:
    """The train stream (all the epochs that max_iters needs, in one dataset), as a function that Ray Train calls
    whenever it starts the worker group (see `train_stream`), and one val part per rank (its own row groups)."""
    # Per-operator progress bars redrawn by the split coordinator turn a job log into megabytes of \r lines.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    train_uri = cfg.data.split_uri(cfg.data.train_split)
    val_uri = cfg.data.split_uri(cfg.data.val_split)
    num_images = training_image_counts(read_manifest(train_uri))["data.train_images"]
    datasets = {"train": functools.partial(train_stream, cfg, train_uri, epochs_for(cfg, num_images))}
    workers = cfg.scaling.num_workers
    for rank in range(workers):
        datasets[val_dataset_name(rank)] = build_dataset(val_uri, cfg, train=False, part=(rank, workers))
    return datasets


def train_stream(cfg: ExperimentConfig, uri: str, epochs: int) -> ray.data.Dataset:
    """The train dataset as Ray Train builds it (a callable in `datasets`) at every start of the worker group: the
    first, each retry after a failure (FailureConfig) and a stopped run fitted again. The train loop goes on from
    the latest checkpoint's iteration, so the stream starts after the row groups that those iterations consumed
    (`data.resume_offset`) instead of at the first epoch's first row group."""
    return build_dataset(uri, cfg, train=True, epochs=epochs, start_iteration=latest_checkpoint_iteration(cfg))


def latest_checkpoint_iteration(cfg: ExperimentConfig) -> int:
    """The iteration of the run's latest checkpoint: the one Ray Train hands the workers to restore (the loop
    reports "iteration" with every checkpoint). 0 for a new run, or where the run folder cannot be read (the
    stream then replays from the start, as it did before resuming existed)."""
    path = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    try:
        result = ray.train.Result.from_path(path)
    except RuntimeError:  # no run folder yet, or no checkpoint snapshot in it
        return 0
    except Exception as error:  # noqa: BLE001 - a snapshot Ray cannot read: replaying is safe, skipping is not
        logger.warning("train stream starts at the first epoch: cannot read the run at %s (%s)", path, error)
        return 0
    return int((result.metrics or {}).get("iteration", 0))


def training_image_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Images the train stream yields and those it leaves out for having no non-crowd person (MLflow params)."""
    without_people = manifest.get("num_images_without_people")
    if without_people is None:  # a shard set converted before the count existed
        return {"data.train_images": manifest["num_images"]}
    return {
        "data.train_images": manifest["num_images"] - without_people,
        "data.train_images_without_people_left_out": without_people,
    }


def build_trainer(
    cfg: ExperimentConfig, run: RunSpec, callbacks: list | None = None, datasets: dict | None = None
) -> TorchTrainer:
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.extra_resources}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "mlflow_run": dataclasses.asdict(run)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        datasets=datasets if datasets is not None else build_datasets(cfg),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            callbacks=callbacks or None,
        ),
    )


def fit(
    cfg: ExperimentConfig,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
) -> TrainOutcome:
    """Check the paths against the cluster, prepare data (the synthetic default is generated on first use),
    fit, and return the outcome. Rank 0 opens (or reopens) the MLflow run found by `run_key` and marks it
    FINISHED; a failed fit marks it FAILED with the error."""
    cfg.check_trainable()
    check_cluster(cfg)
    if cfg.data.synthetic is not None:
        ensure_synthetic_shards(cfg)
    warn_if_no_cpu_for_data(cfg, reserved=cfg.tune.trial_cpus if parent_run_id else 0.0)
    params = {
        **flatten(cfg.to_dict()),
        **training_image_counts(read_manifest(cfg.data.split_uri(cfg.data.train_split))),
    }
    spec = RunSpec(run_key or default_run_key(cfg), cfg.run.name, params, tags or {}, parent_run_id)
    try:
        result = build_trainer(cfg, spec, callbacks).fit()
        if getattr(result, "error", None) is not None:
            raise result.error
    except BaseException as error:
        mark_failed(cfg.tracking, spec.key, error)
        raise
    checkpoint = result.checkpoint
    return TrainOutcome(
        run_id=find_run_id(cfg.tracking, spec.key),
        metrics=dict(result.metrics or {}),
        checkpoint_path=checkpoint_uri(checkpoint) if checkpoint is not None else None,
    )


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """A checkpoint's location as a local path or a URI (Ray gives the path inside its filesystem)."""
    filesystem = checkpoint.filesystem.type_name if checkpoint.filesystem is not None else "local"
    return checkpoint.path if filesystem == "local" else f"{_SCHEMES.get(filesystem, filesystem)}://{checkpoint.path}"


_SCHEMES = {"gcs": "gs"}
