"""The Sampler base: what generation, evaluation and other teams draw from an export.

    sampler = load_sampler("runs/x")                       # gensynth.families; sha256-checked
    options = sampler.resolve_options({"truncation": 0.8})  # the family's sampling options, defaulted
    images = sampler.sample(labels, torch.Generator().manual_seed(0), options)   # uint8 [n, C, H, W]
    recon = sampler.reconstruct(images, labels)   # autoencoders: Reconstruction(images, codes or None)

`reconstruct` is what `gensynth eval` measures reconstruction figures with (gensynth.reconstruction); by
default a family does not reconstruct (NoReconstruction, which evaluation reports as skipped).

A family's `sampler(tensors, config, device)` builds its Sampler from the export's tensors and config.json.
Random numbers come only from the `generator` passed in (drawn on the CPU), never from the global RNG, so
the same (export, labels, generator seed, options) give the same images on any machine of the same device
type.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gensynth.errors import UsageError
from gensynth.imaging import to_uint8

PURPOSES = ("cas", "augment")  # what a synthetic set is for (GenerateOptions.purpose)
FILTER_OPTION = "filter_threshold"  # a Sampler.PURPOSES key that is generate's --filter, not a sampling option


class Reconstruction(NamedTuple):
    images: torch.Tensor  # uint8 [n, C, H, W] on the CPU, the inputs' size
    codes: torch.Tensor | None  # int64 code indices [n, ...] of a codebook (Sampler.codebook_size); None without


class NoReconstruction(UsageError):
    """This export cannot reconstruct images: its family does not, or what it needs is not at hand."""


class Sampler:
    """Base class: the export's identity plus `sample`. Families override `OPTIONS` and `draw`; autoencoders
    also `reconstruct` (and `codebook_size` when they have a codebook)."""

    # name -> (default, help); a family's sampling options, e.g. truncation for the GAN
    OPTIONS: dict[str, tuple[Any, str]] = {}
    # purpose -> option values that serve it better than OPTIONS' defaults, by measurement (bench/purpose.py):
    # "cas", a classifier trained on the samples alone (wants variety), "augment", samples added to real data
    # (wants fidelity); Ravuri & Vinyals 2019 found the best BigGAN truncation differs between the two. Besides
    # the family's sampling options, FILTER_OPTION sets the threshold of generate's classifier filter.
    PURPOSES: dict[str, dict[str, Any]] = {}
    codebook_size: int = 0  # codes in the codebook that `reconstruct` reports codes of; 0 = no codebook

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: str | torch.device = "cpu"):
        self.config = config
        self.family: str = str(config.get("family", ""))  # model.family of the run: a built-in name or module:Class
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

    def purpose_options(self, purpose: str) -> dict[str, Any]:
        """The measured sampling option values for `purpose` ("general": none, the plain defaults)."""
        return {k: v for k, v in self._purpose(purpose).items() if k != FILTER_OPTION}

    def purpose_filter(self, purpose: str) -> float | None:
        """The classifier filter's threshold measured best for `purpose`; None: no filter."""
        return self._purpose(purpose).get(FILTER_OPTION)

    def _purpose(self, purpose: str) -> dict[str, Any]:
        if purpose not in ("general", *PURPOSES):
            raise UsageError(f"purpose {purpose!r}: use one of general, {', '.join(PURPOSES)}")
        return self.PURPOSES.get(purpose, {})

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

    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor) -> Reconstruction:
        """uint8 [n, C, H, W] images (and their int64 labels, for class-conditional encoders) -> their
        reconstructions through the model. The default: this family does not reconstruct."""
        raise NoReconstruction(f"the {self.family} family does not reconstruct images")

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Network output in [-1, 1] at 2^k resolution -> uint8 at the data's size, on the CPU."""
        return to_uint8(x, self.height, self.width).cpu()


def positive_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name}={value}: must be a number > 0")
    return value
