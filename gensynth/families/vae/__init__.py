"""The VAE family: its step in trainer.py, its sampler in sampler.py."""

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
class VAEOptions:
    """Class-conditional convolutional VAE (Kingma & Welling 2014; Sohn et al. 2015, CVAE);
    gensynth/models/vae.py."""

    latent_dim: int = option(32, "size of the latent z", min=1)
    base_channels: int = option(32, "encoder/decoder feature maps at full resolution, doubling per halving",
                                min=1)
    max_channels: int = option(128, "cap on feature maps at low resolution", min=1)
    downsamples: int = option(2, "halvings before the latent's linear layer: 28 -> 7 with 2", min=1, max=6)
    beta: float = option(1.0, "weight of the KL term once warmed up; 1 = the ELBO, > 1 = beta-VAE "
                         "(Higgins et al. 2017)", min=0.0)
    kl_warmup_steps: int = option(1000, "KL weight rises linearly from 0 to beta over these steps (Bowman et al. "
                                  "2016; Sonderby et al. 2016); 0 = no warm-up", min=0)
    sigma: float = option(0.6, "decoder standard deviation on [-1, 1] pixels. Like beta it trades sharp "
                          "reconstructions for a smoother latent that samples well; 0 = the 'optimal sigma' of "
                          "Rybkin et al. 2021 (sigma-VAE): the RMS error, best ELBO. On Fashion-MNIST (800 steps) "
                          "a classifier recognised 43% of samples with 0, 71% with 0.5, 80% with 0.8", min=0.0)
    lr: float = option(1e-3, "Adam learning rate", min=0.0)
    beta1: float = option(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = option(0.999, "Adam beta2", min=0.0, max=1.0)


class VAEFamily(Family):
    name = "vae"
    title = "the class-conditional VAE"
    Options = VAEOptions

    def check(self, cfg: Config, where: str) -> None:
        self.check_downsampling(cfg, where, cfg.vae.downsamples)

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> Trainer:
        from gensynth.families.vae.trainer import VAETrainer

        return VAETrainer(cfg, accelerator, data)

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        from gensynth.families.vae.sampler import VAESampler

        return VAESampler(tensors, config, device)
