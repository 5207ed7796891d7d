"""Experiment configuration: one YAML file = model + data + train + scaling + tracking + tune + run.

`load_config(path, overrides)` reads the YAML with `yaml.safe_load`, applies dotted overrides such as
`model.part_dim=64`, and validates everything (types, ranges, ablation values, grid cells) before any Ray
work starts. Errors are `ConfigError`s that name the dotted key. This module imports no Ray, MLflow or
torch, so a bad config fails fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from querypose.config import ConfigError, ModelConfig, build_dataclass
from querypose.synthetic import MAX_PEOPLE

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Model keys a grid may vary: the paper's ablation axes plus the widths that make small CPU grids possible.
GRID_AXES = (
    "query_type", "interaction", "iteration", "part_dim", "part_scheme", "instance_pipeline",
    "keypoint_head", "num_queries", "backbone", "num_stages", "keypoint_cost", "keypoint_training_queries",
    "cls_target", "aux_heatmap", "query_groups", "init_boxes", "roi_coordinates",
    "keypoint_readout", "readout_map_weight", "readout_peak_window", "prune_queries_after_stage",
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded default dataset, generated (and converted to shards) when `data.root` is missing."""

    train_images: int = 200
    val_images: int = 40
    image_size: int = 320
    seed: int = 0
    max_people: int = MAX_PEOPLE  # 1..6 people per image (6: the standard difficulty); fewer are also larger

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.synthetic.{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.max_people <= MAX_PEOPLE:
            raise ConfigError(f"data.synthetic.max_people: must be in 1..{MAX_PEOPLE}, got {self.max_people}")

    def folder_name(self, keypoint_set: str, split: str, count: int, seed: int) -> str:
        """The generated split's folder: every setting that changes its images is in the name."""
        name = f"{keypoint_set}_{split}_{count}x{self.image_size}_s{seed}"
        return name if self.max_people == MAX_PEOPLE else f"{name}_p{self.max_people}"


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/synthetic/shards"  # holds one converted shard set per split: <root>/<split>/
    train_split: str = "train"
    val_split: str = "val"
    synthetic: SyntheticConfig | None = None
    # Augmentation (ARCHITECTURE.md section 2): multi-scale short side, 50% crop, flip.
    train_short_sides: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_resize_sides: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    max_val_images: int | None = None
    # Logical CPUs per Ray Data read/decode task. Below 1 so that a 2-core machine whose train worker holds a
    # CPU can still schedule them (at 1.0, such a cluster waits forever for a free CPU).
    cpus_per_task: float = 0.5

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0:
            raise ConfigError(f"data.cpus_per_task: must be > 0, got {self.cpus_per_task}")
        if not self.train_short_sides or min(self.train_short_sides) < 1:
            raise ConfigError("data.train_short_sides: must be a non-empty list of positive sizes")
        for name in ("flip_prob", "crop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}: must be in [0, 1], got {getattr(self, name)}")
        if len(self.crop_size) != 2 or not 0 < self.crop_size[0] <= self.crop_size[1]:
            raise ConfigError(f"data.crop_size: expected [min, max] with 0 < min <= max, got {self.crop_size}")
        if not self.crop_resize_sides or min(self.crop_resize_sides) < 1:
            raise ConfigError("data.crop_resize_sides: must be a non-empty list of positive sizes")

    def split_uri(self, split: str) -> str:
        return f"{self.root.rstrip('/')}/{split}"


@dataclass(frozen=True)
class TrainConfig:
    max_iters: int = 140_000
    batch_size: int = 16  # global: split evenly over scaling.num_workers
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    flow_lr_mult: float = 10.0
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    lr_steps: list[int] = field(default_factory=lambda: [110_000, 130_000])
    lr_gamma: float = 0.1
    clip_grad: float = 1.0
    amp: bool = False  # bf16 autocast (GPU or CPU); the paper trains in float32
    log_every: int = 20
    checkpoint_every: int = 5000
    eval_every: int = 10_000
    seed: int = 0
    fail_at_iter: int | None = None  # fault injection for tests: the first attempt raises at this iteration

    def __post_init__(self) -> None:
        for name in ("max_iters", "batch_size", "log_every", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"train.warmup_factor: must be in (0, 1], got {self.warmup_factor}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"train.lr_steps: must be increasing, got {self.lr_steps}")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    extra_resources: dict[str, float] = field(default_factory=dict)  # custom resources each worker needs

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}"
    # Where a new experiment keeps its artifacts. Filled with a local folder only for local tracking; with an
    # MLflow server it stays unset and the server decides (its --serve-artifacts proxy or its object-store root).
    artifact_location: str | None = str(PROJECT_ROOT / "mlartifacts")
    experiment: str = "querypose"
    system_metrics: bool = True
    # Rank 0 keeps what it could not log while the server is away: at most this many entries (training waits
    # when they are all in use), and at the end of a run it waits this long for the server before giving up.
    max_pending: int = 10_000
    flush_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not is_local_tracking(self.uri) and self.artifact_location and not is_uri(self.artifact_location):
            raise ConfigError(
                f"tracking.artifact_location: {self.artifact_location} is a local path but tracking.uri="
                f"{self.uri} is a server: artifacts would land on the disk of whichever node logs them. Leave it "
                "unset (the server decides) or give an object-store URI (s3://..., gs://...)"
            )
        if self.max_pending < 1:
            raise ConfigError(f"tracking.max_pending: must be >= 1, got {self.max_pending}")
        if self.flush_timeout_s < 0:
            raise ConfigError(f"tracking.flush_timeout_s: must be >= 0, got {self.flush_timeout_s}")


@dataclass(frozen=True)
class TuneConfig:
    """The ablation grid: `axes` (cartesian product) and/or explicit `cells`, each a dict of model keys."""

    axes: dict[str, list[Any]] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = 1
    register_model: str | None = "querypose-ablation-best"
    # A trial only drives its TorchTrainer (the workers ask for their own resources); Tune refuses 0.
    trial_cpus: float = 0.01

    def __post_init__(self) -> None:
        for axis, values in self.axes.items():
            _check_grid_key(axis, f"tune.axes.{axis}")
            if not values:
                raise ConfigError(f"tune.axes.{axis}: an axis needs at least one value")
        for i, cell in enumerate(self.cells):
            if not isinstance(cell, dict) or not cell:
                raise ConfigError(f"tune.cells[{i}]: expected a non-empty mapping of model keys")
            for key in cell:
                _check_grid_key(key, f"tune.cells[{i}].{key}")
        if self.max_concurrent_trials < 1:
            raise ConfigError(f"tune.max_concurrent_trials: must be >= 1, got {self.max_concurrent_trials}")

    def grid_cells(self) -> list[dict[str, Any]]:
        """Every cell of the grid: explicit cells first, then the product of the axes, without repeats."""
        product = [dict(zip(self.axes, values, strict=True)) for values in itertools.product(*self.axes.values())]
        cells: list[dict[str, Any]] = []
        for cell in list(self.cells) + (product if self.axes else []):
            if cell not in cells:
                cells.append(cell)
        return cells


@dataclass(frozen=True)
class RunConfig:
    name: str = "querypose"
    storage_path: str = str(PROJECT_ROOT / "ray_results")
    max_failures: int = 2
    num_to_keep: int = 2
    # Local paths in data.root and run.storage_path are on storage every node mounts at the same place (NFS):
    # allowed on a multi-node cluster, where a local path is otherwise refused.
    shared_filesystem: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.train.batch_size % self.scaling.num_workers:
            raise ConfigError(
                f"train.batch_size: {self.train.batch_size} is not divisible by "
                f"scaling.num_workers={self.scaling.num_workers} (the batch is global)"
            )
        for i, cell in enumerate(self.tune.grid_cells()):
            try:
                dataclasses.replace(self.model, **cell)
            except ConfigError as error:
                raise ConfigError(f"tune cell {i} {cell}: {error}") from None

    def check_trainable(self) -> None:
        """What training needs beyond a valid config: on real data, the pretrained backbone weights the paper starts
        from, or an explicit 'none'. Called by the training entry points before any Ray work starts."""
        if self.data.synthetic is None and self.model.backbone_weights is None:
            raise ConfigError(
                "model.backbone_weights: a config for real data must name the pretrained backbone weights (a timm "
                "hub name such as timm/resnet50.tv_in1k, a local file, or an s3:// / gs:// URI), as the paper "
                "starts from ImageNet weights; say 'none' to train from random init on purpose"
            )

    @property
    def per_worker_batch_size(self) -> int:
        return self.train.batch_size // self.scaling.num_workers

    def with_model(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return build_dataclass(cls, data, "")


def is_uri(value: str) -> bool:
    """True for a URI with a scheme (s3://, gs://, http://, ...), false for a path on this machine."""
    return "://" in value and not value.startswith("file://")


def is_local_tracking(uri: str) -> bool:
    """True for tracking that lives in files on the machine that logs: a SQLite database or a file store."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_multinode(cfg: ExperimentConfig, num_nodes: int) -> None:
    """On a cluster of several nodes every path must mean the same data on each of them: a local path or a
    SQLite file would be a different (or missing) file on each node. SQLite stays refused on a shared mount too
    (its locking is not safe over NFS)."""
    if num_nodes <= 1:
        return
    why = f"the Ray cluster has {num_nodes} nodes and each would see its own disk"
    if is_local_tracking(cfg.tracking.uri):
        raise ConfigError(f"tracking.uri: {cfg.tracking.uri} is local to one node, but {why}; give an MLflow server")
    if cfg.run.shared_filesystem:
        return
    for key, value in (("run.storage_path", cfg.run.storage_path), ("data.root", cfg.data.root)):
        if not is_uri(value):
            raise ConfigError(
                f"{key}: {value} is a local path, but {why}; give an object-store URI (s3://, gs://), or set "
                "run.shared_filesystem=true if every node mounts it at the same place"
            )


def _check_grid_key(key: str, where: str) -> None:
    if key not in GRID_AXES:
        raise ConfigError(f"{where}: unknown grid axis; allowed axes: {', '.join(GRID_AXES)}")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected dotted.key=value, e.g. model.part_dim=64")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load and validate an experiment YAML (None = all defaults), then apply dotted overrides. A relative
    `model.keypoints` path is relative to the YAML that names it (on the command line: to the current directory)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    model = data.get("model")
    if path is not None and isinstance(model, dict) and isinstance(model.get("keypoints"), str):
        model["keypoints"] = str(Path(path).parent / model["keypoints"])  # an absolute path is kept by the join
    apply_overrides(data, overrides)
    _fill_local_outputs(data)
    return ExperimentConfig.from_dict(data)


def output_home() -> Path:
    """Where relative paths and the local outputs (mlruns.db, mlartifacts/, ray_results/) go: $QUERYPOSE_HOME,
    else the current directory. A `ray job submit` driver runs in an uploaded copy of the working dir, so a job
    that should write into the user's checkout sets QUERYPOSE_HOME in its runtime env (README)."""
    return Path(os.environ.get("QUERYPOSE_HOME") or Path.cwd()).resolve()


def _fill_local_outputs(data: dict[str, Any]) -> None:
    """Make relative local paths absolute (Ray Train workers run in other directories) and fill the output
    defaults. The tracking URI comes from the command line, else the YAML, else $MLFLOW_TRACKING_URI, else a
    SQLite file; only local tracking gets a local artifact folder. Outputs go to folders of output_home()."""
    home = output_home()
    defaults = {
        ("tracking", "uri"): os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db",
        ("run", "storage_path"): "ray_results",
        ("data", "root"): DataConfig.root,
    }
    for (section, key), default in defaults.items():
        if isinstance(data.setdefault(section, {}), dict):
            data[section].setdefault(key, default)
    tracking = data["tracking"]
    if isinstance(tracking, dict):
        local = isinstance(tracking["uri"], str) and is_local_tracking(tracking["uri"])
        tracking.setdefault("artifact_location", "mlartifacts" if local else None)
    for section, key in (("data", "root"), ("run", "storage_path"), ("tracking", "artifact_location")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            data[section][key] = str(home / value)
    tracking = data.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        uri = tracking["uri"]
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            tracking["uri"] = f"sqlite:///{home / uri[len('sqlite:///') :]}"
