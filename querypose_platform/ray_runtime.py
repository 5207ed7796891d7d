"""Connecting to Ray: the cluster that `ray job submit` (or RAY_ADDRESS) names, else a local Ray in-process that
stays private to this user (loopback addresses, a token file only the user can read)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from unittest import mock

import ray
from ray._private import ray_constants

from querypose_platform.config import ExperimentConfig, check_multinode

# Logical CPUs of the in-process Ray, at least: train workers take one each, and the Ray Data tasks (fractional,
# see data.cpus_per_task) and a Tune trial driver still find room on a 2-core machine.
LOCAL_MIN_CPUS = 4
LOOPBACK = "127.0.0.1"


def init_ray(**options) -> None:
    """Connect to RAY_ADDRESS's cluster, or start a local Ray in this process. The local one is private: its
    node address is 127.0.0.1, so its GCS, raylet, workers, agents and dashboard listen on loopback only, and
    the token that Ray's token auth (on by default for a local Ray) checks is in a file only the user reads."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
        return
    ensure_private_token()
    # ray.init turns a loopback _node_ip_address into the machine's routable address unless Ray believes
    # multi-node clusters are off (its macOS/Windows default, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
    # ray is imported): only for this call, so that processes started later (`ray start --address`) are not
    # affected. Every Ray server binds the node address it is given.
    with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray.init(
            address="local",
            num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1),
            _node_ip_address=LOOPBACK,
            dashboard_host=LOOPBACK,
            **options,
        )


def token_path() -> Path:
    """Where Ray reads its token file: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_private_token() -> Path | None:
    """Make sure the token a local Ray will use is in a file only this user can read (mode 0600), before Ray
    starts: Ray 2.60 writes a missing token file with the umask's mode (0644 usually), readable by every local
    user. Nothing to do when the token comes from RAY_AUTH_TOKEN or auth is turned off."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))  # what Ray itself generates: 256 random bits as hex
    return path


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_cluster(cfg: ExperimentConfig) -> None:
    """Raise a ConfigError naming the key when a path of `cfg` cannot work on the connected cluster (a local
    path or SQLite file on a cluster of several nodes)."""
    check_multinode(cfg, alive_nodes())


def warn_if_no_cpu_for_data(cfg: ExperimentConfig, reserved: float = 0.0) -> bool:
    """Print a warning (and return True) when the cluster's CPUs, less the train workers' and `reserved`, leave
    less than one Ray Data task's CPUs: training would then wait for data until the cluster grows."""
    total = ray.cluster_resources().get("CPU", 0.0)
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total - workers - reserved >= cfg.data.cpus_per_task:
        return False
    print(
        f"warning: the Ray cluster has {total:g} CPUs and the train workers take {workers:g} "
        f"(scaling.num_workers x scaling.cpus_per_worker); Ray Data needs {cfg.data.cpus_per_task:g} more "
        "(data.cpus_per_task) to read the shards. Lower scaling.cpus_per_worker, add a node, or let the "
        "autoscaler add one.",
        file=sys.stderr,
        flush=True,
    )
    return True
