"""LeNet-300-100 and LeNet-5, the Deep Compression reference networks (Han et al. 2016, Table 1:
1.64% / 0.80% top-1 error on MNIST), trained here deterministically on the full MNIST training set.

    LeNet-300-100  x[1,28,28] -Flatten- FC 784>300 -ReLU- FC 300>100 -ReLU- FC 100>10      266,610 params
    LeNet-5        x[1,28,28] -Conv 20@5x5- MaxPool 2 -Conv 50@5x5- MaxPool 2 -Flatten-
                   FC 800>500 -ReLU- FC 500>10                                            431,080 params

LeNet-5 is Caffe's ``lenet_train_test.prototxt`` (the model the paper compresses): no activation
after the convolutions, one ReLU after the 500-unit layer.

Training (``python tools/zoo.py build lenet_300_100 --retrain``): inputs ``(x/255 - 0.1307)/0.3081``
(preset ``mnist``), SGD with Nesterov momentum 0.9, batch 64, weight decay 5e-4, learning rate
``LR`` with a cosine decay to 0 over ``EPOCHS`` epochs, and random shifts of up to 2 pixels
(zero fill) as the only augmentation. Determinism: fixed seeds for initialisation, shuffling and
shifts, one CPU thread, ``torch.use_deterministic_algorithms(True)``; the same torch version on the
same CPU family reproduces the checked-in ONNX files bit for bit, another gives the same accuracy
within a few hundredths of a percent.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN, STD = 0.1307, 0.3081
EPOCHS = {"lenet_300_100": 30, "lenet5": 20}
LR = {"lenet_300_100": 0.05, "lenet5": 0.02}
BATCH = 64
WEIGHT_DECAY = 5e-4
MAX_SHIFT = 2
SEED = 0
INPUT_NAMES = ["input"]
OUTPUT_NAMES = ["logits"]


class LeNet300100(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


ARCHS = {"lenet_300_100": LeNet300100, "lenet5": LeNet5}


def normalize(x_uint8: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32, the ``mnist`` preset."""
    return ((x_uint8.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-MAX_SHIFT, MAX_SHIFT]^2, filling with the background."""
    n = x.shape[0]
    d = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n, 2), generator=g)
    bg = float((0.0 - MEAN) / STD)
    p = MAX_SHIFT
    padded = nn.functional.pad(x, (p, p, p, p), value=bg)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(d[i, 0]), int(d[i, 1])
        out[i] = padded[i, :, p + dy:p + dy + 28, p + dx:p + dx + 28]
    return out


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            hits += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return hits / len(x)


def train(name: str, mnist_npz: str | Path, log=print) -> nn.Module:
    """Train ``name`` on the 60,000 training images; returns the model in eval mode."""
    data = np.load(mnist_npz)
    x_train, y_train = normalize(data["x_train"]), data["y_train"].astype(np.int64)
    x_test, y_test = normalize(data["x_test"]), data["y_test"].astype(np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(SEED)
        model = ARCHS[name]()
        g = torch.Generator().manual_seed(SEED)
        epochs = EPOCHS[name]
        steps = epochs * (len(x_train) // BATCH)
        opt = torch.optim.SGD(model.parameters(), lr=LR[name], momentum=0.9, nesterov=True,
                              weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for epoch in range(epochs):
            t0 = time.time()
            model.train()
            order = torch.randperm(len(xt), generator=g)
            for i in range(0, len(order) - BATCH + 1, BATCH):      # drop the last partial batch
                idx = order[i:i + BATCH]
                loss = nn.functional.cross_entropy(model(_shift(xt[idx], g)), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log(f"{name} epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
                f"test accuracy {accuracy(model, x_test, y_test):.4f} ({time.time() - t0:.0f} s)")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    return model.eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)
