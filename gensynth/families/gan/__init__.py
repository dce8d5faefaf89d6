"""The GAN family: a class-conditional DCGAN (gensynth/models/dcgan.py); its step in trainer.py, its sampler
in sampler.py."""

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

DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # augment.POLICIES implements each (tested)


@dataclass
class GANOptions:
    z_dim: int = option(128, "latent size", min=1)
    g_channels: int = option(32, "generator feature maps at full resolution, doubling per halving", min=1)
    d_channels: int = option(32, "discriminator feature maps at full resolution, doubling per halving", min=1)
    max_channels: int = option(128, "cap on feature maps at low resolution", min=1)
    loss: str = option("hinge", "hinge (Lim & Ye 2017; SNGAN, BigGAN) or nonsaturating (Goodfellow et al. 2014)",
                       choices=("hinge", "nonsaturating"))
    spectral_norm: bool = option(True, "spectral norm in the discriminator (Miyato et al. 2018)")
    mbstd_group: int = option(4, "minibatch standard deviation over groups of N in the discriminator, against "
                              "mode collapse (Karras et al. 2018); 1 = off", min=1)
    r1_gamma: float = option(0.0, "R1 penalty weight on real images (Mescheder et al. 2018); 0 = off", min=0.0)
    r1_interval: int = option(16, "lazy regularization: R1 every N steps, scaled by N (Karras et al. 2020)", min=1)
    ema_kimg: float = option(10.0, "generator EMA half-life in thousands of images (Karras et al. 2020)", min=0.0)
    ema_rampup: float = option(0.05, "EMA half-life at most this share of images seen so far (StyleGAN2-ADA); "
                               "0 = no ramp-up", min=0.0)
    standing_batches: int = option(50, "train-mode forwards (train.batch_size each) that recompute the EMA "
                                   "generator's batch-norm statistics for its own weights before it samples or is "
                                   "exported (standing statistics, Brock et al. 2019); 0 = keep the raw generator's",
                                   min=0)
    diffaugment: str = option("", "DiffAugment policy for small data, e.g. translation,cutout "
                              "(Zhao et al. 2020); empty = off", each_of=DIFFAUGMENT_POLICIES)
    mode_seeking: float = option(0.0, "mode-seeking regularisation weight (Mao et al. 2019, MSGAN: 1): two noises "
                                 "of one label should give images as far apart as the noises are, against a generator "
                                 "that draws one narrow part of each class; 0 = off", min=0.0)
    lr_g: float = option(1e-4, "generator learning rate; TTUR: D learns faster than G (Heusel et al. 2017; "
                         "1e-4 / 4e-4 as in SAGAN, Zhang et al. 2019)", min=0.0)
    lr_d: float = option(4e-4, "discriminator learning rate", min=0.0)
    beta1: float = option(0.0, "Adam beta1; 0 as in SAGAN/BigGAN (DCGAN's 0.5 collapsed each class to one "
                          "image here)", min=0.0, max=1.0)
    beta2: float = option(0.9, "Adam beta2, 0.9 as in SAGAN", min=0.0, max=1.0)


class GANFamily(Family):
    name = "gan"
    title = "the class-conditional GAN"
    Options = GANOptions

    def check(self, cfg: Config, where: str) -> None:
        r = cfg.model.resolution
        if r & (r - 1):
            self.fail(where, f"model.resolution={r} is not allowed for model.family=gan: a power of two (28x28 data "
                      "-> 32)")

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> Trainer:
        from gensynth.families.gan.trainer import GANTrainer

        return GANTrainer(cfg, accelerator, data)

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        from gensynth.families.gan.sampler import GANSampler

        return GANSampler(tensors, config, device)
