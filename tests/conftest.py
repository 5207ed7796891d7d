"""Shared test settings and the real servers a cluster would use, started on 127.0.0.1 for the whole session:
an S3-compatible store (moto's ThreadedMotoServer, as Ray's own tests use) and an `mlflow server` process
(SQLite backend, --serve-artifacts into that store). Small thread counts: CI has 2 cores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
BUCKET = "querypose-tests"

# The MLflow client retries a dead server for minutes by default; a short policy makes a test's outage stand for a
# long one. Remote files are cached per session, not in the user's ~/.cache. Set before any Ray process starts:
# Ray's workers inherit this environment.
os.environ.update(
    MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    QUERYPOSE_CACHE=tempfile.mkdtemp(prefix="querypose-test-cache-"),
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real fixtures not found at {FIXTURES} (they live in ../shared/fixtures beside the repo)")
    return FIXTURES


class S3Store:
    """A moto S3 server in this process with one bucket; the AWS_* variables point boto3, pyarrow.fs, Ray and
    MLflow (MLFLOW_S3_ENDPOINT_URL) of this process and of the processes it starts at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.endpoint, MLFLOW_S3_ENDPOINT_URL=self.endpoint,
        )  # fmt: skip
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key.strip('/')}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix.strip("/"))
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3() -> S3Store:
    store = S3Store()
    yield store
    store.stop()


class MlflowServer:
    """`mlflow server` on a free 127.0.0.1 port: SQLite backend in `folder`, artifacts proxied (--serve-artifacts)
    into `artifacts`. stop() and start() again keep the port and the data (an outage, then recovery)."""

    def __init__(self, folder: Path, artifacts: str) -> None:
        self.folder, self.artifacts = folder, artifacts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--serve-artifacts",
            "--artifacts-destination", self.artifacts, "--workers", "1",
        ]  # fmt: skip
        log = (self.folder / "server.log").open("a")
        # No job runner: its seven worker processes are for GenAI jobs and make every start and stop slow.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s: {(self.folder / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its worker processes
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory) -> MlflowServer:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), s3.uri("mlartifacts"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_local(s3):
    """The local Ray the scripts start (querypose_platform.ray_runtime.init_ray), once for the session, after the
    S3 variables are set so that its workers reach the test store. A test that needs its own cluster shuts it
    down; the next module that uses it starts it again."""
    import ray

    from querypose_platform.ray_runtime import init_ray

    if not ray.is_initialized():
        init_ray(include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def pytest_sessionfinish(session, exitstatus):
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
