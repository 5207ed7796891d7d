"""MLflow glue: one run per training job (or grid cell), found again by a deterministic key so that retries,
resumed jobs and restored grids append to the run they started instead of opening a second one."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from querypose_platform.config import TrackingConfig

RUN_KEY_TAG = "querypose.run_key"
# MLflow 3's UI opens an experiment on its GenAI overview ("Traces") unless this tag names the model-training kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SOURCE_RUN_TAG = "querypose.source_run"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"part_dim": 64}} -> {"model.part_dim": 64}; the flat keys are the MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def client_for(tracking: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.uri)


def experiment_id(client: MlflowClient, tracking: TrackingConfig) -> str:
    """The experiment's id, created when missing; either way marked as a model-training experiment for the UI."""
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    location = tracking.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    return client.create_experiment(
        tracking.experiment, artifact_location=location or None, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    )


def find_run(client: MlflowClient, experiment: str, run_key: str) -> str | None:
    """The id of the run tagged with `run_key`, if one exists."""
    quoted = run_key.replace("'", "\\'")
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{quoted}'", max_results=1)
    return runs[0].info.run_id if runs else None


def open_run(
    tracking: TrackingConfig,
    run_key: str,
    run_name: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Find the run for `run_key` or create it, mark it RUNNING, log params not logged yet; returns its id."""
    client = client_for(tracking)
    experiment = experiment_id(client, tracking)
    run_id = find_run(client, experiment, run_key)
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    if run_id is None:
        run_id = client.create_run(experiment, run_name=run_name, tags=all_tags).info.run_id
    else:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
    if params:
        log_new_params(client, run_id, params)
    return run_id


def log_new_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not have yet (MLflow refuses to change a logged param's value)."""
    logged = client.get_run(run_id).data.params
    fresh = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items() if key not in logged]
    for start in range(0, len(fresh), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=fresh[start : start + 100])


def finish_run(tracking: TrackingConfig, run_id: str, error: BaseException | None = None) -> None:
    """Mark the run FINISHED, or FAILED with the error as the run's note."""
    client = client_for(tracking)
    if error is not None:
        client.set_tag(run_id, MLFLOW_RUN_NOTE, f"failed: {type(error).__name__}: {error}"[:5000])
        client.set_tag(run_id, "querypose.error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, status="FAILED" if error is not None else "FINISHED")


def last_logged_step(client: MlflowClient, run_id: str, metric: str) -> int:
    """The highest step already logged for `metric` (-1 when none): a resumed run logs only past it."""
    history = client.get_metric_history(run_id, metric)
    return max((point.step for point in history), default=-1)


class RunLogger:
    """Rank 0's handle on the MLflow run: metrics with steps that never repeat, artifacts from memory."""

    def __init__(self, tracking: TrackingConfig, run_id: str):
        self.client = client_for(tracking)
        self.run_id = run_id
        # Steps a previous attempt already logged (it ran past its last checkpoint before it died).
        self._logged_until = {
            "train": last_logged_step(self.client, run_id, "train/loss"),
            "val": last_logged_step(self.client, run_id, "val/AP"),
        }

    def log_metrics(self, metrics: dict[str, float], step: int, group: str) -> bool:
        """Log `metrics` (names prefixed with `group/`) at `step` unless that step was logged before."""
        if step <= self._logged_until[group]:
            return False
        batch = [Metric(f"{group}/{name}", float(value), _now_ms(), step) for name, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        self._logged_until[group] = step
        return True

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_json(self, content: Any, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(content), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return sorted((p.step, p.value) for p in self.client.get_metric_history(self.run_id, name))


def _now_ms() -> int:
    return int(time.time() * 1000)


def download_run_file(tracking: TrackingConfig, run_id: str, artifact_path: str) -> Path:
    """Download one artifact of a run into a temporary folder; returns its local path."""
    target = Path(tempfile.mkdtemp(prefix="querypose-artifact-"))
    return Path(client_for(tracking).download_artifacts(run_id, artifact_path, str(target)))
