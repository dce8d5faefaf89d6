"""A model family is one plug-in: a small subclass of `Family` (the idea of open_clip's task classes).

    class MyFamily(Family):
        name = "mine"                      # its config section: mine.lr, ...
        Options = MyOptions                # a dataclass of gensynth.config.option fields
        def trainer(self, cfg, accelerator, data): return MyTrainer(cfg, accelerator, data)
        def sampler(self, tensors, config, device): return MySampler(tensors, config, device)

The training loop, generation and evaluation call only what is declared here; every optional feature has
its default on the base, so nothing probes for attributes. This module imports no torch: resolving and
validating a config stays light, and a family imports its networks when it builds a trainer or sampler.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NoReturn

from gensynth.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from gensynth.config import Config
    from gensynth.families.sampling import Sampler
    from gensynth.families.training import DataInfo, Trainer


@dataclasses.dataclass
class NoOptions:
    """The section of a family without options."""


class Family:
    """What a model family declares. Built-in families are named by `name` in model.family; a family of your
    own by its import path, package.module:ClassName, or an entry point of the group gensynth.families."""

    name: str = ""  # the config section of its options (and, for a built-in family, the model.family value)
    Options: type = NoOptions  # dataclass of its section, fields made with gensynth.config.option
    inputs: str = "image"  # the batch field it trains on: "image", or an array of the shards, e.g. "codes"
    title: str = ""  # what a person calls it, e.g. "the class-conditional GAN" (progress lines); empty = name

    def check(self, cfg: Config, where: str) -> None:
        """Rules that join the family's options with others (e.g. the resolution its network needs); raise a
        ConfigError (use `self.fail`). Runs when the config is loaded, before anything runs."""

    def prepare(self, cfg: Config, accelerator: Accelerator) -> None:
        """Collective work before the training data can be read (the prior's code shards); every rank calls it."""

    def trainer(self, cfg: Config, accelerator: Accelerator, data: DataInfo) -> Trainer:
        """The object the loop drives (gensynth.families.training.Trainer)."""
        raise NotImplementedError(f"family {self.name!r} does not train")

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> Sampler:
        """The Sampler of an export of this family, from its tensors and config.json."""
        raise NotImplementedError(f"family {self.name!r} has no sampler")

    def bundled_training_data(self, export_config: dict[str, Any]) -> list[dict[str, Any]]:
        """The training sets of other models an export carries inside it (the prior bundles its VQ-VAE), as
        entries of the export's training_data list; they count for memorisation and the K-shot check."""
        return []

    def fail(self, where: str, text: str) -> NoReturn:
        raise ConfigError(f"{where}: {text}")

    def check_downsampling(self, cfg: Config, where: str, downsamples: int) -> None:
        """A convolutional family that halves the image `downsamples` times needs a resolution divisible by
        2^downsamples (its option `<name>.downsamples`)."""
        r = cfg.model.resolution
        if r % 2**downsamples:
            self.fail(where, f"model.resolution={r} is not allowed for model.family={self.name}: divisible by "
                      f"2^{self.name}.downsamples = {2**downsamples} (28 works for 28x28 data with 2 downsamples)")
