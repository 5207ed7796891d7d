"""Images/s delivered to a training consumer: the Ray Data pipeline against a plain torch DataLoader over the same
Parquet rows, with the same decode + augmentation and the same number of CPU workers; then the data-wait share of
a real training step (the demo model) fed by the Ray Data pipeline.

    python benchmarks/ingest.py --images 1500 --epochs 20 --workers 2 --json benchmarks/results/ingest.json

Goals: Ray Data >= 1.0x the DataLoader; data wait < 5% of a training step at the model's own step rate.
Each loader runs one warm-up pass (process/actor start, file cache), then a timed pass; the order alternates
over --repeats so neither side always goes first on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from querypose_platform.config import load_config  # noqa: E402
from querypose_platform.data import READ_COLUMNS, _decode_and_transform, _object_array, collate_batch  # noqa: E402
from querypose_platform.shards import ensure_synthetic_shards, shard_files  # noqa: E402

BATCH_SIZE = 8
DEMO_CONFIG = PROJECT_ROOT / "experiments" / "configs" / "ablation_synthetic.yaml"


class ParquetRows(torch.utils.data.Dataset):
    """The shard rows for a DataLoader: each worker opens the files itself and decodes + augments one row."""

    def __init__(self, files: list[str], cfg, epochs: int):
        self.files, self.cfg = files, cfg
        self.index = [(e, f, g, r) for e in range(epochs) for f in files for g in range(pq.ParquetFile(f).num_row_groups)
                      for r in range(pq.ParquetFile(f).metadata.row_group(g).num_rows)]  # fmt: skip
        self._groups: dict = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        epoch, file, group, row = self.index[i]
        if (file, group) not in self._groups:  # one cached row group per worker: rows are read in order
            self._groups = {(file, group): pq.ParquetFile(file).read_row_group(group, columns=READ_COLUMNS)}
        table = self._groups[(file, group)].slice(row, 1)
        rows = {
            "image_id": np.array(table["image_id"].to_pylist()),
            "image": _object_array(table["image"].to_pylist()),
            "people": _object_array(table["people"].to_pylist()),
            "epoch": np.array([epoch]),
        }
        out = _decode_and_transform(rows, self.cfg, train=True)
        return {key: value[0] for key, value in out.items()}


def collate_rows(rows: list[dict], num_keypoints: int):
    batch = {key: _object_array([row[key] for row in rows]) for key in ("image", "boxes", "keypoints", "scale")}
    batch["image_id"] = np.array([row["image_id"] for row in rows])
    batch["valid"] = np.array([row["valid"] for row in rows])
    return collate_batch(batch, num_keypoints)


def time_dataloader(files, cfg, workers: int, epochs: int) -> tuple[float, int]:
    num_keypoints = cfg.model.spec.num_keypoints
    loader = torch.utils.data.DataLoader(
        ParquetRows(files, cfg, epochs), batch_size=BATCH_SIZE, num_workers=workers, persistent_workers=False,
        collate_fn=lambda rows: collate_rows(rows, num_keypoints), prefetch_factor=4,
    )  # fmt: skip
    started, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch.image_ids)
    return time.perf_counter() - started, images


def time_ray_data(uri, cfg, epochs: int) -> tuple[float, int]:
    from querypose_platform.data import BatchCollator, build_dataset

    dataset = build_dataset(uri, cfg, train=True, epochs=epochs)
    collate = BatchCollator(cfg.model.spec.num_keypoints)
    started, images = time.perf_counter(), 0
    for batch in dataset.iter_torch_batches(batch_size=BATCH_SIZE, collate_fn=collate, prefetch_batches=4):
        images += len(batch.image_ids)
    return time.perf_counter() - started, images


def data_wait_share(uri, cfg, steps: int) -> dict:
    """Feed the demo model's real training step from the Ray Data pipeline; share of time spent waiting."""
    from querypose import build_model
    from querypose.criterion import SetCriterion
    from querypose.engine import train_step
    from querypose.optim import build_optimizer, build_scheduler
    from querypose_platform.data import BatchCollator, build_dataset

    model = build_model(cfg.model)
    criterion = SetCriterion.from_config(cfg.model)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.flow_lr_mult)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_iters, cfg.train.warmup_factor, [], 0.1)
    dataset = build_dataset(uri, cfg, train=True, epochs=4)
    batches = iter(dataset.iter_torch_batches(batch_size=cfg.train.batch_size,
                                              collate_fn=BatchCollator(cfg.model.spec.num_keypoints)))  # fmt: skip
    next(batches)  # pipeline start-up is not a step
    wait = total = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        train_step(model, criterion, optimizer, scheduler, batch.images, batch.image_sizes, batch.targets)
        wait += fetched - started
        total += time.perf_counter() - started
    return {"steps": steps, "step_s": total / steps, "wait_s": wait / steps, "data_wait_share": wait / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=20, help="augmentation passes per timed run (about a minute)")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of both loaders")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the data-wait measurement (0: skip)")
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "querypose-ingest-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import ray

    cfg = load_config(DEMO_CONFIG, [
        f"data.root={args.data_root / 'shards'}", "data.cpus_per_task=1",
        f"data.synthetic={{train_images: {args.images}, val_images: 4, image_size: {args.image_size}}}",
    ])  # fmt: skip
    ensure_synthetic_shards(cfg)
    uri = cfg.data.split_uri(cfg.data.train_split)
    files = shard_files(uri)
    torch.set_num_threads(1)
    # Ray Data gets `workers` CPUs for its tasks, as the DataLoader gets `workers` processes.
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    rates: dict[str, list[float]] = {"ray_data": [], "dataloader": []}
    runners = {
        "ray_data": lambda epochs: time_ray_data(uri, cfg, epochs),
        "dataloader": lambda epochs: time_dataloader(files, cfg, args.workers, epochs),
    }
    for name in runners:
        runners[name](1)  # warm-up pass
    for repeat in range(args.repeats):
        for name in list(runners) if repeat % 2 == 0 else list(runners)[::-1]:
            seconds, images = runners[name](args.epochs)
            rates[name].append(images / seconds)
            print(f"[ingest] {name}: {images} images in {seconds:.1f} s", flush=True)

    ray_rate, loader_rate = statistics.median(rates["ray_data"]), statistics.median(rates["dataloader"])
    wait = data_wait_share(uri, load_config(DEMO_CONFIG, [f"data.root={args.data_root / 'shards'}"]), args.train_steps) \
        if args.train_steps else None  # fmt: skip
    print(f"\n| loader | images/s (median of {args.repeats}) | ratio to DataLoader |")
    print("|---|---|---|")
    print(f"| Ray Data | {ray_rate:.1f} | {ray_rate / loader_rate:.2f}x |")
    print(f"| torch DataLoader | {loader_rate:.1f} | 1.00x |")
    if wait:
        print(f"\ndata wait: {100 * wait['data_wait_share']:.2f}% of a {wait['step_s']:.2f} s training step "
              f"(demo model, batch {cfg.train.batch_size}, {wait['steps']} steps)")  # fmt: skip
    report = {
        "settings": {
            **vars(args),
            "data_root": str(args.data_root),
            "json": str(args.json),
            "batch_size": BATCH_SIZE,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },  # fmt: skip
        "images_per_s": rates,
        "median_images_per_s": {"ray_data": ray_rate, "dataloader": loader_rate},
        "ratio_ray_data_to_dataloader": ray_rate / loader_rate,
        "train_step_data_wait": wait,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
