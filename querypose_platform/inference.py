"""Batch inference over shards with a Ray Data actor pool (the one-off eval job), and where weights come from:
a file, an MLflow run, or the model registry."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import ray
import torch

from querypose import build_model
from querypose.engine import to_coco_results
from querypose.evaluation import MAX_DETS
from querypose.weights import load_weights
from querypose_platform.config import TrackingConfig
from querypose_platform.data import collate_batch
from querypose_platform.storage import resolve_backbone_weights

WEIGHTS_ARTIFACT = "model/model.pt"


class Predictor:
    """A Ray Data actor: loads the model once, turns batches of val rows into COCO result records (the MAX_DETS
    best poses per image: all that the protocols score)."""

    def __init__(self, weights: str, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        state, model_cfg = load_weights(weights)
        if model_cfg is None:
            raise ValueError(f"weights file {weights} carries no model config: export it with querypose.weights")
        self.model = build_model(resolve_backbone_weights(model_cfg))  # a bucket's weights: a local copy
        self.model.load_state_dict(state)
        self.model.eval().to(device)
        self.collate = functools.partial(collate_batch, num_keypoints=model_cfg.spec.num_keypoints)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = np.asarray(rows["valid"], bool)
        records = [""] * len(valid)
        if valid.any():
            batch = self.collate(rows).to(self.device)
            results = self.model.inference(batch.images, batch.image_sizes)
            image_ids, scales = batch.image_ids.tolist(), batch.scales.tolist()
            outputs = iter(zip(results, image_ids, scales, strict=True))
            for i in np.flatnonzero(valid):
                poses, image_id, (sx, sy) = next(outputs)
                keypoints = poses["keypoints"].cpu().clone()
                keypoints[..., 0] /= sx
                keypoints[..., 1] /= sy
                scaled = {"keypoints": keypoints, "scores": poses["scores"].cpu()}
                records[i] = json.dumps(to_coco_results(scaled, image_id, max_dets=MAX_DETS))
        return {"image_id": np.asarray(rows["image_id"]), "valid": valid, "records": np.array(records, dtype=object)}


def predict_dataset(
    dataset: ray.data.Dataset, weights: str, batch_size: int = 4, actors: int = 1, use_gpu: bool = False
) -> tuple[list[dict], int]:
    """(COCO result records of every valid image, number of rows that failed to decode)."""
    predictions = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={"weights": str(weights), "device": "cuda" if use_gpu else "cpu", "threads": None},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
    )
    records: list[dict] = []
    dropped = 0
    for row in predictions.iter_rows():
        if not row["valid"]:
            dropped += 1
            continue
        records.extend(json.loads(row["records"]))
    return records, dropped


def resolve_weights(source: str, tracking: TrackingConfig) -> tuple[Path, str | None]:
    """A weights path, an MLflow run id or a `models:/NAME/VERSION` URI -> (local weights file, source run id)."""
    import mlflow
    from mlflow import MlflowClient

    # The registry lives with the tracking store (a models:/ URI alone would look in MLflow's default registry).
    client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    if source.startswith("models:/"):
        name, _, version = source.removeprefix("models:/").partition("/")
        if not name or not version:
            raise ValueError(f"model URI {source!r}: expected models:/NAME/VERSION")
        model_version = client.get_model_version(name, version)
        location = client.get_model_version_download_uri(name, version)  # through the server's artifact proxy
        folder = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking.uri)
        return _weights_in(Path(folder), source), model_version.run_id
    path = Path(source)
    if path.is_file():
        return path, None
    if path.suffix in {".pt", ".pth"} or "/" in source:
        raise FileNotFoundError(f"weights file {source} does not exist")
    run = client.get_run(source)  # raises a clear MlflowException for an unknown run id
    folder = client.download_artifacts(run.info.run_id, WEIGHTS_ARTIFACT.rsplit("/", 1)[0])
    return _weights_in(Path(folder), f"run {source}"), run.info.run_id


def _weights_in(folder: Path, what: str) -> Path:
    candidate = folder / Path(WEIGHTS_ARTIFACT).name if folder.is_dir() else folder
    if not candidate.is_file():
        raise FileNotFoundError(f"{what}: no {Path(WEIGHTS_ARTIFACT).name} among its artifacts ({folder})")
    return candidate
