"""Layer-wise reconstruction from calibration data, without retraining.

After channels are pruned, a layer that lost input channels sees X' (the pruned model's input, only
the kept channels) where it used to see X. ThiNet (Luo et al. 2017) and channel pruning by
reconstruction (He et al. 2017, §3) refit its weights so that its output matches the original one:

    W', b' = argmin  Σ_samples ||W' x' + b' − y||²  +  λ ||W'||²,     y = W x + b (the original model)
           = solve( (X̃ᵀX̃ + λ·mean(diag)·I),  X̃ᵀY ),                  X̃ = [X', 1]

X̃ᵀX̃ and X̃ᵀY are summed batch by batch (memory is one batch of activations plus K² + K·R numbers per
layer, whatever the number of samples). Convolutions use their input patches (im2col, per group; the
same patches GPTQ's Hessians use, ``qgraph.rounding``), at most ``locations`` positions per image.
Layers are refit in waves in topological order: a layer is measured once every refit layer upstream
of it is written, so it sees the inputs the final model will give it. A layer whose output is summed
with a skip path (an inverted-residual block's projection) can instead be fit to the original *block*
output: y = (original x_skip + W x + b) − x'_skip, with x'_skip the pruned model's skip, so the
projection also takes up what the blocks before it left wrong on the skip path, in sequence through
the network (ThiNet / He et al. 2017 fit each layer alone; this is their sequential form one join
further, as "reconstruct the block's output" in post-training block reconstruction, Li et al. 2021
BRECQ §3 for quantization).

``sparse_gpt`` is the unstructured counterpart (SparseGPT, Frantar & Alistarh 2023, §3): the optimal
brain surgeon step on the layer's H = X Xᵀ, pruning column by column by saliency w²/[H⁻¹]_jj and
moving each pruned weight's error onto the columns not yet visited.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qgraph import ir
from qgraph.calibrate import batch_size_for, progress_bar
from qgraph.rounding import _conv_geometry, _conv_patches, _upper_cholesky_of_inverse, layer_matrix

#: SparseGPT's lazy-update block and damping (its defaults)
BLOCK = 128
DAMP = 0.01


# ----------------------------------------------------------------------------- running parts of a model

def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``model`` cut after ``outputs`` (only the nodes they need): ORT runs every node it is given."""
    keep_out = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs]
    needed, frontier = set(), list(outputs)
    producers = {o: node for node in model.graph.node for o in node.output}
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        frontier.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input} | set(outputs)     # an output may be a graph input itself
    graph = onnx.helper.make_graph(nodes, model.graph.name, [i for i in model.graph.input if i.name in used],
                                   keep_out, [t for t in model.graph.initializer if t.name in used])
    cut = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    cut.ir_version = model.ir_version
    return cut


class InputCache:
    """The calibration batches, decoded once and kept when they fit in ``limit_mb`` (100 ImageNet
    images: 60 MB); otherwise fetched again for every run. Inputs only, never activations."""

    def __init__(self, samples, batch_size: int, limit_mb: float = 512.0):
        self.samples, self.batch_size = samples, batch_size
        self.kept: list[dict] | None = []
        size = 0.0
        for feed in samples.batches(batch_size):
            size += sum(v.nbytes for v in feed.values()) / 2**20
            if size > limit_mb:
                self.kept = None
                break
            self.kept.append(feed)

    def __iter__(self):
        return iter(self.kept) if self.kept is not None else self.samples.batches(self.batch_size)


def run_pair(first: onnx.ModelProto, second: onnx.ModelProto, feeds: InputCache):
    """Both models on the same batches, one ORT session each: yields ({name: value}, {name: value})."""
    from qgraph.ops import ort_session
    sessions = [ort_session(m) for m in (first, second)]
    outs = [[o.name for o in m.graph.output] for m in (first, second)]
    ins = [[i.name for i in s.get_inputs()] for s in sessions]
    for feed in feeds:
        yield tuple(dict(zip(o, s.run(o, {n: feed[n] for n in i}))) for s, o, i in zip(sessions, outs, ins))


def waves(g, names: list[str]) -> list[list[str]]:
    """Layer node names in rounds: a layer joins a round once every listed layer upstream of it is in
    an earlier one (layers of one round are measured in one calibration run)."""
    wanted = set(names)
    upstream: dict[int, set[str]] = {}
    level: dict[str, int] = {}
    for node in g.nodes:           # topological order
        ups: set[str] = set()
        for t in node.inputs:
            p = ir.producer(t) if t is not None else None
            if p is None:
                continue
            ups |= upstream.get(id(p), set())
            if p.name in wanted:
                ups.add(p.name)
        upstream[id(node)] = ups
        if node.name in wanted:
            level[node.name] = 1 + max((level[u] for u in ups if u in level), default=-1)
    rounds: dict[int, list[str]] = {}
    for name in names:
        rounds.setdefault(level[name], []).append(name)
    return [rounds[k] for k in sorted(rounds)]


def _layer_rows(node, x: np.ndarray, geo, pick) -> np.ndarray:
    """The layer's input as [G, K, rows] for one batch (conv patches: ``pick`` chooses positions)."""
    if node.op == "Conv":
        cols = []
        for img in x.astype(np.float32, copy=False):
            p = _conv_patches(img, geo)
            cols.append(p[:, :, pick(p.shape[2])])
        return np.concatenate(cols, axis=2)
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        x = x.T
    return x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False).T[None]


def _layer_targets(node, y: np.ndarray, groups: int, pick_idx: list) -> np.ndarray:
    """The layer's output as [G, R, rows], the same rows as ``_layer_rows``."""
    if node.op == "Conv":
        cols = []
        for img, idx in zip(y, pick_idx):
            v = img.reshape(img.shape[0], -1)[:, idx]
            cols.append(v.reshape(groups, -1, v.shape[1]))
        return np.concatenate(cols, axis=2)
    return y.reshape(-1, y.shape[-1]).astype(np.float32, copy=False).T[None]


# ----------------------------------------------------------------------------- least squares (ThiNet)

@dataclass
class Fit:
    """One layer to refit: its node in the pruned graph, the name of its output in the original model,
    and the original output channels it keeps (None: all)."""
    node: object
    target: str
    keep_out: np.ndarray | None = None
    skip: str | None = None      # block target: the pruned graph's other input of the residual Add after
                                 # the layer (``target`` is then that Add's output in the original)


class NormalEquations:
    """Streaming A = Σ x̃ x̃ᵀ, B = Σ x̃ yᵀ and Σ y² per layer and group (x̃ = [x; 1] when the layer has a bias)."""

    def __init__(self, fits: dict[str, Fit], *, locations: int, seed: int):
        self.fits = fits
        self.locations = locations
        self.rng = np.random.default_rng(seed)
        self.a: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self.yy: dict[str, float] = {}
        self.rows: dict[str, int] = {}
        self.ysq: dict[str, np.ndarray] = {}
        self.geo: dict = {}

    @staticmethod
    def has_bias(node) -> bool:
        return node.op in ("Conv", "Gemm")

    def update(self, name: str, x: np.ndarray, y: np.ndarray, skip: np.ndarray | None = None) -> None:
        fit = self.fits[name]
        node = fit.node
        if fit.keep_out is not None:
            y = np.take(y, fit.keep_out, axis=1 if node.op != "MatMul" else -1)
        if skip is not None:
            y = y - skip
        groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        picked = []
        if node.op == "Conv":
            if name not in self.geo:
                self.geo[name] = _conv_geometry(node, tuple(node.inputs[1].shape), x.shape)

            def pick(n: int) -> np.ndarray:
                idx = np.arange(n) if not self.locations or n <= self.locations else \
                    np.sort(self.rng.choice(n, self.locations, replace=False))
                picked.append(idx)
                return idx
            xr = _layer_rows(node, x, self.geo[name], pick)
            yr = _layer_targets(node, y, groups, picked)
        else:
            xr = _layer_rows(node, x, None, None)
            yr = _layer_targets(node, y, 1, [])
        if self.has_bias(node):
            xr = np.concatenate([xr, np.ones((xr.shape[0], 1, xr.shape[2]), np.float32)], axis=1)
        xr = np.ascontiguousarray(xr, np.float32)
        yr = np.ascontiguousarray(yr, np.float32)
        xt = xr.transpose(0, 2, 1)
        a = np.matmul(xr, xt).astype(np.float64)            # float32 BLAS per batch, summed in float64
        b = np.matmul(xr, yr.transpose(0, 2, 1)).astype(np.float64)
        if name in self.a:
            self.a[name] += a
            self.b[name] += b
        else:
            self.a[name], self.b[name] = a, b
        self.yy[name] = self.yy.get(name, 0.0) + float(np.sum(np.square(yr, dtype=np.float64)))
        ysq = np.einsum("grn,grn->gr", yr, yr, dtype=np.float64)          # per output channel, for variances
        self.ysq[name] = self.ysq[name] + ysq if name in self.ysq else ysq
        self.rows[name] = self.rows.get(name, 0) + xr.shape[2]            # per group

    def error(self, name: str, w: np.ndarray) -> float:
        """Σ ||w x̃ − y||² for weights w [G, R, K(+1)], from the accumulated sums."""
        a, b = self.a[name], self.b[name]
        # (w A) · w as a BLAS product: a three-operand einsum would loop without BLAS
        return float(np.sum((w @ a) * w) - 2 * np.sum(w * b.transpose(0, 2, 1)) + self.yy[name])

    def penalty(self, name: str, ridge: float) -> np.ndarray:
        """λ per group: mean(diag(XᵀX)) · (ridge + K / rows). The K/rows term is the estimation noise of
        a K-input fit from ``rows`` samples: negligible for a conv seen at thousands of positions, and
        what keeps a classifier refit from 100 images from fitting them exactly."""
        a = self.a[name]
        k = a.shape[1] - (1 if self.has_bias(self.fits[name].node) else 0)
        diag = a[:, np.arange(k), np.arange(k)]
        return np.maximum(diag.mean(axis=1), 1e-12) * (ridge + k / max(self.rows[name], 1))

    def match_variance(self, name: str, w: np.ndarray, max_gain: float = 4.0) -> np.ndarray:
        """``w`` [G, R, K+1] (with a bias column) scaled so that every output channel of the fit has the
        target's variance on the calibration rows, its mean kept (adaptive BatchNorm, Li et al. 2020, in
        closed form from the sums already accumulated: a least-squares fit keeps the mean and shrinks
        the variance by what the kept inputs cannot explain):

            ŷ' = s (ŷ − μ̂) + μ̂,   s = σ_y / σ_ŷ  (clipped to [1/max_gain, max_gain]),
            σ_ŷ² = (w A wᵀ)_rr / n − μ̂²,  μ̂ = (w Σx̃)_r / n,  σ_y² = Σy²_r / n − (Σy_r / n)²."""
        a, b = self.a[name], self.b[name]
        n = a[:, -1, -1][:, None]                                   # Σ 1·1 = the rows, per group
        mu_fit = np.einsum("grk,gk->gr", w, a[:, :, -1]) / n
        var_fit = np.einsum("grk,grk->gr", w @ a, w) / n - mu_fit ** 2
        mu_y = b[:, -1, :] / n                                      # Σ 1·y
        var_y = self.ysq[name] / n - mu_y ** 2
        ok = (var_fit > 1e-12 * np.maximum(var_y, 1e-30)) & (var_y > 0)
        scale = np.where(ok, np.sqrt(np.where(ok, var_y, 1.0) / np.where(ok, var_fit, 1.0)), 1.0)
        scale = np.clip(scale, 1 / max_gain, max_gain)
        out = w * scale[:, :, None]
        out[:, :, -1] += (1 - scale) * mu_fit
        return out

    def solve(self, name: str, ridge: float, prior: np.ndarray) -> np.ndarray:
        """argmin_w Σ ||w x̃ − y||² + λ ||w − prior||² (the bias column free): w [G, R, K(+1)], pulled
        toward ``prior`` (the layer's weights as they are) where the data say little."""
        a = self.a[name].copy()
        b = self.b[name].copy()
        k = a.shape[1] - (1 if self.has_bias(self.fits[name].node) else 0)
        idx = np.arange(k)
        lam = self.penalty(name, ridge)[:, None]
        a[:, idx, idx] += lam
        b[:, :k, :] += lam[:, :, None] * prior[:, :, :k].transpose(0, 2, 1)
        full = np.arange(a.shape[1])
        a[:, full, full] += a[:, full, full] <= 0          # an input never seen: keep it at zero
        return np.linalg.solve(a, b).transpose(0, 2, 1)


def current_matrix(node) -> np.ndarray:
    """The layer's weights (and bias) as [G, R, K(+1)], in the form the normal equations use."""
    w = np.asarray(ir.const(node.inputs[1]), np.float64)
    if node.op == "Gemm":
        w = w * float(node.attrs.get("alpha", 1.0))
    m, _ = layer_matrix(node, w)
    if not NormalEquations.has_bias(node):
        return m
    g, r, _ = m.shape
    b = np.zeros(g * r)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
    if c is not None:
        b = np.broadcast_to(np.asarray(ir.const(c), np.float64).reshape(-1), (g * r,)).copy()
        if node.op == "Gemm":
            b = b * float(node.attrs.get("beta", 1.0))
    return np.concatenate([m, b.reshape(g, r, 1)], axis=2)


def write_matrix(g, node, m: np.ndarray) -> None:
    """Store [G, R, K(+1)] back as the layer's weight (and bias, created when missing)."""
    w_old = np.asarray(ir.const(node.inputs[1]))
    dtype = w_old.dtype
    bias = None
    if NormalEquations.has_bias(node):
        m, bias = m[:, :, :-1], m[:, :, -1].reshape(-1)
    _, back = layer_matrix(node, np.zeros(w_old.shape))
    w = back(m)
    if node.op == "Gemm":
        w = w / float(node.attrs.get("alpha", 1.0))
    node.inputs[1] = ir.add_const(g, node.inputs[1].name, w.astype(dtype))
    if bias is None:
        return
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    while len(node.inputs) < 3:
        node.inputs.append(ir.Variable(""))
    old = node.inputs[2]
    name = old.name if old is not None and old.name else node.name + "_bias"
    node.inputs[2] = ir.add_const(g, name, bias.astype(dtype))


def refit(g, original: onnx.ModelProto, fits: dict[str, Fit], samples, *, ridge: float = 1e-3,
          locations: int = 256, batch_size: int = 16, seed: int = 0, progress: bool = False,
          match_variance: bool = False) -> dict[str, tuple]:
    """Refit every layer of ``fits`` (by node name) in place, wave by wave; returns, per layer, its
    relative output error on the calibration data before and after: Σ||ŷ − y||² / Σ||y||²."""
    result = {}
    rounds = waves(g, list(fits))
    bar = progress_bar(len(fits), "reconstruct", unit="layer") if progress else None
    feeds = InputCache(samples, batch_size_for(original, batch_size))
    for names in rounds:
        pruned = truncated(ir.to_model(g), list(dict.fromkeys(
            [fits[n].node.inputs[0].name for n in names] + [fits[n].skip for n in names if fits[n].skip])))
        orig = truncated(original, list(dict.fromkeys(fits[n].target for n in names)))
        eq = NormalEquations({n: fits[n] for n in names}, locations=locations, seed=seed)
        for xs, ys in run_pair(pruned, orig, feeds):
            for n in names:
                skip = xs[fits[n].skip] if fits[n].skip else None
                eq.update(n, xs[fits[n].node.inputs[0].name], ys[fits[n].target], skip)
        for n in names:
            node = fits[n].node
            prior = current_matrix(node)
            before = eq.error(n, prior)
            m = eq.solve(n, ridge, prior)
            if match_variance and eq.has_bias(node):
                m = eq.match_variance(n, m)
            after = eq.error(n, m)
            norm = max(eq.yy[n], 1e-30)
            if after < before:            # a tiny, ill-conditioned fit could lose: keep the better
                write_matrix(g, node, m)
            result[n] = (before / norm, min(after, before) / norm)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return result


def masked_refit(eq: NormalEquations, name: str, w: np.ndarray, ridge: float) -> np.ndarray:
    """Refit the nonzero weights of ``w`` [G, R, K(+1)] (zeros stay zero) to the original outputs: per
    output row r, argmin over its support S of Σ ||w_S x̃_S − y_r||² + λ||w_S − w⁰_S||², from the
    accumulated A = Σ x̃ x̃ᵀ and B = Σ x̃ yᵀ, λ = mean(diag A) · (ridge + |S| / rows) as in
    ``NormalEquations.penalty`` with the row's own number of unknowns (the bias column, when there is
    one, always in S and free)."""
    a, b = eq.a[name], eq.b[name]
    has_bias = eq.has_bias(eq.fits[name].node)
    k = a.shape[1]
    kw = k - (1 if has_bias else 0)
    scale = np.maximum(a[:, np.arange(kw), np.arange(kw)].mean(axis=1), 1e-12)
    rows = max(eq.rows[name], 1)
    out = np.zeros_like(w)
    for gi in range(w.shape[0]):
        for r in range(w.shape[1]):
            support = np.flatnonzero(w[gi, r] != 0)
            if has_bias and (k - 1) not in support:
                support = np.append(support, k - 1)
            if not support.size:
                continue
            lam = scale[gi] * (ridge + support.size / rows)        # this row's fit has |S| unknowns
            pen = lam * ((support != k - 1) if has_bias else np.ones(support.size))
            m = a[gi][np.ix_(support, support)] + np.diag(pen)
            m[np.diag_indices_from(m)] += np.diagonal(m) <= 0
            out[gi, r, support] = np.linalg.solve(m, b[gi][support, r] + pen * w[gi, r, support])
    return out


# ----------------------------------------------------------------------------- OBS pruning (SparseGPT)

def sparse_gpt(w: np.ndarray, h: np.ndarray, sparsity: float, *, damp: float = DAMP, block: int = BLOCK,
               fixed: np.ndarray | None = None) -> np.ndarray:
    """Weights [G, R, K] with ``sparsity`` of each block's entries zeroed, the rest updated to keep
    the output W X (SparseGPT, Alg. 1): per block of columns, the mask takes the entries of smallest
    w² / [U]_jj² (U = chol(H⁻¹)ᵀ, so [U]_jj² = 1/[H_{j:,j:}⁻¹]⁻¹ of the remaining columns), then
    column by column each pruned weight's error e = w_j / U_jj moves to the later columns along U.
    ``fixed`` marks columns that are never pruned but absorb errors (a bias, as a constant input put
    last); ``sparsity`` counts the other columns."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    g, r, k = w.shape
    fixed = np.zeros(k, bool) if fixed is None else np.asarray(fixed, bool)
    idx = np.arange(k)
    diag = h[:, idx, idx]
    dead = (diag <= 0) & ~fixed
    h[:, idx, idx] = np.where(dead, 1.0, diag)
    w[np.broadcast_to(dead[:, None, :], w.shape)] = 0.0
    h[:, idx, idx] += damp * h[:, idx, idx].mean(axis=1, keepdims=True)
    u = _upper_cholesky_of_inverse(h)
    mask = np.zeros_like(w, dtype=bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        d = np.diagonal(u1, axis1=1, axis2=2)[:, None, :]          # [G, 1, B]
        saliency = w1 ** 2 / d ** 2
        saliency[:, :, fixed[i1:i2]] = np.inf
        n_prune = int(round(sparsity * r * np.count_nonzero(~fixed[i1:i2])))
        m1 = np.zeros_like(w1, dtype=bool)
        if n_prune:
            flat = saliency.reshape(g, -1)
            cut = np.argpartition(flat, n_prune - 1, axis=1)[:, :n_prune]
            np.put_along_axis(m1.reshape(g, -1), cut, True, axis=1)
        for i in range(i2 - i1):
            col = w1[:, :, i]
            q = np.where(m1[:, :, i], 0.0, col)
            e = (col - q) / u1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, i, i:][:, None, :]
            w1[:, :, i] = q
            err1[:, :, i] = e
        w[:, :, i1:i2] = w1
        mask[:, :, i1:i2] = m1
        if i2 < k:
            w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
    w[mask] = 0.0
    return w


# ----------------------------------------------------------------------------- statistics re-estimation

def _channel_moments(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    v = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
    return v.sum(axis=1), np.einsum("cn,cn->c", v, v), v.shape[1]


def _stats_axis(node) -> int:
    return 1 if node.op == "Conv" else -1


def restore_statistics(g, original: onnx.ModelProto, fits: dict[str, Fit], samples, *, batch_size: int = 16,
                       max_gain: float = 4.0, progress: bool = False) -> dict[str, float]:
    """Adaptive BatchNorm on a folded graph (Li et al. 2020, EagleEye §3.2): each listed layer's output
    channels get the mean and variance they have in the original model, measured with the pruned
    model's own inputs, layer by layer in topological order (a layer is measured once every corrected
    layer upstream of it is written):

        y' = s (y − μ_pruned) + μ_original,   s = σ_original / σ_pruned   (s clipped to [1/max_gain, max_gain])

    folded into the layer's weights (W ← s W) and bias (b ← s (b − μ_pruned) + μ_original). A least-
    squares refit keeps the means but shrinks the variance by what the kept inputs cannot explain;
    pruning without a refit moves both. Returns, per layer, the mean |log s| (how far it was off)."""
    stats_o: dict[str, tuple] = {}
    targets = list(dict.fromkeys(f.target for f in fits.values()))
    axis_of = {f.target: _stats_axis(f.node) for f in fits.values()}
    for values in _stream_moments(original, targets, samples, batch_size):
        for n, v in values.items():
            s, q, c = _channel_moments(v, axis_of[n])
            a = stats_o.get(n)
            stats_o[n] = (s, q, c) if a is None else (a[0] + s, a[1] + q, a[2] + c)
    out = {}
    bar = progress_bar(len(fits), "prune: statistics", unit="layer") if progress else None
    for names in waves(g, list(fits)):
        outs = {fits[n].node.outputs[0].name: n for n in names}
        stats_p: dict[str, tuple] = {}
        for values in _stream_moments(ir.to_model(g), list(outs), samples, batch_size):
            for t, v in values.items():
                s, q, c = _channel_moments(v, _stats_axis(fits[outs[t]].node))
                a = stats_p.get(t)
                stats_p[t] = (s, q, c) if a is None else (a[0] + s, a[1] + q, a[2] + c)
        for t, n in outs.items():
            fit = fits[n]
            so, qo, co = stats_o[fit.target]
            sp, qp, cp = stats_p[t]
            mu_o, mu_p = so / co, sp / cp
            var_o, var_p = np.maximum(qo / co - mu_o ** 2, 0), np.maximum(qp / cp - mu_p ** 2, 0)
            if fit.keep_out is not None:
                mu_o, var_o = mu_o[fit.keep_out], var_o[fit.keep_out]
            ok = (var_p > 1e-12 * max(float(var_o.mean()), 1e-30)) & (var_o > 0)
            scale = np.where(ok, np.sqrt(np.where(ok, var_o, 1) / np.where(ok, var_p, 1)), 1.0)
            scale = np.clip(scale, 1 / max_gain, max_gain)
            _affine(g, fit.node, scale, mu_o - scale * mu_p)
            out[n] = float(np.mean(np.abs(np.log(scale))))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _stream_moments(model, names, samples, batch_size):
    from qgraph.calibrate import stream
    return stream(model, names, samples, batch_size=batch_size)


def _affine(g, node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Replace the layer's output y by scale ⊙ y + shift (per output channel), in its weights and bias."""
    m = current_matrix(node)                  # [G, R, K(+1)], rows = output channels
    gg, r, _ = m.shape
    sc = scale.reshape(gg, r, 1)
    m = m * sc
    if NormalEquations.has_bias(node):
        m[:, :, -1] += shift.reshape(gg, r)
        write_matrix(g, node, m)
        return
    raise ValueError(f"{node.op} '{node.name}' has no bias to take a mean shift")   # MatMul: not listed
