"""ONNX Runtime 1.32's float Softmax on x86-64 with AVX-512F, operation for operation.

ORT's ``Softmax<float>`` (axis moved last, rows of length D) calls ``MlasComputeSoftmax``
(``mlas/lib/compute.cpp``), which per row takes

    max      ``MlasReduceMaximumF32KernelAvx`` (exact in any order)
    e_i      ``MlasComputeSumExpF32KernelAvx512F`` (``TransKernelAvx512F.S``): x = max(x_i + (-max), -103.97...);
             m = fma(x, 1/ln2, 1.5*2^23) - 1.5*2^23 (round to nearest); r = fma(m, -ln2_hi, x);
             r = fma(m, -ln2_lo, r); p = poly_0, then p = fma(p, r, c) for poly_1 .. poly_4, poly_56,
             poly_56; e = vscalefps(p, m) = p * 2^m (one rounding)
    sum      16 float32 lanes, lane j adding e_j, e_{j+16}, ... in order (the 48-wide loop adds its
             three vectors in turn, the masked 16-wide tail likewise); then lanes j and j + 8 added,
             two vhaddps and a scalar add: ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    y_i      e_i * (1.0f / sum)   (``MlasComputeSoftmaxOutputF32KernelAvx``: a multiply by the reciprocal)

CPUs without AVX-512F take ``MlasComputeSumExpF32KernelFma3`` (8 lanes): not reproduced here, so this
is ORT's result on AVX-512F machines (Skylake-SP and later, Zen 4) and within an ulp elsewhere.
``softmax_reference`` is the same arithmetic vectorized with numpy over whole rows (the tests hold
the two equal, and the kernel equal to ORT).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from qgraph.kernels.ortfloat import fma, fma32

F32 = np.float32
#: ``MlasExpConstants`` (compute.cpp), as float32
LOWER_RANGE = F32(-103.9720840454)
ROUNDING_BIAS = F32(12582912.0)
LOG2_RECIPROCAL = F32(1.44269504088896341)
LOG2_HIGH = F32(-6.93145752e-1)
LOG2_LOW = F32(-1.42860677e-6)
POLY = np.array([float.fromhex(h) for h in ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5",
                                             "0x1.555450p-3", "0x1.fffff6p-2", "0x1.000000p+0",
                                             "0x1.000000p+0")], F32)
LANES = 16


@njit(cache=True)
def _exp_mlas(v, poly):
    x = max(LOWER_RANGE, v)
    m = F32(fma32(x, LOG2_RECIPROCAL, ROUNDING_BIAS) - ROUNDING_BIAS)
    r = fma32(m, LOG2_HIGH, x)
    r = fma32(m, LOG2_LOW, r)
    p = poly[0]
    for j in range(1, poly.shape[0]):
        p = fma32(p, r, poly[j])
    return F32(math.ldexp(np.float64(p), int(m)))       # vscalefps: exact product, one rounding to float32


@njit(cache=True)
def _softmax_rows(x, poly, out):
    rows, d = x.shape
    acc = np.empty(LANES, np.float32)
    half = np.empty(LANES // 2, np.float32)
    for r in range(rows):
        mx = x[r, 0]
        for i in range(1, d):
            if x[r, i] > mx:
                mx = x[r, i]
        neg = F32(-mx)
        acc[:] = F32(0.0)
        for i in range(d):
            e = _exp_mlas(F32(x[r, i] + neg), poly)
            out[r, i] = e
            acc[i % LANES] = F32(acc[i % LANES] + e)
        for j in range(LANES // 2):
            half[j] = F32(acc[j + LANES // 2] + acc[j])
        lo = F32(F32(half[0] + half[1]) + F32(half[2] + half[3]))
        hi = F32(F32(half[4] + half[5]) + F32(half[6] + half[7]))
        scale = F32(F32(1.0) / F32(lo + hi))
        for i in range(d):
            out[r, i] = F32(out[r, i] * scale)


def _rows(x: np.ndarray, axis: int, opset: int) -> tuple[np.ndarray, callable]:
    """x as contiguous (rows, D) float32 and the function that puts rows back in x's layout."""
    x = np.asarray(x, F32)
    axis %= x.ndim
    if opset < 13:                                   # coerced to 2-D at the axis
        return np.ascontiguousarray(x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)), \
            lambda y: y.reshape(x.shape)
    moved = np.moveaxis(x, axis, -1)
    return np.ascontiguousarray(moved.reshape(-1, x.shape[axis])), \
        lambda y: np.moveaxis(y.reshape(moved.shape), -1, axis)


def softmax(x: np.ndarray, axis: int = -1, opset: int = 13) -> np.ndarray:
    """Softmax of float32 ``x`` along ``axis`` as ORT 1.32's CPU kernel computes it (AVX-512F)."""
    rows, back = _rows(x, axis, opset)
    out = np.empty_like(rows)
    if rows.size:
        _softmax_rows(rows, POLY, out)
    return back(out)


def softmax_reference(x: np.ndarray, axis: int = -1, opset: int = 13) -> np.ndarray:
    """The arithmetic of ``softmax`` with numpy over whole rows (fma: ``ortfloat.fma``, one rounding)."""
    rows, back = _rows(x, axis, opset)
    n, d = rows.shape
    v = np.maximum(LOWER_RANGE, (rows + (-rows.max(axis=1, keepdims=True))).astype(F32))
    m = (fma(v, LOG2_RECIPROCAL, ROUNDING_BIAS) - ROUNDING_BIAS).reshape(v.shape).astype(F32)
    r = fma(m, LOG2_LOW, fma(m, LOG2_HIGH, v).reshape(v.shape)).reshape(v.shape)
    p = np.full(v.shape, POLY[0], F32)
    for c in POLY[1:]:
        p = fma(p, r, c).reshape(v.shape)
    e = np.ldexp(p.astype(np.float64), m.astype(np.int64)).astype(F32)
    pad = np.zeros((n, -(-d // LANES) * LANES), F32)
    pad[:, :d] = e
    acc = np.zeros((n, LANES), F32)
    for k in range(0, pad.shape[1], LANES):          # a masked tail adds nothing in its unused lanes
        lanes = min(LANES, d - k)
        acc[:, :lanes] = (acc[:, :lanes] + pad[:, k:k + lanes]).astype(F32)
    h = (acc[:, 8:] + acc[:, :8]).astype(F32)
    s = (((h[:, 0] + h[:, 1]).astype(F32) + (h[:, 2] + h[:, 3]).astype(F32)).astype(F32)
         + ((h[:, 4] + h[:, 5]).astype(F32) + (h[:, 6] + h[:, 7]).astype(F32)).astype(F32)).astype(F32)
    scale = (F32(1.0) / s).astype(F32)
    return back((e * scale[:, None]).astype(F32))
