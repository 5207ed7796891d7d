"""Inference latency of QueryPose against torchvision's Keypoint R-CNN on the same images, threads and size.

Both models run with random weights in eval mode, including each library's usual pre- and post-processing
(QueryPose.predict: resize, pad, decode; Keypoint R-CNN: GeneralizedRCNNTransform and its postprocess). Each
variant runs in its own process so peak memory is its own. Prints a table and writes --json.

    python benchmarks/latency.py --short-side 800 --repeats 5 --json benchmarks/results/latency.json
    python benchmarks/latency.py --short-side 320 --repeats 3        # a quick run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "fixtures" / "coco" / "images"

# name -> QueryPose options; "keypoint_rcnn" is torchvision's model.
VARIANTS = {
    "keypoint_rcnn": {},
    "querypose": {},
    "querypose+channels_last": {"channels_last": True},
    "querypose+prune20@2": {"prune": (2, 20)},
    "querypose+compile": {"compile": True},
}


def load_images(folder: Path, count: int):
    import cv2
    import torch

    paths = sorted(folder.glob("*.jpg"))[:count]
    if not paths:
        raise SystemExit(f"no .jpg images in {folder}")
    return [
        torch.from_numpy(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() for p in paths
    ]


def build(variant: str, options: dict, short_side: int, max_size: int, device):
    import torch

    if variant == "keypoint_rcnn":
        from torchvision.models.detection import keypointrcnn_resnet50_fpn

        model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=short_side, max_size=max_size)
        model.eval().to(device)
        return model, lambda images: model([im.to(device) / 255.0 for im in images])
    from querypose import ModelConfig, build_model

    stage, keep = options.get("prune", (None, 20))
    cfg = ModelConfig(
        test_short_side=short_side, test_max_size=max_size, prune_queries_after_stage=stage, prune_keep=keep
    )
    model = build_model(cfg).eval().to(device)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if options.get("compile"):
        model.backbone = torch.compile(model.backbone, dynamic=True)
    return model, lambda images: model.predict([im.to(device) for im in images])


def measure(variant: str, options: dict, args: argparse.Namespace, queue) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = load_images(Path(args.images), args.num_images)
    model, run = build(variant, options, args.short_side, args.max_size, device)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)  # inference only; FlopCounterMode also trips over grad hooks otherwise
    if variant == "keypoint_rcnn" or variant == "querypose":
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run(images[:1])
        flops = counter.get_total_flops()
    else:
        flops = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.bf16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad(), autocast:
        for _ in range(args.warmup):
            run(images[:1])
        for _ in range(args.repeats):
            for image in images:
                sync()
                start = time.perf_counter()
                run([image])
                sync()
                times.append((time.perf_counter() - start) * 1000)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put({"variant": variant, "ms_per_image": statistics.median(times), "gflops": None if flops is None else flops / 1e9,
               "params_m": params / 1e6, "peak_mem_mb": peak})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of .jpg images")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    context = mp.get_context("spawn")
    rows = []
    for variant in args.variants:
        queue = context.Queue()
        process = context.Process(target=measure, args=(variant, VARIANTS[variant], args, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"{variant}: failed (exit code {process.exitcode})", file=sys.stderr)
            continue
        rows.append(queue.get())
    reference = next((r["ms_per_image"] for r in rows if r["variant"] == "keypoint_rcnn"), None)
    print(
        f"device={args.device} threads={args.threads} short_side={args.short_side} max_size={args.max_size} bf16={args.bf16}"
    )
    print(f"{'variant':28s} {'ms/image':>10s} {'GFLOPs':>8s} {'params M':>9s} {'peak MB':>9s} {'/ KRCNN':>8s}")
    for row in rows:
        ratio = row["ms_per_image"] / reference if reference else float("nan")
        row["ratio_to_keypoint_rcnn"] = ratio
        gflops = "-" if row["gflops"] is None else f"{row['gflops']:.1f}"
        print(
            f"{row['variant']:28s} {row['ms_per_image']:10.1f} {gflops:>8s} {row['params_m']:9.1f} {row['peak_mem_mb']:9.0f} {ratio:8.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
