"""Where Q/DQ go: the placement rules of the ``quant`` pass, as ONNX Runtime's QDQ fusions expect.

A *plan* is decided on the float graph before any data is seen: which nodes are quantized, which
activation tensors get a Q -> DQ pair, which constants are stored as integers (and along which axis),
which tensors must share one scale, and which ReLU/Clip disappear into their producer's range.

    Conv, ConvTranspose, Gemm, MatMul   x: activation;  w: constant (per channel on the output axis);
                                         b: int32 with scale s_x·s_w;  y: activation
    Add, Mul                             every input (constants as 8-bit per-tensor) and the output
    Concat                               every input and the output share one scale (QLinearConcat)
    AveragePool, GlobalAveragePool,      input and output, each its own scale
    Sigmoid, LeakyRelu, Softmax          (QLinearAveragePool, QLinearSigmoid, QLinearSoftmax, ...)
    MaxPool, Reshape, Flatten, Transpose, output takes the input's scale (ORT drops the DQ/Q pair and
    Squeeze, Unsqueeze, Resize, Slice,    runs the op on integers); only when the input is quantized
    Split, DepthToSpace, SpaceToDepth,    (Pad: only when it pads with 0 or edge/reflect copies)
    Identity, Pad
    Gather                               a constant table (embedding) as 8-bit per tensor; the output
                                         takes the table's scale
    Relu, Clip(lo <= 0)                  after a quantized op whose output has no other reader: removed,
                                         the producer's output is quantized with the ReLU output's range
                                         (exact: Q saturates at 0 when the zero point is qmin)

Everything else stays float, and no Q/DQ pair is put between two float ops. HardSigmoid and HardSwish
have no integer kernel in ONNX Runtime (1.32: DQ -> HardSigmoid -> Q stays three float ops), so they
are not quantized for their own sake; when their neighbours are quantized, the Q/DQ around them come
from those neighbours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.ops import BIASED_LAYER_OPS, CLIP_OPS, LAYER_OPS, clip_bounds, input_at, pads_with_zero

DOT = LAYER_OPS
BINARY = ("Add", "Mul")
OWN_SCALE = ("AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax")
TIED = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice", "Split",
        "DepthToSpace", "SpaceToDepth", "Identity", "Pad")
ABSORBABLE = CLIP_OPS
#: Tied ops whose output values are a subset of their input's (Resize may interpolate beyond: observed).
SUBSET_RANGE = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
                "DepthToSpace", "SpaceToDepth", "Identity", "Pad")
QUANTIZABLE = DOT + BINARY + ("Concat",) + OWN_SCALE + TIED + ("Gather",)


@dataclass
class WeightPlan:
    tensor: ir.Constant
    axis: int | None
    bits: int
    readers: list = field(default_factory=list)     # nodes that read it through DQ


@dataclass
class Plan:
    nodes: list = field(default_factory=list)               # quantized nodes, in graph order
    acts: dict = field(default_factory=dict)                 # name -> Tensor to get Q -> DQ
    absorbed: dict = field(default_factory=dict)             # ReLU/Clip output name -> that node
    weights: dict = field(default_factory=dict)              # const name -> WeightPlan
    biases: list = field(default_factory=list)               # (node, bias Constant, x name, w name)
    ties: dict = field(default_factory=dict)                 # union-find parent, over act names
    fixed: dict = field(default_factory=dict)                # act name -> weight name whose qparams it takes
    derived: set = field(default_factory=set)                # outputs of data movement: range within the input's
    skipped: dict = field(default_factory=dict)              # reason -> count
    skipped_nodes: list = field(default_factory=list)        # (node name, op, reason)

    def find(self, name: str) -> str:
        root = name
        while self.ties.get(root, root) != root:
            root = self.ties[root]
        while self.ties.get(name, name) != root:  # path compression
            self.ties[name], name = root, self.ties[name]
        return root

    def tie(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.ties[rb] = ra

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.acts:
            out.setdefault(self.find(name), []).append(name)
        return out

    def skip(self, node, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_nodes.append((node.name, node.op, reason))


class Matcher:
    """Node selectors from the command line: a node name, an op type, ``first``/``last`` (the first
    and last Conv/Gemm/MatMul), or a regular expression matched against the whole node name."""

    def __init__(self, patterns, dot_order: list[str]):
        self.items = list(patterns)
        self.first = dot_order[0] if dot_order else None
        self.last = dot_order[-1] if dot_order else None

    def match(self, node, pattern: str) -> bool:
        if pattern == node.name or pattern == node.op:
            return True
        if pattern == "first":
            return node.name == self.first
        if pattern == "last":
            return node.name == self.last
        try:
            return re.fullmatch(pattern, node.name or "") is not None
        except re.error:
            return False

    def any(self, node) -> bool:
        return any(self.match(node, p) for p in self.items)


def _is_float(t) -> bool:
    if isinstance(t, ir.Constant):
        return np.issubdtype(t.values.dtype, np.floating)
    return t.dtype is None or np.dtype(t.dtype) == np.float32


def _is_act(t) -> bool:
    return t is not None and bool(t.name) and not isinstance(t, ir.Constant) and ir.const(t) is None and _is_float(t)


def weight_axis(node, granularity: str, w) -> int | None:
    """Per-channel axis of ``node``'s weight: the output-channel axis, or None (per tensor)."""
    if granularity != "channel":
        return None
    rank = len(w.shape)
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and rank == 2:
        return 1
    return None


def make_plan(g: ir.Graph, *, granularity: str, bits: int, precision: dict, exclude, absorb: bool,
              weight_only: bool) -> Plan:
    """The placement plan for graph ``g`` (already toposorted)."""
    plan = Plan()
    dot_order = [n.name for n in g.nodes if n.op in DOT]
    excluded = Matcher(exclude, dot_order)
    prec = Matcher(list(precision), dot_order)

    def bits_for(node) -> int:
        for p, b in precision.items():
            if prec.match(node, p):
                return int(b)
        return bits

    def add_act(t) -> None:
        plan.acts.setdefault(t.name, t)
        plan.ties.setdefault(t.name, t.name)

    def add_weight(node, t, axis, b) -> None:
        wp = plan.weights.get(t.name)
        if wp is None:
            wp = plan.weights[t.name] = WeightPlan(t, axis, b)
        elif wp.axis != axis:
            wp.axis = None           # readers disagree on the channel axis: per tensor
        wp.bits = max(wp.bits, b)
        wp.readers.append(node)

    def out_tensor(node):
        """The tensor that carries ``node``'s quantized output: a sole ReLU/Clip reader's output when
        it can be absorbed, else the node's own output."""
        y = node.outputs[0]
        readers = ir.consumers(y)
        if absorb and len(readers) == 1 and not ir.is_graph_output(g, y) and readers[0].op in ABSORBABLE:
            r = readers[0]
            bounds = clip_bounds(r)
            if not excluded.any(r) and bounds is not None and bounds[0] <= 0.0 and r.outputs[0].name:
                plan.absorbed[r.outputs[0].name] = r
                return r.outputs[0]
        return y

    for node in g.nodes:
        op = node.op
        if op not in QUANTIZABLE or not node.outputs:
            continue
        if excluded.any(node):
            plan.skip(node, "excluded")
            continue
        if op in DOT:
            _plan_dot(plan, g, node, granularity, bits_for(node), add_act, add_weight, out_tensor, weight_only)
        elif weight_only:
            continue
        elif op in BINARY:
            ins = [t for t in node.inputs]
            if not all(_is_float(t) for t in ins) or not _is_float(node.outputs[0]):
                plan.skip(node, "not_float")
                continue
            if not any(_is_act(t) for t in ins):
                plan.skip(node, "constant_inputs")
                continue
            for t in ins:
                if _is_act(t):
                    add_act(t)
                elif isinstance(t, ir.Constant):
                    add_weight(node, t, None, 8)
            add_act(out_tensor(node))
            plan.nodes.append(node)
        elif op == "Concat":
            if not all(_is_float(t) for t in node.inputs):
                plan.skip(node, "not_float")
                continue
            if not all(_is_act(t) for t in node.inputs):
                plan.skip(node, "concat_constant_input")
                continue
            y = node.outputs[0]
            add_act(y)
            for t in node.inputs:
                add_act(t)
                plan.tie(y.name, t.name)
            plan.nodes.append(node)
        elif op in OWN_SCALE:
            if not _is_act(node.inputs[0]):
                plan.skip(node, "input_not_activation")
                continue
            add_act(node.inputs[0])
            add_act(out_tensor(node) if op not in ("Softmax",) else node.outputs[0])
            plan.nodes.append(node)
    if not weight_only:
        _propagate_tied(plan, g, excluded)
    return plan


def _plan_dot(plan, g, node, granularity, b, add_act, add_weight, out_tensor, weight_only) -> None:
    op = node.op
    ins = node.inputs
    if op == "Gemm" and (node.attrs.get("transA", 0) or len(ins) < 2):
        plan.skip(node, "gemm_transA")
        return
    a, w = ins[0], ins[1]
    if op == "MatMul" and isinstance(a, ir.Constant) and _is_act(w):
        a, w = w, a      # constant on the left: quantized per tensor
        axis = None
    elif isinstance(w, ir.Constant):
        axis = weight_axis(node, granularity, w.values)
    elif _from_constants(w) or (op == "MatMul" and _from_constants(a)):
        plan.skip(node, "weight_from_constant_subgraph")   # e.g. Transpose(initializer): run 'cleanup' first
        return
    elif op == "MatMul" and _is_act(w) and _is_act(a):
        if weight_only:
            plan.skip(node, "no_constant_weight")
            return
        add_act(a)
        add_act(w)
        add_act(out_tensor(node))
        plan.nodes.append(node)
        return
    else:
        plan.skip(node, "weight_not_constant")
        return
    if not _is_float(w) or not (_is_act(a) or weight_only):
        plan.skip(node, "not_float")
        return
    add_weight(node, w, axis, b)
    plan.nodes.append(node)
    if weight_only:
        return
    add_act(a)
    if op in BIASED_LAYER_OPS and input_at(node, 2) is not None:
        bias = ins[2]
        ok = isinstance(bias, ir.Constant) and bias.values.ndim == 1 and (
            op != "Gemm" or (float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0))
        if ok:
            plan.biases.append((node, bias, a.name, w.name))
    add_act(out_tensor(node))


def _propagate_tied(plan: Plan, g: ir.Graph, excluded: Matcher) -> None:
    """Data-movement ops whose input is quantized pass the scale on; a Gather on a constant table
    passes the table's."""
    for node in g.nodes:
        if node.op not in TIED + ("Gather",) or not node.outputs or excluded.any(node):
            continue
        x = node.inputs[0]
        outs = [o for o in node.outputs if o.name and _is_float(o)]
        if node.op == "Gather" and isinstance(x, ir.Constant):
            if not _is_float(x) or not outs:
                continue
            plan.weights.setdefault(x.name, WeightPlan(x, None, 8)).readers.append(node)
            for o in outs:
                plan.acts.setdefault(o.name, o)
                plan.ties.setdefault(o.name, o.name)
                plan.fixed[o.name] = x.name
            plan.nodes.append(node)
            continue
        if x.name not in plan.acts or not outs:
            continue
        if node.op == "Pad" and not pads_with_zero(node):
            plan.skip(node, "pad_value_not_zero")
            continue
        for o in outs:
            plan.acts.setdefault(o.name, o)
            plan.ties.setdefault(o.name, o.name)
            plan.tie(x.name, o.name)
            if node.op in SUBSET_RANGE:
                plan.derived.add(o.name)     # no need to observe: the input's range covers it
        plan.nodes.append(node)


def _from_constants(t, depth: int = 4) -> bool:
    """``t`` is computed from constants only (a subgraph ``cleanup`` would fold)."""
    if isinstance(t, ir.Constant) or ir.const(t) is not None:
        return True
    node = ir.producer(t)
    if node is None or depth == 0 or not node.inputs:
        return False
    return all(_from_constants(i, depth - 1) for i in node.inputs if i.name)
