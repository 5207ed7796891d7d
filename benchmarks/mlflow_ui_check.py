"""What a person sees in the MLflow UI: serve a tracking store, open an experiment in headless Chromium, take a
screenshot and check the page is the model-training view (runs and their metrics), not MLflow 3's GenAI overview.

    python benchmarks/mlflow_ui_check.py                       # the demo's store (mlruns.db) and experiment
    python benchmarks/mlflow_ui_check.py --store sqlite:////abs/mlruns.db --experiment querypose-synthetic \\
        --out benchmarks/results/mlflow_ui.png

Needs Debian's `chromium` (apt-get install chromium). The server binds 127.0.0.1 on a free port and is stopped at
the end. Writes the screenshot and a JSON summary (the visible text the check looked for) next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Words of the model-training runs view, and of the GenAI overview it must not land on.
TRAINING_VIEW = ("Run Name", "Created")
GENAI_VIEW = ("No data available", "Traces")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=20000"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(store: str, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"mlflow ui did not answer on 127.0.0.1:{port} within 60 s")


def chromium(url: str, profile: Path, *args: str) -> str:
    command = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}")
    parser.add_argument("--experiment", default="querypose-synthetic-grid", help="the demo's experiment by default")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "mlflow_ui.png")
    parser.add_argument("--query", default="?workflowType=machine_learning", help="what follows the experiment page")
    args = parser.parse_args(argv)
    if shutil.which("chromium") is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2

    from mlflow import MlflowClient

    experiment = MlflowClient(args.store).get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no experiment {args.experiment!r} in {args.store} (run make demo first)", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}{args.query}"
    server = serve(args.store, port)
    try:
        with tempfile.TemporaryDirectory(prefix="querypose-chromium-") as profile:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            chromium(url, Path(profile), f"--screenshot={args.out.resolve()}")
            page = chromium(url, Path(profile), "--dump-dom")
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = {
        "url": url,
        "experiment_kind_tag": experiment.tags.get("mlflow.experimentKind"),
        "training_view": {word: word in page for word in TRAINING_VIEW},
        "genai_overview": {word: word in page for word in GENAI_VIEW},
        "screenshot": str(args.out),
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    shows_training = all(summary["training_view"].values()) and not all(summary["genai_overview"].values())
    print("the experiment opens in the model-training view" if shows_training else "the page is not the runs view")
    return 0 if shows_training else 1


if __name__ == "__main__":
    raise SystemExit(main())
