"""The model families and their registry (a plain dict, as StyleGAN2-ADA's metric registry).

    family = get_family("gan")                       # a built-in family
    family = get_family("mypackage.models:MyFamily")  # a Family subclass of your own, imported
    cfg = load_run_config("configs/gan_fashion.yaml", ["gan.lr_g=2e-4"])  # every family's section validated
    sampler = load_sampler("runs/x")                 # the family named in the export's config.json

A family of your own is found, in order, as a built-in name, a `package.module:ClassName` path, or an
installed entry point of the group `gensynth.families` (whose value is such a path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gensynth.config import BASE_SECTIONS, Config, ModelConfig, build, build_config, read_config
from gensynth.errors import ConfigError, UsageError
from gensynth.families.base import Family
from gensynth.families.gan import GANFamily
from gensynth.families.prior import PriorFamily
from gensynth.families.vae import VAEFamily
from gensynth.families.vqvae import VQVAEFamily

if TYPE_CHECKING:
    import torch

    from gensynth.families.sampling import Sampler

ENTRY_POINT_GROUP = "gensynth.families"

FAMILIES: dict[str, Family] = {}  # the built-in families by name


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _family in (GANFamily(), VQVAEFamily(), PriorFamily(), VAEFamily()):
    register(_family)


def is_valid(name: str) -> bool:
    try:
        get_family(name)
    except UsageError:
        return False
    return True


def list_families() -> list[str]:
    return list(FAMILIES)


def unknown(name: str, why: str) -> UsageError:
    return UsageError(f"unknown model family {name!r} ({why}): a built-in family ({', '.join(FAMILIES)}), a Family "
                      "subclass of your own as package.module:ClassName, or an installed entry point of the group "
                      f"{ENTRY_POINT_GROUP}")


def get_family(name: str) -> Family:
    """A built-in name, a `package.module:ClassName` path, or an entry point name -> the Family (an instance)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if ":" not in name:
        points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        point = next((p for p in points if p.name == name), None)
        if point is None:
            raise unknown(name, "not built in, no module:Class path, no such entry point")
        return from_path(point.value, name)
    return from_path(name, name)


def from_path(path: str, name: str) -> Family:
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise unknown(name, f"cannot import {module_name}: {e}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise unknown(name, f"{module_name} has no Family subclass named {class_name!r}")
    family = cls()
    if not family.name.isidentifier() or family.name in BASE_SECTIONS or family.name in FAMILIES \
            or family.name == "sections":
        raise UsageError(f"model family {name}: its name {family.name!r} must be an identifier other than "
                         f"{', '.join([*BASE_SECTIONS, *FAMILIES])}: it names the config section of its options")
    return family


def config_from_dict(raw: Any, where: str = "config") -> Config:
    """A raw config (YAML data) -> the validated Config: the base sections, every built-in family's section plus
    the chosen family's, and the chosen family's own rules."""
    model = build(ModelConfig, raw.get("model") if isinstance(raw, dict) else None, where, prefix="model.")
    try:
        family = get_family(model.family)
    except UsageError as e:
        raise ConfigError(f"{where}: model.family={model.family!r} is not allowed: {e}") from None
    sections = {name: f.Options for name, f in FAMILIES.items()}
    sections[family.name] = family.Options
    cfg = build_config(raw, sections, where)
    family.check(cfg, where)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or start from defaults when `path` is None), apply `section.key=value` overrides, validate."""
    raw, where = read_config(path, overrides)
    return config_from_dict(raw, where)


def load_sampler(path: str | Path, device: str | torch.device = "cpu") -> Sampler:
    """A run directory or an export directory -> its Sampler, after checking the weights' sha256."""
    import torch

    from gensynth.export import load_export

    tensors, config = load_export(path)
    name = config.get("family")
    try:
        family = get_family(str(name))
    except UsageError as e:
        raise UsageError(f"{path}: export of family {name!r}, which this gensynth cannot sample: {e}") from None
    return family.sampler(tensors, config, torch.device(device))
