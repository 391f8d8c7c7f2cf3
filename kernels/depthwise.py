"""Depthwise convolution (one input channel per group, any channel multiplier), NCHW in and out.

    acc[n, o, y, x] = sum_{i, j} (X[n, o // mult, y*sh - pt + i*dh, x*sw - pl + j*dw] - zx) * wz[o, i, j]

(wz: weights with zw taken out; padding contributes 0), then + bias and requantized in the same
pass (``requant.requant_run``). Channels are independent, so each is computed as a few long
contiguous multiply-adds over its whole output plane (int32, vectorized), three taps per pass:

- ``_depthwise_same`` (stride 1, OW == W, the usual "same" padding): the plane keeps its width W, so
  output t = y*W + x reads tap (i, j) at t + (i*dh)*W + j*dw - pl. A read that falls off the left
  or right edge lands in the neighbouring row, so tap column j reads a copy of the plane whose
  columns that such reads hit are zeroed (for j*dw - pl = d < 0 the last -d columns, for d > 0 the
  first d). The output plane is then the accumulator itself: no padded copy of rows, no gather.
- ``_depthwise_planes`` (any stride / padding): the zero-padded plane split by row and column
  residue mod the stride (plane (a, b) holds rows a, a+sh, ... and columns b, b+sw, ..., wq columns
  wide); tap (i, j) of output (y, x) reads plane ((i*dh) % sh, (j*dw) % sw) at (y*wq + x) +
  (i*dh // sh)*wq + j*dw // sw, computed over OH x wq and the columns x >= OW dropped.

Inner loops index slices, never ``a[off + t]``: Numba wraps negative indices, and that check on a
computed index stops LLVM vectorizing (7x slower).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.kernels.requant import requant_run


def depthwise(x, zx, wz, pt, pl, sh, sw, dh, dw, bias, scale, mult, shift, zp, qmin, qmax, mode, out):
    """x [N, C, H, W] int8/uint8, wz [Cout, KH, KW] int32, out [N, Cout, OH, OW] (int32 for mode 0:
    acc + bias; int8/uint8 for 1 / 2: requantized in float / fixed mode)."""
    if sh == 1 and sw == 1 and out.shape[3] == x.shape[3]:
        _depthwise_same(x, zx, wz, pt, pl, dh, dw, bias, scale, mult, shift, zp, qmin, qmax, mode, out)
    else:
        _depthwise_planes(x, zx, wz, pt, pl, sh, sw, dh, dw, bias, scale, mult, shift, zp, qmin, qmax, mode, out)
    return out


@njit(cache=True)
def _depthwise_same(x, zx, wz, pt, pl, dh, dw, bias, scale, mult, shift, zp, qmin, qmax, mode, out):
    n_b, c_in, h, wd = x.shape
    cout, kh, kw = wz.shape
    _, _, oh, _ = out.shape
    per = cout // c_in
    pix = oh * wd
    span = -(-pix // 64) * 64                      # whole 64-lane vector steps (extras dropped)
    rows = max(pt + h, oh + (kh - 1) * dh) + (span - pix) // wd + 2
    margin = max(pl, (kw - 1) * dw - pl) + 1       # reads off either end of the plane stay inside
    plane = margin + rows * wd + margin
    flat = np.zeros(kw * plane, np.int32)          # tap column j: the plane, edge columns zeroed
    n_taps = -(-kh * kw // 3) * 3
    base = np.zeros(n_taps, np.int64)              # tap k: where its run starts in ``flat``
    wt = np.zeros(n_taps, np.int32)                # (padding taps: weight 0)
    for k in range(kh * kw):
        i, j = k // kw, k % kw
        base[k] = j * plane + margin + i * dh * wd + j * dw - pl
    keep = np.ones((kw, h * wd), np.int32)         # 0 on the columns off-edge reads of tap column j hit
    for j in range(kw):
        d = j * dw - pl
        for r in range(h):
            for c in range(max(0, wd + d) if d < 0 else 0, wd if d < 0 else min(d, wd)):
                keep[j, r * wd + c] = 0
    acc = np.empty(span, np.int32)
    per_ch = scale.shape[0] > 1
    for n in range(n_b):
        for ci in range(c_in):
            src = x[n, ci].ravel()
            for j in range(kw):
                dst = flat[j * plane + margin + pt * wd:j * plane + margin + (pt + h) * wd]
                keep_j = keep[j]
                for t in range(h * wd):
                    dst[t] = (np.int32(src[t]) - zx) * keep_j[t]
            for o in range(ci * per, (ci + 1) * per):
                for k in range(kh * kw):
                    wt[k] = wz[o, k // kw, k % kw]
                _taps(flat, base, wt, acc)
                oc = o if per_ch else 0
                _finish(acc[:pix], bias[o], scale[oc], mult[oc], shift[oc], zp, qmin, qmax, mode, out[n, o].ravel())


@njit(cache=True)
def _taps(flat, base, wt, acc):
    """acc[t] = sum_k wt[k] * flat[base[k] + t], three taps per pass, in L1-sized chunks of acc."""
    span = acc.shape[0]
    for t0 in range(0, span, 1024):
        t1 = min(span, t0 + 1024)
        a_run = acc[t0:t1]
        for g in range(0, base.shape[0], 3):
            sa = flat[base[g] + t0:base[g] + t1]
            sb = flat[base[g + 1] + t0:base[g + 1] + t1]
            sc = flat[base[g + 2] + t0:base[g + 2] + t1]
            wa, wb, wc = wt[g], wt[g + 1], wt[g + 2]
            if g == 0:
                for t in range(t1 - t0):
                    a_run[t] = np.int32(np.int32(wa * sa[t]) + np.int32(wb * sb[t]) + np.int32(wc * sc[t]))
            else:
                for t in range(t1 - t0):
                    a_run[t] = np.int32(a_run[t] + np.int32(wa * sa[t]) + np.int32(wb * sb[t])
                                        + np.int32(wc * sc[t]))


@njit(cache=True)
def _finish(acc, bias, s, m, sh, zp, qmin, qmax, mode, wide):
    """wide = acc + bias (mode 0) or its requantization (1: float, 2: fixed); wide as long as acc."""
    if mode == 0:
        for t in range(acc.shape[0]):
            wide[t] = acc[t] + bias
    else:
        requant_run(acc, bias, s, m, sh, zp, qmin, qmax, mode == 2, wide)


@njit(cache=True)
def _depthwise_planes(x, zx, wz, pt, pl, sh, sw, dh, dw, bias, scale, mult, shift, zp, qmin, qmax, mode, out):
    """Any stride and padding: residue planes of the zero-padded input (module docstring)."""
    n_b, c_in, h, wd = x.shape
    cout, kh, kw = wz.shape
    _, _, oh, ow = out.shape
    per = cout // c_in
    hp = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(wd + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
    wq = -(-wp // sw)
    span = -(-oh * wq // 64) * 64       # outputs computed per channel: whole 64-lane vector steps, no
    rows = -(-hp // sh) + 2 + -(-(span - oh * wq) // wq)   # scalar remainder loops (extras dropped)
    plane = rows * wq
    flat = np.zeros(sh * sw * plane, np.int32)     # the sh x sw residue planes, one after the other
    n_taps = -(-kh * kw // 3) * 3
    base = np.zeros(n_taps, np.int64)               # tap k: where its run starts in ``flat``
    wt = np.zeros(n_taps, np.int32)                 # (padding taps: weight 0, read plane 0)
    for k in range(kh * kw):
        i, j = k // kw, k % kw
        base[k] = ((i * dh) % sh * sw + (j * dw) % sw) * plane + (i * dh // sh) * wq + j * dw // sw
    acc = np.empty(span, np.int32)
    wide = np.empty(span, out.dtype)
    per_ch = scale.shape[0] > 1
    for n in range(n_b):
        for ci in range(c_in):
            for r in range(h):
                a, rq = (r + pt) % sh, (r + pt) // sh
                for b in range(sw):
                    x0 = (b - pl) % sw                       # first input column with residue b
                    if x0 >= wd:
                        continue
                    cnt = (wd - 1 - x0) // sw + 1
                    start = (a * sw + b) * plane + rq * wq + (x0 + pl) // sw
                    dst = flat[start:start + cnt]
                    if sw == 1:                              # a contiguous source row vectorizes
                        src1 = x[n, ci, r]
                        for t in range(cnt):
                            dst[t] = np.int32(src1[t]) - zx
                    elif sw == 2:                            # constant stride: vectorized de-interleave
                        src2 = x[n, ci, r, x0:]
                        for t in range(cnt):
                            dst[t] = np.int32(src2[2 * t]) - zx
                    else:
                        src = x[n, ci, r, x0::sw]
                        for t in range(cnt):
                            dst[t] = np.int32(src[t]) - zx
            for o in range(ci * per, (ci + 1) * per):
                for k in range(kh * kw):
                    wt[k] = wz[o, k // kw, k % kw]
                _taps(flat, base, wt, acc)
                oc = o if per_ch else 0
                _finish(acc, bias[o], scale[oc], mult[oc], shift[oc], zp, qmin, qmax, mode, wide)
                for y in range(oh):
                    dst = out[n, o, y]
                    row = wide[y * wq:y * wq + ow]
                    for xo in range(ow):
                        dst[xo] = row[xo]
