"""Bias correction after quantization (Nagel et al. 2019, "Data-Free Quantization", §4.2).

Quantization moves the mean of each layer's output: E[ỹ] ≠ E[y]. Since a layer is linear in its bias,
adding the shift per output channel o to the bias puts the mean back:

    b_o ← b_o + (E[y_o] − E[ỹ_o])

``mode=empirical`` measures both means on the calibration data: E[y] on the float model as ``quant``
saw it (one pass), E[ỹ] on the QDQ model, layer by layer in topological order: a layer is measured
after every quantized layer upstream of it has been corrected, so the upstream error it sees is the
final one. Layers of one depth level (a wave: every quantized layer upstream is in an earlier wave)
are measured together.

How the QDQ model is run (``qgraph.replay``), with lvl(node) = the latest wave upstream of it (its
own for a layer, -1 for none): run r measures wave r and, from the tensors run r−1 cached, computes

    cut(r−1) = { t : lvl(t) ≤ r−1 < lvl(some reader of t that leads to a layer) }

moved above each DequantizeLinear it comes out of (the integer tensor is cached, not the float one),
plus wave r's outputs, reduced in the graph to per-channel sums. Every tensor of cut(r−1) depends
only on waves ≤ r−1, corrected before run r, and the cut holds all that waves ≥ r read from the
nodes before it: run r+1 continues from it. So E[ỹ] is the same quantity as running the whole
corrected QDQ model up to wave r (what this pass did before, once per wave): the same nodes, in
ORT's same fused form (the cut sits between Q and DQ, which no QDQ fusion spans), on the same
batches. What changed is the cost: each node runs in one run, each layer in two (measured, then as
part of the next run), instead of the model up to it once per wave — O(depth × model) became O(2 ×
model + one float pass). The cut is kept per batch, in memory up to ``cache_mb`` and in temporary
files beyond it (int8 for a quantized model: ~1.2 MB per image at EfficientNet-Lite0's widest cut).

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
from qgraph.calibrate import ChannelSums, channel_means, progress_bar
from qgraph.errors import QGraphError
from qgraph.pipeline import Context, Pass, PassResult, QuantRecord, option, quantized
from qgraph.ops import (CLIP_OPS, INT32, MATRIX_LAYER_OPS, QGroup, Skip, bias_qparams, clip_bounds, const_at,
                        dequantize, find_groups, float_source, is_q, out_channels, output_quantizer, qparams_of,
                        weight_times_input)
from qgraph.qdq import dq_constant
from qgraph.replay import BatchCache, replay


@dataclass
class BiasCorrOptions:
    mode: str = option("empirical", "empirical (calibration data) or analytic (BatchNorm statistics, no data)",
                       choices=("empirical", "analytic"))
    samples: int = option(0, "calibration samples to use (0: all)", range=(0, 10**9))
    batch_size: int = option(4, "batch size of the measuring runs (memory: every layer output of a batch in "
                             "the float pass)", range=(1, 4096))
    cache_mb: float = option(512.0, "memory for the tensors cached between runs (per batch, all samples); "
                             "beyond it they go to temporary files", range=(0.0, 1e7))
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
        memory = {}
        if self.opts.mode == "empirical":
            shifts, runs, memory = self._empirical(g, ctx, qstate, layers)
        else:
            shifts, runs = self._analytic(g, ctx, qstate, layers, skipped), 0
        notes = {"corrected": len(shifts), "runs": runs, **memory}
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
        bs = self.opts.batch_size
        float_names = {grp.node.outputs[0].name: _float_name(g, grp) for grp in layers}
        bounds = {}
        if self.opts.target == "activation":
            # what the next layer reads, clipped the same way on both sides (the activation chain and
            # the quantizer's range of the QDQ model): the two means differ only by quantization error
            bounds = {grp.node.outputs[0].name: b for grp in layers if (b := _output_bounds(g, grp)) is not None}
        float_model = qstate.float_model      # one read of the model quant recorded, for this pass
        by_float = channel_means(float_model, list(float_names.values()), samples,
                                 bounds={float_names[q]: b for q, b in bounds.items()}, batch_size=bs,
                                 progress=ctx.progress, desc="biascorr: float means")
        float_stats = {q: by_float[f] for q, f in float_names.items()}
        shifts: dict[str, np.ndarray] = {}
        waves = _waves(g, layers)
        cuts = _cuts(g, waves)
        given = {t.name: np.dtype(t.dtype or np.float32) for t in g.inputs}   # read from the samples
        bar = progress_bar(len(waves), "biascorr", unit="wave") if ctx.progress else None
        with BatchCache(int(self.opts.cache_mb * 2**20)) as cache:
            for wave, cut in zip(waves, cuts):
                wanted = [grp.node.outputs[0].name for grp in wave]
                new = [t for t in cut if t not in given]
                sums = ChannelSums(wanted, {n: bounds[n] for n in wanted if n in bounds})
                seg = ir.segment(g, wanted + new, given)
                for values in replay(seg, samples, cache, keep=new, batch_size=bs, source=float_model):
                    sums.update(values)
                quant_stats = sums.result()
                for grp in wave:
                    name = grp.node.outputs[0].name
                    delta = _shift(float_stats[name], quant_stats[name])
                    _add_to_bias(g, grp, delta)
                    shifts[grp.node.name] = delta
                for n in [n for n in given if n not in cut]:
                    cache.drop(n)
                    del given[n]
                given.update((n, cache.dtypes[n]) for n in new)
                if bar is not None:
                    bar.update(1)
            memory = {"cached_mb": round(cache.peak_memory / 2**20, 3), "spilled_mb": round(cache.spilled / 2**20, 3)}
        if bar is not None:
            bar.close()
        return shifts, len(waves), memory

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


def _float_name(g: ir.Graph, grp: QGroup) -> str:
    """The layer output's name in the float model: a graph output's name moved to its DQ when quantized."""
    y = grp.node.outputs[0]
    q = grp.y_q
    if q is None:          # through a Clip to a narrow range (2-4-bit activations) or a kept Relu
        found = output_quantizer(g, grp.node, CLIP_OPS)
        q = None if isinstance(found, Skip) else found[0]
    if q is not None:
        dq = [n for n in ir.consumers(q.outputs[0]) if n.op == "DequantizeLinear"]
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


def _cuts(g: ir.Graph, waves: list[list[QGroup]]) -> list[list[str]]:
    """cuts[r]: the tensors run r caches for run r+1, i.e. cut(r−1) of the module docstring: computed
    from waves ≤ r−1 only, and read by a node of a later wave on the way to a layer. A tensor that a
    DequantizeLinear makes from an integer tensor is cached as that integer tensor; tensors computed
    from constants alone (a weight's DequantizeLinear, a bias about to change) are not data."""
    wave_of = {id(grp.node): k for k, wave in enumerate(waves) for grp in wave}
    level: dict[int, int] = {}
    data = {id(t) for t in g.inputs}                   # tensors that depend on the model's inputs
    for node in g.nodes:  # topological order
        ups = [level[id(p)] for t in node.inputs if (p := ir.producer(t)) is not None]
        level[id(node)] = max(ups + [wave_of.get(id(node), -1)])
        if any(id(t) in data for t in node.inputs):
            data.update(id(t) for t in node.outputs)
    leads: set[int] = set(wave_of)                     # nodes on the way to a measured layer
    for node in reversed(g.nodes):
        if any(id(c) in leads for t in node.outputs for c in ir.consumers(t)):
            leads.add(id(node))
    cuts: list[list[str]] = [[] for _ in waves]
    seen: set[int] = set()
    for t in [*g.inputs, *(t for n in g.nodes for t in n.outputs)]:
        if id(t) in seen or not t.name or id(t) not in data:
            continue
        seen.add(id(t))
        p = ir.producer(t)
        lvl = level[id(p)] if p is not None else -1
        last = max((level[id(c)] for c in ir.consumers(t) if id(c) in leads), default=-1)
        while p is not None and p.op == "DequantizeLinear" and ir.const(p.inputs[0]) is None:
            t = p.inputs[0]
            p = ir.producer(t)
        for m in range(lvl, last):     # t in cut(m), left by run m+1 (run 0 reads the graph inputs)
            if 0 <= m + 1 < len(waves) and t.name not in cuts[m + 1]:
                cuts[m + 1].append(t.name)
    if cuts:
        cuts[-1] = []                  # nothing runs after the last wave
    return cuts


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
