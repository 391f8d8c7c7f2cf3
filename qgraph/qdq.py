"""Writing QDQ: make QuantizeLinear/DequantizeLinear nodes (``quant``, ``biascorr``).

A QDQ model marks each quantized value with a Q -> DQ pair; ONNX Runtime fuses a node whose inputs
come from DQ and whose output goes to Q into one integer op (QLinearConv, QLinearMatMul, QGemm, ...).
Reading such a graph back (``find_groups``, ``qparams_of``) is shared vocabulary: ``qgraph.ops``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.ops import QParams, storage_np_dtype

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


def _int_const(g: ir.Graph, prefix: str, values: np.ndarray, storage: str) -> ir.Constant:
    """Integers in ``storage``; 4-bit types go in as a packed TensorProto (onnx-graphsurgeon exports
    numpy int4 arrays one byte per element, which ONNX rejects)."""
    if storage not in ("int4", "uint4"):
        return ir.add_const(g, prefix, np.asarray(values).astype(storage_np_dtype(storage)))
    import onnx
    from onnx_graphsurgeon.ir.tensor import LazyValues
    name = ir.fresh_name(g, prefix)
    values = np.asarray(values, dtype=np.int64)
    proto = onnx.helper.make_tensor(name, onnx.TensorProto.INT4 if storage == "int4" else onnx.TensorProto.UINT4,
                                    list(values.shape), values.reshape(-1).tolist())
    return ir.Constant(name, values=LazyValues(proto))


def scale_zp_constants(g: ir.Graph, qp: QParams, prefix: str) -> tuple[ir.Constant, ir.Constant]:
    scale = ir.add_const(g, prefix + "_scale", np.asarray(qp.scale, dtype=np.float32))
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
