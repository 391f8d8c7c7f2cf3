"""Compiled forms of the weight decisions that scan every weight many times.

Two searches read each weight once per candidate scale: the MSE range of a weight
(``qparams.weight_qparams(method="mse")``: 60 candidates) and ``quant:target=any``'s pair-fit scale
(``passes/quant._pair_scale``: 21 multipliers, each with ``ops.fit_pair_rows``). In numpy each
candidate is a dozen full-size temporaries: on VGG-19's 25088 x 4096 FC (103M weights) the two took
over 200 s of a 315 s ``fold,quant:granularity=tensor``. Here each row is computed element by
element, once per candidate, with no temporary larger than a row.

Bit-identical to the numpy forms they replace (the tests hold them equal on seeded random weights):
the element arithmetic is the same (float32 for the MSE search, as ``rows / s`` on float32 arrays;
float64 for the pair search), and each row's squared error is summed in numpy's own order
(``pairwise_sum``: numpy's pairwise summation of a contiguous reduction, eight accumulators over
blocks of up to 128 elements, halves split at multiples of 8 above), so the same candidate wins,
ties included.
"""
from __future__ import annotations

import numpy as np

from qgraph.jit import njit
from qgraph.ops import PAIR_LIMIT

#: numpy's PW_BLOCKSIZE: the largest block summed with eight accumulators
_PW_BLOCK = 128


@njit(nogil=True)
def _leaf_sum(a, start, n):
    """numpy's sum of a run of at most 128 elements (eight accumulators from 8 on), n >= 1.
    (numpy starts a run under 8 from +0.0: only an all -0.0 run differs, in the sign of its zero.)"""
    if n < 8:
        res = a[start]
        for i in range(1, n):
            res += a[start + i]
        return res
    r0 = a[start]
    r1 = a[start + 1]
    r2 = a[start + 2]
    r3 = a[start + 3]
    r4 = a[start + 4]
    r5 = a[start + 5]
    r6 = a[start + 6]
    r7 = a[start + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        j = start + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@njit(nogil=True)
def _leaves(n):
    """The runs numpy's pairwise summation of n elements sums directly, left to right: above 128 a run
    splits into n2 = n // 2 - (n // 2) % 8 and the rest. (Iterative: numba's cache cannot hold a
    recursive function.)"""
    out = np.empty(max(2 * (n // 64) + 1, 1), np.int64)
    count = 0
    stack = np.empty(128, np.int64)
    stack[0] = n
    sp = 1
    while sp:
        sp -= 1
        m = stack[sp]
        if m <= _PW_BLOCK:
            out[count] = m
            count += 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        stack[sp] = m - n2       # right half after the left one
        stack[sp + 1] = n2
        sp += 2
    return out[:count]


@njit(nogil=True)
def _combine(n, sums):
    """The pairwise tree of n elements evaluated on its leaf sums (in ``_leaves`` order): every split
    is left + right in the leaves' dtype."""
    sizes = np.empty(128, np.int64)     # pending runs: size, and 0 / 1 / 2 = children not / left / both done
    phase = np.zeros(128, np.int64)
    vals = sums.copy()                  # value stack (at most one value per leaf)
    sizes[0] = n
    sp = 1
    vp = 0
    leaf = 0
    while sp:
        m = sizes[sp - 1]
        if m <= _PW_BLOCK:
            vals[vp] = sums[leaf]
            vp += 1
            leaf += 1
            sp -= 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        if phase[sp - 1] == 0:
            phase[sp - 1] = 1
            sizes[sp] = n2
            phase[sp] = 0
            sp += 1
        elif phase[sp - 1] == 1:
            phase[sp - 1] = 2
            sizes[sp] = m - n2
            phase[sp] = 0
            sp += 1
        else:
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            sp -= 1
    return vals[0]


@njit(nogil=True)
def pairwise_sum(a, start, n):
    """sum(a[start:start + n]) in numpy's pairwise order and a's dtype (``np.add.reduce`` of a
    contiguous run: what ``x.sum(axis=-1)`` does on each row of a C-contiguous array); n >= 1."""
    if n <= _PW_BLOCK:
        return _leaf_sum(a, start, n)
    sizes = _leaves(n)
    sums = np.empty(sizes.shape[0], a.dtype)
    pos = start
    for i in range(sizes.shape[0]):
        sums[i] = _leaf_sum(a, pos, sizes[i])
        pos += sizes[i]
    return _combine(n, sums)


# ----------------------------------------------------------------------------- MSE weight range

@njit(nogil=True)
def _mse_block(row, start, n, s, z, qmin, qmax, buf):
    """buf[i] = ((clip(rint(w / s) + z, qmin, qmax) - z) * s - w)^2 for w = row[start + i], all float32."""
    for i in range(n):
        w = row[start + i]
        q = np.rint(w / s) + z
        if q < qmin:
            q = qmin
        elif q > qmax:
            q = qmax
        d = (q - z) * s - w
        buf[i] = d * d


@njit(nogil=True)
def _mse_errors(rows, scale, zp, qmin, qmax):
    """[C, R] errors for C candidate (scale, zero point) rows [C, R]: each run of the pairwise tree is
    read once from memory for all candidates (it stays in L1), not once per candidate."""
    c, k = scale.shape[0], rows.shape[1]
    out = np.empty((c, rows.shape[0]), np.float32)
    buf = np.empty(_PW_BLOCK, np.float32)
    sizes = _leaves(k)
    sums = np.empty((c, sizes.shape[0]), np.float32)
    for r in range(rows.shape[0]):
        row = rows[r]
        pos = 0
        for i in range(sizes.shape[0]):
            for j in range(c):
                _mse_block(row, pos, sizes[i], scale[j, r], zp[j, r], qmin, qmax, buf)
                sums[j, i] = _leaf_sum(buf, 0, sizes[i])
            pos += sizes[i]
        for j in range(c):
            out[j, r] = _combine(k, sums[j]) if k > _PW_BLOCK else sums[j, 0]
    return out


def mse_errors(rows: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per row of float32 weights [R, K] and candidate: sum_k ((clip(rint(w / s) + z, qmin, qmax) - z) s
    - w)^2 in float32, exactly ``np.square((np.clip(np.rint(rows / s) + z, qmin, qmax) - z) * s -
    rows).sum(axis=1)`` with ``s``, ``z`` float32 columns (the reference, ``mse_errors_reference``).
    ``scale``, ``zp``: [R] (one candidate: returns [R]) or [C, R] (C candidates: returns [C, R])."""
    rows = np.ascontiguousarray(rows, np.float32)
    one = np.ndim(scale) < 2
    scale = np.ascontiguousarray(np.atleast_2d(np.asarray(scale, np.float32).reshape(-1) if one else scale), np.float32)
    zp = np.ascontiguousarray(np.atleast_2d(np.asarray(zp, np.float32).reshape(-1) if one else zp), np.float32)
    if not rows.shape[1]:
        out = np.zeros((scale.shape[0], rows.shape[0]), np.float32)
    else:
        out = _mse_errors(rows, scale, zp, np.float32(qmin), np.float32(qmax))
    return out[0] if one else out


def mse_errors_reference(rows, scale, zp, qmin, qmax) -> np.ndarray:
    s = np.asarray(scale, np.float32).reshape(-1, 1)
    z = np.asarray(zp, np.float32).reshape(-1, 1)
    q = np.clip(np.rint(rows / s) + z, qmin, qmax)
    return np.square((q - z) * s - rows).sum(axis=1)


# ----------------------------------------------------------------------------- pair-fit scale

@njit(nogil=True)
def _fit_pair(a, b, ta, tb, limit):
    """``ops.fit_pair_rows`` on one adjacent pair of codes (a, b) with unrounded values (ta, tb)."""
    if a * b >= 0 and abs(a) + abs(b) > PAIR_LIMIT:
        sign = 1.0 if a + b >= 0 else -1.0
        x = np.rint((abs(ta) - abs(tb) + PAIR_LIMIT) / 2)
        if x < PAIR_LIMIT - limit:
            x = float(PAIR_LIMIT - limit)
        elif x > limit:
            x = float(limit)
        return sign * x, sign * (PAIR_LIMIT - x), True
    return a, b, False


@njit(nogil=True)
def _clip(v, lo, hi):
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@njit(nogil=True)
def _pair_errors(rows, row_scale, steps, qmin, qmax, limit):
    n, k = rows.shape
    kk = k + k % 2
    err = np.empty((steps.shape[0], n))
    t = np.zeros(kk)
    tm = np.zeros(kk)
    q = np.zeros(kk)
    buf = np.empty(max(k, 1))
    sizes = _leaves(k)
    sums = np.empty(sizes.shape[0])
    for r in range(n):
        for j in range(k):
            t[j] = np.float64(rows[r, j]) / row_scale[r]
        for i in range(steps.shape[0]):
            m = steps[i]
            for j in range(kk):                  # the nearest codes (vectorized loop)
                tm[j] = t[j] / m
                q[j] = _clip(np.rint(tm[j]), qmin, qmax)
            for j in range(0, kk, 2):            # the offending pairs moved onto the limit
                if q[j] * q[j + 1] >= 0 and abs(q[j]) + abs(q[j + 1]) > PAIR_LIMIT:
                    q[j], q[j + 1], _ = _fit_pair(q[j], q[j + 1], tm[j], tm[j + 1], limit)
            for j in range(k):
                d = t[j] - m * q[j]
                buf[j] = d * d
            pos = 0
            for leaf in range(sizes.shape[0]):
                sums[leaf] = _leaf_sum(buf, pos, sizes[leaf])
                pos += sizes[leaf]
            err[i, r] = _combine(k, sums) if k > _PW_BLOCK else sums[0]
    return err


@njit(nogil=True)
def _pairs_over(rows, row_scale, qmin, qmax):
    n, k = rows.shape
    for r in range(n):
        for j in range(0, k - 1, 2):
            a = _clip(np.rint(np.float64(rows[r, j]) / row_scale[r]), qmin, qmax)
            b = _clip(np.rint(np.float64(rows[r, j + 1]) / row_scale[r]), qmin, qmax)
            if a * b >= 0 and abs(a) + abs(b) > PAIR_LIMIT:
                return True
    return False


def pairs_over(rows: np.ndarray, row_scale: np.ndarray, qmin: int, qmax: int) -> bool:
    """Whether the nearest codes clip(rint(w / s), qmin, qmax) of weight rows [N, K] (ORT's K order,
    ``row_scale`` [N] the scale of each row) have an adjacent same-sign pair past ``PAIR_LIMIT``
    (``ops.pair_excess(...) > 0`` anywhere)."""
    return bool(_pairs_over(np.ascontiguousarray(rows), np.ascontiguousarray(row_scale, np.float64),
                            float(qmin), float(qmax)))


def pair_fit_errors(rows: np.ndarray, row_scale: np.ndarray, steps: np.ndarray, qmin: int, qmax: int,
                    limit: int) -> np.ndarray:
    """[len(steps), N]: for each multiplier m and row of weights [N, K] (ORT's K order; float32 or
    float64), with t = w / row_scale (float64): sum_k (t - m q)^2, q = ``ops.fit_pair_rows``(
    clip(rint(t / m), qmin, qmax), t / m, limit) (the reference, ``pair_fit_errors_reference``)."""
    if not rows.shape[1]:
        return np.zeros((len(steps), rows.shape[0]))
    return _pair_errors(np.ascontiguousarray(rows), np.ascontiguousarray(row_scale, np.float64),
                        np.ascontiguousarray(steps, np.float64), float(qmin), float(qmax), float(limit))


def pair_fit_errors_reference(rows, row_scale, steps, qmin, qmax, limit) -> np.ndarray:
    from qgraph.ops import fit_pair_rows
    t = np.asarray(rows, np.float64) / np.asarray(row_scale, np.float64)[:, None]
    err = np.empty((len(steps), t.shape[0]))
    for i, m in enumerate(steps):
        q, _ = fit_pair_rows(np.clip(np.rint(t / m), qmin, qmax), t / m, limit)
        err[i] = np.sum((t - m * q) ** 2, axis=1)
    return err


# ----------------------------------------------------------------------------- the pair fit itself

@njit(nogil=True)
def _fit_rows(rows, target, limit):
    n, k = rows.shape
    moved = 0
    for r in range(n):
        for j in range(0, k, 2):
            a = float(rows[r, j])
            b = float(rows[r, j + 1]) if j + 1 < k else 0.0
            tb = target[r, j + 1] if j + 1 < k else 0.0
            a2, b2, bad = _fit_pair(a, b, target[r, j], tb, limit)
            if bad:
                moved += 1
                rows[r, j] = a2
                if j + 1 < k:
                    rows[r, j + 1] = b2
    return moved


def fit_pair_rows(rows: np.ndarray, target: np.ndarray, limit: int = 127) -> tuple[np.ndarray, int]:
    """``ops.fit_pair_rows`` (its numpy definition, the reference), compiled: a copy of the integer
    rows [N, K] in their own dtype with every offending pair moved, and the number moved."""
    out = np.array(rows, copy=True, order="C")
    moved = _fit_rows(out, np.ascontiguousarray(target, np.float64), float(limit))
    return out, int(moved)


def fit_pairs(q: np.ndarray, target: np.ndarray, op: str, trans_b: int = 0, qmin: int = -128,
              qmax: int = 127) -> tuple[np.ndarray, int]:
    """``ops.fit_pairs`` (the reference) with the compiled row fit: ``q`` int8 codes of a weight as
    ``op`` reads it, ``target`` = w / s + z of the same shape. Returns (codes, pairs moved); ``q`` is
    not written to."""
    from qgraph.ops import ort_k_rows
    out = np.array(q, copy=True, order="C")
    rows = ort_k_rows(out, op, trans_b)
    tgt = np.ascontiguousarray(ort_k_rows(np.asarray(target, np.float64), op, trans_b))
    in_place = np.shares_memory(rows, out)
    if not in_place:
        rows = np.ascontiguousarray(rows)
    moved = int(_fit_rows(rows, tgt, float(min(qmax, -qmin))))
    if not moved:
        return q, 0
    if not in_place:     # the K-order rows were a copy: each code back to where ort_k_rows took it from
        where = ort_k_rows(np.arange(out.size, dtype=np.intp).reshape(out.shape), op, trans_b)
        out.reshape(-1)[where.reshape(-1)] = rows.reshape(-1)
    return out, moved
