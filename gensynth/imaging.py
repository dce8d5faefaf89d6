"""Between stored images (uint8, the data's own size) and network tensors (float in [-1, 1], padded
to the network's 2^k resolution). Padding is centred and filled with -1 (black); crop undoes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_amounts(size: int, resolution: int) -> tuple[int, int]:
    if size > resolution:
        raise ValueError(f"images of size {size} do not fit the network resolution {resolution}; "
                         f"set model.resolution to a power of two >= {size}")
    before = (resolution - size) // 2
    return before, resolution - size - before


def to_network(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float [n, C, R, R] in [-1, 1]."""
    x = images.float().div_(127.5).sub_(1.0)
    top, bottom = pad_amounts(x.shape[2], resolution)
    left, right = pad_amounts(x.shape[3], resolution)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=-1.0)
    return x


def to_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float [n, C, R, R] in [-1, 1] -> uint8 [n, C, height, width], cropping the padding away."""
    top, _ = pad_amounts(height, x.shape[2])
    left, _ = pad_amounts(width, x.shape[3])
    x = x[:, :, top:top + height, left:left + width]
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
