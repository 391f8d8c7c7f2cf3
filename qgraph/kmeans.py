"""Exact one-dimensional k-means (Lloyd's algorithm) on sorted values, in Numba.

On a line, the points a Lloyd step gives to centroid c_j (c sorted) are those between the midpoints
m_{j-1} = (c_{j-1} + c_j) / 2 and m_j: contiguous in sorted order. With the values sorted once and
their prefix sums S, one iteration costs O(k log n) instead of O(n k):

    t_j = #{x <= m_j}   (binary search)          c_j <- (S[t_j] - S[t_{j-1}]) / (t_j - t_{j-1})

It stops at the fixed point (no boundary t_j moves): the same centroids as Lloyd's algorithm on the
points themselves from the same start, a point on a midpoint going to the lower centroid (as argmin
does). An empty cluster keeps its centroid. Labels of the unsorted values are one binary search each
over the k - 1 midpoints.

Initializations (Han et al. 2016, "Deep Compression", §3.2):
    linear    c_j evenly spaced over [min, max] (the paper's choice: keeps the rare large weights)
    density   c_j at the (j + 1/2)/k quantiles
    random    k distinct values drawn at random (Forgy)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

INITS = ("linear", "density", "random")


@dataclass
class KMeans:
    """centroids (float64, increasing), labels (int32 per input value, None if not asked),
    inertia (sum of squared distances), Lloyd iterations run and whether the fixed point was reached."""
    centroids: np.ndarray
    labels: np.ndarray | None
    inertia: float
    iterations: int
    converged: bool


@njit(cache=True, nogil=True)
def prefix_sums(xs):
    """S[i] = xs[0] + ... + xs[i-1] in float64 (S[0] = 0)."""
    s = np.empty(xs.shape[0] + 1, np.float64)
    acc = 0.0
    s[0] = 0.0
    for i in range(xs.shape[0]):
        acc += xs[i]
        s[i + 1] = acc
    return s


@njit(cache=True, nogil=True)
def _count_le(xs, v):
    """#{x in xs : x <= v} for sorted xs."""
    lo, hi = 0, xs.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if xs[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def lloyd_sorted(xs, s, c, max_iter):
    """Lloyd iterations on sorted xs with prefix sums s from centroids c (sorted, updated in place).
    Returns (iterations, converged, boundaries t[k+1])."""
    k = c.shape[0]
    n = xs.shape[0]
    t = np.zeros(k + 1, np.int64)
    prev = np.full(k + 1, -1, np.int64)
    t[k] = n
    it = 0
    converged = False
    while it < max_iter:
        for j in range(k - 1):
            t[j + 1] = _count_le(xs, 0.5 * (c[j] + c[j + 1]))
        same = True
        for j in range(k + 1):
            if t[j] != prev[j]:
                same = False
            prev[j] = t[j]
        if same:
            converged = True
            break
        it += 1
        for j in range(k):
            cnt = t[j + 1] - t[j]
            if cnt > 0:
                c[j] = (s[t[j + 1]] - s[t[j]]) / cnt
        c.sort()
    return it, converged, t


#: buckets of the label lookup: a value's bucket tells its label unless a midpoint shares the bucket
LABEL_BUCKETS = 1 << 16


@njit(cache=True, nogil=True)
def assign(x, c, labels):
    """labels[i] = index of the nearest centroid (ties to the lower) = #{midpoints < x[i]}; returns
    the inertia.

    [min, max] is cut into LABEL_BUCKETS equal buckets; a value's bucket index floor((v - lo) · B/(hi - lo))
    is monotone in v, so every midpoint in a lower bucket is below v and every one in a higher bucket
    above: only the midpoints inside v's own bucket (rarely any) are compared."""
    k = c.shape[0]
    n = x.shape[0]
    if n == 0:
        return 0.0
    lo = np.float64(x[0])
    hi = lo
    for i in range(n):
        v = np.float64(x[i])
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    nb = LABEL_BUCKETS
    inv = nb / (hi - lo) if hi > lo else 0.0
    mids = np.empty(max(k - 1, 1), np.float64)
    mid_bucket = np.empty(max(k - 1, 1), np.int64)
    for j in range(k - 1):
        m = 0.5 * (c[j] + c[j + 1])
        mids[j] = m
        b = np.int64((m - lo) * inv) if m > lo else np.int64(0)
        mid_bucket[j] = min(b, nb - 1)
    first = np.zeros(nb, np.int32)           # #{midpoints in buckets below b}
    j = 0
    for b in range(nb):
        while j < k - 1 and mid_bucket[j] < b:
            j += 1
        first[b] = j
    inertia = 0.0
    for i in range(n):
        v = np.float64(x[i])
        b = np.int64((v - lo) * inv)
        if b > nb - 1:
            b = nb - 1
        lab = first[b]
        while lab < k - 1 and mid_bucket[lab] == b and mids[lab] < v:
            lab += 1
        labels[i] = lab
        d = v - c[lab]
        inertia += d * d
    return inertia


@njit(cache=True, nogil=True)
def radix_sort_f32(x):
    """float32 values sorted ascending (LSD radix sort, 11/11/10-bit digits, on order-preserving keys:
    the sign bit flipped for positives, all bits for negatives)."""
    n = x.shape[0]
    u = x.view(np.uint32)
    a = np.empty(n, np.uint32)
    b = np.empty(n, np.uint32)
    h0 = np.zeros(2048, np.int64)
    h1 = np.zeros(2048, np.int64)
    h2 = np.zeros(1024, np.int64)
    sign = np.uint32(0x80000000)
    for i in range(n):
        v = u[i]
        v = ~v if v & sign else v | sign
        a[i] = v
        h0[v & np.uint32(0x7FF)] += 1
        h1[(v >> np.uint32(11)) & np.uint32(0x7FF)] += 1
        h2[v >> np.uint32(22)] += 1
    s0, s1, s2 = 0, 0, 0
    for d in range(2048):
        cnt = h0[d]
        h0[d] = s0
        s0 += cnt
        cnt = h1[d]
        h1[d] = s1
        s1 += cnt
    for d in range(1024):
        cnt = h2[d]
        h2[d] = s2
        s2 += cnt
    for i in range(n):
        v = a[i]
        d = v & np.uint32(0x7FF)
        b[h0[d]] = v
        h0[d] += 1
    for i in range(n):
        v = b[i]
        d = (v >> np.uint32(11)) & np.uint32(0x7FF)
        a[h1[d]] = v
        h1[d] += 1
    for i in range(n):
        v = a[i]
        d = v >> np.uint32(22)
        b[h2[d]] = v
        h2[d] += 1
    for i in range(n):
        v = b[i]
        b[i] = v & np.uint32(0x7FFFFFFF) if v & sign else ~v
    return b.view(np.float32)


def sort_values(x: np.ndarray) -> np.ndarray:
    """x sorted ascending: the Numba radix sort for float32 (several times numpy's sort on 25 M
    values), numpy's otherwise."""
    if x.dtype == np.float32:
        return radix_sort_f32(np.ascontiguousarray(x))
    return np.sort(x)


def assign_reference(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Plain numpy: argmin over |x - c_j| (first minimum on ties)."""
    return np.argmin(np.abs(np.asarray(x, np.float64)[:, None] - np.asarray(c, np.float64)[None, :]), axis=1)


@njit(cache=True, nogil=True)
def _distinct_at_most(xs, k):
    """Whether sorted xs holds at most k distinct values (stops at the (k+1)-th)."""
    d = 1
    for i in range(1, xs.shape[0]):
        if xs[i] != xs[i - 1]:
            d += 1
            if d > k:
                return False
    return True


def init_centroids(xs: np.ndarray, k: int, init: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """k starting centroids (float64, increasing) for sorted values ``xs``."""
    n = xs.shape[0]
    lo, hi = float(xs[0]), float(xs[-1])
    if init == "linear":
        c = np.linspace(lo, hi, k) if k > 1 else np.array([float(np.mean(xs, dtype=np.float64))])
    elif init == "density":
        c = xs[np.minimum(((np.arange(k) + 0.5) / k * n).astype(np.int64), n - 1)].astype(np.float64)
    elif init == "random":
        rng = rng or np.random.default_rng(0)
        c = xs[np.sort(rng.choice(n, size=min(k, n), replace=False))].astype(np.float64)
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return np.sort(c)


def kmeans_1d(x: np.ndarray, k: int, *, init: str = "linear", max_iter: int = 300,
              rng: np.random.Generator | None = None, labels: bool = True,
              centroids: np.ndarray | None = None) -> KMeans:
    """k-means of the values of ``x`` (any shape, flattened). With at most k distinct values, each is
    its own centroid (exact). ``centroids`` overrides ``init`` as the start."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.size == 0:
        raise ValueError("k-means of an empty array")
    xs = sort_values(x)
    if not (np.isfinite(xs[0]) and np.isfinite(xs[-1])):     # NaNs sort beyond the infinities
        raise ValueError("k-means of values that are not all finite")
    if _distinct_at_most(xs, k):
        c = np.unique(xs).astype(np.float64)
        it, converged = 0, True
    else:
        c = np.array(centroids, np.float64) if centroids is not None else init_centroids(xs, k, init, rng)
        c.sort()
        it, converged, _ = lloyd_sorted(xs, prefix_sums(xs), c, int(max_iter))
    out = np.empty(x.size, np.int32) if labels else None
    if labels:
        inertia = assign(x, c, out)
    else:
        inertia = float("nan")
    return KMeans(centroids=c, labels=out, inertia=float(inertia), iterations=int(it), converged=bool(converged))


def lloyd_reference(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """Plain numpy Lloyd on the points: assign by argmin, move to the mean, until no label changes.
    Returns (centroids, iterations)."""
    x = np.asarray(x, np.float64).reshape(-1)
    c = np.sort(np.asarray(c, np.float64))
    prev = None
    it = 0
    while it < max_iter:
        lab = assign_reference(x, c)
        if prev is not None and np.array_equal(lab, prev):
            break
        prev = lab
        it += 1
        for j in range(c.size):
            m = lab == j
            if m.any():
                c[j] = x[m].sum() / m.sum()
        c = np.sort(c)
    return c, it
