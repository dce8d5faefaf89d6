"""Classic, free image augmentation for the usefulness classifiers: the honest real-only baseline.

A team with K labelled images per class would not train on them bare: random shifts (padding by the
edge pixels and a random crop back to size: the classifier's own translation; on images with black
borders, as Fashion-MNIST's mostly are, about the same as zero padding), horizontal flips and cutout
(DeVries & Taylor 2017) cost nothing.
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

from gensynth.errors import UsageError

PARTS = ("shift", "flip", "cutout")


@dataclass(frozen=True)
class ClassicAugment:
    shift: int = 0  # translate by up to this many pixels, edges replicated: pad + random crop (0 = off)
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
            images = shift(images, self.shift, generator)
        if self.flip:
            images = random_flip(images, generator)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        return images


def shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each side by `pad` copies of the edge pixels, then crop each image at its own random offset: a
    translation by up to `pad` pixels (classifier.random_shift's, here on uint8 before normalising)."""
    n, c, h, w = images.shape
    offsets = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
    ys = (torch.arange(h)[None, :] - offsets[:, :1]).clamp(0, h - 1)  # [n, h] source row of each output row
    xs = (torch.arange(w)[None, :] - offsets[:, 1:]).clamp(0, w - 1)
    rows = images.gather(2, ys[:, None, :, None].expand(-1, c, -1, w))
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
