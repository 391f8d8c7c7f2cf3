"""ONNX Runtime's float path for the QDQ units it does not fuse, reproduced operation for operation.

On x86-64, ORT's CPU provider has no int8-activation QLinearConv / QLinearMatMul: its
``QDQS8ToU8Transformer`` turns an int8 Q -> DQ pair into uint8 only when the Q has exactly one
consumer, and the QDQ selectors then fuse a unit only when all its activations ended up one type.
A tensor read twice (a residual: the next block's Conv and the Add) keeps int8, so the Conv that
writes it, the Conv that reads it and the Add stay ``DQ -> float op -> Q``. ``lower.ort_float_units``
predicts which; in ``float`` mode those steps run here, integer tensors in and out, with ORT's float32
arithmetic in ORT's order:

    DQ        x_f = float32(x - zx) * sx                 (one rounding; weights per channel the same)
    Conv      MlasConv: im2col (k = (c, i, j)), then MLAS SGEMM per image and group: for every output
              y = sum over k-blocks of (fma chain from 0 over the block), blocks added in order,
              then + bias. The block is MLAS_SGEMM_STRIDEK = 128, doubled (with STRIDEN = 128 halved)
              while N < K and STRIDEN/2 >= N (N = output pixels, K = Cin/group * KH * KW).
              One output channel per group (a depthwise Conv): MLAS's SGEMM takes its M = 1 kernel
              (``SgemmKernelM1Avx``, no FMA): per k-block, groups of four products
              t = ((p0 + p1) + p2) + p3 (each product and sum rounded), C = t + C; a remainder of two
              (p0 + p1) + C, of one p0 + C; then + bias (``sgemm_m1_mlas``)
    MatMul    MlasGemm (ORT's MatMul<float>; B is DQ's output, not an initializer, so never prepacked):
              A [..., M, K] x B [K, N] flattened to M = prod(A's leading dims), batched MatMuls one
              (M, K) x (K, N) product per broadcast batch. M > 1: the SGEMM order above with
              N = B's columns; M = 1: the M = 1 kernel over all of K in one block (``matmul_unit``)
    Gemm      ORT's Gemm<float>: C broadcast into Y first, then MlasGemm with beta (``gemm_float``):
              M = 1 (A not transposed, alpha 1, beta 0 / 1): SgemmKernelM1 from C, or with transB the
              8-lane SgemmKernelM1TransposeB, + C last; N = 1 the same kernels with A and B swapped;
              otherwise the k-blocked fma chains above (no doubling for a transposed A), each block
              y = fma(block, alpha, y) (the first one y = block * alpha when beta is 0)
    Add / Mul a_f + b_f (a_f * b_f) in float32
    Q         rne(y / sy) + zy, saturated (Relu/Clip before Q are the step's output clamp:
              Q is monotone, so clamping codes equals clipping floats first)

``fixed`` mode never comes here: integer-only hardware has no float units.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir as llir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.errors import ModelError
from qgraph.kernels import sgemm
from qgraph.ops import conv_geometry

SGEMM_STRIDE_N = 128
SGEMM_STRIDE_K = 128
SGEMM_PACKED_STRIDE_K = 256     # MlasSgemmPackedOperation: a prepacked (constant) B, fixed k-blocks


@intrinsic
def fma32(typingctx, a, b, c):
    """float32 fused multiply-add (one rounding), as the FMA instructions MLAS uses."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = llir.FloatType()
        name = "llvm.fma.f32"
        fn = builder.module.globals.get(name) or llir.Function(
            builder.module, llir.FunctionType(f32, [f32, f32, f32]), name)
        return builder.call(fn, list(args))

    return sig, codegen


def sgemm_block_k(k: int, n: int) -> int:
    """The k-block MLAS's SGEMM sums separately for a (., K) x (K, N) product (see module docstring)."""
    stride_n, stride_k = SGEMM_STRIDE_N, SGEMM_STRIDE_K
    if n < k:
        while stride_n > 16 and stride_n // 2 >= n:
            stride_k *= 2
            stride_n //= 2
    return stride_k


@njit(cache=True)
def _fma_row(acc, x, w):
    for j in range(acc.shape[0]):           # a separate function: LLVM vectorizes it
        acc[j] = fma32(x[j], w, acc[j])


@njit(cache=True)
def _fma_flat(a, b, c, out):
    for i in range(out.shape[0]):
        out[i] = fma32(a[i], b[i], c[i])


def fma(a, b, c) -> np.ndarray:
    """Element-wise float32 fma(a, b, c) of broadcastable arrays (one rounding, ``fma32``)."""
    a, b, c = (np.ascontiguousarray(v, np.float32).ravel()
               for v in np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                            np.asarray(c, np.float32)))
    out = np.empty(a.shape, np.float32)
    _fma_flat(a, b, c, out)
    return out


@njit(cache=True)
def _add_row(tot, acc):
    for j in range(tot.shape[0]):
        tot[j] = np.float32(tot[j] + acc[j])


@njit(cache=True)
def sgemm_mlas(w, cols, bias, kc, out):
    """out[m, n] = MLAS SGEMM order of sum_k w[m, k] * cols[k, n], then + bias[m] (float32): per
    output, an fma chain from 0 over each k-block, the blocks added in order, then the bias."""
    m_n, k_n = w.shape
    n_n = cols.shape[1]
    acc = np.empty(n_n, np.float32)
    for m in range(m_n):
        tot = out[m]
        for k0 in range(0, k_n, kc):
            acc[:] = 0
            for k in range(k0, min(k_n, k0 + kc)):
                _fma_row(acc, cols[k], w[m, k])
            if k0 == 0:
                tot[:] = acc
            else:
                _add_row(tot, acc)
        b = bias[m]
        for j in range(n_n):
            tot[j] = np.float32(tot[j] + b)


#: MLAS's Erf (``MlasErfKernelFma3``: a polynomial in x^2 below 0.921875, 1 - exp(-polynomial in |x|)
#: above, with its own exp), the constants of ``erf.cpp`` rounded to float32
_ERF_SMALL = np.array([-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1,
                       1.28379151e-1], np.float32)
_ERF_BIG = np.array([1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
                     1.28717512e-1], np.float32)
_ERF_EXP = np.array([1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0],
                    np.float32)
_ERF_CONST = np.array([0.921875, -88.3762626647949, 1.44269504088896341, -6.93145752e-1, -1.42860677e-6,
                       1.25829120e+7], np.float32)


@njit(cache=True)
def erf_mlas(x, small, big, expc, const, out):
    """out = MLAS's float32 Erf of x (flat arrays), every fma one rounding as in the FMA3 kernel. Bit
    for bit equal to ORT's Erf on this CPU family (checked on 300k values in tests)."""
    split, lower, log2e, ln2_hi, ln2_lo, shifter = const[0], const[1], const[2], const[3], const[4], const[5]
    for i in range(x.shape[0]):
        v = x[i]
        a = abs(v)
        if a > split:
            r = big[0]
            for j in range(1, big.shape[0]):
                r = fma32(r, a, big[j])
            r = fma32(r, a, a)
            e = max(lower, -r)
            n = np.float32(fma32(log2e, e, shifter) - shifter)
            f = fma32(n, ln2_hi, e)
            f = fma32(n, ln2_lo, f)
            y = expc[0]
            for j in range(1, expc.shape[0]):
                y = fma32(y, f, expc[j])
            y = np.float32(y * np.float32(2.0) ** np.int32(n))
            y = np.float32(np.float32(1.0) - y)
        else:
            sq = np.float32(a * a)
            y = small[0]
            for j in range(1, small.shape[0]):
                y = fma32(y, sq, small[j])
            y = fma32(y, a, a)
        out[i] = np.float32(math.copysign(y, v))      # the sign bit ORed back, as MLAS (-0 stays -0)


def erf(x) -> np.ndarray:
    """MLAS's Erf of a float32 array (``erf_mlas``)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    erf_mlas(x.reshape(-1), _ERF_SMALL, _ERF_BIG, _ERF_EXP, _ERF_CONST, out.reshape(-1))
    return out


@njit(cache=True)
def _m1_block(p, k0, k1, acc):
    """One k-block of MLAS's M = 1 SGEMM kernel for one output: products rounded to float32, summed in
    groups of four (then two, then one) that are each added to the running result."""
    k = k0
    while k1 - k >= 4:
        t = np.float32(np.float32(np.float32(p[k] + p[k + 1]) + p[k + 2]) + p[k + 3])
        acc = np.float32(t + acc)
        k += 4
    if k1 - k >= 2:
        acc = np.float32(np.float32(p[k] + p[k + 1]) + acc)
        k += 2
    if k1 - k == 1:
        acc = np.float32(p[k] + acc)
    return acc


@njit(cache=True)
def sgemm_m1_mlas(w, cols, bias, kc, out):
    """out[0, n] = MLAS's M = 1 SGEMM (``SgemmKernelM1Avx``: mul and add, no FMA) of w [1, K] x cols
    [K, N], k-blocks of ``kc`` (as a Conv's im2col hands them over; a MatMul passes kc = K), + bias."""
    k_n, n_n = cols.shape
    p = np.empty(k_n, np.float32)
    for j in range(n_n):
        for k in range(k_n):
            p[k] = np.float32(w[0, k] * cols[k, j])
        acc = np.float32(0.0)
        for k0 in range(0, k_n, kc):
            acc = _m1_block(p, k0, min(k_n, k0 + kc), acc)
        out[0, j] = np.float32(acc + bias[0])


@njit(cache=True)
def _dequantize_im2col(x, zx, sx, c0, cin_g, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, cols):
    """cols[(c*KH + i)*KW + j, y*OW + x] = DQ(x[c0 + c, y*sh - pt + i*dh, x*sw - pl + j*dw]), 0 outside."""
    h, wd = x.shape[1], x.shape[2]
    for c in range(cin_g):
        for i in range(kh):
            for j in range(kw):
                row = cols[(c * kh + i) * kw + j]
                for y in range(oh):
                    iy = y * sh - pt + i * dh
                    for xo in range(ow):
                        ix = xo * sw - pl + j * dw
                        if iy < 0 or iy >= h or ix < 0 or ix >= wd:
                            row[y * ow + xo] = np.float32(0.0)
                        else:
                            row[y * ow + xo] = np.float32(np.int32(x[c0 + c, iy, ix]) - zx) * sx


@njit(cache=True)
def _quantize_rows(y, sy, zy, lo, hi, out):
    """ORT QuantizeLinear on float32: rne(y / sy) + zy, clamped to [lo, hi] (codes)."""
    flat_y = y.ravel()
    flat_o = out.ravel()
    for i in range(flat_y.shape[0]):
        q = np.rint(flat_y[i] / sy) + zy
        flat_o[i] = lo if q < lo else (hi if q > hi else np.int32(q))


def dequantize_weights(w, sw, zw) -> np.ndarray:
    """ORT DequantizeLinear of per-channel (axis 0) or per-tensor weights, float32."""
    w = np.asarray(w)
    shape = (-1,) + (1,) * (w.ndim - 1)
    d = (w.astype(np.int32) - np.asarray(zw, np.int32).reshape(shape)).astype(np.float32)
    return (d * np.asarray(sw, np.float32).reshape(shape)).astype(np.float32)


def conv_unit(step, x, sx, zx, w_f, bias_f, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """DQ(x) -> float Conv (MLAS order) -> Q, for int8/uint8 x [N, C, H, W] or [N, C, L].

    The weights are packed once per step (``step.cache``); each call dequantizes im2col straight into
    ``sgemm`` B panels a few hundred pixels at a time, runs the tiled MLAS-order GEMM and quantizes
    the tile of C while it is still in cache (``_conv_float``)."""
    one_d = x.ndim == 3
    if one_d:
        x = x[:, :, None, :]
    n_b, _, h, wd = x.shape
    hit = step.cache.get("sgemm")
    if hit is None or hit[0] is not w_f or hit[1] != (h, wd):
        w4 = w_f[:, :, None, :] if one_d else w_f
        geo = conv_geometry(step.attrs, w_f.shape, (wd,) if one_d else (h, wd))   # 1-D: as 2-D, height 1
        cout, cin_g, kh, kw = w4.shape
        cout_g = cout // geo.group
        wmat = w4.reshape(cout, cin_g * kh * kw)
        panels = np.stack([sgemm.pack_a(wmat[gi * cout_g:(gi + 1) * cout_g]) for gi in range(geo.group)])
        b = np.zeros(cout, np.float32) if bias_f is None else np.ascontiguousarray(bias_f, np.float32)
        hit = (w_f, (h, wd), geo, w4.shape, panels, b)
        step.cache["sgemm"] = hit
    _, _, geo, (cout, cin_g, kh, kw), panels, bias = hit
    oh, ow = geo.out_hw(h, wd)
    cout_g = cout // geo.group
    k = cin_g * kh * kw
    kc = sgemm_block_k(k, oh * ow)
    if cout_g == 1:                          # MLAS's M = 1 kernel: its own order (``sgemm_m1_mlas``)
        w4 = w_f[:, :, None, :] if one_d else w_f
        out = np.empty((n_b, cout, oh * ow), out_dtype)
        _conv_float_m1(np.ascontiguousarray(x), np.int32(zx), np.float32(sx),
                       np.ascontiguousarray(w4.reshape(cout, k), np.float32), kh, kw, *geo.strides, *geo.dilations,
                       geo.pads[0], geo.pads[1], oh, ow, kc, bias, np.float32(sy), np.int32(zy), np.int32(lo),
                       np.int32(hi), out)
        out = out.reshape(n_b, cout, oh, ow)
        return out[:, :, 0, :] if one_d else out
    # pixels per chunk: B panels (K x NB) and the C tile (Mp x NB) stay within ~256 KiB
    mp = panels.shape[1] // k
    nb = max(sgemm.NR, min(-(-n_b * oh * ow // sgemm.NR), 65536 // max(k, mp) // sgemm.NR) * sgemm.NR)
    out = np.empty((n_b, cout, oh * ow), out_dtype)
    _conv_float(np.ascontiguousarray(x).reshape(n_b, x.shape[1], h * wd), h, wd, np.int32(zx), np.float32(sx),
                panels, cout_g, cin_g, kh, kw, *geo.strides, *geo.dilations, geo.pads[0], geo.pads[1], oh, ow, kc,
                nb, bias, np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    out = out.reshape(n_b, cout, oh, ow)
    return out[:, :, 0, :] if one_d else out


@njit(cache=True)
def _conv_float(x, h, wd, zx, sx, panels, cout_g, cin_g, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, kc, nb, bias,
                sy, zy, lo, hi, out):
    """Per group and chunk of ``nb`` output pixels (images side by side; x is [N, C, H*W]):
    dequantizing im2col into B panels, MLAS-order GEMM into C, then out = Q(C + bias) for the chunk."""
    n_b = x.shape[0]
    nr = sgemm.NR
    k_n = cin_g * kh * kw
    pix = oh * ow
    total = n_b * pix
    mp = panels.shape[1] // k_n
    bp = np.empty(nb * k_n, np.float32)
    c = np.empty((mp, nb), np.float32)
    pointwise = kh == 1 and kw == 1 and sh == 1 and sw == 1 and pt == 0 and pl == 0 and oh == h and ow == wd
    for gi in range(panels.shape[0]):
        c0 = gi * cin_g
        for g0 in range(0, total, nb):
            g1 = min(total, g0 + nb)
            cols = -(-(g1 - g0) // nr) * nr
            for t in range(cols // nr):
                t0 = g0 + t * nr
                n = t0 // pix
                q0 = t0 - n * pix
                if pointwise and q0 + nr <= pix and t0 + nr <= g1:      # 32 pixels of one image
                    for kk in range(k_n):
                        _dq_run(x[n, c0 + kk, q0:q0 + nr], zx, sx, bp[(t * k_n + kk) * nr:(t * k_n + kk + 1) * nr])
                    continue
                for r in range(nr):                                     # k = (c, i, j); tail columns 0
                    gp = t0 + r
                    n = gp // pix
                    rem = gp - n * pix
                    y = rem // ow
                    xo = rem - y * ow
                    for kk in range(k_n):
                        v = np.float32(0.0)
                        if gp < g1:
                            ci = kk // (kh * kw)
                            iy = y * sh - pt + (kk // kw % kh) * dh
                            ix = xo * sw - pl + (kk % kw) * dw
                            if 0 <= iy < h and 0 <= ix < wd:
                                v = np.float32(np.int32(x[n, c0 + ci, iy * wd + ix]) - zx) * sx
                        bp[(t * k_n + kk) * nr + r] = v
            sgemm.sgemm_panels(panels[gi], bp, k_n, kc, c, cols)
            for m in range(cout_g):
                o = gi * cout_g + m
                p = g0
                while p < g1:                                           # one image's run of pixels
                    n = p // pix
                    q0 = p - n * pix
                    q1 = min(pix, q0 + g1 - p)
                    _quantize_run(c[m, p - g0:p - g0 + q1 - q0], bias[o], sy, zy, lo, hi, out[n, o, q0:q1])
                    p += q1 - q0


@njit(cache=True)
def _conv_float_m1(x, zx, sx, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, kc, bias, sy, zy, lo, hi, out):
    """A Conv with one output channel per group, output by output: the dequantized im2col column's
    products, summed as ``sgemm_m1_mlas``, + bias, quantized (x is [N, C, H, W])."""
    n_b, _, h, wd = x.shape
    cout, k_n = w.shape
    cin_g = k_n // (kh * kw)
    p = np.empty(k_n, np.float32)
    zf, lf, hf = np.float32(zy), np.float32(lo), np.float32(hi)
    for n in range(n_b):
        for o in range(cout):
            c0 = o * cin_g
            for y in range(oh):
                for xo in range(ow):
                    for kk in range(k_n):
                        ci = kk // (kh * kw)
                        iy = y * sh - pt + (kk // kw % kh) * dh
                        ix = xo * sw - pl + (kk % kw) * dw
                        v = np.float32(0.0)
                        if 0 <= iy < h and 0 <= ix < wd:
                            v = np.float32(np.int32(x[n, c0 + ci, iy, ix]) - zx) * sx
                        p[kk] = np.float32(w[o, kk] * v)
                    acc = np.float32(0.0)
                    for k0 in range(0, k_n, kc):
                        acc = _m1_block(p, k0, min(k_n, k0 + kc), acc)
                    q = np.rint(np.float32(acc + bias[o]) / sy) + zf
                    out[n, o, y * ow + xo] = np.int32(min(max(q, lf), hf))


@njit(cache=True)
def _dq_run(src, zx, sx, dst):
    for r in range(dst.shape[0]):
        dst[r] = np.float32(np.int32(src[r]) - zx) * sx


@njit(cache=True)
def _quantize_run(y, b, sy, zy, lo, hi, out):
    """out = Q(float32(y + b)): rne(. / sy) + zy clamped to [lo, hi], as ``_quantize_rows``. Done in
    float32 so it vectorizes: rint(.) + zy is exact below 2^24 and beyond that far outside [lo, hi]."""
    zf, lf, hf = np.float32(zy), np.float32(lo), np.float32(hi)
    for i in range(y.shape[0]):
        q = np.rint(np.float32(y[i] + b) / sy) + zf
        out[i] = np.int32(min(max(q, lf), hf))


def conv_unit_reference(attrs, x, sx, zx, w_f, bias_f, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """The plain loops ``conv_unit`` must equal exactly: per image and group, im2col
    (``_dequantize_im2col``), ``sgemm_mlas``, then ``_quantize_rows``. For tests."""
    one_d = x.ndim == 3
    geo = conv_geometry(attrs, w_f.shape, x.shape[2:])
    if one_d:
        x, w_f = x[:, :, None, :], w_f[:, :, None, :]
    n_b, _, h, wd = x.shape
    cout, cin_g, kh, kw = w_f.shape
    oh, ow = geo.out_hw(h, wd)
    cout_g = cout // geo.group
    k = cin_g * kh * kw
    wmat = np.ascontiguousarray(w_f.reshape(cout, k))
    bias_f = np.zeros(cout, np.float32) if bias_f is None else np.ascontiguousarray(bias_f, np.float32)
    y = np.empty((n_b, cout, oh * ow), np.float32)
    cols = np.empty((k, oh * ow), np.float32)
    for n in range(n_b):
        for gi in range(geo.group):
            _dequantize_im2col(np.ascontiguousarray(x[n]), np.int32(zx), np.float32(sx), gi * cin_g, cin_g, kh, kw,
                               *geo.strides, *geo.dilations, geo.pads[0], geo.pads[1], oh, ow, cols)
            rows = slice(gi * cout_g, (gi + 1) * cout_g)
            gemm = sgemm_m1_mlas if cout_g == 1 else sgemm_mlas
            gemm(wmat[rows], cols, bias_f[rows], sgemm_block_k(k, oh * ow), y[n, rows])
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(y, np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    out = out.reshape(n_b, cout, oh, ow)
    return out[:, :, 0, :] if one_d else out


def pack_b(b_f: np.ndarray) -> np.ndarray:
    """b_f [K, N] float32 -> flat ``sgemm`` B panels [N/NR][K][NR] (columns padded with zeros)."""
    k, n = b_f.shape
    npad = -(-n // sgemm.NR) * sgemm.NR
    colp = np.zeros((k, npad), np.float32)
    colp[:, :n] = b_f
    return np.ascontiguousarray(colp.reshape(k, npad // sgemm.NR, sgemm.NR).transpose(1, 0, 2)).reshape(-1)


def dequantize_columns(b, sb, zb) -> np.ndarray:
    """ORT DequantizeLinear of a MatMul's B [..., K, N], per tensor or per column (axis -1), float32."""
    d = (np.asarray(b).astype(np.int32) - np.asarray(zb, np.int32).reshape(-1)).astype(np.float32)
    return d * np.asarray(sb, np.float32).reshape(-1)


def _sgemm_2d(a_f: np.ndarray, b_f: np.ndarray, b_panels=None) -> np.ndarray:
    """(M, K) x (K, N) float32 in MlasGemm's order (module docstring), as ORT's MatMul<float> calls it."""
    m, k = a_f.shape
    n = b_f.shape[1]
    if m == 1:                          # MlasGemm's M = 1 special case: SgemmKernelM1 over all of K
        y = np.empty((1, n), np.float32)
        sgemm_m1_mlas(np.ascontiguousarray(a_f), np.ascontiguousarray(b_f), np.zeros(1, np.float32), max(k, 1), y)
        return y
    b_panels = pack_b(b_f) if b_panels is None else b_panels
    npad = b_panels.size // max(k, 1) if k else -(-n // sgemm.NR) * sgemm.NR
    a_p = sgemm.pack_a(a_f)
    c = np.zeros((a_p.size // k if k else -(-m // sgemm.MR) * sgemm.MR, npad), np.float32)
    if k:
        sgemm.sgemm_panels(a_p, b_panels, k, sgemm_block_k(k, n), c, npad)
    return c[:m, :n]


def matmul_unit(step, a, sa, za, b, sb, zb, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """DQ(a) x DQ(b) -> float MatMul (MLAS order) -> Q: what ORT computes for a MatMul it leaves
    unfused. ``a`` [..., M, K] int8/uint8 with one zero point; ``b`` [..., K, N], its scale / zero
    point per tensor or per column. Constant B is dequantized and packed once per step."""
    if np.asarray(za).size != 1 or np.asarray(sa).size != 1:
        raise ModelError(f"{step.name}: a float MatMul unit with a per-row scale or zero point of A is not supported")
    a_f = (a.astype(np.int32) - np.int32(_one(za))).astype(np.float32) * np.float32(_one(sa))
    hit = step.cache.get("matmul_b")
    if hit is not None and hit[0] is b:
        b_f, panels = hit[1], hit[2]
    else:
        b_f = dequantize_columns(b, sb, zb)
        panels = pack_b(b_f) if b_f.ndim == 2 else None
        step.cache["matmul_b"] = (b, b_f, panels)
    if b_f.ndim == 2:
        y = _sgemm_2d(a_f.reshape(-1, a_f.shape[-1]), b_f, panels).reshape(*a.shape[:-1], b_f.shape[-1])
    else:                               # MlasGemmBatch: one product per broadcast batch
        if a_f.ndim == 1 or b_f.ndim == 1:
            raise ModelError(f"{step.name}: a float MatMul unit with a 1-D operand is not supported")
        batch = np.broadcast_shapes(a_f.shape[:-2], b_f.shape[:-2])
        a_b = np.broadcast_to(a_f, batch + a_f.shape[-2:])
        b_b = np.broadcast_to(b_f, batch + b_f.shape[-2:])
        y = np.empty(batch + (a_f.shape[-2], b_f.shape[-1]), np.float32)
        for idx in np.ndindex(*batch):
            y[idx] = _sgemm_2d(np.ascontiguousarray(a_b[idx]), np.ascontiguousarray(b_b[idx]))
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(np.ascontiguousarray(y), np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    return out


def matmul_unit_reference(a, sa, za, b, sb, zb, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """The plain loops ``matmul_unit`` must equal exactly (2-D B): ``sgemm_mlas`` (or
    ``sgemm_m1_mlas`` for M = 1) on the dequantized operands, then ``_quantize_rows``. For tests."""
    a_f = ((a.astype(np.int32) - np.int32(za)).astype(np.float32) * np.float32(sa)).reshape(-1, a.shape[-1])
    b_f = dequantize_columns(b, sb, zb)
    m, k = a_f.shape
    n = b_f.shape[1]
    y = np.empty((m, n), np.float32)
    if m == 1:
        sgemm_m1_mlas(a_f, b_f, np.zeros(1, np.float32), max(k, 1), y)
    else:
        # sgemm_mlas computes w [M', K] x cols [K, N']: rows of A against B's columns
        sgemm_mlas(np.ascontiguousarray(a_f), np.ascontiguousarray(b_f), np.zeros(m, np.float32),
                   sgemm_block_k(k, n), y)
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(y, np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    return out.reshape(*a.shape[:-1], n)


def _one(v):
    return np.asarray(v).reshape(-1)[0]


def global_average_pool_mlas(x: np.ndarray) -> np.ndarray:
    """ORT's float GlobalAveragePool (``MlasPoolGlobalKernel``), per (image, channel) plane of S values:
    a 4-lane float32 accumulator over the first 4*floor(S/4) values in order, lanes reduced as
    (l0 + l2) + (l1 + l3) (``MlasReduceAddFloat32x4`` on SSE/AVX), the S mod 4 remaining values
    added one by one, then divided by float(S). Keeps the (N, C, 1, ...) shape."""
    x = np.ascontiguousarray(x, np.float32)
    n_b, c_n = x.shape[:2]
    size = int(np.prod(x.shape[2:]))
    rows = x.reshape(n_b * c_n, size)
    body = size - size % 4
    lanes = np.zeros((rows.shape[0], 4), np.float32)
    for j in range(0, body, 4):                          # one vector add per 4 values, in order
        lanes += rows[:, j:j + 4]
    red = ((lanes[:, 0] + lanes[:, 2]) + (lanes[:, 1] + lanes[:, 3])).astype(np.float32)
    for j in range(body, size):
        red = (red + rows[:, j]).astype(np.float32)
    out = (red / np.float32(size)).astype(np.float32)
    return out.reshape((n_b, c_n) + (1,) * (x.ndim - 2))


def global_average_pool_unit(x, sx, zx, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """DQ(x) -> float GlobalAveragePool (``global_average_pool_mlas``) -> Q: the unit ORT leaves
    unfused when its input and output types differ after the int8 -> uint8 rewrite."""
    x_f = (x.astype(np.int32) - np.int32(zx)).astype(np.float32) * np.float32(sx)
    y = global_average_pool_mlas(x_f)
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(y, np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    return out


def binary_unit(op: str, a, sa, za, b, sb, zb, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """DQ(a), DQ(b) -> float Add | Mul (numpy broadcasting) -> Q."""
    if a.shape == b.shape:                     # the residual Add: one pass, no temporaries
        out = np.empty(a.shape, out_dtype)
        _binary_same_shape(np.ascontiguousarray(a).reshape(-1), np.int32(za), np.float32(sa),
                           np.ascontiguousarray(b).reshape(-1), np.int32(zb), np.float32(sb), op == "Add",
                           np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out.reshape(-1))
        return out
    a_f = (a.astype(np.int32) - np.int32(za)).astype(np.float32) * np.float32(sa)
    b_f = (b.astype(np.int32) - np.int32(zb)).astype(np.float32) * np.float32(sb)
    y = np.ascontiguousarray(a_f + b_f if op == "Add" else a_f * b_f, np.float32)
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(y, np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    return out


@njit(cache=True)
def _binary_same_shape(a, za, sa, b, zb, sb, add, sy, zy, lo, hi, out):
    """The numpy path's float32 operations, element by element (each one IEEE-rounded the same way)."""
    zf, lf, hf = np.float32(zy), np.float32(lo), np.float32(hi)
    for i in range(out.shape[0]):
        a_f = np.float32(np.int32(a[i]) - za) * sa
        b_f = np.float32(np.int32(b[i]) - zb) * sb
        y = np.float32(a_f + b_f) if add else np.float32(a_f * b_f)
        q = np.rint(y / sy) + zf                  # as ``_quantize_run``: exact where it matters
        out[i] = np.int32(min(max(q, lf), hf))


# ----------------------------------------------------------------------------- float Gemm

@njit(cache=True)
def _gemm_blocks(a, b, y, kc, alpha, zero_mode):
    """MlasSgemmOperation's general path for y [M, N] (C already broadcast into it and scaled by
    beta): per output and k-block of ``kc``, an fma chain from 0; the first block of a ``zero_mode``
    (beta = 0) product stores acc * alpha, every other block y = fma(acc, alpha, y) (one rounding,
    the kernels' ``vfmadd213ps`` with alpha)."""
    m_n, k_n = a.shape
    n_n = b.shape[1]
    acc = np.empty(n_n, np.float32)
    for m in range(m_n):
        for k0 in range(0, k_n, kc):
            acc[:] = 0
            for k in range(k0, min(k_n, k0 + kc)):
                _fma_row(acc, b[k], a[m, k])
            if zero_mode and k0 == 0:
                for j in range(n_n):
                    y[m, j] = np.float32(acc[j] * alpha)
            else:
                for j in range(n_n):
                    y[m, j] = fma32(acc[j], alpha, y[m, j])


@njit(cache=True)
def _gemm_m1(v, mat, y, accumulate):
    """``MlasSgemmKernelM1Avx`` (B not transposed): y[j] = sum_k v[k] * mat[k, j], the products in
    groups of four added to C as they come (``_m1_block``), starting from C (beta = 1) or 0."""
    k_n, n_n = mat.shape
    p = np.empty(k_n, np.float32)
    for j in range(n_n):
        for k in range(k_n):
            p[k] = np.float32(v[k] * mat[k, j])
        y[j] = _m1_block(p, 0, k_n, y[j] if accumulate else np.float32(0.0))


@njit(cache=True)
def _gemm_m1_tb(v, rows, y, accumulate):
    """``MlasSgemmKernelM1TransposeBAvx``: y[r] = sum_k v[k] * rows[r, k] in eight float32 lanes
    (lane l: k = l mod 8, mul then add), reduced as the kernel's shuffles do for the row's place in
    its group (4 rows: ((l0+l1)+l2)+l3 + ((l4+l5)+l6)+l7; the 2-row tail: ((l0+l2)+(l4+l6)) +
    ((l1+l3)+(l5+l7)); the 1-row tail: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))), then + C."""
    r_n, k_n = rows.shape
    lanes = np.zeros(8, np.float32)
    r = 0
    while r < r_n:
        left = r_n - r
        width = 4 if left >= 4 else (2 if left >= 2 else 1)
        for rr in range(r, r + width):
            lanes[:] = 0
            for k in range(k_n):
                lanes[k % 8] = np.float32(lanes[k % 8] + np.float32(v[k] * rows[rr, k]))
            l0, l1, l2, l3, l4, l5, l6, l7 = (lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5],
                                              lanes[6], lanes[7])
            if width == 4:
                s = np.float32(np.float32(np.float32(np.float32(l0 + l1) + l2) + l3)
                               + np.float32(np.float32(np.float32(l4 + l5) + l6) + l7))
            elif width == 2:
                s = np.float32(np.float32(np.float32(l0 + l2) + np.float32(l4 + l6))
                               + np.float32(np.float32(l1 + l3) + np.float32(l5 + l7)))
            else:
                s = np.float32(np.float32(np.float32(l0 + l1) + np.float32(l2 + l3))
                               + np.float32(np.float32(l4 + l5) + np.float32(l6 + l7)))
            y[rr] = np.float32(s + y[rr]) if accumulate else s
        r += width


def gemm_float(a_f, b_f, c_f, alpha: float, beta: float, trans_a: bool, trans_b: bool) -> np.ndarray:
    """ORT's Gemm<float> (``gemm.cc``) on float32 operands as stored (A [M, K] or [K, M] with transA,
    B [K, N] or [N, K] with transB): C broadcast into Y (``GemmBroadcastBias``: scalar, [N], [1, N],
    [M, 1] or [M, N]), then MlasGemm with beta (0 without C): its M = 1 kernels (M = 1, A not
    transposed, alpha = 1, beta 0 or 1; or N = 1 with B's leading dimension 1), else
    ``MlasSgemmOperation``: Y *= beta unless beta is 0 or 1, k-blocks as ``sgemm_block_k`` (not
    doubled for a transposed A), ``_gemm_blocks``."""
    a_f, b_f = np.asarray(a_f, np.float32), np.asarray(b_f, np.float32)
    a2 = a_f.T if trans_a else a_f
    b2 = b_f.T if trans_b else b_f
    m, k = a2.shape
    n = b2.shape[1]
    alpha, beta = np.float32(alpha), np.float32(beta)
    y = np.zeros((m, n), np.float32)
    if c_f is not None and beta != 0:
        y[:] = np.broadcast_to(np.asarray(c_f, np.float32).reshape(np.shape(c_f)), (m, n))
    else:
        beta = np.float32(0)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return (y * beta).astype(np.float32)
    simple = alpha == 1 and beta in (0, 1)
    acc = bool(beta == 1)
    if m == 1 and not trans_a and simple:
        if trans_b:
            _gemm_m1_tb(np.ascontiguousarray(a2[0]), np.ascontiguousarray(b_f), y[0], acc)
        else:
            _gemm_m1(np.ascontiguousarray(a2[0]), np.ascontiguousarray(b_f), y[0], acc)
        return y
    if n == 1 and (not trans_b or k == 1) and simple:        # ldb == 1 == ldc: A and B swapped
        col = np.empty(m, np.float32)
        col[:] = y[:, 0]
        if trans_a:
            _gemm_m1(np.ascontiguousarray(b2[:, 0]), np.ascontiguousarray(a_f), col, acc)
        else:
            _gemm_m1_tb(np.ascontiguousarray(b2[:, 0]), np.ascontiguousarray(a_f), col, acc)
        y[:, 0] = col
        return y
    if beta not in (0, 1):
        y = (y * beta).astype(np.float32)                    # MlasSgemmMultiplyBeta
    kc = SGEMM_STRIDE_K if trans_a else sgemm_block_k(k, n)  # a transposed A: no k-block doubling
    _gemm_blocks(np.ascontiguousarray(a2), np.ascontiguousarray(b2), y, kc, alpha, bool(beta == 0))
    return y


def gemm_unit(step, a, sa, za, b, sb, zb, sy, zy, lo, hi, out_dtype) -> np.ndarray:
    """DQ(A), DQ(B) [, C] -> float Gemm (``gemm_float``) [-> Relu / Clip] -> Q: a Gemm ORT leaves
    unfused. ``step.attrs["ort_float"]``: ``c`` (C as ORT's float path sees it, its own shape, or
    None), ``alpha``, ``beta``; B's scale / zero point per tensor or per output column (N)."""
    if np.asarray(za).size != 1 or np.asarray(sa).size != 1:
        raise ModelError(f"{step.name}: a float Gemm unit with a per-row scale or zero point of A is not supported")
    if a.ndim != 2 or b.ndim != 2:
        raise ModelError(f"{step.name}: a float Gemm unit needs 2-D A and B (got {a.ndim}-D, {b.ndim}-D)")
    at = step.attrs
    fl = at["ort_float"]
    trans_b = bool(at.get("transB", 0))
    a_f = (a.astype(np.int32) - np.int32(_one(za))).astype(np.float32) * np.float32(_one(sa))
    hit = step.cache.get("gemm_b")
    if hit is not None and hit[0] is b:
        b_f = hit[1]
    else:
        zbv = np.asarray(zb, np.int32).reshape(-1)
        sbv = np.asarray(sb, np.float32).reshape(-1)
        shape = (-1, 1) if trans_b else (1, -1)               # per output column N
        b_f = ((b.astype(np.int32) - zbv.reshape(shape if zbv.size > 1 else ())).astype(np.float32)
               * sbv.reshape(shape if sbv.size > 1 else ())).astype(np.float32)
        step.cache["gemm_b"] = (b, b_f)
    y = gemm_float(a_f, b_f, fl.get("c"), float(fl.get("alpha", 1.0)), float(fl.get("beta", 1.0)),
                   bool(at.get("transA", 0)), trans_b)
    out = np.empty(y.shape, out_dtype)
    _quantize_rows(np.ascontiguousarray(y), np.float32(sy), np.int32(zy), np.int32(lo), np.int32(hi), out)
    return out
