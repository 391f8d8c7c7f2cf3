"""Bias correction after quantization (Nagel et al. 2019, "Data-Free Quantization", §4.2).

Quantization moves the mean of each layer's output: E[ỹ] ≠ E[y]. Since a layer is linear in its bias,
adding the shift per output channel o to the bias puts the mean back:

    b_o ← b_o + (E[y_o] − E[ỹ_o])

``mode=empirical`` measures both means on the calibration data: E[y] on the float model as ``quant``
saw it, E[ỹ] on the QDQ model, layer by layer in topological order (a layer is measured after every
quantized layer upstream of it has been corrected, so the upstream error it sees is the final one).
Layers that do not depend on each other are measured in the same run.

What the next layer reads is not y but clip(y, lo, hi) when a Relu / Clip / Min / Max with constants
or a quantizer range follows (``target=activation``, the default): the mean to restore is then
E[clip(y)], and the shift solves E[clip(ỹ + δ)] = E[clip(y)] by one Newton step,

    δ = (E[clip(y)] − E[clip(ỹ)]) / P(lo < ỹ < hi)

(a channel inside its range less than ``MIN_ACTIVE`` of the time keeps its bias). Matching the raw mean
instead (``target=output``) shifts a mostly-dead channel by the error of its clipped-away mass, which
the next layer never sees: at 4 bits that took EfficientNet-Lite0 from 82.25 to 9.25 top-1.

``mode=analytic`` needs no data (DFQ §4.2): only the weight error is corrected,
E[ỹ] − E[y] = (W̃ − W)·E[x], with E[x] per input channel from the BatchNorm statistics ``fold`` kept for
the layer that produces x: its output is N(β, γ²) per channel, and after ReLU / ReLU6 / the Q range
[lo, hi] the clipped-normal mean is

    E[clip(y, lo, hi)] = μ(Φ(b) − Φ(a)) + σ(φ(a) − φ(b)) + lo·Φ(a) + hi·(1 − Φ(b)),  a = (lo−μ)/σ, b = (hi−μ)/σ

(padding at the borders is ignored, as in the paper). The int32 bias (scale s_x·s_w) and its float
record are updated together; a layer without a bias gets one. The float weights and the float model
come from ``ctx.quant`` (what ``quant`` recorded), the layers from the graph (``find_groups``).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.calibrate import progress_bar, stream
from qgraph.errors import QGraphError
from qgraph.pipeline import Context, Pass, PassResult, QuantRecord, option, quantized
from qgraph.ops import (INT32, MATRIX_LAYER_OPS, QGroup, Skip, bias_qparams, clip_bounds, const_at, dequantize,
                        find_groups, float_source, is_q, out_channels, qparams_of, weight_times_input)
from qgraph.qdq import dq_constant


@dataclass
class BiasCorrOptions:
    mode: str = option("empirical", "empirical (calibration data) or analytic (BatchNorm statistics, no data)",
                       choices=("empirical", "analytic"))
    samples: int = option(0, "calibration samples to use (0: all)", range=(0, 10**9))
    batch_size: int = option(16, "batch size of the measuring runs", range=(1, 4096))
    target: str = option("activation", "empirical mode: match the mean of what the next layer reads (the "
                         "output after the Relu/Clip/Min or quantizer range that follows it) or of the raw "
                         "layer output (DFQ's original)", choices=("activation", "output"))


class BiasCorrection(Pass):
    name = "biascorr"
    summary = "correct the per-channel output mean shift of quantized layers (empirical or analytic, DFQ)"
    options = BiasCorrOptions
    requires = (quantized,)
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        qstate = ctx.quant
        if qstate is None:
            raise QGraphError("needs the float weights that 'quant' records: run biascorr after 'quant' in "
                              "the same pipeline")
        skipped: Counter = Counter()
        layers = []
        for grp in find_groups(g, MATRIX_LAYER_OPS):
            reason = _unsupported(grp, qstate)
            if reason is not None:
                skipped[reason.reason] += 1
            else:
                layers.append(grp)
        if self.opts.mode == "empirical":
            shifts, runs = self._empirical(g, ctx, qstate, layers)
        else:
            shifts, runs = self._analytic(g, ctx, qstate, layers, skipped), 0
        notes = {"corrected": len(shifts), "runs": runs}
        if shifts:
            mags = [float(np.max(np.abs(s))) for s in shifts.values()]
            notes["max_shift"] = max(mags)
        if skipped:
            notes["skipped"] = dict(skipped)
        return PassResult(modified=bool(shifts), notes=notes)

    # -- empirical ------------------------------------------------------------------------

    def _empirical(self, g: ir.Graph, ctx: Context, qstate: QuantRecord, layers: list[QGroup]):
        if ctx.calib is None:
            raise QGraphError("mode=empirical needs calibration data: give --calib (CLI) or calib= (API), or "
                              "use biascorr:mode=analytic")
        samples = ctx.calib
        if self.opts.samples and self.opts.samples < len(samples):
            samples = samples.subset(range(self.opts.samples))
        float_names = {grp.node.outputs[0].name: _float_name(g, grp) for grp in layers}
        bounds = {}
        if self.opts.target == "activation":
            # what the next layer reads, clipped the same way on both sides (the activation chain and
            # the quantizer's range of the QDQ model): the two means differ only by quantization error
            bounds = {grp.node.outputs[0].name: b for grp in layers if (b := _output_bounds(g, grp)) is not None}
        by_float = _channel_stats(qstate.float_model, list(float_names.values()), samples,
                                  self.opts.batch_size, ctx.progress, "biascorr float",
                                  {float_names[q]: b for q, b in bounds.items()})
        float_stats = {q: by_float[f] for q, f in float_names.items()}
        shifts: dict[str, np.ndarray] = {}
        waves = _waves(g, layers)
        bar = progress_bar(len(waves), "biascorr", unit="layer") if ctx.progress else None
        for wave in waves:
            wanted = [grp.node.outputs[0].name for grp in wave]
            quant_stats = _channel_stats(_truncated(g, wanted), wanted, samples, self.opts.batch_size,
                                         False, "", {n: bounds[n] for n in wanted if n in bounds})
            for grp in wave:
                name = grp.node.outputs[0].name
                delta = _shift(float_stats[name], quant_stats[name])
                _add_to_bias(g, grp, delta)
                shifts[grp.node.name] = delta
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        runs = len(waves)
        return shifts, runs

    # -- analytic -------------------------------------------------------------------------

    def _analytic(self, g: ir.Graph, ctx: Context, qstate: QuantRecord, layers: list[QGroup], skipped: Counter):
        bn_stats = ctx.bn_stats
        shifts = {}
        for grp in layers:
            ex = _expected_input(grp, bn_stats)
            if isinstance(ex, Skip):
                skipped[ex.reason] += 1
                continue
            w_float = _float_weight(grp, qstate)
            w_quant = grp.weight_float()
            delta = -_apply_to_mean(grp, w_quant - w_float, ex)
            _add_to_bias(g, grp, delta)
            shifts[grp.node.name] = delta
        return shifts


# ----------------------------------------------------------------------------- helpers

def _unsupported(grp: QGroup, qstate: QuantRecord) -> Skip | None:
    if grp.w_dq is None or grp.w_index != 1:
        return Skip("weight_not_quantized_constant")
    if grp.node.op == "Gemm" and grp.node.attrs.get("transA", 0):
        return Skip("gemm_transA")
    if grp.node.op == "MatMul":
        return Skip("matmul_has_no_bias_input")
    if _float_weight(grp, qstate) is None:
        return Skip("float_weight_unknown")
    return None


def _float_weight(grp: QGroup, qstate: QuantRecord) -> np.ndarray | None:
    w = qstate.float_weights.get(grp.w_dq.outputs[0].name)
    return None if w is None else np.asarray(w, dtype=np.float64)


def _truncated(g: ir.Graph, outputs: list[str]):
    """The current model cut after ``outputs``: ORT runs every node of a model, wanted or not."""
    import onnx
    model = ir.to_model(g)
    keep_out = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs]
    needed, frontier = set(), list(outputs)
    producers = {o: node for node in model.graph.node for o in node.output}
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        frontier.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(nodes, model.graph.name, [i for i in model.graph.input if i.name in used],
                                   keep_out, [t for t in model.graph.initializer if t.name in used])
    cut = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    cut.ir_version = model.ir_version
    return cut


def _float_name(g: ir.Graph, grp: QGroup) -> str:
    """The layer output's name in the float model: a graph output's name moved to its DQ when quantized."""
    y = grp.node.outputs[0]
    if grp.y_q is not None:
        dq = [n for n in ir.consumers(grp.y_q.outputs[0]) if n.op == "DequantizeLinear"]
        if len(dq) == 1 and ir.is_graph_output(g, dq[0].outputs[0]):
            return dq[0].outputs[0].name
    return y.name


#: below this fraction of a channel's values inside its activation's linear range, the activation
#: mean says too little about the pre-activation shift: the channel is left as it is
MIN_ACTIVE = 0.05


def _output_bounds(g: ir.Graph, grp: QGroup) -> tuple[np.ndarray, np.ndarray] | None:
    """Per output channel (lo, hi) of what the readers of the layer's output see: the chain of Relu /
    Clip / Min / Max with constants that alone reads it, and the range of the quantizer at its end.
    None when nothing clips it (its raw output is what the next layer reads)."""
    w_shape = grp.weight_float().shape
    cout = out_channels(grp.node, w_shape)
    rank = 2 if grp.node.op == "Gemm" else len(w_shape)
    lo, hi = np.full(cout, -np.inf), np.full(cout, np.inf)
    t = grp.node.outputs[0]
    while True:
        readers = ir.consumers(t)
        if len(readers) != 1 or ir.is_graph_output(g, t):
            break
        r = readers[0]
        if r.op == "Relu":
            lo = np.maximum(lo, 0.0)
        elif r.op == "Clip":
            bounds = clip_bounds(r)
            if bounds is None:
                break
            lo, hi = np.maximum(lo, bounds[0]), np.minimum(hi, bounds[1])
        elif r.op in ("Min", "Max") and len(r.inputs) == 2:
            other = [i for i in r.inputs if i is not t]
            v = ir.const(other[0]) if len(other) == 1 else None
            if v is None or not _per_channel(v, cout, rank):
                break
            v = np.broadcast_to(v.reshape(-1).astype(np.float64), (cout,))
            if r.op == "Min":
                hi = np.minimum(hi, v)
            else:
                lo = np.maximum(lo, v)
        elif is_q(r):
            qlo, qhi = (np.asarray(v, np.float64) for v in qparams_of(r).real_range())
            if qlo.size in (1, cout):
                lo = np.maximum(lo, np.broadcast_to(qlo.reshape(-1), (cout,)))
                hi = np.minimum(hi, np.broadcast_to(qhi.reshape(-1), (cout,)))
            break
        else:
            break
        t = r.outputs[0]
    if np.all(np.isinf(lo)) and np.all(np.isinf(hi)):
        return None
    return lo, hi


def _per_channel(v: np.ndarray, cout: int, rank: int) -> bool:
    """v broadcasts against an [N, C, ...] output of ``rank`` dims as one value or one per channel."""
    if v.size == 1:
        return True
    shape = (1,) * (rank - v.ndim) + tuple(v.shape)
    return v.ndim <= rank and v.size == cout and shape[1] == cout


def _channel_stats(model, names: list[str], samples, batch_size: int, progress: bool, desc: str,
                   bounds: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel statistics (axis 1: Conv and Gemm outputs are [N, C, ...]) of ``names`` over the
    samples, streamed (sums and counts, no activations kept): "mean" of the value; for names with
    ``bounds`` (lo, hi) also "act", the mean of clip(value, lo, hi), and "active", the fraction of
    values strictly inside (lo, hi)."""
    bounds = bounds or {}
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, int] = {}
    for values in stream(model, names, samples, batch_size=batch_size, progress=progress, desc=desc):
        for n, v in values.items():
            v = np.moveaxis(np.asarray(v, dtype=np.float64), 1, 0)
            flat = v.reshape(v.shape[0], -1)
            acc = sums.setdefault(n, {})
            acc["mean"] = acc.get("mean", 0.0) + flat.sum(axis=1)
            if n in bounds:
                lo, hi = (b[:, None] for b in bounds[n])
                acc["act"] = acc.get("act", 0.0) + np.clip(flat, lo, hi).sum(axis=1)
                acc["active"] = acc.get("active", 0.0) + ((flat > lo) & (flat < hi)).sum(axis=1)
            counts[n] = counts.get(n, 0) + flat.shape[1]
    return {n: {k: v / counts[n] for k, v in sums[n].items()} for n in names}


def _shift(float_st: dict, quant_st: dict) -> np.ndarray:
    """The bias shift of one layer. Raw output: E[y] − E[ỹ]. Clipped output: one Newton step on
    E[clip(ỹ + δ)] = E[clip(y)], i.e. δ = (E[clip(y)] − E[clip(ỹ)]) / P(ỹ inside the range); a
    channel almost never inside its range (dead, or always saturated) is left alone."""
    if "act" not in quant_st:
        return float_st["mean"] - quant_st["mean"]
    p = quant_st["active"]
    return np.where(p >= MIN_ACTIVE, (float_st["act"] - quant_st["act"]) / np.maximum(p, MIN_ACTIVE), 0.0)


def _waves(g: ir.Graph, layers: list[QGroup]) -> list[list[QGroup]]:
    """Layers in rounds: a layer joins a round once every quantized layer upstream of it is in an earlier one."""
    index = {id(grp.node): i for i, grp in enumerate(layers)}
    upstream: dict[int, set[int]] = {}
    for node in g.nodes:  # topological order
        ups: set[int] = set()
        for t in node.inputs:
            p = ir.producer(t)
            if p is None:
                continue
            ups |= upstream.get(id(p), set())
            if id(p) in index:
                ups.add(index[id(p)])
        upstream[id(node)] = ups
    level: dict[int, int] = {}
    for i, grp in enumerate(layers):
        level[i] = 1 + max((level[j] for j in upstream.get(id(grp.node), ()) if j in level), default=-1)
    waves: dict[int, list[QGroup]] = {}
    for i, grp in enumerate(layers):
        waves.setdefault(level[i], []).append(grp)
    return [waves[k] for k in sorted(waves)]


def _add_to_bias(g: ir.Graph, grp: QGroup, delta: np.ndarray) -> None:
    """b ← b + delta (float), stored as int32 with the bias's scale s_x·s_w; a missing bias is created."""
    node = grp.node
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    b_dq = grp.b_dq
    float_bias = node.inputs[2] if const_at(node, 2) is not None else None
    if b_dq is not None:
        qp = qparams_of(b_dq)
        current = dequantize(ir.const(b_dq.inputs[0]).astype(np.int64), qp).astype(np.float64)
        new = current + delta.reshape(current.shape) / beta
        scale = np.broadcast_to(qp.scale.astype(np.float64), new.shape)
        b_dq.inputs[0].values = np.clip(np.rint(new / scale), *INT32).astype(np.int32)
    elif float_bias is not None:  # weight-only quantization: the bias stayed float
        current = np.broadcast_to(ir.const(float_bias).astype(np.float64).reshape(-1), delta.shape)
        new = current + delta / beta
        float_bias.values = new.astype(np.float32)
    elif grp.x_dq is None:
        new = delta / beta
        while len(node.inputs) < 2:
            node.inputs.append(ir.Variable.empty())
        node.inputs.append(ir.add_const(g, node.name + "_bias", new.astype(np.float32)))
    else:
        s_x = qparams_of(grp.x_dq).scale.astype(np.float32)
        s_w = qparams_of(grp.w_dq).scale.astype(np.float32)
        s_b = np.broadcast_to(s_x * s_w, delta.shape).astype(np.float32)
        qp = bias_qparams(s_b)
        new = delta / beta
        q = np.clip(np.rint(new / s_b.astype(np.float64)), *INT32).astype(np.int32)
        _, out = dq_constant(g, q, qp, node.name + "_bias")
        while len(node.inputs) < 2:
            node.inputs.append(ir.Variable.empty())
        node.inputs.append(out)


def _apply_to_mean(grp: QGroup, dw: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """(ΔW)·E[x] per output channel for a constant per-channel input mean E[x] (borders ignored)."""
    return weight_times_input(grp.node, dw, ex)


def _expected_input(grp: QGroup, bn_stats: dict) -> np.ndarray | Skip:
    """E[x] per input channel of ``grp`` from the BN statistics of the layer producing x, or a reason."""
    if grp.x_dq is None:  # weight-only: the input is the float tensor itself
        lo, hi = -np.inf, np.inf
        t = grp.node.inputs[0]
    else:
        q = ir.producer(grp.x_dq.inputs[0])
        if not is_q(q):
            return Skip("input_not_from_quantize")
        lo, hi = (float(v) for v in qparams_of(q).real_range())
        t = float_source(grp.x_dq)
    bound = None
    while t is not None:
        p = ir.producer(t)
        if p is None:
            return Skip("input_is_graph_input")
        if t.name in bn_stats:
            st = bn_stats[t.name]
            hi_c = np.full(st.beta.shape, hi) if bound is None else np.minimum(bound, hi)
            return _clipped_normal_mean(st.beta, st.gamma, lo, hi_c)
        if p.op == "Relu":
            lo = max(lo, 0.0)
        elif p.op == "Clip":
            bounds = clip_bounds(p)
            if bounds is None:
                return Skip("input_mean_unknown")
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        elif p.op == "Min" and len(p.inputs) == 2 and const_at(p, 1) is not None:
            bound = const_at(p, 1).reshape(-1).astype(np.float64)
        elif p.op not in ("Identity", "Dropout"):
            return Skip("input_mean_unknown")
        t = p.inputs[0]
    return Skip("input_mean_unknown")


def _clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: float, hi) -> np.ndarray:
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.abs(np.asarray(sigma, np.float64)), 1e-12)
    hi = np.broadcast_to(np.asarray(hi, np.float64), mu.shape)
    phi = lambda z: np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)))
    a = (lo - mu) / sigma
    b = np.where(np.isinf(hi), np.inf, (hi - mu) / sigma)
    Pa, Pb = cdf(a), np.where(np.isinf(b), 1.0, cdf(np.where(np.isinf(b), 0, b)))
    pa, pb = phi(a), np.where(np.isinf(b), 0.0, phi(np.where(np.isinf(b), 0, b)))
    mean = mu * (Pb - Pa) + sigma * (pa - pb)
    if np.isfinite(lo):
        mean = mean + lo * Pa
    finite_hi = np.where(np.isinf(hi), 0.0, hi)
    mean = mean + finite_hi * (1 - Pb)
    return mean
