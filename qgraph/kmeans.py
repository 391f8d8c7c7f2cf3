"""Exact one-dimensional k-means (Lloyd's algorithm) on sorted values, in Numba.

On a line, the points a Lloyd step gives to centroid c_j (c sorted) are those between the midpoints
m_{j-1} = (c_{j-1} + c_j) / 2 and m_j: contiguous in sorted order. With the values sorted once and
their prefix sums S, one iteration costs O(k log n) instead of O(n k):

    t_j = #{x <= m_j}   (binary search)          c_j <- (S[t_j] - S[t_{j-1}]) / (t_j - t_{j-1})

It stops at the fixed point (no boundary t_j moves): the same centroids as Lloyd's algorithm on the
points themselves from the same start, a point on a midpoint going to the lower centroid (as argmin
does). A cluster left empty takes the upper half of the cluster with the largest squared error
(``split_for_empty``; from the linear start, heavy-tailed weights leave most centroids with almost
no points otherwise). Labels of the unsorted values: a bucket lookup, then at most a few comparisons
(``assign``).

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
    inertia (sum of squared distances), Lloyd iterations run, whether the fixed point was reached,
    and how many clusters were split to refill empty ones."""
    centroids: np.ndarray
    labels: np.ndarray | None
    inertia: float
    iterations: int
    converged: bool
    splits: int = 0


@njit(cache=True, nogil=True)
def prefix_sums(xs):
    """S[i] = xs[0] + ... + xs[i-1] and S2[i] = xs[0]² + ... + xs[i-1]², in float64 (S[0] = S2[0] = 0)."""
    n = xs.shape[0]
    s = np.empty(n + 1, np.float64)
    s2 = np.empty(n + 1, np.float64)
    acc, acc2 = 0.0, 0.0
    s[0] = 0.0
    s2[0] = 0.0
    for i in range(n):
        v = np.float64(xs[i])
        acc += v
        acc2 += v * v
        s[i + 1] = acc
        s2[i + 1] = acc2
    return s, s2


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
def lloyd_sorted(xs, s, s2, c, max_iter, repair=True):
    """Lloyd iterations on sorted xs with prefix sums s, s2 from centroids c (sorted, updated in
    place); ``repair``: split a cluster for every empty one. Returns (iterations, converged,
    boundaries t[k+1], clusters split)."""
    k = c.shape[0]
    n = xs.shape[0]
    t = np.zeros(k + 1, np.int64)
    prev = np.full(k + 1, -1, np.int64)
    t[k] = n
    it = 0
    splits = 0
    converged = False
    while it < max_iter:
        for j in range(k - 2, -1, -1):
            if c[j + 1] == c[j]:          # a duplicate centroid gets nothing (argmin: ties to the lower)
                t[j + 1] = t[j + 2]
            else:
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
        empty = 0
        for j in range(k):
            cnt = t[j + 1] - t[j]
            if cnt > 0:
                c[j] = (s[t[j + 1]] - s[t[j]]) / cnt
            else:
                empty += 1
        if empty and repair:
            splits += split_for_empty(xs, s, s2, t, c)
        c.sort()
    return it, converged, t, splits


@njit(cache=True, nogil=True)
def _sse(s, s2, a, b):
    """Sum of squared deviations from their mean of the sorted values [a, b)."""
    n = b - a
    if n < 2:
        return 0.0
    d = s[b] - s[a]
    return max(s2[b] - s2[a] - d * d / n, 0.0)


@njit(cache=True, nogil=True)
def split_for_empty(xs, s, s2, t, c):
    """Give every empty cluster half of the cluster with the largest squared error: that interval is
    cut at its mean, its centroid moves to the lower half's mean, the empty one to the upper half's.
    (On a line this is the natural repair: the split lowers the inertia by the most a single new
    centroid placed in an existing cluster can, to first order; unrepaired, the linear start leaves
    most centroids of heavy-tailed weights with almost no points.) Returns the number of splits."""
    k = c.shape[0]
    done = 0
    a = t[:k].copy()
    b = t[1:].copy()
    sse = np.empty(k, np.float64)
    for j in range(k):
        sse[j] = _sse(s, s2, a[j], b[j])
    for e in range(k):
        if t[e + 1] > t[e]:
            continue
        j = np.argmax(sse)
        if sse[j] <= 0.0:
            return done
        mean = (s[b[j]] - s[a[j]]) / (b[j] - a[j])
        p = a[j] + _count_le(xs[a[j]:b[j]], mean)
        if p <= a[j] or p >= b[j]:
            sse[j] = 0.0
            continue
        c[j] = (s[p] - s[a[j]]) / (p - a[j])
        c[e] = (s[b[j]] - s[p]) / (b[j] - p)
        a[e], b[e] = p, b[j]
        b[j] = p
        sse[j] = _sse(s, s2, a[j], b[j])
        sse[e] = _sse(s, s2, a[e], b[e])
        done += 1
    return done


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
    canon = np.empty(k, np.int32)            # lowest index of an equal centroid (argmin's tie rule)
    for j in range(k):
        canon[j] = canon[j - 1] if j > 0 and c[j] == c[j - 1] else j
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
        lab = canon[lab]
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
              centroids: np.ndarray | None = None, repair: bool = True) -> KMeans:
    """k-means of the values of ``x`` (any shape, flattened). With at most k distinct values, each is
    its own centroid (exact). ``centroids`` overrides ``init`` as the start; ``repair=False`` leaves
    empty clusters where they are (plain Lloyd)."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.size == 0:
        raise ValueError("k-means of an empty array")
    xs = sort_values(x)
    if not (np.isfinite(xs[0]) and np.isfinite(xs[-1])):     # NaNs sort beyond the infinities
        raise ValueError("k-means of values that are not all finite")
    if _distinct_at_most(xs, k):
        c = np.unique(xs).astype(np.float64)
        it, converged, splits = 0, True, 0
    else:
        c = np.array(centroids, np.float64) if centroids is not None else init_centroids(xs, k, init, rng)
        c.sort()
        s, s2 = prefix_sums(xs)
        it, converged, _, splits = lloyd_sorted(xs, s, s2, c, int(max_iter), repair)
    out = np.empty(x.size, np.int32) if labels else None
    if labels:
        inertia = assign(x, c, out)
    else:
        inertia = float("nan")
    return KMeans(centroids=c, labels=out, inertia=float(inertia), iterations=int(it), converged=bool(converged),
                  splits=int(splits))


def lloyd_reference(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """Plain numpy Lloyd on the points: assign by argmin, move each centroid to its points' mean, until
    no label changes (no repair of empty clusters: compare where none occurs). Returns (centroids,
    iterations)."""
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


# ----------------------------------------------------------------------------- centroid refit (passes/share.py)

@njit(cache=True, nogil=True)
def normal_equations(labels, w, cov, k):
    """M = Σ_n P_nᵀ C P_n and r = Σ_n P_nᵀ C w_n over rows n of every group (labels -1: fixed zeros)."""
    m = np.zeros((k, k), np.float64)
    r = np.zeros(k, np.float64)
    groups, rows, kk = labels.shape
    for g in range(groups):
        c = cov[g]
        for n in range(rows):
            lab = labels[g, n]
            wn = w[g, n]
            for i in range(kk):
                j = lab[i]
                if j < 0:
                    continue
                acc = 0.0
                for i2 in range(kk):
                    cv = c[i, i2]
                    l2 = lab[i2]
                    if l2 >= 0:
                        m[j, l2] += cv
                    acc += cv * wn[i2]
                r[j] += acc
    return m, r


@njit(cache=True, nogil=True)
def normal_equations_diagonal(labels, w, cov, k):
    """``normal_equations`` with C's diagonal only (layers too large for the full one)."""
    m = np.zeros((k, k), np.float64)
    r = np.zeros(k, np.float64)
    groups, rows, kk = labels.shape
    for g in range(groups):
        for n in range(rows):
            for i in range(kk):
                j = labels[g, n, i]
                if j >= 0:
                    d = cov[g, i, i]
                    m[j, j] += d
                    r[j] += d * w[g, n, i]
    return m, r
