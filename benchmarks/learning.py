"""How fast does a small QueryPose learn on CPU? Keypoint AP on a held-out synthetic split against training time.

Trains a small configuration (below; dotted overrides change it) on the synthetic dataset for a budget of training
wall-clock minutes, evaluating COCO keypoint AP on a held-out synthetic split (a different generator seed) every
--eval-every minutes. Evaluation time is not counted in the budget. Prints a table and writes the AP-vs-minutes
curve.

It runs the platform's own code path without Ray: the same `querypose.engine.train_step` (matching, set losses,
RLE, AdamW, clipping), the same `querypose.transforms.train_augment` and the same evaluation
(`querypose.evaluation` through `engine.evaluate`). What differs from a Ray Train run of the same config: batches
come from an in-process loop (`experiments/train_local.py`) instead of Ray Data's stream, there is one process (no
DDP), no MLflow, and the learning rate drops at a fraction of the time budget (`--decay-at`) rather than at
`train.lr_steps`; `benchmarks/scaling.py` and `ingest.py` measure what Ray adds.

    python benchmarks/learning.py --minutes 20 --threads 2 --json benchmarks/results/learning.json
    python benchmarks/learning.py --minutes 5 model.num_stages=2          # a quick check
    python benchmarks/learning.py --iterations 2000 --eval-every-iters 500 --threads 1 --decay-at 0 \
        train.lr_steps=[1000]                                              # per-iteration A/B, two at once

Goal: AP >= 0.5 within 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "experiments"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_AP, GOAL_MINUTES = 0.5, 20.0
GRAD_NORM_ITERS = 200

# A small CPU configuration: the paper's architecture at reduced widths, fed the 224-pixel synthetic images (1 to 6
# people) scaled to a short side of 128-160 in training and 144 at test (half the pixels: twice the steps), with the
# training aids that are off in the paper configs (FIDELITY.md row 14): proposal boxes on a grid, RoI coordinate
# channels before the keypoint tower, the soft-argmax keypoint readout (3x the AP of the paper's regression head at
# 20 minutes side by side: 0.33 against 0.12; 0.355 alone on 2 cores) with a cross-entropy on its maps and, at
# inference, its expectation over a 5x5 window at each map's peak (together 0.281 against 0.237 side by side), the
# authors' auxiliary keypoint heatmap and the box-only instance pipeline (its scores cannot learn "was updated").
# The learning rate drops 10x at 80 % of the time budget (`--decay-at`): each drop harvests what the high-lr
# phase built (a drop at 1000 iterations gave a jump by 1500 and then little more), so the drop comes late.
# `lr_steps` applies with `--decay-at 0`, for iteration budgets.
SMALL = {
    "model": {
        "backbone": "resnet18",
        "hidden_dim": 128,
        "ffn_dim": 256,
        "num_heads": 4,
        "dynamic_dim": 16,
        "tower_channels": 64,
        "tower_convs": 2,
        "part_dim": 32,
        "num_queries": 12,
        "num_stages": 2,
        "init_boxes": "grid",
        "roi_coordinates": "tower",
        "keypoint_readout": "soft_argmax",
        "readout_map_weight": 1.0,
        "readout_peak_window": 2,
        "aux_heatmap": True,
        "instance_pipeline": "box_only",
        "test_short_side": 144,
        "test_max_size": 224,
    },
    "data": {
        "synthetic": {"train_images": 400, "val_images": 50, "image_size": 224, "seed": 0},
        "train_short_sides": [128, 144, 160],
        "train_max_size": 224,
        "crop_resize_sides": [144, 160],
        "crop_size": [112, 144],
        "flip_prob": 0.0,  # the synthetic people's sides are coloured: a flip would contradict its swapped labels
    },
    "train": {
        "max_iters": 1_000_000,  # the time budget stops training
        "batch_size": 4,
        "lr": 5.0e-4,
        "weight_decay": 1.0e-4,
        "warmup_iters": 100,
        "warmup_factor": 0.01,
        "lr_steps": [3000],  # where --decay-at 0.8 falls in 20 minutes on 2 quiet cores (3.1 it/s)
        "clip_grad": 1.0,
        "seed": 0,
    },
}
# The recipe before this one (issue 13's): 224-256 pixel training, whole-image proposals, the serial pipeline, no
# coordinates and no auxiliary heatmap. `--recipe issue13` runs it for comparison.
ISSUE13_OVERRIDES = [
    "data.train_short_sides=[192,208,224,240,256]", "data.train_max_size=320", "data.crop_resize_sides=[224,256]",
    "data.crop_size=[160,224]", "model.test_short_side=224", "model.test_max_size=320", "model.init_boxes=image",
    "model.roi_coordinates=none", "model.keypoint_readout=regression", "model.aux_heatmap=false",
    "model.instance_pipeline=serial", "train.lr_steps=[]", "data.flip_prob=0.5",
]  # fmt: skip


def pretrained_backbone(cfg, samples: list[dict], iterations: int, root: Path):
    """The config with a backbone heatmap-pretrained on `samples` (written under `root`), and the seconds it took."""
    import train_local

    from querypose.pretrain import pretrain_backbone, save_backbone

    started = time.perf_counter()
    batches = train_local.training_batches(samples, cfg, np.random.default_rng(cfg.train.seed + 1))
    state = pretrain_backbone(cfg.model, batches, iterations, log=print)
    path = save_backbone(state, root / f"learning-backbone-{cfg.model.backbone}-{iterations}it.pt")
    return cfg.with_model(backbone_weights=str(path), backbone_norm="group_norm"), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    parser.add_argument("--eval-every", type=float, default=None, help="minutes between evaluations")
    parser.add_argument(
        "--iterations",
        type=int,
        help="stop after this many iterations (a budget independent of "
        "the machine's speed, for comparing recipes on a busy machine)",
    )
    parser.add_argument("--eval-every-iters", type=int, help="evaluate every this many iterations instead")
    parser.add_argument(
        "--pretrain-iters",
        type=int,
        default=0,
        help="first heatmap-pretrain the backbone this "
        "many iterations on the train split (querypose.pretrain); its time counts in the budget",
    )
    parser.add_argument(
        "--decay-at",
        type=float,
        default=0.8,
        help="drop the learning rate by train.lr_gamma once this fraction of --minutes is trained (a milestone "
        "in time rather than iterations: the step rate varies between machines); replaces train.lr_steps. 0: off, "
        "train.lr_steps apply (use it with --iterations)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="evaluate and save an exponential moving average of the weights with this decay (e.g. 0.999; "
        "querypose.optim.build_ema); 0: off, the trained weights",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic-root", type=Path, default=PROJECT_ROOT / "data" / "synthetic")
    parser.add_argument("--json", type=Path, help="write the curve here")
    parser.add_argument("--save-weights", type=Path, help="write the trained model here (querypose.weights format)")
    parser.add_argument(
        "--recipe", choices=("small", "issue13"), default="small", help="issue13: the previous recipe, for comparison"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the small config, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)
    if args.recipe == "issue13":
        args.overrides = [*ISSUE13_OVERRIDES, *args.overrides]

    import train_local

    from querypose.engine import coco_samples, evaluate, train_step
    from querypose.optim import build_ema
    from querypose_platform.config import ExperimentConfig, apply_overrides

    if not 0 <= args.decay_at < 1:
        parser.error(f"--decay-at: a fraction of the budget in [0, 1), got {args.decay_at}")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema: a decay in [0, 1) (0: off), got {args.ema}")
    if args.decay_at:
        args.overrides = [*args.overrides, "train.lr_steps=[]"]
    cfg = ExperimentConfig.from_dict(apply_overrides(json.loads(json.dumps(SMALL)), args.overrides))
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    eval_every = args.eval_every or max(1.0, args.minutes / 10)

    splits = train_local.synthetic_splits(cfg, args.synthetic_root)
    train_samples = list(coco_samples(*splits["train"], only_with_people=True))
    val_samples = list(coco_samples(*splits["val"]))
    pretrain_s = 0.0
    if args.pretrain_iters:
        cfg, pretrain_s = pretrained_backbone(cfg, train_samples, args.pretrain_iters, args.synthetic_root)
    model, criterion, optimizer, scheduler = train_local.build_training(cfg, device)
    ema = build_ema(model, args.ema) if args.ema else None
    evaluated = ema.module if ema is not None else model  # what is scored and saved
    batches = train_local.training_batches(train_samples, cfg, np.random.default_rng(cfg.train.seed))
    print(f"[learning] {len(train_samples)} train / {len(val_samples)} held-out images, {args.threads} threads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")  # fmt: skip

    curve: list[dict] = []
    early_grad_norms: list[float] = []  # the first GRAD_NORM_ITERS iterations' norms before clipping
    trained_s, cpu_s = pretrain_s, 0.0
    iteration, next_eval, recent = 0, eval_every * 60, []
    last = cfg.model.num_stages - 1
    recent_terms: dict[str, list[float]] = {f"loss_{t}_s{last}": [] for t in ("cls", "giou", "rle")}

    def record() -> None:
        metrics = evaluate(evaluated, val_samples, splits["val"][0], cfg.model.spec)
        point = {"minutes": round(trained_s / 60, 2), "iterations": iteration, "cpu_minutes": round(cpu_s / 60, 2),
                 "loss": round(float(np.mean(recent)), 3) if recent else None, "lr": scheduler.get_last_lr()[0],
                 **metrics}  # fmt: skip
        # The last stage's unweighted terms since the previous evaluation: which part of the task lags.
        point["last_stage"] = {name: round(float(np.mean(v)), 4) for name, v in recent_terms.items() if v}
        curve.append(point)
        terms = "  ".join(f"{name.split('_')[1]} {value}" for name, value in point["last_stage"].items())
        print(f"[learning] {point['minutes']:6.2f} min  it {iteration:6d}  loss {point['loss']} ({terms})  "
              f"AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  AR {metrics['AR']:.3f}", flush=True)  # fmt: skip
        recent.clear()
        for values in recent_terms.values():
            values.clear()

    def done() -> bool:
        return trained_s >= args.minutes * 60 or (args.iterations is not None and iteration >= args.iterations)

    def eval_due() -> bool:
        if args.eval_every_iters:
            return iteration % args.eval_every_iters == 0
        return trained_s >= next_eval

    decayed, lr_decay = not args.decay_at, None
    while not done():
        if not decayed and trained_s >= args.decay_at * args.minutes * 60:
            # LambdaLR multiplies each group's base lr by the warm-up factor: scaling the base lrs decays every group.
            scheduler.base_lrs = [lr * cfg.train.lr_gamma for lr in scheduler.base_lrs]
            decayed, lr_decay = True, {"minutes": round(trained_s / 60, 2), "iteration": iteration}
            print(f"[learning] lr x {cfg.train.lr_gamma} at {trained_s / 60:.2f} min, iteration {iteration}")
        wall, cpu = time.perf_counter(), time.process_time()
        images, image_sizes, targets = next(batches)
        terms = train_step(model, criterion, optimizer, scheduler, images, image_sizes, targets, cfg.train.clip_grad)
        if ema is not None:
            ema.update_parameters(model)
        trained_s += time.perf_counter() - wall
        cpu_s += time.process_time() - cpu
        iteration += 1
        recent.append(terms["loss"])
        for name, values in recent_terms.items():
            values.append(terms[name])
        if iteration <= GRAD_NORM_ITERS:
            early_grad_norms.append(terms["grad_norm"])
        if eval_due():
            record()
            next_eval += eval_every * 60
    if not curve or curve[-1]["iterations"] != iteration:
        record()

    final_ap = curve[-1]["AP"]
    reached = next((p["minutes"] for p in curve if p["AP"] >= GOAL_AP), None)
    print("\n minutes  iterations      AP    AP50    AP75      AR")
    for p in curve:
        print(
            f"{p['minutes']:8.2f}  {p['iterations']:10d}  {p['AP']:6.3f}  {p['AP50']:6.3f}  {p['AP75']:6.3f}  {p['AR']:6.3f}"
        )
    verdict = f"reached AP {GOAL_AP} at {reached} min" if reached is not None else f"AP {GOAL_AP} not reached"
    print(f"final AP {final_ap:.3f} after {curve[-1]['minutes']} min ({iteration} iterations); {verdict}")
    ratios = np.array(early_grad_norms) / cfg.train.clip_grad
    grad_clip = {
        "iterations": len(ratios),
        "median": float(np.median(ratios)),
        "p10": float(np.percentile(ratios, 10)),
        "p90": float(np.percentile(ratios, 90)),
        "clipped_share": float((ratios > 1).mean()),
    }
    print(f"grad norm / clip ({cfg.train.clip_grad}) over the first {len(ratios)} iterations: median "
          f"{grad_clip['median']:.1f}, p10 {grad_clip['p10']:.1f}, p90 {grad_clip['p90']:.1f}, "
          f"clipped {100 * grad_clip['clipped_share']:.0f}%")  # fmt: skip
    if args.save_weights:
        from querypose.weights import save_weights

        print(f"wrote {save_weights(evaluated, cfg.model, args.save_weights)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "learning",
            "threads": args.threads,
            "budget_minutes": args.minutes,
            "device": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "config": cfg.to_dict() | {"tracking": None, "run": None},
            "curve": curve,
            "final_ap": final_ap,
            "lr_decay": lr_decay,
            "ema_decay": args.ema or None,
            "grad_norm_over_clip": grad_clip,
            "early_grad_norms": early_grad_norms,
            "goal": {"ap": GOAL_AP, "minutes": GOAL_MINUTES, "reached_at_minutes": reached},
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
