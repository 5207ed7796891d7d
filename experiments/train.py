"""Train QueryPose with Ray Train (TorchTrainer), tracked in MLflow.

    python experiments/train.py --config experiments/configs/synthetic.yaml
    python experiments/train.py --config experiments/configs/coco_r50.yaml scaling.num_workers=16 run.name=r50
    ray job submit --working-dir . -- python experiments/train.py --config experiments/configs/coco_r50.yaml

Without a cluster address this starts a local Ray in-process; with RAY_ADDRESS set (or under `ray job submit`)
it runs on that cluster. Rerunning the same command with the same run.name continues from the last checkpoint
and appends to the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from querypose_platform.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="experiment YAML (default: all defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100 model.part_dim=64")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # validated before Ray starts
        cfg.check_trainable()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from querypose_platform.ray_runtime import init_ray
    from querypose_platform.tracking import where_to_look
    from querypose_platform.trainer import fit

    init_ray()
    try:
        outcome = fit(cfg)
    except ConfigError as error:  # a path that cannot work on the connected cluster
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"mlflow_run_id": outcome.run_id, "checkpoint": outcome.checkpoint_path,
                      "metrics": outcome.metrics}, indent=2, default=str))  # fmt: skip
    print(where_to_look(cfg.tracking))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
