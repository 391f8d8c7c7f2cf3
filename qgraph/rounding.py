"""Weight rounding that minimizes each layer's output error, not each weight's own error (GPTQ).

Rounding every weight to its nearest grid point minimizes ||W - Ŵ||², but what a layer's output
loses is ||(W - Ŵ) X||² over its real inputs X. With H = X Xᵀ (the input's second moments, one
K x K matrix per layer, streamed over the calibration data) that is the quadratic tr(ΔW H ΔWᵀ), and
the optimal-brain-quantizer step (Frantar & Alistarh 2022; GPTQ, Frantar et al. 2023) rounds one
input column at a time and moves its rounding error onto the columns not yet rounded, along H⁻¹:

    for column i (largest diag(H) first):   q_i = Q(w_i);   e = (w_i − q_i) / [U]_ii
                                            w_j −= e · [U]_ij   for j > i,  U = chol(H⁻¹)ᵀ

Each row's clipping is chosen with it: the row's scale is tried at 0.5..1 of its min-max scale and the
one with the smallest output error kept (GPTQ itself decides for rows of at most 32 inputs — depthwise
3x3 has 9, where the clipping matters most —, nearest rounding under H for wider rows). The grid
is the weight's own: uniform, or the codebook of a binary / ternary / power-of-two grid
(``QParams.levels``, ``qgraph.grids``), where Q(w) is the nearest level; for binary and ternary, whose
scale is a mean rather than a range, the scale is tried at 0.5..1.5 of its own.

Layers and their input matrix X (K input features per output row):
    Conv (2-D, any groups)    im2col patches per group: K = Cin/g · kh · kw, in W[o].ravel() order
    Gemm                       A (or Aᵀ with transA) rows: K = the reduction size
    MatMul (constant right)    x[..., K] rows
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qgraph import ir
from qgraph.calibrate import stream
from qgraph.ops import ConvGeometry, conv_geometry, nearest_level, out_axis

#: damping added to H's diagonal, as a fraction of its mean (GPTQ's default)
DAMP = 0.01
BLOCK = 128
#: the largest float64 H [G, K, K] a layer may need: rounding holds about four arrays of its size at
#: once (H, its permuted copy, the Cholesky factor, its inverse), so 1 GiB of H is ~4 GiB of memory;
#: a wider layer keeps nearest rounding, named in the notes (VGG-19's 25088-input FC: H alone 4.7 GiB;
#: AlexNet's 9216-input FC: 0.6 GiB)
MAX_HESSIAN_BYTES = 1 << 30


class Unsupported(Exception):
    """A layer whose input patches this module does not form; it keeps nearest rounding."""


# ----------------------------------------------------------------------------- layer geometry

def _conv_geometry(node, w_shape, x_shape) -> ConvGeometry:
    if len(w_shape) != 4:
        raise Unsupported(f"{len(w_shape) - 2}-D convolution")
    return conv_geometry(node.attrs, w_shape, x_shape[2:])


def _conv_patches(x: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """[G, K, L] patches of one image x [C, H, W] (K in W[o, cin, kh, kw] order)."""
    t, l, b, r = geo.pads
    xp = np.pad(x, ((0, 0), (t, b), (l, r)))
    (kh, kw), (dh, dw), (sh, sw) = geo.kernel, geo.dilations, geo.strides
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    win = win[:, ::sh, ::sw, ::dh, ::dw]                 # [C, Ho, Wo, kh, kw]
    c, ho, wo = win.shape[:3]
    g = geo.group
    win = win.reshape(g, c // g, ho * wo, kh * kw).transpose(0, 1, 3, 2)   # [G, cpg, kh·kw, L]
    return np.ascontiguousarray(win.reshape(g, (c // g) * kh * kw, ho * wo))


def layer_matrix(node, w: np.ndarray) -> tuple[np.ndarray, callable]:
    """W as [G, R, K] (rows = output features) and the function mapping such an array back."""
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        cout = w.shape[0]
        m = w.reshape(g, cout // g, -1)
        return m, lambda a: a.reshape(w.shape)
    if node.op == "Gemm":
        if node.attrs.get("transB", 0):
            return w[None], lambda a: a[0]
        return w.T[None], lambda a: a[0].T
    if node.op == "MatMul" and w.ndim == 2:
        return w.T[None], lambda a: a[0].T
    raise Unsupported(f"{node.op} with a weight of rank {w.ndim}")


def row_scales(qp, node, w_shape, m_shape) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of the [G, R, K] matrix."""
    s = np.asarray(qp.scale, np.float64)
    z = np.asarray(qp.zero_point, np.float64)
    if s.ndim == 0 or s.size == 1:
        return np.full(m_shape[:2], float(s.reshape(-1)[0])), np.full(m_shape[:2], float(z.reshape(-1)[0]))
    if qp.axis != out_axis(node, len(w_shape)):
        raise Unsupported(f"weight scales along axis {qp.axis}, not the output axis")
    return s.reshape(m_shape[:2]), z.reshape(m_shape[:2])


# ----------------------------------------------------------------------------- statistics

class Hessians:
    """Streaming H = Σ x xᵀ of each layer's input features, [G, K, K] per layer (float64), and their
    sums Σ x, [G, K] (for means: ``share``'s centroid refit centres H and moves the bias).

    With ``bias=True`` every x gets a trailing 1 (H is [G, K+1, K+1]: its last row holds Σ x and the
    count), for fits where a bias absorbs the mean."""

    def __init__(self, layers: dict, bias: bool = False):
        # layers: name -> (node, input tensor name, weight shape, input shape)
        self.layers = layers
        self.bias = bias
        self.h: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}
        self.geo = {}     # per Conv, from the first batch's shape (SAME padding depends on it)
        # a Gemm / MatMul's input rows themselves while there are few (at most K / 4: FC layers fed a
        # few calibration samples): errors tr(D H Dᵀ) = ||D Xᵀ||² / n then cost R·K·n, not R·K²
        self.rows: dict[str, list | None] = {}

    def update(self, name: str, x: np.ndarray) -> None:
        node = self.layers[name][0]
        if node.op == "Conv":
            if name not in self.geo:
                self.geo[name] = _conv_geometry(node, self.layers[name][2], x.shape)
            # the batch's patches side by side: one product per batch (per image, small products
            # ran at a fraction of the BLAS's speed)
            p = np.concatenate([_conv_patches(img, self.geo[name]) for img in x.astype(np.float32, copy=False)],
                               axis=2)
            if self.bias:
                p = np.concatenate([p, np.ones((p.shape[0], 1, p.shape[2]), np.float32)], axis=1)
            self._add(name, p @ p.transpose(0, 2, 1), p.sum(axis=2, dtype=np.float64), p.shape[2])
            return
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            x = x.T
        rows = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        if self.bias:
            rows = np.concatenate([rows, np.ones((rows.shape[0], 1), np.float32)], axis=1)
        else:
            kept = self.rows.get(name, [])
            if kept is not None:
                few = (sum(r.shape[0] for r in kept) + rows.shape[0]) * 4 <= rows.shape[1]
                self.rows[name] = kept + [rows.copy()] if few else None
        self._add(name, (rows.T @ rows)[None], rows.sum(axis=0, dtype=np.float64)[None], rows.shape[0])

    def input_rows(self, name: str) -> np.ndarray | None:
        """X / sqrt(n) (float64, [n, K]) with Xᵀ X / n = H of a layer whose input rows were kept, else None."""
        kept = self.rows.get(name)
        if not kept:
            return None
        return np.concatenate(kept).astype(np.float64) / np.sqrt(max(self.count[name], 1))

    def _add(self, name: str, h: np.ndarray, s: np.ndarray, n: int) -> None:
        if name in self.h:
            self.h[name] += h
            self.sums[name] += s
            self.count[name] += n
        else:
            self.h[name] = h.astype(np.float64)
            self.sums[name] = s
            self.count[name] = n


def collect_hessians(model, layers: dict, samples, *, batch_size: int = 16, progress: bool = False,
                     bias: bool = False, desc: str = "gptq: input statistics") -> Hessians:
    """One ORT session over ``samples``; every layer's H accumulated batch by batch (nothing kept)."""
    acc = Hessians(layers, bias=bias)
    by_input: dict[str, list[str]] = {}
    for name, (_, x_name, _, _) in layers.items():
        by_input.setdefault(x_name, []).append(name)
    for values in stream(model, list(by_input), samples, batch_size=batch_size, progress=progress,
                         desc=desc):
        for x_name, v in values.items():
            for name in by_input[x_name]:
                acc.update(name, v)
    return acc


# ----------------------------------------------------------------------------- rounding

def project(v: np.ndarray, z, qmin: int, qmax: int, levels: np.ndarray | None = None) -> np.ndarray:
    """The grid's nearest point of ``v`` (in units of the scale): round and saturate on a uniform
    grid, the nearest of ``levels`` on a non-uniform one (binary, ternary, power-of-two)."""
    if levels is None:
        return np.clip(np.rint(v) + z, qmin, qmax)
    return (nearest_level(v, levels) + z).astype(np.float64)


def gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int, *,
         damp: float = DAMP, block: int = BLOCK, act_order: bool = True, levels: np.ndarray | None = None,
         pinned: np.ndarray | None = None) -> np.ndarray:
    """Integer weights [G, R, K] for w [G, R, K] given H [G, K, K] and per-row scale/zero [G, R];
    ``levels``: the codebook of a non-uniform grid (each column goes to its nearest level).
    ``pinned`` [G, R, K] marks weights that must stay exactly zero (a sparse layer's zeros): they take
    the zero point, and their error moves to the other weights like any rounding error."""
    s = np.where(scale > 0, scale, 1.0)[:, :, None]
    z = zero[:, :, None]

    def nearest(col, _i):
        qc = project(col / s, z, qmin, qmax, levels)
        return qc, (qc - z) * s
    return _gptq(w, h, nearest, pinned=pinned, pin_to=(z, 0.0), damp=damp, block=block,
                 act_order=act_order).astype(np.int64)


def gptq_codebook(w: np.ndarray, h: np.ndarray, codebook: np.ndarray, keep: np.ndarray | None = None, *,
                  damp: float = DAMP, block: int = BLOCK, act_order: bool = True) -> np.ndarray:
    """GPTQ onto a non-uniform grid: the index into ``codebook`` (sorted) of every weight of w [G, R, K],
    column by column with the error moved along H⁻¹ as for ``gptq``. Weights where ``keep`` is False
    stay exactly 0 (index -1) and take no error (the zeros ``sparsify`` left)."""
    c = np.asarray(codebook, np.float64)
    mids = (c[1:] + c[:-1]) / 2

    def nearest(col, _i):
        lab = np.searchsorted(mids, col, side="left")       # #{midpoints < v}: ties to the lower
        return lab, c[lab]
    return _gptq(w, h, nearest, keep=keep, damp=damp, block=block, act_order=act_order).astype(np.int64)


def _gptq(w, h, nearest, *, keep=None, pinned=None, pin_to=None, damp=DAMP, block=BLOCK,
          act_order=True) -> np.ndarray:
    """The GPTQ column loop (module docstring) with ``nearest(col [G, R, 1], i) -> (ints, values)``
    as the grid; entries where ``keep`` is False are held at 0 (their result is -1, no error moves);
    entries where ``pinned`` is True take ``pin_to`` = (int, value) and their error moves on."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    g, r, k = w.shape
    idx = np.arange(k)
    diag = h[:, idx, idx]
    dead = diag <= 0
    h[:, idx, idx] = np.where(dead, 1.0, diag)
    if act_order:
        perm = np.argsort(-h[:, idx, idx], axis=1, kind="stable")
    else:
        perm = np.broadcast_to(idx, (g, k)).copy()
    w = np.take_along_axis(w, perm[:, None, :], axis=2)
    held = None
    if keep is not None:
        held = ~np.take_along_axis(np.asarray(keep, bool), perm[:, None, :], axis=2)
        w[held] = 0.0
    if pinned is not None:
        pinned = np.take_along_axis(np.asarray(pinned, bool), perm[:, None, :], axis=2)
    h = np.stack([hg[np.ix_(p, p)] for hg, p in zip(h, perm)])     # rows and columns permuted: one gather
    h[:, idx, idx] += damp * h[:, idx, idx].mean(axis=1, keepdims=True)
    u = _upper_cholesky_of_inverse(h)
    q = np.empty((g, r, k), dtype=np.int64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        h1 = held[:, :, i1:i2] if held is not None else None
        for i in range(i2 - i1):
            col = w1[:, :, i:i + 1]
            qc, deq = nearest(col, i1 + i)
            if pinned is not None:
                pin = pinned[:, :, i1 + i:i1 + i + 1]
                qc = np.where(pin, pin_to[0], qc)
                deq = np.where(pin, pin_to[1], deq)
            if h1 is not None:
                zero = h1[:, :, i:i + 1]
                qc = np.where(zero, -1, qc)
                deq = np.where(zero, 0.0, deq)
            q[:, :, i1 + i] = qc[:, :, 0]
            e = (col - deq) / u1[:, i, i][:, None, None]
            w1[:, :, i:] -= e * u1[:, i, i:][:, None, :]
            if h1 is not None:
                w1[h1] = 0.0
            err1[:, :, i] = e[:, :, 0]
        if i2 < k:
            w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
            if held is not None:
                w[:, :, i2:][held[:, :, i2:]] = 0.0
    out = np.empty_like(q)
    np.put_along_axis(out, perm[:, None, :], q, axis=2)
    return out


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U with H⁻¹ = Uᵀ U (upper triangular), batched; more damping if H is numerically singular.

    With J the reversal of the K indices and J H J = L Lᵀ (Cholesky): H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and
    J L⁻¹ J is upper triangular with a positive diagonal, so U = J L⁻¹ J: one Cholesky and one
    triangular inverse (K³/3 each) instead of H⁻¹ formed explicitly (a general inverse, a product, a
    second Cholesky: about 8x the work; AlexNet's 9216-input FC spent 270 s there)."""
    from scipy.linalg import lapack
    extra = 0.0
    idx = np.arange(h.shape[-1])
    for _ in range(8):
        try:
            hh = h[:, ::-1, ::-1].copy()                    # J H J
            if extra:
                hh[:, idx, idx] += extra * hh[:, idx, idx].mean(axis=1, keepdims=True)
            lower = np.linalg.cholesky(hh)
            del hh
            u = np.empty_like(lower)
            for g in range(lower.shape[0]):
                inv, info = lapack.dtrtri(lower[g], lower=1)   # L⁻¹
                if info != 0:
                    raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
                u[g] = inv[::-1, ::-1]                      # J L⁻¹ J
            return u
        except np.linalg.LinAlgError:
            extra = 0.01 if extra == 0 else extra * 10
    raise np.linalg.LinAlgError("input second-moment matrix stays singular after damping")


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray, x: np.ndarray | None = None) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) summed over groups: the layer's output squared error on the data; with
    ``x`` (rows with xᵀ x = H, ``Hessians.input_rows``) as ||(W − Ŵ) xᵀ||², the same up to roundoff."""
    d = (w - wq).astype(np.float64)
    if x is not None:
        e = d @ x.T
        return float(np.einsum("grn,grn->", e, e))
    return float(np.einsum("grk,grk->", d @ h, d))      # (d H) · d: a BLAS product, not a 3-operand einsum


def round_layers(float_model, targets: dict, samples, *, batch_size: int = 16, progress: bool = False,
                 pin_zeros: frozenset = frozenset()) -> tuple[dict, dict, dict, dict]:
    """GPTQ integer weights for ``targets`` (weight name -> (node, weight array, qparams)); the exact
    zeros of the weights named in ``pin_zeros`` (sparse layers) stay zero.

    Returns, by weight name: the integers, (nearest error, gptq error) of the layer's output, the
    chosen scales (per row, or one), and {weight name: reason} for layers left to nearest rounding."""
    layers, kept = {}, {}
    for wname, (node, w, qp) in targets.items():
        try:
            x = node.inputs[0]
            m, _ = layer_matrix(node, w)
            row_scales(qp, node, w.shape, m.shape)
            if node.op == "Conv" and len(w.shape) != 4:
                raise Unsupported(f"{len(w.shape) - 2}-D convolution")
            h_bytes = m.shape[0] * m.shape[2] ** 2 * 8
            if h_bytes > MAX_HESSIAN_BYTES:
                raise Unsupported(f"{m.shape[2]} inputs: its {m.shape[2]}x{m.shape[2]} input statistics would "
                                  f"take {h_bytes / 2**30:.1f} GiB (limit {MAX_HESSIAN_BYTES / 2**30:g} GiB)")
            layers[wname] = (node, x.name, w.shape, x.shape)
        except Unsupported as exc:
            kept[wname] = str(exc)
    if not layers:
        return {}, {}, {}, kept
    hs = collect_hessians(float_model, layers, samples, batch_size=batch_size, progress=progress)
    ints, errors, scales = {}, {}, {}
    for wname in layers:
        h = hs.h[wname] / max(hs.count[wname], 1)
        ints[wname], errors[wname], scales[wname] = _round_one(layers[wname][0], targets[wname][1],
                                                               targets[wname][2], h, wname in pin_zeros,
                                                               x=hs.input_rows(wname))
    return ints, errors, scales, kept


#: clipping candidates below 8 bits: each row's scale is tried at these fractions of its min-max scale
#: (at 8 bits the min-max step is fine already and a search on 100 calibration images fits their noise:
#: MobileNetV2 W8A8 per-channel measured 82.50 without it, 81.25 with it)
CLIP_RATIOS = np.linspace(0.5, 1.0, 11)
#: rows with at most this many inputs choose their clipping by GPTQ itself, wider ones by nearest
#: rounding under H (depthwise 3x3: 9 inputs, where the clipping matters most)
SEARCH_WITH_GPTQ = 32
#: grids whose scale is a mean of magnitudes (binary α = mean|w|, ternary's mean above Δ), not a range
#: to clip: the output error may want it smaller or larger, so their candidates go both ways
MEAN_SCALED = ("binary", "ternary")
MEAN_SCALE_RATIOS = np.linspace(0.5, 1.5, 11)


def _row_errors(m, wq, h, x=None) -> np.ndarray:
    d = m - wq
    if x is not None:
        e = d @ x.T
        return np.einsum("grn,grn->gr", e, e)
    return np.einsum("grk,grk->gr", d @ h, d)


def _round_one(node, w, qp, h, pin_zeros: bool = False, x=None):
    """GPTQ integers of one layer, each row's scale chosen among ``CLIP_RATIOS`` of the given one
    to minimize that row's output error (one scale for all rows when ``qp`` is per tensor).
    Never worse than nearest rounding at the given scale. Returns (integers, (nearest error, gptq
    error), the scale per row as QParams.scale wants it)."""
    m, back = layer_matrix(node, np.asarray(w, np.float64))
    pinned = (m == 0) if pin_zeros else None
    s0, z = row_scales(qp, node, w.shape, m.shape)
    s0 = np.where(s0 > 0, s0, 1.0)
    zz = z[:, :, None]

    def deq(a, s):
        return (a - zz) * s[:, :, None]

    def nearest(s):
        return project(m / s[:, :, None], zz, qp.qmin, qp.qmax, qp.levels)

    small = m.shape[2] <= SEARCH_WITH_GPTQ
    best_err = np.full(m.shape[:2], np.inf)
    best_s = s0.copy()
    best_q = None
    ratios = CLIP_RATIOS if qp.bits < 8 else CLIP_RATIOS[-1:]
    if qp.method in MEAN_SCALED:
        ratios = MEAN_SCALE_RATIOS
    if not small and len(ratios) == 1:
        ratios = ()      # one candidate scale (8 bits): it is the one GPTQ runs at, no error to compare
    for a in ratios:
        s = s0 * a
        q = gptq(m, h, s, z, qp.qmin, qp.qmax, levels=qp.levels, pinned=pinned) if small else nearest(s)
        err = _row_errors(m, deq(q, s), h, x)
        if not qp.per_channel:
            err = np.full_like(err, err.sum())
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if small:
            best_q = q if best_q is None else np.where(better[:, :, None], q, best_q)
    q = best_q if small else gptq(m, h, best_s, z, qp.qmin, qp.qmax, levels=qp.levels, pinned=pinned)
    near = nearest(s0)
    e_near, e_gptq = output_error(m, deq(near, s0), h, x), output_error(m, deq(q, best_s), h, x)
    if e_gptq > e_near:   # damping can lose on a tiny layer: never do worse than nearest
        q, best_s, e_gptq = near, s0, e_near
    scale = best_s.reshape(-1) if qp.per_channel else np.float32(best_s.reshape(-1)[0])
    return back(q).astype(np.int64), (e_near, e_gptq), scale
