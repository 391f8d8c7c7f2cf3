"""Mixed precision: the ``sensitivity`` pass, ``quant:budget=`` / ``quant:exclude=auto:k``, ``--explain-quant``.

Sensitivity (``qgraph.sensitivity``): for each site ``quant`` would quantize — each layer's weight (the
plan of ``quant_placement``: Conv/Gemm/MatMul with a constant weight) and each activation scale group —
and each candidate (weights w8/w6/w4, activations a8/a16), the output noise when only that site is
quantized, Ω_i(c) = E||y - y_i,c||² / E||y||² (HAWQ-V2, Dong et al. 2020 §3; ZeroQ, Cai et al. 2020 §3.3).
Measured incrementally: one float pass caching the tensors the suffixes read, then per site a run of the
graph below it only.

Allocation (``qgraph.allocate``): with Σ_i Ω_i(c_i) as the predicted output noise (additivity, ZeroQ
§3.3), ``quant:budget=`` chooses per-layer weight bits by exact multiple-choice knapsack DP:

    budget=5bits      average weight bits over the quantized layers (size Σ params·bits/8 <= Σ params·5/8)
    budget=2.5MB      the layers' weight bytes at their bit widths (kB/MB/GB powers of 1000; a plain number: bytes)
    budget=sqnr:25    the fewest 16-bit activation tensors (when a8/a16 were measured; else the smallest weight
                      size) whose predicted output SQNR is >= 25 dB
    budget=cosine:0.99  the same with the SQNR a cosine implies when the noise is orthogonal to the output:
                      cos = 1/sqrt(1 + Ω), Ω = 1/cos² - 1

Pinned layers (``sensitivity:pin``, default first;last) keep 8 bits. The decision is expressed as the
``precision`` / ``act_precision`` options of ``quant`` (so it reads like a hand-written configuration, and
the report shows it); ORT runs every width: 8/6/5/4-bit weights are stored as int8 with a narrow range
(``storage4=int8`` is forced under a budget, so ORT's integer kernels run the 4-bit layers too). Sizes are
counted as Σ params·bits/8 (the packed size) next to the file size, which stays that of int8.

``exclude=auto:k`` leaves float the k layers whose weight + input activation hurt most, one at a time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import onnx

from qgraph import ir
from qgraph.allocate import Allocation, Options, min_cost, pareto, solve
from qgraph.errors import ModelError, OptionError
from qgraph.ops import LAYER_OPS, find_groups, float_source, qparams_of
from qgraph.pipeline import Context, Pass, PassResult, no_batchnorm, not_quantized, option
from qgraph.sensitivity import CANDIDATES, PROXIES, SensitivityTable, Site, measure, plot_heatmap
from qgraph.passes.quant_placement import Matcher, make_plan


@dataclass
class SensitivityOptions:
    candidates: tuple[str, ...] = option(("w8", "w6", "w4", "a8", "a16"), "what is measured per site: weight bits "
                                         "w8/w6/w5/w4/w3/w2, activation bits a8/a16")
    proxy: str = option("sqnr", "the error: output noise power (shown as SQNR) or KL of the softmax of the outputs",
                        choices=PROXIES)
    samples: int = option(32, "calibration samples cached and measured on (the first N)", range=(1, 1 << 20))
    batch_size: int = option(8, "batch of the float pass and the suffix runs", range=(1, 4096))
    granularity: str = option("channel", "weight scales as quant will use them", choices=("channel", "tensor"))
    pin: tuple[str, ...] = option(("first", "last"), "layers kept at 8 bits and not measured (names, ops, "
                                  "first/last, regexes; 'none' for none)")
    executor: str = option("", "serial, process (local pool) or dask://HOST:PORT; empty: --executor or process")
    workers: int = option(2, "processes of the local pool", range=(1, 256))
    show: int = option(10, "rows of the table printed in the notes (most sensitive first)", range=(0, 100000))
    plot: bool = option(True, "write sensitivity.png into --plots (matplotlib)")

    def validate(self) -> str | None:
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad:
            return f"unknown candidate(s) {', '.join(bad)}; known: {', '.join(CANDIDATES)}"
        return None


class Sensitivity(Pass):
    name = "sensitivity"
    summary = "per-layer quantization sensitivity (output SQNR per site and bit width), for quant:budget"
    options = SensitivityOptions
    requires = (no_batchnorm, not_quantized)

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        table = compute(g, ctx, self.opts)
        ctx.sensitivity = table
        notes = {"sites": len(table.sites), "samples": table.samples, "cached_MB": round(table.cached_bytes / 1e6, 1),
                 "seconds": table.seconds, "executor": table.executor}
        if self.opts.show:
            rows = table.format(self.opts.show).splitlines()
            notes["most_sensitive"] = ", ".join(
                f"{s.key}@{c}={table.sqnr(s.key, c):.1f}dB" for s, c in _worst(table, self.opts.show))
            notes["table"] = rows
        if self.opts.plot and ctx.plots:
            import os
            os.makedirs(ctx.plots, exist_ok=True)
            notes["plot"] = plot_heatmap(table, os.path.join(ctx.plots, "sensitivity.png"))
        notes["details"] = table.to_dict()
        return PassResult(modified=False, notes=notes)


def _worst(table: SensitivityTable, n: int) -> list[tuple[Site, str]]:
    cells = [(table.noise[(s.key, c)], s, c) for s in table.sites for c in table.candidates() if (s.key, c) in table.noise]
    cells.sort(key=lambda x: -x[0])
    return [(s, c) for _, s, c in cells[:n]]


# ----------------------------------------------------------------------------- sites

def sites_of(g: ir.Graph, granularity: str = "channel", pin: tuple[str, ...] = ()) -> tuple[list[Site], list[str]]:
    """The weight sites (one per layer with a constant weight) and activation sites (one per scale group)
    that ``quant`` would create on ``g``, and the layers pinned at 8 bits (not sites)."""
    g.toposort()
    _name(g)
    plan = make_plan(g, granularity=granularity, bits=8, precision={}, exclude=(), absorb=True, weight_only=False)
    dot_order = [n.name for n in g.nodes if n.op in LAYER_OPS]
    pins = Matcher([p for p in pin if p != "none"], dot_order)
    sites, pinned = [], []
    for name, wp in plan.weights.items():
        if not wp.readers or wp.readers[0].op not in LAYER_OPS:
            continue
        node = wp.readers[0]
        if pins.any(node):
            pinned.append(node.name)
            continue
        sites.append(Site(key=node.name, kind="weight", tensors=(name,), op=node.op,
                          params=int(wp.tensor.values.size), axis=wp.axis))
    for root, members in plan.groups().items():
        free = tuple(m for m in members if m not in plan.derived and m not in plan.fixed)
        if not free:
            continue
        prod = ir.producer(plan.acts[root])
        sites.append(Site(key=root, kind="act", tensors=free, op=prod.op if prod is not None else "input"))
    return sites, pinned


def _name(g: ir.Graph) -> None:
    """Unique node names, as ``quant`` gives them (decisions refer to nodes by name)."""
    seen: set[str] = set()
    for node in g.nodes:
        if not node.name or node.name in seen:
            node.name = ir.fresh_name(g, node.name or node.op)
        seen.add(node.name)


def compute(g: ir.Graph, ctx: Context, o: SensitivityOptions, *, metric=None) -> SensitivityTable:
    if ctx.calib is None:
        raise ModelError("sensitivity needs calibration data (the layers' inputs): give --calib (CLI) or calib= (API)")
    sites, pinned = sites_of(g, o.granularity, o.pin)
    kinds = {CANDIDATES[c][0] for c in o.candidates}
    sites = [s for s in sites if s.kind in kinds]
    if not sites:
        raise ModelError("sensitivity: no quantizable site for the candidates " + ";".join(o.candidates))
    samples = ctx.calib if len(ctx.calib) <= o.samples else ctx.calib.subset(range(o.samples))
    executor = o.executor or getattr(ctx, "executor", "") or "process"
    table = measure(ir.to_model(g), sites, samples, candidates=o.candidates, proxy=o.proxy if metric is None else "metric",
                    metric=metric, batch_size=o.batch_size, executor=executor, workers=o.workers,
                    progress=ctx.progress)
    table.pinned = pinned
    return table


# ----------------------------------------------------------------------------- quant:budget

_SIZE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[0-9+-]+)?)(b|kb|mb|gb)?$")
_BITS = re.compile(r"^([0-9]*\.?[0-9]+)bits?$")


@dataclass
class Budget:
    kind: str           # "bits" | "bytes" | "noise"
    value: float        # average bits, bytes, or the largest Ω
    text: str


def parse_budget(text: str) -> Budget:
    """``5bits`` | ``avg:5`` (average weight bits), ``2.5MB`` | ``900kB`` | ``123456`` (bytes), ``sqnr:DB``,
    ``cosine:C`` (a largest predicted output noise Ω)."""
    t = text.strip().lower().replace(" ", "")
    try:
        if t.startswith("sqnr:"):
            return Budget("noise", 10 ** (-float(t[5:]) / 10), text)
        if t.startswith("cosine:"):
            c = float(t[7:])
            if not 0 < c < 1:
                raise OptionError(f"quant:budget={text}: the cosine must be within (0, 1)")
            return Budget("noise", 1 / c ** 2 - 1, text)
        if t.startswith("avg:"):
            return Budget("bits", float(t[4:]), text)
    except ValueError:
        raise OptionError(f"quant:budget={text!r}: not a number after the colon") from None
    m = _BITS.match(t)
    if m:
        return Budget("bits", float(m.group(1)), text)
    m = _SIZE.match(t)
    if m:
        mult = {None: 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}[m.group(2)]
        return Budget("bytes", float(m.group(1)) * mult, text)
    raise OptionError(f"quant:budget={text!r}: give average bits (5bits), bytes (2.5MB), sqnr:DB or cosine:C")


def check_mixed_options(opts) -> None:
    """``quant``'s budget and exclude=auto:K, checked when the options are parsed (OptionError)."""
    if opts.budget:
        parse_budget(opts.budget)
    for e in opts.exclude:
        if e.startswith("auto:"):
            _auto_k(e)


def apply_budget(g: ir.Graph, ctx: Context, opts) -> tuple[object, dict]:
    """``quant``'s options with the allocator's decision in ``precision`` / ``act_precision`` / ``exclude``,
    and the notes that explain it. Uses ``ctx.sensitivity`` when it was measured on this graph."""
    notes: dict = {}
    auto = [e for e in opts.exclude if e.startswith("auto:")]
    budget = parse_budget(opts.budget) if opts.budget else None
    need = set()
    if budget is not None:
        need |= {"a8", "a16"} if budget.kind == "noise" and opts.act_bits == 8 and not opts.weight_only else set()
        if budget.kind != "noise" or not need:
            need |= {"w8", "w6", "w4"}
    if auto:
        need |= {f"w{opts.bits}"} | ({f"a{opts.act_bits}"} if not opts.weight_only else set())
    table = _table_for(g, ctx, sorted(need), opts)
    notes["sensitivity"] = {"sites": len(table.sites), "samples": table.samples, "reused": table is ctx.sensitivity}
    precision = dict(opts.precision)
    act_precision = dict(opts.act_precision)
    exclude = [e for e in opts.exclude if not e.startswith("auto:")]
    if auto:
        k = _auto_k(auto[0])
        worst = rank_layers(g, table, opts.bits, opts.act_bits)[:k]
        exclude += [name for name, _ in worst]
        notes["auto_excluded"] = {name: round(-10 * math.log10(max(err, 1e-30)), 2) for name, err in worst}
    new = replace(opts, precision=precision, act_precision=act_precision, exclude=tuple(exclude))
    if budget is None:
        return new, notes
    details: dict = {}
    pinned = [p for p in table.pinned if p not in exclude]
    weights = [s for s in table.sites if s.kind == "weight" and s.key not in exclude and s.key not in pinned]
    acts = [s for s in table.sites if s.kind == "act"]
    wcands = [c for c in table.candidates("weight")]
    if budget.kind == "noise" and "a16" in table.candidates("act"):
        options = {s.key: {c: (0.0 if c == "a8" else 1.0, table.error(s.key, c)) for c in ("a8", "a16")
                           if (s.key, c) in table.noise} for s in acts}
        fixed = sum(table.error(s.key, f"w{opts.bits}") for s in weights if (s.key, f"w{opts.bits}") in table.noise)
        alloc = min_cost(options, max(budget.value - fixed, 0.0))
        for key, c in alloc.choice.items():
            if c == "a16":
                act_precision[key] = 16
        notes["allocation"] = _alloc_notes(alloc, budget, fixed, unit="16-bit tensors")
        notes["allocation"]["act16"] = sorted(k for k, c in alloc.choice.items() if c == "a16")
    else:
        options = {s.key: {c: (s.params * CANDIDATES[c][1] / 8, table.error(s.key, c)) for c in wcands
                           if (s.key, c) in table.noise} for s in weights}
        pinned_bytes = sum(_params(g, n) for n in pinned)       # 8 bits: one byte per parameter
        total_params = sum(s.params for s in weights) + pinned_bytes
        if budget.kind == "noise":
            alloc = min_cost(options, budget.value)
        else:
            limit = budget.value * total_params / 8 if budget.kind == "bits" else budget.value
            alloc = solve(options, limit - pinned_bytes)
            if not alloc.feasible:
                raise ModelError(f"quant:budget={budget.text}: {alloc.notes.get('why')} (with {len(pinned)} pinned "
                                 f"layers at 8 bits: {pinned_bytes} bytes)")
        for key, c in alloc.choice.items():
            precision[key] = CANDIDATES[c][1]
        size = alloc.cost + pinned_bytes
        notes["allocation"] = _alloc_notes(alloc, budget, 0.0, unit="bytes")
        notes["allocation"].update({
            "weight_bytes_packed": int(round(size)), "average_bits": round(8 * size / max(total_params, 1), 3),
            "bits": {f"{b}b": sum(1 for c in alloc.choice.values() if CANDIDATES[c][1] == b) for b in
                     sorted({CANDIDATES[c][1] for c in alloc.choice.values()}, reverse=True)},
            "pinned": pinned})
        details["pareto"] = [{"bytes": int(round(p.cost + pinned_bytes)),
                                          "average_bits": round(8 * (p.cost + pinned_bytes) / max(total_params, 1), 3),
                                          "predicted_sqnr_db": _db(p.error)} for p in _thin(pareto(options), 12)]
    details["per_site"] = [
        {"site": k, "choice": c, "predicted_sqnr_db": _db(table.error(k, c))} for k, c in alloc.choice.items()]
    notes["details"] = {"mixed": details}
    new = replace(new, precision=precision, act_precision=act_precision,
                  storage4="int8" if budget.kind != "noise" else opts.storage4)
    return new, notes


def _alloc_notes(alloc: Allocation, budget: Budget, fixed: float, unit: str) -> dict:
    return {"budget": budget.text, "method": alloc.method, "feasible": alloc.feasible, "cost": alloc.cost,
            "cost_unit": unit, "predicted_sqnr_db": _db(alloc.error + fixed), **alloc.notes}


def _thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    idx = np.unique(np.linspace(0, len(points) - 1, n).round().astype(int))
    return [points[i] for i in idx]


def _db(err: float) -> float | None:
    return round(-10 * math.log10(err), 2) if err > 0 else None


def _params(g: ir.Graph, node_name: str) -> int:
    node = next((n for n in g.nodes if n.name == node_name), None)
    if node is None:
        return 0
    for t in node.inputs[:2]:
        if isinstance(t, ir.Constant):
            return int(t.values.size)
    return 0


def _auto_k(text: str) -> int:
    try:
        k = int(text.split(":", 1)[1])
    except ValueError:
        raise OptionError(f"quant:exclude={text}: expected auto:K with an integer K") from None
    if k < 0:
        raise OptionError(f"quant:exclude={text}: K must be >= 0")
    return k


def _table_for(g: ir.Graph, ctx: Context, need: list[str], opts) -> SensitivityTable:
    from qgraph.calibrate import fingerprint
    table = getattr(ctx, "sensitivity", None)
    model_fp = fingerprint(ir.to_model(g))
    if table is not None and table.fingerprint == model_fp and set(need) <= set(table.candidates()):
        return table
    # every layer measured (exclude=auto:k may pick the first or last); the budget still pins first/last
    o = SensitivityOptions(candidates=tuple(need), granularity=opts.granularity, show=0, plot=False, pin=())
    table = compute(g, ctx, o)
    dot_order = [n.name for n in g.nodes if n.op in LAYER_OPS]
    pins = Matcher(list(SensitivityOptions.__dataclass_fields__["pin"].default), dot_order)
    table.pinned = [s.key for s in table.sites if s.kind == "weight" and pins.any(_node(g, s.key))]
    ctx.sensitivity = table
    return table


def _node(g: ir.Graph, name: str):
    return next(n for n in g.nodes if n.name == name)


def rank_layers(g: ir.Graph, table: SensitivityTable, bits: int, act_bits: int) -> list[tuple[str, float]]:
    """Layers by one-at-a-time error, worst first: the weight at ``bits`` plus its input at ``act_bits``."""
    act_of = {t: s.key for s in table.sites if s.kind == "act" for t in s.tensors}
    out = []
    for s in table.sites:
        if s.kind != "weight":
            continue
        err = table.noise.get((s.key, f"w{bits}"), 0.0)
        node = next((n for n in g.nodes if n.name == s.key), None)
        if node is not None and node.inputs and node.inputs[0].name in act_of:
            err += table.noise.get((act_of[node.inputs[0].name], f"a{act_bits}"), 0.0)
        out.append((s.key, err))
    out.sort(key=lambda kv: -kv[1])
    return out


# ----------------------------------------------------------------------------- --explain-quant

def effective_bits(q: np.ndarray) -> int:
    """The weight bits an integer tensor uses: 5/6-bit weights live in int8 with a narrow symmetric range
    ([-15, 15], [-31, 31]), so the DequantizeLinear type alone says 8; the largest |q| says 2 + log2."""
    m = int(np.max(np.abs(q.astype(np.int64)))) if q.size else 0
    return max(2, int(math.ceil(math.log2(m + 1))) + 1)


def explain_quant(ctx: Context, quant_model: onnx.ModelProto, n: int, *, samples: int = 16,
                  executor: str = "", workers: int = 2) -> dict:
    """The ``n`` quantized layers contributing most output error: one at a time (only that layer's weight
    and input quantized as in the final model, all else float) and all-but-one (the final model with
    only that layer's weight and input back in float: the dB gained), with suggested exclusions."""
    if ctx.quant is None:
        raise OptionError("--explain-quant needs a 'quant' pass in the pipeline")
    if ctx.calib is None:
        raise ModelError("--explain-quant needs calibration data (--calib)")
    data = ctx.calib if len(ctx.calib) <= samples else ctx.calib.subset(range(samples))
    qg = ir.load(quant_model, infer_shapes=False)
    groups = [grp for grp in find_groups(qg) if grp.w_dq is not None]
    chosen: dict[str, tuple[int, str | None, int | None]] = {}
    for grp in groups:
        x = grp.x_dq
        src = float_source(x) if x is not None else None
        x_name = src.name if src is not None else None
        a_bits = int(qparams_of(x).bits) if src is not None else None
        chosen[grp.node.name] = (effective_bits(grp.weight_int), x_name, a_bits)
    fg = ir.load(ctx.quant.float_model, infer_shapes=False)
    sites, _ = sites_of(fg, "channel", ())
    by_key = {s.key: s for s in sites}
    act_site = {t: s for s in sites if s.kind == "act" for t in s.tensors}
    for node in fg.nodes:   # an absorbed ReLU/Clip: its input is what Q reads in the quantized model
        if node.op in ("Relu", "Clip") and node.outputs and node.outputs[0].name in act_site:
            act_site.setdefault(node.inputs[0].name, act_site[node.outputs[0].name])
    use, per_site = [], {}
    for layer, (wb, x_name, ab) in chosen.items():
        if layer in by_key:
            use.append(by_key[layer])
            per_site[layer] = [f"w{wb}"]
        if x_name in act_site and ab is not None:
            s = act_site[x_name]
            if s.key not in per_site:
                use.append(s)
            per_site[s.key] = [f"a{ab}"]
    table = measure(ctx.quant.float_model, use, data, per_site=per_site, candidates=(), batch_size=8,
                    executor=executor or getattr(ctx, "executor", "") or "process", workers=workers,
                    progress=ctx.progress)
    one = {}
    for layer, (wb, x_name, ab) in chosen.items():
        err = table.noise.get((layer, f"w{wb}"), 0.0)
        if x_name in act_site and ab is not None:
            err += table.noise.get((act_site[x_name].key, f"a{ab}"), 0.0)
        one[layer] = err
    ranked = sorted(one, key=lambda k: -one[k])
    base = _model_noise(ctx.quant.float_model, quant_model, data)
    rows = []
    for layer in ranked[:max(n, 0)]:
        restored = _restore_layer(quant_model, layer, ctx)
        abo = _model_noise(ctx.quant.float_model, restored, data)
        rows.append({"layer": layer, "op": next(g.node.op for g in groups if g.node.name == layer),
                     "weight_bits": chosen[layer][0], "input_bits": chosen[layer][2],
                     "one_at_a_time_sqnr_db": _db(one[layer]), "all_but_one_sqnr_db": _db(abo),
                     "gain_db": round(_db(abo) - _db(base), 2) if abo > 0 and base > 0 else None})
    suggest = [r["layer"] for r in rows if r["gain_db"] is not None and r["gain_db"] >= 1.0]
    return {"samples": len(data), "model_sqnr_db": _db(base), "layers": rows,
            "suggest": f"quant:exclude={';'.join(suggest)}" if suggest else "no single layer gains >= 1 dB when left float"}


def format_explain(e: dict) -> str:
    lines = [f"explain-quant: output SQNR of the quantized model {e['model_sqnr_db']} dB on {e['samples']} samples; "
             f"layers contributing most error:",
             f"  {'layer':<40} {'op':<8} {'w':>2} {'x':>3}  {'one-at-a-time':>13}  {'all-but-one':>11}  {'gain':>6}"]
    for r in e["layers"]:
        lines.append(f"  {r['layer'][:40]:<40} {r['op']:<8} {r['weight_bits']:>2} {str(r['input_bits'] or '-'):>3}  "
                     f"{_fmt(r['one_at_a_time_sqnr_db']):>10} dB  {_fmt(r['all_but_one_sqnr_db']):>8} dB  "
                     f"{_fmt(r['gain_db']):>6}")
    lines.append(f"  suggestion: {e['suggest']}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _model_noise(float_model: onnx.ModelProto, model: onnx.ModelProto, data) -> float:
    from qgraph.calibrate import stream
    outs = [o.name for o in float_model.graph.output]
    sig = noise = 0.0
    for ref, y in zip(stream(float_model, outs, data, batch_size=8), stream(model, outs, data, batch_size=8)):
        for o in outs:
            r = ref[o].astype(np.float64)
            sig += float(np.vdot(r, r))
            d = y[o].astype(np.float64) - r
            noise += float(np.vdot(d, d))
    return noise / sig if sig > 0 else float("inf")


def _restore_layer(quant_model: onnx.ModelProto, layer: str, ctx: Context) -> onnx.ModelProto:
    """The quantized model with ``layer``'s weight and input back in float (its bias stays int32)."""
    g = ir.load(quant_model, infer_shapes=False)
    node = next(n for n in g.nodes if n.name == layer)
    from qgraph.ops import match_group
    grp = match_group(node)
    if grp is None:
        return quant_model
    w_dq = grp.w_dq
    if w_dq is not None and w_dq.outputs[0].name in ctx.quant.float_weights:
        w = ir.add_const(g, layer + "_float_w", ctx.quant.float_weights[w_dq.outputs[0].name])
        ir.swap_input(node, w_dq.outputs[0], w)
    x_dq = grp.x_dq
    src = float_source(x_dq) if x_dq is not None else None
    if src is not None:
        # the float input, saturated where Q saturates (that is the absorbed ReLU/Clip, if any)
        lo, hi = qparams_of(x_dq).real_range()
        ir.swap_input(node, x_dq.outputs[0], src)
        ir.splice(g, src, "Clip", only=[node], name=layer + "_float_x", dtype=np.float32,
                  extra_inputs=[ir.add_const(g, layer + "_lo", np.asarray(lo, np.float32).reshape(())),
                                ir.add_const(g, layer + "_hi", np.asarray(hi, np.float32).reshape(()))])
    g.cleanup().toposort()
    return ir.to_model(g)
