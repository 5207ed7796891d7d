"""Run an exported QueryPose (experiments/export.py) on images with onnxruntime alone: no PyTorch, no querypose.

    python experiments/onnx_predict.py outputs/querypose.onnx photos/ --out predictions/
    python experiments/onnx_predict.py model.onnx a.jpg b.jpg --out out/ --min-score 0.2 --provider cuda

Needs only numpy, opencv and onnxruntime (onnxruntime-gpu for --provider cuda): copy this file next to the model.
Everything model-specific is read from the file's metadata: the resize and normalisation constants, a static
input size if the export has one, and the keypoint set (names and skeleton for the drawing). Writes one picture
per image with boxes and skeletons, and results.json (COCO keypoint results, image ids in input order).

Pre-processing (what the graph expects): RGB float32, resized (bilinear) so the short side is `short_side` and the
long side at most `max_size` (a static graph: also at most its input size), (x - pixel_mean) / pixel_std per
channel, zero-padded bottom/right to a multiple of 32 (a static graph: to its input size), plus the unpadded
[h, w]. Post-processing: every query comes back; divide x and y by the resize factors, sort by score, keep the
confident ones. There is no NMS: the model's set prediction gives one query per instance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def load(path: str | Path, provider: str = "cpu", threads: int | None = None):
    """(onnxruntime session, preprocessing constants, keypoint set) of an exported file."""
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=PROVIDERS[provider])
    meta = session.get_modelmeta().custom_metadata_map
    if "querypose.preprocessing" not in meta:
        raise ValueError(f"{path}: no querypose.preprocessing metadata (export it with experiments/export.py)")
    return session, json.loads(meta["querypose.preprocessing"]), json.loads(meta["querypose.keypoint_set"])


def preprocess(image_rgb: np.ndarray, pre: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(H, W, 3) uint8 RGB -> images (1, 3, H', W') float32, image_sizes (1, 2) int64, (sx, sy) resize factors."""
    height, width = image_rgb.shape[:2]
    scale = min(pre["short_side"] / min(height, width), pre["max_size"] / max(height, width))
    if pre["input_size"]:  # a static graph: the image must fit its input
        scale = min(scale, pre["input_size"][0] / height, pre["input_size"][1] / width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = cv2.resize(image_rgb.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normalised = (resized - np.float32(pre["pixel_mean"])) / np.float32(pre["pixel_std"])
    divisor = pre["size_divisor"]
    padded_h, padded_w = pre["input_size"] or (-(-new_h // divisor) * divisor, -(-new_w // divisor) * divisor)
    images = np.zeros((1, 3, padded_h, padded_w), np.float32)
    images[0, :, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return images, np.array([[new_h, new_w]], np.int64), (new_w / width, new_h / height)


def postprocess(outputs: list[np.ndarray], scale: tuple[float, float], image_size: tuple[int, int]) -> dict:
    """One image's graph outputs -> boxes (N, 4) clipped to the image, keypoints (N, K, 3) [x, y, confidence],
    scores (N,), in the pixels of the original image of `image_size` (h, w), best first."""
    boxes, keypoints, sigmas, scores = (output[0] for output in outputs)
    sx, sy = scale
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order] / np.array([sx, sy, sx, sy], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_size[0])
    points = keypoints[order] / np.array([sx, sy], np.float32)
    confidence = 1 - sigmas[order].mean(-1, keepdims=True)
    return {"boxes": boxes, "keypoints": np.concatenate([points, confidence], -1), "scores": scores[order]}


def predict(session, pre: dict, image_rgb: np.ndarray) -> dict[str, np.ndarray]:
    images, image_sizes, scale = preprocess(image_rgb, pre)
    outputs = session.run(
        ["boxes", "keypoints", "keypoint_sigmas", "scores"], {"images": images, "image_sizes": image_sizes}
    )
    return postprocess(outputs, scale, image_rgb.shape[:2])


def draw(image_bgr: np.ndarray, poses: dict, keypoint_set: dict, min_score: float) -> np.ndarray:
    index = {name: k for k, name in enumerate(keypoint_set["keypoints"])}
    for box, points, score in zip(poses["boxes"], poses["keypoints"], poses["scores"], strict=True):
        if score < min_score:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(image_bgr, (x1, y1), (x2, y2), (0, 200, 255), 2)
        cv2.putText(image_bgr, f"{score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 200, 255), 1)
        xy = [(int(round(x)), int(round(y))) for x, y, _ in points]
        for a, b in keypoint_set["skeleton"]:
            cv2.line(image_bgr, xy[index[a]], xy[index[b]], (255, 128, 0), 2, cv2.LINE_AA)
        for point in xy:
            cv2.circle(image_bgr, point, 3, (0, 0, 255), -1, cv2.LINE_AA)
    return image_bgr


def coco_results(poses: dict, image_id: int, pixel_centre: float) -> list[dict]:
    """COCO keypoint results: x, y back to pixel indices (the model's pixel i spans [i, i + 1))."""
    records = []
    for points, score in zip(poses["keypoints"], poses["scores"], strict=True):
        points = points.copy()
        points[:, :2] -= pixel_centre
        flat = [round(float(v), 2) for v in points.reshape(-1)]
        records.append({"image_id": image_id, "category_id": 1, "keypoints": flat, "score": round(float(score), 5)})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an ONNX file written by experiments/export.py")
    parser.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder for pictures and results.json")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw poses scoring at least this")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    args = parser.parse_args(argv)

    files = []
    for path in args.inputs:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            print(f"error: input {path} does not exist", file=sys.stderr)
            return 2
    if not args.model.is_file():
        print(f"error: model {args.model} does not exist", file=sys.stderr)
        return 2
    try:
        session, pre, keypoint_set = load(args.model, args.provider, args.threads)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_id, path in enumerate(files, 1):
        image_bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image_bgr is None:
            print(f"error: image {path} cannot be decoded", file=sys.stderr)
            return 2
        poses = predict(session, pre, cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        results += coco_results(poses, image_id, pre["keypoint_pixel_centre"])
        cv2.imwrite(str(args.out / f"{path.stem}.jpg"), draw(image_bgr, poses, keypoint_set, args.min_score))
    staging = args.out / "results.json.tmp"
    staging.write_text(json.dumps(results))
    staging.replace(args.out / "results.json")
    print(f"{len(files)} images, {len(results)} poses ({keypoint_set['name']}, {session.get_providers()[0]}) "
          f"-> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
