"""Lowering: a quantized ONNX model (QDQ or QOperator) -> a ``Program`` of integer steps.

QOperator nodes (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, QGemm, QLinearAdd, ...)
become steps as they are. A QDQ model is matched group by group::

    DQ(x), DQ(w), [DQ(b) | float b] -> Conv | MatMul | Gemm -> [Relu | Clip] -> Q(y)   => QLinearConv ...
    DQ(a), DQ(b) -> Add | Mul -> [Relu] -> Q                                            => QLinearAdd / Mul
    DQ(x) -> GlobalAveragePool | AveragePool -> Q                                       => QLinear pools
    DQ(x...) -> Concat -> Q                                                             => QLinearConcat
    DQ(x) -> Reshape | Transpose | ... | MaxPool -> Q                                   => Move (+ requant)
    DQ(x) -> Sigmoid | Tanh | HardSwish | ... -> Q                                      => 256-entry table
    DQ(x) -> Softmax -> Q                                                               => QLinearSoftmax

so each lowered group is the QOperator step ORT would fuse it into, and the runtime has one
implementation per op. Q of a float graph input and DQ to a float graph output stay as
Quantize/DequantizeLinear steps. Relu/Clip between the op and its Q become the output clamp; several
identical Qs of one output (dedicated Q/DQ pairs) share one result. Also lowered, as not arithmetic on
activations: nodes whose inputs are all constants (folded once here), Shape and integer arithmetic on
shapes (evaluated at run time by ONNX's reference implementation), and data movement of float values.

The ops ORT itself runs in float between DQ and Q (no integer kernel: Div, Pow, Sqrt, ReduceMean, an
Add of a float constant, a per-channel Min, HardSwish written as Mul/Add/Clip/Div, ...) become
``Float`` steps (``floatops.py``, ORT's float32 arithmetic) between explicit DequantizeLinear and
QuantizeLinear steps, as ORT runs them: integer tensors at the borders. A node that is neither a
group nor such a float op (a float Conv / MatMul / Gemm, an op ``floatops`` does not know) is a
``ModelError`` naming the node and op.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from qgraph import ir
from qgraph.errors import ModelError
from qgraph.kernels.bitplanes import encoding_of
from qgraph.kernels.bitserial import AUTO_WEIGHT_BITS
from qgraph.kernels.eltwise import TABLE_FUNCS, build_table
from qgraph.kernels.floatops import FLOAT_OPS
from qgraph.kernels.table import KERNELS
from qgraph.ops import (CLIP_OPS, INT_RANGES, Skip, clip_bounds, const_at, input_at, is_dq, is_q, match_group,
                        output_quantizer)

QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                 "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                 "QuantizeLinear", "DequantizeLinear"}
MOVE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Pad",
            "Resize", "Identity", "Expand", "MaxPool", "Dropout"}
#: the dot-product kernels a Program can use (``lower(model, kernel=...)``, ``qgraph-run --kernel``)
KERNEL_CHOICES = ("auto", "bitserial", "int8")
#: QOperator dot products: the input holding the constant weight
WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3, "ConvInteger": 1, "MatMulInteger": 1}
#: 4-bit integer types and the byte type the kernels hold their values in
SUBBYTE = {"int4": np.int8, "uint4": np.uint8}
#: 16-bit activation storage: ORT 1.32's CPU provider fuses no QDQ unit with it (its selectors are
#: built without 16-bit support there), so every such Conv / MatMul / Gemm / Add / Mul / GAP is float
WIDE = {"int16", "uint16"}
#: group ops whose 8-bit QDQ units ORT fuses into a QOperator (QLinearSoftmax, a 256-entry table,
#: QLinearConcat) but which it runs as DQ -> float op -> Q with 16-bit integers at the borders
WIDE_FLOAT_OPS = {"Softmax", "Concat"} | set(TABLE_FUNCS)
#: ops whose integer kernels clamp their output (ORT fuses a following Relu / Clip into them)
CLAMPED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul")
#: the ops ``ort_float_units`` can mark as float, and the lowered step whose kernel runs each as ORT's
#: float unit in ``float`` mode (step attribute ``ort_float``); ``lower`` refuses a marked node whose
#: step has none (tests/test_kernels_gemm_float.py checks the table against the kernels)
FLOAT_UNIT_STEPS = {"Conv": "QLinearConv", "MatMul": "QLinearMatMul", "Gemm": "QGemm", "Add": "QLinearAdd",
                    "Mul": "QLinearMul", "GlobalAveragePool": "QLinearGlobalAveragePool"}
GROUP_OPS = {"Conv", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool", "AveragePool", "Concat", "Softmax"} \
    | MOVE_OPS | set(TABLE_FUNCS)
#: inputs that must come from DequantizeLinear for a node to be an integer group (default: input 0)
_DQ_INPUTS = {"Conv": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1), "Add": (0, 1), "Mul": (0, 1)}


@dataclass
class Step:
    op: str                    # key of table.KERNELS
    name: str                  # the node (or the group's compute node) it came from
    inputs: list[str]          # value names; "" for an absent optional input
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)


@dataclass
class Program:
    steps: list[Step]
    inputs: list[str]
    outputs: list[str]
    consts: dict[str, np.ndarray]

    def add_const(self, hint: str, value) -> str:
        name = hint
        i = 0
        while name in self.consts:
            i += 1
            name = f"{hint}_{i}"
        self.consts[name] = np.asarray(value)
        return name

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps:
            key = s.attrs.get("op", s.op) if s.op == "Move" else s.op
            counts[key] = counts.get(key, 0) + 1
        return counts


def _attr(node, name: str, default):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _fail(node, why: str):
    raise ModelError(f"cannot lower node {node.name or '?'} ({node.op}): {why}")


class _Lowering:
    def __init__(self, g: ir.Graph, kernel: str = "auto"):
        if kernel not in KERNEL_CHOICES:
            raise ModelError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNEL_CHOICES)}")
        self.g = g
        self.kernel = kernel
        consts = {t.name: np.asarray(t.values) for t in ir.initializers(g)}
        self.prog = Program([], [t.name for t in g.inputs], [t.name for t in g.outputs], consts)
        self.done: set[int] = set()          # ids of nodes absorbed into a group
        self.float_units: set[int] = set()   # ids of group nodes ORT runs as DQ -> float op -> Q
        self.bias_float = None
        self.shapes: set[str] = set()        # int64 shape tensors computed at run time
        self.grouped: set[int] = set()       # ids of nodes lowered as integer groups

    # -- helpers ------------------------------------------------------------------------------------
    def name_of(self, t) -> str:
        return "" if t is None or (isinstance(t, ir.Variable) and not t.name) else t.name

    def dq_parts(self, dq, node, what: str):
        """(int value name, scale name, zero point name, axis) of the DequantizeLinear ``dq`` that
        makes input ``what`` of ``node`` (None: that input is not dequantized, which is an error)."""
        if dq is None:
            _fail(node, f"{what} is not produced by DequantizeLinear (float inputs are not lowered)")
        scale = ir.const(dq.inputs[1])
        if scale is None:
            _fail(node, f"the scale of {what} is not a constant")
        zp = const_at(dq, 2)
        src = dq.inputs[0]
        if zp is None:
            zp = np.zeros((), ir.const(src).dtype if ir.const(src) is not None else np.uint8)
        if dq.attrs.get("block_size", 0):
            _fail(node, f"{what} uses blocked quantization")
        p = self.prog
        stored = p.consts.get(src.name)
        if stored is not None and stored.dtype.name in SUBBYTE:      # 4-bit weights: one byte each
            p.consts[src.name] = stored.astype(SUBBYTE[stored.dtype.name])
        return (src.name, p.add_const(f"{src.name}::scale", scale.astype(np.float32)),
                p.add_const(f"{src.name}::zp", zp), int(dq.attrs.get("axis", 1)))

    def q_after(self, node):
        """node -> [Relu | Clip] -> QuantizeLinear: (q node, clamp nodes, twin qs); the clamp only
        after the ops whose integer kernels saturate to a range (ORT's fused activations)."""
        found = output_quantizer(self.g, node, CLIP_OPS if node.op in CLAMPED_OPS else ())
        if isinstance(found, Skip):
            _fail(node, found.detail)
        return found

    def q_parts(self, q):
        scale = ir.const(q.inputs[1])
        if scale is None:
            _fail(q, "the output scale is not a constant")
        zp = const_at(q, 2)
        zp = np.zeros((), np.uint8) if zp is None else zp
        if scale.size != 1:
            _fail(q, "per-channel activation quantization is not supported")
        p = self.prog
        y = q.outputs[0].name
        return y, p.add_const(f"{y}::scale", scale.astype(np.float32)), p.add_const(f"{y}::zp", zp), zp, scale

    def clamp(self, chain, zp, scale) -> tuple[int, int]:
        lo, hi = INT_RANGES[np.asarray(zp).dtype.name]
        z, s = int(np.asarray(zp).reshape(-1)[0]), float(np.asarray(scale).reshape(-1)[0])
        for n in chain:
            bounds = clip_bounds(n)
            if bounds is None:
                _fail(n, "its bounds are not constants")
            cmin, cmax = bounds
            if n.op == "Relu":
                lo = max(lo, z)
            else:
                if np.isfinite(cmin):
                    lo = max(lo, z + int(np.rint(np.float32(cmin) / np.float32(s))))
                if np.isfinite(cmax):
                    hi = min(hi, z + int(np.rint(np.float32(cmax) / np.float32(s))))
            self.done.add(id(n))
        return lo, hi

    def bias(self, node, t, sx_name, sw_name) -> str:
        """Name of the int32 bias (scale s_x*s_w); records its float value, as ORT's float path
        sees it, in ``self.bias_float`` (DQ of the stored int32 with the stored scale)."""
        self.bias_float = None
        if t is None or not t.name:
            return ""
        prod = ir.producer(t)
        if is_dq(prod) and ir.const(prod.inputs[0]) is not None:
            values, scale = ir.const(prod.inputs[0]), ir.const(prod.inputs[1])
            if np.squeeze(values).ndim > 1 or (scale is not None and scale.size not in (1, values.size)):
                _fail(node, f"bias '{t.name}' is not one value per output channel (shape {list(values.shape)})")
            self.done.add(id(prod))
            if scale is not None:
                self.bias_float = (ir.const(prod.inputs[0]).astype(np.float32).reshape(-1)
                                   * scale.astype(np.float32).reshape(-1)).astype(np.float32)
            return prod.inputs[0].name                      # int32 bias, scale s_x*s_w by construction
        b = ir.const(t)
        if b is None:
            _fail(node, "bias is neither a constant nor a dequantized constant")
        if np.squeeze(b).ndim > 1:
            _fail(node, f"bias '{t.name}' is not one value per output channel (shape {list(b.shape)})")
        self.bias_float = b.astype(np.float32).reshape(-1)
        s = (self.prog.consts[sx_name].reshape(()).astype(np.float32)
             * self.prog.consts[sw_name].astype(np.float32).reshape(-1))
        return self.prog.add_const(f"{t.name}::int32", np.rint(b.astype(np.float32) / s).astype(np.int32))

    def kernel_for(self, w_name: str) -> str:
        """The dot-product kernel of a layer whose weight is the constant ``w_name`` (``KERNEL_CHOICES``):
        ``int8``, ``bitserial`` (forced), or ``auto``: a bit-serial candidate (weights of at most
        ``AUTO_WEIGHT_BITS`` bits), run bit-serially when the activation's planes are few enough
        (``bitserial.use_bitserial``, decided on each input)."""
        w = self.prog.consts.get(w_name)
        if self.kernel == "int8" or w is None or w.dtype not in (np.int8, np.uint8):
            return "int8"
        if self.kernel == "bitserial":
            return "bitserial"
        return "auto" if encoding_of(w).bits <= AUTO_WEIGHT_BITS else "int8"

    def ort_types(self, node) -> dict:
        """The storage types ORT's x86 CPU provider gives the activations of a fused Conv / MatMul /
        Gemm (int8 ones it rewrote are uint8 there): ``ort_act`` for input A, ``ort_b`` for a MatMul's
        B when it is an activation. The runtime reproduces ORT's u8 x s8 arithmetic by them."""
        import platform as _pf
        if _pf.machine().lower() not in X86:
            return {}
        out = {"ort_act": _input_type(self.g, node.inputs[0])}
        dq = ir.producer(node.inputs[1])
        if dq is not None and dq.op == "DequantizeLinear" and ir.const(dq.inputs[0]) is None:
            out["ort_b"] = _input_type(self.g, node.inputs[1])
        return {k: v for k, v in out.items() if v is not None}

    def emit(self, step_op, node, inputs, outputs, **attrs):
        self.prog.steps.append(Step(step_op, node.name, list(inputs), list(outputs), attrs))

    # -- groups -------------------------------------------------------------------------------------
    def group(self, node):
        q, chain, twins = self.q_after(node)
        self.done.add(id(q))
        first = len(self.prog.steps)
        self.group_step(node, q, chain)
        if id(node) in self.float_units and not any("ort_float" in s.attrs for s in self.prog.steps[first:]):
            _fail(node, "ONNX Runtime runs this unit in float (DQ -> float op -> Q) and qgraph-run has no "
                        "float unit for it (it would run as integers: not ORT's numbers)")
        for t in twins:                                          # same values under another name
            self.done.add(id(t))
            self.emit("Move", t, [q.outputs[0].name], [t.outputs[0].name], op="Identity", attrs={},
                      requant=False)

    def group_step(self, node, q, chain):
        group = match_group(node)                   # the DQ behind each input (None: not dequantized)
        dqs = group.inputs_dq if group is not None else [None] * len(node.inputs)
        y, sy, zy, zp_arr, s_arr = self.q_parts(q)
        clamp = self.clamp(chain, zp_arr, s_arr)
        op, at = node.op, dict(node.attrs)
        if op == "Conv":
            x, sx, zx, _ = self.dq_parts(dqs[0], node, "input")
            w, sw, zw, _ = self.dq_parts(dqs[1], node, "weight")
            b = self.bias(node, input_at(node, 2), sx, sw)
            extra = {"ort_float": {"bias": self.bias_float}} if id(node) in self.float_units else {}
            self.emit("QLinearConv", node, [x, sx, zx, w, sw, zw, sy, zy, b], [y], **at, clamp=clamp,
                      kernel=self.kernel_for(w), **extra, **self.ort_types(node))
        elif op == "MatMul":
            a, sa, za, _ = self.dq_parts(dqs[0], node, "input A")
            b, sb, zb, _ = self.dq_parts(dqs[1], node, "input B")
            extra = {"ort_float": {}} if id(node) in self.float_units else {}
            self.emit("QLinearMatMul", node, [a, sa, za, b, sb, zb, sy, zy], [y], clamp=clamp,
                      kernel=self.kernel_for(b), **extra, **self.ort_types(node))
        elif op == "Gemm":
            alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
            if id(node) not in self.float_units and (alpha != 1.0 or beta != 1.0 and input_at(node, 2) is not None):
                _fail(node, f"Gemm with alpha {alpha:g}, beta {beta:g} as an integer QGemm (ONNX Runtime fuses a "
                            "bias-free Gemm with alpha != 1 into QGemm; qgraph-run does not implement that alpha)")
            a, sa, za, _ = self.dq_parts(dqs[0], node, "input A")
            b, sb, zb, _ = self.dq_parts(dqs[1], node, "input B")
            extra = {"ort_float": self.gemm_float_c(node, alpha, beta)} if id(node) in self.float_units else {}
            if extra and extra["ort_float"]["c"] is not None and extra["ort_float"]["c"].ndim > 1 \
                    and np.squeeze(extra["ort_float"]["c"]).ndim > 1:      # [M, N] C: no per-channel int32 bias
                c = ""                                     # the integer path refuses it (no_int_bias)
                extra["no_int_bias"] = True
            else:
                c = self.bias(node, input_at(node, 2), sa, sb)
            self.emit("QGemm", node, [a, sa, za, b, sb, zb, c, sy, zy], [y],
                      transA=int(at.get("transA", 0)), transB=int(at.get("transB", 0)), clamp=clamp,
                      kernel=self.kernel_for(b), alpha=alpha, beta=beta, **extra, **self.ort_types(node))
        elif op in ("Add", "Mul"):
            a, sa, za, _ = self.dq_parts(dqs[0], node, "input A")
            b, sb, zb, _ = self.dq_parts(dqs[1], node, "input B")
            extra = {"ort_float": {}} if id(node) in self.float_units else {}
            self.emit("QLinear" + op, node, [a, sa, za, b, sb, zb, sy, zy], [y], clamp=clamp, **extra)
        elif op in ("GlobalAveragePool", "AveragePool"):
            x, sx, zx, _ = self.dq_parts(dqs[0], node, "input")
            extra = {"ort_float": {}} if id(node) in self.float_units else {}
            self.emit("QLinear" + op, node, [x, sx, zx, sy, zy], [y], **at, **extra)
        elif op == "Concat":
            ins = [sy, zy]
            for i, dq in enumerate(dqs):
                ins += list(self.dq_parts(dq, node, f"input {i}")[:3])
            self.emit("QLinearConcat", node, ins, [y], axis=int(at.get("axis", 0)))
        elif op == "Softmax":                       # ORT fuses it into com.microsoft QLinearSoftmax
            x, sx, zx, _ = self.dq_parts(dqs[0], node, "input")
            opset = int(self.g.opset or 13)
            self.emit("QLinearSoftmax", node, [x, sx, zx, sy, zy], [y], opset=opset,
                      axis=int(at.get("axis", -1 if opset >= 13 else 1)))
        elif op in TABLE_FUNCS:
            x, sx, zx, _ = self.dq_parts(dqs[0], node, "input")
            c = self.prog.consts
            table = build_table(op, at, c[sx], c[zx], c[zx].dtype, c[sy], c[zy], c[zy].dtype)
            self.emit("Lookup", node, [x, self.prog.add_const(f"{y}::table", table)], [y])
        else:  # data movement
            x, sx, zx, _ = self.dq_parts(dqs[0], node, "input")
            c = self.prog.consts
            same = (np.float32(c[sx].reshape(-1)[0]) == np.float32(c[sy].reshape(-1)[0])
                    and int(c[zx].reshape(-1)[0]) == int(c[zy].reshape(-1)[0]) and c[zx].dtype == c[zy].dtype)
            extra = [self.name_of(t) for t in node.inputs[1:]]
            if op == "Pad" and len(extra) > 1 and extra[1]:      # float pad value -> its code
                v = np.float32(np.asarray(ir.const(node.inputs[2])).reshape(-1)[0])
                code = np.clip(np.rint(v / np.float32(c[sx].reshape(-1)[0])) + int(c[zx].reshape(-1)[0]),
                               *INT_RANGES[c[zx].dtype.name]).astype(c[zx].dtype)
                extra[1] = self.prog.add_const(f"{y}::pad_value", code)
            elif op == "Pad":
                extra = (extra + ["", ""])[:1] + [self.prog.add_const(f"{y}::pad_value", c[zx])] + extra[2:]
            ins = [x] + extra + ([] if same else [sx, zx, sy, zy])
            self.emit("Move", node, ins, [y], op=op, attrs=at, requant=not same)

    def gemm_float_c(self, node, alpha: float, beta: float) -> dict:
        """What the float Gemm unit (``ortfloat.gemm_unit``) needs beyond the integer step: C as ORT's
        float path sees it (DQ of the stored int32 with its scale, or the float constant), in its own
        shape, and alpha / beta."""
        t = input_at(node, 2)
        c = None
        if t is not None:
            prod = ir.producer(t)
            if is_dq(prod) and ir.const(prod.inputs[0]) is not None and ir.const(prod.inputs[1]) is not None:
                v, s = ir.const(prod.inputs[0]), ir.const(prod.inputs[1])
                zp = const_at(prod, 2)
                z = np.zeros((), np.int64) if zp is None else np.asarray(zp).astype(np.int64)
                if s.size != 1 and (v.ndim != 1 or s.size != v.size):
                    _fail(node, f"C '{t.name}' is dequantized per axis in a form the float Gemm unit does not read")
                c = ((v.astype(np.int64) - z.reshape(-1) if z.size > 1 else v.astype(np.int64) - z)
                     .astype(np.float32) * s.astype(np.float32).reshape(-1 if s.size > 1 else ())).astype(np.float32)
            elif ir.const(t) is not None:
                c = np.asarray(ir.const(t), np.float32)
            else:
                _fail(node, "C is neither a constant nor a dequantized constant")
        return {"c": c, "alpha": alpha, "beta": beta}

    # -- driver -------------------------------------------------------------------------------------
    def fold_constants(self) -> None:
        """Evaluate nodes whose inputs are all constants (shape arithmetic, constant pad values) once,
        with ONNX's reference implementation; they compute metadata, not quantized activations.
        Q nodes and the DQs of weights and biases are kept: the groups read them."""
        from onnx import numpy_helper
        from onnx.reference import ReferenceEvaluator
        for node in list(self.g.nodes):
            ins = [t for t in node.inputs if t is not None and t.name]
            if not node.outputs or node.op == "QuantizeLinear" or not ins:
                continue
            if any(ir.const(t) is None for t in ins) or any(ir.is_graph_output(self.g, o) for o in node.outputs):
                continue
            if node.op == "DequantizeLinear" and not all(
                    u.op == "Pad" and not any(u.inputs[0] is o for o in node.outputs)
                    for o in node.outputs for u in ir.consumers(o)):
                continue
            attrs = {k: (numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, ir.Constant) else v)
                     for k, v in node.attrs.items()}
            proto = onnx.helper.make_node(node.op, [self.name_of(t) for t in node.inputs],
                                          [o.name for o in node.outputs], domain=node.domain or "", **attrs)
            try:
                values = ReferenceEvaluator(proto).run(None, {t.name: ir.const(t) for t in ins})
            except Exception as exc:  # pragma: no cover - reported as the node that cannot be lowered
                _fail(node, f"constant folding failed: {exc}")
            for out, val in zip(list(node.outputs), values):
                c = ir.Constant(out.name, values=np.asarray(val))
                for user in ir.consumers(out):
                    ir.swap_input(user, out, c)
                self.prog.consts[out.name] = np.asarray(val)
            node.outputs.clear()
            node.inputs.clear()
            self.done.add(id(node))

    def run(self) -> Program:
        self.g.toposort()
        self.fold_constants()
        self.float_units = {id(n) for n in ort_float_units(self.g)}
        self.grouped = {id(n) for n in self.g.nodes if id(n) not in self.done and self.is_group(n)}
        for node in self.g.nodes:
            if id(node) in self.done:
                continue
            if self.shape_arithmetic(node):
                continue
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                self.boundary(node)
            elif node.op in QOPERATOR_OPS or node.domain == "com.microsoft" and node.op.startswith("QLinear"):
                if node.op not in KERNELS:
                    _fail(node, "this quantized op has no integer kernel")
                at = dict(node.attrs)
                if node.op in WEIGHT_INPUT:
                    at["kernel"] = self.kernel_for(self.name_of(input_at(node, WEIGHT_INPUT[node.op])) or "")
                self.emit(node.op, node, [self.name_of(t) for t in node.inputs], [t.name for t in node.outputs], **at)
            elif id(node) in self.grouped:
                self.group(node)
            elif node.op in MOVE_OPS and not (node.op == "Resize" and _attr(node, "mode", "nearest") != "nearest"):
                # moving float values (e.g. Flatten of the float graph input before its Q) is exact
                self.emit("Move", node, [self.name_of(t) for t in node.inputs],
                          [o.name for o in node.outputs], op=node.op, attrs=dict(node.attrs), requant=False)
            elif node.op in FLOAT_OPS and not node.domain:
                self.float_step(node)
            elif node.op in GROUP_OPS:
                self.group(node)                 # fails naming why it is not a quantized group
            else:
                _fail(node, "no integer kernel for this op, and not an op qgraph-run runs in float "
                            "between DequantizeLinear and QuantizeLinear as ONNX Runtime does")
        return self.prog

    def is_group(self, node) -> bool:
        """Whether ``node`` is an integer group: its inputs that must be dequantized are (see
        ``_DQ_INPUTS``) and one QuantizeLinear quantizes its output. Otherwise ORT runs it in float."""
        if node.op not in GROUP_OPS or not node.inputs or node.domain:
            return False
        found = output_quantizer(self.g, node, CLIP_OPS if node.op in CLAMPED_OPS else ())
        if isinstance(found, Skip):
            return False
        wanted = range(len(node.inputs)) if node.op == "Concat" else _DQ_INPUTS.get(node.op, (0,))
        if not all(i < len(node.inputs) and self.from_dq(node.inputs[i]) for i in wanted):
            return False
        if node.op in WIDE_FLOAT_OPS and any(
                t in WIDE for t in [_ort_type(self.g, found[0])] + [_input_type(self.g, node.inputs[i]) for i in wanted]):
            return False           # 16-bit: no QLinearSoftmax / table / QLinearConcat in ORT: DQ -> float op -> Q
        return True

    def float_step(self, node):
        """A node ORT runs in float between DQ and Q (``floatops``): float in, float out."""
        for t in node.inputs:
            c = ir.const(t) if t is not None and t.name else None
            if c is not None:
                self.prog.consts.setdefault(t.name, np.asarray(c))
        extra = {}
        if node.op == "MatMul" and len(node.inputs) > 1:     # ORT prepacks a constant B (its own k-blocks)
            extra["b_packed"] = _foldable(node.inputs[1])
        self.emit("Float", node, [self.name_of(t) for t in node.inputs], [o.name for o in node.outputs],
                  op=node.op, attrs=dict(node.attrs), opset=int(self.g.opset or 13), n_out=len(node.outputs),
                  **extra)

    @staticmethod
    def from_dq(t) -> bool:
        p = ir.producer(t) if t is not None else None
        return is_dq(p)

    def shape_arithmetic(self, node) -> bool:
        """Shape of an activation, and integer arithmetic on shapes (dynamic batch, 'same' padding):
        metadata, evaluated by ONNX's reference implementation on tiny int64 tensors at run time."""
        names = [t.name for t in node.inputs if t is not None and t.name and ir.const(t) is None]
        if node.op == "Shape":
            src = node.inputs[0]
            dq = ir.producer(src)
            name = dq.inputs[0].name if is_dq(dq) else src.name
            self.emit("Shape", node, [name], [node.outputs[0].name], **dict(node.attrs))
        elif names and node.op not in ("QuantizeLinear", "DequantizeLinear") \
                and all(n in self.shapes for n in names):
            from onnx import numpy_helper
            attrs = {k: (numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, ir.Constant) else v)
                     for k, v in node.attrs.items()}
            proto = onnx.helper.make_node(node.op, [self.name_of(t) for t in node.inputs],
                                          [o.name for o in node.outputs], domain=node.domain or "", **attrs)
            for t in node.inputs:
                if t is not None and t.name and ir.const(t) is not None:
                    self.prog.consts.setdefault(t.name, np.asarray(ir.const(t)))
            self.emit("EvalShape", node, [self.name_of(t) for t in node.inputs],
                      [o.name for o in node.outputs], proto=proto)
        else:
            return False
        self.shapes.update(o.name for o in node.outputs)
        return True

    def boundary(self, node):
        """Emit a Q or DQ step unless a group consumes it (DQ of constants and DQs feeding groups)."""
        if node.op == "DequantizeLinear":
            users = ir.consumers(node.outputs[0])
            if users and all(id(u) in self.grouped or u.op == "Shape" for u in users) \
                    and not ir.is_graph_output(self.g, node.outputs[0]):
                return                                       # read by the groups (weights included)
        at = dict(node.attrs)
        if node.op == "QuantizeLinear" and "output_dtype" in at:
            at["output_dtype_name"] = onnx.helper.tensor_dtype_to_np_dtype(at["output_dtype"]).name
        self.emit(node.op, node, [self.name_of(t) for t in node.inputs], [t.name for t in node.outputs], **at)


# ----------------------------------------------------------------------------- ORT's float units

X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _foldable(t, depth: int = 0) -> bool:
    """Whether ORT sees tensor ``t`` as a constant once its constant folding ran: an initializer, or
    the output of ops (not DequantizeLinear, which it does not fold) whose inputs all are."""
    if t is None or ir.const(t) is not None:
        return True
    p = ir.producer(t)
    if p is None or is_dq(p) or depth > 16 or p.op in ("Shape", "Size"):
        return False
    return all(_foldable(i, depth + 1) for i in p.inputs if i is not None and i.name)


def _edges(g, t) -> int:
    """Consumer edges of ``t`` once ORT's EnsureUniqueDQForNodeUnit has given every reader of a
    DequantizeLinear its own copy (a graph output counts as one more)."""
    n = int(ir.is_graph_output(g, t))
    for user in ir.consumers(t):
        if user.op == "DequantizeLinear":
            out = user.outputs[0]
            n += max(1, len(ir.consumers(out)) + int(ir.is_graph_output(g, out)))
        else:
            n += 1
    return n


def _ort_type(g, q) -> str:
    """Storage type ORT's x86 CPU provider gives the output of QuantizeLinear ``q``:
    ``QDQS8ToU8Transformer`` rewrites an int8 Q -> DQ pair to uint8 only when the Q has exactly
    one consumer edge (and a constant scalar zero point)."""
    zp = const_at(q, 2)
    kind = np.asarray(zp).dtype.name if zp is not None else "uint8"
    if kind == "int8" and np.asarray(zp).size == 1 and not ir.is_graph_output(g, q.outputs[0]) \
            and _edges(g, q.outputs[0]) == 1:
        return "uint8"
    return kind


def _input_type(g, t) -> str | None:
    """Storage type of the integer tensor behind DequantizeLinear output ``t`` as ORT runs it. An int8
    constant keeps int8: ORT 1.32's transformer leaves a lone DQ of a constant as it is (seen in its
    optimized graphs: MiniLM's GELU constants 1 and 0.5, stored as 127, stay int8, so the Add / Mul
    that reads them next to a uint8 activation runs in float)."""
    dq = ir.producer(t) if t is not None else None
    if dq is None or dq.op != "DequantizeLinear":
        return None
    src = dq.inputs[0]
    q = ir.producer(src)
    if is_q(q):
        return _ort_type(g, q)
    zp = const_at(dq, 2)
    kind = np.asarray(zp).dtype.name if zp is not None else "uint8"
    return kind


def _ort_keeps_clip(clip, q) -> bool:
    """ORT's ClipQuantFusion removes a Clip before QuantizeLinear only when the Clip's range covers
    the real range of Q's type, [s (qmin - z), s (qmax - z)] (to float32 epsilon); a narrower Clip
    (2-4-bit activations in int8) stays, and with it the op before it stays float."""
    bounds = clip_bounds(clip)
    scale, zp = const_at(q, 1), const_at(q, 2)
    if bounds is None or scale is None or scale.size != 1:
        return False
    kind = np.asarray(zp).dtype.name if zp is not None else "uint8"
    if kind not in INT_RANGES:
        return False
    z = float(np.asarray(zp).reshape(-1)[0]) if zp is not None else 0.0
    s = float(scale.reshape(-1)[0])
    lo, hi = (s * (v - z) for v in INT_RANGES[kind])
    eps = float(np.finfo(np.float32).eps)
    return bounds[0] - lo > eps or hi - bounds[1] > eps


def _ort_keeps_relu(q) -> bool:
    """ORT's ReluQuantFusion removes a Relu before QuantizeLinear only when Q's zero point is the
    minimum of its type (-128 for int8, 0 for uint8: Q's own clamp is then the Relu); any other zero
    point keeps the Relu, so the op before it is not followed by Q and stays float (Conv + Relu
    becomes ``FusedConv``): DenseNet-121's stem, whose Relu output shares the max-pool's scale and
    zero point -17."""
    zp = const_at(q, 2)
    if zp is None:
        return False                            # uint8, zero point 0
    kind = np.asarray(zp).dtype.name
    if kind not in INT_RANGES or np.asarray(zp).size != 1:
        return False
    return int(np.asarray(zp).reshape(-1)[0]) != INT_RANGES[kind][0]


#: ORT 1.32's QDQ Conv selector fuses a Conv whose int32 bias is dequantized with scale s_b only when
#: |s_b - s_x s_w| <= BIAS_ATOL + BIAS_RTOL |s_x s_w| in every output channel (measured: the boundary found
#: by bisection on three channels of one model and on four s_x from 1 to 1e-4 lies on this line to 1e-9
#: relative); QLinearConv then reads the raw int32 as if its scale were s_x s_w. Otherwise the Conv runs
#: in float with the bias as DequantizeLinear gives it. Gemm fuses into QGemm whatever the bias scale.
BIAS_RTOL = 1e-2
BIAS_ATOL = 1e-6


def _ort_bias_scale_fits(node) -> bool:
    """Whether the bias of QDQ Conv ``node`` passes ORT's check (no bias, or one that is not a
    dequantized constant with constant scales: nothing to check)."""
    b = input_at(node, 2)
    dqs = [ir.producer(t) if t is not None else None for t in (node.inputs[0], node.inputs[1], b)]
    if b is None or not all(d is not None and is_dq(d) for d in dqs):
        return True
    sx, sw, sb = (ir.const(d.inputs[1]) for d in dqs)
    if sx is None or sw is None or sb is None or sx.size != 1:
        return True
    want = (sx.astype(np.float32).reshape(()) * sw.astype(np.float32).reshape(-1)).astype(np.float64)
    have = sb.astype(np.float32).reshape(-1).astype(np.float64)
    if have.size not in (1, want.size) or want.size not in (1, have.size):
        return True
    return bool(np.all(np.abs(have - want) <= BIAS_ATOL + BIAS_RTOL * np.abs(want)))


def ort_float_units(g: ir.Graph, platform: str = "auto") -> list:
    """Compute nodes of QDQ units that ONNX Runtime's CPU provider leaves unfused (DQ -> float op -> Q).

    On x86-64 (``platform`` "auto" on such a machine, or "x86"): after the int8 -> uint8 rewrite of
    single-consumer Q -> DQ pairs (``_ort_type``), the QDQ selectors fuse Conv and MatMul only when
    input and output share one type and it is not int8 (int8 activations are not allowed there),
    Gemm when A and Y share a type, and Add / Mul when both inputs and the output share one. So an
    int8 tensor read by two nodes (a residual) keeps its writer, its readers and the Add in float;
    GlobalAveragePool (the unary selector) fuses only when its input and output share one type, so
    a GAP reading such an int8 tensor (a squeeze-excitation block) is ``DQ -> float GAP -> Q``;
    a layer with 4-bit (INT4 / UINT4) weights or a 16-bit input or output (``WIDE``) is always float
    (ORT dequantizes them), and so is a layer
    whose output reaches Q through a Clip narrower than Q's range (``_ort_keeps_clip``) or through a
    Relu that ORT keeps (Q's zero point above its type's minimum: ``_ort_keeps_relu``), a Conv
    whose bias DequantizeLinear scale is not s_x s_w (``_ort_bias_scale_fits``), and a Gemm
    with a bias and alpha or beta != 1 (ORT's QDQ Gemm selector; without a bias it fuses any alpha
    into QGemm, which ``lower`` refuses by name: alpha != 1 is not implemented). Each marked
    op's step runs ORT's float unit in ``float`` mode (``FLOAT_UNIT_STEPS``; ``lower`` refuses one
    that has none). Elsewhere ("none", or a non-x86 machine under "auto") every unit is taken as fused.
    """
    import platform as _pf
    if platform == "auto":
        platform = "x86" if _pf.machine().lower() in X86 else "none"
    if platform == "none":
        return []
    units = []
    for node in g.nodes:
        if node.op not in FLOAT_UNIT_STEPS:
            continue
        users = ir.consumers(node.outputs[0]) if node.outputs else []
        clamp = users[0] if len(users) == 1 and users[0].op in CLIP_OPS and node.op in CLAMPED_OPS else None
        if clamp is not None:
            users = ir.consumers(clamp.outputs[0])
        if len(users) != 1 or users[0].op != "QuantizeLinear":
            continue
        if clamp is not None and clamp.op == "Clip" and _ort_keeps_clip(clamp, users[0]):
            units.append(node)                  # a Clip narrower than Q's range: float op + Clip + Q
            continue
        if clamp is not None and clamp.op == "Relu" and _ort_keeps_relu(users[0]):
            units.append(node)                  # Q's zero point above its minimum: float op + Relu + Q
            continue
        if node.op == "Gemm" and input_at(node, 2) is not None and (
                float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
            units.append(node)                  # ORT's Gemm selector: with a bias, alpha and beta 1
            continue
        out = _ort_type(g, users[0])
        ins = [_input_type(g, t) for t in node.inputs[:2]]
        if any(t is None for t in ins):
            continue
        if node.op != "Add" and node.op != "Mul" and any(t in SUBBYTE for t in ins):
            units.append(node)                  # ORT has no integer kernel for 4-bit weights here
            continue
        if any(t in WIDE for t in [*ins, out]):
            units.append(node)                  # the CPU provider's QDQ selectors are 8-bit only
            continue
        if node.op == "Conv" and not _ort_bias_scale_fits(node):
            units.append(node)                  # a bias scale far from s_x s_w: DQ -> float Conv -> Q
            continue
        if node.op in ("Conv", "MatMul"):       # the weight (input 1) stays int8: not compared
            fused = ins[0] == out and ins[0] != "int8"
        elif node.op in ("Gemm", "GlobalAveragePool"):     # Gemm: A and Y; GAP: ORT's unary selector
            fused = ins[0] == out
        else:
            fused = ins[0] == ins[1] == out
        if not fused:
            units.append(node)
    return units


def lower(model, kernel: str = "auto") -> Program:
    """Lower a quantized model (path, ModelProto or qgraph.ir Graph) to a Program; ModelError if it cannot.
    ``kernel``: how Conv / MatMul / Gemm with constant weights compute their dot products: ``int8``,
    ``bitserial`` (every such layer, whatever its widths), or ``auto`` (bit-serial for weights of at
    most 4 bits when the activation's planes are few enough, see ``bitserial.use_bitserial``)."""
    g = model if isinstance(model, ir.Graph) else ir.load(model)
    return _Lowering(g, kernel).run()
