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

from qgraph import ir, ops
from qgraph.calibrate import DEFAULT_BINS, SENTINEL, cached_collect, session_heap, stream
from qgraph.reductions import Reductions, side_by_side
from qgraph.errors import ModelError
from qgraph.pipeline import (Context, FloatWeights, Pass, PassResult, QuantRecord, SpilledModel, no_batchnorm,
                             not_quantized, option)
from qgraph.ops import INT32, LAYER_OPS, MATRIX_LAYER_OPS, QParams, bias_qparams, clip_bounds, dequantize, quantize
from qgraph.qdq import dq_constant, insert_qdq
from qgraph.grids import (GRIDS, POT_BITS, grid_levels, grid_qparams, refuse_sparse_binary, storage_for,
                          weight_integers)
from qgraph.qparams import ACT_METHODS, WEIGHT_METHODS, act_range, make_qparams, sqnr_db, weight_qparams
from qgraph.rounding import round_layers
from qgraph.weight_search import fit_pairs, pair_fit_errors, pairs_over
from qgraph.passes.quant_placement import Matcher, Plan, make_plan


#: activation widths: below 8 the integers stay in int8 / uint8 with a Clip to [qmin, qmax] before Q
ACT_BITS = (2, 3, 4, 8, 16)
#: ops whose output may go through a Clip into Q: the Clip is then the integer op's output clamp
#: (ORT runs such a unit in float; ``qgraph-run`` lowers it as one integer step)
NARROW_PRODUCERS = ("Conv", "Gemm", "MatMul", "Add", "Mul")


@dataclass
class QuantOptions:
    bits: int = option(8, "weight bits; below 8 the symmetric range is narrow ([-7, 7] at 4 bits, see "
                       "weight_scheme)", range=(2, 8))
    act_bits: int = option(8, "activation bits: 8, 16, or 2..4 (int8/uint8 storage with a Clip to the narrow "
                           "range before Q; tensors not written by Conv/Gemm/MatMul/Add/Mul keep 8)",
                           choices=ACT_BITS)
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
    weight_grid: str = option("uniform", "grid of the Conv/Gemm/MatMul weights not named in precision: uniform "
                              "(bits), binary (±α, XNOR-Net), ternary (0, ±α, TWN) or pot (0, ±α·2^k; bits 2..4)",
                              choices=GRIDS)
    weight_method: str = option("auto", "weight range; auto: mse for per-tensor weights (one range for all "
                                "channels: outlier channels waste it) and power-of-two grids, minmax per channel",
                                choices=("auto",) + WEIGHT_METHODS)
    percentile: float = option(99.999, "percentile for act_method=percentile", range=(50.0, 100.0))
    storage4: str = option("int4", "container of weights with <= 4 bits: ONNX INT4 (half the bytes; ORT "
                           "dequantizes them to float) or int8 with the narrow range (ORT's integer kernels)",
                           choices=("int4", "int8"))
    weight_only: bool = option(False, "quantize weights only (no calibration data needed)")
    exclude: tuple[str, ...] = option((), "nodes left float: names, op types, first/last, or regexes; auto:K "
                                      "the K layers that hurt most (measured, see sensitivity)")
    budget: str = option("", "mixed precision: per-layer bits chosen under a budget: 5bits (average), 2.5MB, "
                         "sqnr:DB or cosine:C (fewest 16-bit activations); see the sensitivity pass")
    precision: dict[str, int] = option({}, "weight bits per node: name|op|first|last|regex@bits")
    act_precision: dict[str, int] = option({}, "activation bits per tensor, by tensor name or its producer's "
                                                "name|op|regex: key@8 or key@16")
    rounding: str = option("nearest", "weight rounding: nearest, or gptq (each layer's output error on the "
                           "calibration data, column by column; needs --calib)", choices=("nearest", "gptq"))
    target: str = option("any", "CPUs the model must compute the same integers on: any (no two adjacent weights "
                         "ORT's AVX2 / AVX-512BW kernels add in int16 can leave it, see docs/cpu.md) or vnni "
                         "(VNNI / AMX / non-x86 only: weights as rounded)", choices=("any", "vnni"))
    ort_nbits: str = option("wide", "ONNX Runtime (1.32) rewrites DequantizeLinear(int8/uint8/int4 weight) -> MatMul "
                            "reading 16-bit or float activations into MatMulNBits, which quantizes those activations "
                            "to int8 in blocks of 32 (accuracy_level 4): wide: a MatMul reading 16-bit activations "
                            "gets its weight as [1, K, N] (same integers and scales), a form the rewrite does not "
                            "take, so ORT computes the 16-bit activations asked for; float: also a MatMul reading "
                            "float activations (weight_only, excluded producers); allow: [K, N] everywhere (ORT's "
                            "int8 path)", choices=("wide", "float", "allow"))
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
            if int(b) not in ACT_BITS:
                return f"act_precision '{key}@{b}': activation bits must be one of {', '.join(map(str, ACT_BITS))}"
        if self.weight_grid == "pot" and self.bits not in POT_BITS:
            return (f"weight_grid=pot takes bits 2..4 (0 and ±2^0..±2^(2^(bits-1)-2) times a scale; "
                    f"bits=4 reaches ±64), not bits={self.bits}")
        if self.weight_grid != "uniform" and self.weight_scheme == "asym":
            return f"weight_grid={self.weight_grid} is symmetric (no zero point): drop weight_scheme=asym"
        from qgraph.errors import OptionError
        from qgraph.passes.mixed import check_mixed_options
        try:
            check_mixed_options(self)
        except OptionError as exc:
            return str(exc)
        return None


class Quantize(Pass):
    name = "quant"
    summary = "post-training quantization to QDQ (int8 / low-bit weights) that ONNX Runtime fuses"
    options = QuantOptions
    requires = (no_batchnorm, not_quantized)
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        if not (self.opts.budget or any(e.startswith("auto:") for e in self.opts.exclude)):
            return self._run(g, ctx)
        from qgraph.passes.mixed import apply_budget   # the decision, as precision/act_precision/exclude
        g.toposort()
        _name_nodes(g)
        given = self.opts
        self.opts, mixed_notes = apply_budget(g, ctx, given)
        try:
            result = self._run(g, ctx)
        finally:
            self.opts = given
        details = mixed_notes.pop("details", {})
        result.notes.update(mixed_notes)
        result.notes.setdefault("details", {}).update(details)
        return result

    def _run(self, g: ir.Graph, ctx: Context) -> PassResult:
        o = self.opts
        _refuse_half_precision(g)
        g.toposort()
        _name_nodes(g)
        self._graph_outputs = {t.name for t in g.outputs}
        plan = make_plan(g, granularity=o.granularity, bits=o.bits, precision=o.precision,
                         exclude=o.exclude, absorb=o.absorb_relu and o.scheme == "asym",
                         weight_only=o.weight_only)
        if plan.acts and ctx.calib is None:
            raise ModelError((
                f"activation quantization needs calibration data ({len(plan.acts)} tensors to calibrate): "
                f"give --calib (CLI) or calib= (API), or use quant:weight_only=true"))
        listed = Matcher(list(o.precision), [n.name for n in g.nodes if n.op in LAYER_OPS])
        refuse_sparse_binary(o.weight_grid, {n.name: ctx.sparsity[n.name] for wp in plan.weights.values()
                                             if not any(listed.any(r) for r in wp.readers)
                                             for n in wp.readers if n.name in ctx.sparsity})
        # the float model in a temporary file, not in memory: calibration, GPTQ and the SQNR pass each
        # read it into the model they run, and later passes (biascorr) read it from there
        float_model = SpilledModel(g, "float")
        try:
            stats = {}
            if plan.acts:
                bins = 0 if o.act_method == "minmax" else o.bins    # minmax needs no histogram
                observe = [n for n in plan.acts if n not in plan.derived and n not in plan.fixed]
                with session_heap():    # the calibration model is built and run under the session policy
                    stats = cached_collect(ctx, float_model, observe, bins=bins, batch_size=o.batch_size)
            w_qp = {name: self._decide_weight(wp, gridded=not any(listed.any(r) for r in wp.readers))
                    for name, wp in plan.weights.items()}
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
            if record["pair_fit"]:
                notes["pair_fit"] = record["pair_fit"]
            if widened:
                notes["bias_fit"] = widened
            notes.update(rounding_notes)
            modified = bool(plan.nodes)
            float_weights = FloatWeights(float_model, {e["dq_output"]: name for name, e in record["weights"].items()})
            weight_db = _weight_sqnr(record) if o.sqnr else {}
            # the float weights (19 MB on EfficientNet-Lite0) are in the spilled model: not held from here on
            del plan, w_int, record["weights"]
            if o.sqnr and ctx.calib is not None and (act_qp or w_qp):
                try:
                    with session_heap():
                        details = self._sqnr(float_model, g, act_qp, record, ctx)
                    notes.update(_summarize_sqnr(details, weight_db, o.worst))
                except ValueError as exc:      # a graph the side-by-side model cannot hold
                    notes["sqnr_skipped"] = str(exc)
            ctx.quant = QuantRecord(options=self.label(), float_source=float_model, activations=act_qp,
                                    float_weights=float_weights)
            return PassResult(modified=modified, notes=notes)
        except BaseException:
            float_model.close()     # a failed pass leaves no temporary file (its traceback keeps this alive)
            raise

    # -- decisions -------------------------------------------------------------------------

    def _act_storage(self, bits: int) -> str:
        o = self.opts
        if bits == 16:
            return "int16" if o.act_dtype == "int8" else "uint16"
        return o.act_dtype

    def _decide_activations(self, plan: Plan, stats: dict, w_qp: dict) -> dict[str, QParams]:
        o = self.opts
        self._kept8: dict[str, int] = {}        # narrow activations kept at 8 bits, by the op writing them
        self._clipped: set[str] = set()         # narrow activations quantized through a Clip
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
            if bits < 8:
                why = next((r for r in (_why_not_narrow(plan, m, self._graph_outputs) for m in members) if r), None)
                if why:      # QuantizeLinear alone saturates at the storage type's range: kept at 8 bits
                    self._kept8[why] = self._kept8.get(why, 0) + 1
                    bits = 8
                else:        # a Clip to [qmin, qmax] goes before Q where a layer writes the values
                    self._clipped.update(m for m in members if m not in plan.derived
                                         and _writer(plan, m).op in NARROW_PRODUCERS)
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

    def _decide_weight(self, wp, gridded: bool = True) -> QParams:
        """``gridded``: the weight takes ``weight_grid`` (layers not named in ``precision``)."""
        o = self.opts
        method = o.weight_method
        if method == "auto":
            method = "mse" if wp.axis is None else "minmax"
        if not self._weight_of_layer(wp):
            method = "minmax"     # tables and Add/Mul constants: their scale is the output's too
        elif o.weight_grid != "uniform" and gridded:
            if o.weight_method == "auto" and o.weight_grid == "pot":
                # a log2 grid spends its top octave on the single largest weight when scaled by min-max;
                # the MSE scale is the grid's L2 projection (also measured: digits CNN POT4 29.7 -> 90.0)
                method = "mse"
            return grid_qparams(wp.tensor.values, grid=o.weight_grid, bits=o.bits, axis=wp.axis, method=method,
                                storage=storage_for(grid_levels(o.weight_grid, o.bits), o.storage4))
        storage = "int4" if wp.bits <= 4 and o.storage4 == "int4" else "int8"
        qp = weight_qparams(wp.tensor.values, bits=wp.bits, storage=storage,
                            symmetric=o.weight_scheme == "sym" or not self._weight_of_layer(wp),
                            axis=wp.axis, method=method)
        return _pair_scale(wp, qp) if o.target == "any" else qp

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
        ints, errors, scales, unsupported = round_layers(float_model.load(), targets, ctx.calib, batch_size=self.opts.batch_size,
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
        weights, layers, dq_of, q_of, pair_fit = {}, {}, {}, {}, {}
        w_dq: dict[str, ir.Variable] = {}
        self._nbits_kept = {"batched_weight": 0, "left_2d": {}}
        for name, wp in plan.weights.items():
            qp = w_qp[name]
            q = w_int[name] if w_int and name in w_int else weight_integers(wp.tensor.values, qp)
            if self.opts.target == "any":
                q, fitted = _fit_pairs(wp, qp, q)
                if fitted:
                    pair_fit[name] = fitted
            batched = self._batched_weight(wp, qp, act_qp)
            if batched:
                q = q.reshape((1,) + q.shape)
                qp = replace(qp, axis=None if qp.axis is None else qp.axis + 1)
                self._nbits_kept["batched_weight"] += 1
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
            q_node, _, dq_out = insert_qdq(g, t, qp, source=source, clip=name in self._clipped)
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
        fit = {"pairs": sum(pair_fit.values()), "weights": len(pair_fit)} if pair_fit else {}
        return {"weights": weights, "layers": layers, "dq_of": dq_of, "q_of": q_of, "pair_fit": fit}

    def _batched_weight(self, wp, qp: QParams, act_qp: dict) -> bool:
        """Whether the weight of a MatMul is written as [1, K, N] (``ort_nbits``) so that ONNX Runtime
        runs DequantizeLinear -> MatMul as written instead of its MatMulNBits rewrite.

        ORT 1.32's DQMatMulToMatMulNBits (``qdq_selectors.cc``, ``ValidateDQForMatMulNBits``) takes a
        rank-2 int8 / uint8 / int4 weight, per tensor or per column (axis 1), read by a MatMul (or a
        Gemm with transB = 0) whose input A is not an 8-bit QDQ activation; its kernel (accuracy_level 4,
        ``session.qdq_matmulnbits_accuracy_level``) quantizes A to int8 per block of 32 along K with
        scale max|a| / 127, so 16-bit (or float) activations are computed at 8 bits. A [1, K, N]
        weight (per-channel axis 2) is the same matrix broadcast over the batch; the selector needs rank
        2 and leaves it. It is used only where every reader is such a MatMul with an input of rank >= 3
        (the output shape is then unchanged); other cases stay [K, N] and are counted in the notes
        (``ort_matmulnbits.left_2d``)."""
        mode = self.opts.ort_nbits
        if mode == "allow" or qp.storage not in ("int8", "uint8", "int4", "uint4") \
                or np.ndim(wp.tensor.values) != 2:
            return False
        targets = []
        for node in wp.readers:
            if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is not wp.tensor \
                    or (node.op == "Gemm" and int(node.attrs.get("transB", 0))):
                continue
            a = act_qp.get(node.inputs[0].name)
            if a is not None and a.storage in ("int16", "uint16"):
                targets.append(node)
            elif a is None and mode == "float" and ir.const(node.inputs[0]) is None:
                targets.append(node)
        if not targets:
            return False
        why = None
        for node in wp.readers:
            shape = node.inputs[0].shape
            if node.op != "MatMul" or node.inputs[1] is not wp.tensor:
                why = f"read by {node.op} (B of rank 2 only)" if node.op == "Gemm" else f"also read by {node.op}"
            elif shape is None or len(shape) < 3:
                why = "MatMul input of rank < 3 or unknown (a [1, K, N] weight would add a dim to the output)"
            if why:
                break
        if why:
            left = self._nbits_kept["left_2d"]
            left[why] = left.get(why, 0) + 1
            return False
        return True

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
        grids = Counter(qp.method for qp in w_qp.values() if qp.levels is not None)
        if grids:
            notes["weight_grid"] = dict(sorted(grids.items()))
        act_bits = Counter(qp.bits for qp in act_qp.values())
        if set(act_bits) - {8}:
            notes["act_bits"] = {f"{b}b": n for b, n in sorted(act_bits.items())}
        if self._kept8:
            notes["act_kept_8_bits"] = dict(sorted(self._kept8.items()))
        kept = getattr(self, "_nbits_kept", {})
        if kept.get("batched_weight") or kept.get("left_2d"):
            notes["ort_matmulnbits"] = {"batched_weight": kept["batched_weight"], **(
                {"left_2d": dict(sorted(kept["left_2d"].items()))} if kept["left_2d"] else {})}
        clipped = sum(v.get("bias", {}).get("clipped", 0) for v in record["layers"].values())
        if clipped:
            notes["bias_clipped"] = clipped
        return notes

    def _sqnr(self, float_model: SpilledModel, g: ir.Graph, act_qp: dict, record: dict, ctx: Context) -> dict:
        """Per activation: own = x vs fake_quant(x); model = the float model's x vs the QDQ model's
        DQ(x). Both models run side by side in one ORT session and the three sums of squares are
        reduced in the graph (``qgraph.calibrate.Reductions``), so the pass holds about one inference
        of each model, not every tensor of both (EfficientNet-Lite0: 0.3 GB less at batch 1). The
        QDQ half keeps ORT's fusions: only its Q outputs (integers) are read. Neither model is held
        apart from the side-by-side one (read from the spilled file and exported from ``g`` just for it)."""
        names = [n for n in act_qp if n in record["q_of"]]
        samples = ctx.calib
        if self.opts.sqnr_samples and len(samples) > self.opts.sqnr_samples:
            samples = samples.subset(range(self.opts.sqnr_samples))
        inputs = {t.name for t in g.inputs}
        r = Reductions(side_by_side({"f": float_model.load(), "q": ir.to_model(g)}), copy=False)
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
                             progress=ctx.progress, desc="sqnr", lean=True, own=True):
            for n in names:
                acc[n] += [float(values[o]) for o in layout[n]]
        return {n: {"own_db": _db(a[0], a[1]), "model_db": _db(a[0], a[2])} for n, a in acc.items()}


PAIR_STEPS = np.linspace(1.0, 2.0, 21)     # scale multipliers tried by ``_pair_scale`` (2: 7-bit codes, all fit)


def _pair_reader(wp, shape):
    """The Conv / Gemm / MatMul that reads ``wp`` as its weight through int16 pair sums on AVX2, or None."""
    for node in wp.readers:
        if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and node.inputs[1] is wp.tensor \
                and ops.pairs_in_int16(node.op, shape, int(node.attrs.get("group", 1))):
            return node
    return None


def _pair_scale(wp, qp: QParams) -> QParams:
    """``target=any``, symmetric 8-bit weights: each channel's scale (the tensor's, per tensor) times the
    m in [1, 2] that gives the least squared weight error once the adjacent pairs that still leave int16
    are fitted (``ops.fit_pair_rows``). m = 1 keeps the 8-bit steps and moves only the offending pairs,
    which costs a channel with few of them little; a channel with many large same-sign neighbours
    widens instead, at worst to 7-bit steps (m = 2: |q| <= 64, every pair fits)."""
    if qp.storage != "int8" or qp.qmax < ops.PAIR_LIMIT // 2 or not np.all(np.asarray(qp.zero_point) == 0):
        return qp
    w = np.asarray(wp.tensor.values)
    node = _pair_reader(wp, w.shape)
    if node is None or not w.size:
        return qp
    trans_b = int(node.attrs.get("transB", 0))
    rows = ops.ort_k_rows(w, node.op, trans_b)
    scale = np.asarray(qp.scale, np.float64).reshape(-1)
    channel = np.arange(rows.shape[0]) % scale.size if qp.per_channel else np.zeros(rows.shape[0], np.int64)
    row_scale = np.where(scale > 0, scale, 1.0)[channel]
    # t = w / s per row; err[i, row] = sum((t - m q)^2), q = ops.fit_pair_rows(clip(rint(t / m)), t / m)
    # for each m of PAIR_STEPS (qgraph.weight_search: the same arithmetic and summation order, compiled)
    if not pairs_over(rows, row_scale, qp.qmin, qp.qmax):
        return qp
    err = pair_fit_errors(rows, row_scale, PAIR_STEPS, qp.qmin, qp.qmax, min(qp.qmax, -qp.qmin))
    if qp.per_channel:
        per = np.zeros((len(PAIR_STEPS), scale.size))
        np.add.at(per.T, channel, err.T)
        mult = PAIR_STEPS[np.argmin(per, axis=0)]
    else:
        mult = PAIR_STEPS[np.argmin(err.sum(axis=1))]
    new = (scale * mult).astype(np.float32).reshape(np.shape(qp.scale))
    return replace(qp, scale=new, meta={**qp.meta, "pair_scale": float(np.mean(mult))})


def _fit_pairs(wp, qp: QParams, q: np.ndarray) -> tuple[np.ndarray, int]:
    """``target=any``: the int8 weights of a Conv / Gemm / MatMul with no adjacent pair (in the K order
    of the layer that reads them) whose same-sign magnitudes sum past ``ops.PAIR_LIMIT``, so ORT's
    vpmaddubsw kernels (AVX2, AVX-512BW) cannot saturate on them: each offending pair moves to the
    nearest integer point of the limit (``ops.fit_pairs``). Returns (codes, pairs moved).
    Asymmetric weights (a zero point != 0, ``weight_scheme=asym``) are left as rounded: a code at the
    zero point is an exact 0.0 (sparsify's zeros) that a pair move would shift (docs/cpu.md)."""
    if qp.storage != "int8" or not q.size or np.abs(q).max() * 2 <= ops.PAIR_LIMIT \
            or np.any(np.asarray(qp.zero_point) != 0):
        return q, 0
    moved = 0
    for node in wp.readers:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is not wp.tensor \
                or not ops.pairs_in_int16(node.op, q.shape, int(node.attrs.get("group", 1))):
            continue
        s, z = (np.asarray(v, np.float64) for v in (qp.scale, qp.zero_point))
        if qp.axis is not None and s.ndim == 1:
            shape = [1] * q.ndim
            shape[qp.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        target = np.asarray(wp.tensor.values, np.float64) / s + z
        q, n = fit_pairs(q, target, node.op, int(node.attrs.get("transB", 0)), qp.qmin, qp.qmax)   # ops.fit_pairs, compiled
        moved += n
    return q, moved


def _requantize_changed(w: np.ndarray, q: np.ndarray, old_scale, qp: QParams) -> np.ndarray:
    """``q`` with the slices whose scale changed from ``old_scale`` to ``qp.scale`` rounded anew."""
    fresh = weight_integers(w, qp)
    if not qp.per_channel:
        return fresh
    changed = np.asarray(old_scale).reshape(-1) != np.asarray(qp.scale).reshape(-1)
    shape = [1] * q.ndim
    shape[qp.axis] = -1
    return np.where(changed.reshape(shape), fresh, q)


def _writer(plan: Plan, name: str):
    """The node whose output values activation ``name`` carries (through an absorbed Relu / Clip);
    None for a graph input."""
    relu = plan.absorbed.get(name)
    return ir.producer(relu.inputs[0] if relu is not None else plan.acts[name])


def _why_not_narrow(plan: Plan, name: str, outputs: set) -> str | None:
    """None when activation ``name`` can be quantized below 8 bits in int8 / uint8 storage: a layer or
    Add / Mul writes it (a Clip before Q narrows it), or its values are those of tensors that are
    (data movement, Concat: tied to them). Otherwise the reason: ``graph_output`` (the model's result,
    which an argmax or a softmax compares: four levels would tie most classes), ``graph_input`` (the
    first layer reads 8-bit data, as in the low-bit literature), or ``written_by_<op>``."""
    if name in outputs:
        return "graph_output"
    if name in plan.derived:
        return None
    node = _writer(plan, name)
    if node is None:
        return "graph_input"
    return None if node.op in NARROW_PRODUCERS + ("Concat",) else f"written_by_{node.op}"


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


def _weight_sqnr(record: dict) -> dict[str, float | None]:
    """Each quantized weight's SQNR (float vs dequantized integers), in dB."""
    weights = {}
    for name, entry in record["weights"].items():
        w = entry["float"].astype(np.float32)
        d = dequantize(entry["int"], entry["qparams"]) - w
        weights[name] = _db(float(np.vdot(w, w)), float(np.vdot(d, d)))
    return weights


def _summarize_sqnr(act: dict, weights: dict, worst: int) -> dict:
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
