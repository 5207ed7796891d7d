"""MLflow glue: one run per training job (or grid cell), found again by a deterministic key so that retries,
resumed jobs and restored grids append to the run they started instead of opening a second one."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from querypose_platform.config import PROJECT_ROOT, TrackingConfig, is_local_tracking

RUN_KEY_TAG = "querypose.run_key"
# MLflow 3's UI opens an experiment on its GenAI overview ("Traces") unless this tag names the model-training kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SOURCE_RUN_TAG = "querypose.source_run"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
# A group's steps count as logged up to the last step of this metric (every log of the group carries it).
PROGRESS_METRICS = {"train": "train/loss", "val": "val/AP"}
PENDING_FILE = "pending.json"
MAX_RETRY_PAUSE_S = 10.0


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


def where_to_look(tracking: TrackingConfig) -> str:
    """Where a person sees the runs: the server's experiment page, or the command that serves a local store and
    the page to open."""
    if not is_local_tracking(tracking.uri):
        return f"MLflow: open {experiment_page(tracking.uri.rstrip('/'), tracking)}"
    if tracking.uri == f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}":
        command = "make mlflow-ui"
    else:
        command = f"mlflow ui --backend-store-uri {tracking.uri} --host 127.0.0.1 --port 5000"
    return f"MLflow: {command}, then open {experiment_page('http://127.0.0.1:5000', tracking)}"


def experiment_page(base_url: str, tracking: TrackingConfig) -> str:
    """The experiment's runs page in MLflow 3's UI. `workflowType=machine_learning` opens the model-training view
    (runs, metric charts side by side); a browser new to the UI otherwise lands on the GenAI overview."""
    try:
        experiment = client_for(tracking).get_experiment_by_name(tracking.experiment)
    except Exception:  # an unreachable server: the experiments list still leads there
        experiment = None
    where = f"experiments/{experiment.experiment_id}" if experiment is not None else "experiments"
    return f"{base_url}/#/{where}?workflowType=machine_learning"


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


def find_run_id(tracking: TrackingConfig, run_key: str) -> str | None:
    """The id of the run tagged with `run_key`; None when there is none, or when MLflow cannot be reached
    (with a warning: the run's data is not lost, only this look-up)."""
    client = client_for(tracking)
    try:
        experiment = client.get_experiment_by_name(tracking.experiment)
        return find_run(client, experiment.experiment_id, run_key) if experiment is not None else None
    except Exception as error:
        if not is_outage(error):
            raise
        print(f"[tracking] warning: MLflow at {tracking.uri} is unreachable ({_short(error)}); "
              f"cannot look up the run {run_key!r}", file=sys.stderr, flush=True)  # fmt: skip
        return None


def mark_failed(tracking: TrackingConfig, run_key: str, error: BaseException) -> None:
    """Mark the run of `run_key` FAILED with the error, if it exists and MLflow can be reached."""
    run_id = find_run_id(tracking, run_key)
    if run_id is None:
        return
    try:
        finish_run(tracking, run_id, error)
    except Exception as failure:
        if not is_outage(failure):
            raise
        print(f"[tracking] warning: could not mark run {run_id} FAILED: {_short(failure)}", file=sys.stderr)


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


def is_outage(error: BaseException) -> bool:
    """True when the tracking server could not take a request (down, unreachable, overloaded: worth waiting
    for); false when it refused it (a 4xx: the request itself is wrong and would fail again)."""
    if isinstance(error, MlflowException):
        return not 400 <= error.get_http_status_code() < 500
    return isinstance(error, OSError)  # refused connections and requests' errors among them


@dataclass
class RunSpec:
    """What rank 0 needs to find or create its run: the deterministic key and what the run carries."""

    key: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


@dataclass
class _Entry:
    kind: str  # "step" (metrics of one step, with artifacts that belong to it), "artifact", "tag", "finish"
    group: str = ""
    step: int = 0
    metrics: list[Metric] = field(default_factory=list)
    files: list[tuple[str, str | None]] = field(default_factory=list)  # (spooled local file, artifact folder)
    tag: tuple[str, str] = ("", "")


class RunLogger:
    """Rank 0's handle on its MLflow run, built so that tracking never stops training.

    Every call queues an entry and returns at once; one background thread sends the entries in order. The
    thread first opens the run (found by its key or created, see `open_run`), so training can start before
    the server is reachable. While the server is away (refused connections, timeouts, 5xx) the thread keeps
    the entries, warns once per outage, retries with a growing pause and sends them in order when the server
    is back; artifacts wait as files in a spool folder. A request the server refuses (4xx) is raised from the
    next call. At most `tracking.max_pending` entries wait: beyond that the caller blocks (training pauses
    rather than losing a step). Metric steps that a previous attempt of the run already logged are not sent
    again, so a retried or resumed run has every step once.
    """

    def __init__(self, tracking: TrackingConfig, run: RunSpec | str, on_attach=None):
        self.tracking = tracking
        self.client = client_for(tracking)
        self._spec = run if isinstance(run, RunSpec) else None
        self._run_id = run if isinstance(run, str) else None
        self._on_attach = on_attach
        self._logged_until: dict[str, int] = {}
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = threading.Event()
        self._attached = threading.Event()
        self._error: BaseException | None = None
        self._down_since: float | None = None
        self._full_warned = False
        self._spool = Path(tempfile.mkdtemp(prefix="querypose-tracking-"))
        self._spooled = 0
        self._thread = threading.Thread(target=self._send_loop, name="querypose-tracking", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        """The run's id once the thread has opened it (None before)."""
        return self._run_id

    # ---- the training side: queue and return
    def log_metrics(
        self, metrics: dict[str, float], step: int, group: str, artifacts: dict[str, Any] | None = None
    ) -> None:
        """Log `metrics` (names prefixed with `group/`) at `step`, with JSON `artifacts` ({artifact file:
        content}) that belong to that step; all skipped if a previous attempt logged the step."""
        now = _now_ms()
        batch = [Metric(f"{group}/{name}", float(value), now, step) for name, value in metrics.items()]
        files = [self._spool_bytes(json.dumps(content).encode(), name) for name, content in (artifacts or {}).items()]
        self._put(_Entry("step", group=group, step=step, metrics=batch, files=files))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(_Entry("artifact", files=[self._spool_bytes(text.encode(), artifact_file)]))

    def log_json(self, content: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(content), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put(_Entry("artifact", files=[self._spool_file(Path(path), artifact_path)]))

    def log_figure(self, figure, artifact_file: str) -> None:
        from matplotlib import pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(artifact_file).suffix.lstrip(".") or "png")
        plt.close(figure)
        self._put(_Entry("artifact", files=[self._spool_bytes(buffer.getvalue(), artifact_file)]))

    def set_tag(self, key: str, value: str) -> None:
        self._put(_Entry("tag", tag=(key, value)))

    def finish(self) -> None:
        """Mark the run FINISHED once everything queued before has been sent."""
        self._put(_Entry("finish"))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued entry has been sent; raises if the server stays away past `timeout`
        (default tracking.flush_timeout_s)."""
        timeout = self.tracking.flush_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and self._thread.is_alive() and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
            left = len(self._queue)
        self._raise_error()
        if left:
            raise RuntimeError(
                f"MLflow at {self.tracking.uri} stayed unreachable for {timeout:g}s: {left} tracking entries "
                f"({self._describe_pending()}) were not logged"
            )

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (waiting up to `timeout` for the server), then stop the thread."""
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._abandon.set()
            self._thread.join(timeout=30)
            shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        """The metric's points on the server, after what is queued has been sent."""
        self.flush()
        return sorted((p.step, p.value) for p in self.client.get_metric_history(self._run_id, name))

    # ---- checkpoints carry what has not been sent, so a crash during an outage loses no step
    def save_pending(self, folder: Path) -> None:
        """Write the entries not sent yet (and their files) into `folder` (part of a checkpoint)."""
        records = []
        # The files are copied under the lock: the sender deletes an entry's files once it has popped the entry,
        # which it cannot do while the lock is held, so every listed entry's files still exist.
        with self._cond:
            entries = [e for e in self._queue if e.kind != "finish"]
            if not entries:
                return
            folder.mkdir(parents=True, exist_ok=True)
            for i, entry in enumerate(entries):
                files = []
                for j, (local, artifact_dir) in enumerate(entry.files):
                    name = f"{i:06d}_{j:03d}_{Path(local).name}"
                    shutil.copyfile(local, folder / name)
                    files.append([name, artifact_dir])
                metrics = [[m.key, m.value, m.timestamp, m.step] for m in entry.metrics]
                records.append({"kind": entry.kind, "group": entry.group, "step": entry.step, "metrics": metrics,
                                "files": files, "tag": list(entry.tag)})  # fmt: skip
        (folder / PENDING_FILE).write_text(json.dumps(records))

    def load_pending(self, folder: Path) -> int:
        """Queue the entries a checkpoint carried (see save_pending); returns how many."""
        path = folder / PENDING_FILE
        if not path.is_file():
            return 0
        records = json.loads(path.read_text())
        for record in records:
            files = [self._spool_file(folder / name, artifact_dir) for name, artifact_dir in record["files"]]
            metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]]
            self._put(_Entry(record["kind"], group=record["group"], step=record["step"], metrics=metrics,
                             files=files, tag=tuple(record["tag"])))  # fmt: skip
        return len(records)

    # ---- internals
    def _put(self, entry: _Entry) -> None:
        self._raise_error()
        with self._cond:
            if len(self._queue) >= self.tracking.max_pending and not self._full_warned:
                self._full_warned = True
                print(f"[tracking] {len(self._queue)} entries wait for MLflow at {self.tracking.uri}: training "
                      "waits for room", file=sys.stderr, flush=True)  # fmt: skip
            while len(self._queue) >= self.tracking.max_pending and self._thread.is_alive():
                self._cond.wait(1.0)
            self._queue.append(entry)
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _spool_bytes(self, content: bytes, artifact_file: str) -> tuple[str, str | None]:
        folder = self._spool / f"{self._next_spool()}"
        folder.mkdir()
        local = folder / Path(artifact_file).name
        local.write_bytes(content)
        return str(local), str(Path(artifact_file).parent) if "/" in artifact_file else None

    def _spool_file(self, path: Path, artifact_path: str | None) -> tuple[str, str | None]:
        folder = self._spool / f"{self._next_spool()}"
        folder.mkdir()
        local = folder / path.name
        try:
            os.link(path, local)  # the caller may delete its file before the entry is sent
        except OSError:
            shutil.copyfile(path, local)
        return str(local), artifact_path

    def _next_spool(self) -> int:
        with self._cond:
            self._spooled += 1
            return self._spooled

    def _describe_pending(self) -> str:
        with self._cond:
            steps = sorted({(e.group, e.step) for e in self._queue if e.kind == "step"})
            others = sum(e.kind != "step" for e in self._queue)
        shown = ", ".join(f"{group} step {step}" for group, step in steps[:6]) + (", ..." if len(steps) > 6 else "")
        return f"{shown}{'; ' if shown and others else ''}{f'{others} artifacts/tags' if others else ''}"

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                entry = self._queue[0]
            if not self._send_with_retries(entry):
                return
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()
            for local, _ in entry.files:
                shutil.rmtree(Path(local).parent, ignore_errors=True)

    def _send_with_retries(self, entry: _Entry) -> bool:
        """Send one entry, waiting out an outage; False when the logger was closed before it could."""
        pause = 1.0
        while True:
            try:
                self._attach()
                self._send(entry)
            except Exception as error:  # an outage waits; anything else is raised from the next call
                if not is_outage(error):
                    self._error = error
                    return True
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"[tracking] warning: MLflow at {self.tracking.uri} is unreachable ({_short(error)}); "
                          "training goes on and its metrics and artifacts are kept until the server is back",
                          file=sys.stderr, flush=True)  # fmt: skip
                if self._abandon.wait(pause):
                    return False
                pause = min(2 * pause, MAX_RETRY_PAUSE_S)
                continue
            if self._down_since is not None:
                print(f"[tracking] MLflow at {self.tracking.uri} is back after "
                      f"{time.monotonic() - self._down_since:.0f}s; sending what was kept", file=sys.stderr,
                      flush=True)  # fmt: skip
                self._down_since = None
            return True

    def _attach(self) -> None:
        if self._attached.is_set():
            return
        if self._run_id is None:
            spec = self._spec
            self._run_id = open_run(self.tracking, spec.key, spec.name, spec.params, spec.tags, spec.parent_run_id)
        self._logged_until = {
            group: last_logged_step(self.client, self._run_id, metric) for group, metric in PROGRESS_METRICS.items()
        }
        self._attached.set()
        if self._on_attach is not None:
            self._on_attach(self._run_id)

    def _send(self, entry: _Entry) -> None:
        if entry.kind == "step":
            if entry.step <= self._logged_until.get(entry.group, -1):
                return
            for start in range(0, len(entry.metrics), 1000):  # MLflow's batch limit for metrics
                self.client.log_batch(self._run_id, metrics=entry.metrics[start : start + 1000])
            for local, artifact_dir in entry.files:
                self.client.log_artifact(self._run_id, local, artifact_dir)
            self._logged_until[entry.group] = entry.step
        elif entry.kind == "artifact":
            for local, artifact_dir in entry.files:
                self.client.log_artifact(self._run_id, local, artifact_dir)
        elif entry.kind == "tag":
            self.client.set_tag(self._run_id, *entry.tag)
        elif entry.kind == "finish":
            self.client.set_terminated(self._run_id, status="FINISHED")


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)
