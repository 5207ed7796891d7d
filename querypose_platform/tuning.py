"""The ablation grid on Ray Tune: one function trial per cell, each fitting its own TorchTrainer; one MLflow
parent run per grid and one child run per cell, keyed so that restores and retries never open a second run."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from querypose.config import ConfigError
from querypose.evaluation import METRIC_NAMES
from querypose_platform import plots
from querypose_platform.config import ExperimentConfig
from querypose_platform.tracking import (
    MAX_PARAM_LENGTH,
    RunLogger,
    client_for,
    find_run_id,
    finish_run,
    flatten,
    open_run,
)
from querypose_platform.trainer import fit

TABLE_COLUMNS = {  # by evaluation protocol
    "coco": ("AP", "AP50", "AP75", "APm", "APl"),
    "crowdpose": ("AP", "AP50", "AP75", "APe", "APm", "APh"),
}
CELL_TAG = "querypose.cell"
# Settings whose change makes a cell's checkpoints another experiment's (a rerun would continue from them).
CHECKPOINT_SETTINGS = ("model.", "data.", "train.")


def cell_key(cell: dict[str, Any]) -> str:
    """A deterministic name for a cell: its switches sorted by name, e.g. 'part_dim=64,query_type=part'."""
    return ",".join(f"{name}={cell[name]}" for name in sorted(cell))


def cell_slug(cell: dict[str, Any]) -> str:
    """A short, path-safe folder name for the cell's Ray Train run."""
    readable = re.sub(r"[^A-Za-z0-9=_.-]+", "_", cell_key(cell))[:80]
    digest = hashlib.sha1(cell_key(cell).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def grid_run_key(cfg: ExperimentConfig) -> str:
    return f"grid:{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def cell_config(cfg: ExperimentConfig, cell: dict[str, Any]) -> ExperimentConfig:
    """The experiment of one cell: the model switches applied, its own Ray Train run folder."""
    cell_cfg = cfg.with_model(**cell)
    run = dataclasses.replace(cfg.run, name=cell_slug(cell), storage_path=f"{_experiment_path(cfg)}/cells")
    return dataclasses.replace(cell_cfg, run=run)


def run_cell(config: dict[str, Any], experiment: dict[str, Any], parent_run_id: str) -> None:
    """Tune function trainable: fit the cell's TorchTrainer; its reports reach Tune through GridReportCallback.
    The experiment and parent run come through tune.with_parameters, so a trial's config (the table Tune prints
    when the trial starts) is the cell alone."""
    cfg = ExperimentConfig.from_dict(experiment)
    cell = config["cell"]
    fit(
        cell_config(cfg, cell),
        run_key=f"grid:{parent_run_id}:{cell_key(cell)}",
        parent_run_id=parent_run_id,
        tags={CELL_TAG: cell_key(cell), **{f"querypose.{name}": str(value) for name, value in cell.items()}},
        callbacks=[GridReportCallback(cfg)],
    )


class GridReportCallback(TuneReportCallback):
    """Ray Train -> Tune reports with the grid's columns only (iteration, loss, images/s and the eval metrics):
    Tune prints every reported key in its tables, and the loss terms are in MLflow."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.keys = {"iteration", "loss", "images_per_s", cfg.tune.metric, *METRIC_NAMES[cfg.model.spec.evaluation]}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        kept = [{key: value for key, value in rank.items() if key in self.keys} for rank in metrics]
        super().after_report(run_context, kept, checkpoint)


def _trainable(cfg: ExperimentConfig, parent_run_id: str):
    trainable = tune.with_parameters(run_cell, experiment=cfg.to_dict(), parent_run_id=parent_run_id)
    return tune.with_resources(trainable, {"CPU": cfg.tune.trial_cpus})


def _experiment_path(cfg: ExperimentConfig) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def build_tuner(cfg: ExperimentConfig, parent_run_id: str, cells: list[dict[str, Any]]) -> tune.Tuner:
    """One trial per cell in `cells`."""
    return tune.Tuner(
        _trainable(cfg, parent_run_id),
        param_space={"cell": tune.grid_search(cells)},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, max_concurrent_trials=cfg.tune.max_concurrent_trials
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            # Status tables only: each result is in MLflow, and rank 0 prints a progress line per log interval.
            verbose=1,
        ),
    )


def finished_cells(cfg: ExperimentConfig, parent_run_id: str) -> set[str]:
    """Keys of the cells that have a FINISHED child run under the grid's parent run."""
    return {row["cell"] for row in results_rows(cfg, parent_run_id) if row["status"] == "FINISHED"}


def run_grid(cfg: ExperimentConfig, parent_run_id: str, resume: bool, stop_after: int | None) -> list:
    """Fit the grid's cells; returns the Tune results.

    resume: first `Tuner.restore(..., resume_errored=True)` of the stopped grid, so its errored and interrupted
    trials continue (each TorchTrainer from its last checkpoint, each into its own MLflow run); then a new Tuner
    for the cells that still have no finished run. The second step is needed because with max_concurrent_trials
    the searcher creates a trial only when a slot frees, so a grid stopped early holds no record of the cells it
    never started. stop_after: run at most this many of the cells still to do (the rest wait for --resume).
    """
    results: list = []
    if resume and tune.Tuner.can_restore(_experiment_path(cfg)):
        results.extend(
            tune.Tuner.restore(_experiment_path(cfg), _trainable(cfg, parent_run_id), resume_errored=True).fit()
        )
    done = finished_cells(cfg, parent_run_id) if resume else set()
    cells = [cell for cell in cfg.tune.grid_cells() if cell_key(cell) not in done][:stop_after]
    if resume:
        print(f"[grid] resuming: {len(done)} cells finished, {len(cells)} to run", flush=True)
    if cells:
        results.extend(build_tuner(cfg, parent_run_id, cells).fit())
    return results


def grid_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The parent run's params: the flattened experiment, with the cells instead of the tune section."""
    params = {key: value for key, value in flatten(cfg.to_dict()).items() if not key.startswith("tune.")}
    params["tune.cells"] = ";".join(cell_key(cell) for cell in cfg.tune.grid_cells())
    return params


def check_same_grid(cfg: ExperimentConfig) -> None:
    """A grid's cells continue from the checkpoints and MLflow runs found under the same run.storage_path and
    run.name (a stopped grid, or `make demo` run twice, picks up where it was). Refuse a rerun whose model, data
    or training settings differ from the ones that grid logged: its cells would continue another experiment."""
    run_id = find_run_id(cfg.tracking, grid_run_key(cfg))
    if run_id is None:
        return
    logged = client_for(cfg.tracking).get_run(run_id).data.params
    now = {key: str(value)[:MAX_PARAM_LENGTH] for key, value in grid_params(cfg).items()}  # as MLflow stored them
    changed = {
        key: (logged[key], value)
        for key, value in now.items()
        if key.startswith(CHECKPOINT_SETTINGS) and key in logged and logged[key] != value
    }
    if changed:
        details = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in list(changed.items())[:4])
        raise ConfigError(
            f"run.name: the grid {cfg.run.name!r} in {cfg.run.storage_path} ran with other settings ({details}"
            f"{', ...' if len(changed) > 4 else ''}) and its cells would continue from those checkpoints; give "
            f"this experiment a new run.name (or delete {_experiment_path(cfg)} and MLflow run {run_id})"
        )


def open_parent_run(cfg: ExperimentConfig) -> str:
    return open_run(
        cfg.tracking, grid_run_key(cfg), cfg.run.name, params=grid_params(cfg), tags={"querypose.grid": "parent"}
    )


def results_rows(cfg: ExperimentConfig, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per cell, from the child runs' last eval metrics (MLflow is the source of truth)."""
    client = client_for(cfg.tracking)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    by_key = {run.data.tags.get(CELL_TAG): run for run in children}
    rows = []
    for cell in cfg.tune.grid_cells():
        run = by_key.get(cell_key(cell))
        row: dict[str, Any] = {"cell": cell_key(cell), "run_id": run.info.run_id if run else "", **cell}
        row["status"] = run.info.status if run else "MISSING"
        for name in METRIC_NAMES[cfg.model.spec.evaluation]:
            if run is not None and f"val/{name}" in run.data.metrics:
                row[name] = run.data.metrics[f"val/{name}"]
        rows.append(row)
    return rows


def table_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    header = "| cell | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        # pycocotools reports -1 for a size range without ground truth: shown as "-" like a missing value
        values = [f"{100 * row[c]:.1f}" if row.get(c, -1) >= 0 else "-" for c in columns]
        lines.append(f"| {row['cell']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def table_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", "run_id", "status", *columns])
    for row in rows:
        writer.writerow([row["cell"], row["run_id"], row["status"], *(row.get(c, "") for c in columns)])
    return buffer.getvalue()


def log_results_table(cfg: ExperimentConfig, parent_run_id: str) -> tuple[list[dict[str, Any]], str]:
    """The paper-layout table (rows = cells, AP columns in %) on the parent run as CSV, markdown and bars."""
    rows = results_rows(cfg, parent_run_id)
    columns = TABLE_COLUMNS[cfg.model.spec.evaluation]
    markdown = table_markdown(rows, columns)
    with RunLogger(cfg.tracking, parent_run_id) as logger:
        logger.log_text(markdown + "\n", "results/table.md")
        logger.log_text(table_csv(rows, columns), "results/table.csv")
        logger.log_figure(plots.results_bar_figure(rows, list(columns)), "results/table.png")
    return rows, markdown


def register_best(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> str | None:
    """Register the best finished cell's weights (and config) in the MLflow model registry; returns the URI."""
    name = cfg.tune.register_model
    scored = [row for row in rows if cfg.tune.metric in row and row["status"] == "FINISHED"]
    if not name or not scored:
        return None
    pick = max if cfg.tune.mode == "max" else min
    best = pick(scored, key=lambda row: row[cfg.tune.metric])
    client = client_for(cfg.tracking)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="Best cell of a QueryPose ablation grid")
    run = client.get_run(best["run_id"])
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=best["run_id"], tags={CELL_TAG: best["cell"]}
    )
    return f"models:/{name}/{version.version}"


def close_parent(cfg: ExperimentConfig, parent_run_id: str, error: BaseException | None) -> None:
    finish_run(cfg.tracking, parent_run_id, error)
