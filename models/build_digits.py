"""Build the embedded demo model ``digits_cnn.onnx`` and its eval data ``digits_sample.npz``.

    python models/build_digits.py [--out-dir models] [--epochs 40]

Data: scikit-learn's bundled digits set (``load_digits()``: 1797 real 8x8 handwritten digits, pixel
values 0..16, shipped inside the sklearn wheel, so no network is needed).
Split: ``train_test_split(test_size=0.2, random_state=0, stratify=y)`` -> 1437 train / 360 test.
Preprocessing: ``x / 16`` to float32 in [0, 1], shape (N, 1, 8, 8). Nothing else (no mean/std).

The network is small but exercises the patterns qgraph's passes care about:

    input (N,1,8,8)
    stem   Conv 3x3 1->16 + BN + ReLU
    block  Conv 3x3 16->16 + BN + ReLU -> Conv 3x3 16->16 + BN -> Add(block input) -> ReLU
    dw     Conv 3x3 16->16 groups=16 stride 2 + BN + ReLU            (depthwise, 8x8 -> 4x4)
    pw     Conv 1x1 16->32 + BN + ReLU
    GlobalAveragePool -> Flatten -> Gemm 32->32 + BatchNorm1d + ReLU -> Dropout(0.1) -> Gemm 32->10
    logits (N,10)

The export keeps every BatchNormalization node (``training=PRESERVE`` on an eval-mode model and
``do_constant_folding=False``) so that BN folding has something to fold. The script is
deterministic: seeded, one thread, deterministic algorithms; two runs write byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
# ORT and torch run the same float32 graph with different kernels; 1e-4 on logits of magnitude ~10
# allows for summation-order differences and nothing else.
ORT_TOLERANCE = 1e-4


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); x is (N,1,8,8) float32 = pixels/16, y int64."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_train), y_train,
        np.ascontiguousarray(x_test), y_test,
    )


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=True),
        nn.BatchNorm2d(c_out),
    ]


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c, c, 3), nn.ReLU(), *conv_bn(c, c, 3))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16, 3), nn.ReLU(),
            ResidualBlock(16),
            *conv_bn(16, 16, 3, stride=2, groups=16), nn.ReLU(),
            *conv_bn(16, 32, 1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:  # BatchNorm1d cannot train on a batch of one
                continue
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def export(
    model: nn.Module, example: torch.Tensor, accuracy: float, n_test: int
) -> onnx.ModelProto:
    buf = io.BytesIO()
    # dynamo=False: torch 2.13 defaults to the torch.export-based exporter, which needs onnxscript
    # (not installed here). The TorchScript exporter keeps every BN with PRESERVE on an eval-mode
    # model; with TrainingMode.EVAL plus constant folding it would fuse Conv+BN at export time.
    torch.onnx.export(
        model.eval(), (example,), buf,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        dynamo=False,
    )
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = (
        "qgraph embedded demo model: small residual CNN on sklearn digits (8x8). "
        "Input 'input' (N,1,8,8) float32 = pixels/16; output 'logits' (N,10). "
        "Rebuild: python models/build_digits.py"
    )
    meta = {
        "qgraph.dataset": "sklearn digits",
        "qgraph.split": "train_test_split(test_size=0.2, random_state=0, stratify=y)",
        "qgraph.preprocess": "x/16",
        "qgraph.test_top1": f"{accuracy:.6f}",
        "qgraph.test_n": str(n_test),
        "qgraph.seed": str(SEED),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_export(
    proto: onnx.ModelProto, torch_logits: np.ndarray, x_test: np.ndarray
) -> np.ndarray:
    """Assert the export kept what the passes need and agrees with torch; return ORT logits."""
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 6, f"expected 5 BN2d + 1 BN1d kept, got {dict(ops)}"
    assert ops["Add"] >= 1, f"residual Add missing: {dict(ops)}"
    nodes = proto.graph.node
    gemm_outs = {o for n in nodes if n.op_type == "Gemm" for o in n.output}
    assert any(n.op_type == "BatchNormalization" and n.input[0] in gemm_outs for n in nodes), \
        "BatchNorm1d after the Gemm was not kept as BatchNormalization"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    diff = float(np.abs(ort_logits - torch_logits).max())
    assert diff <= ORT_TOLERANCE, f"ORT vs torch max abs diff {diff:.3g} > {ORT_TOLERANCE}"
    print(f"ORT vs torch: max abs diff {diff:.2e} (tolerance {ORT_TOLERANCE})")
    return ort_logits


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are shared data
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    set_determinism(SEED)
    x_train, y_train, x_test, y_test = load_split()
    model = DigitsCNN()
    t0 = time.perf_counter()
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), args.epochs, batch=64)
    elapsed = time.perf_counter() - t0
    print(f"trained {args.epochs} epochs on {len(x_train)} images in {elapsed:.1f}s")

    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    acc = top1(torch_logits, y_test)

    proto = export(model, torch.from_numpy(x_test[:2]), acc, len(x_test))
    ort_logits = check_export(proto, torch_logits, x_test)
    ort_acc = top1(ort_logits, y_test)
    assert ort_acc == acc, f"ORT top-1 {ort_acc} != torch top-1 {acc}"

    onnx_path = args.out_dir / "digits_cnn.onnx"
    npz_path = args.out_dir / "digits_sample.npz"
    write_atomic(onnx_path, proto.SerializeToString())
    npz = io.BytesIO()
    np.savez_compressed(npz, input=x_test, labels=y_test)
    write_atomic(npz_path, npz.getvalue())

    ops = Counter(n.op_type for n in proto.graph.node)
    print(f"ops: {dict(sorted(ops.items()))}")
    for path in (onnx_path, npz_path):
        print(f"wrote {path} ({path.stat().st_size} B)")
    print(f"test top-1: {acc:.4f} ({int(round(acc * len(y_test)))}/{len(y_test)})")


if __name__ == "__main__":
    main()
