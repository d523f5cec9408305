"""Frozen ResNet teacher: MONAI's 2-D ResNet (torchvision parameter names, no torchvision needed).

Weights: ``"none"`` (random, frozen), ``"imagenet"`` (torchvision's file, downloaded once into the cache, with a
timeout; offline it fails with a message saying how to supply the file), or a path to a local ``.pth`` file in
torchvision's format (a plain state dict, or a dict holding one under "state_dict"/"model"; layer4 and fc may be
missing, as in the teacher files ``spmamba pretrain`` writes: ``models.pretrain``).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["ResNetEncoder", "EncoderWeightsError", "load_encoder_weights", "IMAGENET_URLS", "cache_dir"]

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
}
# ImageNet statistics the encoder's inputs are normalised with (slices are grey, replicated to 3 channels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderWeightsError(RuntimeError):
    """The requested encoder weights could not be found, fetched or read."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPMAMBA_CACHE", Path.home() / ".cache" / "spmamba"))


def _download(url: str, dest: Path, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _imagenet_file(arch: str, timeout: float) -> Path:
    url = IMAGENET_URLS[arch]
    dest = cache_dir() / Path(url).name
    if dest.exists():
        return dest
    try:
        _download(url, dest, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise EncoderWeightsError(
            f"could not fetch ImageNet weights for {arch} from {url} ({e}). This machine looks offline. "
            f"Either copy that file (torchvision's {Path(url).name}) to {dest}, or pass its path as the encoder "
            "weights (--encoder-weights FILE / --conf encoder_weights FILE), or use --encoder-weights none."
        ) from e
    return dest


def load_encoder_weights(spec: str, arch: str, timeout: float = 20.0) -> Optional[dict[str, torch.Tensor]]:
    """State dict for ``spec`` ("none", "imagenet" or a file path), or None for random weights."""
    if spec in (None, "", "none", "random"):
        return None
    path = _imagenet_file(arch, timeout) if spec == "imagenet" else Path(spec).expanduser()
    if not path.is_file():
        raise EncoderWeightsError(f"encoder weights file {path} does not exist; give a torchvision-format .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files ...
        raise EncoderWeightsError(f"encoder weights file {path} could not be read ({e}); is it a .pth state dict?") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderWeightsError(f"encoder weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


class ResNetEncoder(nn.Module):
    """Frozen ResNet18/34; returns layer1..layer3 features.

    Input (B, 3, S, S) ImageNet-normalised -> [(B, 64, S/4, S/4), (B, 128, S/8, S/8), (B, 256, S/16, S/16)].
    Stays in eval mode (BatchNorm statistics frozen) whatever mode its parent is put in; ``adapt_batchnorm``
    re-estimates those statistics on given data, once, before training.
    """

    channels = (64, 128, 256)

    def __init__(self, arch: str = "resnet34", weights: str = "none"):
        super().__init__()
        from monai.networks.nets import resnet18, resnet34

        factory = {"resnet18": resnet18, "resnet34": resnet34}[arch]
        # conv1 stride 2 as in torchvision (MONAI defaults to 1)
        net = factory(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_size=7, conv1_t_stride=2)
        state = load_encoder_weights(weights, arch)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shape mismatches
                raise EncoderWeightsError(
                    f"encoder weights do not fit {arch} ({str(e).splitlines()[-1].strip()}); "
                    "give torchvision's ResNet file for this architecture"
                ) from e
            # the encoder stops at layer3: layer4 and fc may be absent (teacher files of `spmamba pretrain`)
            needed = [k for k in missing if not k.startswith(("fc.", "layer4."))]
            if needed:
                raise EncoderWeightsError(
                    f"encoder weights do not fit {arch}: {len(needed)} parameters missing (e.g. {needed[:3]}); "
                    "give torchvision's ResNet file for this architecture"
                )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ResNetEncoder":  # frozen teacher: always eval
        return super().train(False)

    @torch.no_grad()
    def adapt_batchnorm(self, batches: Iterable[torch.Tensor]) -> int:
        """Replace every BatchNorm's running mean/variance by their averages over ``batches`` (AdaBN).

        Why: a randomly initialised ResNet has BatchNorm at identity (mean 0, variance 1, no shift) and bias-free
        convolutions (but for MONAI's small shortcut biases), so it is positively homogeneous: f(a x) = a f(x) for
        a > 0 (exactly up to layer1). Inside a region of uniform intensity its features then only scale with the
        intensity, and the cosine distance that SP-Mamba's map uses cannot see a lesion that is brighter or darker
        than the tissue around it. Statistics estimated on normal slices add per-channel shifts, which make feature
        directions depend on intensity, and keep the feature scales of the three levels comparable (layer3
        otherwise has ~20x the spread of layer1).
        ``batches``: (B, 3, S, S) ImageNet-normalised inputs. Returns the number of images seen.
        """
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        seen = 0
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
                m.training = True
            for x in batches:
                self.forward(x)
                seen += int(x.shape[0])
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
                m.training = False
        if seen == 0:
            raise ValueError("adapt_batchnorm needs at least one batch")
        return seen

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]
