"""QDQ vocabulary: make QuantizeLinear/DequantizeLinear nodes, and find the quantized layer groups.

A QDQ model marks each quantized value with a Q -> DQ pair; ONNX Runtime fuses a node whose inputs
come from DQ and whose output goes to Q into one integer op (QLinearConv, QLinearMatMul, QGemm, ...).
The group a fusion (or our integer lowering in ``qgraph.kernels``) works on is

    DQ(x) ─┐
    DQ(w) ─┼─ Conv | ConvTranspose | Gemm | MatMul ── Q(y)
    DQ(b) ─┘  (b: int32, scale s_x·s_w, zero point 0)

``find_groups`` returns those as ``QGroup``s; ``biascorr`` and the lowering use them to reach the
integer weight, its scale, the bias, and the float tensors around the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.qparams import QParams, STORAGE, storage_np_dtype

DOT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MS_DOMAIN = "com.microsoft"
#: Storage types plain ONNX QuantizeLinear accepts before opset 21; others go to the com.microsoft domain.
OPSET13_TYPES = ("int8", "uint8", "int32")


def needs_contrib(storage: str, opset: int) -> bool:
    """Whether Q/DQ of ``storage`` need ORT's com.microsoft Q/DQ (16-bit, 4-bit before opset 21)."""
    return storage not in OPSET13_TYPES and opset < 21


def default_opset(g: ir.Graph) -> int:
    return int(g.opset or 0)


def _domain(g: ir.Graph, storage: str) -> str | None:
    if needs_contrib(storage, default_opset(g)):
        g.import_domains = _with_ms_domain(g.import_domains, default_opset(g))
        return MS_DOMAIN
    return None


def _with_ms_domain(domains, opset: int):
    import onnx
    domains = list(domains or [])
    if not any(d.domain in ("", "ai.onnx") for d in domains):  # exported as given: keep the default domain
        domains.append(onnx.helper.make_opsetid("", opset))
    if not any(d.domain == MS_DOMAIN for d in domains):
        domains.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return domains


def _const(g: ir.Graph, prefix: str, values: np.ndarray) -> ir.Constant:
    # not ir.add_const: np.ascontiguousarray turns a 0-d scale into shape (1,), which reads as per-axis
    return ir.Constant(ir.fresh_name(g, prefix), values=np.array(values, copy=True, order="C"))


def _int_const(g: ir.Graph, prefix: str, values: np.ndarray, storage: str) -> ir.Constant:
    """Integers in ``storage``; 4-bit types go in as a packed TensorProto (onnx-graphsurgeon exports
    numpy int4 arrays one byte per element, which ONNX rejects)."""
    if storage not in ("int4", "uint4"):
        return _const(g, prefix, np.asarray(values).astype(storage_np_dtype(storage)))
    import onnx
    from onnx_graphsurgeon.ir.tensor import LazyValues
    name = ir.fresh_name(g, prefix)
    values = np.asarray(values, dtype=np.int64)
    proto = onnx.helper.make_tensor(name, onnx.TensorProto.INT4 if storage == "int4" else onnx.TensorProto.UINT4,
                                    list(values.shape), values.reshape(-1).tolist())
    return ir.Constant(name, values=LazyValues(proto))


def scale_zp_constants(g: ir.Graph, qp: QParams, prefix: str) -> tuple[ir.Constant, ir.Constant]:
    scale = _const(g, prefix + "_scale", np.asarray(qp.scale, dtype=np.float32))
    zp = _int_const(g, prefix + "_zero_point", np.asarray(qp.zero_point), qp.storage)
    return scale, zp


def _attrs(qp: QParams) -> dict:
    return {"axis": int(qp.axis)} if qp.axis is not None and np.ndim(qp.scale) == 1 else {}


def insert_qdq(g: ir.Graph, t: ir.Tensor, qp: QParams, *, source: ir.Tensor | None = None,
               name: str | None = None) -> tuple[ir.Node, ir.Node, ir.Variable]:
    """``t -> Q -> DQ -> (every former reader of t)``; returns (Q node, DQ node, DQ output).

    ``source``: the tensor Q reads, when it is not ``t`` itself (a ReLU absorbed into the range:
    readers of the ReLU's output ``t`` read DQ(Q(ReLU's input)); the ReLU is left dead).
    A graph output keeps its name (it moves to the DQ output).
    """
    base = name or t.name
    domain = _domain(g, qp.storage)
    scale, zp = scale_zp_constants(g, qp, base)
    q_out = ir.splice(g, t, "QuantizeLinear", extra_inputs=[scale, zp], attrs=_attrs(qp),
                      name=base + "_QuantizeLinear", dtype=qp.np_dtype if qp.storage in OPSET13_TYPES else None)
    q_node = ir.producer(q_out)
    dq_out = ir.splice(g, q_out, "DequantizeLinear", extra_inputs=[scale, zp], attrs=_attrs(qp),
                       name=base + "_DequantizeLinear", dtype=np.float32)
    dq_node = ir.producer(dq_out)
    if q_out.dtype is None or qp.storage not in OPSET13_TYPES:
        q_out.dtype = _gs_dtype(qp.storage)
    if source is not None:
        ir.swap_input(q_node, q_node.inputs[0], source)
    if domain:
        q_node.domain = dq_node.domain = domain
    return q_node, dq_node, dq_out


def _gs_dtype(storage: str):
    import onnx
    return {"int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16,
            "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}.get(storage, np.dtype(storage)) \
        if storage not in OPSET13_TYPES else np.dtype(storage)


def dq_constant(g: ir.Graph, q_values: np.ndarray, qp: QParams, prefix: str) -> tuple[ir.Node, ir.Variable]:
    """A constant stored as integers, read through DequantizeLinear: returns (DQ node, its output)."""
    domain = _domain(g, qp.storage)
    q_const = _int_const(g, prefix + "_quantized", q_values, qp.storage)
    scale, zp = scale_zp_constants(g, qp, prefix)
    out = ir.Variable(ir.fresh_name(g, prefix + "_dequantized"), dtype=np.float32, shape=list(q_values.shape))
    node = ir.Node("DequantizeLinear", name=ir.fresh_name(g, prefix + "_DequantizeLinear"),
                   inputs=[q_const, scale, zp], outputs=[out], attrs=_attrs(qp), domain=domain)
    g.nodes.append(node)
    return node, out


# ----------------------------------------------------------------------------- reading a QDQ graph

def is_dq(node: ir.Node | None) -> bool:
    return node is not None and node.op == "DequantizeLinear"


def is_q(node: ir.Node | None) -> bool:
    return node is not None and node.op == "QuantizeLinear"


def qparams_of(node: ir.Node) -> QParams:
    """The QParams of a Q or DQ node (scale and zero point must be constants)."""
    scale = ir.const(node.inputs[1])
    zp_t = node.inputs[2] if len(node.inputs) > 2 else None
    zp = ir.const(zp_t) if zp_t is not None and zp_t.name else None
    if is_dq(node):
        stored = ir.const(node.inputs[0])
        dtype = stored.dtype if stored is not None else (zp.dtype if zp is not None else np.dtype(np.uint8))
    else:
        dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    storage = _storage_name(dtype)
    zp = np.zeros(np.shape(scale), dtype=np.int64) if zp is None else zp
    signed, bits = STORAGE.get(storage, (True, 32))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    axis = node.attrs.get("axis", 1) if np.ndim(scale) == 1 and np.size(scale) > 1 else None
    return QParams(scale=np.asarray(scale, np.float32), zero_point=np.asarray(zp), storage=storage, bits=bits,
                   qmin=lo, qmax=hi, axis=axis)


def _storage_name(dtype) -> str:
    name = np.dtype(dtype).name
    return {"int4": "int4", "uint4": "uint4"}.get(name, name)


@dataclass
class QGroup:
    """One quantized layer: DQ(x) [, DQ(w)] [, DQ(b)] -> node -> Q(y).

    x_dq / w_dq / b_dq / y_q are the nodes (None where absent); ``inputs_dq`` holds a DQ (or None)
    for every input of ``node`` in order. For MatMul/Gemm with a weight on the left, ``w_index`` says so.
    """
    node: ir.Node
    inputs_dq: list = field(default_factory=list)
    y_q: ir.Node | None = None
    w_index: int | None = None

    @property
    def x_dq(self) -> ir.Node | None:
        i = 0 if self.w_index != 0 else 1
        return self.inputs_dq[i] if i < len(self.inputs_dq) else None

    @property
    def w_dq(self) -> ir.Node | None:
        return self.inputs_dq[self.w_index] if self.w_index is not None else None

    @property
    def b_dq(self) -> ir.Node | None:
        if self.node.op in ("Conv", "ConvTranspose", "Gemm") and len(self.inputs_dq) > 2:
            return self.inputs_dq[2]
        return None

    @property
    def weight_int(self) -> np.ndarray | None:
        return ir.const(self.w_dq.inputs[0]) if self.w_dq is not None else None

    @property
    def weight_qparams(self) -> QParams | None:
        return qparams_of(self.w_dq) if self.w_dq is not None else None

    def weight_float(self) -> np.ndarray | None:
        """The weight as the model computes with it (dequantized)."""
        from qgraph.qparams import dequantize
        w = self.weight_int
        return None if w is None else dequantize(w.astype(np.int64), self.weight_qparams)

    @property
    def complete(self) -> bool:
        """Every float input comes from DQ and the output goes to Q: the group ORT fuses."""
        return self.y_q is not None and self.x_dq is not None and \
            (self.w_index is None or self.w_dq is not None)


def find_groups(g: ir.Graph, ops: tuple[str, ...] = DOT_OPS) -> list[QGroup]:
    """Every node of ``ops`` with at least one input from DequantizeLinear, as a QGroup."""
    groups = []
    for node in g.nodes:
        if node.op not in ops:
            continue
        dqs = [ir.producer(t) if is_dq(ir.producer(t)) else None for t in node.inputs]
        if not any(dqs):
            continue
        w_index = None
        for i, dq in enumerate(dqs[:2]):
            if dq is not None and ir.const(dq.inputs[0]) is not None:
                w_index = i
                break
        readers = ir.consumers(node.outputs[0]) if node.outputs else []
        y_q = readers[0] if len(readers) == 1 and is_q(readers[0]) else None
        groups.append(QGroup(node=node, inputs_dq=dqs, y_q=y_q, w_index=w_index))
    return groups


def float_source(dq: ir.Node) -> ir.Tensor | None:
    """For an activation DQ: the float tensor its Q quantizes (None for constants)."""
    q = ir.producer(dq.inputs[0])
    return q.inputs[0] if is_q(q) else None
