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

A BatchNormalization that cannot be folded stays in place and is reported with its reason.
``fold`` keeps the folded BatchNorm statistics (γ, β as seen by the layer's output channels) in
``ctx.state["bn_stats"][<layer output name>]`` for later passes (bias absorption, analytic bias
correction).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.pipeline import Context, Pass, PassResult, option

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Skip(Exception):
    """A rule that does not apply, with its reason (a short key) and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class FoldOptions:
    bn: bool = option(True, "fold BatchNormalization into the producing Conv/ConvTranspose/Gemm/MatMul")
    affine: bool = option(True, "fold a following constant per-channel Mul/Add into weight and bias")
    rest: str = option("keep", "a BatchNormalization that cannot be folded: keep it, or turn it into Mul+Add",
                       choices=("keep", "affine"))


class FoldBatchNorm(Pass):
    __doc__ = __doc__
    name = "fold"
    summary = "fold BatchNormalization and constant per-channel Mul/Add into Conv/ConvTranspose/Gemm/MatMul"
    options = FoldOptions
    tolerance = 1e-4   # float re-association of a·(Wx) vs (a·W)x; measured ~1e-6 on the zoo

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        counts: Counter = Counter()
        skipped: Counter = Counter()
        details: list[str] = []
        bn_stats = ctx.state.setdefault("bn_stats", {})
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
                    if kind == "bn" or s.reason != "not_after_layer":
                        key = (kind, s.reason)
                        if key not in self._reported(ctx, node):
                            skipped[s.reason] += 1
                            details.append(f"{node.op} '{node.name}': {s.reason}" + (f" ({s.detail})" if s.detail else ""))
                            self._reported(ctx, node).add(key)
                    continue
                gamma_beta = self._bn_gamma_beta(node) if kind == "bn" else None
                ir.bypass(g, node, in_index=0 if ir.const(node.inputs[0]) is None else 1)
                if gamma_beta is not None:
                    # BN output ~ N(β, γ²) per channel: what bias absorption and analytic bias
                    # correction need, keyed by the tensor that now carries it
                    bn_stats[layer.outputs[0].name] = {"gamma": gamma_beta[0], "beta": gamma_beta[1]}
                counts[kind] += 1
                changed = True
        ctx.state.pop("_fold_reported", None)
        if self.opts.rest == "affine":
            counts["to_affine"] = self._rest_to_affine(g)
        notes = {"folded": counts["bn"]}
        if counts["to_affine"]:
            notes["to_affine"] = counts["to_affine"]
        if counts["mul"] or counts["add"]:
            notes["folded_mul"], notes["folded_add"] = counts["mul"], counts["add"]
        if skipped:
            notes["skipped"] = dict(skipped)
            notes["details"] = details
        return PassResult(modified=sum(counts.values()) > 0, notes=notes)

    @staticmethod
    def _reported(ctx: Context, node) -> set:
        return ctx.state.setdefault("_fold_reported", {}).setdefault(id(node), set())

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
            reason = "bn_after_join" if layer.op in ("Add", "Sum", "Concat", "Mul", "Sub", "Max", "Min") else "not_after_layer"
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
        if len(layer.inputs) > 2 and layer.inputs[2].name and ir.const(layer.inputs[2]) is None:
            raise Skip("bias_not_constant", f"{layer.op} '{layer.name}'")
        if len(layer.inputs) > 2 and len(ir.consumers(layer.inputs[2])) > 1:
            raise Skip("bias_shared", f"bias '{layer.inputs[2].name}' is used by several nodes")
        return layer

    def _affine(self, g: ir.Graph, node, kind: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(a, b) per output channel, either may be None (Mul has no b, Add no a)."""
        layer = ir.producer(node.inputs[0] if ir.const(node.inputs[0]) is None else node.inputs[1])
        cout = _out_channels(layer)
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

    # -- rewriting ------------------------------------------------------------------------

    def _fold_into(self, g: ir.Graph, layer, a: np.ndarray | None, b: np.ndarray | None) -> None:
        w_t = layer.inputs[1]
        w = ir.const(w_t)
        dtype = w.dtype
        if not np.issubdtype(dtype, np.floating):
            raise Skip("weight_not_float", f"{layer.op} '{layer.name}' weight is {dtype}")
        cout = _out_channels(layer)
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
        if len(layer.inputs) > 2 and layer.inputs[2].name:
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
        if len(layer.inputs) > 2 and layer.inputs[2].name:
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


def _out_channels(layer) -> int:
    w = ir.const(layer.inputs[1])
    if layer.op == "Conv":
        return w.shape[0]
    if layer.op == "ConvTranspose":
        return w.shape[1] * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm":
        return w.shape[0] if layer.attrs.get("transB", 0) else w.shape[1]
    return w.shape[-1]  # MatMul


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
