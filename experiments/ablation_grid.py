"""Run an ablation grid of QueryPose on Ray Tune: one trial (and one TorchTrainer) per cell of the config's
`tune` section, one MLflow parent run with a child run per cell, and the paper-layout results table.

    python experiments/ablation_grid.py --config experiments/configs/ablation_synthetic.yaml
    python experiments/ablation_grid.py --config experiments/configs/ablation_table1.yaml --resume
    ray job submit --working-dir . -- python experiments/ablation_grid.py --config experiments/configs/ablation_synthetic.yaml

Without a cluster address this starts a local Ray in-process; under `ray job submit` (or with RAY_ADDRESS) it
runs on that cluster. `--resume` restores a stopped grid (Tuner.restore, errored trials included: each
continues from its last Ray Train checkpoint into its own MLflow run), then runs the cells it never started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from querypose_platform.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML with a tune section")
    parser.add_argument(
        "--resume", action="store_true", help="run only the cells of this grid (same run.name) that have not finished"
    )
    parser.add_argument(
        "--stop-after", type=int, help="run only this many of the cells still to do (resume the rest later)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=50")
    args = parser.parse_args(argv)
    try:
        if args.stop_after is not None and args.stop_after < 1:
            raise ConfigError(f"--stop-after: must be >= 1, got {args.stop_after}")
        cfg = load_config(args.config, args.overrides)
        cfg.check_trainable()
        if not cfg.tune.grid_cells():
            raise ConfigError("tune: the grid is empty: give tune.axes or tune.cells")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from querypose_platform.ray_runtime import check_cluster, init_ray
    from querypose_platform.shards import ensure_synthetic_shards
    from querypose_platform.tracking import where_to_look
    from querypose_platform.tuning import (
        check_same_grid,
        close_parent,
        log_results_table,
        open_parent_run,
        register_best,
        run_grid,
    )

    cells = cfg.tune.grid_cells()
    print(f"[grid] {cfg.run.name}: {len(cells)} cells, metric {cfg.tune.metric} ({cfg.tune.mode})", flush=True)
    init_ray()
    try:
        check_cluster(cfg)  # before any run is opened: a path that cannot work on this cluster names its key
        check_same_grid(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cfg.data.synthetic is not None:
        ensure_synthetic_shards(cfg)  # once, before the trials race to create it
    parent_run_id = open_parent_run(cfg)
    print(f"[grid] MLflow parent run {parent_run_id} in experiment {cfg.tracking.experiment!r}", flush=True)
    try:
        results = run_grid(cfg, parent_run_id, args.resume, args.stop_after)
    except BaseException as error:
        close_parent(cfg, parent_run_id, error)
        raise
    rows, markdown = log_results_table(cfg, parent_run_id)
    unfinished = [row["cell"] for row in rows if row["status"] != "FINISHED"]
    print("\n" + markdown + "\n")
    if unfinished:
        print(f"[grid] {len(unfinished)} cells unfinished ({', '.join(unfinished)}): rerun with --resume")
        return 0 if args.stop_after else 1
    errors = [result.error for result in results if result.error is not None]
    close_parent(cfg, parent_run_id, errors[0] if errors else None)
    uri = register_best(cfg, rows)
    if uri:
        print(f"[grid] best cell registered as {uri}")
    print(f"[grid] compare the runs under the parent run {cfg.run.name!r}; {where_to_look(cfg.tracking)}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
