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
from gensynth.imaging import to_network, to_uint8
from gensynth.models.dcgan import Generator
from gensynth.models.prior import CodePrior, sample_codes
from gensynth.models.vae import VAE
from gensynth.models.vqvae import VQVAE


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


# -- VQ-VAE, its prior, VAE. The functions below are what the trainers draw their grids with, too, so an
# export reproduces its run's grids bit for bit (on the same device type).


def positive_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name}={value}: must be a number > 0")
    return value


@torch.no_grad()
def vqvae_reconstruct(model: VQVAE, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 images -> their uint8 reconstructions through the codebook (eval mode: the codebook stays)."""
    was_training = model.training
    model.eval()
    device = model.quantizer.embed.device
    recon, _ = model(to_network(images.to(device), model.resolution))
    model.train(was_training)
    return to_uint8(recon, height, width).cpu()


@torch.no_grad()
def vqvae_encode(model: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> int64 code grids [n, grid, grid] on the CPU (eval mode)."""
    was_training = model.training
    model.eval()
    codes = model.encode(to_network(images.to(model.quantizer.embed.device), model.resolution))
    model.train(was_training)
    return codes.cpu()


@torch.no_grad()
def prior_images(prior: CodePrior, decoder: VQVAE, labels: torch.Tensor, generator: torch.Generator,
                 temperature: float, top_k: int, height: int, width: int) -> torch.Tensor:
    """Codes drawn from the prior for `labels`, decoded by the VQ-VAE: uint8 [n, C, height, width]."""
    codes = sample_codes(prior, labels, generator, temperature, top_k)
    grids = codes.view(len(labels), decoder.grid, decoder.grid).to(decoder.quantizer.embed.device)
    was_training = decoder.training
    decoder.eval()
    images = to_uint8(decoder.decode(grids), height, width).cpu()
    decoder.train(was_training)
    return images


@torch.no_grad()
def vae_images(vae: VAE, labels: torch.Tensor, generator: torch.Generator, temperature: float, height: int,
               width: int) -> torch.Tensor:
    """Decoder means of z ~ N(0, temperature^2 I) for `labels`: uint8 [n, C, height, width]."""
    device = vae.log_sigma.device
    z = torch.randn(len(labels), vae.latent_dim, generator=generator) * temperature
    was_training = vae.training
    vae.eval()
    images = to_uint8(vae.decode(z.to(device), labels.to(device)), height, width).cpu()
    vae.train(was_training)
    return images


@register_sampler("vqvae")
class VQVAESampler(Sampler):
    """A VQ-VAE alone reconstructs (and encodes) images; new images come from a prior over its codes."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.model = VQVAE(**config["architecture"])
        self.model.load_state_dict(tensors)
        self.model.to(self.device).eval()

    def sample(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any] | None = None,
               chunk: int = 256) -> torch.Tensor:
        run = self.config.get("run", "the VQ-VAE run")
        raise UsageError(f"this is a VQ-VAE export ({run}): it reconstructs images but cannot draw new ones; "
                         f"train the prior over its codes (gensynth train configs/prior_fashion.yaml "
                         f"prior.vqvae=runs/{run}) and sample from the prior's run")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return vqvae_encode(self.model, images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return vqvae_reconstruct(self.model, images, self.height, self.width)


@register_sampler("prior")
class PriorSampler(Sampler):
    """The prior over a VQ-VAE's codes with the VQ-VAE's decoder and codebook bundled in the same export."""

    OPTIONS = {"temperature": (1.0, "divide the prior's logits by T before each draw: < 1 sharper, > 1 more "
                               "varied"),
               "top_k": (0, "draw each code among the k most likely only (Fan et al. 2018); 0 = all codes")}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.prior = CodePrior(**config["architecture"])
        self.prior.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("prior.")})
        self.decoder = VQVAE(**config["vqvae"]["architecture"])
        self.decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("vqvae.")})
        self.prior.to(self.device).eval()
        self.decoder.to(self.device).eval()

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        options["temperature"] = positive_float("temperature", options["temperature"])
        top_k = options["top_k"]
        if isinstance(top_k, float) and top_k.is_integer():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise UsageError(f"top_k={top_k!r}: must be a whole number >= 0 (0 = all codes)")
        options["top_k"] = top_k
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        return prior_images(self.prior, self.decoder, labels, generator, options["temperature"], options["top_k"],
                            self.height, self.width)


@register_sampler("vae")
class VAESampler(Sampler):
    OPTIONS = {"temperature": (1.0, "scale of the latent noise, z ~ N(0, T^2 I): < 1 trades variety for "
                               "fidelity")}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.vae = VAE(**config["architecture"])
        self.vae.load_state_dict(tensors)
        self.vae.to(self.device).eval()

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        options["temperature"] = positive_float("temperature", options["temperature"])
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        return vae_images(self.vae, labels, generator, options["temperature"], self.height, self.width)
