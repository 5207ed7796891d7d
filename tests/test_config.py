import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from querypose.config import ConfigError, ModelConfig
from querypose_platform.config import ExperimentConfig, check_multinode, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_coco_r50_model():
    cfg = ModelConfig()
    assert (cfg.query_type, cfg.interaction, cfg.iteration) == ("part", "spegm", "selective")
    assert (cfg.part_dim, cfg.part_scheme, cfg.instance_pipeline) == (128, "rigid7", "serial")
    assert (cfg.num_queries, cfg.num_stages, cfg.backbone, cfg.dataset) == (100, 6, "resnet50", "coco")
    assert (cfg.cls_weight, cfg.l1_weight, cfg.giou_weight, cfg.rle_weight) == (2.0, 5.0, 2.0, 1.0)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  part_dim: 64\n  dataset: crowdpose\ntrain:\n  max_iters: 10\n")
    cfg = load_config(path, ["model.part_scheme=limbs5", "train.lr=1e-4", "scaling.num_workers=2"])
    assert cfg.model.part_dim == 64 and cfg.model.dataset == "crowdpose"
    assert cfg.model.part_scheme == "limbs5"
    assert cfg.train.max_iters == 10 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.per_worker_batch_size == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.part_dim=48"], "model.part_dim: 48 is not allowed; allowed values: 128, 32, 64, 256"),
        (["model.interaction=transformer"], "model.interaction: 'transformer' is not allowed"),
        (["model.foo=1"], "model.foo: unknown key"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["model.num_queries=ten"], "model.num_queries: expected an integer"),
        (["model.num_queries=0"], "model.num_queries: must be >= 1"),
        (["model.hidden_dim=100"], "model.hidden_dim: 100 is not divisible by model.num_heads"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["data.crop_prob=1.5"], "data.crop_prob: must be in [0, 1]"),
        (["scaling.placement_strategy=RANDOM"], "scaling.placement_strategy: 'RANDOM' is not allowed"),
        (["model.query_type=instance"], "model.query_type='instance' cannot use model.interaction='spegm'"),
        (["model.interaction=spatial_attention"], "model.query_type='part' cannot use"),
        (
            ["model.query_type=instance", "model.interaction=mhsa"],
            "model.iteration='selective' iterates part queries",
        ),
        (["model.backbone=hrnet_w32", "model.backbone_norm=group_norm"], "applies to ResNet backbones"),
        (["model.backbone_norm=layer_norm"], "model.backbone_norm: 'layer_norm' is not allowed"),
        (["model.prune_queries_after_stage=6"], "model.prune_queries_after_stage: must be in 1..5"),
        (["train.batch_size=3", "scaling.num_workers=2"], "train.batch_size: 3 is not divisible"),
        (["tune.axes.lr=[1, 2]"], "tune.axes.lr: unknown grid axis"),
        (["tune.axes.part_dim=[]"], "tune.axes.part_dim: an axis needs at least one value"),
        (["tune.cells=[{part_dim: 48}]"], "tune cell 0 {'part_dim': 48}: model.part_dim: 48 is not allowed"),
        (["model"], "expected dotted.key=value"),
        (["model.dataset=custom"], "model.keypoints: missing: model.dataset=custom needs its keypoint set"),
        (["model.keypoints=set.yaml"], "model.keypoints: given, but model.dataset='coco' is a built-in"),
        (["model.dataset=custom", "model.keypoints=nope.yaml"], "model.keypoints: keypoint set file nope.yaml"),
        (["model.dataset=crowdpose", "model.part_scheme=limbs6"], "model.part_scheme: 'limbs6' is not allowed"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_instance_queries_with_a_valid_interaction_load():
    cfg = load_config(None, ["model.query_type=instance", "model.interaction=mhsa", "model.iteration=none"])
    assert cfg.model.query_type == "instance"


def test_spegm_coordinates_need_spegm():
    overrides = ["model.query_type=instance", "model.interaction=mhsa", "model.iteration=none"]
    with pytest.raises(ConfigError, match="model.roi_coordinates='spegm' .* use model.roi_coordinates='tower'"):
        load_config(None, [*overrides, "model.roi_coordinates=spegm"])
    assert load_config(None, [*overrides, "model.roi_coordinates=tower"]).model.roi_coordinates == "tower"


def test_soft_argmax_readout_needs_keypoint_queries():
    with pytest.raises(ConfigError, match="model.keypoint_readout='soft_argmax' .* use 'regression'"):
        load_config(None, ["model.keypoint_head=conv_gap_baseline", "model.keypoint_readout=soft_argmax"])
    instance = ["model.query_type=instance", "model.interaction=mhsa", "model.iteration=none"]
    assert load_config(None, [*instance, "model.keypoint_readout=soft_argmax"]).model.keypoint_readout == "soft_argmax"


def test_constructor_also_validates():
    with pytest.raises(ConfigError, match="model.part_scheme"):
        ModelConfig(part_scheme="ten_parts")


def test_grid_cells_product_and_explicit_cells():
    cfg = load_config(
        None,
        ["tune.axes={part_dim: [32, 64], iteration: [none, sum]}", "tune.cells=[{part_dim: 32, iteration: none}]"],
    )
    cells = cfg.tune.grid_cells()
    assert cells[0] == {"part_dim": 32, "iteration": "none"}
    assert len(cells) == 4  # the explicit cell is also in the product: no repeats
    assert {c["part_dim"] for c in cells} == {32, 64}


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=shards", "tracking.uri=sqlite:///runs.db", "run.storage_path=res"])
    assert cfg.data.root == str(tmp_path / "shards")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'runs.db'}"
    assert cfg.run.storage_path == str(tmp_path / "res")
    assert load_config(None, ["data.root=s3://bucket/shards"]).data.root == "s3://bucket/shards"


def test_outputs_follow_querypose_home_and_mlflow_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("QUERYPOSE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["data.root=shards"])
    assert cfg.data.root == str(tmp_path / "shards")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert cfg.tracking.artifact_location == str(tmp_path / "mlartifacts")
    assert cfg.run.storage_path == str(tmp_path / "ray_results")
    assert load_config(None).data.root == str(tmp_path / "data" / "synthetic" / "shards")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(None).tracking.uri == "http://127.0.0.1:5000"
    assert load_config(None, ["tracking.uri=sqlite:///x.db"]).tracking.uri == f"sqlite:///{tmp_path / 'x.db'}"


def test_tracking_uri_precedence_command_line_yaml_environment_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QUERYPOSE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("tracking:\n  uri: http://from-yaml:5000\n")
    assert load_config(None).tracking.uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert load_config(None).tracking.uri == "http://from-env:5000"
    assert load_config(experiment).tracking.uri == "http://from-yaml:5000"
    assert load_config(experiment, ["tracking.uri=http://from-cli:5000"]).tracking.uri == "http://from-cli:5000"


def test_a_tracking_server_decides_where_artifacts_go(tmp_path, monkeypatch):
    monkeypatch.setenv("QUERYPOSE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(None).tracking.artifact_location is None
    remote = load_config(None, ["tracking.artifact_location=s3://bucket/mlartifacts"]).tracking
    assert remote.artifact_location == "s3://bucket/mlartifacts"
    with pytest.raises(ConfigError, match="tracking.artifact_location: .* is a local path"):
        load_config(None, ["tracking.artifact_location=/data/mlartifacts"])
    local = load_config(None, ["tracking.uri=sqlite:///runs.db"]).tracking
    assert local.artifact_location == str(tmp_path / "mlartifacts")


def test_no_shipped_config_names_a_tracking_server():
    """A host in a YAML would beat MLFLOW_TRACKING_URI (a RayJob's environment): servers come from outside."""
    for path in CONFIGS:
        tracking = yaml.safe_load(path.read_text()).get("tracking") or {}
        assert "uri" not in tracking, path.name


def test_a_multinode_cluster_needs_paths_every_node_sees(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = load_config(None)
    check_multinode(local, num_nodes=1)  # one node: local paths are fine
    with pytest.raises(ConfigError, match="tracking.uri: sqlite:.* the Ray cluster has 3 nodes"):
        check_multinode(local, num_nodes=3)
    server = ["tracking.uri=http://mlflow:5000"]
    with pytest.raises(ConfigError, match="run.storage_path: .* is a local path"):
        check_multinode(load_config(None, server), num_nodes=3)
    with pytest.raises(ConfigError, match="data.root: .* is a local path"):
        check_multinode(load_config(None, [*server, "run.storage_path=s3://b/results"]), num_nodes=3)
    check_multinode(load_config(None, [*server, "run.storage_path=s3://b/r", "data.root=gs://b/shards"]), 3)
    check_multinode(load_config(None, [*server, "run.shared_filesystem=true"]), 3)  # an NFS mount on every node
    with pytest.raises(ConfigError, match="tracking.uri"):
        check_multinode(load_config(None, ["run.shared_filesystem=true"]), 3)


def test_yaml_round_trip():
    cfg = load_config(None, ["model.part_dim=32", "tune.axes.iteration=[none, selective]"])
    again = ExperimentConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    cfg.check_trainable()
    # every config for real data names the weights the paper starts from; the synthetic ones train from scratch
    assert (cfg.data.synthetic is None) == cfg.model.has_backbone_weights


def test_training_on_real_data_needs_backbone_weights_or_an_explicit_none():
    with pytest.raises(ConfigError, match="model.backbone_weights: a config for real data must name"):
        load_config(None, ["data.root=s3://bucket/coco"]).check_trainable()
    for weights in ("timm/resnet50.tv_in1k", "none"):
        load_config(None, [f"model.backbone_weights={weights}"]).check_trainable()
    synthetic = load_config(None, ["data.synthetic={train_images: 4}"])
    synthetic.check_trainable()
    assert synthetic.model.resolved_backbone_norm == "group_norm"
    result = subprocess.run(
        [sys.executable, "experiments/train.py", "data.root=s3://bucket/coco"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "model.backbone_weights: a config for real data" in result.stderr


def test_bad_config_fails_before_anything_heavy_is_imported():
    """Validation imports neither torch nor ray, so a bad key fails in a fraction of a second."""
    code = (
        "import sys\n"
        "from querypose_platform.config import load_config, ConfigError\n"
        "try:\n    load_config(None, ['model.x=1'])\n"
        "except ConfigError as e:\n    print(e)\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'timm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.splitlines() == [result.stdout.splitlines()[0], "[]"]
    assert result.stdout.startswith("model.x: unknown key")


def test_a_custom_keypoint_set_is_read_once_and_travels_as_a_mapping(tmp_path):
    """model.keypoints in a YAML is relative to that YAML; once loaded, the config (what MLflow logs, Ray workers
    and weights files get) holds the whole set, so nothing needs the file again."""
    quadruped = REPO / "experiments" / "configs" / "keypoints" / "quadruped.yaml"
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "animals.yaml").write_text(quadruped.read_text())
    (tmp_path / "exp").mkdir()
    path = tmp_path / "exp" / "exp.yaml"
    path.write_text("model:\n  dataset: custom\n  keypoints: ../sets/animals.yaml\n  part_scheme: limbs6\n")
    cfg = load_config(path)
    assert cfg.model.spec.name == "quadruped" and cfg.model.spec.num_keypoints == 20
    assert cfg.model.keypoints == cfg.model.spec.to_dict()
    (tmp_path / "sets" / "animals.yaml").unlink()
    again = ExperimentConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg and again.model.spec == cfg.model.spec
    with pytest.raises(ConfigError, match="model.part_scheme: 'rigid7' is not allowed; allowed values: 'limbs6'"):
        load_config(None, ["model.dataset=custom", f"model.keypoints={quadruped}"])
