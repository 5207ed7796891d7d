"""One-off evaluation job: batch inference over shards with a Ray Data actor pool, OKS scoring, MLflow run.

    python experiments/evaluate.py --weights outputs/model.pt --data data/synthetic/shards --split val
    python experiments/evaluate.py --run-id 3f2c... --data s3://bucket/coco-shards --actors 8 --gpu
    python experiments/evaluate.py --weights models:/querypose-ablation-best/1 --data data/synthetic/shards-demo
    ray job submit --working-dir . -- python experiments/evaluate.py --run-id 3f2c... --data s3://...

Scores the predictions against the ground truth kept beside the shards, prints the metrics table, writes them
to --out (JSON, with the predictions beside it) and logs a new MLflow run tagged with the source run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from querypose_platform.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="weights file, or models:/NAME/VERSION from the MLflow registry")
    source.add_argument("--run-id", help="MLflow run whose final weights (artifact model/model.pt) to evaluate")
    parser.add_argument("--data", required=True, help="shard root (holds <split>/) or one split's shard folder/URI")
    parser.add_argument("--split", default="val")
    parser.add_argument("--config", type=Path, help="experiment YAML for tracking settings (default: defaults)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1, help="inference actors in the Ray Data pool")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "eval")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. tracking.uri=http://...")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from querypose.evaluation import evaluate_keypoints
    from querypose_platform.data import build_dataset
    from querypose_platform.inference import predict_dataset, resolve_weights
    from querypose_platform.ray_runtime import init_ray
    from querypose_platform.shards import gt_json_path, read_manifest
    from querypose_platform.tracking import SOURCE_RUN_TAG, RunLogger, open_run

    try:
        weights, source_run = resolve_weights(args.weights or args.run_id, cfg.tracking)
    except Exception as error:  # a missing file, an unknown run or model version
        print(f"error: {error}", file=sys.stderr)
        return 2
    from querypose.weights import load_weights

    _, model_cfg = load_weights(weights)
    cfg = cfg.with_model(**model_cfg.to_dict())  # the val resize follows the trained model's test size
    shards = _split_uri(args.data, args.split)
    manifest = read_manifest(shards)

    init_ray()
    started = time.perf_counter()
    records, dropped = predict_dataset(
        build_dataset(shards, cfg, train=False), str(weights), args.batch_size, args.actors, args.gpu
    )
    metrics = evaluate_keypoints(gt_json_path(shards), records, model_cfg.spec)
    seconds = time.perf_counter() - started

    print(f"\n{'metric':>8}  value   ({manifest['num_images']} images, {dropped} unreadable, {seconds:.0f}s)")
    for name, value in metrics.items():
        print(f"{name:>8}  {value:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"weights": str(args.weights or args.run_id), "source_run": source_run, "data": shards,
              "dataset": model_cfg.spec.name, "metrics": metrics, "dropped_rows": dropped, "seconds": seconds}  # fmt: skip
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2))
    (args.out / "predictions.json").write_text(json.dumps(records))

    run_key = f"eval:{args.weights or args.run_id}:{shards}:{time.time_ns()}"  # every eval job is its own run
    tags = {SOURCE_RUN_TAG: source_run} if source_run else {}
    run_id = open_run(cfg.tracking, run_key, f"eval-{args.split}", params={
        "weights": args.weights or args.run_id, "data": shards, "split": args.split, "dataset": model_cfg.spec.name,
    }, tags=tags)  # fmt: skip
    with RunLogger(cfg.tracking, run_id) as logger:
        logger.log_metrics({**metrics, "dropped_rows": dropped, "seconds": seconds}, 0, "val")
        logger.log_file(args.out / "metrics.json", "eval")
        logger.log_file(args.out / "predictions.json", "eval")
        logger.finish()
    print(f"wrote {args.out / 'metrics.json'}; MLflow run {run_id}")
    return 0


def _split_uri(data: str, split: str) -> str:
    """`data` may be the shard root (with <split>/ inside) or the split's folder itself."""
    from querypose_platform.shards import has_manifest

    nested = f"{data.rstrip('/')}/{split}"
    return nested if has_manifest(nested) else data


if __name__ == "__main__":
    raise SystemExit(main())
