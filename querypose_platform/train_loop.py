"""The per-worker training function of `ray.train.torch.TorchTrainer`.

Every rank runs the same loop: DDP model (gloo on CPU, NCCL on GPU), its split of the Ray Data train stream,
the shared `querypose.engine.train_step`, periodic distributed evaluation on the val shards (each rank predicts
its own images, rank 0 scores them all), `ray.train.report` on every rank with rank 0's checkpoint. Rank 0 alone
talks to MLflow. A retried or resumed attempt restores model, optimiser, scheduler and iteration from
`ray.train.get_checkpoint()` and keeps logging into the same MLflow run without repeating a metric step.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as train_context

from querypose import build_model
from querypose.criterion import SetCriterion
from querypose.engine import to_coco_results, train_step, unwrap
from querypose.evaluation import MAX_DETS, METRIC_NAMES, evaluate_keypoints
from querypose.optim import build_optimizer, build_scheduler
from querypose.weights import read_tensor_file, save_weights
from querypose_platform import plots
from querypose_platform.config import ExperimentConfig
from querypose_platform.data import BatchCollator
from querypose_platform.shards import gt_json_path
from querypose_platform.storage import resolve_backbone_weights
from querypose_platform.tracking import PROGRESS_METRICS, RunLogger, RunSpec

CHECKPOINT_FILE = "state.pt"
TRACKING_FOLDER = "tracking"  # in a checkpoint: what rank 0 had not sent to MLflow yet
EVAL_BATCH_SIZE = 4
FAULT_GRACE_S = 5.0
ERROR_FLUSH_S = 10.0


def val_dataset_name(rank: int) -> str:
    """Each rank predicts its own part of the val set (Train's split may drop rows to even out the workers)."""
    return f"val_{rank}"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """config = {"experiment": ExperimentConfig.to_dict(), "mlflow_run": the RunSpec fields of its MLflow run}."""
    cfg = ExperimentConfig.from_dict(config["experiment"])
    # Ray Train logs every report's dict at INFO ("Reporting training result ..."): hundreds of console lines
    # repeating what MLflow holds; rank 0's progress line stands for them.
    train_context.logger.setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    checkpoint = ray.train.get_checkpoint()
    monitors: list = []
    logger = None
    if rank == 0:
        # The logger opens (or reopens) the MLflow run by itself once the server answers; training does not wait.
        logger = RunLogger(
            cfg.tracking,
            RunSpec(**config["mlflow_run"]),
            on_attach=lambda run_id: monitors.append(start_system_metrics(cfg, run_id, checkpoint is not None)),
        )
    try:
        model, optimizer, scheduler, start_iteration, latest_eval = prepare_training(
            cfg, checkpoint, ray.train.torch.prepare_model, logger
        )
        criterion = SetCriterion.from_config(cfg.model)
        autocast = torch.bfloat16 if cfg.train.amp else None
        if logger is not None and start_iteration == 0:
            logger.log_text(cfg.to_yaml(), "config/resolved.yaml")
        elif logger is not None:
            logger.set_tag("querypose.resumed_from_iteration", str(start_iteration))

        collate = BatchCollator(cfg.model.spec.num_keypoints)
        batches = endless_batches(
            ray.train.get_dataset_shard("train"), cfg.per_worker_batch_size, collate, cfg.train.seed
        )
        val_shard = ray.train.get_dataset_shard(val_dataset_name(rank))
        window = StepWindow()
        progress = Progress(cfg, start_iteration) if rank == 0 else None
        consumed: list[int] = []  # image ids this rank trained on since its last checkpoint
        iteration = start_iteration
        while iteration < cfg.train.max_iters:
            started = time.perf_counter()
            batch = next(batches).to(device)
            fetched = time.perf_counter()
            terms = train_step(
                model, criterion, optimizer, scheduler, batch.images, batch.image_sizes, batch.targets,
                cfg.train.clip_grad, autocast,
            )  # fmt: skip
            iteration += 1
            window.add(fetched - started, time.perf_counter() - started, len(batch.image_ids), batch.dropped)
            consumed.extend(batch.image_ids.tolist())
            inject_fault(cfg, iteration, start_iteration, rank, world)

            is_last = iteration == cfg.train.max_iters
            metrics: dict[str, float] = {}
            if iteration % cfg.train.log_every == 0 or is_last:
                metrics = {**mean_over_ranks(terms), **window.flush(world)}
                if logger is not None:
                    logger.log_metrics(metrics, iteration, "train")
                    progress.line(iteration, metrics)
            if iteration % cfg.train.eval_every == 0 or is_last:
                latest_eval, records = evaluate_distributed(model, val_shard, cfg, rank, world, collate)
                if logger is not None:
                    logger.log_metrics(latest_eval, iteration, "val", artifacts={
                        f"eval/metrics_{iteration:07d}.json": latest_eval,
                        f"eval/predictions_{iteration:07d}.json": records,
                    })  # fmt: skip
            if metrics or iteration % cfg.train.checkpoint_every == 0 or is_last:
                report(iteration, metrics, latest_eval, model, optimizer, scheduler, cfg, rank, consumed, logger)
        if iteration == start_iteration:  # a finished run started again: report its last state, train nothing
            ray.train.report({"iteration": iteration, **latest_eval})
        elif logger is not None:
            log_final_artifacts(logger, model, cfg, val_shard, collate)
        if logger is not None:
            logger.finish()
            logger.close()
    except BaseException:
        if logger is not None:  # what is not sent in time is in the last checkpoint, or will be computed again
            with contextlib.suppress(Exception):
                logger.close(timeout=ERROR_FLUSH_S)
        raise
    finally:
        for monitor in monitors:
            if monitor is not None:
                monitor.finish()


def prepare_training(cfg: ExperimentConfig, checkpoint, place, logger: RunLogger | None = None):
    """Model, optimiser and scheduler, with the model placed by `place` (Ray's `prepare_model`: on the worker's
    device, DDP-wrapped) and only then the checkpoint's state loaded: `Optimizer.load_state_dict` moves each
    state tensor to its parameter's device and dtype as they are at load time, so loading first would leave
    AdamW's moments on the CPU and the first step on a GPU would fail. Returns (model, optimizer, scheduler,
    the iteration to go on from, the last eval metrics)."""
    model = build_model(resolve_backbone_weights(cfg.model))
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.flow_lr_mult)
    scheduler = build_scheduler(
        optimizer, cfg.train.warmup_iters, cfg.train.warmup_factor, cfg.train.lr_steps, cfg.train.lr_gamma
    )
    model = place(model)
    start_iteration, latest_eval = restore(checkpoint, unwrap(model), optimizer, scheduler, logger)
    return model, optimizer, scheduler, start_iteration, latest_eval


def restore(checkpoint: ray.train.Checkpoint | None, model, optimizer, scheduler, logger=None) -> tuple[int, dict]:
    """Load a checkpoint's training state into the (unwrapped, already placed) objects, and queue on rank 0's
    logger what the checkpoint carried unsent; returns (the iteration to go on from, the last eval metrics)."""
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as folder:
        state = read_tensor_file(Path(folder) / CHECKPOINT_FILE, "checkpoint")
        if logger is not None:
            logger.load_pending(Path(folder) / TRACKING_FOLDER)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"]), dict(state.get("eval", {}))


def checkpoint_state(model, optimizer, scheduler, iteration: int, latest_eval: dict, cfg: ExperimentConfig) -> dict:
    """What `restore` reads back: bf16 autocast needs no GradScaler, so there is no scaler state to keep."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "eval": latest_eval,
        "config": cfg.to_dict(),
    }


def report(iteration, metrics, latest_eval, model, optimizer, scheduler, cfg, rank, consumed, logger) -> None:
    """ray.train.report on every rank (it is a barrier). When a checkpoint is due, every rank contributes the
    image ids it trained on since the previous one and the Ray node it ran on (data/rank<r>.json: shards and
    placement are auditable) and rank 0 adds the training state and the tracking entries MLflow has not taken
    yet; Ray merges the ranks' folders into one checkpoint."""
    reported = {
        "iteration": iteration,
        **metrics,
        **dict.fromkeys(METRIC_NAMES[cfg.model.spec.evaluation], math.nan),
        **latest_eval,
    }
    due = iteration % cfg.train.checkpoint_every == 0 or iteration == cfg.train.max_iters
    if not due:
        ray.train.report(reported)
        return
    with tempfile.TemporaryDirectory(prefix="querypose-ckpt-") as folder:
        (Path(folder) / "data").mkdir()
        provenance = {"node_id": ray.get_runtime_context().get_node_id(), "image_ids": consumed}
        (Path(folder) / "data" / f"rank{rank}.json").write_text(json.dumps(provenance))
        consumed.clear()
        if rank == 0:
            state = checkpoint_state(model, optimizer, scheduler, iteration, latest_eval, cfg)
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            (Path(folder) / "config.yaml").write_text(cfg.to_yaml())
            if logger is not None:
                logger.save_pending(Path(folder) / TRACKING_FOLDER)
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(folder))


def endless_batches(shard, batch_size: int, collate, seed: int) -> Iterator:
    """Batches from the worker's shard of the train stream: every epoch that max_iters needs, in one dataset that
    begins where the run's latest checkpoint left it (trainer.train_stream). Should it run dry first (drop_last
    remainders, the equal split over workers), it is iterated again; each pass shuffles its local buffer with a
    seed of its own."""
    undecodable = 0  # rows dropped from batches that had no valid image left: counted with the next batch
    for shuffle_pass in itertools.count():
        produced = False
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            collate_fn=collate,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + shuffle_pass,
        ):
            if len(batch.image_ids) == 0:
                undecodable += batch.dropped
                continue
            batch.dropped += undecodable
            undecodable = 0
            produced = True
            yield batch
        if not produced:
            raise RuntimeError(f"the train shard gave no full batch of {batch_size}: too few valid images")


class StepWindow:
    """Throughput, data-wait share and dropped rows over the steps since the last log line."""

    def __init__(self) -> None:
        self.wait = self.total = 0.0
        self.images = self.steps = 0
        self.dropped_total = 0

    def add(self, wait_s: float, step_s: float, images: int, dropped: int) -> None:
        self.wait += wait_s
        self.total += step_s
        self.images += images
        self.steps += 1
        self.dropped_total += dropped

    def flush(self, world: int) -> dict[str, float]:
        # Summed over ranks: images/s of the whole job, and rows dropped so far in this attempt by all ranks.
        summed = sum_over_ranks([self.images, self.dropped_total, self.wait, self.total])
        images, dropped, wait, total = summed.tolist()
        out = {
            "images_per_s": images / max(total / world, 1e-9),
            "data_wait_share": wait / max(total, 1e-9),
            "dropped_rows": dropped,
        }
        self.wait = self.total = 0.0
        self.images = self.steps = 0
        return out


def sum_over_ranks(values: list[float]) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor.cpu()


def mean_over_ranks(terms: dict[str, float]) -> dict[str, float]:
    """Each loss term averaged over the ranks: with the criterion's shared normaliser this equals the loss of
    the whole global batch."""
    names = sorted(terms)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    summed = sum_over_ranks([terms[name] for name in names])
    averaged = {name: value / world for name, value in zip(names, summed.tolist(), strict=True)}
    averaged["lr"] = terms["lr"]  # the same on every rank
    return averaged


@torch.no_grad()
def predict_shard(model, shard, collate) -> list[dict]:
    """COCO result records for this rank's val images, in original image pixels: the MAX_DETS best poses per image
    (all that the protocols score), so what the ranks gather and the eval artifacts stay proportional to it."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    device = module.pixel_mean.device
    records: list[dict] = []
    for batch in shard.iter_torch_batches(batch_size=EVAL_BATCH_SIZE, collate_fn=collate):
        batch = batch.to(device)
        results = module.inference(batch.images, batch.image_sizes)
        for poses, image_id, (sx, sy) in zip(results, batch.image_ids.tolist(), batch.scales.tolist(), strict=True):
            keypoints = poses["keypoints"].cpu().clone()
            keypoints[..., 0] /= sx
            keypoints[..., 1] /= sy
            scaled = {"keypoints": keypoints, "scores": poses["scores"].cpu()}
            records.extend(to_coco_results(scaled, image_id, max_dets=MAX_DETS))
    module.train(was_training)
    return records


def evaluate_distributed(
    model, shard, cfg: ExperimentConfig, rank: int, world: int, collate
) -> tuple[dict[str, float], list[dict]]:
    """Every rank predicts its val images; rank 0 gathers and scores them. Returns (metrics, on every rank;
    the gathered COCO result records)."""
    records = predict_shard(model, shard, collate)
    if world > 1:
        gathered: list[list[dict]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    metrics = [{}]
    if rank == 0:
        gt = gt_json_path(cfg.data.split_uri(cfg.data.val_split))
        with quiet():  # pycocotools prints ~20 lines per evaluation
            metrics = [evaluate_keypoints(gt, records, cfg.model.spec)]
    if world > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0], records


@contextlib.contextmanager
def quiet():
    """Swallow what a library prints. Ray Train's workers patch `print` to log every line on the root logger
    at INFO as well as writing it to a redirected stdout, so both are muted for the block."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def inject_fault(cfg: ExperimentConfig, iteration: int, start_iteration: int, rank: int, world: int) -> None:
    """Fault injection for tests and drills: the last rank's process dies at train.fail_at_iter, once (an
    attempt that resumed from a checkpoint does not die again)."""
    if cfg.train.fail_at_iter == iteration and start_iteration == 0 and rank == world - 1:
        # The controller collects reports by polling the workers (every 2 s by default): wait for it to take
        # the last checkpoint, as it would have for a crash that comes some time after one.
        time.sleep(FAULT_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)


def start_system_metrics(cfg: ExperimentConfig, run_id: str, resumed: bool):
    """MLflow's own system-metrics sampler (CPU, memory, GPU through nvidia-ml-py) logging into the training run."""
    if not cfg.tracking.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=cfg.tracking.uri)
    monitor.start()
    return monitor


class Progress:
    """Rank 0's one console line per log interval: iteration / max, loss, images/s and the time still to go."""

    def __init__(self, cfg: ExperimentConfig, start_iteration: int):
        self.name, self.max_iters = cfg.run.name, cfg.train.max_iters
        self.start_iteration, self.started = start_iteration, time.perf_counter()

    def line(self, iteration: int, metrics: dict[str, float]) -> None:
        rate = (iteration - self.start_iteration) / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.max_iters - iteration) / max(rate, 1e-9)
        # To the process's own stdout: Ray Train's patched print would write the line twice (stdout and log).
        print(f"[{self.name}] iter {iteration}/{self.max_iters}  loss {metrics['loss']:.3f}  "
              f"{metrics['images_per_s']:.1f} img/s  ETA {_duration(eta)}", file=sys.__stdout__, flush=True)  # fmt: skip


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def log_final_artifacts(logger: RunLogger, model, cfg: ExperimentConfig, val_shard, collate) -> None:
    """Final weights (querypose.weights format), loss/AP curves and a SPEGM attention picture."""
    with tempfile.TemporaryDirectory(prefix="querypose-final-") as folder:
        weights = save_weights(unwrap(model), cfg.model, Path(folder) / "model.pt")
        logger.log_file(weights, "model")
        (Path(folder) / "config.yaml").write_text(cfg.to_yaml())
        logger.log_file(Path(folder) / "config.yaml", "model")
    picture = attention_picture(model, val_shard, collate, cfg)
    if picture is not None:
        logger.log_figure(picture, "plots/spegm_attention.png")
    curves = {name: logger.metric_history(name) for name in PROGRESS_METRICS.values()}  # waits for MLflow
    logger.log_figure(plots.curves_figure(curves), "plots/curves.png")


@torch.no_grad()
def attention_picture(model, val_shard, collate, cfg: ExperimentConfig):
    """The paper's Figure 5 on the first val image: the top pose's SPEGM attention map for every part."""
    module = unwrap(model)
    if cfg.model.interaction != "spegm" or cfg.model.keypoint_head != "queries":
        return None
    for batch in val_shard.iter_torch_batches(batch_size=1, collate_fn=collate):
        was_training = module.training
        module.eval()
        batch = batch.to(module.pixel_mean.device)
        result = module.inference(batch.images, batch.image_sizes, return_attention=True)[0]
        module.train(was_training)
        if "attention" not in result or len(result["scores"]) == 0:
            return None
        height, width = batch.image_sizes[0].tolist()
        image = batch.images[0, :, :height, :width].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        spec = cfg.model.spec
        part_names = ["+".join(spec.keypoint_names[k] for k in part) for part in spec.parts(cfg.model.part_scheme)]
        return plots.attention_figure(image, result["boxes"][0].cpu(), result["attention"][0].cpu(), part_names)
    return None


def epochs_for(cfg: ExperimentConfig, num_images: int) -> int:
    """Epochs of the train set that max_iters global batches need (at least one)."""
    return max(1, math.ceil(cfg.train.max_iters * cfg.train.batch_size / max(num_images, 1)))
