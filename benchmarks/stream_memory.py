"""The training stream at scale without a cluster: the old stream (a union of one pass per epoch, each with
`randomize_block_order`) against the new one (every epoch in one dataset, row groups read lazily in a seeded order
per epoch; querypose_platform.data.build_dataset), side by side on synthetic shard sets of two sizes.

    python benchmarks/stream_memory.py --sizes 4000 12000 --json benchmarks/results/stream_memory.json

For each size it generates and converts a synthetic set spanning many shards (cached under --data-root), then for
each stream measures: the time to build the dataset and to the first batch, the share of the run's row-group reads
done before the first batch (every read leaves a file in a trace folder), the peak object-store bytes above the
idle level while it runs (polled from the raylet), and images/s over --measure-images images after the first batch.
Goals: the new stream's first batch after a small share of the reads, and its peak flat as the set grows.

Each stream runs in a driver process of its own on one local Ray, its workers warmed up first. Both decode with the same function (OpenCV
single-threaded) and are consumed as the train loop consumes its shard: `iter_torch_batches` with the padding
collate_fn and a local shuffle buffer of 4 batches. The old builder below is a copy of the one this benchmark
replaced, kept here only to compare against.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from querypose_platform.config import load_config  # noqa: E402
from querypose_platform.data import (  # noqa: E402
    READ_COLUMNS,
    BatchCollator,
    _decode_and_transform,
    build_dataset,
    row_groups,
)
from querypose_platform.shards import convert, has_manifest, shard_files  # noqa: E402
from querypose_platform.storage import filesystem  # noqa: E402

SETTINGS = [  # small images, augmentation scaled to them
    "data.train_short_sides=[64, 80, 96]", "data.train_max_size=160", "data.crop_resize_sides=[96]",
    "data.crop_size=[48, 96]",
]  # fmt: skip


# --- the old stream, as it was before issue 16 (a faithful copy; not used outside this benchmark) ---------------


def _old_read_row_groups(items: pa.Table, trace: str) -> Iterator[pa.Table]:
    for file, index, item in zip(
        items["file"].to_pylist(), items["row_group"].to_pylist(), items["item"].to_pylist(), strict=True
    ):
        (Path(trace) / f"{item:07d}").touch()
        fs, path = filesystem(file)
        with fs.open_input_file(path) as stream:
            yield pq.ParquetFile(stream).read_row_group(index, columns=READ_COLUMNS)


def _old_decode(rows: dict[str, np.ndarray], cfg, train: bool, epoch: int) -> dict[str, np.ndarray]:
    return _decode_and_transform({**rows, "epoch": np.full(len(rows["image_id"]), epoch)}, cfg, train)


def old_build_dataset(shard_uri: str, cfg, *, epochs: int, trace: str) -> ray.data.Dataset:
    """The train path of the old build_dataset: `epochs` passes, each read in full and block-shuffled, unioned."""
    groups = row_groups(shard_files(shard_uri))

    def one_pass(epoch: int) -> ray.data.Dataset:
        task_cpus = cfg.data.cpus_per_task
        items = [{**g, "item": epoch * len(groups) + i} for i, g in enumerate(groups)]
        ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
            _old_read_row_groups, fn_kwargs={"trace": trace}, batch_size=1, batch_format="pyarrow", num_cpus=task_cpus
        )
        ds = ds.randomize_block_order(seed=cfg.train.seed + epoch)
        return ds.map_batches(
            _old_decode,
            fn_kwargs={"cfg": cfg, "train": True, "epoch": epoch},
            batch_format="numpy",
            batch_size=8,
            num_cpus=task_cpus,
        )

    passes = [one_pass(epoch) for epoch in range(epochs)]
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


# --- measurement ------------------------------------------------------------------------------------------------


class StorePoller:
    """Object-store bytes in use on the cluster, polled in a thread. Ray 2.60 has no public call for it; this is
    the raylet query behind `ray memory --stats-only` (ray._private.internal_api)."""

    def __init__(self, interval_s: float = 0.1):
        from ray._private import internal_api

        self._api = internal_api
        self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> int:
        return int(self._api.get_memory_info_reply(self._state).store_stats.object_store_bytes_used)

    def __enter__(self) -> StorePoller:
        self.peak = self.used()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def settle(self, timeout_s: float = 60.0) -> int:
        """Wait until the cluster is idle (every CPU free: the warm-up's tasks are done) and the store level holds
        still for 2 s; returns that level."""
        deadline, level, still = time.monotonic() + timeout_s, self.used(), 0
        while time.monotonic() < deadline and still < 4:
            time.sleep(0.5)
            now = self.used()
            idle = ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0)
            still = still + 1 if idle and abs(now - level) < 2**20 else 0
            level = now
        return level


def measure(build: Callable[[str], ray.data.Dataset], cfg, total_reads: int, args, warm_uri: str, trace: str) -> dict:
    """One stream, from this process as a driver of the benchmark's Ray (RAY_ADDRESS): warm the job's workers up,
    build the stream, take the first batch, then --measure-images images, with the object store polled
    throughout."""
    ray.init(log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # an execution plan line per stream
    # Worker processes start and import the project here, not inside the measurement.
    for _ in build_dataset(warm_uri, cfg, train=False).limit(64).iter_batches(batch_size=16):
        pass
    poller = StorePoller()
    idle = poller.settle()
    with poller:
        started = time.perf_counter()
        dataset = build(trace)
        built = time.perf_counter()
        batches = iter(
            dataset.iter_torch_batches(
                batch_size=args.batch_size, collate_fn=BatchCollator(cfg.model.spec.num_keypoints),
                drop_last=True, local_shuffle_buffer_size=4 * args.batch_size, local_shuffle_seed=cfg.train.seed,
            )
        )  # fmt: skip
        next(batches)
        first_at = time.perf_counter()
        reads_at_first = len(os.listdir(trace))
        images = 0
        for batch in batches:
            images += len(batch.image_ids)
            if images >= args.measure_images:
                break
        ended = time.perf_counter()
    return {
        "build_s": built - started,
        "first_batch_s": first_at - built,
        "reads_at_first_batch": reads_at_first,
        "read_share_at_first_batch": reads_at_first / total_reads,
        "peak_store_mb": (poller.peak - idle) / 2**20,
        "images_per_s": images / max(ended - first_at, 1e-9),
        "measured_images": images,
    }


def shard_set(root: Path, images: int, image_size: int, shard_mb: float) -> str:
    """A synthetic COCO-format set of `images` converted into shards of about `shard_mb` MB (cached)."""
    from querypose.synthetic import write_synthetic_dataset

    uri = str(root / f"coco_{images}x{image_size}_{shard_mb}mb" / "train")
    if not has_manifest(uri):
        raw = root / "raw" / f"coco_{images}x{image_size}"
        if not (raw / "annotations.json").is_file():
            write_synthetic_dataset(raw, images, dataset="coco", seed=0, image_size=image_size)
        convert("coco", raw / "annotations.json", raw / "images", uri, shard_mb=shard_mb)
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 12000], help="training images per set")
    parser.add_argument("--image-size", type=int, default=96, help="short side of the synthetic images")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="image bytes per shard file")
    parser.add_argument("--epochs", type=int, default=3, help="epochs in the stream (the old one: passes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--measure-images", type=int, default=2000, help="images after the first batch for images/s")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "querypose-stream-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timeout-s", type=float, default=600, help="a stream without a result by then: stalled")
    parser.add_argument("--only", nargs=3, metavar=("STREAM", "URI", "TRACE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cfg = load_config(None, SETTINGS)
    uris = {size: shard_set(args.data_root, size, args.image_size, args.shard_mb) for size in args.sizes}
    warm_uri = uris[min(uris)]
    if args.only:  # one measurement, in a process of its own (see below); its result as the last stdout line
        name, uri, trace = args.only
        build = {
            "old": lambda trace: old_build_dataset(uri, cfg, epochs=args.epochs, trace=trace),
            "new": lambda trace: build_dataset(uri, cfg, train=True, epochs=args.epochs, trace_reads=trace),
        }[name]
        total_reads = args.epochs * len(row_groups(shard_files(uri)))
        print(json.dumps(measure(build, cfg, total_reads, args, warm_uri, trace)))
        return 0
    # One local Ray for every measurement; each measurement is a driver process of its own that connects to it: a
    # stopped stream's executor threads outlive it in the driver (and would start a Ray of their own after a
    # ray.shutdown()), and the objects of a driver that exits are freed.
    # On a busy machine (this one runs at nice 19 beside other jobs) Ray's metrics agent can take longer to start
    # than the raylet waits for it by default, and ray.init fails with "node timed out during startup".
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    rows = []
    for size, uri in uris.items():
        groups = row_groups(shard_files(uri))
        for name in ("old", "new"):
            trace = tempfile.mkdtemp(prefix="stream-trace-")
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", name, uri,
                       trace]  # fmt: skip
            try:
                # The exit status is not checked: Ray Data's threads can fail noisily while the driver disconnects.
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout_s)
                last = (done.stdout.strip().splitlines() or [""])[-1]
                if not last.startswith("{"):
                    raise RuntimeError(f"{name} stream on {uri} gave no result:\n{done.stderr[-3000:]}")
                result = json.loads(last)
            except subprocess.TimeoutExpired:  # a stream that stalls (no first batch): reported as such
                reads = len(os.listdir(trace))
                result = {"build_s": math.nan, "first_batch_s": math.inf, "reads_at_first_batch": reads,
                          "read_share_at_first_batch": reads / (args.epochs * len(groups)), "peak_store_mb": math.nan,
                          "images_per_s": 0.0, "measured_images": 0, "stalled_after_s": args.timeout_s}  # fmt: skip
            shutil.rmtree(trace, ignore_errors=True)
            rows.append({"images": size, "stream": name, "shards": len(shard_files(uri)), "row_groups": len(groups),
                         "run_reads": args.epochs * len(groups), **result})  # fmt: skip
            print(f"[stream_memory] {size} images, {name}: {json.dumps({k: round(v, 3) for k, v in result.items()})}",
                  flush=True)  # fmt: skip

    print(f"\n{args.epochs} epochs, batch {args.batch_size}, {args.cpus} CPUs, {args.image_size} px images, "
          f"images/s over {args.measure_images} images after the first batch")  # fmt: skip
    print("| images | shards | row groups x epochs | stream | build s | first batch s | reads before 1st batch "
          "| peak object store MB | images/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['shards']} | {r['row_groups']} x {args.epochs} | {r['stream']} | "
              f"{r['build_s']:.2f} | {r['first_batch_s']:.2f} | {r['reads_at_first_batch']} "
              f"({100 * r['read_share_at_first_batch']:.1f}%) | {r['peak_store_mb']:.1f} | {r['images_per_s']:.0f} |")  # fmt: skip
    report = {
        "settings": {
            **vars(args),
            "data_root": str(args.data_root),
            "json": str(args.json),
            "cpus_per_task": cfg.data.cpus_per_task,
            "machine_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "ray": ray.__version__,
        },  # fmt: skip
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
