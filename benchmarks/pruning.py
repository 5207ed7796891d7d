"""Query pruning on a model that scores: held-out AP and latency of a trained model with
`model.prune_queries_after_stage` / `model.prune_keep` against keeping every query.

    python benchmarks/learning.py --minutes 20 --save-weights benchmarks/results/small.pt
    python benchmarks/pruning.py --weights benchmarks/results/small.pt --keep 10 5 3 --json benchmarks/results/pruning.json

Pruning keeps the top-k queries by classification score after stage 1, so later stages (box and keypoint) run on
k queries instead of N. The held-out split is learning.py's (its synthetic settings, generator seed + 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "experiments"))
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="a trained model (querypose.weights format)")
    parser.add_argument("--keep", type=int, nargs="+", default=[10, 5, 3], help="prune_keep values to compare")
    parser.add_argument("--after-stage", type=int, default=1, help="prune_queries_after_stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the held-out images")
    parser.add_argument("--synthetic-root", type=Path, default=PROJECT_ROOT / "data" / "synthetic")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import learning
    import train_local

    from querypose import build_model
    from querypose.engine import coco_samples, evaluate
    from querypose.weights import load_weights
    from querypose_platform.config import ExperimentConfig

    torch.set_num_threads(args.threads)
    state, model_cfg = load_weights(args.weights)
    if model_cfg is None:
        raise SystemExit(f"error: {args.weights} holds no model config (save it with querypose.weights)")
    cfg = dataclasses.replace(ExperimentConfig.from_dict(learning.SMALL), model=model_cfg)
    gt_json, image_dir = train_local.synthetic_splits(cfg, args.synthetic_root)["val"]
    samples = list(coco_samples(gt_json, image_dir))
    settings = [("all queries", None, model_cfg.prune_keep)]
    settings += [(f"top {k} after stage {args.after_stage}", args.after_stage, k) for k in args.keep]
    rows = []
    for label, stage, keep in settings:
        model = build_model(dataclasses.replace(model_cfg, prune_queries_after_stage=stage, prune_keep=keep))
        model.load_state_dict(state)
        model.eval().set_inference_options()
        metrics = evaluate(model, samples, gt_json, model_cfg.dataset)
        images = [torch.from_numpy(s["image"]).permute(2, 0, 1).float() for s in samples]
        times = []
        with torch.no_grad():
            model.predict(images[:2])  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                for image in images:
                    model.predict([image])
                times.append((time.perf_counter() - start) / len(images))
        rows.append({"setting": label, "prune_after_stage": stage, "keep": keep, "AP": metrics["AP"],
                     "AP50": metrics["AP50"], "ms_per_image": 1000 * float(np.median(times))})  # fmt: skip
    base = rows[0]
    print(f"\n{'setting':26s} {'AP':>6s} {'AP50':>6s} {'ms/image':>9s} {'vs all':>7s}")
    for row in rows:
        print(f"{row['setting']:26s} {row['AP']:6.3f} {row['AP50']:6.3f} {row['ms_per_image']:9.1f} "
              f"{row['ms_per_image'] / base['ms_per_image']:6.2f}x")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "pruning", "weights": str(args.weights), "threads": args.threads,
                  "num_queries": model_cfg.num_queries, "images": len(samples), "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
