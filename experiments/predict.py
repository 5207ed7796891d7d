"""Run QueryPose on images, folders of images or videos; draw poses and write COCO-format results.

    python experiments/predict.py --weights model.pt photo.jpg frames/ clip.mp4 --out predictions/

Weights come from a file written by training (state_dict + model config), or a bare state_dict with
--config; without --weights the model keeps its random initialisation (useful only to exercise the path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="images, folders of images, or videos")
    parser.add_argument(
        "--weights",
        help="weights file from training (or a bare state_dict with --config), models:/NAME/VERSION or "
        "an MLflow run id",
    )
    parser.add_argument("--config", type=Path, help="experiment YAML whose model section describes the network")
    parser.add_argument("--out", type=Path, required=True, help="output folder for pictures and results.json")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw poses scoring at least this")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def collect_inputs(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise ValueError(f"no images or videos found in {', '.join(map(str, paths))}")
    return files


def build(weights: str | None, config: Path | None):
    from querypose import ModelConfig, build_model
    from querypose.weights import load_weights

    model_cfg, state = ModelConfig(), None
    if config is not None:
        from querypose_platform.config import load_config

        model_cfg = load_config(config).model
    if weights and not Path(weights).is_file() and (weights.startswith("models:/") or "/" not in weights):
        from querypose_platform.config import load_config
        from querypose_platform.inference import resolve_weights

        weights = str(resolve_weights(weights, load_config(config).tracking)[0])  # registry URI or MLflow run id
    if weights:
        state, saved_cfg = load_weights(weights)
        if saved_cfg is not None and config is None:
            model_cfg = saved_cfg
    else:
        print("warning: no --weights given: the model is randomly initialised", file=sys.stderr)
    from querypose_platform.storage import resolve_backbone_weights

    model = build_model(resolve_backbone_weights(model_cfg))
    if state is not None:
        model.load_state_dict(state)
    return model.eval(), model_cfg


def draw(image_bgr, poses: dict, spec, min_score: float):
    import cv2

    for box, keypoints, score in zip(
        poses["boxes"].tolist(), poses["keypoints"].tolist(), poses["scores"].tolist(), strict=True
    ):
        if score < min_score:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(image_bgr, (x1, y1), (x2, y2), (0, 200, 255), 2)
        cv2.putText(image_bgr, f"{score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 200, 255), 1)
        points = [(int(round(x)), int(round(y))) for x, y, _ in keypoints]
        for a, b in spec.skeleton:
            cv2.line(image_bgr, points[a], points[b], (255, 128, 0), 2, cv2.LINE_AA)
        for point in points:
            cv2.circle(image_bgr, point, 3, (0, 0, 255), -1, cv2.LINE_AA)
    return image_bgr


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cv2
    import torch

    from querypose.engine import to_coco_results

    files = collect_inputs(args.inputs)
    model, model_cfg = build(args.weights, args.config)
    model.to(args.device)
    spec = model.spec
    args.out.mkdir(parents=True, exist_ok=True)
    results, image_id = [], 0

    def run(frame_bgr):
        nonlocal image_id
        image_id += 1
        pixels = torch.from_numpy(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float().to(args.device)
        poses = {k: v.cpu() for k, v in model.predict([pixels])[0].items()}
        results.extend(to_coco_results(poses, image_id))
        return draw(frame_bgr, poses, spec, args.min_score)

    index = []
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(path))
            fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
            writer, first_id = None, image_id + 1
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                drawn = run(frame)
                if writer is None:
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(args.out / f"{path.stem}.mp4"), fourcc, fps, drawn.shape[1::-1])
                writer.write(drawn)
            capture.release()
            if writer is None:
                raise ValueError(f"video {path} has no readable frames")
            writer.release()
            index.append({"source": str(path), "first_image_id": first_id, "last_image_id": image_id})
        else:
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                raise ValueError(f"image {path} cannot be decoded")
            cv2.imwrite(str(args.out / f"{path.stem}.jpg"), run(frame))
            index.append({"source": str(path), "image_id": image_id})
    (args.out / "results.json").write_text(json.dumps(results))
    (args.out / "inputs.json").write_text(json.dumps(index, indent=1))
    print(f"{len(files)} inputs, {image_id} frames, {len(results)} poses -> {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
