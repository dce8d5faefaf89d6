"""The prior family: a transformer over a VQ-VAE's code grids; its step in trainer.py, its sampler in
sampler.py, the code shards it trains on in codes.py."""

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
class PriorOptions:
    """Class-conditional autoregressive transformer over a VQ-VAE's code grids (van den Oord et al. 2017
    used PixelCNN; a GPT-style decoder as in Esser et al. 2021, VQGAN); gensynth/models/prior.py."""

    vqvae: str = option("", "the VQ-VAE run directory (or its export/) whose codes the prior learns; its "
                        "export is bundled into the prior's export, so the prior samples images on its own")
    images: str = option("", "image shard set to encode into code shards (data.train names where they go); "
                         "empty = the set the VQ-VAE trained on (its export records it)")
    extract_batch_size: int = option(256, "images per batch when extracting codes (once; reused while the "
                                     "VQ-VAE export's sha256 matches)", min=1)
    width: int = option(128, "transformer width (embedding size)", min=8)
    layers: int = option(4, "transformer blocks", min=1)
    heads: int = option(4, "attention heads; must divide width", min=1)
    dropout: float = option(0.1, "dropout in attention and MLP (training only)", min=0.0, max=0.9)
    label_dropout: float = option(0.0, "share of training grids whose class token is replaced by a learnt "
                                  "'no class' token, so that sampling can use classifier-free guidance (Ho & "
                                  "Salimans 2022; 0.1 as in LlamaGen, Sun et al. 2024); 0 = off: on Fashion-MNIST "
                                  "guidance made samples class-typical but not more useful (CAS)", min=0.0, max=0.9)
    guidance: float = option(1.0, "default classifier-free guidance scale of this prior's samples (its grids, "
                             "its export; gensynth generate --guidance overrides it): logits u + s * (c - u) of "
                             "class c and no class u; 1 = plain class-conditional, > 1 = more class-typical",
                             min=0.0)
    lr: float = option(1e-3, "AdamW peak learning rate (small GPTs train well at 1e-3 to 6e-4; nanoGPT)",
                       min=0.0)
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay (Loshchilov & Hutter 2017)",
                           min=0.0)
    warmup_steps: int = option(100, "linear learning-rate warm-up steps (Vaswani et al. 2017)", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices, not on biases, norms or embeddings "
                                 "(Loshchilov & Hutter 2019; GPT-2 / nanoGPT practice)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.95, "AdamW beta2 (0.95 as in GPT-3 / nanoGPT)", min=0.0, max=1.0)


class PriorFamily(Family):
    name = "prior"
    title = "the class-conditional prior over the VQ-VAE's codes"
    Options = PriorOptions
    inputs = "codes"  # codes.CODES: the array of the code shards

    def check(self, cfg: Config, where: str) -> None:
        if cfg.prior.guidance <= 0:
            self.fail(where, f"prior.guidance={cfg.prior.guidance} is not allowed: a scale > 0 (1 = off)")
        if cfg.prior.guidance != 1.0 and cfg.prior.label_dropout == 0:
            self.fail(where, f"prior.guidance={cfg.prior.guidance} needs prior.label_dropout > 0: guidance contrasts "
                      "the class with the 'no class' token that label dropout trains")
        if cfg.prior.width % cfg.prior.heads:
            self.fail(where, f"prior.heads={cfg.prior.heads} is not allowed: it must divide prior.width="
                      f"{cfg.prior.width}")

    def prepare(self, cfg: Config, accelerator: Accelerator) -> None:
        """The code shards at data.train: extracted once by the main process, reused while they match."""
        from gensynth.families.prior.trainer import ensure_code_shards

        ensure_code_shards(cfg, accelerator)

    def bundled_training_data(self, export_config: dict[str, Any]) -> list[dict[str, Any]]:
        """The VQ-VAE's own training sets: its decoder shapes every sample."""
        return [{**s, "model": "vqvae"} for s in export_config["vqvae"].get("training_data") or []]

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> Trainer:
        from gensynth.families.prior.trainer import PriorTrainer

        return PriorTrainer(cfg, accelerator, data)

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        from gensynth.families.prior.sampler import PriorSampler

        return PriorSampler(tensors, config, device)
