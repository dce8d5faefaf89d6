"""The prior's sampler: codes drawn from the prior, decoded by the VQ-VAE its export bundles. It
reconstructs through the VQ-VAE export its codes came from (the bundle holds no encoder), when that export
is at hand with the same weights."""

from __future__ import annotations

from typing import Any

import torch

from gensynth.errors import UsageError
from gensynth.export import load_export
from gensynth.families.sampling import NoReconstruction, Reconstruction, Sampler, positive_float
from gensynth.families.vqvae.sampler import VQVAESampler
from gensynth.imaging import to_uint8
from gensynth.models.prior import CodePrior, sample_codes
from gensynth.models.vqvae import VQVAE

# The functions below are what the trainer draws its grids with, too, so an export reproduces its run's
# grids bit for bit (on the same device type).


@torch.no_grad()
def prior_images(prior: CodePrior, decoder: VQVAE, labels: torch.Tensor, generator: torch.Generator,
                 temperature: float, top_k: int, height: int, width: int, guidance: float = 1.0) -> torch.Tensor:
    """Codes drawn from the prior for `labels`, decoded by the VQ-VAE: uint8 [n, C, height, width]."""
    codes = sample_codes(prior, labels, generator, temperature, top_k, guidance)
    grids = codes.view(len(labels), decoder.grid, decoder.grid).to(decoder.quantizer.embed.device)
    was_training = decoder.training
    decoder.eval()
    images = to_uint8(decoder.decode(grids), height, width).cpu()
    decoder.train(was_training)
    return images


class PriorSampler(Sampler):
    """The prior over a VQ-VAE's codes with the VQ-VAE's decoder and codebook bundled in the same export."""

    OPTIONS = {"temperature": (1.0, "divide the prior's logits by T before each draw: < 1 sharper, > 1 more "
                               "varied"),
               "top_k": (0, "draw each code among the k most likely only (Fan et al. 2018); 0 = all codes"),
               "guidance": (None, "classifier-free guidance scale (Ho & Salimans 2022), > 1 more class-typical; "
                            "default: the prior's own (prior.guidance when it trained; 1 = off)")}
    # bench/purpose.py --option filter_threshold (docs/results/purpose_filter.json, the full-data prior): keeping the
    # samples the classifier gives their label >= 0.3 took CAS / real from 0.850 to 0.895 (3 seeds, spread 0.029);
    # from 0.5 up too few of its shirts pass; its temperature served neither purpose (docs/results/purpose.json)
    PURPOSES = {"cas": {"filter_threshold": 0.3}}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.prior = CodePrior(**config["architecture"])
        self.prior.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("prior.")})
        self.decoder = VQVAE(**config["vqvae"]["architecture"])
        self.decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("vqvae.")})
        self.prior.to(self.device).eval()
        self.decoder.to(self.device).eval()
        self.codebook_size = self.decoder.codebook_size
        self.source: VQVAESampler | None = None  # the VQ-VAE the codes came from, loaded when reconstructing

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        options["temperature"] = positive_float("temperature", options["temperature"])
        top_k = options["top_k"]
        if isinstance(top_k, float) and top_k.is_integer():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise UsageError(f"top_k={top_k!r}: must be a whole number >= 0 (0 = all codes)")
        options["top_k"] = top_k
        guidance = options["guidance"]
        if guidance is None:
            guidance = float(self.config.get("sampling_defaults", {}).get("guidance", 1.0))
        guidance = positive_float("guidance", guidance)
        if guidance != 1.0 and not self.prior.null_class:
            raise UsageError(f"guidance={guidance}: this prior was trained without a 'no class' token "
                             "(prior.label_dropout=0), so it cannot use classifier-free guidance; use 1")
        options["guidance"] = guidance
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        return prior_images(self.prior, self.decoder, labels, generator, options["temperature"], options["top_k"],
                            self.height, self.width, options["guidance"])

    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor) -> Reconstruction:
        """Through the VQ-VAE export the prior's codes came from: the codes the prior learnt, and the decoder
        and codebook it decodes with."""
        if self.source is None:
            named = self.config["vqvae"]
            why = f"the prior reconstructs through the VQ-VAE export its codes came from, {named.get('export')}"
            try:
                tensors, config = load_export(named["export"])
            except (UsageError, KeyError, TypeError) as e:
                raise NoReconstruction(f"{why}: {e}") from None
            if config.get("weights_sha256") != named.get("weights_sha256"):
                raise NoReconstruction(f"{why}: it now holds other weights than the codes'")
            self.source = VQVAESampler(tensors, config, self.device)
        return self.source.reconstruct(images, labels)
