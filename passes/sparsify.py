"""Unstructured sparsity: weights set to exactly zero, by magnitude (Han et al. 2015, "Learning both
Weights and Connections", §3) or by the optimal brain surgeon on calibration data (SparseGPT,
Frantar & Alistarh 2023, §3), without retraining.

How many per layer: ``scope=layer`` gives every layer ``sparsity``; ``scope=global`` puts one threshold
over all chosen layers together, so each layer ends with its own sparsity: on |w| without
reconstruction (Deep Compression's threshold), on each weight's OBS saliency w² / [H⁻¹]_jj relative
to its layer's output energy tr(W H Wᵀ) with it (the share of that layer's output the weight costs
when it goes alone and the others absorb its error: comparable from layer to layer).

How: ``reconstruct=false`` zeroes the smallest |w|. ``reconstruct=true`` keeps each layer's output on
the calibration data: with H = Σ x xᵀ of the layer's inputs (measured on the model as already
sparsified upstream, layer by layer in topological order) and U = chol(H⁻¹)ᵀ, each block of 128
input columns drops its entries of smallest saliency w² / U_jj², and every dropped weight's error
e = w_j / U_jj moves to the columns not yet visited (W_:,k −= e · U_jk): the reconstruction SparseGPT
does in one pass instead of OBS's one weight at a time.

The zeros are exact and later passes keep them: ``quant`` maps 0 to the zero point (symmetric or
asymmetric grids alike), and its ``rounding=gptq`` pins the zeros of the layers recorded in
``ctx.sparsity``; ``weight_grid=binary`` (no zero level) refuses those layers by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.errors import QGraphError
from qgraph.ops import LAYER_OPS
from qgraph.passes.quant_placement import Matcher
from qgraph.pipeline import Context, Pass, PassResult, not_quantized, option
from qgraph.calibrate import batch_size_for
from qgraph.reconstruct import (BLOCK, DAMP, Fit, InputCache, NormalEquations, current_matrix, masked_refit,
                                run_pair, sparse_gpt, truncated, waves, write_matrix)
from qgraph.rounding import collect_hessians, layer_matrix


@dataclass
class SparsifyOptions:
    sparsity: float = option(0.9, "fraction of the chosen layers' weights set to zero, in (0, 1)")
    scope: str = option("global", "one magnitude threshold over all layers (each ends with its own sparsity), "
                                  "or the same sparsity in every layer", choices=("global", "layer"))
    reconstruct: bool = option(True, "OBS reconstruction on calibration data (SparseGPT): choose the zeros by "
                                     "w²/[H⁻¹]_jj and update the remaining weights")
    allocation: str = option("magnitude", "scope=global: one threshold on |w| (Deep Compression) or on each weight's "
                                          "OBS saliency relative to its layer's output energy", choices=("magnitude", "obs"))
    ops: tuple[str, ...] = option(("Conv", "Gemm", "MatMul"), "layer types to sparsify")
    exclude: tuple[str, ...] = option((), "layers left dense: names, op types, first/last, regexes")
    refit: bool = option(True, "after SparseGPT, refit each layer's remaining weights to the original model's "
                               "outputs (least squares on calibration data)")
    ridge: float = option(1e-3, "refit ridge term, relative to the mean of diag(XᵀX)", range=(0.0, 1e6))
    locations: int = option(256, "convolution positions sampled per image (0: all)", range=(0, 1 << 30))
    damp: float = option(DAMP, "damping added to diag(H), relative to its mean", range=(0.0, 1.0))
    block: int = option(BLOCK, "columns per SparseGPT block (the mask is chosen per block)", range=(1, 1 << 20))
    samples: int = option(0, "calibration samples used (0: all)", range=(0, 1 << 30))
    batch_size: int = option(16, "calibration batch size", range=(1, 1 << 16))

    def validate(self) -> str | None:
        if not 0.0 < self.sparsity < 1.0:
            return f"sparsity must be in (0, 1), got {self.sparsity}"
        unknown = [op for op in self.ops if op not in LAYER_OPS]
        if unknown:
            return f"ops: {', '.join(unknown)} is not a layer type ({', '.join(LAYER_OPS)})"
        return None


class Sparsify(Pass):
    __doc__ = __doc__
    name = "sparsify"
    summary = "unstructured sparsity: magnitude or OBS (SparseGPT) pruning of weights, exact zeros"
    options = SparsifyOptions
    requires = (not_quantized,)
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        o = self.opts
        layers = self._layers(g)
        if not layers:
            raise QGraphError(f"no {'/'.join(o.ops)} layer with a constant weight to sparsify")
        weights = {n.name: np.asarray(ir.const(n.inputs[1])) for n in layers}
        errors: dict[str, tuple[float, float]] = {}
        if o.reconstruct:
            if ctx.calib is None:
                raise QGraphError("sparsify:reconstruct=true needs calibration data: give --calib (CLI) or "
                                  "calib= (API), or set reconstruct=false (magnitude)")
            samples = ctx.calib if not o.samples or o.samples >= len(ctx.calib) else ctx.calib.subset(range(o.samples))
            by_obs = o.scope == "global" and o.allocation == "obs"
            target = self._allocation(self._saliencies(g, layers, samples, ctx) if by_obs else weights)
            errors = self._obs(g, {n.name: n for n in layers}, target, samples, ctx)
        else:
            target = self._allocation({n: np.abs(w) for n, w in weights.items()})
        if not o.reconstruct:
            for node in layers:
                w = weights[node.name]
                k = int(round(target[node.name] * w.size))
                if k:
                    cut = np.argpartition(np.abs(w).reshape(-1), k - 1)[:k]
                    w = w.copy().reshape(-1)
                    w[cut] = 0
                    node.inputs[1] = ir.add_const(g, node.inputs[1].name, w.reshape(weights[node.name].shape))
        per_layer, zeros, total = {}, 0, 0
        for node in layers:
            w = np.asarray(ir.const(node.inputs[1]))
            z = int(np.count_nonzero(w == 0))
            per_layer[node.name] = round(z / w.size, 4)
            zeros, total = zeros + z, total + w.size
            ctx.sparsity[node.name] = z / w.size
        notes = {"sparsity": round(zeros / total, 4), "zeros": zeros, "weights": total, "per_layer": per_layer}
        if errors:
            # each layer's output error on the calibration data relative to its output energy:
            # zeroing the same weights vs SparseGPT's (geometric means over layers)
            mags = np.array([e[0] for e in errors.values()])
            obs = np.array([e[1] for e in errors.values()])
            notes["output_error"] = {"magnitude": _gmean(mags), "obs": _gmean(obs)}
        return PassResult(modified=zeros > 0, notes=notes)

    def _layers(self, g) -> list:
        o = self.opts
        cands = [n for n in g.nodes if n.op in o.ops and len(n.inputs) > 1 and ir.const(n.inputs[1]) is not None]
        excluded = Matcher(o.exclude, [n.name for n in g.nodes if n.op in LAYER_OPS])
        out = []
        for n in cands:
            if excluded.any(n):
                continue
            if n.op == "Gemm" and n.attrs.get("transA", 0):
                continue
            out.append(n)
        _name_layers(g, out)
        return out

    def _saliencies(self, g, layers, samples, ctx: Context) -> dict[str, np.ndarray]:
        """Each weight's OBS saliency w² / [H⁻¹]_jj relative to its layer's output energy tr(W H Wᵀ): the
        share of the layer's output it costs when it goes alone (its error moved to the others), so
        one threshold compares layers (measured once, on the dense model)."""
        o = self.opts
        model = truncated(ir.to_model(g), list(dict.fromkeys(n.inputs[0].name for n in layers)))
        spec = {n.name: (n, n.inputs[0].name, tuple(n.inputs[1].shape), tuple(n.inputs[0].shape)) for n in layers}
        hs = collect_hessians(model, spec, samples, batch_size=o.batch_size, progress=ctx.progress,
                              desc="sparsify: saliencies")
        out = {}
        for node in layers:
            h = hs.h[node.name] / max(hs.count[node.name], 1)
            m, _ = layer_matrix(node, np.asarray(ir.const(node.inputs[1]), np.float64))
            k = h.shape[1]
            idx = np.arange(k)
            hd = h.copy()
            dead = hd[:, idx, idx] <= 0
            hd[:, idx, idx] += o.damp * np.maximum(hd[:, idx, idx].mean(axis=1, keepdims=True), 1e-12) + dead
            hinv = np.diagonal(np.linalg.inv(hd), axis1=1, axis2=2)        # [G, K]
            energy = max(float(np.sum((m @ h) * m)), 1e-30)
            out[node.name] = (m ** 2 / hinv[:, None, :] / energy).reshape(-1)
        return out

    def _allocation(self, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """Sparsity per layer: ``sparsity`` everywhere, or the fraction under one global threshold of the
        scores (|w| for magnitude pruning, relative OBS saliency with reconstruction)."""
        o = self.opts
        if o.scope == "layer":
            return {n: o.sparsity for n in scores}
        mags = np.concatenate([np.abs(w).reshape(-1) for w in scores.values()])
        k = int(round(o.sparsity * mags.size))
        t = np.partition(mags, k - 1)[k - 1] if k else -np.inf
        out = {}
        for n, w in scores.items():
            a = np.abs(w).reshape(-1)
            below = np.count_nonzero(a < t)
            ties = np.count_nonzero(a == t)
            out[n] = (below + ties * _tie_share(mags, t, k)) / a.size
        return out

    def _obs(self, g, nodes: dict, target: dict[str, float], samples, ctx: Context) -> dict[str, tuple]:
        """SparseGPT, layer by layer in topological order on the model as sparsified so far; then the
        weights that stay are refit to the original model's outputs (``qgraph.reconstruct``), so a
        layer also corrects what the layers before it lost."""
        o = self.opts
        errors = {}
        original = ir.to_model(g)
        feeds = InputCache(samples, batch_size_for(original, o.batch_size))
        for names in waves(g, list(nodes)):
            fits = {n: Fit(nodes[n], nodes[n].outputs[0].name) for n in names}
            pruned = truncated(ir.to_model(g), list(dict.fromkeys(nodes[n].inputs[0].name for n in names)))
            orig = truncated(original, [f.target for f in fits.values()])
            eq = NormalEquations(fits, locations=o.locations, seed=ctx.seed)
            for xs, ys in run_pair(pruned, orig, feeds):
                for n in names:
                    eq.update(n, xs[nodes[n].inputs[0].name], ys[fits[n].target])
            for n in names:
                node = nodes[n]
                h = eq.a[n] / max(eq.rows[n], 1)
                m = current_matrix(node)                    # [G, R, K(+1)]: weights (and bias) as fit
                fixed = np.zeros(m.shape[2], bool)
                if eq.has_bias(node):
                    fixed[-1] = True                       # the bias absorbs errors, is never pruned
                sparse = sparse_gpt(m, h, target[n], damp=o.damp, block=o.block, fixed=fixed)
                before = eq.error(n, _with_magnitude(m, fixed, target[n]))     # magnitude pruning, for the notes
                if o.refit:
                    sparse = masked_refit(eq, n, sparse, o.ridge)
                norm = max(eq.yy[n], 1e-30)
                errors[n] = (before / norm, eq.error(n, sparse) / norm)
                write_matrix(g, node, sparse)
        return errors


def _with_magnitude(m: np.ndarray, fixed: np.ndarray, sparsity: float) -> np.ndarray:
    mag = m.copy()
    mag[..., ~fixed] = _magnitude(m[..., ~fixed], sparsity)
    return mag


def _magnitude(m: np.ndarray, sparsity: float) -> np.ndarray:
    out = m.copy().reshape(-1)
    k = int(round(sparsity * out.size))
    if k:
        out[np.argpartition(np.abs(out), k - 1)[:k]] = 0
    return out.reshape(m.shape)


def _err(m: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = m - q
    return float(np.sum((d @ h) * d))


def _gmean(v: np.ndarray) -> float:
    return round(float(np.exp(np.mean(np.log(np.maximum(v, 1e-12))))), 6)


def _tie_share(mags: np.ndarray, t: float, k: int) -> float:
    """Of the weights equal to the threshold, the share the global count still takes."""
    below = np.count_nonzero(mags < t)
    ties = np.count_nonzero(mags == t)
    return (k - below) / ties if ties else 0.0


def _name_layers(g, layers) -> None:
    seen = {n.name for n in g.nodes if n.name}
    for i, node in enumerate(layers):
        if not node.name:
            node.name = ir.fresh_name(g, f"{node.op}_{i}")
            seen.add(node.name)
