"""Between stored images (uint8, the data's own size) and network tensors (float in [-1, 1], padded
to the network's 2^k resolution). Padding is centred and filled with -1 (black); crop undoes it."""

from __future__ import annotations

import numpy as np
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


def image_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid, row-major."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = images[i]
    return grid
