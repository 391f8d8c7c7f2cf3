"""ONNX Runtime's CPU float32 reductions (ReduceSum, ReduceMean, ReduceSumSquare, ReduceL2) in its
summation order, so a ``Float`` step after the last DequantizeLinear (MiniLM's mean pooling and L2
normalization) gives ORT's float bits.

ORT (``core/providers/cpu/reduction/reduction_ops.{h,cc}``) first merges adjacent axes that are
both reduced or both kept (``OptimizeShapeForFastReduce``), giving a "fast shape" of kept (K) and
reduced (R) runs, then:

  Sum / Mean (Mean = the sum, then each output / float32(count)):
    KR   reduce the trailing run: per row, Eigen's vectorized ``sum()`` of the contiguous row
         (``eigen_sum``, below)
    RK   reduce the leading run: out = row 0, then out += row i for i = 1, 2, ... (element-wise)
    KRK  reduce a middle run: per outer index, ``MatMul(1, N, K, ones, X)`` = MlasGemm with M = 1,
         i.e. MLAS's M = 1 SGEMM kernel (``ortfloat.sgemm_m1_mlas``: products 1 * x, summed in
         fours, ((p0 + p1) + p2) + p3, each group added to the running sum)
  all axes (any op): Eigen over the whole tensor: ``sum()``, ``mean()`` = sum / size,
    ``squaredNorm()`` (the squares summed as ``eigen_sum`` does), ``norm()`` = sqrt(squaredNorm)
  anything else, and SumSquare / L2 always (they have no fast path): the generic loop
    (``NoTransposeReduce1Loop``): per output, acc = 0, then acc += v (v * v for SumSquare / L2,
    one rounding for the product and one for the add: ORT's x86-64 build has no FMA contraction)
    over the reduced elements in row-major order; L2 then sqrt(acc), Mean acc / count.

``eigen_sum``: Eigen's ``redux`` with ``LinearVectorizedTraversal``. The packet width is fixed
when ORT is compiled, not chosen at run time (MLAS dispatches by cpuid, Eigen does not): ORT 1.32's
x86-64 wheels are built for baseline x86-64, so Eigen uses SSE ``Packet4f`` even on this AVX-512
machine (measured: 365 of 365 row sums bit-exact with 4 lanes; 4-8 times fewer with 8 or 16). With
``s`` = the elements before the first 16-byte aligned one (ORT's buffers are 64-byte aligned, so a
row at element offset o has s = (-o) mod 4):

    p0 = x[s:s+4]; p1 = x[s+4:s+8]                 (when at least two packets fit)
    p0 += x[i:i+4]; p1 += x[i+4:i+8]               for i = s+8, s+16, ... over whole pairs of packets
    p0 += p1; p0 += one last whole packet if any
    res = (p0[0] + p0[2]) + (p0[1] + p0[3])        (predux: movehl, then add_ss)
    res += x[i] for the s head elements, then for the tail after the last whole packet
    (fewer than 4 elements after the head: res = x[0], then res += x[i] in order)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.kernels.ortfloat import sgemm_m1_mlas

F32 = np.float32

OPS = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2")


@njit(cache=True)
def _coef(x, i, square):
    v = x[i]
    return np.float32(v * v) if square else v


@njit(cache=True)
def _eigen_redux(x, start, square):
    """Eigen's vectorized sum of ``x`` (float32, 1-D; squares when ``square``) with 4-lane packets
    from element ``start`` on (module docstring)."""
    n = x.shape[0]
    s = min(start, n)
    asz = ((n - s) // 4) * 4
    asz2 = ((n - s) // 8) * 8
    ae, ae2 = s + asz, s + asz2
    if asz == 0:
        res = _coef(x, 0, square)
        for i in range(1, n):
            res = np.float32(res + _coef(x, i, square))
        return res
    a0, a1, a2, a3 = _coef(x, s, square), _coef(x, s + 1, square), _coef(x, s + 2, square), _coef(x, s + 3, square)
    if asz > 4:
        b0, b1 = _coef(x, s + 4, square), _coef(x, s + 5, square)
        b2, b3 = _coef(x, s + 6, square), _coef(x, s + 7, square)
        i = s + 8
        while i < ae2:
            a0 = np.float32(a0 + _coef(x, i, square))
            a1 = np.float32(a1 + _coef(x, i + 1, square))
            a2 = np.float32(a2 + _coef(x, i + 2, square))
            a3 = np.float32(a3 + _coef(x, i + 3, square))
            b0 = np.float32(b0 + _coef(x, i + 4, square))
            b1 = np.float32(b1 + _coef(x, i + 5, square))
            b2 = np.float32(b2 + _coef(x, i + 6, square))
            b3 = np.float32(b3 + _coef(x, i + 7, square))
            i += 8
        a0, a1, a2, a3 = np.float32(a0 + b0), np.float32(a1 + b1), np.float32(a2 + b2), np.float32(a3 + b3)
        if ae > ae2:
            a0 = np.float32(a0 + _coef(x, ae2, square))
            a1 = np.float32(a1 + _coef(x, ae2 + 1, square))
            a2 = np.float32(a2 + _coef(x, ae2 + 2, square))
            a3 = np.float32(a3 + _coef(x, ae2 + 3, square))
    res = np.float32(np.float32(a0 + a2) + np.float32(a1 + a3))
    for i in range(s):
        res = np.float32(res + _coef(x, i, square))
    for i in range(ae, n):
        res = np.float32(res + _coef(x, i, square))
    return res


@njit(cache=True)
def _eigen_rows(x, square, out):
    """``_eigen_redux`` of each row of x [R, L] (C-contiguous, at a 16-byte aligned base)."""
    r_n, l_n = x.shape
    for r in range(r_n):
        out[r] = _eigen_redux(x[r], (4 - (r * l_n) % 4) % 4, square)


@njit(cache=True)
def _sequential(x, square, out):
    """out[j] = ((0 + v[0, j]) + v[1, j]) + ... down the rows of x [R, K] (v = x, or x * x)."""
    out[:] = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            out[j] = np.float32(out[j] + (np.float32(v * v) if square else v))


def eigen_sum(x: np.ndarray, start: int = 0, square: bool = False) -> np.float32:
    """Eigen's vectorized ``sum()`` (``squaredNorm()`` with ``square``) of a 1-D float32 array whose
    element ``start`` is the first on a 16-byte boundary."""
    return F32(_eigen_redux(np.ascontiguousarray(x, F32), int(start), bool(square)))


def fast_shape(shape: tuple, axes: tuple) -> tuple[list[int], list[bool]]:
    """ORT's ``OptimizeShapeForFastReduce``: adjacent axes both reduced or both kept merged."""
    dims, red = [int(shape[0])], [0 in axes]
    for i in range(1, len(shape)):
        r = i in axes
        if r == red[-1]:
            dims[-1] *= int(shape[i])
        else:
            dims.append(int(shape[i]))
            red.append(r)
    return dims, red


def reduce(op: str, x: np.ndarray, axes, keepdims: bool = True, noop_with_empty_axes: bool = False) -> np.ndarray:
    """ORT's float32 ``op`` (one of ``OPS``) of ``x`` over ``axes`` (None or empty: all, unless
    ``noop_with_empty_axes``), in its summation order (module docstring)."""
    x = np.ascontiguousarray(x, F32)
    if x.ndim == 0:                 # ORT: the whole (one-element) tensor through Eigen
        return reduce(op, x.reshape(1), (0,), True).reshape(())
    if not axes:
        if noop_with_empty_axes:
            return x.copy()
        axes = tuple(range(x.ndim))
    axes = tuple(sorted({int(a) % x.ndim for a in axes}))
    out_shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    count = int(np.prod([x.shape[a] for a in axes]))
    if x.size == 0:                 # nothing to add up, no order to follow
        y = np.zeros(int(np.prod(out_shape)), F32)
        return (y / F32(count) if op == "ReduceMean" else y).astype(F32).reshape(out_shape)
    dims, red = fast_shape(x.shape, axes)
    square = op in ("ReduceSumSquare", "ReduceL2")
    if len(dims) == 1:                                   # every axis: Eigen over the whole tensor
        y = np.array([_eigen_redux(x.reshape(-1), 0, square)], F32)
    elif not square and len(dims) == 2 and not red[0]:   # KR
        y = np.empty(dims[0], F32)
        _eigen_rows(x.reshape(dims), False, y)
    elif not square and len(dims) == 2:                  # RK: row 0, then + row i
        x2 = x.reshape(dims)
        y = x2[0].copy()
        for i in range(1, dims[0]):
            y = (y + x2[i]).astype(F32)
    elif not square and len(dims) == 3 and not red[0]:   # KRK: MLAS's M = 1 SGEMM with ones
        x3 = x.reshape(dims)
        y = np.empty((dims[0], dims[2]), F32)
        ones = np.ones((1, dims[1]), F32)
        for d in range(dims[0]):
            sgemm_m1_mlas(ones, x3[d], np.zeros(1, F32), dims[1], y[d:d + 1])
        y = y.reshape(-1)
    else:                                                # the generic loop, reduced axes row-major
        kept = [i for i in range(x.ndim) if i not in axes]
        xt = np.ascontiguousarray(np.transpose(x, list(axes) + kept)).reshape(count, -1)
        y = np.empty(xt.shape[1], F32)
        _sequential(xt, square, y)
    return _finish(op, y, count).reshape(out_shape)


def _finish(op: str, y: np.ndarray, count: int) -> np.ndarray:
    if op == "ReduceMean":
        return (y / F32(count)).astype(F32)
    if op == "ReduceL2":
        return np.sqrt(y).astype(F32)
    return y.astype(F32)


def reduce_reference(op: str, x: np.ndarray, axes, keepdims: bool = True) -> np.ndarray:
    """The same orders written out element by element in Python (slow; for tests)."""
    x = np.asarray(x, F32)
    axes = tuple(sorted({int(a) % x.ndim for a in (axes or range(x.ndim))}))
    dims, red = fast_shape(x.shape, axes)
    square = op in ("ReduceSumSquare", "ReduceL2")
    count = int(np.prod([x.shape[a] for a in axes]))

    def v(e):
        return F32(e * e) if square else F32(e)

    def seq(vals, first=None):
        acc = F32(0) if first is None else first
        for e in vals:
            acc = F32(acc + v(e))
        return acc

    def eigen(row, start):
        n, s = len(row), min(start, len(row))
        asz, asz2 = (n - s) // 4 * 4, (n - s) // 8 * 8
        if asz == 0:
            return seq(row[1:], v(row[0]))
        p0 = [v(e) for e in row[s:s + 4]]
        if asz > 4:
            p1 = [v(e) for e in row[s + 4:s + 8]]
            for i in range(s + 8, s + asz2, 8):
                p0 = [F32(a + v(e)) for a, e in zip(p0, row[i:i + 4])]
                p1 = [F32(a + v(e)) for a, e in zip(p1, row[i + 4:i + 8])]
            p0 = [F32(a + b) for a, b in zip(p0, p1)]
            if asz > asz2:
                p0 = [F32(a + v(e)) for a, e in zip(p0, row[s + asz2:s + asz])]
        res = F32(F32(p0[0] + p0[2]) + F32(p0[1] + p0[3]))
        return seq(list(row[s + asz:]), seq(row[:s], res))

    if len(dims) == 1:
        y = np.array([eigen(x.reshape(-1), 0)], F32)
    elif not square and len(dims) == 2 and not red[0]:
        x2 = x.reshape(dims)
        y = np.array([eigen(x2[r], (-r * dims[1]) % 4) for r in range(dims[0])], F32)
    elif not square and len(dims) == 2:
        x2 = x.reshape(dims)
        y = np.array([seq(x2[1:, j], x2[0, j]) for j in range(dims[1])], F32)
    elif not square and len(dims) == 3 and not red[0]:
        x3 = x.reshape(dims)
        y = np.empty((dims[0], dims[2]), F32)
        for d in range(dims[0]):
            for j in range(dims[2]):
                col, acc, k = x3[d, :, j], F32(0), 0
                while dims[1] - k >= 4:
                    acc = F32(F32(F32(F32(col[k] + col[k + 1]) + col[k + 2]) + col[k + 3]) + acc)
                    k += 4
                if dims[1] - k >= 2:
                    acc = F32(F32(col[k] + col[k + 1]) + acc)
                    k += 2
                if dims[1] - k == 1:
                    acc = F32(col[k] + acc)
                y[d, j] = F32(acc + F32(0))
        y = y.reshape(-1)
    else:
        kept = [i for i in range(x.ndim) if i not in axes]
        xt = np.transpose(x, list(axes) + kept).reshape(count, -1)
        y = np.array([seq(xt[:, j]) for j in range(xt.shape[1])], F32)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return _finish(op, y, count).reshape(shape)
