"""GPU acceptance in one command (`make gpu-check`): does this machine run and train QueryPose at the paper's sizes?

Steps, each timed, each through the project's own code:
  env      the GPUs, NVIDIA driver, torch's CUDA, cuDNN and NCCL versions, Ray
  latency  benchmarks/latency.py at short side 800 / max 1333: Keypoint R-CNN against QueryPose-R50 (plain and
           +opt), in fp32 and in bf16 autocast
  memory   peak GPU memory per image: training steps of experiments/train_local.py's code at batch 2 (the paper's
           per-GPU batch) at short side 800, fp32 and bf16, beside inference's from the latency runs (batch 1)
  train    a few iterations of experiments/configs/coco_r50.yaml (R50, its multi-scale sizes up to 800) on
           synthetic images of short side 800 through Ray Train (querypose_platform.trainer.fit), fp32 and bf16
  resume   that run again with its GPU worker SIGKILLed after a checkpoint (train.fail_at_iter): Ray Train restarts
           it, it resumes from the checkpoint and finishes into the same MLflow run
  scaling  benchmarks/scaling.py --gpu with 1 GPU and with all local GPUs
Prints one table (with each step's seconds) and writes one JSON (--json). Sized to finish in under 10 minutes on
one H100.

Without a CUDA device there is nothing to check: it says why ("no CUDA device") and exits 0. A GPU that
nvidia-smi sees but torch cannot use (a driver older than torch's CUDA needs) is a failure: exit 1, as is any
failed step.

    make gpu-check                 # python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --steps env latency
    python benchmarks/gpu_check.py --smoke   # every step at toy sizes, CPU allowed: checks the wiring, not the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
for folder in (PROJECT_ROOT, PROJECT_ROOT / "benchmarks", PROJECT_ROOT / "experiments"):
    sys.path.insert(0, str(folder))

COCO_R50 = PROJECT_ROOT / "experiments" / "configs" / "coco_r50.yaml"
STEPS = ("env", "latency", "memory", "train", "resume", "scaling")
LATENCY_VARIANTS = ("keypoint_rcnn", "querypose", "querypose+opt")
# The oldest Linux driver of each CUDA release line (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {"12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580, "13.1": 580}


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: the paper's (default) or toy ones that only check the wiring (--smoke)."""

    short_side: int  # test-time resize, also the training images' size
    max_size: int
    train_iters: int
    resume_iters: int  # killed at half of this, after the checkpoint there
    scaling_iters: int
    scaling_log_every: int
    latency_repeats: int
    latency_images: int
    latency_warmup: int
    latency_variants: tuple[str, ...] = LATENCY_VARIANTS
    overrides: tuple[str, ...] = ()  # dotted overrides on top of coco_r50.yaml (not latency.py's paper-size model)


PAPER = Profile(short_side=800, max_size=1333, train_iters=20, resume_iters=10, scaling_iters=30,
                scaling_log_every=10, latency_repeats=3, latency_images=4, latency_warmup=1)  # fmt: skip
SMOKE = Profile(
    short_side=96, max_size=128, train_iters=4, resume_iters=4, scaling_iters=4, scaling_log_every=2,
    latency_repeats=1, latency_images=1, latency_warmup=0,  # latency.py's R50 takes ~20 s an image on a CPU
    latency_variants=("keypoint_rcnn", "querypose+opt"),
    overrides=(
        "model.backbone=resnet18", "model.hidden_dim=32", "model.ffn_dim=64", "model.num_heads=4",
        "model.dynamic_dim=8", "model.tower_channels=32", "model.tower_convs=1", "model.part_dim=32",
        "model.num_queries=6", "model.num_stages=2", "model.test_short_side=96", "model.test_max_size=128",
        "data.train_short_sides=[96]", "data.train_max_size=128", "data.crop_resize_sides=[96]", "data.crop_size=[64,96]",
    ),
)  # fmt: skip
TRAIN_IMAGES, VAL_IMAGES, BATCH = 32, 4, 2


def nvidia_smi() -> list[dict[str, str]]:
    """The GPUs nvidia-smi lists (name, driver, memory); [] without nvidia-smi or a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        lines = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (subprocess.SubprocessError, OSError):
        return []
    return [
        dict(zip(("name", "driver", "memory"), (f.strip() for f in line.split(",")), strict=False)) for line in lines
    ]


def why_no_cuda() -> tuple[str | None, bool]:
    """(reason, is_failure): (None, False) when torch can use a CUDA device. No device at all is a reason to skip;
    a device that nvidia-smi sees but torch cannot use is a failure."""
    import torch

    if torch.cuda.is_available():
        return None, False
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"no CUDA device (CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU)", False
    gpus = nvidia_smi()
    if not gpus:
        return f"no CUDA device (nvidia-smi lists no GPU; torch {torch.__version__} sees none)", False
    cuda, driver = torch.version.cuda, gpus[0]["driver"]
    built = (
        f"for CUDA {cuda}" + (f" (driver >= {MIN_DRIVER[cuda]})" if cuda in MIN_DRIVER else "") if cuda else "CPU-only"
    )
    return (f"nvidia-smi lists {len(gpus)} GPU(s) with driver {driver}, but torch {torch.__version__} cannot use "
            f"them: it is built {built}"), True  # fmt: skip


# --- steps: each returns (details for the JSON, one line for the table) -----------------------------------------


def step_env(profile: Profile, work: Path, device: str) -> tuple[dict, str]:
    import ray
    import torch

    details = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "ray": ray.__version__,
               "gpus": nvidia_smi(), "device": device}  # fmt: skip
    if device == "cuda":
        nccl = torch.cuda.nccl.version()
        details |= {
            "gpu_count": torch.cuda.device_count(),
            "gpu_name": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        }
    driver = details["gpus"][0]["driver"] if details["gpus"] else "-"
    summary = (f"{details.get('gpu_count', 0)} x {details.get('gpu_name', 'no GPU')} (sm {details.get('capability', '-')}),"
               f" driver {driver}, torch {torch.__version__} CUDA {torch.version.cuda}, cuDNN {details.get('cudnn', '-')},"
               f" NCCL {details.get('nccl', '-')}, Ray {ray.__version__}")  # fmt: skip
    return details, summary


def latency_images(profile: Profile, work: Path, count: int) -> Path:
    """Synthetic photos of people shaped like COCO's: short side 480, aspect 3:4 to 4:3, so the test-time resize
    takes them to short side 800 as it does COCO's 640 x 480 images. The content matters to Keypoint R-CNN only
    (its keypoint head runs per detection)."""
    from querypose.synthetic import write_synthetic_dataset

    folder = work / f"latency_{count}x{profile.short_side * 3 // 5}"
    if not (folder / "annotations.json").is_file():
        write_synthetic_dataset(folder, count, image_size=profile.short_side * 3 // 5, seed=1, overwrite=True)
    return folder / "images"


def step_latency(profile: Profile, work: Path, device: str, run: Path) -> tuple[dict, str]:
    import latency

    images = latency_images(profile, work, profile.latency_images)
    details: dict[str, list[dict]] = {}
    for precision, flags in (("fp32", []), ("bf16", ["--bf16"])):
        out = run / f"latency_{precision}.json"
        latency.main([
            "--images", str(images), "--num-images", str(profile.latency_images), "--short-side", str(profile.short_side),
            "--max-size", str(profile.max_size), "--device", device, "--threads", "4",
            "--repeats", str(profile.latency_repeats), "--warmup", str(profile.latency_warmup),
            "--variants", *profile.latency_variants, "--json", str(out), *flags,
        ])  # fmt: skip
        rows = json.loads(out.read_text())["results"]
        missing = set(profile.latency_variants) - {row["variant"] for row in rows}
        if missing:  # latency.py reports a variant whose process died on stderr and goes on without it
            raise RuntimeError(f"latency {precision}: no result for {sorted(missing)}")
        details[precision] = rows

    def line(precision: str) -> str:
        by = {row["variant"]: row for row in details[precision]}
        qp, krcnn = by["querypose+opt"], by["keypoint_rcnn"]
        plain = f", plain {by['querypose']['ms_per_image']:.1f}" if "querypose" in by else ""
        return (f"{precision}: QueryPose+opt {qp['ms_per_image']:.1f} ms/img{plain}, Keypoint R-CNN "
                f"{krcnn['ms_per_image']:.1f} ({qp['ms_per_image'] / krcnn['ms_per_image']:.2f}x)")  # fmt: skip

    return details, f"{line('fp32')}; {line('bf16')}"


def step_memory(profile: Profile, work: Path, device: str, run: Path) -> tuple[dict, str]:
    """Peak memory of training steps in this process, with the training code of experiments/train_local.py, at
    the largest training size (short side 800, no crop; the synthetic images' long side is up to 4:3, like COCO's)
    so the peak is the worst case of the paper's multi-scale training."""
    import numpy as np
    import torch
    from train_local import build_training, to_device, training_batches

    from querypose.engine import coco_samples, train_step
    from querypose_platform.config import load_config

    raw = synthetic_raw(profile, work)
    cfg = load_config(COCO_R50, [
        *profile.overrides, f"data.train_short_sides=[{profile.short_side}]", "data.crop_prob=0",
        f"train.batch_size={BATCH}", "scaling.num_workers=1",
    ])  # fmt: skip
    samples = list(coco_samples(raw / "annotations.json", raw / "images"))
    details: dict[str, dict] = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model, criterion, optimizer, scheduler = build_training(cfg, torch.device(device))
        batches = training_batches(samples, cfg, np.random.default_rng(0))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(4):  # the first step allocates the optimiser state and picks kernels: left out of the time
            images, sizes, targets = to_device(next(batches), torch.device(device))
            start = time.perf_counter()
            train_step(model, criterion, optimizer, scheduler, images, sizes, targets, cfg.train.clip_grad, dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        details[f"train_{precision}"] = {
            "batch": BATCH, "image_hw": list(images.shape[-2:]), "peak_mb": peak,
            "peak_mb_per_image": peak / BATCH if peak is not None else None,
            "step_s": statistics.median(seconds[1:]), "images_per_s": BATCH / statistics.median(seconds[1:]),
        }  # fmt: skip
        del model, criterion, optimizer, scheduler, batches, images, targets
        if device == "cuda":
            torch.cuda.empty_cache()
    for precision in ("fp32", "bf16"):  # inference at batch 1 from this run's latency step, when it ran
        path = run / f"latency_{precision}.json"
        if path.is_file():
            rows = {row["variant"]: row for row in json.loads(path.read_text())["results"]}
            details[f"inference_{precision}"] = {v: rows[v]["peak_mem_mb"] for v in rows if device == "cuda"}

    def mb(value) -> str:
        return "-" if value is None else f"{value / 1024:.2f} GB"

    train = ", ".join(f"{p} {mb(details[f'train_{p}']['peak_mb_per_image'])}" for p in ("fp32", "bf16"))
    hw = "x".join(map(str, details["train_fp32"]["image_hw"]))
    summary = f"per image: train (batch {BATCH} padded to {hw}) {train}"
    inference = [(p, details.get(f"inference_{p}", {}).get("querypose+opt")) for p in ("fp32", "bf16")]
    if any(value is not None for _, value in inference):
        summary += "; inference QueryPose+opt " + ", ".join(f"{p} {mb(value)}" for p, value in inference)
    return details, summary


def synthetic_raw(profile: Profile, work: Path) -> Path:
    """The synthetic train split that ensure_synthetic_shards writes for the training runs (generated here if the
    memory step runs first)."""
    from querypose.synthetic import write_synthetic_dataset

    raw = work / "data" / "raw" / f"coco_train_{TRAIN_IMAGES}x{profile.short_side}_s0"
    if not (raw / "annotations.json").is_file():
        write_synthetic_dataset(raw, TRAIN_IMAGES, dataset="coco", seed=0, image_size=profile.short_side)
    return raw


def train_config(profile: Profile, work: Path, run: Path, device: str, name: str, *overrides: str):
    """coco_r50.yaml on one worker at the paper's per-GPU batch, on synthetic images, with local outputs."""
    from querypose_platform.config import load_config

    use_gpu = "true" if device == "cuda" else "false"
    return load_config(COCO_R50, [
        *profile.overrides, f"data.root={work / 'data' / 'shards'}",
        f"data.synthetic={{train_images: {TRAIN_IMAGES}, val_images: {VAL_IMAGES}, image_size: {profile.short_side}}}",
        "scaling.num_workers=1", f"scaling.use_gpu={use_gpu}", "scaling.cpus_per_worker=2",
        f"train.batch_size={BATCH}", "train.eval_every=1000000",
        f"run.storage_path={run / 'ray_results'}", f"run.name=gpu_check_{name}",
        f"tracking.uri=sqlite:///{run / 'mlruns.db'}", f"tracking.artifact_location={run / 'mlartifacts'}",
        "tracking.experiment=querypose-gpu-check", "tracking.system_metrics=false", *overrides,
    ])  # fmt: skip


def history(cfg, run_id: str, metric: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    points = MlflowClient(cfg.tracking.uri).get_metric_history(run_id, metric)
    return [(p.step, p.value) for p in sorted(points, key=lambda p: p.step)]


def step_train(profile: Profile, work: Path, device: str, run: Path) -> tuple[dict, str]:
    from querypose_platform.ray_runtime import init_ray
    from querypose_platform.trainer import fit

    init_ray()
    details = {}
    for precision, amp in (("fp32", "false"), ("bf16", "true")):
        iters = profile.train_iters
        cfg = train_config(profile, work, run, device, precision, f"train.amp={amp}", f"train.max_iters={iters}",
                           f"train.log_every={max(1, iters // 4)}", f"train.checkpoint_every={iters}")  # fmt: skip
        start = time.perf_counter()
        outcome = fit(cfg)
        rates = [value for _, value in history(cfg, outcome.run_id, "train/images_per_s")]
        losses = [value for _, value in history(cfg, outcome.run_id, "train/loss")]
        if outcome.metrics.get("iteration") != iters:
            raise RuntimeError(f"train {precision}: stopped at iteration {outcome.metrics.get('iteration')}")
        details[precision] = {
            "iterations": iters, "seconds": time.perf_counter() - start, "loss_first": losses[0],
            "loss_last": losses[-1], "images_per_s": statistics.median(rates[1:] or rates), "run_id": outcome.run_id,
        }  # fmt: skip
    summary = "; ".join(
        f"{p}: {d['iterations']} it, loss {d['loss_first']:.2f} -> {d['loss_last']:.2f}, {d['images_per_s']:.1f} img/s"
        for p, d in details.items()
    )
    return details, summary


def step_resume(profile: Profile, work: Path, device: str, run: Path) -> tuple[dict, str]:
    from mlflow import MlflowClient

    from querypose_platform.ray_runtime import init_ray
    from querypose_platform.trainer import fit

    init_ray()
    iters = profile.resume_iters
    checkpoint, kill = iters // 2, iters // 2 + 1
    cfg = train_config(profile, work, run, device, "resume", "train.amp=true", f"train.max_iters={iters}", "train.log_every=1",
                       f"train.checkpoint_every={checkpoint}", f"train.fail_at_iter={kill}", "run.max_failures=1")  # fmt: skip
    outcome = fit(cfg)
    run_info = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id)
    resumed = run_info.data.tags.get("querypose.resumed_from_iteration")
    steps = [step for step, _ in history(cfg, outcome.run_id, "train/loss")]
    details = {"killed_at": kill, "resumed_from": resumed, "finished_at": outcome.metrics.get("iteration"),
               "logged_steps": steps, "mlflow_status": run_info.info.status, "run_id": outcome.run_id}  # fmt: skip
    # the retry went on from the checkpoint (not from 0), logged each iteration once and closed the one run
    expected = {"resumed_from": str(checkpoint), "finished_at": iters, "logged_steps": list(range(1, iters + 1)),
                "mlflow_status": "FINISHED"}  # fmt: skip
    if any(details[key] != value for key, value in expected.items()):
        raise RuntimeError(f"kill and resume: expected {expected}, got {details}")
    return details, f"worker killed at iteration {kill}, resumed from {resumed}, finished at {iters}, one MLflow run"


def step_scaling(profile: Profile, work: Path, device: str, run: Path) -> tuple[dict, str]:
    import ray
    import scaling
    import torch

    ray.shutdown()  # scaling.py starts its own Ray, sized to its workers
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    workers = [1] if gpus <= 1 else [1, gpus]
    out = run / "scaling.json"
    scaling.main([
        *(["--gpu"] if gpus else []), "--workers", *map(str, workers), "--iters", str(profile.scaling_iters),
        "--log-every", str(profile.scaling_log_every), "--root", str(run / "scaling"), "--json", str(out),
    ])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    unit = "GPU" if gpus else "CPU worker"
    summary = "; ".join(
        f"{r['workers']} {unit}{'s' if r['workers'] > 1 else ''}: {r['images_per_s']:.1f} img/s "
        f"({r['images_per_s'] / rows[0]['images_per_s']:.2f}x), data wait {100 * r['data_wait_share']:.0f}%"
        for r in rows
    )
    return {"workers": workers, "results": rows}, summary


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_steps(names: list[str], profile: Profile, work: Path, device: str) -> dict[str, dict]:
    """Each step timed and isolated: one that fails is reported and the others still run."""
    run = work / "runs" / time.strftime("%Y%m%d-%H%M%S")  # Ray Train would resume a finished run of the same name
    steps: dict[str, Callable[[], tuple[dict, str]]] = {
        "env": lambda: step_env(profile, work, device),
        "latency": lambda: step_latency(profile, work, device, run),
        "memory": lambda: step_memory(profile, work, device, run),
        "train": lambda: step_train(profile, work, device, run),
        "resume": lambda: step_resume(profile, work, device, run),
        "scaling": lambda: step_scaling(profile, work, device, run),
    }
    results = {}
    for name in names:
        print(f"\n=== gpu-check: {name}", flush=True)
        start = time.perf_counter()
        try:
            details, summary = steps[name]()
            status = "ok"
        except Exception as error:  # noqa: BLE001 - reported in the table and the JSON; the next step still runs
            traceback.print_exc()
            details, summary, status = {"error": repr(error)}, f"{type(error).__name__}: {error}"[:300], "FAILED"
        results[name] = {**details, "status": status, "seconds": time.perf_counter() - start, "summary": summary}
        print(f"=== gpu-check: {name} {status} in {results[name]['seconds']:.0f} s: {summary}", flush=True)
    return results


def print_table(results: dict[str, dict], total_s: float) -> None:
    print("\n| step | status | s | result |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['status']} | {result['seconds']:.0f} | {result['summary']} |")
    print(f"\ntotal {total_s:.0f} s")


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--smoke", action="store_true", help="toy sizes and CPU allowed: checks the wiring only")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "querypose-gpu-check",
                        help="synthetic data (kept) and the runs of each invocation (runs/<time>/)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else PAPER
    settings = {"steps": args.steps, "smoke": args.smoke, "work": str(args.work), "profile": asdict(profile)}

    reason, failed = why_no_cuda()
    if reason is not None and not (args.smoke and not failed):
        print(f"gpu-check: {'FAILED' if failed else 'skipped'}: {reason}", flush=True)
        write_json(args.json, {"settings": settings, "ok": not failed, "skipped": None if failed else reason,
                               "error": reason if failed else None, "steps": {}})  # fmt: skip
        return 1 if failed else 0

    device = _device()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_steps(args.steps, profile, args.work, device)
    total = time.perf_counter() - start
    print_table(results, total)
    ok = all(result["status"] == "ok" for result in results.values())
    write_json(args.json, {"settings": settings, "ok": ok, "skipped": None, "device": device, "total_s": total,
                           "steps": results})  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
