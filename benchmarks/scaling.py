"""Ray Train throughput: images/s and data-wait share with 1 and 2 workers (CPU, gloo) on the demo model, from the
training loop's own measurements (the `train/images_per_s` and `train/data_wait_share` windows it logs to MLflow,
the first window left out as warm-up). With --gpu: QueryPose-R50 at the paper's input sizes (short side 480-800,
max 1333) with bf16 autocast, images/s per GPU.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json
    python benchmarks/scaling.py --gpu --workers 1 --iters 60 --json benchmarks/results/scaling_gpu.json

Each worker gets one CPU (torch uses one thread in it), so on an idle 2-core machine 2 workers can at best double
the images/s of 1; the global batch is per-worker batch x workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from mlflow import MlflowClient  # noqa: E402

from querypose_platform.config import load_config  # noqa: E402

DEMO_CONFIG = PROJECT_ROOT / "experiments" / "configs" / "ablation_synthetic.yaml"


def measure(workers: int, args, root: Path) -> dict:
    from querypose_platform.trainer import fit

    common = [
        f"data.root={root / 'shards'}", f"run.storage_path={root / 'ray_results'}",
        f"tracking.uri=sqlite:///{root / 'mlruns.db'}", f"tracking.artifact_location={root / 'art'}",
        f"scaling.num_workers={workers}", f"train.batch_size={args.per_worker_batch * workers}",
        f"train.max_iters={args.iters}", f"train.log_every={args.log_every}", f"train.checkpoint_every={args.iters}",
        f"train.eval_every={10 * args.iters}", "tracking.system_metrics=false", f"run.name=scaling_{workers}w",
        "tracking.experiment=querypose-scaling",
    ]  # fmt: skip
    if args.gpu:
        overrides = [*common, "scaling.use_gpu=true", "train.amp=true", "model.backbone=resnet50",
                     "data.synthetic={train_images: 64, val_images: 4, image_size: 800}"]  # fmt: skip
        cfg = load_config(None, overrides)  # the paper's R50 model and input sizes
    else:
        cfg = load_config(DEMO_CONFIG, common)
    outcome = fit(cfg)
    client = MlflowClient(cfg.tracking.uri)
    rates = [
        m.value for m in sorted(client.get_metric_history(outcome.run_id, "train/images_per_s"), key=lambda m: m.step)
    ]
    waits = [
        m.value
        for m in sorted(client.get_metric_history(outcome.run_id, "train/data_wait_share"), key=lambda m: m.step)
    ]
    steady_rates, steady_waits = rates[1:] or rates, waits[1:] or waits  # the first window holds start-up
    return {
        "workers": workers,
        "images_per_s": statistics.median(steady_rates),
        "images_per_s_per_worker": statistics.median(steady_rates) / workers,
        "data_wait_share": statistics.median(steady_waits),
        "windows": {"images_per_s": rates, "data_wait_share": waits},
        "mlflow_run_id": outcome.run_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--per-worker-batch", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="QueryPose-R50, bf16, one GPU per worker")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "querypose-scaling-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import ray

    # Logical CPUs: one per worker, plus room for the Ray Data tasks (they share the machine's cores).
    ray.init(num_cpus=max(args.workers) + 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = [measure(workers, args, args.root) for workers in args.workers]
    base = rows[0]["images_per_s"]
    device = "GPU (bf16)" if args.gpu else "CPU (gloo)"
    print("\n| workers | device | images/s | images/s per worker | speed-up | data wait |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {device} | {row['images_per_s']:.2f} | {row['images_per_s_per_worker']:.2f} | "
              f"{row['images_per_s'] / base:.2f}x | {100 * row['data_wait_share']:.1f}% |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {**vars(args), "root": str(args.root), "json": str(args.json), "cpus": os.cpu_count()}
        args.json.write_text(json.dumps({"settings": settings, "results": rows}, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
