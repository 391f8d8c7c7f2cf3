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
    Split, DepthToSpace, SpaceToDepth,    (Pad: only when it pads with 0 or edge/reflect copies;
    Identity, Pad, Dropout                Dropout: inference mode only, its data output; ORT removes
                                          it, and a Q -> DQ -> Q -> DQ of two scales left behind
                                          would be merged by its DoubleQDQPairsRemover into new ones)
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
from qgraph.ops import BIASED_LAYER_OPS, CLIP_OPS, LAYER_OPS, Skip, clip_bounds, input_at, out_axis, pads_with_zero
from qgraph.patterns import Rule, apply_rules

DOT = LAYER_OPS
BINARY = ("Add", "Mul")
OWN_SCALE = ("AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax")
TIED = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice", "Split",
        "DepthToSpace", "SpaceToDepth", "Identity", "Pad", "Dropout")
ABSORBABLE = CLIP_OPS
#: Tied ops whose output values are a subset of their input's (Resize may interpolate beyond: observed).
SUBSET_RANGE = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
                "DepthToSpace", "SpaceToDepth", "Identity", "Pad", "Dropout")
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
    skipped_nodes: list = field(default_factory=list)        # "op 'name': reason (detail)"

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
    if granularity != "channel" or (node.op == "MatMul" and len(w.shape) != 2):
        return None      # a batched MatMul weight has no single output-channel axis here
    return out_axis(node, len(w.shape))


@dataclass
class Placement:
    """What one node puts into the plan: activations to quantize, constants to store as integers
    (tensor, axis, bits), tensors tied to one scale, an int32 bias, and whether its output (through
    an absorbed ReLU/Clip) is quantized."""
    node: object
    acts: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    ties: list = field(default_factory=list)
    bias: tuple | None = None
    output: bool = True


@dataclass
class _Placing:
    """The state the placement rules share: the graph, the options, and the plan being built."""
    g: ir.Graph
    plan: Plan
    granularity: str
    bits: int
    precision: dict
    excluded: Matcher
    prec: Matcher
    absorb: bool
    weight_only: bool

    def bits_for(self, node) -> int:
        for p, b in self.precision.items():
            if self.prec.match(node, p):
                return int(b)
        return self.bits

    def add_act(self, t) -> None:
        self.plan.acts.setdefault(t.name, t)
        self.plan.ties.setdefault(t.name, t.name)

    def add_weight(self, node, t, axis, b) -> None:
        wp = self.plan.weights.get(t.name)
        if wp is None:
            wp = self.plan.weights[t.name] = WeightPlan(t, axis, b)
        elif wp.axis != axis:
            wp.axis = None           # readers disagree on the channel axis: per tensor
        wp.bits = max(wp.bits, b)
        wp.readers.append(node)

    def out_tensor(self, node):
        """The tensor that carries ``node``'s quantized output: a sole ReLU/Clip reader's output when
        it can be absorbed, else the node's own output."""
        y = node.outputs[0]
        readers = ir.consumers(y)
        if self.absorb and len(readers) == 1 and not ir.is_graph_output(self.g, y) and readers[0].op in ABSORBABLE:
            r = readers[0]
            bounds = clip_bounds(r)
            if not self.excluded.any(r) and bounds is not None and bounds[0] <= 0.0 and r.outputs[0].name:
                self.plan.absorbed[r.outputs[0].name] = r
                return r.outputs[0]
        return y


def _unless_excluded(match):
    def checked(g, node, st: _Placing):
        if not node.outputs:
            raise Skip("no_outputs")
        if st.excluded.any(node):
            raise Skip("excluded")
        return match(g, node, st)
    return checked


def _match_dot(g, node, st: _Placing) -> Placement:
    op, ins = node.op, node.inputs
    if op == "Gemm" and (node.attrs.get("transA", 0) or len(ins) < 2):
        raise Skip("gemm_transA")
    a, w = ins[0], ins[1]
    if op == "MatMul" and isinstance(a, ir.Constant) and _is_act(w):
        a, w = w, a      # constant on the left: quantized per tensor
        axis = None
    elif isinstance(w, ir.Constant):
        axis = weight_axis(node, st.granularity, w.values)
    elif _from_constants(w) or (op == "MatMul" and _from_constants(a)):
        raise Skip("weight_from_constant_subgraph", "e.g. Transpose(initializer): run 'cleanup' first")
    elif op == "MatMul" and _is_act(w) and _is_act(a):
        if st.weight_only:
            raise Skip("no_constant_weight")
        return Placement(node, acts=[a, w])
    else:
        raise Skip("weight_not_constant")
    if not _is_float(w) or not (_is_act(a) or st.weight_only):
        raise Skip("not_float")
    weights = [(w, axis, st.bits_for(node))]
    if st.weight_only:
        return Placement(node, weights=weights, output=False)
    bias = None
    if op in BIASED_LAYER_OPS and input_at(node, 2) is not None:
        b = ins[2]
        if isinstance(b, ir.Constant) and b.values.ndim == 1 and (
                op != "Gemm" or (float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0)):
            bias = (node, b, a.name, w.name)
    return Placement(node, acts=[a], weights=weights, bias=bias)


def _match_binary(g, node, st: _Placing) -> Placement:
    ins = list(node.inputs)
    if not all(_is_float(t) for t in ins) or not _is_float(node.outputs[0]):
        raise Skip("not_float")
    if not any(_is_act(t) for t in ins):
        raise Skip("constant_inputs")
    return Placement(node, acts=[t for t in ins if _is_act(t)],
                     weights=[(t, None, 8) for t in ins if not _is_act(t) and isinstance(t, ir.Constant)])


def _match_concat(g, node, st: _Placing) -> Placement:
    if not all(_is_float(t) for t in node.inputs):
        raise Skip("not_float")
    if not all(_is_act(t) for t in node.inputs):
        raise Skip("concat_constant_input")
    y = node.outputs[0]
    return Placement(node, acts=[y] + list(node.inputs), ties=[(y.name, t.name) for t in node.inputs], output=False)


def _match_own_scale(g, node, st: _Placing) -> Placement:
    if not _is_act(node.inputs[0]):
        raise Skip("input_not_activation")
    if node.op == "Softmax":      # its output is quantized as it is (nothing to absorb)
        return Placement(node, acts=[node.inputs[0], node.outputs[0]], output=False)
    return Placement(node, acts=[node.inputs[0]])


def _place(g, p: Placement, st: _Placing) -> None:
    for t, axis, b in p.weights:
        st.add_weight(p.node, t, axis, b)
    for t in p.acts:
        st.add_act(t)
    for x, y in p.ties:
        st.plan.tie(x, y)
    if p.bias is not None:
        st.plan.biases.append(p.bias)
    if p.output:
        st.add_act(st.out_tensor(p.node))
    st.plan.nodes.append(p.node)


def _match_tied(g, node, st: _Placing):
    """Data movement whose input is quantized passes the scale on; a Gather on a constant table
    passes the table's. Returns (node, input, outputs, is_table)."""
    if not node.outputs:
        raise Skip("no_outputs")
    if st.excluded.any(node):
        raise Skip("excluded")
    x = node.inputs[0]
    if node.op == "Dropout":         # inference: its data output is its input; the mask is not data
        training = input_at(node, 2)
        if training is not None and (not isinstance(training, ir.Constant) or bool(np.any(training.values))):
            raise Skip("training_mode_dropout")
    outs = [o for o in (node.outputs[:1] if node.op == "Dropout" else node.outputs) if o.name and _is_float(o)]
    if not outs:
        raise Skip("not_float")
    if node.op == "Gather" and isinstance(x, ir.Constant):
        if not _is_float(x):
            raise Skip("not_float")
        return node, x, outs, True
    if x.name not in st.plan.acts:
        raise Skip("input_not_quantized")
    if node.op == "Pad" and not pads_with_zero(node):
        raise Skip("pad_value_not_zero")
    return node, x, outs, False


def _tie(g, found, st: _Placing) -> None:
    node, x, outs, table = found
    plan = st.plan
    if table:
        plan.weights.setdefault(x.name, WeightPlan(x, None, 8)).readers.append(node)
    for o in outs:
        plan.acts.setdefault(o.name, o)
        plan.ties.setdefault(o.name, o.name)
        if table:
            plan.fixed[o.name] = x.name
        else:
            plan.tie(x.name, o.name)
            if node.op in SUBSET_RANGE:
                plan.derived.add(o.name)     # no need to observe: the input's range covers it
    plan.nodes.append(node)


#: The placement rules, tried in this order; the data-movement rule runs in a second sweep, once the
#: quantized tensors it propagates from are known.
LAYER = Rule("layer", DOT, _unless_excluded(_match_dot), _place, quiet=("no_outputs",),
             doc="Conv/ConvTranspose/Gemm/MatMul")
BINARY_RULE = Rule("binary", BINARY, _unless_excluded(_match_binary), _place, quiet=("no_outputs",),
                   doc="Add, Mul: every input")
CONCAT = Rule("concat", ("Concat",), _unless_excluded(_match_concat), _place, quiet=("no_outputs",),
              doc="Concat: one shared scale")
OWN = Rule("own_scale", OWN_SCALE, _unless_excluded(_match_own_scale), _place, quiet=("no_outputs",),
           doc="pools, Sigmoid, Softmax, ...")
TIED_RULE = Rule("tied", TIED + ("Gather",), _match_tied, _tie,
                 quiet=("input_not_quantized", "not_float", "no_outputs"),
                 doc="data movement takes its input's scale; Gather a constant table's")


def make_plan(g: ir.Graph, *, granularity: str, bits: int, precision: dict, exclude, absorb: bool,
              weight_only: bool) -> Plan:
    """The placement plan for graph ``g`` (already toposorted)."""
    plan = Plan()
    dot_order = [n.name for n in g.nodes if n.op in DOT]
    st = _Placing(g, plan, granularity, bits, precision, Matcher(exclude, dot_order),
                  Matcher(list(precision), dot_order), absorb, weight_only)
    rules = [LAYER] if weight_only else [LAYER, BINARY_RULE, CONCAT, OWN]
    report = apply_rules(g, rules, st)
    if not weight_only:
        apply_rules(g, [TIED_RULE], st, report=report)
    plan.skipped = dict(report.skipped)
    plan.skipped_nodes = report.details
    return plan


def _from_constants(t, depth: int = 4) -> bool:
    """``t`` is computed from constants only (a subgraph ``cleanup`` would fold)."""
    if isinstance(t, ir.Constant) or ir.const(t) is not None:
        return True
    node = ir.producer(t)
    if node is None or depth == 0 or not node.inputs:
        return False
    return all(_from_constants(i, depth - 1) for i in node.inputs if i.name)
