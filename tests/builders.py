"""Helpers for building tiny ONNX graphs and running them in ONNX Runtime (importable as ``builders``:
pyproject sets pytest's pythonpath to tests/)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_SAMPLE = MODELS / "digits_sample.npz"

F32 = TensorProto.FLOAT


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A checked model from nodes and (name, shape) inputs/outputs (float32)."""
    def vi(spec):
        if isinstance(spec, onnx.ValueInfoProto):
            return spec
        name, shape = spec
        return helper.make_tensor_value_info(name, F32, shape)
    graph = helper.make_graph(list(nodes), "test", [vi(i) for i in inputs], [vi(o) for o in outputs],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ort_session_1t(model: onnx.ModelProto):
    """An ORT CPU session on one thread (bit-exact comparisons: the reduction order of a kernel may
    depend on the thread count), warnings silenced."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """max |Δ| / max |ref|: the relative error Verify reports."""
    ref = ref.astype(np.float64)
    return float(np.max(np.abs(ref - got)) / max(np.max(np.abs(ref)), 1e-30))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def bn_params(rng, c: int, prefix: str = "bn", eps_var: float = 0.5):
    """Plausible BatchNorm statistics: γ ~ U(0.5, 1.5), β ~ N(0, 0.2), μ ~ N(0, 0.5), σ² ~ U(eps_var, 2)."""
    return [
        init(f"{prefix}_scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        init(f"{prefix}_bias", rng.normal(0, 0.2, c).astype(np.float32)),
        init(f"{prefix}_mean", rng.normal(0, 0.5, c).astype(np.float32)),
        init(f"{prefix}_var", rng.uniform(eps_var, 2.0, c).astype(np.float32)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-5) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], name=prefix, epsilon=eps)


def qgraph_opt_cmd() -> list[str]:
    """The installed console script when present, else the module through this interpreter."""
    exe = Path(sys.executable).with_name("qgraph-opt")
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "qgraph.cli"]
