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
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.ops import JOIN_OPS, LAYER_OPS, MATRIX_LAYER_OPS, Skip, input_at, out_channels
from qgraph.pipeline import BNStats, Context, Pass, PassResult, option

FOLDABLE = LAYER_OPS
# backward-fold failures after which the BN may still fold into the layer that reads it
FORWARD_WHEN = ("bn_after_join", "not_after_layer", "producer_has_other_consumers", "bn_input_is_graph_input")


@dataclass
class FoldOptions:
    bn: bool = option(True, "fold BatchNormalization into the producing Conv/ConvTranspose/Gemm/MatMul")
    affine: bool = option(True, "fold a following constant per-channel Mul/Add into weight and bias")
    forward: bool = option(True, "a BatchNormalization with no layer before it folds into the layer after it "
                                 "(directly, or through a Relu when every scale is positive)")
    rest: str = option("keep", "a BatchNormalization that cannot be folded: keep it, or turn it into Mul+Add",
                       choices=("keep", "affine"))


class FoldBatchNorm(Pass):
    name = "fold"
    summary = "fold BatchNormalization and constant per-channel Mul/Add into Conv/ConvTranspose/Gemm/MatMul"
    options = FoldOptions
    tolerance = 1e-4   # float re-association of a·(Wx) vs (a·W)x; measured ~1e-6 on the zoo

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        counts: Counter = Counter()
        skipped: Counter = Counter()
        details: list[str] = []
        reported: dict[int, set] = {}        # a BN that stays is reported once, not once per sweep
        resolved = _resolve_shaped_constants(g)
        changed = True
        while changed:  # Conv -> Mul -> Add -> BN chains fold one step per sweep
            changed = False
            for node in list(g.nodes):
                if not node.outputs and not node.inputs:
                    continue  # removed earlier in this sweep
                kind = self._kind(node)
                if kind is None:
                    continue
                try:
                    layer = self._layer_for(g, node)
                    a, b = self._affine(g, node, kind)
                    self._fold_into(g, layer, a, b)
                except Skip as s:
                    if kind == "bn" and self.opts.forward and s.reason in FORWARD_WHEN:
                        try:
                            counts["forward_" + self._fold_forward(g, node)] += 1
                            changed = True
                            continue
                        except Skip as f:
                            s.detail = "; ".join(x for x in (s.detail, f"forward: {f.reason}"
                                                             + (f" ({f.detail})" if f.detail else "")) if x)
                    # a constant Mul/Add with no layer before it is ordinary arithmetic, not a miss
                    if kind == "bn" or s.reason not in ("not_after_layer", "bn_after_join"):
                        key = (kind, s.reason)
                        if key not in reported.setdefault(id(node), set()):
                            skipped[s.reason] += 1
                            details.append(f"{node.op} '{node.name}': {s.reason}" + (f" ({s.detail})" if s.detail else ""))
                            reported[id(node)].add(key)
                    continue
                gamma_beta = self._bn_gamma_beta(node) if kind == "bn" else None
                ir.bypass(g, node, in_index=0 if ir.const(node.inputs[0]) is None else 1)
                if gamma_beta is not None:
                    # BN output ~ N(β, γ²) per channel: what bias absorption and analytic bias
                    # correction need, keyed by the tensor that now carries it
                    ctx.bn_stats[layer.outputs[0].name] = BNStats(gamma=gamma_beta[0], beta=gamma_beta[1])
                counts[kind] += 1
                changed = True
        if self.opts.rest == "affine":
            counts["to_affine"] = self._rest_to_affine(g)
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
        if skipped:
            notes["skipped"] = dict(skipped)
            notes["details"] = details
        return PassResult(modified=sum(counts.values()) > 0, notes=notes)

    @staticmethod
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
            scale, bias, mean, var = (ir.const(t).astype(np.float64) for t in node.inputs[1:5])
            a = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            b = bias - a * mean
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

    @staticmethod
    def _bn_gamma_beta(node) -> tuple[np.ndarray, np.ndarray]:
        return (ir.const(node.inputs[1]).astype(np.float64).copy(),
                ir.const(node.inputs[2]).astype(np.float64).copy())

    def _kind(self, node) -> str | None:
        if node.op == "BatchNormalization" and self.opts.bn:
            return "bn"
        if node.op in ("Mul", "Add") and self.opts.affine and len(node.inputs) == 2:
            if sum(ir.const(t) is not None for t in node.inputs) == 1:
                if node.op == "Add" and _matmul_bias(node) is not None:
                    return None  # MatMul + Add(b) is a layer with its bias, nothing to fold
                return node.op.lower()
        return None

    # -- matching -------------------------------------------------------------------------

    def _layer_for(self, g: ir.Graph, node):
        """The layer whose output ``node`` rescales, or Skip with the reason."""
        x = node.inputs[0]
        if node.op in ("Mul", "Add") and ir.const(x) is not None:
            x = node.inputs[1]
        if node.op == "BatchNormalization":
            if len([o for o in node.outputs if o.outputs or ir.is_graph_output(g, o)]) > 1:
                raise Skip("training_mode_bn", "running mean/var outputs are used")
            if ir.is_graph_input(g, x):
                raise Skip("bn_input_is_graph_input")
            params = node.inputs[1:5]
            if any(ir.const(t) is None for t in params):
                raise Skip("bn_params_not_constant")
        layer = ir.producer(x)
        if layer is None:
            raise Skip("not_after_layer", "input is a graph input or constant")
        bias_add = _matmul_bias(layer)
        if bias_add is not None:  # MatMul -> Add(b) -> BN/Mul: the pair is the layer
            if len(ir.consumers(x)) != 1 or ir.is_graph_output(g, x):
                raise Skip("producer_has_other_consumers", f"Add '{layer.name}' output is also read elsewhere")
            matmul, c = bias_add
            if len(ir.consumers(c)) > 1:
                raise Skip("bias_shared", f"bias '{c.name}' is used by several nodes")
            x, layer = matmul.outputs[0], matmul
            layer.__dict__["_qgraph_bias"] = c
        if layer.op not in FOLDABLE:
            reason = "bn_after_join" if layer.op in JOIN_OPS else "not_after_layer"
            raise Skip(reason, f"producer is {layer.op} '{layer.name}'")
        if len(ir.consumers(x)) != 1 or ir.is_graph_output(g, x):
            raise Skip("producer_has_other_consumers", f"{layer.op} '{layer.name}' output is also read elsewhere")
        w = layer.inputs[1] if len(layer.inputs) > 1 else None
        if layer.op == "MatMul" and ir.const(w) is None:
            if ir.const(layer.inputs[0]) is not None:
                raise Skip("matmul_weight_on_left", f"MatMul '{layer.name}' has its constant as the first input")
            raise Skip("weight_not_constant", f"MatMul '{layer.name}'")
        if ir.const(w) is None:
            raise Skip("weight_not_constant", f"{layer.op} '{layer.name}'")
        if len(ir.consumers(w)) > 1:
            raise Skip("weight_shared", f"weight '{w.name}' is used by {len(ir.consumers(w))} nodes")
        if layer.op == "Gemm" and layer.attrs.get("transA", 0) not in (0, 1):
            raise Skip("unsupported_gemm")
        bias = input_at(layer, 2)
        if bias is not None and ir.const(bias) is None:
            raise Skip("bias_not_constant", f"{layer.op} '{layer.name}'")
        if bias is not None and len(ir.consumers(bias)) > 1:
            raise Skip("bias_shared", f"bias '{bias.name}' is used by several nodes")
        return layer

    def _affine(self, g: ir.Graph, node, kind: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(a, b) per output channel, either may be None (Mul has no b, Add no a)."""
        layer = ir.producer(node.inputs[0] if ir.const(node.inputs[0]) is None else node.inputs[1])
        cout = out_channels(layer)
        if kind == "bn":
            scale, bias, mean, var = (ir.const(t).astype(np.float64) for t in node.inputs[1:5])
            eps = float(node.attrs.get("epsilon", 1e-5))
            a = scale / np.sqrt(var + eps)
            return a, bias - a * mean
        c = ir.const(node.inputs[1]) if ir.const(node.inputs[1]) is not None else ir.const(node.inputs[0])
        y = node.inputs[0] if ir.const(node.inputs[0]) is None else node.inputs[1]
        vec = _per_channel(c, cout, _rank(layer, y))
        if vec is None:
            raise Skip("not_per_channel", f"constant of shape {tuple(c.shape)} does not broadcast per output channel")
        if not np.issubdtype(c.dtype, np.floating):
            raise Skip("not_float")
        return (vec, None) if kind == "mul" else (None, vec)

    # -- forward folding ------------------------------------------------------------------

    def _fold_forward(self, g: ir.Graph, bn) -> str:
        """Fold ``bn`` into the layer that reads it; "linear" or "relu" (which form), or Skip."""
        scale, beta, mean, var = (ir.const(t).astype(np.float64) for t in bn.inputs[1:5])
        a = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        b = beta - a * mean
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
        reach, layer_rank = a, rank  # the scale as the layer's input channels see it
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
        if layer.inputs[0] is not (x if relu is not None else t):
            raise Skip("not_data_input", f"feeds {layer.op} '{layer.name}' as a weight")
        w = self._input_weight(g, layer, reach.size, layer_rank)
        wa = w * _input_broadcast(layer, reach, w.shape)
        if relu is None:
            if layer.op == "Conv" and (layer.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
                                       or any(layer.attrs.get("pads", []))):
                raise Skip("shift_into_padded_conv", f"Conv '{layer.name}' pads with zeros, which b would shift")
            cout = out_channels(layer)
            shift = w * _input_broadcast(layer, b, w.shape)  # W b, summed over the input side
            if layer.op == "Conv":
                shift = shift.reshape(cout, -1).sum(axis=1)
            elif layer.op == "Gemm":
                shift = float(layer.attrs.get("alpha", 1.0)) * (shift.sum(axis=1) if layer.attrs.get("transB", 0)
                                                                 else shift.sum(axis=0))
            else:
                shift = shift.sum(axis=0)
            bias = self._bias(layer, cout) + shift
        dtype = ir.const(layer.inputs[1]).dtype
        layer.inputs[1].values = wa.astype(dtype)
        for r in absorbed:
            ir.bypass(g, r, in_index=0 if ir.const(r.inputs[0]) is None else 1)
        if relu is None:
            self._set_bias(g, layer, bias.astype(dtype))
            ir.bypass(g, bn)
            return "linear"
        shape = (1, -1) + (1,) * (rank - 2)
        bn.op = "Add"
        bn.attrs.clear()
        x = bn.inputs[0]
        bn.inputs.clear()
        bn.inputs.extend([x, ir.add_const(g, bn.name + "_shift", (b / a).astype(dtype).reshape(shape))])
        while len(bn.outputs) > 1:
            bn.outputs.pop()
        return "relu"

    @staticmethod
    def _input_weight(g: ir.Graph, layer, c: int, rank: int | None) -> np.ndarray:
        """The float64 weight of ``layer`` when its input channels are the BN's ``c``, else Skip."""
        if layer.op not in MATRIX_LAYER_OPS:
            raise Skip("no_layer_after", f"reader is {layer.op} '{layer.name}'")
        w_t = layer.inputs[1] if len(layer.inputs) > 1 else None
        w = ir.const(w_t)
        if w is None or not np.issubdtype(w.dtype, np.floating):
            raise Skip("weight_not_constant", f"{layer.op} '{layer.name}'")
        if len(ir.consumers(w_t)) > 1:
            raise Skip("weight_shared", f"weight '{w_t.name}' is used by {len(ir.consumers(w_t))} nodes")
        bias = input_at(layer, 2)
        if bias is not None and (ir.const(bias) is None or len(ir.consumers(bias)) > 1):
            raise Skip("bias_not_private", f"{layer.op} '{layer.name}'")
        if layer.op == "Conv":
            cin = w.shape[1] * int(layer.attrs.get("group", 1))
        elif layer.op == "Gemm":
            if layer.attrs.get("transA", 0) or rank != 2:
                raise Skip("unsupported_gemm", f"Gemm '{layer.name}' with transA or input rank {rank}")
            cin = w.shape[1] if layer.attrs.get("transB", 0) else w.shape[0]
        else:
            if rank != 2 or w.ndim != 2:
                raise Skip("matmul_channel_axis", f"MatMul '{layer.name}': BN axis 1 is not its K axis")
            cin = w.shape[0]
        if cin != c:
            raise Skip("channel_mismatch", f"{c} BN channels vs {cin} layer inputs")
        if layer.op == "MatMul":
            add = _matmul_bias_reader(layer)
            if add is not None:
                layer.__dict__["_qgraph_bias"] = add
        return w.astype(np.float64)

    # -- rewriting ------------------------------------------------------------------------

    def _fold_into(self, g: ir.Graph, layer, a: np.ndarray | None, b: np.ndarray | None) -> None:
        w_t = layer.inputs[1]
        w = ir.const(w_t)
        dtype = w.dtype
        if not np.issubdtype(dtype, np.floating):
            raise Skip("weight_not_float", f"{layer.op} '{layer.name}' weight is {dtype}")
        cout = out_channels(layer)
        for v in (a, b):
            if v is not None and v.shape != (cout,):
                raise Skip("channel_mismatch", f"{v.shape[0]} channels vs layer's {cout}")
        if layer.op == "MatMul":
            y_rank = _rank(layer, layer.outputs[0])
            if y_rank != 2:
                raise Skip("matmul_channel_axis", f"MatMul output rank {y_rank}: BN axis 1 is not the feature axis")
        w64 = w.astype(np.float64)
        bias64 = self._bias(layer, cout)
        if a is not None:
            w64 = w64 * _weight_broadcast(layer, a, w64.shape)
            bias64 = bias64 * a
        if b is not None:
            bias64 = bias64 + b
        w_t.values = w64.astype(dtype)
        self._set_bias(g, layer, bias64.astype(dtype))

    @staticmethod
    def _bias(layer, cout: int) -> np.ndarray:
        if layer.op == "MatMul":
            add = layer.__dict__.get("_qgraph_bias")
            return ir.const(add).astype(np.float64) if add is not None else np.zeros(cout)
        if input_at(layer, 2) is not None:
            c = ir.const(layer.inputs[2]).astype(np.float64)
            if layer.op == "Gemm":
                beta = float(layer.attrs.get("beta", 1.0))
                if c.ndim == 2 and c.shape[0] != 1:
                    raise Skip("gemm_bias_per_row", f"Gemm '{layer.name}' C has shape {c.shape}")
                c = np.broadcast_to(c.reshape(-1), (cout,)) * beta if c.size in (1, cout) else None
                if c is None:
                    raise Skip("gemm_bias_shape", f"Gemm '{layer.name}'")
            return np.array(c, dtype=np.float64).reshape(cout)
        return np.zeros(cout)

    @staticmethod
    def _set_bias(g: ir.Graph, layer, bias: np.ndarray) -> None:
        if layer.op == "MatMul":
            # MatMul has no bias input: keep one Add after it (ORT fuses MatMul+Add into Gemm)
            add_c = layer.__dict__.get("_qgraph_bias")
            if add_c is not None:
                add_c.values = bias.reshape(ir.const(add_c).shape)
                return
            c = ir.add_const(g, layer.name + "_bias", bias)
            ir.splice(g, layer.outputs[0], "Add", extra_inputs=[c], name=layer.name + "_bias_add")
            layer._qgraph_bias = c
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


def _input_broadcast(layer, a: np.ndarray, wshape: tuple) -> np.ndarray:
    """``a`` (one value per input channel) shaped to multiply the weight's input side."""
    if layer.op == "Conv":
        groups = int(layer.attrs.get("group", 1))
        cout, cpg = wshape[0], wshape[1]
        # W[o, j] reads input channel (o // (cout/groups)) * cpg + j
        idx = (np.arange(cout) // (cout // groups))[:, None] * cpg + np.arange(cpg)[None, :]
        return a[idx].reshape((cout, cpg) + (1,) * (len(wshape) - 2))
    if layer.op == "Gemm" and layer.attrs.get("transB", 0):
        return a.reshape(1, -1)
    return a.reshape(-1, 1)  # Gemm transB=0 and MatMul: W[K, N]


def _weight_broadcast(layer, a: np.ndarray, wshape: tuple) -> np.ndarray:
    """``a`` shaped to multiply the weight's output-channel axis."""
    if layer.op == "Conv":
        return a.reshape((-1,) + (1,) * (len(wshape) - 1))
    if layer.op == "ConvTranspose":
        groups = int(layer.attrs.get("group", 1))
        cin, cpg = wshape[0], wshape[1]
        # W[c_in, j] feeds output channel (c_in // (cin/groups)) * cpg + j
        grp = np.arange(cin) // (cin // groups)
        idx = grp[:, None] * cpg + np.arange(cpg)[None, :]
        return a[idx].reshape((cin, cpg) + (1,) * (len(wshape) - 2))
    if layer.op == "Gemm" and layer.attrs.get("transB", 0):
        return a.reshape(-1, 1)
    return a.reshape(1, -1)  # Gemm transB=0 and MatMul: W[K, N]


def _rank(layer, y) -> int | None:
    if y is not None and y.shape is not None:
        return len(y.shape)
    if layer.op in ("Conv", "ConvTranspose"):
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
