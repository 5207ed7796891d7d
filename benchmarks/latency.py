"""Inference latency of QueryPose against torchvision's Keypoint R-CNN on the same images, threads and size.

All models run with random weights in eval mode, including each library's usual pre- and post-processing
(QueryPose.predict: resize, pad, decode; Keypoint R-CNN: GeneralizedRCNNTransform and its postprocess). Each
variant runs in its own process so peak memory is its own. Prints a table and writes --json.

Variants: `querypose` is the plain path (NCHW convolutions, explicit softmax attention), `querypose+opt` the
same weights with `set_inference_options()` (channels_last, scaled_dot_product_attention; equal outputs),
`+prune20@2` keeps the top 20 queries after stage 2 (beyond the paper), `+compile` (with --compile) adds
torch.compile of the static-shape RoI decoders, `+bf16` runs under bfloat16 autocast (outputs change).
`querypose-onnxruntime` is the same weights exported by experiments/export.py (--dynamic) and run by
onnxruntime on CPU with the same number of intra-op threads, in a process that never imports torch, with
experiments/onnx_predict.py's numpy/OpenCV pre- and post-processing (the export itself is not timed).
Besides wall time it reports process CPU time per image: on a machine shared with other jobs the wall time
of a 2-thread run swings with the load, its CPU time much less, so ratios of CPU time are the steadier ones.

    python benchmarks/latency.py --short-side 800 --repeats 5 --json benchmarks/results/latency.json
    python benchmarks/latency.py --short-side 320 --max-size 533 --repeats 1 --compile   # a quick run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "experiments"))  # onnx_predict: the onnxruntime-only pipeline
DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "fixtures" / "coco" / "images"
BASELINE = "querypose"
OPTIMISED = "querypose+opt"
ONNXRUNTIME = "querypose-onnxruntime"

# name -> QueryPose options; "keypoint_rcnn" is torchvision's model.
VARIANTS = {
    "keypoint_rcnn": {},
    "querypose": {"optimised": False},
    "querypose+opt": {"optimised": True},
    "querypose+opt+prune20@2": {"optimised": True, "prune": (2, 20)},
    "querypose+opt+compile": {"optimised": True, "compile": True},
    "querypose+opt+bf16": {"optimised": True, "bf16": True},
    ONNXRUNTIME: {"onnx": True},
}
DEFAULT_VARIANTS = ["keypoint_rcnn", "querypose", "querypose+opt", "querypose+opt+prune20@2", ONNXRUNTIME]


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

    # The same random weights in every run: Keypoint R-CNN's cost follows how many detections its random
    # weights let through (its keypoint head runs on each), so an unseeded build changes its FLOPs run to run.
    torch.manual_seed(0)
    if variant == "keypoint_rcnn":
        from torchvision.models.detection import keypointrcnn_resnet50_fpn

        model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=short_side, max_size=max_size)
        model.eval().to(device)
        return model, lambda images: model([im.to(device) / 255.0 for im in images])
    from querypose import ModelConfig, build_model

    stage, keep = options.get("prune", (None, 20))
    # frozen_bn: the deployed paper model (pretrained ResNet), and the same per-channel affine normalisation as
    # Keypoint R-CNN's eval-mode BatchNorm.
    cfg = ModelConfig(
        backbone_norm="frozen_bn",
        test_short_side=short_side,
        test_max_size=max_size,
        prune_queries_after_stage=stage,
        prune_keep=keep,
    )
    model = build_model(cfg).eval().to(device)
    optimised = options["optimised"]
    model.set_inference_options(channels_last=optimised, fused_attention=optimised)
    if options.get("compile"):
        compile_decoders(model)
    return model, lambda images: model.predict([im.to(device) for im in images])


def compile_decoders(model) -> None:
    """torch.compile the parts with static shapes: each keypoint stage's RoI tower and SPEGM see (R, d, 14, 14)
    whatever the image size, so they compile once per stage. Freezing lets Inductor prepack the convolution
    weights and fuse conv + ReLU on CPU (inference only)."""
    for stage in model.keypoint_stages:
        stage.tower.compile(options={"freezing": True})
        if hasattr(stage, "spegm"):
            stage.spegm.compile(options={"freezing": True})


def measure(variant: str, options: dict, args: argparse.Namespace, queue) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = load_images(Path(args.images), args.num_images)
    model, run = build(variant, options, args.short_side, args.max_size, device)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)  # inference only; FlopCounterMode also trips over grad hooks otherwise
    flops = None
    if not options.get("compile"):  # compiled code hides its operators from the counter
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run(images[:1])
        flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.bf16 or options.get("bf16") else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, cpu, detections = [], [], []
    with torch.no_grad(), autocast:
        start = time.perf_counter()
        for _ in range(args.warmup):  # the first call of a compiled variant compiles
            run(images[:1])
        warmup_s = time.perf_counter() - start
        for _ in range(args.repeats):
            for image in images:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                result = run([image])
                sync()
                wall.append((time.perf_counter() - start) * 1000)
                cpu.append((time.process_time() - start_cpu) * 1000)
                detections.append(len(result[0]["boxes"]))
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "variant": variant,
            "ms_per_image": statistics.median(wall),
            "cpu_ms_per_image": statistics.median(cpu) if device.type == "cpu" else None,
            "gflops": None if flops is None else flops / 1e9,
            "params_m": params / 1e6,
            "peak_mem_mb": peak,
            "detections_per_image": statistics.mean(detections),
            "warmup_s": warmup_s,
            "wall_ms_all": wall,
        }
    )


def export_onnx(args: argparse.Namespace, path: Path, queue) -> None:
    """The `querypose` variant's model (same seed, same weights) exported with dynamic sizes to `path`."""
    import torch

    from querypose.export import export_onnx as export

    torch.set_num_threads(args.threads)
    model, _ = build(BASELINE, VARIANTS[BASELINE], args.short_side, args.max_size, torch.device("cpu"))
    start = time.perf_counter()
    export(model, path, dynamic=True)
    queue.put({"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "export_s": time.perf_counter() - start})


def measure_onnxruntime(variant: str, args: argparse.Namespace, path: Path, exported: dict, queue) -> None:
    """Like `measure`, for the exported file under onnxruntime's CPU provider; torch is never imported here."""
    import cv2
    import onnx_predict

    paths = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    session, preprocessing, _ = onnx_predict.load(path, "cpu", threads=args.threads)
    start = time.perf_counter()
    for _ in range(args.warmup):
        onnx_predict.predict(session, preprocessing, images[0])
    warmup_s = time.perf_counter() - start
    wall, cpu, detections = [], [], []
    for _ in range(args.repeats):
        for image in images:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = onnx_predict.predict(session, preprocessing, image)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
            detections.append(len(result["boxes"]))
    queue.put(
        {
            "variant": variant,
            "ms_per_image": statistics.median(wall),
            "cpu_ms_per_image": statistics.median(cpu),
            "gflops": None,
            "params_m": exported["params_m"],
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "detections_per_image": statistics.mean(detections),
            "warmup_s": warmup_s,
            "export_s": exported["export_s"],
            "wall_ms_all": wall,
        }
    )


def add_ratios(rows: list[dict]) -> None:
    """ms/image (wall and CPU) of each variant over the baseline QueryPose, the optimised one and Keypoint R-CNN."""
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        for key, metric in (("", "ms_per_image"), ("cpu_", "cpu_ms_per_image")):
            for reference in (BASELINE, OPTIMISED, "keypoint_rcnn"):
                ref = by_name.get(reference, {}).get(metric)
                value = row[metric]
                row[f"{key}ratio_to_{reference}"] = value / ref if value is not None and ref else None


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"device={args.device} threads={args.threads} short_side={args.short_side} max_size={args.max_size} "
        f"images={args.num_images} repeats={args.repeats} bf16={args.bf16}"
    )
    header = ("variant", "ms/img", "cpu ms/img", "GFLOPs", "params M", "peak MB", "dets/img", "/base", "cpu /base",
              "/opt", "cpu /opt", "/KRCNN", "cpu /KRCNN")  # fmt: skip
    print(f"{header[0]:26s}" + "".join(f"{h:>11s}" for h in header[1:]))

    def cell(value, spec):
        return f"{'-' if value is None else format(value, spec):>11s}"

    for row in rows:
        print(
            f"{row['variant']:26s}"
            + cell(row["ms_per_image"], ".1f")
            + cell(row["cpu_ms_per_image"], ".1f")
            + cell(row["gflops"], ".1f")
            + cell(row["params_m"], ".1f")
            + cell(row["peak_mem_mb"], ".0f")
            + cell(row["detections_per_image"], ".0f")
            + "".join(
                cell(row[k], ".2f")
                for k in (
                    f"ratio_to_{BASELINE}",
                    f"cpu_ratio_to_{BASELINE}",
                    f"ratio_to_{OPTIMISED}",
                    f"cpu_ratio_to_{OPTIMISED}",
                    "ratio_to_keypoint_rcnn",
                    "cpu_ratio_to_keypoint_rcnn",
                )
            )
        )


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
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant (GPU)")
    parser.add_argument("--compile", action="store_true", help="also run querypose+opt+compile")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    variants = args.variants + (["querypose+opt+compile"] if args.compile else [])
    variants = list(dict.fromkeys(variants))

    context = mp.get_context("spawn")

    def run(target, *target_args) -> dict | None:
        queue = context.Queue()
        process = context.Process(target=target, args=(*target_args, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"{target_args[0] if target is not export_onnx else 'export'}: failed (exit code "
                  f"{process.exitcode})", file=sys.stderr)  # fmt: skip
            return None
        return queue.get()

    if ONNXRUNTIME in variants and args.device != "cpu":
        print(f"{ONNXRUNTIME}: skipped: it runs on CPU only here (--device {args.device})", file=sys.stderr)
        variants.remove(ONNXRUNTIME)
    rows = []
    with tempfile.TemporaryDirectory(prefix="querypose-latency-") as folder:
        onnx_path = Path(folder) / "querypose.onnx"
        exported = run(export_onnx, args, onnx_path) if ONNXRUNTIME in variants else None
        for variant in variants:
            if variant == ONNXRUNTIME:
                row = run(measure_onnxruntime, variant, args, onnx_path, exported) if exported else None
            else:
                row = run(measure, variant, VARIANTS[variant], args)
            if row is not None:
                rows.append(row)
    add_ratios(rows)
    print_table(rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = vars(args) | {"json": str(args.json), "variants": variants}
        args.json.write_text(json.dumps({"settings": settings, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
