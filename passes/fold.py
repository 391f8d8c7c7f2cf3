"""Fold BatchNormalization (and constant per-channel Mul/Add) into the producing layer.

In inference, BatchNormalization is a per-channel affine map (Ioffe & Szegedy 2015):

    y = γ (x − μ) / sqrt(σ² + ε) + β  =  a ⊙ x + b,   a = γ / sqrt(σ² + ε),   b = β − a μ

When x is the output of a layer that is linear in its weight, W x + c, with output channel c on
axis 1, the affine map goes into the layer: W' = a ⊙_out W, c' = a ⊙ c + b. The same holds for a
constant Mul (a, no b) or Add (b, no a) broadcast per output channel.

Where the output channel lives in each weight:
    Conv            W[Cout, Cin/g, k...]            scale rows
    ConvTranspose   W[Cin, Cout/g, k...]            channel o = group·(Cout/g) + j -> W[group block, j]
    Gemm            B[K, N] (transB=0), B[N, K] (1)  scale columns / rows; C folded with beta
    MatMul          W[K, N] (x[..., K] @ W), rank-2 output only (BN's channel axis 1 must be N)

A BatchNormalization with no layer before it (after a Concat or Add join, a pool, a graph input)
folds *forward* instead, into the one layer that reads it, W (a x + b) = (W a) x + W b:
    BN -> Conv/Gemm/MatMul          a scales the layer's input channels, W b joins its bias
                                    (Conv only without zero padding: padded zeros would see b)
    BN -> Relu -> Conv/Gemm/MatMul  with every a > 0, Relu(a x + b) = a Relu(x + b/a): a goes into
                                    the layer, b/a stays as one Add before the Relu; pools and
                                    Flatten between the Relu and the layer commute with a > 0
Constant per-channel Mul/Add right after such a BN join its (a, b) first. DenseNet's
Concat -> BN -> Relu -> Conv is the second form.
A BatchNormalization that cannot be folded either way stays in place and is reported with its
reason.
``fold`` keeps the folded BatchNorm statistics (γ, β as seen by the layer's output channels) in
``ctx.bn_stats[<layer output name>]`` for later passes (bias absorption, analytic bias
correction).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.ops import (CONV_OPS, JOIN_OPS, LAYER_OPS, MATRIX_LAYER_OPS, Skip, in_channels, input_at, out_channels,
                        per_channel_weight, weight_times_input)
from qgraph.patterns import Rule, apply_rules
from qgraph.pipeline import BNStats, Context, Pass, PassResult, option

FOLDABLE = LAYER_OPS
# backward-fold failures after which the BN may still fold into the layer that reads it
FORWARD_WHEN = ("bn_after_join", "not_after_layer", "producer_has_other_consumers", "bn_input_is_graph_input")
# a constant Mul/Add with no layer before it is ordinary arithmetic, not a miss
AFFINE_QUIET = ("not_after_layer", "bn_after_join", "not_constant_affine", "matmul_bias")


@dataclass
class FoldOptions:
    bn: bool = option(True, "fold BatchNormalization into the producing Conv/ConvTranspose/Gemm/MatMul")
    affine: bool = option(True, "fold a following constant per-channel Mul/Add into weight and bias")
    forward: bool = option(True, "a BatchNormalization with no layer before it folds into the layer after it "
                                 "(directly, or through a Relu when every scale is positive)")
    rest: str = option("keep", "a BatchNormalization that cannot be folded: keep it, or turn it into Mul+Add",
                       choices=("keep", "affine"))


# ----------------------------------------------------------------------------- bindings

@dataclass
class IntoLayer:
    """node (BN, Mul or Add) = a ⊙ layer(x) + b per output channel of ``layer``."""
    node: ir.Node
    layer: ir.Node
    a: np.ndarray | None
    b: np.ndarray | None
    matmul_bias: ir.Constant | None = None   # a MatMul's bias is the constant of the Add after it


@dataclass
class Forward:
    """bn [-> Mul/Add ...] [-> Relu -> pools/Flatten] -> layer: (a, b) into the layer's input side."""
    bn: ir.Node
    a: np.ndarray
    b: np.ndarray
    absorbed: list
    relu: ir.Node | None
    layer: ir.Node
    weight: np.ndarray                        # float64, the layer's weight before folding
    reach: np.ndarray                         # a as the layer's input channels see it (Flatten repeats it)
    rank: int | None
    matmul_bias: ir.Constant | None = None


@dataclass
class _Run:
    ctx: Context
    forms: Counter = field(default_factory=Counter)


# ----------------------------------------------------------------------------- the pass

class FoldBatchNorm(Pass):
    name = "fold"
    summary = "fold BatchNormalization and constant per-channel Mul/Add into Conv/ConvTranspose/Gemm/MatMul"
    options = FoldOptions
    tolerance = 1e-4   # float re-association of a·(Wx) vs (a·W)x; measured ~1e-6 on the zoo

    def rules(self) -> list[Rule]:
        """The rules this pass applies with its options, in the order they are tried."""
        o = self.opts
        rules = []
        if o.bn:
            rules.append(BN_INTO_LAYER)
        if o.affine:
            rules += [MUL_INTO_LAYER, ADD_INTO_LAYER]
        if o.bn and o.forward:
            rules.append(BN_FORWARD)
        return rules

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        resolved = _resolve_shaped_constants(g)
        run = _Run(ctx)
        # Conv -> Mul -> Add -> BN chains fold one step per sweep
        report = apply_rules(g, self.rules(), run, repeat=True)
        counts = Counter({"bn": report.fired["bn_into_layer"], "mul": report.fired["mul_into_layer"],
                          "add": report.fired["add_into_layer"]})
        counts.update({"forward_" + k: v for k, v in run.forms.items()})
        if self.opts.rest == "affine":
            counts["to_affine"] = _rest_to_affine(g)
        notes = {"folded": counts["bn"] + counts["forward_linear"] + counts["forward_relu"]}
        if counts["forward_linear"] or counts["forward_relu"]:
            # forward_relu leaves the shift b/a as an Add before the Relu
            notes["folded_forward"] = {"into_layer": counts["forward_linear"],
                                       "through_relu": counts["forward_relu"]}
        if counts["to_affine"]:
            notes["to_affine"] = counts["to_affine"]
        if counts["mul"] or counts["add"]:
            notes["folded_mul"], notes["folded_add"] = counts["mul"], counts["add"]
        if resolved:
            notes["constants_resolved"] = resolved
        if report.skipped:
            notes["skipped"] = dict(report.skipped)
            notes["details"] = report.details
        return PassResult(modified=sum(counts.values()) > 0, notes=notes)


# ----------------------------------------------------------------------------- backward: into the layer before

def _bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of an inference BatchNormalization: a = γ / sqrt(σ² + ε), b = β − a μ."""
    scale, beta, mean, var = (ir.const(t).astype(np.float64) for t in bn.inputs[1:5])
    a = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return a, beta - a * mean


def _check_bn(g: ir.Graph, bn) -> None:
    if len([o for o in bn.outputs if o.outputs or ir.is_graph_output(g, o)]) > 1:
        raise Skip("training_mode_bn", "running mean/var outputs are used")
    if ir.is_graph_input(g, bn.inputs[0]):
        raise Skip("bn_input_is_graph_input")
    if any(ir.const(t) is None for t in bn.inputs[1:5]):
        raise Skip("bn_params_not_constant")


def _layer_before(g: ir.Graph, x) -> tuple[ir.Node, ir.Constant | None]:
    """The layer whose output ``x`` is (and a MatMul's bias constant), or Skip with the reason."""
    layer = ir.producer(x)
    if layer is None:
        raise Skip("not_after_layer", "input is a graph input or constant")
    matmul_bias = None
    bias_add = _matmul_bias(layer)
    if bias_add is not None:  # MatMul -> Add(b) -> BN/Mul: the pair is the layer
        if len(ir.consumers(x)) != 1 or ir.is_graph_output(g, x):
            raise Skip("producer_has_other_consumers", f"Add '{layer.name}' output is also read elsewhere")
        matmul, matmul_bias = bias_add
        if len(ir.consumers(matmul_bias)) > 1:
            raise Skip("bias_shared", f"bias '{matmul_bias.name}' is used by several nodes")
        x, layer = matmul.outputs[0], matmul
    if layer.op not in FOLDABLE:
        reason = "bn_after_join" if layer.op in JOIN_OPS else "not_after_layer"
        raise Skip(reason, f"producer is {layer.op} '{layer.name}'")
    if len(ir.consumers(x)) != 1 or ir.is_graph_output(g, x):
        raise Skip("producer_has_other_consumers", f"{layer.op} '{layer.name}' output is also read elsewhere")
    w = input_at(layer, 1)
    if layer.op == "MatMul" and ir.const(w) is None:
        if ir.const(layer.inputs[0]) is not None:
            raise Skip("matmul_weight_on_left", f"MatMul '{layer.name}' has its constant as the first input")
        raise Skip("weight_not_constant", f"MatMul '{layer.name}'")
    if ir.const(w) is None:
        raise Skip("weight_not_constant", f"{layer.op} '{layer.name}'")
    if len(ir.consumers(w)) > 1:
        raise Skip("weight_shared", f"weight '{w.name}' is used by {len(ir.consumers(w))} nodes")
    bias = input_at(layer, 2)
    if bias is not None and ir.const(bias) is None:
        raise Skip("bias_not_constant", f"{layer.op} '{layer.name}'")
    if bias is not None and len(ir.consumers(bias)) > 1:
        raise Skip("bias_shared", f"bias '{bias.name}' is used by several nodes")
    if not np.issubdtype(ir.const(w).dtype, np.floating):
        raise Skip("weight_not_float", f"{layer.op} '{layer.name}' weight is {ir.const(w).dtype}")
    if layer.op == "MatMul":
        y_rank = _rank(layer, layer.outputs[0])
        if y_rank != 2:
            raise Skip("matmul_channel_axis", f"MatMul output rank {y_rank}: BN axis 1 is not the feature axis")
    return layer, matmul_bias


def _checked(layer, matmul_bias, node, a, b) -> IntoLayer:
    cout = out_channels(layer)
    for v in (a, b):
        if v is not None and v.shape != (cout,):
            raise Skip("channel_mismatch", f"{v.shape[0]} channels vs layer's {cout}")
    _bias(layer, cout, matmul_bias)            # a Gemm C that is not per channel is a Skip
    return IntoLayer(node, layer, a, b, matmul_bias)


def _match_bn(g: ir.Graph, bn, run: _Run) -> IntoLayer:
    _check_bn(g, bn)
    layer, matmul_bias = _layer_before(g, bn.inputs[0])
    a, b = _bn_affine(bn)
    return _checked(layer, matmul_bias, bn, a, b)


def _match_affine(g: ir.Graph, node, run: _Run) -> IntoLayer:
    """A Mul or Add of one constant that broadcasts per output channel of the layer before it."""
    if len(node.inputs) != 2 or sum(ir.const(t) is not None for t in node.inputs) != 1:
        raise Skip("not_constant_affine")
    if node.op == "Add" and _matmul_bias(node) is not None:
        raise Skip("matmul_bias", "MatMul + Add(b) is a layer with its bias")
    k = 1 if ir.const(node.inputs[1]) is not None else 0
    c, y = ir.const(node.inputs[k]), node.inputs[1 - k]
    layer, matmul_bias = _layer_before(g, y)
    vec = _per_channel(c, out_channels(layer), _rank(layer, y))
    if vec is None:
        raise Skip("not_per_channel", f"constant of shape {tuple(c.shape)} does not broadcast per output channel")
    if not np.issubdtype(c.dtype, np.floating):
        raise Skip("not_float")
    a, b = (vec, None) if node.op == "Mul" else (None, vec)
    return _checked(layer, matmul_bias, node, a, b)


def _fold_into_layer(g: ir.Graph, m: IntoLayer, run: _Run) -> None:
    """W' = a ⊙_out W, c' = a ⊙ c + b; the folded node is bypassed."""
    layer = m.layer
    w_t = layer.inputs[1]
    dtype = ir.const(w_t).dtype
    cout = out_channels(layer)
    w64 = ir.const(w_t).astype(np.float64)
    bias64 = _bias(layer, cout, m.matmul_bias)
    if m.a is not None:
        w64 = w64 * per_channel_weight(layer, m.a, w64.shape, "out")
        bias64 = bias64 * m.a
    if m.b is not None:
        bias64 = bias64 + m.b
    w_t.values = w64.astype(dtype)
    _set_bias(g, layer, bias64.astype(dtype), m.matmul_bias)
    node = m.node
    if node.op == "BatchNormalization":
        # BN output ~ N(β, γ²) per channel: what bias absorption and analytic bias correction need,
        # keyed by the tensor that now carries it
        run.ctx.bn_stats[layer.outputs[0].name] = BNStats(
            gamma=ir.const(node.inputs[1]).astype(np.float64).copy(),
            beta=ir.const(node.inputs[2]).astype(np.float64).copy())
    ir.bypass(g, node, in_index=0 if ir.const(node.inputs[0]) is None else 1)


BN_INTO_LAYER = Rule("bn_into_layer", ("BatchNormalization",), _match_bn, _fold_into_layer,
                     doc="Conv|ConvTranspose|Gemm|MatMul -> BN: a and b into weight and bias")
MUL_INTO_LAYER = Rule("mul_into_layer", ("Mul",), _match_affine, _fold_into_layer, quiet=AFFINE_QUIET,
                      doc="layer -> Mul(per-channel constant): into weight and bias")
ADD_INTO_LAYER = Rule("add_into_layer", ("Add",), _match_affine, _fold_into_layer, quiet=AFFINE_QUIET,
                      doc="layer -> Add(per-channel constant): into the bias")


# ----------------------------------------------------------------------------- forward: into the layer after

def _match_forward(g: ir.Graph, bn, run: _Run) -> Forward:
    """BN [-> Mul/Add] -> layer, or BN [-> Mul/Add] -> Relu [-> pools/Flatten] -> layer (every a > 0)."""
    _check_forward_bn(g, bn)
    a, b = _bn_affine(bn)
    c = a.size
    t, absorbed = bn.outputs[0], []
    rank = len(t.shape) if t.shape is not None else None
    while True:  # BN -> Mul(s) -> Add(t): one affine map
        readers = ir.consumers(t)
        if len(readers) != 1 or ir.is_graph_output(g, t):
            break
        r = readers[0]
        if r.op not in ("Mul", "Add") or len(r.inputs) != 2:
            break
        k = [ir.const(x) for x in r.inputs]
        if sum(v is not None for v in k) != 1:
            break
        v = k[0] if k[0] is not None else k[1]
        vec = _per_channel(v, c, rank) if np.issubdtype(v.dtype, np.floating) else None
        if vec is None:
            break
        a, b = (a * vec, b * vec) if r.op == "Mul" else (a, b + vec)
        absorbed.append(r)
        t = r.outputs[0]
    readers = ir.consumers(t)
    if len(readers) != 1 or ir.is_graph_output(g, t):
        raise Skip("several_readers", f"'{t.name}' is read by {len(readers)} nodes")
    relu = readers[0] if readers[0].op == "Relu" else None
    reach, layer_rank, x = a, rank, t  # the scale as the layer's input channels see it
    if relu is not None:
        if not np.all(a > 0):
            raise Skip("nonpositive_scale_before_relu", f"{int(np.sum(a <= 0))} of {c} channels")
        x = relu.outputs[0]
        while True:
            # a positive per-channel scale also commutes with pooling and with Flatten
            readers = ir.consumers(x)
            if len(readers) != 1 or ir.is_graph_output(g, x):
                raise Skip("several_readers", f"'{x.name}' is read by {len(readers)} nodes")
            r = readers[0]
            if r.op not in POSITIVE_COMMUTING or r.inputs[0] is not x:
                break
            if r.op == "Flatten":
                if int(r.attrs.get("axis", 1)) != 1 or x.shape is None or any(not isinstance(d, int) for d in x.shape[1:]):
                    raise Skip("flatten_shape", f"Flatten '{r.name}' on shape {x.shape}")
                reach = np.repeat(reach, int(np.prod(x.shape[2:], dtype=np.int64)))
                layer_rank = 2
            x = r.outputs[0]
    layer = readers[0]
    if layer.inputs[0] is not x:
        raise Skip("not_data_input", f"feeds {layer.op} '{layer.name}' as a weight")
    w, matmul_bias = _input_weight(layer, reach.size, layer_rank)
    if relu is None:
        if layer.op == "Conv" and (layer.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
                                   or any(layer.attrs.get("pads", []))):
            raise Skip("shift_into_padded_conv", f"Conv '{layer.name}' pads with zeros, which b would shift")
        _bias(layer, out_channels(layer), matmul_bias)
    return Forward(bn, a, b, absorbed, relu, layer, w, reach, rank, matmul_bias)


def _check_forward_bn(g: ir.Graph, bn) -> None:
    if len([o for o in bn.outputs if o.outputs or ir.is_graph_output(g, o)]) > 1:
        raise Skip("training_mode_bn", "running mean/var outputs are used")
    if any(ir.const(t) is None for t in bn.inputs[1:5]):
        raise Skip("bn_params_not_constant")


def _input_weight(layer, c: int, rank: int | None) -> tuple[np.ndarray, ir.Constant | None]:
    """The float64 weight of ``layer`` when its input channels are the BN's ``c`` (and a MatMul's
    bias constant), else Skip."""
    if layer.op not in MATRIX_LAYER_OPS:
        raise Skip("no_layer_after", f"reader is {layer.op} '{layer.name}'")
    w_t = input_at(layer, 1)
    w = ir.const(w_t)
    if w is None or not np.issubdtype(w.dtype, np.floating):
        raise Skip("weight_not_constant", f"{layer.op} '{layer.name}'")
    if len(ir.consumers(w_t)) > 1:
        raise Skip("weight_shared", f"weight '{w_t.name}' is used by {len(ir.consumers(w_t))} nodes")
    bias = input_at(layer, 2)
    if bias is not None and (ir.const(bias) is None or len(ir.consumers(bias)) > 1):
        raise Skip("bias_not_private", f"{layer.op} '{layer.name}'")
    if layer.op == "Gemm" and (layer.attrs.get("transA", 0) or rank != 2):
        raise Skip("unsupported_gemm", f"Gemm '{layer.name}' with transA or input rank {rank}")
    if layer.op == "MatMul" and (rank != 2 or w.ndim != 2):
        raise Skip("matmul_channel_axis", f"MatMul '{layer.name}': BN axis 1 is not its K axis")
    cin = in_channels(layer)
    if cin != c:
        raise Skip("channel_mismatch", f"{c} BN channels vs {cin} layer inputs")
    return w.astype(np.float64), (_matmul_bias_reader(layer) if layer.op == "MatMul" else None)


def _fold_forward(g: ir.Graph, m: Forward, run: _Run) -> None:
    """W' = W a (input side); without a Relu the shift W b joins the bias and the BN goes; with a
    Relu the BN becomes Add(b / a) before it: Relu(a x + b) = a Relu(x + b/a)."""
    layer, w = m.layer, m.weight
    dtype = ir.const(layer.inputs[1]).dtype
    layer.inputs[1].values = (w * per_channel_weight(layer, m.reach, w.shape, "in")).astype(dtype)
    for r in m.absorbed:
        ir.bypass(g, r, in_index=0 if ir.const(r.inputs[0]) is None else 1)
    bn = m.bn
    if m.relu is None:
        cout = out_channels(layer)
        shift = weight_times_input(layer, w, m.b)          # W b, summed over the input side
        if layer.op == "Gemm":
            shift = float(layer.attrs.get("alpha", 1.0)) * shift
        _set_bias(g, layer, (_bias(layer, cout, m.matmul_bias) + shift).astype(dtype), m.matmul_bias)
        ir.bypass(g, bn)
        run.forms["linear"] += 1
        return
    shape = (1, -1) + (1,) * (m.rank - 2)
    bn.op = "Add"
    bn.attrs.clear()
    x = bn.inputs[0]
    bn.inputs.clear()
    bn.inputs.extend([x, ir.add_const(g, bn.name + "_shift", (m.b / m.a).astype(dtype).reshape(shape))])
    while len(bn.outputs) > 1:
        bn.outputs.pop()
    run.forms["relu"] += 1


BN_FORWARD = Rule("forward", ("BatchNormalization",), _match_forward, _fold_forward, after=FORWARD_WHEN,
                  doc="BN with no layer before it -> [Relu ->] the layer after it")


# ----------------------------------------------------------------------------- what stays

def _rest_to_affine(g: ir.Graph) -> int:
    """BN left in place -> Mul(a) + Add(b) per channel: the same function, ops every runtime has."""
    done = 0
    for node in list(g.nodes):
        if node.op != "BatchNormalization" or not node.outputs:
            continue
        if any(ir.const(t) is None for t in node.inputs[1:5]):
            continue
        if len([o for o in node.outputs if o.outputs or ir.is_graph_output(g, o)]) > 1:
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank is None or rank < 2:
            continue
        a, b = _bn_affine(node)
        shape = (1, -1) + (1,) * (rank - 2)
        dtype = ir.const(node.inputs[1]).dtype
        y = node.outputs[0]
        mul_out = ir.Variable(ir.fresh_name(g, node.name + "_scaled"), dtype=y.dtype, shape=y.shape)
        g.nodes.append(ir.Node("Mul", name=ir.fresh_name(g, node.name + "_mul"),
                               inputs=[x, ir.add_const(g, node.name + "_a", a.astype(dtype).reshape(shape))],
                               outputs=[mul_out]))
        node.op = "Add"
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([mul_out, ir.add_const(g, node.name + "_b", b.astype(dtype).reshape(shape))])
        while len(node.outputs) > 1:  # unused running-stat outputs
            node.outputs.pop()
        done += 1
    return done


# ----------------------------------------------------------------------------- bias

def _bias(layer, cout: int, matmul_bias: ir.Constant | None = None) -> np.ndarray:
    """The layer's bias per output channel as float64 (zeros when it has none); Skip for a Gemm C
    that is not one value per output channel."""
    if layer.op == "MatMul":
        return ir.const(matmul_bias).astype(np.float64).reshape(cout) if matmul_bias is not None else np.zeros(cout)
    if input_at(layer, 2) is not None:
        c = ir.const(layer.inputs[2]).astype(np.float64)
        if layer.op == "Gemm":
            beta = float(layer.attrs.get("beta", 1.0))
            if c.ndim == 2 and c.shape[0] != 1:
                raise Skip("gemm_bias_per_row", f"Gemm '{layer.name}' C has shape {c.shape}")
            if c.size not in (1, cout):
                raise Skip("gemm_bias_shape", f"Gemm '{layer.name}'")
            c = np.broadcast_to(c.reshape(-1), (cout,)) * beta
        return np.array(c, dtype=np.float64).reshape(cout)
    return np.zeros(cout)


def _set_bias(g: ir.Graph, layer, bias: np.ndarray, matmul_bias: ir.Constant | None = None) -> None:
    if layer.op == "MatMul":
        # MatMul has no bias input: keep one Add after it (ORT fuses MatMul+Add into Gemm)
        if matmul_bias is not None:
            matmul_bias.values = bias.reshape(ir.const(matmul_bias).shape)
            return
        c = ir.add_const(g, layer.name + "_bias", bias)
        ir.splice(g, layer.outputs[0], "Add", extra_inputs=[c], name=layer.name + "_bias_add")
        return
    if layer.op == "Gemm":
        layer.attrs["beta"] = 1.0
    if input_at(layer, 2) is not None:
        layer.inputs[2].values = bias
    else:
        while len(layer.inputs) < 2:
            layer.inputs.append(ir.Variable.empty())
        c = ir.add_const(g, layer.name + "_bias", bias)
        if len(layer.inputs) == 2:
            layer.inputs.append(c)
        else:
            layer.inputs[2] = c


def _matmul_bias(node):
    """(MatMul, bias constant) when ``node`` is Add(MatMul(x, W), b) with constant W and b, else None."""
    if node.op != "Add" or len(node.inputs) != 2:
        return None
    consts = [t for t in node.inputs if ir.const(t) is not None]
    others = [t for t in node.inputs if ir.const(t) is None]
    if len(consts) != 1 or len(others) != 1:
        return None
    mm = ir.producer(others[0])
    if mm is None or mm.op != "MatMul" or ir.const(mm.inputs[1]) is None:
        return None
    if len(ir.consumers(others[0])) != 1:
        return None
    n = ir.const(mm.inputs[1]).shape[-1]
    c = ir.const(consts[0])
    if c.size != n or (c.ndim > 1 and any(d != 1 for d in c.shape[:-1])):
        return None
    return mm, consts[0]


POSITIVE_COMMUTING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten")
RESHAPING = ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten")


def _resolve_shaped_constants(g: ir.Graph) -> int:
    """Replace Unsqueeze/Squeeze/Reshape/Flatten/Identity of constants by their value, so a
    per-channel Mul/Add or BN parameter written as Unsqueeze(initializer) (Caffe2 exports) is seen
    as the constant it is. Returns how many nodes were resolved."""
    done = 0
    for node in list(g.nodes):
        if node.op not in RESHAPING or not node.outputs or len(node.outputs) != 1:
            continue
        vals = [ir.const(t) if t.name else None for t in node.inputs]
        if not vals or vals[0] is None or any(v is None for v, t in zip(vals[1:], node.inputs[1:]) if t.name):
            continue
        x = vals[0]
        if node.op == "Identity":
            y = x
        elif node.op == "Flatten":
            ax = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
            y = x.reshape(int(np.prod(x.shape[:ax])), -1)
        elif node.op == "Reshape":
            shape = [int(d) for d in vals[1]]
            if not node.attrs.get("allowzero", 0):
                shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            y = x.reshape(shape)
        else:
            axes = vals[1] if len(vals) > 1 and vals[1] is not None else node.attrs.get("axes")
            if node.op == "Unsqueeze":
                y = x
                rank = x.ndim + len(axes)
                for a in sorted(int(a) % rank for a in axes):
                    y = np.expand_dims(y, a)
            else:
                y = np.squeeze(x, axis=None if axes is None else tuple(int(a) % x.ndim for a in axes))
        ir.replace_uses(g, node.outputs[0], ir.add_const(g, node.outputs[0].name + "_value", y))
        node.inputs.clear()
        node.outputs.clear()
        done += 1
    return done


def _matmul_bias_reader(mm):
    """The bias constant of the Add that follows MatMul ``mm`` (MatMul + Add(b) is one layer), or None."""
    readers = ir.consumers(mm.outputs[0])
    if len(readers) == 1:
        pair = _matmul_bias(readers[0])
        if pair is not None and pair[0] is mm and len(ir.consumers(pair[1])) == 1:
            return pair[1]
    return None


def _rank(layer, y) -> int | None:
    if y is not None and y.shape is not None:
        return len(y.shape)
    if layer.op in CONV_OPS:
        return len(ir.const(layer.inputs[1]).shape)
    if layer.op == "Gemm":
        return 2
    return None


def _per_channel(c: np.ndarray, cout: int, rank: int | None) -> np.ndarray | None:
    """The per-channel vector of a constant broadcast against a [N, C, ...] output, else None."""
    if c.size == 1:
        return np.full(cout, float(c.reshape(-1)[0]))
    if rank is None:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if len(shape) != rank or rank < 2:
        return None
    if rank == 2:  # [N, C]: channel axis is the last
        ok = shape[0] == 1 and shape[1] in (1, cout)
    else:
        ok = shape[0] == 1 and shape[1] in (1, cout) and all(d == 1 for d in shape[2:])
    if not ok:
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (cout,)).copy()
