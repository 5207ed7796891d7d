"""Where a training step of the small CPU configuration spends its time, and how large its gradients are.

Times each part of `querypose.engine.train_step`'s work on real synthetic batches: the forward of the backbone,
the FPN, the box stages and the keypoint stages (forward hooks), the Hungarian matcher, the set criterion (flow
included), the backward, gradient clipping and the optimiser step. Prints a table (median ms per step and share)
and the gradient norm before clipping against the clip value; writes JSON.

    python benchmarks/train_profile.py --steps 30 --threads 2 --json benchmarks/results/train_profile.json
    python benchmarks/train_profile.py model.keypoint_training_queries=all      # the same config, changed

The configuration is learning.py's SMALL (dotted overrides change it). Ray's share of a step is measured by
benchmarks/scaling.py and ingest.py (Ray Train images/s and data wait against this loop's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "experiments"))
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class Timer:
    """Wall-clock seconds per named part, summed within a step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def time_module(self, module: torch.nn.Module, name: str) -> None:
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self.add(name, time.perf_counter() - started.pop()))

    def time_call(self, owner: object, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        setattr(owner, attribute, timed)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    def end_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic-root", type=Path, default=PROJECT_ROOT / "data" / "synthetic")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of learning.py's small config")
    args = parser.parse_args(argv)

    import learning
    import train_local

    from querypose.engine import coco_samples
    from querypose.optim import clip_gradients
    from querypose_platform.config import ExperimentConfig, apply_overrides

    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.from_dict(apply_overrides(json.loads(json.dumps(learning.SMALL)), args.overrides))
    splits = train_local.synthetic_splits(cfg, args.synthetic_root)
    samples = list(coco_samples(*splits["train"], only_with_people=True))
    model, criterion, optimizer, scheduler = train_local.build_training(cfg, torch.device("cpu"))
    batches = train_local.training_batches(samples, cfg, np.random.default_rng(cfg.train.seed))

    timer = Timer()
    timer.time_module(model.backbone.body, "backbone")
    timer.time_module(model.backbone.fpn, "fpn")
    for stage in model.box_stages:
        timer.time_module(stage, "box stages")
    for stage in model.keypoint_stages:
        timer.time_module(stage, "keypoint stages")
    timer.time_call(model, "matcher", "matcher")
    norms = []
    for _ in range(args.warmup + args.steps):
        images, image_sizes, targets = next(batches)
        model.train()
        start = time.perf_counter()
        outputs = model(images, image_sizes, targets)
        forward = time.perf_counter()
        losses = criterion(outputs, targets, image_sizes, model.flow)
        criterion_end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        backward = time.perf_counter()
        norms.append(clip_gradients(model, cfg.train.clip_grad))
        clipped = time.perf_counter()
        optimizer.step()
        scheduler.step()
        end = time.perf_counter()
        parts = timer.current
        parts["forward, rest (queries, scatter, stage glue)"] = (forward - start) - sum(parts.values())
        parts["criterion (set losses, RLE flow)"] = criterion_end - forward
        parts["backward"] = backward - criterion_end
        parts["gradient clipping"] = clipped - backward
        parts["optimiser + scheduler"] = end - clipped
        parts["step"] = end - start
        timer.end_step()

    timed = timer.steps[args.warmup :]
    names = [name for name in timed[0] if name != "step"]
    median = {name: float(np.median([s.get(name, 0.0) for s in timed])) * 1000 for name in [*names, "step"]}
    print(f"\n{'part':48s} {'ms/step':>9s} {'share':>7s}")
    for name in names:
        print(f"{name:48s} {median[name]:9.1f} {100 * median[name] / median['step']:6.1f}%")
    print(f"{'whole step':48s} {median['step']:9.1f}   ({cfg.train.batch_size / median['step'] * 1000:.1f} img/s)")
    ratios = np.array(norms) / cfg.train.clip_grad
    print(f"gradient norm / clip over {len(ratios)} steps: median {np.median(ratios):.1f}, "
          f"max {ratios.max():.1f}, clipped {100 * (ratios > 1).mean():.0f}%")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "train_profile", "threads": args.threads, "overrides": args.overrides,
                  "ms_per_step": median, "grad_norm_over_clip": ratios.tolist()}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
