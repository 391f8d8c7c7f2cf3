"""Requantization: int32 accumulators -> int8/uint8 outputs, in one function with two modes.

``float`` (what ONNX Runtime's MlasRequantizeOutput computes)::

    y = clamp(rne(float32(acc) * M) + zp_y, qmin, qmax),   M = float32(s_x * s_w / s_y)

with float32 arithmetic throughout and round-half-to-even. ``fixed`` (what integer-only hardware
computes, gemmlowp / TFLite style)::

    M = m * 2^-n,  m an int32 in [2^30, 2^31)  ->  y = clamp(((acc * m + 2^(n-1)) >> n) + zp_y)

i.e. a 64-bit product, round half up, arithmetic shift. Both modes use ``requantize``; the only
difference is the branch on ``fixed``. The plain definitions (``fixed_multiplier``, ``requantize``,
``dequantize_array``) are in ``qgraph.ops``; these are their compiled forms, tested equal to them.
Quantizing at the float boundary (``quantize_linear``) lives here too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.ops import REQUANT_MODES, fixed_multiplier

MODES = REQUANT_MODES


@njit(cache=True)
def column_terms(zb, ob, colsum, c0, n):
    """The GEMM's per-column zero-point terms for columns c0..c0+n, as wrapping int32:
    zb'_j = zb_j - ob (zb per tensor or per column) and colsum_j; and whether any zb'_j is non-zero."""
    zbv = np.empty(n, np.int32)
    csum = np.empty(n, np.int32)
    nonzero = False
    for j in range(n):
        zbv[j] = np.int32((np.int64(zb[c0 + j if zb.size > 1 else 0]) - ob) & 0xFFFFFFFF)
        csum[j] = np.int32(colsum[c0 + j] & 0xFFFFFFFF)
        nonzero = nonzero or zbv[j] != 0
    return zbv, csum, nonzero


def output_scale(s_x, s_w, s_y) -> np.ndarray:
    """Per-channel M = s_x * s_w / s_y in float32, evaluated in the order ORT does."""
    s_x = np.float32(np.asarray(s_x, np.float32).reshape(()))
    s_y = np.float32(np.asarray(s_y, np.float32).reshape(()))
    s_w = np.asarray(s_w, np.float32).reshape(-1)
    return ((s_x * s_w) / s_y).astype(np.float32)


@njit(cache=True)
def requantize(acc, scale, mult, shift, zp, qmin, qmax, fixed, out):
    """acc int32 (outer, C, inner) -> out (outer, C, inner); per-channel scale/mult/shift of length
    C or 1. ``out`` is any integer array of that shape (int8, uint8, int32). Memory order is
    followed (outer, channel, inner), so NCHW (inner = pixels) and NHWC (inner = 1) both stream."""
    n0, nc, n1 = acc.shape
    per_ch = scale.shape[0] > 1
    for i in range(n0):
        for c in range(nc):
            ci = c if per_ch else 0
            requant_run(acc[i, c], np.int32(0), scale[ci], mult[ci], shift[ci], zp, qmin, qmax, fixed, out[i, c])
    return out


@njit(cache=True)
def requant_run(acc, bias, s, m, sh, zp, qmin, qmax, fixed, out):
    """The requantization arithmetic, for one run of accumulators of one channel (every kernel that
    requantizes calls this): v = acc + bias (int32), then

        float:  clamp(rne(float32(v) * s), qmin - zp, qmax - zp) + zp     (float32 throughout)
        fixed:  clamp(((v * m + 2^(sh-1)) >> sh) + zp, qmin, qmax)        (64-bit product)"""
    if fixed:
        m64 = np.int64(m)
        sh64 = np.int64(sh)
        half = np.int64(1) << (sh64 - 1)
        for j in range(acc.shape[0]):
            v = (np.int64(np.int32(acc[j] + bias)) * m64 + half) >> sh64
            v += zp
            if v < qmin:
                v = qmin
            elif v > qmax:
                v = qmax
            out[j] = v
    else:
        lo = np.float32(qmin - zp)
        hi = np.float32(qmax - zp)
        for j in range(acc.shape[0]):
            f = np.float32(np.int32(acc[j] + bias)) * s
            f = min(max(f, lo), hi)
            out[j] = np.int64(np.rint(f)) + zp


@njit(cache=True)
def _requantize_channels_last(acc, scale, zp, lo, hi, out):
    """Float mode for (pixels, C) int32 with a per-channel scale vector: the channel loop is the
    inner one and vectorizes (same arithmetic as ``requantize``)."""
    for i in range(acc.shape[0]):
        _requant_row(acc[i], scale, zp, lo, hi, out[i])


@njit(cache=True)
def _requant_row(a, scale, zp, lo, hi, o):
    for c in range(a.shape[0]):
        f = min(max(np.float32(a[c]) * scale[c], lo), hi)
        o[c] = np.int32(np.rint(f)) + zp


def requantize_into(acc3: np.ndarray, scale, zp: int, qmin: int, qmax: int, mode: str,
                    dtype) -> np.ndarray:
    """Convenience wrapper: allocate the output, derive fixed-point multipliers, call ``requantize``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(-1))
    if mode == "fixed":
        mult, shift = fixed_multiplier(scale)
    else:
        mult = np.zeros(scale.shape, np.int64)
        shift = np.ones(scale.shape, np.int64)
    out = np.empty(acc3.shape, dtype)
    acc3 = np.ascontiguousarray(acc3, dtype=np.int32)
    if mode == "float" and acc3.shape[2] == 1 and acc3.shape[1] > 1:       # channels last
        vec = np.ascontiguousarray(np.broadcast_to(scale, (acc3.shape[1],)), dtype=np.float32)
        _requantize_channels_last(acc3[:, :, 0], vec, np.int32(zp), np.float32(qmin - zp),
                                  np.float32(qmax - zp), out[:, :, 0])
        return out
    return requantize(acc3, scale, mult, shift, int(zp), int(qmin), int(qmax), mode == "fixed", out)


# ----------------------------------------------------------------------------- float boundary

def quantize_linear(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
                    dtype=np.int64) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rne(x / scale) + zp) with float32 division, as ORT and the spec.

    ``scale`` and ``zp`` already broadcast against ``x``; returns ``dtype`` values."""
    x = np.asarray(x, np.float32)
    scale, zp = np.asarray(scale, np.float32), np.asarray(zp)
    if scale.size == 1 and zp.size == 1:                      # per tensor: one pass, no temporaries
        out = np.empty(x.shape, dtype)
        _quantize_flat(np.ascontiguousarray(x).reshape(-1), np.float32(scale.reshape(-1)[0]),
                       int(zp.reshape(-1)[0]), qmin, qmax, out.reshape(-1))
        return out
    q = np.rint(x / scale)
    return np.clip(q.astype(np.float64) + zp.astype(np.float64), qmin, qmax).astype(dtype)


@njit(cache=True)
def _quantize_flat(x, scale, zp, qmin, qmax, out):
    for i in range(x.shape[0]):
        q = np.rint(x[i] / scale) + zp
        out[i] = qmin if q < qmin else (qmax if q > qmax else q)
