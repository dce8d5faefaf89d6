"""Draw samples from an export: the one interface that generation, evaluation and other teams use.

    sampler = load_sampler("runs/x")                       # a run directory or its export/; sha256-checked
    options = sampler.resolve_options({"truncation": 0.8})  # the family's sampling options, defaulted
    images = sampler.sample(labels, torch.Generator().manual_seed(0), options)   # uint8 [n, C, H, W]

Each model family registers a builder with `@register_sampler("family")`; the builder gets the export's
tensors and config.json and returns a Sampler. Random numbers come only from the `generator` passed in
(drawn on the CPU), never from the global RNG, so the same (export, labels, generator seed, options)
give the same images on any machine of the same device type.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gensynth.errors import UsageError
from gensynth.export import load_export
from gensynth.imaging import to_uint8
from gensynth.models.dcgan import Generator


class Sampler:
    """Base class: the export's identity plus `sample`. Families override `OPTIONS` and `draw`."""

    family: str = ""
    # name -> (default, help); a family's sampling options, e.g. truncation for the GAN
    OPTIONS: dict[str, tuple[Any, str]] = {}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.classes: list[str] = list(config["classes"])
        self.num_classes: int = int(config["num_classes"])
        image = config["image"]
        self.height, self.width, self.channels = int(image["height"]), int(image["width"]), int(image["channels"])

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The family's options with defaults filled in; an option of another family is a UsageError."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.OPTIONS))
        if unknown:
            allowed = ", ".join(self.OPTIONS) or "none"
            raise UsageError(f"sampling option(s) {', '.join(unknown)} do not apply to a {self.family} export; "
                             f"its options: {allowed}")
        return {name: given.get(name, default) for name, (default, _) in self.OPTIONS.items()}

    def check_labels(self, labels: torch.Tensor) -> None:
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UsageError(f"labels must be in 0..{self.num_classes - 1} for this export "
                             f"({', '.join(self.classes)})")

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any] | None = None,
               chunk: int = 256) -> torch.Tensor:
        """uint8 [n, C, H, W] images of the given labels. Work is cut into fixed chunks of `chunk` samples so
        the result does not depend on how a caller batches its requests."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        self.check_labels(labels)
        options = self.resolve_options(options)
        out = [self.draw(labels[i:i + chunk], generator, options) for i in range(0, len(labels), chunk)]
        if not out:
            return torch.empty((0, self.channels, self.height, self.width), dtype=torch.uint8)
        return torch.cat(out)

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Network output in [-1, 1] at 2^k resolution -> uint8 at the data's size, on the CPU."""
        return to_uint8(x, self.height, self.width).cpu()


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(family: str) -> Callable[[type[Sampler]], type[Sampler]]:
    def register(cls: type[Sampler]) -> type[Sampler]:
        cls.family = family
        SAMPLERS[family] = cls
        return cls

    return register


def load_sampler(path: str | Path, device: str | torch.device = "cpu") -> Sampler:
    """A run directory or an export directory -> its Sampler, after checking the weights' sha256."""
    tensors, config = load_export(path)
    family = config.get("family")
    if family not in SAMPLERS:
        raise UsageError(f"{path}: export of family {family!r}, which this gensynth cannot sample "
                         f"(known: {', '.join(sorted(SAMPLERS))})")
    return SAMPLERS[family](tensors, config, torch.device(device))


# ----------------------------------------------------------------------------------------------
# the families


def truncated_normal(shape: tuple[int, ...], threshold: float, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise; with threshold > 0, entries beyond +-threshold are redrawn until inside
    (the truncation trick, Brock et al. 2019, BigGAN): fidelity up, variety down."""
    z = torch.randn(shape, generator=generator)
    if threshold > 0:
        outside = z.abs() > threshold
        while outside.any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator)
            outside = z.abs() > threshold
    return z


@register_sampler("gan")
class GANSampler(Sampler):
    OPTIONS = {"truncation": (0.0, "redraw latent entries beyond +-t (BigGAN's truncation trick); 0 = off")}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.G = Generator(**config["architecture"])
        self.G.load_state_dict(tensors)
        self.G.to(self.device).eval()

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        if not float(options["truncation"]) >= 0:
            raise UsageError(f"truncation={options['truncation']}: must be >= 0 (0 = off)")
        options["truncation"] = float(options["truncation"])
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        z = truncated_normal((len(labels), self.G.z_dim), options["truncation"], generator)
        return self.to_images(self.G(z.to(self.device), labels.to(self.device)))
