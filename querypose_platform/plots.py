"""Matplotlib figures logged as MLflow artifacts: training curves, SPEGM attention maps, the grid's bar chart."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def curves_figure(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    """One panel per metric: value against iteration."""
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items(), strict=True):
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="." if len(points) < 30 else None)
        axis.set_title(name)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def attention_figure(image: np.ndarray, box: torch.Tensor, attention: torch.Tensor, part_names: list[str]) -> Figure:
    """The person crop under `box` (x0, y0, x1, y1) and each part's attention map (M, S, S) over it."""
    x0, y0, x1, y1 = (int(round(v)) for v in box.tolist())
    height, width = image.shape[:2]
    x0, x1 = max(0, min(x0, width - 1)), max(1, min(max(x1, x0 + 1), width))
    y0, y1 = max(0, min(y0, height - 1)), max(1, min(max(y1, y0 + 1), height))
    crop = image[y0:y1, x0:x1]
    count = attention.shape[0] + 1
    figure, axes = plt.subplots(1, count, figsize=(2.2 * count, 2.8), squeeze=False)
    axes[0][0].imshow(crop)
    axes[0][0].set_title("person")
    for axis, weights, name in zip(axes[0][1:], attention.float().numpy(), part_names, strict=True):
        axis.imshow(crop)
        axis.imshow(weights, cmap="jet", alpha=0.5, extent=(-0.5, crop.shape[1] - 0.5, crop.shape[0] - 0.5, -0.5))
        axis.set_title(name, fontsize=7)
    for axis in axes[0]:
        axis.axis("off")
    figure.tight_layout()
    return figure


def results_bar_figure(rows: list[dict], metrics: list[str], label_key: str = "cell") -> Figure:
    """Grouped bars: one group per grid cell, one bar per metric."""
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(rows) * len(metrics) / 3), 4))
    width = 0.8 / max(len(metrics), 1)
    positions = np.arange(len(rows))
    for i, metric in enumerate(metrics):
        axis.bar(positions + i * width, [row.get(metric, 0.0) for row in rows], width, label=metric)
    axis.set_xticks(positions + width * (len(metrics) - 1) / 2)
    axis.set_xticklabels([row[label_key] for row in rows], rotation=20, ha="right", fontsize=7)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
