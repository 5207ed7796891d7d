"""Training across two Ray nodes: a `ray.cluster_utils.Cluster` on this machine (gloo over 127.0.0.1), the two
workers forced onto different nodes, each rank reading its own disjoint part of the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster
from test_train import TINY

from querypose_platform.config import load_config
from querypose_platform.shards import ensure_synthetic_shards
from querypose_platform.trainer import fit

TRAINER_RESOURCE = "querypose_trainer"  # only the two worker nodes carry it: the workers cannot land on the head


@pytest.fixture
def two_node_cluster():
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


def test_two_workers_on_two_nodes_train_on_disjoint_data(two_node_cluster, tmp_path):
    cfg = load_config(None, [
        *TINY, f"data.root={tmp_path / 'shards'}", "data.synthetic={train_images: 8, val_images: 2, image_size: 96}",
        f"run.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}", "scaling.num_workers=2", "train.batch_size=2",
        "train.max_iters=2", "train.checkpoint_every=2", "train.eval_every=2", "scaling.placement_strategy=STRICT_SPREAD",
        f"scaling.extra_resources={{{TRAINER_RESOURCE}: 1}}",
    ])  # fmt: skip
    ensure_synthetic_shards(cfg)
    outcome = fit(cfg)

    assert outcome.metrics["iteration"] == 2 and 0.0 <= outcome.metrics["AP"] <= 1.0
    ranks = [json.loads((Path(outcome.checkpoint_path) / "data" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {rank["node_id"] for rank in ranks} == two_node_cluster, "one worker on each worker node"
    images = [set(rank["image_ids"]) for rank in ranks]
    assert len(images[0]) == len(images[1]) == 2 and not images[0] & images[1]
