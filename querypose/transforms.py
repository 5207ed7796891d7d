"""Augmentation and test-time resizing on (image, boxes, keypoints), shared by training, data and predict."""

from __future__ import annotations

import torch


def pad_batch(images: list[torch.Tensor], size_divisor: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad CHW images to a common size, a multiple of `size_divisor`, bottom/right.

    Returns (images (B,3,H,W), image_sizes (B,2) long as [height, width] of each unpadded image).
    """
    sizes = torch.tensor([[img.shape[-2], img.shape[-1]] for img in images], dtype=torch.long)
    height, width = (int(-(-s // size_divisor) * size_divisor) for s in sizes.max(dim=0).values.tolist())
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    return batch, sizes
