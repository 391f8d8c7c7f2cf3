"""Weight sharing by k-means (Han et al. 2016, "Deep Compression", §3), post-training.

Each layer's n weights W are replaced by k = 2^bits shared values c_1 < ... < c_k, chosen by k-means
(§3.1, eq. 1):

    min_c  Σ_j Σ_{w ∈ cluster j} |w − c_j|²

with the centroids initialized linearly over [min W, max W] (§3.2: linear beats density and Forgy
initialization because it keeps the rare large weights), solved exactly by 1-D Lloyd on the sorted
weights (``qgraph.kmeans``). Weights that are exactly zero (pruned by ``sparsify``) stay exactly zero:
they are no cluster member, and the codebook holds 0 beside the k centroids.

The paper fine-tunes the centroids by back-propagation (§3.3). Post-training, with calibration data,
``refit`` does it in closed form: a layer's output is linear in its centroids, Ŵ_n = P_n c for output
row n (P_n the one-hot cluster map of its inputs), so the output error on the data is a quadratic in c,

    min_c Σ_n (P_n c − W_n)ᵀ C (P_n c − W_n)   ⇔   (Σ_n P_nᵀ C P_n) c = Σ_n P_nᵀ C W_n

with C = E[(x − μ)(x − μ)ᵀ] the covariance of the layer's inputs (im2col patches per group for Conv),
streamed over ``--calib`` in one ONNX Runtime session. The mean goes into the bias,
b_n ← b_n − (Ŵ_n − W_n)·μ, so the output mean is the float one. The least-squares centroids are kept
only where they lower the layer's output error (they always should).

``assign=gptq`` also chooses the assignments by output error, before the refit: GPTQ (Frantar et al.
2023) with the codebook as its grid — each input column takes its nearest centroids and its error
moves onto the columns not yet assigned, along C⁻¹ (``qgraph.rounding.gptq_codebook``).

Form of the result (both run in plain ONNX Runtime):
    gather       W = Gather(codebook, Cast(indices → int32)): uint8 indices (uint16 above 256 entries)
                 and a float codebook; ``huffman`` codes the indices (relative indices for the zeros)
    dequantized  W replaced by its shared values; ``huffman`` finds the codebook in the values
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import onnx

from qgraph import ir
from qgraph.errors import ModelError
from qgraph.ops import LAYER_OPS, Skip, const_at, input_at, layer_weight
from qgraph.pipeline import Context, Pass, PassResult, not_quantized, option
from qgraph.passes.quant_placement import Matcher
from qgraph.rounding import Unsupported, collect_hessians, gptq_codebook, layer_matrix

CONV_OPS = ("Conv", "ConvTranspose")
#: k-means initializations (``qgraph.kmeans.INITS``; that module, and numba with it, is imported only
#: when the pass runs: importing qgraph must not map numba's LLVM)
INITS = ("linear", "density", "random")
#: above this many multiply-adds (Σ_rows K²), the refit's normal equations use diag(C) only
FULL_REFIT_BUDGET = 4e9
#: layers reading more input features than this are not refit (their K x K statistics would take
#: K² · 8 bytes: 25,088 inputs, VGG's first FC layer, would need 5 GB)
MAX_REFIT_INPUTS = 8192


@dataclass
class ShareOptions:
    bits: int = option(5, "codebook bits per layer: k = 2^bits shared values", range=(1, 12))
    conv_bits: int | None = option(None, "bits for Conv/ConvTranspose layers (default: bits; Deep Compression "
                                         "used 8)", range=(1, 12))
    fc_bits: int | None = option(None, "bits for Gemm/MatMul layers (default: bits; Deep Compression used 5)",
                                 range=(1, 12))
    precision: dict[str, int] = option({}, "bits per node: name|op|first|last|regex@bits, e.g. first@8")
    exclude: tuple[str, ...] = option((), "layers left alone: names, op types, first/last, or regexes")
    init: str = option("linear", "centroid initialization (linear over [min, max], CDF quantiles, "
                       "random values)", choices=INITS)
    iterations: int = option(300, "most Lloyd iterations (exact Lloyd stops at its fixed point)",
                             range=(0, 100000))
    refit: str = option("auto", "least-squares centroids from calibration data: auto (when --calib is "
                        "given), true (requires it), false", choices=("auto", "true", "false"))
    refit_bias: bool = option(True, "with refit: move the layer's mean output error into its bias")
    assign: str = option("nearest", "weights to centroids: nearest (k-means), or gptq (column by column for "
                         "the smallest layer output error on the calibration data, GPTQ onto the codebook; "
                         "needs --calib)", choices=("nearest", "gptq"))
    form: str = option("gather", "gather: Gather(codebook, indices) feeds the layer; dequantized: "
                       "the weights hold the shared values", choices=("gather", "dequantized"))
    samples: int = option(0, "calibration samples the refit uses (0: all)", range=(0, 1 << 30))
    batch_size: int = option(16, "calibration batch size", range=(1, 4096))

    def validate(self) -> str | None:
        for key, b in self.precision.items():
            if not 1 <= int(b) <= 12:
                return f"precision '{key}@{b}': bits must be within 1..12"
        return None


@dataclass
class Layer:
    """One weight to share and the layers that read it."""
    tensor: ir.Constant
    nodes: list
    bits: int
    codebook: np.ndarray | None = None      # float64 centroids (the zero not included)
    labels: np.ndarray | None = None        # int32, weight-shaped; -1 where the weight is exactly 0


class ShareWeights(Pass):
    __doc__ = __doc__
    name = "share"
    summary = "k-means weight sharing per layer (Deep Compression), centroids refit on calibration data"
    options = ShareOptions
    requires = (not_quantized,)
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        layers, skipped = self._layers(g)
        details = []
        for lay in layers:
            self._cluster(lay, ctx)
        refit_notes = {}
        if layers and (self._wants_refit(ctx) or self._wants_gptq(ctx)):
            refit_notes = self._refit(g, layers, ctx, details)
        rows = [_layer_row(lay) for lay in layers]
        for lay in layers:
            self._write(g, lay)
        for row in rows:
            extra = next((d for d in details if d["weight"] == row["weight"]), None)
            if extra:
                row.update({k: v for k, v in extra.items() if k != "weight"})
        weights = sum(r["weights"] for r in rows)
        notes = {"layers": len(layers), "weights": weights,
                 "clusters": dict(sorted({f"{r['bits']}b": sum(1 for x in rows if x["bits"] == r["bits"])
                                          for r in rows}.items())),
                 "zeros_kept": sum(r["zeros"] for r in rows)}
        if rows:
            worst = min(rows, key=lambda r: r["sqnr_db"])
            notes["worst_sqnr_db"] = round(worst["sqnr_db"], 2)
        notes.update(refit_notes)
        if skipped:
            notes["skipped"] = dict(sorted(skipped.items()))
        notes["details"] = rows
        return PassResult(modified=bool(layers), notes=notes)

    # -- which weights --------------------------------------------------------------------

    def _layers(self, g: ir.Graph) -> tuple[list[Layer], dict[str, int]]:
        o = self.opts
        dots = [n for n in g.nodes if n.op in LAYER_OPS]
        order = [n.name for n in dots if layer_weight(n) is not None]
        excluded = Matcher(o.exclude, order)
        picks = Matcher([], order)
        skipped: dict[str, int] = {}
        by_tensor: dict[int, Layer] = {}
        out: list[Layer] = []
        for node in dots:
            reason = self._refuse(g, node, excluded)
            if reason is not None:
                skipped[reason.reason] = skipped.get(reason.reason, 0) + 1
                continue
            t = node.inputs[1]
            if id(t) in by_tensor:
                by_tensor[id(t)].nodes.append(node)
                continue
            bits = self._bits_for(node, picks)
            lay = Layer(tensor=t, nodes=[node], bits=bits)
            if t.values.size <= (1 << bits):
                skipped["fewer_weights_than_clusters"] = skipped.get("fewer_weights_than_clusters", 0) + 1
                continue
            by_tensor[id(t)] = lay
            out.append(lay)
        return out, skipped

    def _refuse(self, g: ir.Graph, node, excluded: Matcher) -> Skip | None:
        if excluded.any(node):
            return Skip("excluded")
        w = layer_weight(node)
        if w is None:
            return Skip("weight_not_constant", f"{node.name}: input 1 is computed at run time")
        t = node.inputs[1]
        if not np.issubdtype(w.dtype, np.floating):
            return Skip("weight_not_float", f"{node.name}: weight of type {w.dtype}")
        if not isinstance(t, ir.Constant):
            return Skip("weight_not_constant", f"{node.name}: weight from a Constant node")
        for reader in ir.consumers(t):
            if reader.op not in LAYER_OPS or input_at(reader, 1) is not t or \
                    any(x is t for i, x in enumerate(reader.inputs) if i != 1):
                return Skip("weight_read_by_other_nodes", f"{t.name} is also read by {reader.name} ({reader.op})")
        if not np.all(np.isfinite(w)):
            return Skip("weight_not_finite")
        if not np.any(w):
            return Skip("weight_all_zero")
        return None

    def _bits_for(self, node, picks: Matcher) -> int:
        o = self.opts
        for key, b in o.precision.items():
            if picks.match(node, key):
                return int(b)
        if node.op in CONV_OPS and o.conv_bits is not None:
            return o.conv_bits
        if node.op not in CONV_OPS and o.fc_bits is not None:
            return o.fc_bits
        return o.bits

    # -- k-means ---------------------------------------------------------------------------

    def _cluster(self, lay: Layer, ctx: Context) -> None:
        w = np.asarray(lay.tensor.values)
        nz = w != 0
        values = w[nz]
        from qgraph.kmeans import kmeans_1d
        km = kmeans_1d(values.astype(np.float32, copy=False) if w.dtype != np.float64 else values,
                       1 << lay.bits, init=self.opts.init, max_iter=self.opts.iterations,
                       rng=ctx.rng(zlib.crc32(lay.tensor.name.encode())))
        labels = np.full(w.shape, -1, np.int32)
        labels[nz] = km.labels
        lay.codebook = km.centroids
        lay.labels = labels

    # -- least-squares refit -----------------------------------------------------------------

    def _wants_refit(self, ctx: Context) -> bool:
        if self.opts.refit == "false":
            return False
        if ctx.calib is None:
            if self.opts.refit == "true":
                raise ModelError("share:refit=true needs calibration data: give --calib (CLI) or calib= (API), "
                                 "or use share:refit=false")
            return False
        return True

    def _wants_gptq(self, ctx: Context) -> bool:
        if self.opts.assign != "gptq":
            return False
        if ctx.calib is None:
            raise ModelError("share:assign=gptq needs calibration data: give --calib (CLI) or calib= (API), "
                             "or use share:assign=nearest")
        return True

    def _refit(self, g: ir.Graph, layers: list[Layer], ctx: Context, details: list) -> dict:
        """With the layers' input statistics on the calibration data: GPTQ assignments (assign=gptq),
        least-squares centroids and bias moves (refit), for every layer whose statistics we can form."""
        skipped: dict[str, int] = {}
        todo = {}
        for lay in layers:
            node = lay.nodes[0]
            if len(lay.nodes) > 1:
                skipped["weight_shared_by_layers"] = skipped.get("weight_shared_by_layers", 0) + 1
                continue
            try:
                if node.op == "Conv" and lay.tensor.values.ndim != 4:
                    raise Unsupported(f"{lay.tensor.values.ndim - 2}-D convolution")
                if node.op == "Gemm" and node.attrs.get("transA", 0):
                    raise Unsupported("Gemm with transA")
                m, _ = layer_matrix(node, lay.tensor.values)
            except Unsupported:
                skipped[f"unsupported_{node.op}"] = skipped.get(f"unsupported_{node.op}", 0) + 1
                continue
            if m.shape[2] > MAX_REFIT_INPUTS:
                skipped["too_many_inputs"] = skipped.get("too_many_inputs", 0) + 1
                continue
            x = node.inputs[0]
            todo[lay.tensor.name] = (lay, (node, x.name, lay.tensor.values.shape, x.shape))
        notes: dict = {}
        if not todo:
            if skipped:
                notes["refit_skipped"] = skipped
            return notes
        samples = ctx.calib if not self.opts.samples else ctx.calib.subset(range(min(self.opts.samples,
                                                                                      len(ctx.calib))))
        float_model = ir.to_model(g)
        stats = collect_hessians(float_model, {k: v[1] for k, v in todo.items()}, samples,
                                 batch_size=self.opts.batch_size, progress=ctx.progress,
                                 desc="share: layer input statistics")
        refit, gptq = self._wants_refit(ctx), self.opts.assign == "gptq"
        gains, diagonal, biased = [], 0, 0
        for name, (lay, _) in todo.items():
            count = max(stats.count[name], 1)
            mean = stats.sums[name] / count                                   # [G, K]
            second = stats.h[name] / count                                    # [G, K, K]
            centred = refit and self.opts.refit_bias
            cov = second - mean[:, :, None] * mean[:, None, :] if centred else second
            w = np.asarray(lay.tensor.values, np.float64)
            before = refit_centroids(lay.nodes[0], w, lay.labels, lay.codebook, cov, solve=False).error_before
            if gptq:
                lay.labels = _gptq_labels(lay.nodes[0], w, lay.codebook, cov)
            after = before
            if refit:
                res = refit_centroids(lay.nodes[0], w, lay.labels, lay.codebook, cov)
                diagonal += res.diagonal
                if res.error_after < res.error_before:
                    lay.codebook = res.codebook
                after = min(res.error_after, res.error_before)
            elif gptq:
                after = refit_centroids(lay.nodes[0], w, lay.labels, lay.codebook, cov, solve=False).error_before
            gain = after / before if before > 0 else 1.0
            gains.append(gain)
            row = {"weight": name, "output_error_ratio": round(gain, 4)}
            if centred:
                shift = _bias_shift(lay, mean)
                if shift is not None and np.any(shift):
                    _add_to_bias(g, lay.nodes[0], -shift)
                    biased += 1
            details.append(row)
        if refit:
            notes["refit"] = len(todo)
        if gptq:
            notes["gptq"] = len(todo)
        notes["output_error_ratio_median"] = round(float(np.median(gains)), 4)
        if biased:
            notes["bias_moved"] = biased
        if diagonal:
            notes["refit_diagonal"] = diagonal
        if skipped:
            notes["refit_skipped"] = skipped
        return notes

    # -- rewrite ---------------------------------------------------------------------------

    def _write(self, g: ir.Graph, lay: Layer) -> None:
        t = lay.tensor
        w = np.asarray(t.values)
        has_zero = bool(np.any(lay.labels < 0))
        codebook = lay.codebook.astype(w.dtype)
        if self.opts.form == "dequantized":
            shared = np.where(lay.labels >= 0, codebook[np.maximum(lay.labels, 0)], 0).astype(w.dtype)
            t.values = shared
            return
        table = np.concatenate([np.zeros(1, w.dtype), codebook]) if has_zero else codebook
        index = lay.labels + 1 if has_zero else lay.labels
        idx_type = np.uint8 if table.size <= 256 else np.uint16
        book = ir.add_const(g, f"{t.name}_codebook", table)
        indices = ir.add_const(g, f"{t.name}_indices", index.astype(idx_type))
        wide = ir.Variable(ir.fresh_name(g, f"{t.name}_indices_i32"), dtype=np.int32, shape=list(w.shape))
        shared = ir.Variable(ir.fresh_name(g, f"{t.name}_shared"), dtype=w.dtype, shape=list(w.shape))
        g.nodes.append(ir.Node("Cast", name=ir.fresh_name(g, f"{t.name}_cast"), inputs=[indices],
                               outputs=[wide], attrs={"to": onnx.TensorProto.INT32}))
        g.nodes.append(ir.Node("Gather", name=ir.fresh_name(g, f"{t.name}_gather"), inputs=[book, wide],
                               outputs=[shared], attrs={"axis": 0}))
        for node in lay.nodes:
            ir.swap_input(node, t, shared)


# ----------------------------------------------------------------------------- the refit, as functions

@dataclass
class Refit:
    codebook: np.ndarray
    error_before: float       # tr((Ŵ − W) C (Ŵ − W)ᵀ) with the k-means centroids
    error_after: float        # ... with the least-squares ones
    diagonal: bool            # the normal equations used diag(C) only (layer too large)


def _output_error(w: np.ndarray, labels: np.ndarray, c: np.ndarray, cov: np.ndarray) -> float:
    wq = np.where(labels >= 0, c[np.maximum(labels, 0)], 0.0)
    d = wq - w
    return float(np.sum((d @ cov) * d))


def refit_centroids(node, w: np.ndarray, labels: np.ndarray, codebook: np.ndarray, cov: np.ndarray, *,
                    solve: bool = True) -> Refit:
    """Least-squares centroids for fixed assignments: min over c of Σ_n (P_n c − W_n)ᵀ C (P_n c − W_n).

    ``w`` and ``labels`` are the weight and its cluster labels in the layer's own layout; ``cov`` is
    [G, K, K] over the layer's input features (``qgraph.rounding.layer_matrix`` order). Clusters the
    data never reaches keep their k-means centroid."""
    m_w, _ = layer_matrix(node, w)
    m_l, _ = layer_matrix(node, labels)
    m_w = np.ascontiguousarray(m_w, np.float64)
    m_l = np.ascontiguousarray(m_l, np.int32)
    cov = np.ascontiguousarray(cov, np.float64)
    if not solve:                       # only the output error of the given centroids
        err = _output_error(m_w, m_l, codebook, cov)
        return Refit(codebook=codebook, error_before=err, error_after=err, diagonal=False)
    k = codebook.size
    g, rows, kk = m_w.shape
    diagonal = g * rows * kk * kk > FULL_REFIT_BUDGET
    from qgraph.kmeans import normal_equations, normal_equations_diagonal
    m, r = (normal_equations_diagonal if diagonal else normal_equations)(m_l, m_w, cov, k)
    dead = np.diag(m) <= 1e-12 * max(float(np.trace(m)), 1e-300)
    m[dead, :] = 0.0
    m[:, dead] = 0.0
    m[dead, dead] = 1.0
    r[dead] = codebook[dead]
    ridge = 1e-9 * float(np.trace(m)) / k
    try:
        c = np.linalg.solve(m + ridge * np.eye(k), r)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(m, r, rcond=None)[0]
    before = _output_error(m_w, m_l, codebook, cov)
    after = _output_error(m_w, m_l, c, cov) if np.all(np.isfinite(c)) else math.inf
    return Refit(codebook=c, error_before=before, error_after=after, diagonal=diagonal)


def _gptq_labels(node, w: np.ndarray, codebook: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Cluster labels (weight layout, -1 for zeros) chosen by GPTQ onto the codebook: each input column
    in turn takes its nearest centroids and its error moves to the columns not yet assigned, along H⁻¹
    (Frantar et al. 2023, with the codebook as the grid)."""
    m_w, back = layer_matrix(node, w)
    labels = gptq_codebook(m_w, h, codebook, keep=m_w != 0)
    return np.ascontiguousarray(back(labels)).astype(np.int32)


def _bias_shift(lay: Layer, mean: np.ndarray) -> np.ndarray | None:
    """(Ŵ − W)·μ per output channel of the layer, in its output-channel order."""
    node = lay.nodes[0]
    w = np.asarray(lay.tensor.values, np.float64)
    wq = np.where(lay.labels >= 0, lay.codebook[np.maximum(lay.labels, 0)], 0.0)
    m_d, _ = layer_matrix(node, wq - w)                       # [G, R, K]
    shift = np.einsum("grk,gk->gr", m_d, mean).reshape(-1)
    if node.op == "Gemm":
        shift = shift * float(node.attrs.get("alpha", 1.0))
    return shift


def _add_to_bias(g: ir.Graph, node, delta: np.ndarray) -> None:
    """Add ``delta`` (one value per output channel) to the layer's bias, creating one if needed."""
    delta = delta.astype(np.float32)
    if node.op == "Conv":
        b = const_at(node, 2)
        new = delta if b is None else (np.asarray(b, np.float64) + delta).astype(b.dtype)
        _set_input(g, node, 2, new, "bias")
        return
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if beta == 0.0:
            node.attrs["beta"] = 1.0
            _set_input(g, node, 2, delta, "bias")
            return
        c = const_at(node, 2)
        if input_at(node, 2) is not None and c is None:
            _splice_add(g, node, delta)
            return
        new = delta / beta if c is None else (np.asarray(c, np.float64) + delta / beta).astype(c.dtype)
        _set_input(g, node, 2, new, "bias")
        return
    readers = ir.consumers(node.outputs[0])               # MatMul: its bias Add, or a new one
    if len(readers) == 1 and readers[0].op == "Add" and not ir.is_graph_output(g, node.outputs[0]):
        add = readers[0]
        other = 1 if add.inputs[0] is node.outputs[0] else 0
        b = const_at(add, other)
        if b is not None and np.broadcast_shapes(np.shape(b), delta.shape) == delta.shape and \
                len(ir.consumers(add.inputs[other])) == 1:
            _set_input(g, add, other, (np.asarray(b, np.float64) + delta).astype(b.dtype), "bias")
            return
    _splice_add(g, node, delta)


def _set_input(g: ir.Graph, node, index: int, values: np.ndarray, what: str) -> None:
    old = input_at(node, index)
    if old is not None and isinstance(old, ir.Constant) and len(ir.consumers(old)) == 1:
        old.values = np.asarray(values)
        return
    new = ir.add_const(g, f"{node.name}_{what}", np.asarray(values))
    while len(node.inputs) <= index:
        node.inputs.append(ir.Variable.empty())
    node.inputs[index] = new


def _splice_add(g: ir.Graph, node, delta: np.ndarray) -> None:
    ir.splice(g, node.outputs[0], "Add", extra_inputs=[ir.add_const(g, f"{node.name}_bias", delta)])


def _layer_row(lay: Layer) -> dict:
    w = np.asarray(lay.tensor.values, np.float64)
    wq = np.where(lay.labels >= 0, lay.codebook[np.maximum(lay.labels, 0)], 0.0)
    noise = float(np.sum((w - wq) ** 2))
    signal = float(np.sum(w ** 2))
    return {"weight": lay.tensor.name, "layers": [n.name for n in lay.nodes], "op": lay.nodes[0].op,
            "bits": lay.bits, "weights": int(w.size), "zeros": int(np.sum(lay.labels < 0)),
            "clusters_used": int(np.unique(lay.labels[lay.labels >= 0]).size),
            "sqnr_db": round(10 * math.log10(signal / noise), 2) if noise > 0 else 999.0}
