"""Cross-layer equalization and bias absorption (Nagel et al. 2019, "Data-Free Quantization", §4.1–4.2).

For W1 (output channel i) feeding W2 (input channel i) through a positively homogeneous f
(ReLU, PReLU, LeakyReLU, max/average pooling, zero padding: f(x/s) = f(x)/s for s > 0):

    s_i = sqrt(r1_i · r2_i) / r2_i,     W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i

where r1_i, r2_i are the ranges (max |w|) of channel i in W1 and W2. Afterwards both layers have
range sqrt(r1_i · r2_i) in channel i, which is what per-tensor quantization wants. Depthwise and
grouped convolutions map input channel i of W2 to its group's output channels. Pairs sharing a layer
(expand → depthwise → project) are iterated until the scales converge.

ReLU6 / Clip(0, m) is not homogeneous: f(x/s) = min(max(x/s, 0), m) ≠ f(x)/s. ``relu6=`` says what to do:
    carry  keep the function: the bound becomes m/s_i per channel (Relu followed by Min with a
           per-channel constant; a single scalar Clip when every bound is equal)
    relu   replace it by ReLU, as DFQ does (changes the function: the report says so)
    skip   leave the pair alone, reported with its reason

Bias absorption (``absorb=true``, §4.2): with the BatchNorm statistics that ``fold`` kept
(layer output ~ N(β, γ²) per channel), c_i = max(0, β_i − 3γ_i) is almost always passed through by
ReLU, so it moves to the next layer: b1 -= c, b2 += W2 · c. This narrows the activation range; at
the borders of a zero-padded W2 it is approximate, so the pass no longer claims exactness.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.analysis import EQUALIZABLE_OPS, NO_PAIR, Chain, CoupledSet, coupled_sets, equalization_pair
from qgraph.ops import Skip, channel_ranges, clip_bounds, const_at, per_channel_weight, weight_times_input
from qgraph.patterns import Rule, apply_rules
from qgraph.pipeline import Context, Pass, PassResult, no_batchnorm, not_quantized, option


@dataclass
class EqualizeOptions:
    iterations: int = option(20, "maximum sweeps over all pairs", range=(1, 1000))
    tol: float = option(1e-6, "stop when every scale is within this of 1 (relative)", range=(0.0, 1.0))
    relu6: str = option("carry", "ReLU6/Clip between layers", choices=("carry", "relu", "skip"))
    absorb: bool = option(False, "bias absorption through ReLU using fold's BatchNorm statistics")
    coupled: bool = option(True, "equalize residual streams and fan-outs as a whole: all layers writing a "
                                 "channel against all layers reading it")
    min_range: float = option(1e-8, "channels with a smaller weight range are left unscaled", range=(0.0, 1.0))


class EqualizeCrossLayer(Pass):
    name = "equalize"
    summary = "cross-layer equalization of Conv/Gemm pairs (DFQ), ReLU6 kept exact, optional bias absorption"
    options = EqualizeOptions
    requires = (no_batchnorm, not_quantized)
    tolerance = 1e-4

    def __init__(self, opts=None, **values):
        super().__init__(opts, **values)
        # replacing ReLU6 by ReLU or absorbing biases changes outputs on purpose
        self.preserves_function = self.opts.relu6 != "relu" and not self.opts.absorb

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        pairs: list[Chain] = []
        report = apply_rules(g, [PAIR], _Pairing(self, pairs))
        skipped, details = report.skipped, report.details
        sets: list[CoupledSet] = []
        if self.opts.coupled:
            sets, refused_sets = coupled_sets(g)
            for name, s in refused_sets:
                skipped[s.reason] += 1
                details.append(f"stream '{name}': {s}")
        # one cumulative scale per chain (the clip bound and the BN statistics follow it)
        total = {id(c): np.ones(c.channels) for c in pairs}
        before = {id(c): (_out_ranges(c.first), _in_ranges(c.second, c.channels)) for c in pairs}
        sweeps = 0
        for sweeps in range(1, self.opts.iterations + 1):
            worst = 0.0
            for chain in pairs:
                s = self._scales(chain)
                _scale_out(chain.first, 1.0 / s)
                _scale_in(chain.second, s)
                total[id(chain)] *= s
                worst = max(worst, float(np.max(np.abs(s - 1.0))))
            for cs in sets:
                s = self._set_scales(cs)
                for layer in cs.producers:
                    _scale_out(layer, 1.0 / s)
                for layer in cs.consumers:
                    _scale_in(layer, s)
                total[id(cs)] = total.get(id(cs), 1.0) * s
                worst = max(worst, float(np.max(np.abs(s - 1.0))))
            if worst <= self.opts.tol:
                break
        bn_stats = ctx.bn_stats
        for cs in sets:
            for layer in cs.producers:
                key = layer.outputs[0].name
                if key in bn_stats and id(cs) in total:
                    bn_stats[key] = bn_stats[key].scaled(total[id(cs)])
        replaced = 0
        for chain in pairs:
            s = total[id(chain)]
            key = chain.first.outputs[0].name
            if key in bn_stats:
                bn_stats[key] = bn_stats[key].scaled(s)
            if chain.clip is not None:
                replaced += self._rewrite_clip(g, chain, s)
        absorbed = self._absorb(g, pairs, bn_stats, skipped, details) if self.opts.absorb else 0
        notes = {"pairs": len(pairs), "sweeps": sweeps if pairs or sets else 0}
        if sets:
            notes["coupled_sets"] = len(sets)
        if replaced:
            notes["relu6_" + self.opts.relu6] = replaced
        if self.opts.absorb:
            notes["absorbed"] = absorbed
        if skipped:
            notes["skipped"] = dict(skipped)
            notes["details"] = details
        notes["converged"] = bool(not (pairs or sets) or sweeps < self.opts.iterations)
        if ctx.plots and pairs:
            after = {id(c): (_out_ranges(c.first), _in_ranges(c.second, c.channels)) for c in pairs}
            notes["plots"] = plot_ranges(ctx.plots, pairs, before, after)
        return PassResult(modified=bool(pairs or sets), notes=notes)

    # -- scales ---------------------------------------------------------------------------

    def _scales(self, chain: Chain) -> np.ndarray:
        r1 = _out_ranges(chain.first)
        r2 = _in_ranges(chain.second, chain.channels)
        ok = (r1 > self.opts.min_range) & (r2 > self.opts.min_range)
        s = np.ones_like(r1)
        s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
        return s

    def _set_scales(self, cs: CoupledSet) -> np.ndarray:
        r1 = np.max([_out_ranges(p) for p in cs.producers], axis=0)
        r2 = np.max([_in_ranges(c, cs.channels) for c in cs.consumers], axis=0)
        ok = (r1 > self.opts.min_range) & (r2 > self.opts.min_range)
        s = np.ones_like(r1)
        s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
        return s

    # -- ReLU6 / Clip ---------------------------------------------------------------------

    def _clip_problem(self, chain: Chain) -> str | None:
        bounds = clip_bounds(chain.clip)
        if self.opts.relu6 == "skip":
            return "relu6_skipped"
        if bounds is None:
            return "clip_bound_not_constant"
        if bounds[0] != 0.0:
            return "clip_lower_bound_not_zero"
        return None

    def _rewrite_clip(self, g: ir.Graph, chain: Chain, s: np.ndarray) -> int:
        clip = chain.clip
        _, hi = clip_bounds(clip)
        if self.opts.relu6 == "relu":
            _make_relu(clip)
            return 1
        bounds = (hi / s).astype(np.float32)
        if np.allclose(bounds, bounds[0], rtol=0, atol=0) and not self.opts.absorb:
            _set_clip_max(g, clip, float(bounds[0]))
            return 1
        # Relu then Min with the per-channel bound m / s_i: the same function, channel by channel.
        # (A scalar Clip(0, max_i m/s_i) in place of the Relu measured worse after quantization:
        # MobileNetV2 per-tensor W8A8 78.50 vs 80.25 top-1.)
        _make_relu(clip)
        shape = (1, -1) + (1,) * max(0, _rank(clip.outputs[0]) - 2)
        c = ir.add_const(g, clip.name + "_bound", bounds.reshape(shape))
        ir.splice(g, clip.outputs[0], "Min", extra_inputs=[c], name=clip.name + "_min")
        chain.bound = c  # bias absorption lowers it by what it moves out
        return 1

    # -- bias absorption ------------------------------------------------------------------

    def _absorb(self, g: ir.Graph, pairs: list[Chain], bn_stats: dict, skipped: Counter, details: list) -> int:
        done = 0
        for chain in pairs:
            stats = bn_stats.get(chain.first.outputs[0].name)
            if stats is None:
                skipped["absorb_no_bn_stats"] += 1
                continue
            bound = getattr(chain, "bound", None)
            if chain.clip is not None and self.opts.relu6 == "carry" and bound is None:
                skipped["absorb_clip"] += 1
                continue
            if not all(n.op in ("Relu", "MaxPool", "Clip") for n in chain.between):
                skipped["absorb_not_relu"] += 1
                continue
            c = np.maximum(0.0, stats.beta - 3.0 * stats.gamma)
            if bound is not None:
                # min(relu(y − c), m − c) = min(relu(y), m) − c wherever y ≥ c: the bound moves down too
                b = ir.const(bound).astype(np.float64)
                c = np.minimum(c, b.reshape(-1))
                bound.values = (b - c.reshape(b.shape)).astype(np.float32)
            if not np.any(c > 0):
                continue
            _add_out_bias(g, chain.first, -c)
            _add_out_bias(g, chain.second, _propagate(chain.second, c))
            stats.beta = stats.beta - c
            done += 1
        return done


# ----------------------------------------------------------------------------- the pair rule

@dataclass
class _Pairing:
    eq: EqualizeCrossLayer
    pairs: list


def _match_pair(g: ir.Graph, first, st: _Pairing) -> Chain:
    """Conv|Gemm -> [Relu, pools, zero Pad, Flatten of 1x1, one ReLU6] -> Conv|Gemm, nothing else reading."""
    chain = equalization_pair(g, first)
    if chain.clip is not None:
        problem = st.eq._clip_problem(chain)
        if problem:
            raise Skip(problem, f"-> {chain.second.name}")
    return chain


PAIR = Rule("pair", EQUALIZABLE_OPS, _match_pair, lambda g, chain, st: st.pairs.append(chain),
            quiet=NO_PAIR + ("not_a_layer",), doc="a layer and the one layer reading its channels")


# ----------------------------------------------------------------------------- weight views

def _out_ranges(layer) -> np.ndarray:
    return channel_ranges(layer, ir.const(layer.inputs[1]), "out")


def _in_ranges(layer, channels: int) -> np.ndarray:
    return channel_ranges(layer, ir.const(layer.inputs[1]), "in")


def _scale_out(layer, f: np.ndarray) -> None:
    """W1[i] *= f_i, b1[i] *= f_i (output channels)."""
    t = layer.inputs[1]
    w = ir.const(t)
    t.values = _times(w, per_channel_weight(layer, f, w.shape, "out"))
    if const_at(layer, 2) is not None:
        b = layer.inputs[2]
        bv = ir.const(b)
        beta = float(layer.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
        if bv.size == f.size:
            b.values = (bv.astype(np.float64) * f.reshape(bv.shape)).astype(bv.dtype)
        elif bv.size == 1 and np.all(bv == 0):
            pass
        else:  # a broadcast scalar Gemm C: make it per channel first
            full = np.broadcast_to(bv.astype(np.float64).reshape(-1) * beta, f.shape) * f
            b.values = full.astype(bv.dtype)
            layer.attrs["beta"] = 1.0


def _scale_in(layer, s: np.ndarray) -> None:
    """W2[:, i] *= s_i (input channels)."""
    t = layer.inputs[1]
    w = ir.const(t)
    t.values = _times(w, per_channel_weight(layer, s, w.shape, "in"))


#: rows of a weight scaled at once by ``_times`` (a few MB of float64 temporaries, not the weight's size)
_CHUNK_ELEMENTS = 1 << 20


def _times(w: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(w · f) rounded to w's dtype, each product in float64; ``f`` broadcasts against ``w``. Slab by
    slab along axis 0: on a 25088 x 4096 FC (VGG-19) the whole-array form held three weight-sized
    float64 temporaries per call, twenty sweeps long."""
    out = np.empty_like(w)
    step = max(1, _CHUNK_ELEMENTS // max(1, w[0].size)) if w.ndim else 1
    if w.ndim == 0 or w.shape[0] <= step:
        return (w.astype(np.float64) * f).astype(w.dtype)
    f = np.asarray(f)
    for i in range(0, w.shape[0], step):
        fi = f[i:i + step] if f.ndim == w.ndim and f.shape[0] > 1 else f
        out[i:i + step] = w[i:i + step].astype(np.float64) * fi
    return out


def _propagate(layer, c: np.ndarray) -> np.ndarray:
    """W2 applied to a constant input c (per channel): the change of W2's output per output channel."""
    return weight_times_input(layer, ir.const(layer.inputs[1]), c)


def _add_out_bias(g: ir.Graph, layer, delta: np.ndarray) -> None:
    cout = _out_ranges(layer).size
    if const_at(layer, 2) is not None:
        b = layer.inputs[2]
        bv = ir.const(b).astype(np.float64)
        beta = float(layer.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
        new = np.broadcast_to(bv.reshape(-1) * beta, (cout,)) + delta
        b.values = new.astype(np.float32)
        if layer.op == "Gemm":
            layer.attrs["beta"] = 1.0
        return
    while len(layer.inputs) < 2:
        layer.inputs.append(ir.Variable.empty())
    layer.inputs.append(ir.add_const(g, layer.name + "_bias", delta.astype(np.float32)))
    if layer.op == "Gemm":
        layer.attrs["beta"] = 1.0


def _make_relu(clip) -> None:
    x = clip.inputs[0]
    clip.op = "Relu"
    clip.attrs.clear()
    clip.inputs.clear()
    clip.inputs.append(x)


def _set_clip_max(g: ir.Graph, clip, hi: float) -> None:
    x = clip.inputs[0]
    clip.attrs.clear()
    clip.inputs.clear()
    clip.inputs.extend([x, ir.add_const(g, clip.name + "_min", np.array(0.0, np.float32)),
                        ir.add_const(g, clip.name + "_max", np.array(hi, np.float32))])


def _rank(t) -> int:
    return len(t.shape) if t.shape is not None else 4


def plot_ranges(directory: str, pairs: list[Chain], before: dict, after: dict) -> int:
    """One PNG per equalized pair: per-channel weight ranges of both layers, before and after."""
    from pathlib import Path
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from qgraph.errors import OptionError
        raise OptionError("--plots needs matplotlib: pip install 'qgraph[plots]'") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(pairs):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
        for ax, (title, ranges) in zip(axes, (("before", before[id(c)]), ("after", after[id(c)]))):
            ch = np.arange(c.channels)
            ax.bar(ch - 0.2, ranges[0], width=0.4, label=f"{c.first.name} (out)")
            ax.bar(ch + 0.2, ranges[1], width=0.4, label=f"{c.second.name} (in)")
            ax.set_yscale("log")
            ax.set_title(f"{title}: max |w| per channel")
            ax.set_xlabel("channel")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.first.name)[-60:]
        fig.savefig(out / f"equalize_{k:03d}_{safe}.png", dpi=80)
        plt.close(fig)
    return len(pairs)
