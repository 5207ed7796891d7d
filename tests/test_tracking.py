"""Rank 0's MLflow logger against the session's real `mlflow server` (conftest): a run that starts while the
server is down attaches when it comes up, a retry never repeats a step, a refused request is raised; and the
GPU sampler of MLflow's system metrics has its package."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from querypose_platform.config import TrackingConfig
from querypose_platform.tracking import RunLogger, RunSpec


def test_a_run_starts_before_the_server_and_attaches_when_it_is_up(mlflow_server, capsys):
    tracking = TrackingConfig(uri=mlflow_server.url, artifact_location=None, experiment="tracking-tests")
    spec = RunSpec("tracking-tests:late", "late", params={"model.part_dim": 64}, tags={"querypose.cell": "late"})
    mlflow_server.stop()
    try:
        logger = RunLogger(tracking, spec)
        for step in (1, 2, 3):  # each call returns at once although nothing answers
            logger.log_metrics({"loss": 1.0 / step}, step, "train")
        logger.log_text("kept while the server was away", "notes/outage.txt")
        assert logger.run_id is None
    finally:
        mlflow_server.start()
    logger.finish()
    logger.close(timeout=120)

    client = MlflowClient(tracking.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.part_dim"] == "64"
    assert run.data.tags["querypose.cell"] == "late"
    history = sorted((p.step, p.value) for p in client.get_metric_history(logger.run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [a.path for a in client.list_artifacts(logger.run_id, "notes")] == ["notes/outage.txt"]
    warnings = capsys.readouterr().err
    assert warnings.count("is unreachable (") == 1 and warnings.count("is back after") == 1

    # a retried attempt finds the same run and logs only past its last step
    with RunLogger(tracking, spec) as again:
        again.log_metrics({"loss": 9.0}, 3, "train")
        again.log_metrics({"loss": 0.25}, 4, "train")
    assert again.run_id == logger.run_id
    history = sorted((p.step, p.value) for p in client.get_metric_history(logger.run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]


def test_a_refused_request_is_raised_not_kept(mlflow_server):
    tracking = TrackingConfig(uri=mlflow_server.url, artifact_location=None, experiment="tracking-tests")
    logger = RunLogger(tracking, RunSpec("tracking-tests:refused", "refused"))
    logger.set_tag("x" * 300, "a tag key longer than MLflow allows")  # a 400, not an outage
    with pytest.raises(MlflowException, match="exceeds the maximum length"):
        logger.close(timeout=60)


def test_mlflow_system_metrics_find_the_gpu_package():
    """nvidia-ml-py is installed: on a machine without a GPU, NVML reports no driver rather than MLflow
    reporting a missing package, and on a GPU node the sampler starts."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        GPUMonitor()
    except RuntimeError as error:
        assert "NVML" in str(error)


def test_experiments_open_in_the_model_training_view(mlflow_server, tmp_path):
    """MLflow 3's UI lands on its GenAI overview unless told otherwise: experiments carry the model-training kind
    (set on new and on existing ones) and the printed page selects the training view."""
    from querypose_platform.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, experiment_id, where_to_look

    tracking = TrackingConfig(uri=mlflow_server.url, artifact_location=None, experiment="ui-kind")
    client = MlflowClient(tracking.uri)
    made = experiment_id(client, tracking)
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    old = client.create_experiment("ui-kind-old")  # an experiment made before the tag existed
    assert (
        experiment_id(client, TrackingConfig(uri=tracking.uri, artifact_location=None, experiment="ui-kind-old")) == old
    )
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert (
        where_to_look(tracking)
        == f"MLflow: open {mlflow_server.url}/#/experiments/{made}?workflowType=machine_learning"
    )
    local = TrackingConfig(uri=f"sqlite:///{tmp_path / 'runs.db'}", artifact_location=str(tmp_path), experiment="x")
    assert where_to_look(local).startswith(f"MLflow: mlflow ui --backend-store-uri {local.uri} --host 127.0.0.1")
    assert where_to_look(local).endswith("/#/experiments?workflowType=machine_learning")  # not created yet
