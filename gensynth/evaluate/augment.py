"""Classic, free image augmentation for the usefulness classifiers: the honest real-only baseline.

A team with K labelled images per class would not train on them bare: random shifts (zero padding
and a random crop back to size), horizontal flips and cutout (DeVries & Taylor 2017) cost nothing.
The synthetic set has to beat that, so the real samples of every usefulness classifier get them
(eval.real_augment; bench/classic_aug.py measured which combination to use on Fashion-MNIST).

    augment = ClassicAugment.parse("shift,flip", shift=2)
    batch = augment(batch, generator)         # uint8 [n, C, H, W] in, uint8 [n, C, H, W] out

Every random draw comes from the `generator` argument (seeded training stays reproducible).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gensynth.errors import UsageError

PARTS = ("shift", "flip", "cutout")


@dataclass(frozen=True)
class ClassicAugment:
    shift: int = 0  # zero-pad by this many pixels, then crop a random window of the original size (0 = off)
    flip: bool = False  # mirror left-right with probability 1/2
    cutout: int = 0  # black out one square of this side at a random centre, clipped at the edges (0 = off)

    @classmethod
    def parse(cls, spec: str, shift: int = 2, cutout: int = 8) -> ClassicAugment:
        """From a comma-separated list of parts (shift, flip, cutout; empty or "none" = nothing)."""
        parts = [p.strip() for p in spec.split(",") if p.strip() and p.strip() != "none"]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise UsageError(f"augmentation {spec!r}: unknown part {', '.join(unknown)}; use a comma-separated "
                             f"list of {', '.join(PARTS)} (or none)")
        if (shift < 1 and "shift" in parts) or (cutout < 1 and "cutout" in parts):
            raise UsageError(f"augmentation {spec!r}: shift ({shift}) and cutout ({cutout}) sizes must be >= 1")
        return cls(shift=shift if "shift" in parts else 0, flip="flip" in parts,
                   cutout=cutout if "cutout" in parts else 0)

    def __bool__(self) -> bool:
        return bool(self.shift or self.flip or self.cutout)

    @property
    def spec(self) -> str:
        return ",".join(p for p, on in zip(PARTS, (self.shift, self.flip, self.cutout)) if on) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, **asdict(self)}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.shift:
            images = pad_crop(images, self.shift, generator)
        if self.flip:
            images = random_flip(images, generator)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        return images


def pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by `pad`, then crop each image at its own random offset in [0, 2 pad]."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    ys = offsets[:, :1] + torch.arange(h)[None, :]  # [n, h] rows of the padded image to keep
    xs = offsets[:, 1:] + torch.arange(w)[None, :]
    rows = padded.gather(2, ys[:, None, :, None].expand(-1, c, -1, w + 2 * pad))
    return rows.gather(3, xs[:, None, None, :].expand(-1, c, h, -1))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror left-right the images picked by a fair coin each."""
    mirror = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mirror[:, None, None, None], images.flip(3), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square per image, centred on a uniformly drawn pixel (so it may leave the edge)."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1), generator=generator)
    cx = torch.randint(0, w, (n, 1), generator=generator)
    lo = size // 2
    rows = (torch.arange(h)[None, :] >= cy - lo) & (torch.arange(h)[None, :] < cy - lo + size)  # [n, h]
    cols = (torch.arange(w)[None, :] >= cx - lo) & (torch.arange(w)[None, :] < cx - lo + size)  # [n, w]
    hole = rows[:, :, None] & cols[:, None, :]
    return images.masked_fill(hole[:, None], 0)
