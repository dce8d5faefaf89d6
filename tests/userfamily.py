"""A model family defined outside gensynth, as a user would write one: a mean image per class plus one
learned noise scale (a Gaussian per class, maximum likelihood). It trains in milliseconds and uses what
every family uses: a module and an optimizer through accelerate, checkpoints, exports, a sampler.

    model:
      family: tests.userfamily:MeanImageFamily
    meanimage:
      lr: 0.05
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from gensynth.config import Config, option
from gensynth.families.base import Family
from gensynth.families.sampling import Sampler
from gensynth.families.training import DataInfo, SeededSampling, StepResult, clip_and_step
from gensynth.imaging import to_uint8


@dataclass
class MeanImageOptions:
    lr: float = option(0.05, "Adam learning rate", min=0.0)
    init_log_scale: float = option(0.0, "the noise scale's log at the start", min=-5.0, max=5.0)


class MeanImage(nn.Module):
    def __init__(self, num_classes: int, channels: int, resolution: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(num_classes, channels, resolution, resolution))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean[labels], self.log_scale


@torch.no_grad()
def draw_images(model: MeanImage, labels: torch.Tensor, generator: torch.Generator, height: int,
                width: int) -> torch.Tensor:
    """The trainer's grids and the sampler both draw with this, so an export reproduces its run's grid."""
    noise = torch.randn(len(labels), *model.mean.shape[1:], generator=generator).to(model.mean.device)
    x = model.mean[labels.to(model.mean.device)] + model.log_scale.exp() * noise
    return to_uint8(x, height, width).cpu()


class MeanImageTrainer(SeededSampling):
    def __init__(self, cfg: Config, accelerator: Accelerator, data: DataInfo):
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.arch = dict(num_classes=data.num_classes, channels=data.channels, resolution=cfg.model.resolution)
        model = MeanImage(**self.arch)
        model.log_scale.data.fill_(cfg.meanimage.init_log_scale)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.meanimage.lr)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.raw: MeanImage = accelerator.unwrap_model(self.model)
        self.grid_labels = torch.arange(data.num_classes).repeat_interleave(4)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        acc = self.accelerator
        with acc.accumulate(self.model):
            mean, log_scale = self.model(labels)
            nll = (0.5 * ((images - mean) / log_scale.exp()).square() + log_scale).mean()
            acc.backward(nll)
            clip_and_step(acc, self.model, self.opt, self.cfg.train.grad_clip)
        return StepResult({"loss/nll": nll.detach()}, not bool(torch.isfinite(nll.detach())))

    def modules(self) -> dict[str, nn.Module]:
        return {"meanimage": self.raw}

    def learning_rates(self) -> dict[str, float]:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return draw_images(self.raw, labels, generator, self.data.height, self.data.width)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.raw.state_dict()), {"architecture": dict(self.arch)}


class MeanImageSampler(Sampler):
    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.model = MeanImage(**config["architecture"])
        self.model.load_state_dict(tensors)
        self.model.to(self.device).eval()

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        return draw_images(self.model, labels, generator, self.height, self.width)


class MeanImageFamily(Family):
    name = "meanimage"  # the config section: meanimage.lr, meanimage.init_log_scale
    Options = MeanImageOptions

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> MeanImageTrainer:
        return MeanImageTrainer(cfg, accelerator, data)

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        return MeanImageSampler(tensors, config, device)
