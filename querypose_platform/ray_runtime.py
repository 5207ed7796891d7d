"""Connecting to Ray: the cluster that `ray job submit` (or RAY_ADDRESS) names, else a local Ray in-process."""

from __future__ import annotations

import os
import sys

import ray

from querypose_platform.config import ExperimentConfig

# Logical CPUs of the in-process Ray, at least. Ray Data's file-listing task always asks for one whole CPU
# beside the train workers' own; on a 2-core machine with a 1-CPU worker and a trial driver it would wait forever.
LOCAL_MIN_CPUS = 4


def init_ray() -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1))


def warn_if_no_cpu_for_data(cfg: ExperimentConfig, reserved: float = 0.0) -> bool:
    """Print a warning (and return True) when the cluster's CPUs, less the train workers' and `reserved`, leave
    no whole CPU for the Ray Data tasks: training would then wait for data forever unless the cluster grows."""
    total = ray.cluster_resources().get("CPU", 0.0)
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total - workers - reserved >= 1.0:
        return False
    print(
        f"warning: the Ray cluster has {total:g} CPUs and the train workers take {workers:g} "
        f"(scaling.num_workers x scaling.cpus_per_worker); Ray Data needs one more CPU to list and read the shards. "
        "Lower scaling.cpus_per_worker, add a node, or let the autoscaler add one.",
        file=sys.stderr,
        flush=True,
    )
    return True
