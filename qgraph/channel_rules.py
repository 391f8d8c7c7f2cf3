"""The per-op rules of the channel view: how each ONNX op ties its tensors' channels.

``Rules`` walks a graph in topological order; for every tensor it decides the channel axis (layers
define it: axis 1 for Conv/Gemm, the last axis for MatMul; other ops carry it through), and for every
op it returns a ``Coupling``: atom pairs (channel i of tensor a is channel j of tensor b), balance
constraints (a grouped convolution needs every group to lose as many channels) and the tensors it
freezes, with the reason. ``qgraph.channels`` turns these into the networkx view and the groups.

Shape arithmetic on constants (EfficientNet's padding computed from Shape(const)) is not data:
``static_tensors`` finds it, ``ConstEval`` evaluates it, ``resolve_static`` writes it back as
initializers (for passes that rewrite shapes), ``refresh_shapes`` re-runs shape inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.ops import LAYER_OPS, input_at
from qgraph.static import ConstEval, known_shape, static_tensors

#: ops whose output is the input, channel by channel (extra inputs are scalars or attributes)
PASS_THROUGH = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "Mish", "ThresholdedRelu", "Sin", "Cos",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "BatchNormalization", "InstanceNormalization", "Pad", "Resize", "Upsample", "Not", "IsNaN",
})
#: n-ary elementwise ops with numpy broadcasting
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where",
                         "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor"})
#: ops that only move elements: channel positions are followed through their shapes
MOVEMENT = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
#: ops that normalize over an axis: fine unless that axis is the channel axis
AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax", "LpNormalization"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                        "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"})
#: known ops whose output channels mix the input channels: not separable
MIXING = {"LRN": "normalizes_across_channels", "LayerNormalization": "normalizes_across_channels",
          "GroupNormalization": "normalizes_across_channels", "DepthToSpace": "moves_channels",
          "SpaceToDepth": "moves_channels"}



@dataclass
class Coupling:
    """What one op says about channels: atom pairs between two of its tensors, balance constraints
    (every class of ``labels`` must lose as many channels), and tensors it freezes (with why)."""
    pairs: list = field(default_factory=list)      # (tensor a, idx a, tensor b, idx b)
    balance: list = field(default_factory=list)    # (tensor, labels per channel, node name)
    freeze: list = field(default_factory=list)     # (tensor, reason)
    rule: str = ""


def is_const(t) -> bool:
    """A constant (initializer or Constant node), judged without reading its values."""
    if t is None:
        return False
    if isinstance(t, ir.Constant):
        return True
    p = ir.producer(t)
    return p is not None and p.op == "Constant"


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= int(d)
    return out


class Rules:
    """Walks the graph in topological order, deciding each tensor's channel axis and each op's coupling."""

    def __init__(self, g):
        self.g = g
        self.axis: dict[str, int | None] = {}
        self.couplings: dict[int, Coupling] = {}
        self.const = ConstEval(g)

    # -- helpers --------------------------------------------------------------------------

    def channels(self, t) -> int | None:
        a = self.axis.get(t.name)
        shp = known_shape(t)
        if a is None or shp is None or a >= len(shp):
            return None
        return shp[a]

    def carries(self, t) -> bool:
        return t is not None and t.name and not is_const(t) and self.channels(t) is not None

    def freeze_all(self, node, c: Coupling, reason: str) -> Coupling:
        for t in list(node.inputs) + list(node.outputs):
            if t is not None and t.name and not is_const(t):
                c.freeze.append((t, reason))
        return c

    def default_axes(self, node) -> None:
        for o in node.outputs:
            shp = known_shape(o)
            self.axis[o.name] = 1 if shp is not None and len(shp) >= 2 else None

    # -- walk -----------------------------------------------------------------------------

    def run(self) -> None:
        for t in self.g.inputs:
            shp = known_shape(t)
            self.axis[t.name] = 1 if shp is not None and len(shp) >= 2 else None
        self.static = static_tensors(self.g)
        for i, node in enumerate(self.g.nodes):
            if not node.outputs or not node.inputs:     # disconnected by a pass, not yet cleaned up
                self.couplings[i] = Coupling(rule="removed")
                continue
            if all(o.name in self.static for o in node.outputs):
                for o in node.outputs:          # shape arithmetic on constants: no channels here
                    self.axis[o.name] = None
                self.couplings[i] = Coupling(rule="constant")
                continue
            c = self.rule(node)
            for o in node.outputs:
                self.axis.setdefault(o.name, None)
            self.couplings[i] = c
        self.shared_weights()

    def shared_weights(self) -> None:
        """Layers reading one weight must keep the same rows and columns: tie their outputs and inputs."""
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.g.nodes):
            if node.op in LAYER_OPS and len(node.inputs) > 1 and is_const(node.inputs[1]):
                readers.setdefault(node.inputs[1].name, []).append(i)
        for idx in readers.values():
            if len(idx) < 2:
                continue
            first = self.g.nodes[idx[0]]
            for i in idx[1:]:
                node, c = self.g.nodes[i], self.couplings[i]
                if node.op != first.op or node.attrs != first.attrs:
                    self.freeze_all(node, c, "weight_shared")
                    self.freeze_all(first, self.couplings[idx[0]], "weight_shared")
                    continue
                for a, b in ((first.inputs[0], node.inputs[0]), (first.outputs[0], node.outputs[0])):
                    n = self.channels(a)
                    if n is None or self.channels(b) != n:
                        self.freeze_all(node, c, "weight_shared")
                        break
                    c.pairs.append((a, np.arange(n), b, np.arange(n)))

    def rule(self, node) -> Coupling:
        op = node.op
        if node.domain not in ("", "ai.onnx", None):
            self.default_axes(node)
            return self.freeze_all(node, Coupling(rule="unknown"), f"unknown_op:{op}")
        if op in LAYER_OPS:
            return self.layer(node)
        if op in PASS_THROUGH:
            return self.pass_through(node)
        if op in ELEMENTWISE:
            return self.elementwise(node)
        if op == "Concat":
            return self.concat(node)
        if op in ("Split", "Slice"):
            return self.split(node) if op == "Split" else self.slice(node)
        if op in MOVEMENT:
            return self.movement(node)
        if op in AXIS_OPS or op in REDUCE_OPS:
            return self.along_axis(node)
        if op == "Shape":
            return self.shape(node)
        self.default_axes(node)
        return self.freeze_all(node, Coupling(rule="unknown"), MIXING.get(op, "unknown_op") + f":{op}")

    # -- layers ---------------------------------------------------------------------------

    def layer(self, node) -> Coupling:
        c = Coupling(rule="layer")
        x, y = node.inputs[0], node.outputs[0]
        w = node.inputs[1] if len(node.inputs) > 1 and is_const(node.inputs[1]) else None
        op = node.op
        rank_y = len(known_shape(y)) if known_shape(y) is not None else None
        self.axis[y.name] = (rank_y - 1 if op == "MatMul" else 1) if rank_y else None
        if w is None:
            if op == "MatMul" and not is_const(node.inputs[0]):
                return self.freeze_all(node, c, "matmul_of_activations")
            return self.freeze_all(node, c, "weight_not_constant")
        if op == "Gemm" and node.attrs.get("transA", 0):
            c.freeze.append((x, "gemm_transA"))
        if op == "MatMul" and len(w.shape) != 2:
            return self.freeze_all(node, c, "matmul_batched_weight")
        want = (len(known_shape(x)) - 1 if op == "MatMul" and known_shape(x) is not None else 1)
        if self.axis.get(x.name) != want:
            c.freeze.append((x, f"axis_mismatch:{op}"))
        bias = input_at(node, 2) if op != "MatMul" else None
        if bias is not None and not is_const(bias):
            c.freeze.append((y, "bias_not_constant"))
        if op == "Gemm" and bias is not None:
            b = bias.shape if is_const(bias) else None
            if b is not None and len(b) == 2 and b[0] > 1:
                c.freeze.append((y, "gemm_bias_per_row"))
        groups = int(node.attrs.get("group", 1)) if op in ("Conv", "ConvTranspose") else 1
        if groups > 1:
            if op == "ConvTranspose":
                return self.freeze_all(node, c, "grouped_convtranspose")
            cin, cout = w.shape[1] * groups, w.shape[0]
            if self.channels(x) != cin or self.channels(y) != cout:
                return self.freeze_all(node, c, "unknown_shape")
            cpg_in, cpg_out = w.shape[1], cout // groups
            if cpg_in == 1:
                # depthwise (with multiplier m): input channel j feeds outputs j·m .. j·m+m-1 only
                o = np.arange(cout)
                c.pairs.append((y, o, x, o // cpg_out))
            else:
                c.balance.append((x, np.arange(cin) // cpg_in, node.name))
                c.balance.append((y, np.arange(cout) // cpg_out, node.name))
        return c

    # -- channel-preserving ops -----------------------------------------------------------

    def pass_through(self, node) -> Coupling:
        c = Coupling(rule="pass_through")
        x = node.inputs[0]
        a = self.axis.get(x.name)
        for k, o in enumerate(node.outputs):
            self.axis[o.name] = a if k == 0 else None
            if k > 0 and (o.outputs or ir.is_graph_output(self.g, o)):
                c.freeze.append((x, f"second_output_used:{node.op}"))
        y = node.outputs[0]
        if a is None or self.channels(x) is None:
            return c
        if node.op == "Pad" and not self._pad_keeps_channels(node, a, len(known_shape(x))):
            return self.freeze_all(node, c, "pads_channels")
        if node.op in ("Resize", "Upsample") and not self._resize_keeps_channels(node, a):
            return self.freeze_all(node, c, "resizes_channels")
        if self.channels(y) != self.channels(x):
            return self.freeze_all(node, c, f"unknown_shape:{node.op}")
        n = self.channels(x)
        c.pairs.append((x, np.arange(n), y, np.arange(n)))
        return c

    def _pad_keeps_channels(self, node, a: int, rank: int) -> bool:
        pads = node.attrs.get("pads") if "pads" in node.attrs else self.const(input_at(node, 1))
        if pads is None:
            return False
        pads = np.asarray(pads).reshape(-1)
        axes = self.const(input_at(node, 3)) if input_at(node, 3) is not None else None
        axes = list(range(rank)) if axes is None else [int(v) % rank for v in np.asarray(axes).reshape(-1)]
        if a not in axes:
            return True
        k = axes.index(a)
        return int(pads[k]) == 0 and int(pads[k + len(axes)]) == 0

    def _resize_keeps_channels(self, node, a: int) -> bool:
        """Resize keeps channels when its scale on the channel axis is 1, or its sizes name the
        channel count (rewritten when channels go)."""
        if node.op == "Upsample":
            scales = self.const(input_at(node, 1)) if input_at(node, 1) is not None else node.attrs.get("scales")
            return scales is not None and float(np.asarray(scales).reshape(-1)[a]) == 1.0
        sizes = self.const(input_at(node, 3)) if input_at(node, 3) is not None else None
        if sizes is not None and np.size(sizes):
            return input_at(node, 3) is not None and is_const(input_at(node, 3))
        scales = self.const(input_at(node, 2)) if input_at(node, 2) is not None else None
        return scales is not None and np.size(scales) > a and float(np.asarray(scales).reshape(-1)[a]) == 1.0

    def elementwise(self, node) -> Coupling:
        c = Coupling(rule="elementwise")
        y = node.outputs[0]
        ys = known_shape(y)
        live = [t for t in node.inputs if t is not None and t.name and not is_const(t)]
        if ys is None:
            self.axis[y.name] = None
            return self.freeze_all(node, c, "unknown_shape") if live else c
        r = len(ys)
        out_axis = None
        for t in live:
            a, ts = self.axis.get(t.name), known_shape(t)
            if a is not None and ts is not None and ts[a] is not None and ts[a] == ys[a + r - len(ts)] and ts[a] > 1:
                out_axis = a + r - len(ts)
                break
        self.axis[y.name] = out_axis if out_axis is not None else (1 if r >= 2 else None)
        if out_axis is None or ys[out_axis] is None:
            return c
        n = ys[out_axis]
        for t in live:
            ts = known_shape(t)
            k = out_axis - (r - len(ts)) if ts is not None else None
            if ts is None or k is None:
                c.freeze.append((y, "unknown_shape"))
                continue
            if k < 0 or ts[k] == 1:
                continue                      # broadcast along the channel axis: this input is free
            if self.axis.get(t.name) != k or ts[k] != n:
                c.freeze.append((t, "axis_mismatch"))
                c.freeze.append((y, "axis_mismatch"))
                continue
            c.pairs.append((t, np.arange(n), y, np.arange(n)))
        return c

    # -- joins and slices -----------------------------------------------------------------

    def concat(self, node) -> Coupling:
        c = Coupling(rule="concat")
        y = node.outputs[0]
        ys = known_shape(y)
        live = [t for t in node.inputs if not is_const(t)]
        a0 = self.axis.get(live[0].name) if live else None
        self.axis[y.name] = a0
        if ys is None or a0 is None:
            return self.freeze_all(node, c, "unknown_shape") if live else c
        cat = int(node.attrs.get("axis", 0)) % len(ys)
        if any(self.axis.get(t.name) != a0 for t in live):
            return self.freeze_all(node, c, "axis_mismatch")
        if cat != a0:
            for t in live:
                n = self.channels(t)
                if n is None or n != ys[a0]:
                    return self.freeze_all(node, c, "unknown_shape")
                c.pairs.append((t, np.arange(n), y, np.arange(n)))
            return c
        if len(live) != len(node.inputs):
            return self.freeze_all(node, c, "concat_with_constant")
        offset = 0
        for t in node.inputs:
            n = self.channels(t)
            if n is None:
                return self.freeze_all(node, c, "unknown_shape")
            c.pairs.append((t, np.arange(n), y, offset + np.arange(n)))
            offset += n
        if offset != ys[a0]:
            return self.freeze_all(node, c, "unknown_shape")
        return c

    def split(self, node) -> Coupling:
        c = Coupling(rule="split")
        x = node.inputs[0]
        a = self.axis.get(x.name)
        for o in node.outputs:
            self.axis[o.name] = a
        n = self.channels(x)
        if a is None or n is None:
            return c
        axis = int(node.attrs.get("axis", 0)) % len(known_shape(x))
        outs = [self.channels(o) for o in node.outputs]
        if any(v is None for v in outs):
            return self.freeze_all(node, c, "unknown_shape")
        if axis != a:
            for o in node.outputs:
                c.pairs.append((x, np.arange(n), o, np.arange(n)))
            return c
        offset = 0
        for o, m in zip(node.outputs, outs):
            c.pairs.append((x, offset + np.arange(m), o, np.arange(m)))
            offset += m
        if offset != n:
            return self.freeze_all(node, c, "unknown_shape")
        return c

    def slice(self, node) -> Coupling:
        c = Coupling(rule="slice")
        x, y = node.inputs[0], node.outputs[0]
        a = self.axis.get(x.name)
        self.axis[y.name] = a
        n, m = self.channels(x), self.channels(y)
        if a is None or n is None:
            return c
        if m is None:
            return self.freeze_all(node, c, "unknown_shape")
        rank = len(known_shape(x))
        starts, ends = self.const(input_at(node, 1)), self.const(input_at(node, 2))
        axes = self.const(input_at(node, 3)) if input_at(node, 3) is not None else np.arange(len(starts) if starts is not None else 0)
        steps = self.const(input_at(node, 4)) if input_at(node, 4) is not None else None
        if starts is None or ends is None or axes is None:
            return self.freeze_all(node, c, "slice_not_constant")
        axes = [int(v) % rank for v in np.asarray(axes).reshape(-1)]
        if a not in axes:
            c.pairs.append((x, np.arange(n), y, np.arange(n)))
            return c
        k = axes.index(a)
        step = int(np.asarray(steps).reshape(-1)[k]) if steps is not None else 1
        if step != 1:
            return self.freeze_all(node, c, "slice_step")
        start = int(np.asarray(starts).reshape(-1)[k])
        start = max(0, min(n, start + n if start < 0 else start))
        c.pairs.append((x, start + np.arange(m), y, np.arange(m)))
        return c

    # -- movement -------------------------------------------------------------------------

    def movement(self, node) -> Coupling:
        c = Coupling(rule="movement")
        x, y = node.inputs[0], node.outputs[0]
        a, n = self.axis.get(x.name), self.channels(x)
        self.axis[y.name] = None
        if a is None or n is None:
            self.default_axes(node)
            return c
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", range(len(known_shape(x)))[::-1]))
            self.axis[y.name] = perm.index(a)
            c.pairs.append((x, np.arange(n), y, np.arange(n)))
            return c
        found = reshape_map(known_shape(x), a, known_shape(y))
        if found is None:
            self.default_axes(node)
            return self.freeze_all(node, c, f"reshape_mixes_channels:{node.op}")
        out_axis, in_idx, out_idx = found
        self.axis[y.name] = out_axis
        if node.op == "Reshape" and not is_const(node.inputs[1]):
            entry = self._target_entry(node.inputs[1], out_axis)
            if entry is None or entry > 0 or entry == 0 and out_axis != a:
                return self.freeze_all(node, c, "reshape_target_not_constant")
        c.pairs.append((x, in_idx, y, out_idx))
        return c

    def _target_entry(self, t, k: int) -> int | None:
        """Entry ``k`` of a Reshape target computed at run time (``Concat(Shape(x)[0], [-1])``), when
        the piece holding it is a constant: -1 and 0 follow the channels, a number would not."""
        v = self.const(t)
        if v is not None:
            return int(np.asarray(v).reshape(-1)[k])
        node = ir.producer(t)
        if node is None or node.op != "Concat":
            return None
        start = 0
        for piece in node.inputs:
            shp = known_shape(piece)
            if shp is None or len(shp) != 1 or shp[0] is None:
                return None
            if start <= k < start + shp[0]:
                v = self.const(piece)
                return None if v is None else int(np.asarray(v).reshape(-1)[k - start])
            start += shp[0]
        return None

    def along_axis(self, node) -> Coupling:
        c = Coupling(rule="along_axis")
        x, y = node.inputs[0], node.outputs[0]
        a, n = self.axis.get(x.name), self.channels(x)
        self.axis[y.name] = a
        if a is None or n is None:
            return c
        rank = len(known_shape(x))
        if node.op in AXIS_OPS:
            axis = int(node.attrs.get("axis", -1)) % rank
            if axis == a:
                return self.freeze_all(node, c, f"normalizes_across_channels:{node.op}")
            c.pairs.append((x, np.arange(n), y, np.arange(n)))
            return c
        axes = node.attrs.get("axes")
        if axes is None and input_at(node, 1) is not None:
            axes = self.const(input_at(node, 1))
        if node.op in ("ArgMax", "ArgMin"):
            axes = [node.attrs.get("axis", 0)]
        axes = list(range(rank)) if axes is None or np.size(axes) == 0 else [int(v) % rank for v in np.asarray(axes).reshape(-1)]
        keep = int(node.attrs.get("keepdims", 1))
        if a in axes:
            return self.freeze_all(node, c, f"reduces_channels:{node.op}")
        out_axis = a if keep else a - sum(1 for v in axes if v < a)
        self.axis[y.name] = out_axis
        if self.channels(y) != n:
            return self.freeze_all(node, c, "unknown_shape")
        c.pairs.append((x, np.arange(n), y, np.arange(n)))
        return c

    def shape(self, node) -> Coupling:
        """Shape reads dimensions, not values: harmless unless a reader takes the channel dimension."""
        c = Coupling(rule="shape")
        x, y = node.inputs[0], node.outputs[0]
        self.axis[y.name] = None
        a = self.axis.get(x.name)
        if a is None or is_const(x):
            return c
        rank = len(known_shape(x)) if known_shape(x) is not None else None
        start = int(node.attrs.get("start", 0))
        for reader in ir.consumers(y):
            idx = self.const(input_at(reader, 1)) if reader.op == "Gather" else None
            if reader.op == "Gather" and idx is not None and rank is not None and \
                    a not in [(int(v) + start) % rank for v in np.asarray(idx).reshape(-1)]:
                continue
            c.freeze.append((x, "shape_read"))
            break
        return c


def reshape_map(xs: tuple | None, a: int, ys: tuple | None) -> tuple[int, np.ndarray, np.ndarray] | None:
    """How channel axis ``a`` of shape ``xs`` lands in shape ``ys`` (a reshape: row-major order kept).

    Returns (output channel axis, input channel ids, output channel ids) as atom pairs, or None when the
    channels mix with other dimensions in a way pruning cannot follow. The dims after ``a`` must be
    known (they are compared as suffix products, so a symbolic batch dimension does not matter):
      - the channel axis survives whole:        output axis b, channel c <-> c
      - it is split into (A, ..., B):           output axis of B, channel c <-> c mod B (same inner
                                                index in every outer slice: channel shuffle's rows)
      - it merges with neighbours into one axis: output feature f <-> channel (f // R) mod C, R the
                                                size of the merged dims after it (Flatten: a block)
    """
    if xs is None or ys is None or a >= len(xs):
        return None
    n = xs[a]
    post = _prod(xs[a + 1:])
    if n is None or post is None:
        return None
    suffix = [1] * (len(ys) + 1)
    for k in range(len(ys) - 1, -1, -1):
        d = ys[k]
        suffix[k] = None if d is None or suffix[k + 1] is None else suffix[k + 1] * d
    e = next((k for k in range(len(ys), -1, -1) if suffix[k] == post), None)
    if e is not None:
        b = next((k for k in range(e, -1, -1) if suffix[k] == post * n), None)
        if b is not None and b < e:
            inner = ys[e - 1]
            c = np.arange(n)
            return e - 1, c, c % inner
    for k in range(len(ys)):
        if suffix[k] is None or suffix[k + 1] is None or ys[k] is None:
            continue
        if suffix[k + 1] <= post and post % suffix[k + 1] == 0 and suffix[k] % (n * post) == 0:
            r = post // suffix[k + 1]
            f = np.arange(ys[k])
            return k, (f // r) % n, f
    return None
