"""Post-training quantization to a QDQ model that plain ONNX Runtime runs with integer kernels.

Jacob et al. 2018 ("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", §2) affine map, per tensor or per output channel:

    r = s (q - z),   q = clamp(round(r / s) + z, qmin, qmax)

1. Placement (``quant_placement``): which tensors get Q -> DQ, following ONNX Runtime's QDQ fusion rules.
2. Calibration (``qgraph.calibrate``): one ORT session over ``ctx.calib``, streaming min/max and
   histograms of every tensor to quantize (cached in ``ctx.stats`` per graph state).
3. Decisions (``qgraph.qparams``): activations by ``act_method`` (minmax | percentile | mse | entropy);
   weights by ``weight_method`` (minmax | mse), per tensor or per output channel, symmetric (or with a
   zero point per channel: ``weight_scheme=asym``).
   Tensors that must share a scale (Concat, MaxPool/Reshape/...) take the widest member's range.
   Bias: int32, s_b = s_x · s_w (per channel), z_b = 0, so the integer accumulator needs no rescale.
4. Rewrite: integer constants read through DequantizeLinear; Q -> DQ after every quantized activation.
5. Report: SQNR = 10 log10(E[x^2] / E[(x - x')^2]) per quantized tensor on the calibration data:
   ``own`` (the float tensor vs its own fake-quantization) and ``model`` (the float model's tensor vs the
   quantized model's, i.e. accumulated error). Worst N in the notes, all in notes["details"].

Later passes read the quantized layers from the graph itself (``qgraph.ops.find_groups``: the
DQ(x), DQ(w), DQ(b) -> op -> Q(y) groups) and what the graph no longer holds from ``ctx.quant``
(a ``QuantRecord``: the float model and the float value of each quantized weight).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
from onnx import TensorProto

from qgraph import ir
from qgraph.calibrate import DEFAULT_BINS, SENTINEL, cached_collect, stream
from qgraph.reductions import Reductions, side_by_side
from qgraph.errors import ModelError
from qgraph.pipeline import Context, Pass, PassResult, QuantRecord, no_batchnorm, not_quantized, option
from qgraph.ops import INT32, LAYER_OPS, MATRIX_LAYER_OPS, QParams, bias_qparams, clip_bounds, dequantize, quantize
from qgraph.qdq import dq_constant, insert_qdq
from qgraph.qparams import ACT_METHODS, WEIGHT_METHODS, act_range, make_qparams, sqnr_db, weight_qparams
from qgraph.rounding import round_layers
from qgraph.passes.quant_placement import Matcher, Plan, make_plan


@dataclass
class QuantOptions:
    bits: int = option(8, "weight bits; below 8 the symmetric range is narrow ([-7, 7] at 4 bits, see "
                       "weight_scheme)", range=(2, 8))
    act_bits: int = option(8, "activation bits", choices=(8, 16))
    granularity: str = option("channel", "weight scales per output channel or per tensor",
                              choices=("channel", "tensor"))
    scheme: str = option("asym", "activation ranges: asymmetric (zero point) or symmetric",
                         choices=("asym", "sym"))
    weight_scheme: str = option("sym", "weight grid: symmetric (zero point 0, narrow range below 8 bits) or "
                                "asymmetric (a zero point per channel: all 2^bits levels over [min, max])",
                                choices=("sym", "asym"))
    act_dtype: str = option("int8", "activation storage type (s8s8 or u8s8 with int8 weights)",
                            choices=("int8", "uint8"))
    act_method: str = option("minmax", "activation range", choices=ACT_METHODS)
    weight_method: str = option("auto", "weight range; auto: mse for per-tensor weights (one range for all "
                                "channels: outlier channels waste it), minmax per channel",
                                choices=("auto",) + WEIGHT_METHODS)
    percentile: float = option(99.999, "percentile for act_method=percentile", range=(50.0, 100.0))
    storage4: str = option("int4", "container of weights with <= 4 bits: ONNX INT4 (half the bytes; ORT "
                           "dequantizes them to float) or int8 with the narrow range (ORT's integer kernels)",
                           choices=("int4", "int8"))
    weight_only: bool = option(False, "quantize weights only (no calibration data needed)")
    exclude: tuple[str, ...] = option((), "nodes left float: names, op types, first/last, or regexes")
    precision: dict[str, int] = option({}, "weight bits per node: name|op|first|last|regex@bits")
    act_precision: dict[str, int] = option({}, "activation bits per tensor, by tensor name or its producer's "
                                                "name|op|regex: key@8 or key@16")
    rounding: str = option("nearest", "weight rounding: nearest, or gptq (each layer's output error on the "
                           "calibration data, column by column; needs --calib)", choices=("nearest", "gptq"))
    absorb_relu: bool = option(True, "remove Relu/Clip after a quantized op into its output range")
    batch_size: int = option(4, "calibration batch size (memory grows with it: every tensor ORT holds at once, "
                             "times the batch)", range=(1, 4096))
    bins: int = option(DEFAULT_BINS, "histogram bins per tensor", range=(128, 1 << 16))
    sqnr: bool = option(True, "measure per-tensor SQNR on the calibration data (one more pass)")
    sqnr_samples: int = option(8, "calibration samples the SQNR pass uses (0: all)", range=(0, 1 << 30))
    sqnr_batch: int = option(1, "batch of the SQNR pass (float and quantized model in one session: its memory "
                             "grows with the batch far faster than calibration's; EfficientNet-Lite0 +0.1 GB "
                             "at 1, +0.4 GB at 4)", range=(1, 4096))
    worst: int = option(5, "how many of the worst tensors by SQNR the printed notes show", range=(0, 1000))

    def validate(self) -> str | None:
        for key, b in self.precision.items():
            if not 2 <= int(b) <= 8:
                return f"precision '{key}@{b}': weight bits must be within 2..8"
        for key, b in self.act_precision.items():
            if int(b) not in (8, 16):
                return f"act_precision '{key}@{b}': activation bits must be 8 or 16"
        return None


class Quantize(Pass):
    name = "quant"
    summary = "post-training quantization to QDQ (int8 / low-bit weights) that ONNX Runtime fuses"
    options = QuantOptions
    requires = (no_batchnorm, not_quantized)
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        o = self.opts
        _refuse_half_precision(g)
        g.toposort()
        _name_nodes(g)
        plan = make_plan(g, granularity=o.granularity, bits=o.bits, precision=o.precision,
                         exclude=o.exclude, absorb=o.absorb_relu and o.scheme == "asym",
                         weight_only=o.weight_only)
        if plan.acts and ctx.calib is None:
            raise ModelError((
                f"activation quantization needs calibration data ({len(plan.acts)} tensors to calibrate): "
                f"give --calib (CLI) or calib= (API), or use quant:weight_only=true"))
        float_model = ir.to_model(g)
        stats = {}
        if plan.acts:
            bins = 0 if o.act_method == "minmax" else o.bins    # minmax needs no histogram
            observe = [n for n in plan.acts if n not in plan.derived and n not in plan.fixed]
            stats = cached_collect(ctx, float_model, observe, bins=bins, batch_size=o.batch_size)
        w_qp = {name: self._decide_weight(wp) for name, wp in plan.weights.items()}
        act_qp = self._decide_activations(plan, stats, w_qp)
        w_int, rounding_notes = self._round(g, plan, w_qp, float_model, ctx)
        before = {name: qp.scale for name, qp in w_qp.items()}
        widened = _fit_biases(plan, act_qp, w_qp)
        for name in w_int:
            if w_qp[name].scale is not before[name]:   # widened rows: nearest at their new scale
                w_int[name] = _requantize_changed(plan.weights[name].tensor.values, w_int[name],
                                                  before[name], w_qp[name])
        record = self._rewrite(g, plan, act_qp, w_qp, w_int)
        notes = self._notes(plan, act_qp, w_qp, record)
        if widened:
            notes["bias_fit"] = widened
        notes.update(rounding_notes)
        if o.sqnr and ctx.calib is not None and (act_qp or w_qp):
            try:
                details = self._sqnr(float_model, ir.to_model(g), act_qp, record, ctx)
                notes.update(_summarize_sqnr(details, w_qp, record, o.worst))
            except ValueError as exc:      # a graph the side-by-side model cannot hold
                notes["sqnr_skipped"] = str(exc)
        ctx.quant = QuantRecord(options=self.label(), float_model=float_model, activations=act_qp,
                                float_weights={e["dq_output"]: e["float"] for e in record["weights"].values()})
        return PassResult(modified=bool(plan.nodes), notes=notes)

    # -- decisions -------------------------------------------------------------------------

    def _act_storage(self, bits: int) -> str:
        o = self.opts
        if bits == 16:
            return "int16" if o.act_dtype == "int8" else "uint16"
        return o.act_dtype

    def _decide_activations(self, plan: Plan, stats: dict, w_qp: dict) -> dict[str, QParams]:
        o = self.opts
        symmetric = o.scheme == "sym"
        signed = o.act_dtype == "int8"
        matcher = Matcher(list(o.act_precision), [])
        out: dict[str, QParams] = {}

        def bits_of(name: str) -> int:
            node = ir.producer(plan.acts[name])
            for key, b in o.act_precision.items():
                if key == name or (node is not None and matcher.match(node, key)):
                    return int(b)
            return o.act_bits
        for root, members in plan.groups().items():
            fixed = [m for m in members if m in plan.fixed]
            if fixed:  # a Gather on an integer table: its output (and what is tied to it) keeps the table's scale
                for m in members:
                    out[m] = w_qp[plan.fixed[fixed[0]]]
                continue
            # one scale for the group: the member with the widest observed range decides (outputs of
            # data movement are not observed: their values are among their input's)
            seen = [m for m in members if m in stats]
            rep = max(seen, key=lambda m: stats[m].max - stats[m].min if stats[m].count else -1)
            bits = max(bits_of(m) for m in members)   # a shared scale takes the widest request
            rmin, rmax = act_range(stats[rep], o.act_method, bits=bits, symmetric=symmetric,
                                   signed=signed, percentile=o.percentile)
            qp = make_qparams(rmin, rmax, bits=bits, storage=self._act_storage(bits), symmetric=symmetric,
                              method=o.act_method)
            cap = _min_cap(plan.acts[rep]) if len(members) == 1 else None
            if cap is not None and rmax > cap:
                # x only feeds Min(x, c): values above max(c) never get through, so Q may saturate
                # there (ReLU6 carried by equalize as a per-channel bound: Relu -> Min(6/s))
                rmax = max(cap, rmin + 1e-12)
                qp = make_qparams(rmin, rmax, bits=bits, storage=self._act_storage(bits), symmetric=symmetric,
                                  method=o.act_method)
            qp.meta = {"observed": (float(stats[rep].min), float(stats[rep].max)), "shared_with": len(members) - 1}
            if cap is not None:
                qp.meta["capped_by_min"] = cap
            for m in members:
                out[m] = qp
        return out

    def _decide_weight(self, wp) -> QParams:
        o = self.opts
        method = o.weight_method
        if method == "auto":
            method = "mse" if wp.axis is None else "minmax"
        if not self._weight_of_layer(wp):
            method = "minmax"     # tables and Add/Mul constants: their scale is the output's too
        storage = "int4" if wp.bits <= 4 and o.storage4 == "int4" else "int8"
        return weight_qparams(wp.tensor.values, bits=wp.bits, storage=storage,
                              symmetric=o.weight_scheme == "sym" or not self._weight_of_layer(wp),
                              axis=wp.axis, method=method)

    @staticmethod
    def _weight_of_layer(wp) -> bool:
        return bool(wp.readers) and wp.readers[0].op in LAYER_OPS

    def _round(self, g: ir.Graph, plan: Plan, w_qp: dict, float_model, ctx: Context) -> tuple[dict, dict]:
        """GPTQ integers for the layers' weights (``rounding=gptq``), with what the notes say of it."""
        if self.opts.rounding == "nearest" or not plan.weights:
            return {}, {}
        if ctx.calib is None:
            raise ModelError("quant:rounding=gptq needs calibration data (the layers' inputs): give --calib "
                             "(CLI) or calib= (API), or use rounding=nearest")
        targets, kept = {}, {}
        for name, wp in plan.weights.items():
            node = wp.readers[0] if len(wp.readers) == 1 else None
            if node is None or node.op not in MATRIX_LAYER_OPS or node.inputs[1] is not wp.tensor:
                if node is not None and node.op in LAYER_OPS:
                    kept[name] = f"{node.op} '{node.name}' reads it in a form gptq does not handle"
                elif len(wp.readers) > 1:
                    kept[name] = f"shared by {len(wp.readers)} nodes"
                continue
            targets[name] = (node, wp.tensor.values, w_qp[name])
        pin = frozenset(n for n, (node, _, _) in targets.items() if node.name in ctx.sparsity)   # sparsify's zeros
        ints, errors, scales, unsupported = round_layers(float_model, targets, ctx.calib, batch_size=self.opts.batch_size,
                                                 progress=getattr(ctx, "progress", False), pin_zeros=pin)
        kept.update(unsupported)
        for name, scale in scales.items():
            qp = w_qp[name]
            w_qp[name] = replace(qp, scale=np.asarray(scale, np.float32).reshape(np.shape(qp.scale)),
                                 meta={**qp.meta, "clipped_by": "gptq"})
        ratios = [e_g / e_n for e_n, e_g in errors.values() if e_n > 0]
        notes = {"rounding": {"gptq": len(ints), "nearest": len(kept)}}
        if ratios:
            # the layers' output squared error with gptq, relative to nearest rounding (geometric mean)
            notes["rounding"]["output_error_vs_nearest"] = round(float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-12))))), 4)
        if kept:
            notes["rounding"]["nearest_because"] = {n: r for n, r in list(kept.items())[:20]}
        return ints, notes

    # -- rewriting -------------------------------------------------------------------------

    def _rewrite(self, g: ir.Graph, plan: Plan, act_qp: dict, w_qp: dict, w_int: dict | None = None) -> dict:
        weights, layers, dq_of, q_of = {}, {}, {}, {}
        w_dq: dict[str, ir.Variable] = {}
        for name, wp in plan.weights.items():
            qp = w_qp[name]
            q = w_int[name] if w_int and name in w_int else quantize(wp.tensor.values, qp)
            _, out = dq_constant(g, q, qp, name)
            w_dq[name] = out
            for node in wp.readers:
                ir.swap_input(node, wp.tensor, out)
            weights[name] = {"float": wp.tensor.values, "qparams": qp, "dq_output": out.name, "int": q}
        for node, bias, x_name, w_name in plan.biases:
            node_name = node.name
            s_b = (act_qp[x_name].scale.astype(np.float32) * w_qp[w_name].scale.astype(np.float32))
            b = bias.values.astype(np.float64)
            q = np.rint(b / np.broadcast_to(s_b, b.shape))
            clipped = int(np.sum((q < INT32[0]) | (q > INT32[1])))
            q = np.clip(q, *INT32).astype(np.int32)
            qp = bias_qparams(s_b)
            _, out = dq_constant(g, q, qp, bias.name + "_" + node_name)
            ir.swap_input(node, bias, out)
            layers.setdefault(node_name, {})["bias"] = {"float": bias.values, "qparams": qp,
                                                         "clipped": clipped, "dq_output": out.name}
        for name, t in plan.acts.items():
            qp = act_qp[name]
            relu = plan.absorbed.get(name)
            source = relu.inputs[0] if relu is not None and self._absorbable(relu, qp) else None
            q_node, _, dq_out = insert_qdq(g, t, qp, source=source)
            if source is not None:
                relu.inputs.clear()
                relu.outputs.clear()
            dq_of[name] = dq_out.name
            q_of[name] = q_node.outputs[0].name
        for node in plan.nodes:
            if node.op in LAYER_OPS:
                entry = layers.setdefault(node.name, {})
                entry["op"] = node.op
                entry["weight"] = next((w for w, wp in plan.weights.items() if node in wp.readers), None)
        return {"weights": weights, "layers": layers, "dq_of": dq_of, "q_of": q_of}

    @staticmethod
    def _absorbable(relu, qp: QParams) -> bool:
        """The quantized range must lie inside the ReLU/Clip bounds: then Q's saturation is the clip."""
        lo, hi = clip_bounds(relu)      # constant: quant_placement absorbs only those
        rlo, rhi = qp.real_range()
        tol = float(np.max(qp.scale)) * 1e-3
        return bool(np.all(rlo >= lo - tol) and np.all(rhi <= hi + max(tol, abs(hi) * 1e-6)))

    # -- report ----------------------------------------------------------------------------

    def _notes(self, plan: Plan, act_qp: dict, w_qp: dict, record: dict) -> dict:
        ops = Counter(n.op for n in plan.nodes)
        bits = Counter(qp.bits for qp in w_qp.values())
        notes = {"quantized": dict(sorted(ops.items())), "activations": len(act_qp), "weights": len(w_qp),
                 "weight_bits": {f"{b}b": n for b, n in sorted(bits.items())},
                 "relu_absorbed": sum(1 for r in plan.absorbed.values() if not r.outputs),
                 "skipped": dict(plan.skipped)}
        clipped = sum(v.get("bias", {}).get("clipped", 0) for v in record["layers"].values())
        if clipped:
            notes["bias_clipped"] = clipped
        return notes

    def _sqnr(self, float_model, quant_model, act_qp: dict, record: dict, ctx: Context) -> dict:
        """Per activation: own = x vs fake_quant(x); model = the float model's x vs the QDQ model's
        DQ(x). Both models run side by side in one ORT session and the three sums of squares are
        reduced in the graph (``qgraph.calibrate.Reductions``), so the pass holds about one inference
        of each model, not every tensor of both (EfficientNet-Lite0: 0.3 GB less at batch 1). The
        QDQ half keeps ORT's fusions: only its Q outputs (integers) are read."""
        names = [n for n in act_qp if n in record["q_of"]]
        samples = ctx.calib
        if self.opts.sqnr_samples and len(samples) > self.opts.sqnr_samples:
            samples = samples.subset(range(self.opts.sqnr_samples))
        inputs = {i.name for i in float_model.graph.input}
        r = Reductions(side_by_side({"f": float_model, "q": quant_model}), copy=False)
        limit, zero = r.const(np.float32(SENTINEL), "sentinel"), r.const(np.float32(0.0), "zero")
        layout = {}
        for n in names:
            qp = act_qp[n]
            x = n if n in inputs else f"f/{n}"
            r.begin(x)
            scale, zp = (r.const(np.float32(np.asarray(v).reshape(-1)[0])) for v in (qp.scale, qp.zero_point))
            qmin, qmax = r.const(np.float32(qp.qmin)), r.const(np.float32(qp.qmax))
            keep = r.node("Less", [r.node("Abs", [x]), limit])      # mask values (|x| >= 1e8) are not signal
            xk = r.node("Where", [keep, x, zero])
            level = r.node("Clip", [r.node("Add", [r.node("Round", [r.node("Div", [xk, scale])]), zp]), qmin, qmax])
            own = r.node("Sub", [r.node("Mul", [r.node("Sub", [level, zp]), scale]), xk])
            dq = r.node("Mul", [r.node("Sub", [r.node("Cast", [f"q/{record['q_of'][n]}"], to=TensorProto.FLOAT), zp]),
                                scale])
            model = r.node("Where", [keep, r.node("Sub", [dq, x]), zero])
            layout[n] = [r.result(r.node("ReduceSumSquare", [t], keepdims=0)) for t in (xk, own, model)]
        acc = {n: np.zeros(3) for n in names}    # sum x^2, sum own noise^2, sum model noise^2
        outputs = [o for outs in layout.values() for o in outs]
        # a few samples: memory over speed (batch sqnr_batch, no arena, no NCHWc copies; QDQ fusions as in
        # deployment)
        for values in stream(r.finish(), outputs, samples, batch_size=self.opts.sqnr_batch,
                             progress=ctx.progress, desc="sqnr", lean=True):
            for n in names:
                acc[n] += [float(values[o]) for o in layout[n]]
        return {n: {"own_db": _db(a[0], a[1]), "model_db": _db(a[0], a[2])} for n, a in acc.items()}


def _requantize_changed(w: np.ndarray, q: np.ndarray, old_scale, qp: QParams) -> np.ndarray:
    """``q`` with the slices whose scale changed from ``old_scale`` to ``qp.scale`` rounded anew."""
    fresh = quantize(w, qp)
    if not qp.per_channel:
        return fresh
    changed = np.asarray(old_scale).reshape(-1) != np.asarray(qp.scale).reshape(-1)
    shape = [1] * q.ndim
    shape[qp.axis] = -1
    return np.where(changed.reshape(shape), fresh, q)


def _min_cap(t) -> float | None:
    """max(c) when ``t``'s only reader is Min(t, c) with a constant c (else None)."""
    readers = ir.consumers(t)
    if len(readers) != 1 or readers[0].op != "Min" or len(readers[0].inputs) != 2:
        return None
    consts = [ir.const(x) for x in readers[0].inputs if x is not t]
    if len(consts) != 1 or consts[0] is None or not np.issubdtype(consts[0].dtype, np.floating):
        return None
    return float(np.max(consts[0]))


#: the largest |int32 bias| quant writes: half the int32 range, the other half is the accumulator's
BIAS_LIMIT = 2 ** 30


def _fit_biases(plan: Plan, act_qp: dict, w_qp: dict) -> int:
    """Widen weight scales where the int32 bias b / (s_x · s_w) would pass ``BIAS_LIMIT``.

    A channel whose weights are all (nearly) zero gets a tiny minmax scale; its bias then needs more
    than int32 at s_b = s_x · s_w, and a clipped bias is a wrong output (an integer accumulator near
    the limit also wraps). The weight scale of such a channel rises to |b| / (s_x · BIAS_LIMIT): its
    weights were ~0 and stay ~0, and the bias is exact. Returns how many channels were widened."""
    widened = 0
    for _, bias, x_name, w_name in plan.biases:
        if x_name not in act_qp or w_name not in w_qp:
            continue
        qp = w_qp[w_name]
        s_x = float(np.max(act_qp[x_name].scale))
        b = np.abs(bias.values.astype(np.float64)).reshape(-1)
        s_w = np.broadcast_to(np.asarray(qp.scale, np.float64), b.shape) if np.ndim(qp.scale) else np.full(b.shape, float(qp.scale))
        need = b / (s_x * BIAS_LIMIT)
        over = need > s_w
        if not over.any():
            continue
        if qp.per_channel:
            scale = np.where(over, need * (1 + 1e-6), s_w).astype(np.float32)
            widened += int(over.sum())
        else:
            scale = np.float32(need.max() * (1 + 1e-6))
            widened += b.size
        w_qp[w_name] = replace(qp, scale=np.asarray(scale, np.float32),
                               meta={**qp.meta, "bias_fit": int(over.sum())})
    return widened


def _db(signal: float, noise: float) -> float | None:
    """SQNR rounded to 0.01 dB; None (JSON null) when it is not finite (no noise, or no signal)."""
    v = sqnr_db(signal, noise)
    return round(v, 2) if np.isfinite(v) else None


def _name_nodes(g: ir.Graph) -> None:
    """Give every node a unique name: notes, ``exclude`` and the report refer to nodes by name."""
    seen: set[str] = set()
    for node in g.nodes:
        if not node.name or node.name in seen:
            node.name = ir.fresh_name(g, node.name or node.op)
        seen.add(node.name)


def _summarize_sqnr(act: dict, w_qp: dict, record: dict, worst: int) -> dict:
    weights = {}
    for name, entry in record["weights"].items():
        w = entry["float"].astype(np.float32)
        d = dequantize(entry["int"], entry["qparams"]) - w
        weights[name] = _db(float(np.vdot(w, w)), float(np.vdot(d, d)))
    ranked = sorted(((n, v) for n, v in act.items() if v["model_db"] is not None), key=lambda kv: kv[1]["model_db"])
    out: dict = {}
    if ranked:
        out["worst_sqnr_db"] = ", ".join(f"{n}={v['model_db']:.1f}" for n, v in ranked[:worst])
        out["min_sqnr_db"] = float(ranked[0][1]["model_db"])
    if weights:
        wr = sorted(((n, v) for n, v in weights.items() if v is not None), key=lambda kv: kv[1])
        out["worst_weight_sqnr_db"] = ", ".join(f"{n}={v:.1f}" for n, v in wr[:worst])
    out["details"] = {"activations": act, "weights": weights}
    return out


def _refuse_half_precision(g: ir.Graph) -> None:
    """quant writes float32 Q/DQ (opset-13 scales are float32): a model computing in float16 or
    bfloat16 would come out with every layer skipped. Say so instead of writing it unquantized."""
    for node in g.nodes:
        if node.op not in LAYER_OPS:
            continue
        for t in node.inputs[:1]:
            name = getattr(np.dtype(t.dtype), "name", "") if t.dtype is not None else ""
            if name in ("float16", "bfloat16"):
                raise ModelError(f"quant works on float32 models; this one computes in {name} ({node.op} "
                                 f"'{node.name}' reads {name}): convert it to float32 first")
