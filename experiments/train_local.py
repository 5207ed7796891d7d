"""Single-process training without Ray, for debugging: the same train step and evaluation as the Ray loop.

Reads a COCO-format keypoint file and its image folder per split (--train-json/--train-images, --val-json/
--val-images). Without them it trains on the synthetic dataset, generated under data/synthetic/<dataset>_{train,
val} from the config's data.synthetic settings (or their defaults) when missing. Writes metrics.jsonl, eval
JSON files and the final weights (querypose.weights format) to --out.

    python experiments/train_local.py --config experiments/configs/synthetic.yaml train.max_iters=50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from querypose import build_model  # noqa: E402
from querypose.criterion import SetCriterion  # noqa: E402
from querypose.engine import augmented_batches, coco_samples, evaluate, train_step  # noqa: E402
from querypose.optim import build_optimizer, build_scheduler  # noqa: E402
from querypose.weights import save_weights  # noqa: E402
from querypose_platform.config import ConfigError, ExperimentConfig, SyntheticConfig, load_config  # noqa: E402
from querypose_platform.storage import resolve_backbone_weights  # noqa: E402


def synthetic_splits(cfg: ExperimentConfig, root: Path) -> dict[str, tuple[Path, Path]]:
    """Generate (or reuse) the synthetic train and val sets; returns split -> (annotations json, image dir)."""
    from querypose.synthetic import write_synthetic_dataset

    settings = cfg.data.synthetic or SyntheticConfig()
    spec = cfg.model.spec
    splits = {}
    for split, count, seed in (
        ("train", settings.train_images, settings.seed),
        ("val", settings.val_images, settings.seed + 1),  # a different seed: held-out people
    ):
        out = root / settings.folder_name(spec.name, split, count, seed)
        if not (out / "annotations.json").is_file():
            write_synthetic_dataset(
                out, count, dataset=spec, seed=seed, image_size=settings.image_size, max_people=settings.max_people
            )
        splits[split] = (out / "annotations.json", out / "images")
    return splits


def training_batches(
    samples: list[dict], cfg: ExperimentConfig, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """Endless augmented batches of train.batch_size with the config's augmentation (a fresh shuffle per epoch)."""
    data = cfg.data
    return augmented_batches(
        samples, cfg.train.batch_size, cfg.model.spec.flip_index, rng,
        short_sides=tuple(data.train_short_sides), max_size=data.train_max_size, flip_prob=data.flip_prob,
        crop_prob=data.crop_prob, crop_resize_sides=tuple(data.crop_resize_sides), crop_size=tuple(data.crop_size),
    )  # fmt: skip


def subset_gt(gt_json: Path, samples: list[dict], out: Path) -> Path:
    """A copy of `gt_json` restricted to the samples' images, so unevaluated images do not count as misses."""
    content = json.loads(Path(gt_json).read_text())
    keep = {sample["image_id"] for sample in samples}
    content["images"] = [image for image in content["images"] if image["id"] in keep]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(content))
    return out


def build_training(cfg: ExperimentConfig, device: torch.device):
    """(model, criterion, optimizer, scheduler) from the experiment config, seeded."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(resolve_backbone_weights(cfg.model)).to(device)
    criterion = SetCriterion.from_config(cfg.model)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.flow_lr_mult)
    scheduler = build_scheduler(
        optimizer, cfg.train.warmup_iters, cfg.train.warmup_factor, cfg.train.lr_steps, cfg.train.lr_gamma
    )
    return model, criterion, optimizer, scheduler


def to_device(batch, device: torch.device):
    images, image_sizes, targets = batch
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), image_sizes.to(device), targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="experiment YAML (default: all defaults)")
    parser.add_argument("--train-json", type=Path)
    parser.add_argument("--train-images", type=Path)
    parser.add_argument("--val-json", type=Path)
    parser.add_argument("--val-images", type=Path)
    parser.add_argument("--synthetic-root", type=Path, default=PROJECT_ROOT / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "train_local")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100 model.part_dim=64")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if cfg.train.amp else None

    if args.train_json:
        splits = {"train": (args.train_json, args.train_images), "val": (args.val_json, args.val_images)}
        for split, (gt, images) in splits.items():
            if gt is None or images is None or not Path(gt).is_file():
                print(f"error: --{split}-json and --{split}-images must name a file and a folder", file=sys.stderr)
                return 2
    else:
        splits = synthetic_splits(cfg, args.synthetic_root)
    train_samples = list(coco_samples(*splits["train"], only_with_people=True))
    val_samples = list(coco_samples(*splits["val"]))
    if cfg.data.max_val_images and len(val_samples) > cfg.data.max_val_images:
        val_samples = val_samples[: cfg.data.max_val_images]
        args.out.mkdir(parents=True, exist_ok=True)
        splits["val"] = (subset_gt(splits["val"][0], val_samples, args.out / "val_subset.json"), splits["val"][1])
    print(f"[train_local] {len(train_samples)} train / {len(val_samples)} val images, device {device}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.yaml").write_text(cfg.to_yaml())
    model, criterion, optimizer, scheduler = build_training(cfg, device)
    batches = training_batches(train_samples, cfg, np.random.default_rng(cfg.train.seed))
    log = (args.out / "metrics.jsonl").open("w")
    start = window = time.perf_counter()
    for iteration in range(1, cfg.train.max_iters + 1):
        images, image_sizes, targets = to_device(next(batches), device)
        terms = train_step(
            model, criterion, optimizer, scheduler, images, image_sizes, targets, cfg.train.clip_grad, amp
        )
        if iteration % cfg.train.log_every == 0 or iteration == cfg.train.max_iters:
            elapsed, window = time.perf_counter() - window, time.perf_counter()
            terms["images_per_s"] = cfg.train.log_every * cfg.train.batch_size / elapsed
            log.write(json.dumps({"iteration": iteration, **terms}) + "\n")
            log.flush()
            print(
                f"[train_local] it {iteration}/{cfg.train.max_iters} loss {terms['loss']:.3f} "
                f"lr {terms['lr']:.2e} grad {terms['grad_norm']:.1f} {terms['images_per_s']:.2f} img/s"
            )
        if iteration % cfg.train.eval_every == 0 or iteration == cfg.train.max_iters:
            results = args.out / f"predictions_{iteration}.json"
            metrics = evaluate(model, val_samples, splits["val"][0], cfg.model.spec, results_path=results)
            log.write(json.dumps({"iteration": iteration, "eval": metrics}) + "\n")
            print(f"[train_local] eval @ {iteration}: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    log.close()
    weights = save_weights(model, cfg.model, args.out / "model.pt")
    print(f"[train_local] done in {time.perf_counter() - start:.0f}s; weights {weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
