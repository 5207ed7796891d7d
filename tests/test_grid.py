"""The ablation grid on Ray Tune: parent/child MLflow runs, the results table, --resume without duplicates,
config errors before Ray starts, and the grid as a `ray job submit` job on a head started here."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_SCRIPT = REPO_ROOT / "experiments" / "ablation_grid.py"
SYNTHETIC_GRID = REPO_ROOT / "experiments" / "configs" / "ablation_synthetic.yaml"
sys.path.insert(0, str(REPO_ROOT / "experiments"))

TINY = [
    "model.backbone=resnet10t", "model.hidden_dim=32", "model.ffn_dim=64", "model.dynamic_dim=8", "model.tower_channels=32",
    "model.tower_convs=1", "model.num_queries=6", "model.test_short_side=96", "model.test_max_size=128",
    "data.synthetic={train_images: 6, val_images: 3, image_size: 96}", "data.train_short_sides=[96]",
    "data.train_max_size=128", "data.crop_resize_sides=[96]", "data.crop_size=[64,96]", "train.max_iters=2",
    "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=2",
    "tracking.system_metrics=false",
]  # fmt: skip


def grid_runs(tracking_uri: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("querypose-synthetic-grid")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("querypose.grid") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_stopped_grid_resumes_without_duplicate_runs_and_logs_the_table(ray_local, s3, mlflow_server, tmp_path, capsys):
    """The grid as a cluster runs it: shards and Tune/Train state in the bucket, runs on the MLflow server."""
    import ablation_grid

    overrides = [*TINY, f"data.root={s3.uri('grid-tests/shards')}", f"run.storage_path={s3.uri('grid-tests/ray_results')}",
                 f"tracking.uri={mlflow_server.url}", "tune.cells=[{part_dim: 32}, {part_dim: 64}]"]  # fmt: skip
    assert ablation_grid.main(["--config", str(SYNTHETIC_GRID), "--stop-after", "1", *overrides]) == 0
    parents, children = grid_runs(mlflow_server.url)
    assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FINISHED"

    assert ablation_grid.main(["--config", str(SYNTHETIC_GRID), "--resume", *overrides]) == 0
    parents, children = grid_runs(mlflow_server.url)
    assert len(parents) == 1, "a resumed grid reuses its parent run"
    assert sorted(r.data.tags["querypose.cell"] for r in children) == ["part_dim=32", "part_dim=64"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    for child in children:
        assert "val/AP" in child.data.metrics and child.data.params["model.part_dim"] in {"32", "64"}
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # the server's store, not a local folder
    assert any(key.endswith("model/model.pt") for key in s3.keys("mlartifacts"))
    assert s3.keys("grid-tests/ray_results/ablation_synthetic/cells")  # the cells' checkpoints
    # with a server, the script names its URL instead of the local UI's command
    printed = capsys.readouterr().out
    assert f"MLflow: open {mlflow_server.url}/#/experiments/" in printed and "make mlflow-ui" not in printed

    client = MlflowClient(mlflow_server.url)
    parent = parents[0].info.run_id
    assert parents[0].info.status == "RUNNING" or client.get_run(parent).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent, "results")} == {
        "results/table.csv", "results/table.md", "results/table.png",
    }  # fmt: skip
    table = Path(client.download_artifacts(parent, "results/table.md", str(tmp_path / "dl"))).read_text()
    assert "| cell | AP | AP50 | AP75 | APm | APl |" in table
    assert "| part_dim=32 |" in table and "| part_dim=64 |" in table
    # the best cell's weights are in the registry and load back through the models:/ URI
    versions = client.search_model_versions("name = 'querypose-ablation-best'")
    assert len(versions) == 1 and versions[0].run_id in {r.info.run_id for r in children}


@pytest.mark.parametrize(
    ("override", "message"),
    [("tune.axes={bogus_axis: [1, 2]}", "tune.axes.bogus_axis"), ("tune.cells=[]", "tune: the grid is empty")],
)
def test_bad_grid_fails_before_ray_starts(override, message, tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(GRID_SCRIPT), "--config", str(SYNTHETIC_GRID), override],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("store", ["sqlite", "mlflow server"])
def test_rerun_with_other_settings_is_refused_naming_what_changed(store, request, tmp_path):
    """The same run.name continues the cells' checkpoints: a rerun with other training settings is an error
    (which would otherwise continue the old cells), a rerun with the same settings or other cells is not. The
    logged settings are read back from a SQLite store and from a real `mlflow server` (a cluster's store)."""
    from querypose.config import ConfigError
    from querypose_platform.config import load_config
    from querypose_platform.tuning import check_same_grid, open_parent_run

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server").url
    where = [f"tracking.uri={uri}", f"run.storage_path={tmp_path / 'ray_results'}"]
    cfg = load_config(SYNTHETIC_GRID, [*TINY, *where])
    open_parent_run(cfg)
    check_same_grid(cfg)
    check_same_grid(load_config(SYNTHETIC_GRID, [*TINY, *where, "tune.cells=[{part_dim: 64}]"]))
    changed = load_config(SYNTHETIC_GRID, [*TINY, *where, "train.max_iters=3", "model.num_queries=5"])
    with pytest.raises(ConfigError) as error:
        check_same_grid(changed)
    message = str(error.value)
    assert message.startswith("run.name: the grid 'ablation_synthetic'")
    assert "model.num_queries: 6 -> 5" in message and "train.max_iters: 2 -> 3" in message
    check_same_grid(load_config(SYNTHETIC_GRID, [*TINY, *where, "train.max_iters=3", "run.name=second"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_grid_runs_as_a_ray_job_on_a_local_head(tmp_path):
    """`ray start --head` (from this venv, on 127.0.0.1) + `ray job submit --working-dir .`, as the README says, on
    a head with the 2 CPUs of a 2-core machine: the train worker takes one, every Ray Data task a fraction of the
    other. Tracking is the embedded default (SQLite and local folders under QUERYPOSE_HOME)."""
    import ray

    ray.shutdown()  # the session's in-process Ray (a later module starts it again): the head gets the machine
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # token auth on, with a token of the test's own for head and client alike (README: shared clusters)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # README: else Ray swaps 127.0.0.1 for the routable address
    port, dashboard = _free_port(), _free_port()
    # every listening port of the head picked free: the defaults may be held by another Ray on this machine
    agent_ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]  # fmt: skip
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for its session folder
    temp_dir = Path(tempfile.mkdtemp(prefix="qpray-", dir="/tmp"))
    head_log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *agent_ports],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dashboard}"
        # outputs reach the test's folder through QUERYPOSE_HOME, as the README does it for the user's checkout
        runtime_env = json.dumps({"env_vars": {"QUERYPOSE_HOME": str(tmp_path)}})
        overrides = [*TINY, "tune.cells=[{part_dim: 32}]"]
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
                  "--runtime-env-json", runtime_env, "--", "python", "experiments/ablation_grid.py", "--config",
                  "experiments/configs/ablation_synthetic.yaml", *overrides]  # fmt: skip
        deadline = time.time() + 90
        while True:  # the job server and its agent need a few seconds after the head starts
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
            not_up = ("Failed to connect", "No available agent")
            if (
                done.returncode == 0
                or time.time() > deadline
                or not any(m in done.stdout + done.stderr for m in not_up)
            ):
                break
            time.sleep(3)
        logs = sorted(temp_dir.glob("session_*/logs/dashboard_agent*.log"))
        head_output = (tmp_path / "head.log").read_text()[-1500:] + "".join(log.read_text()[-1500:] for log in logs)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + head_output
        assert "succeeded" in done.stdout.lower()
        parents, children = grid_runs(f"sqlite:///{tmp_path / 'mlruns.db'}")
        assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FINISHED"
        # the console: one progress line per log interval, not Ray Train's per-report dicts
        assert "[part_dim=32" in done.stdout and "iter 2/2" in done.stdout
        assert "Reporting training result" not in done.stdout and "mlflow ui --backend-store-uri sqlite:" in done.stdout
        assert (tmp_path / "data" / "synthetic" / "shards-demo" / "train" / "manifest.json").is_file()
        assert (tmp_path / "ray_results" / "ablation_synthetic").is_dir()
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
