"""Training across two Ray nodes: a `ray.cluster_utils.Cluster` on this machine, the two workers forced onto
different nodes, each rank reading its own disjoint part of the data. Data, checkpoints and tracking are where a
cluster keeps them (the session's S3 and MLflow servers); local paths are refused before anything starts."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
from ray.cluster_utils import Cluster
from test_train import TINY

from querypose.config import ConfigError
from querypose_platform.config import load_config
from querypose_platform.trainer import fit

TRAINER_RESOURCE = "querypose_trainer"  # only the two worker nodes carry it: the workers cannot land on the head


@pytest.fixture
def two_node_cluster(s3):
    """After the S3 store: its AWS_* variables reach every node's processes."""
    import ray

    ray.shutdown()  # the session's local Ray, if a previous module started it; the next module restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={TRAINER_RESOURCE: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield {node.node_id for node in nodes}
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes_train_on_disjoint_data(two_node_cluster, s3, mlflow_server, tmp_path):
    overrides = [
        *TINY, f"data.root={s3.uri('multinode-tests/shards')}", "data.synthetic={train_images: 8, val_images: 2, image_size: 96}",
        f"run.storage_path={s3.uri('multinode-tests/ray_results')}", f"tracking.uri={mlflow_server.url}",
        "tracking.experiment=multinode-tests", "scaling.num_workers=2", "train.batch_size=2", "train.max_iters=2",
        "train.checkpoint_every=2", "train.eval_every=2", "scaling.placement_strategy=STRICT_SPREAD",
        f"scaling.extra_resources={{{TRAINER_RESOURCE}: 1}}",
    ]  # fmt: skip
    # each node would see its own disk: refused before any data is made or any worker starts, naming the key
    for key, value in (("run.storage_path", tmp_path / "ray_results"), ("data.root", tmp_path / "shards"),
                       ("tracking.uri", f"sqlite:///{tmp_path / 'mlruns.db'}")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key}: .* the Ray cluster has 3 nodes"):
            fit(load_config(None, [*overrides, f"{key}={value}"]))
    assert not (tmp_path / "shards").exists()

    outcome = fit(load_config(None, overrides))
    assert outcome.metrics["iteration"] == 2 and 0.0 <= outcome.metrics["AP"] <= 1.0
    fs, path = pafs.FileSystem.from_uri(outcome.checkpoint_path)
    ranks = []
    for rank in (0, 1):
        with fs.open_input_stream(f"{path}/data/rank{rank}.json") as stream:
            ranks.append(json.loads(stream.read()))
    assert {rank["node_id"] for rank in ranks} == two_node_cluster, "one worker on each worker node"
    images = [set(rank["image_ids"]) for rank in ranks]
    assert len(images[0]) == len(images[1]) == 2 and not images[0] & images[1]
