"""Softmax over int8/uint8 inputs by table lookup, as ONNX Runtime's QLinearSoftmax (com.microsoft).

ORT fuses ``DQ -> Softmax -> Q`` into QLinearSoftmax, whose arithmetic does not use the zero points
of x (softmax is shift-invariant) nor the exact output scale. Per row of D elements, with
d = max(x) - x in [0, 255] (an integer: the codes share one scale):

    shift   = max(0, logf(FLT_MAX / D) - 5) / s_x              (keeps the float sum finite; the
                                                                log in float32, the C library's logf)
    E[d]    = float32(exp((shift - d) * s_x))                   256-entry table, built once
    Y       = floor(1 / s_y)                                    float32
    sum     = E[d_0] + E[d_1] + ...                             float32, in row order
    y       = sat(rne(E[d] * Y / sum) + z_y)                   the product and quotient in float64
                                                                (E[d] * Y is exact there), saturated

Random codes rarely tell such variants apart (a 1-ulp change moves a quotient by ~1e-7 of itself),
so each choice was settled on rows where the candidates disagree, found by simulating both over
random rows and only then asking ORT 1.32: the quotient in float64 (26 of 26 such rows; float32
E[d] * float32(Y / sum) 18, float32 (E[d] * Y) * (1 / sum) 4; float32 (E[d] * Y) / sum overflows
for D <= 3 where ORT does not: 0 of 252), and the shift through float32 ``logf`` (25 of 25 such rows;
the double ``log`` of the public source 0: PP-OCRv4 rec's 1-LSB softmax, 32.49999 vs ORT's 33).
(A row whose sum underflows to 0 is left at 0.) ``fixed`` mode is the integer version for integer-only hardware: E as 24-bit integers, an integer sum, and
y = sat(floor((2 * E[d] * Y + sum) / (2 * sum)) + z_y) (round half up, saturating). The axis follows
ONNX: opset >= 13 one axis; before 13 every axis from ``axis`` on is one row.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from qgraph.ops import INT_RANGES

FLT_MAX = float(np.finfo(np.float32).max)


def _c_logf():
    """The C library's ``logf`` (ORT's ``log`` of a float argument resolves to it: the wheel imports
    ``logf@GLIBC_2.27``), or None where no C math library can be loaded."""
    import ctypes
    import ctypes.util
    for name in (ctypes.util.find_library("m"), "libm.so.6"):
        if not name:
            continue
        try:
            f = ctypes.CDLL(name).logf
        except (OSError, AttributeError):
            continue
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        return f
    return None


_LOGF = _c_logf()


def logf(v) -> float:
    """float32 natural log as the C library computes it (glibc's is not correctly rounded everywhere:
    3 of the 200,000 values FLT_MAX / D, D = 1..200,000, differ from float32(log(double)) by 1 ulp);
    without a C library, the correctly rounded float32 log."""
    v = np.float32(v)
    return float(np.float32(_LOGF(float(v)))) if _LOGF is not None else float(np.float32(math.log(float(v))))


def exp_table(s_x: float, d: int) -> np.ndarray:
    """E[k] = float32(exp((shift - k) * s_x)), k = 0..255 (k = row max - code), as ORT builds it:
    shift = max(0, logf(float32(FLT_MAX / D)) - 5) / s_x in double, the log in float32 (``logf``)."""
    s_x = float(np.float32(s_x))
    shift = logf(np.float32(np.float32(FLT_MAX) / np.float32(d)))
    shift = max(0.0, shift - 5.0) / s_x
    return np.array([math.exp((shift - k) * s_x) for k in range(256)], np.float64).astype(np.float32)


def exp_table_fixed(s_x: float) -> np.ndarray:
    """Integer E[k] = round(2^24 * exp(-k * s_x)) for ``fixed`` mode."""
    return np.array([round(math.ldexp(math.exp(-k * float(s_x)), 24)) for k in range(256)], np.int64)


@njit(cache=True)
def _row_max(row):
    m = row[0]
    for j in range(row.shape[0]):
        m = max(m, row[j])
    return m


# The float and fixed rows below are deliberately two kernels: float32 sums and RNE (ORT) against
# int64 sums and round-half-up division (integer hardware); one body with a mode flag would carry
# both accumulators through every row.
@njit(cache=True)
def _softmax_rows_float(x, table, y_scale, zy, qmin, qmax, out):
    n, d = x.shape
    for r in range(n):
        xmax = _row_max(x[r])
        total = np.float32(0.0)
        for j in range(d):
            total = np.float32(total + table[np.int32(xmax) - np.int32(x[r, j])])
        if total == 0:
            continue                                       # ORT leaves such a row unwritten
        for j in range(d):
            e = table[np.int32(xmax) - np.int32(x[r, j])]
            q = np.rint(np.float64(e) * np.float64(y_scale) / np.float64(total)) + zy
            out[r, j] = qmin if q < qmin else (qmax if q > qmax else np.int64(q))


@njit(cache=True)
def _softmax_rows_fixed(x, table, y_scale, zy, qmin, qmax, out):
    n, d = x.shape
    for r in range(n):
        xmax = _row_max(x[r])
        total = np.int64(0)
        for j in range(d):
            total += table[np.int32(xmax) - np.int32(x[r, j])]
        for j in range(d):
            e = table[np.int32(xmax) - np.int32(x[r, j])]
            q = (2 * e * y_scale + total) // (2 * total) + zy
            out[r, j] = qmin if q < qmin else (qmax if q > qmax else q)


def _rows(x: np.ndarray, axis: int, opset: int):
    """(2-D rows view, how to put the result back) for ONNX Softmax's axis semantics."""
    axis = axis % x.ndim
    if opset < 13:
        return x.reshape(int(np.prod(x.shape[:axis])), -1), lambda y: y.reshape(x.shape)
    moved = np.moveaxis(x, axis, -1)
    return (np.ascontiguousarray(moved).reshape(-1, x.shape[axis]),
            lambda y: np.ascontiguousarray(np.moveaxis(y.reshape(moved.shape), -1, axis)))


def qlinear_softmax(step, args, mode):
    """com.microsoft QLinearSoftmax: X, X_scale, X_zero_point, Y_scale, Y_zero_point; attrs axis, opset."""
    x, sx = args[0], args[1]
    sy = args[3]
    zy = args[4] if len(args) > 4 and args[4] is not None else np.zeros((), x.dtype)
    opset = int(step.attrs.get("opset", 13))
    axis = int(step.attrs.get("axis", -1 if opset >= 13 else 1))
    rows, back = _rows(np.asarray(x), axis, opset)
    s_x = float(np.asarray(sx, np.float32).reshape(-1)[0])
    s_y = np.float32(np.asarray(sy, np.float32).reshape(-1)[0])
    z = int(np.asarray(zy).reshape(-1)[0])
    y_scale = np.float32(np.floor(np.float32(1.0) / s_y))
    out = np.zeros(rows.shape, x.dtype)
    qmin, qmax = INT_RANGES[x.dtype.name]
    if mode == "fixed":
        _softmax_rows_fixed(np.ascontiguousarray(rows), exp_table_fixed(s_x), np.int64(y_scale), z, qmin, qmax, out)
    else:
        table = step.cache.get(("table", s_x, rows.shape[1]))
        if table is None:
            table = step.cache[("table", s_x, rows.shape[1])] = exp_table(s_x, rows.shape[1])
        _softmax_rows_float(np.ascontiguousarray(rows), table, y_scale, z, qmin, qmax, out)
    return [back(out)]


def softmax_reference(x: np.ndarray, s_x: float, s_y: float, z_y: int, axis: int = -1) -> np.ndarray:
    """Plain Python version of the ``float`` arithmetic (opset >= 13 axis), for tests."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    table = exp_table(s_x, x.shape[-1])
    y_scale = np.float32(np.floor(np.float32(1.0) / np.float32(s_y)))
    qmin, qmax = INT_RANGES[x.dtype.name]
    out = np.zeros(x.shape, np.int64)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx].astype(np.int64)
        e = [table[int(row.max() - v)] for v in row]
        total = np.float32(0.0)
        for v in e:
            total = np.float32(total + v)
        for j, v in enumerate(e):
            q = int(np.rint(float(v) * float(y_scale) / float(total))) + z_y
            out[idx + (j,)] = min(max(q, qmin), qmax)
    return np.moveaxis(out.astype(x.dtype), -1, axis)


KERNELS = {"QLinearSoftmax": qlinear_softmax}
