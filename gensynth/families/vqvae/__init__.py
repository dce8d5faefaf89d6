"""The VQ-VAE family (van den Oord et al. 2017): its step in trainer.py, its sampler (which reconstructs and
encodes, and does not generate) in sampler.py; its held-out figures are gensynth.reconstruction's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gensynth.config import option
from gensynth.families.base import Family

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from gensynth.config import Config
    from gensynth.families.sampling import Sampler
    from gensynth.families.training import DataInfo, Trainer


@dataclass
class VQVAEOptions:
    """VQ-VAE (van den Oord et al. 2017) with an EMA codebook; gensynth/models/vqvae.py, quantizer.py."""

    base_channels: int = option(32, "encoder/decoder feature maps at full resolution, doubling per halving",
                                min=1)
    max_channels: int = option(64, "cap on feature maps at low resolution", min=1)
    downsamples: int = option(2, "halvings from image to code grid: 28x28 -> 7x7 codes with 2", min=1, max=6)
    res_blocks: int = option(2, "residual blocks at the code resolution, encoder and decoder (van den Oord "
                             "et al. 2017 use 2)", min=0)
    embed_dim: int = option(64, "encoder output / decoder input channels (the latent vector size)", min=1)
    codebook_size: int = option(256, "codes K; code shards store them as int16, so at most 32768",
                                min=2, max=32768)
    codebook_dim: int = option(0, "lookup dimension: 0 = embed_dim; smaller = factorized codes, a linear "
                               "projection down for the lookup and back up (Yu et al. 2022, ViT-VQGAN: "
                               "better codebook usage)", min=0)
    cosine: bool = option(False, "l2-normalized codes and encoder outputs, lookup by cosine similarity "
                          "(Yu et al. 2022, ViT-VQGAN)")
    commitment: float = option(0.25, "commitment cost beta (van den Oord et al. 2017: 0.25)", min=0.0)
    ema_decay: float = option(0.99, "codebook EMA decay gamma (van den Oord et al. 2017, appendix A.1: 0.99)",
                              min=0.0, max=1.0)
    ema_eps: float = option(1e-5, "Laplace smoothing of the EMA counts (van den Oord et al. 2017, appendix)",
                            min=0.0)
    kmeans_iters: int = option(10, "k-means iterations that initialise the codebook on the first batch of "
                               "every rank (Lancucki et al. 2020); 0 = random encoder outputs", min=0)
    restart_after: int = option(100, "re-seed a code unused for this many batches with a random encoder "
                                "output (dead-code restart; Lancucki et al. 2020, Dhariwal et al. 2020 Jukebox); "
                                "0 = never", min=0)
    usage_window: int = option(100, "codebook usage = share of codes used in the last N batches", min=1)
    usage_warn: float = option(0.1, "collapse guard: log a warning when codebook usage falls below this "
                               "share (checked every train.log_every steps, once the window is full)",
                               min=0.0, max=1.0)
    lr: float = option(2e-4, "Adam learning rate (van den Oord et al. 2017: 2e-4)", min=0.0)
    beta1: float = option(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = option(0.999, "Adam beta2", min=0.0, max=1.0)
    grid_per_class: int = option(2, "images per class in the reconstruction grids (input row over output row); "
                                 "taken from data.test, else data.train", min=1)


class VQVAEFamily(Family):
    name = "vqvae"
    title = "the VQ-VAE"
    Options = VQVAEOptions

    def check(self, cfg: Config, where: str) -> None:
        self.check_downsampling(cfg, where, cfg.vqvae.downsamples)

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> Trainer:
        from gensynth.families.vqvae.trainer import VQVAETrainer

        return VQVAETrainer(cfg, accelerator, data)

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        from gensynth.families.vqvae.sampler import VQVAESampler

        return VQVAESampler(tensors, config, device)
