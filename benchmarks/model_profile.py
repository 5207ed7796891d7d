"""Where QueryPose's inference FLOPs and time go: FLOPs per module (torch.utils.flop_counter) and CPU time per
operator (torch.profiler), for one small image through `QueryPose.inference`.

    python benchmarks/model_profile.py --short-side 128 --max-size 192 --threads 2 --json benchmarks/results/profile.json

The RoI tower's cost does not depend on the image size (every query pools a 14x14 RoI), so a small image shows
the decoder's share as it is at 800 pixels while the backbone's share grows with the image.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from querypose import ModelConfig, build_model
from querypose.model import QueryPose

# The flop counter names modules from the outermost module called (QueryPose.inference is not a module call):
# "KeypointStage.tower.2" for every stage. Groups keep the first two names: "KeypointStage.tower".
GROUP_DEPTH = 2


def flops_by_group(model: QueryPose, images: torch.Tensor, sizes: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one inference and FLOPs per module group, each operator counted once (in its innermost
    module; operators of a module's own forward count as "<module> (own)")."""
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model.inference(images, sizes)
    totals = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name != "Global"}
    groups: dict[str, int] = defaultdict(int)
    for name, flops in totals.items():
        children = [other for other in totals if other.startswith(name + ".") and "." not in other[len(name) + 1 :]]
        own = flops - sum(totals[child] for child in children)
        if own:
            parts = name.split(".")
            key = ".".join(parts[:GROUP_DEPTH]) if len(parts) > GROUP_DEPTH or not children else f"{name} (own)"
            groups[key] += own
    return counter.get_total_flops(), dict(sorted(groups.items(), key=lambda item: -item[1]))


def time_by_module(model: QueryPose, images: torch.Tensor, sizes: torch.Tensor) -> dict[str, float]:
    """Inclusive wall seconds of the backbone parts, each stage and each stage's submodules (stages folded)."""
    seconds: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not (
            name.startswith("backbone.") and len(parts) == 2 or parts[0].endswith("_stages") and len(parts) in (2, 3)
        ):
            continue
        key = ".".join(["*" if p.isdigit() else p for p in parts])

        def before(module, args, name=name):
            starts[name] = time.perf_counter()

        def after(module, args, output, name=name, key=key):
            seconds[key] += time.perf_counter() - starts[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    start = time.perf_counter()
    with torch.no_grad():
        model.inference(images, sizes)
    seconds["total"] = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def time_by_operator(model: QueryPose, images: torch.Tensor, sizes: torch.Tensor, top: int) -> list[dict]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.inference(images, sizes)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--max-size", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    parser.add_argument("--plain", action="store_true", help="without set_inference_options() (NCHW, math attention)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(test_short_side=args.short_side, test_max_size=args.max_size)).eval()
    model.requires_grad_(False)
    model.set_inference_options(channels_last=not args.plain, fused_attention=not args.plain)
    height, width = args.short_side, args.max_size
    images = torch.rand(1, 3, height, width) * 255
    sizes = torch.tensor([[height, width]])

    total, groups = flops_by_group(model, images, sizes)
    with torch.no_grad():  # warm-up: oneDNN builds its kernels on the first call
        model.inference(images, sizes)
    modules = time_by_module(model, images, sizes)
    operators = time_by_operator(model, images, sizes, args.top)

    setting = "plain" if args.plain else "set_inference_options()"
    print(f"input 1x3x{height}x{width}, {args.threads} threads, {setting}: {total / 1e9:.1f} GFLOPs")
    print(f"{'module group':40s} {'GFLOPs':>9s} {'share':>7s}")
    for name, flops in groups.items():
        if flops / total >= 0.001:
            print(f"{name:40s} {flops / 1e9:9.2f} {100 * flops / total:6.1f}%")
    print(f"\n{'module (inclusive, stages summed)':40s} {'s':>9s} {'share':>7s}")
    for name, value in modules.items():
        if value / modules["total"] >= 0.002:
            print(f"{name:40s} {value:9.2f} {100 * value / modules['total']:6.1f}%")
    print(f"\n{'operator':40s} {'self ms':>9s} {'calls':>7s}")
    for row in operators:
        print(f"{row['op']:40s} {row['self_ms']:9.1f} {row['calls']:7d}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"settings": vars(args) | {"json": str(args.json)}, "total_gflops": total / 1e9,
                  "gflops_by_group": {k: v / 1e9 for k, v in groups.items()}, "seconds_by_module": modules,
              "operators": operators}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
