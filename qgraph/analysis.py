"""Static figures of a model: parameters, bytes, MACs per node, op counts.

MACs are counted per sample (batch dimension taken as 1) from shapes that ONNX shape inference
gives; a node whose shapes are unknown counts 0 and is listed in ``ModelStats.unknown_macs``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

#: Ops whose output is a dot product over weights: the MAC counters below know them.
_DOT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul",
            "ConvInteger", "MatMulInteger", "QGemm", "MatMulNBits"}


@dataclass
class ModelStats:
    bytes: int
    params: int                       # elements of float / quantized weight initializers
    macs: int
    nodes: int
    ops: Counter = field(default_factory=Counter)
    unknown_macs: list[str] = field(default_factory=list)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    from qgraph.ir import model_bytes
    shapes = _shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    macs, unknown = 0, []
    for node in model.graph.node:
        if node.op_type not in _DOT_OPS:
            continue
        m = node_macs(node, shapes, inits)
        if m is None:
            unknown.append(node.name or node.op_type)
        else:
            macs += m
    return ModelStats(
        bytes=model_bytes(model),
        params=count_params(model),
        macs=macs,
        nodes=len(model.graph.node),
        ops=Counter(n.op_type for n in model.graph.node),
        unknown_macs=unknown,
    )


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all initializers that are weights (not shapes/indices: int64 tensors excluded)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64,):
            continue
        total += int(np.prod(t.dims)) if len(t.dims) else 1
    return total


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    from qgraph.ir import skeleton
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:
        inferred = model
    out: dict[str, tuple] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(1 if i == 0 else None)  # symbolic batch -> per sample
        out[vi.name] = tuple(dims)
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple], inits: dict) -> int | None:
    """Multiply-accumulates of one dot-product node, or None when shapes are unknown."""
    op = node.op_type
    ins = list(node.input)
    get = shapes.get
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_idx = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}[op]
        w, y = get(ins[w_idx]), get(node.output[0])
        if not (_known(w) and _known(y)):
            return None
        # every output element needs (Cin/groups) * prod(kernel) MACs = prod(w.shape[1:])
        return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x, w = get(ins[0]), get(ins[1])
        if not (_known(x) and _known(w)):
            return None
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "QGemm"):
        a_idx = 0
        a, y = get(ins[a_idx]), get(node.output[0])
        if not (_known(a) and _known(y)) or len(a) == 0:
            return None
        k = a[-1]
        if op in ("Gemm", "QGemm"):
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        return int(np.prod(y, dtype=np.int64) * k)
    return None


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None
