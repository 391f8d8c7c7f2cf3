"""Quantization decisions: from statistics to (scale, zero point).

Statistics are collected by ``qgraph.calibrate`` (streamed min/max and a histogram); this module only
decides. A new calibration method is a new function here, never a new loop over the data.

The affine map (as ONNX QuantizeLinear / DequantizeLinear and ONNX Runtime's ``compute_scale_zp``):

    q = clamp(round_half_even(r / s) + z, qmin, qmax),      r' = s (q - z)

    [rmin, rmax] is first widened to contain 0 (so that 0 is exact: padding, ReLU zeros), then
    asymmetric:  s = (rmax - rmin) / (qmax - qmin),  z = round(qmin - rmin / s)
    symmetric:   a = max|r|,  s = 2a / (qmax - qmin),  z = (qmin + qmax) / 2  (0 for signed types)

Symmetric signed ranges are narrow (int8: [-127, 127]), as ONNX Runtime uses for weights, so that
-a and +a are both exact. A range of zero width (an all-zero tensor) gets s = 1, z = 0.

Range decisions, each a function of the statistics (``rmin, rmax``):

    minmax       the observed range
    percentile   the p-th percentile of |x| (two-sided tensors) or of the tensor's one side
    mse          the range r = a·[min, max], a in (0, 1], minimizing the expected squared error on the
                 histogram: clipped bins cost (x - bound)^2, bins inside cost s^2/12, exact zeros cost 0
    entropy      TensorRT's calibration (Migacz 2017, "8-bit Inference with TensorRT"): the threshold i
                 minimizing KL(P || Q) where P is the histogram up to bin i with the tail folded into
                 bin i-1 and Q is hist[:i] quantized to the target number of levels and expanded back
                 over P's support; both smoothed (eps 1e-4) as in the MXNet/TVM reference

Weights are decided on the array itself (per tensor or per output channel): ``minmax`` or ``mse``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qgraph.jit import njit

from qgraph.ops import QParams, is_signed
from qgraph.weight_search import mse_errors

if TYPE_CHECKING:  # pragma: no cover
    from qgraph.calibrate import TensorStats

ACT_METHODS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_METHODS = ("minmax", "mse")


def qrange(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """Integer range for ``bits``: signed symmetric ranges are narrow ([-127, 127] for 8 bits)."""
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if symmetric else -hi - 1), hi
    return 0, 2 ** bits - 1


def scale_zero_point(rmin, rmax, qmin: int, qmax: int, symmetric: bool,
                     zp_dtype=np.int8) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point) for real range [rmin, rmax]; vectorized over channels.

    Same arithmetic as ONNX Runtime's ``compute_scale_zp`` so that equal ranges give equal models.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float32), np.float32(0))
    rmax = np.maximum(np.asarray(rmax, dtype=np.float32), np.float32(0))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / float(qmax - qmin)
    tiny = scale < np.finfo(np.float32).tiny
    safe = np.where(tiny, 1.0, scale)
    if symmetric:
        zp = np.full(np.shape(scale), np.round((qmin + qmax) / 2.0))
    else:
        zp = np.round(qmin - rmin.astype(np.float64) / safe)
    zp = np.where(tiny, 0 if qmin <= 0 <= qmax else qmin, np.clip(zp, qmin, qmax))
    scale = np.where(tiny, 1.0, scale).astype(np.float32)
    return scale, zp.astype(np.int64).astype(zp_dtype)


def make_qparams(rmin, rmax, *, bits: int, storage: str, symmetric: bool, axis: int | None = None,
                 method: str = "minmax") -> QParams:
    qmin, qmax = qrange(bits, is_signed(storage), symmetric)
    zp_dtype = np.int32 if storage in ("int4", "uint4", "int32") else np.dtype(storage)
    scale, zp = scale_zero_point(rmin, rmax, qmin, qmax, symmetric, zp_dtype=zp_dtype)
    return QParams(scale=scale, zero_point=zp, storage=storage, bits=bits, qmin=qmin, qmax=qmax,
                   axis=axis, symmetric=symmetric, method=method,
                   rmin=np.asarray(rmin, np.float32), rmax=np.asarray(rmax, np.float32))


# ----------------------------------------------------------------------------- activation ranges

def act_range(stats: "TensorStats", method: str, *, bits: int = 8, symmetric: bool = False,
              signed: bool = True, percentile: float = 99.999) -> tuple[float, float]:
    """The real range [rmin, rmax] to quantize a tensor with, decided by ``method`` on its statistics."""
    if stats.count == 0:
        return 0.0, 0.0
    if method == "minmax" or stats.max == stats.min:
        return float(stats.min), float(stats.max)
    if method == "percentile":
        return percentile_range(stats, percentile)
    if method == "mse":
        return mse_range(stats, bits=bits, symmetric=symmetric, signed=signed)
    if method == "entropy":
        return entropy_range(stats, bits=bits)
    raise ValueError(f"unknown activation method {method!r}; one of {', '.join(ACT_METHODS)}")


def _one_sided(stats: "TensorStats") -> int:
    """+1 when the tensor is (all but) non-negative, -1 non-positive, 0 two-sided."""
    if stats.min >= 0:
        return 1
    if stats.max <= 0:
        return -1
    return 0


def percentile_range(stats: "TensorStats", p: float) -> tuple[float, float]:
    """Two-sided tensors: T = p-th percentile of |x|, range [max(min, -T), min(max, T)];
    one-sided tensors: the p-th percentile of the side (ONNX Runtime takes |x| as well)."""
    counts, width = stats.abs_hist()
    cdf = np.cumsum(counts, dtype=np.float64)
    total = cdf[-1]
    if total <= 0:
        return float(stats.min), float(stats.max)
    i = int(np.searchsorted(cdf, total * p / 100.0))
    t = min((i + 1) * width, max(abs(stats.min), abs(stats.max)))
    return max(float(stats.min), -t), min(float(stats.max), t)


def mse_range(stats: "TensorStats", *, bits: int = 8, symmetric: bool = False, signed: bool = True,
              candidates: int = 200) -> tuple[float, float]:
    """Scale [min, max] by a in (0, 1]; pick a minimizing the expected squared error on the histogram."""
    centers, counts = stats.signed_hist()
    zero_bin = stats.zero_bin()
    qmin, qmax = qrange(bits, signed, symmetric)
    a = np.linspace(1.0 / candidates, 1.0, candidates)
    lo = a * min(stats.min, 0.0)
    hi = a * max(stats.max, 0.0)
    err = _expected_error(centers, counts, lo, hi, qmin, qmax, symmetric, zero_bin, stats.zeros)
    k = int(np.argmin(err))
    return float(lo[k]), float(hi[k])


def _expected_error(centers, counts, lo, hi, qmin, qmax, symmetric, zero_bin, zeros) -> np.ndarray:
    scale, zp = scale_zero_point(lo, hi, qmin, qmax, symmetric, zp_dtype=np.int64)
    s = scale.astype(np.float64)[:, None]
    z = zp.astype(np.float64)[:, None]
    rlo, rhi = s * (qmin - z), s * (qmax - z)
    c = centers[None, :]
    inside = np.full_like(c * s, 0.0) + s * s / 12.0
    e = np.where(c < rlo, (c - rlo) ** 2, np.where(c > rhi, (c - rhi) ** 2, inside))
    n = counts.astype(np.float64)[None, :].repeat(len(lo), 0)
    if zero_bin is not None and zeros:
        n[:, zero_bin] = np.maximum(n[:, zero_bin] - zeros, 0)  # exact zeros are exact after quantizing
    return (e * n).sum(axis=1)


def entropy_range(stats: "TensorStats", *, bits: int = 8) -> tuple[float, float]:
    """TensorRT KL calibration. One-sided tensors use all 2^bits levels on their side; two-sided ones
    take a symmetric threshold on |x| with 2^(bits-1) levels."""
    side = _one_sided(stats)
    counts, width = stats.abs_hist() if side == 0 else stats.side_hist(side)
    levels = 2 ** (bits - 1) if side == 0 else 2 ** bits - 1
    if stats.zeros and len(counts):
        # exact zeros (ReLU, padding) quantize exactly whatever the range: they carry no information about
        # the threshold, and as a spike in bin 0 they pull KL towards tiny ranges
        counts = counts.copy()
        counts[0] = max(int(counts[0]) - int(stats.zeros), 0)
    nz = np.nonzero(counts)[0]
    if len(nz) == 0:
        return float(stats.min), float(stats.max)
    counts = counts[: nz[-1] + 1].astype(np.float64)
    if len(counts) <= levels:
        return float(stats.min), float(stats.max)
    i = _kl_threshold(counts, levels)
    t = i * width
    if side > 0:
        return float(stats.min), min(float(stats.max), t)
    if side < 0:
        return max(float(stats.min), -t), float(stats.max)
    return max(float(stats.min), -t), min(float(stats.max), t)


@njit(nogil=True)
def _kl_threshold(hist, levels):
    """Bin count i (levels <= i <= len(hist)) minimizing KL(P_i || Q_i), as TensorRT's calibrator
    (in the MXNet/TVM reference form): P = hist[:i] with the tail folded into bin i-1; Q = hist[:i]
    merged into ``levels`` groups of i // levels bins (the remainder joins the last), each group's
    mass spread over the bins where P is non-zero; both smoothed with eps = 1e-4 before the KL."""
    n = hist.shape[0]
    best_i = n
    best_kl = np.inf
    tail = np.zeros(n + 1)
    for j in range(n - 1, -1, -1):
        tail[j] = tail[j + 1] + hist[j]
    p = np.empty(n)
    q = np.empty(n)
    for i in range(levels, n + 1):
        for j in range(i):
            p[j] = hist[j]
        p[i - 1] += tail[i]
        merged = i // levels
        for j in range(i):
            q[j] = 0.0
        for b in range(levels):
            start = b * merged
            stop = start + merged if b < levels - 1 else i
            mass = 0.0
            nonzero = 0
            for j in range(start, stop):
                mass += hist[j]
                if p[j] != 0:
                    nonzero += 1
            if nonzero == 0:
                continue
            for j in range(start, stop):
                if p[j] != 0:
                    q[j] = mass / nonzero
        kl = _smoothed_kl(p[:i], q[:i], 1e-4)
        if kl < best_kl:
            best_kl = kl
            best_i = i
    return best_i


@njit(nogil=True)
def _smoothed_kl(p, q, eps):
    """KL(p || q) between histograms of counts: zero bins get eps, taken evenly from the non-zero
    ones (on counts, as MXNet's ``_smooth_distribution``), then both are normalized."""
    n = p.shape[0]
    ps = 0.0
    qs = 0.0
    pz = 0
    qz = 0
    for j in range(n):
        ps += p[j]
        qs += q[j]
        if p[j] == 0:
            pz += 1
        if q[j] == 0:
            qz += 1
    if ps <= 0 or qs <= 0 or pz == n or qz == n:
        return np.inf
    pe = eps * pz / (n - pz)
    qe = eps * qz / (n - qz)
    kl = 0.0
    for j in range(n):
        a = (p[j] + (eps if p[j] == 0 else -pe)) / ps
        b = (q[j] + (eps if q[j] == 0 else -qe)) / qs
        if a <= 0 or b <= 0:
            return np.inf
        kl += a * np.log(a / b)
    return kl


# ----------------------------------------------------------------------------- weights

def weight_qparams(w: np.ndarray, *, bits: int, storage: str, symmetric: bool = True,
                   axis: int | None = None, method: str = "minmax") -> QParams:
    """Quantization of a constant: per tensor (axis None) or per slice along ``axis``."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        rmin, rmax = (float(w.min()), float(w.max())) if w.size else (0.0, 0.0)
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        rmin, rmax = moved.min(axis=1), moved.max(axis=1)
    signed = is_signed(storage)
    if method == "mse":
        rmin, rmax = _weight_mse(w, axis, rmin, rmax, bits, signed, symmetric)
    elif method != "minmax":
        raise ValueError(f"unknown weight method {method!r}; one of {', '.join(WEIGHT_METHODS)}")
    return make_qparams(rmin, rmax, bits=bits, storage=storage, symmetric=symmetric, axis=axis, method=method)


def _weight_mse(w, axis, rmin, rmax, bits, signed, symmetric, candidates: int = 60):
    """Per slice, scale [min, max] by a in [0.3, 1] minimizing the exact squared error of the slice."""
    qmin, qmax = qrange(bits, signed, symmetric)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    lo0 = np.atleast_1d(np.asarray(rmin, np.float64))
    hi0 = np.atleast_1d(np.asarray(rmax, np.float64))
    best_err = np.full(len(lo0), np.inf)
    best_a = np.ones(len(lo0))
    alphas = np.linspace(0.3, 1.0, candidates)
    grid = [scale_zero_point(lo0 * a, hi0 * a, qmin, qmax, symmetric, zp_dtype=np.int64) for a in alphas]
    # per candidate and row: sum of ((clip(rint(w / s) + z) - z) s - w)^2 in float32 and numpy's order,
    # compiled, every candidate in one read of the weights
    errors = mse_errors(rows, np.stack([s for s, _ in grid]), np.stack([z for _, z in grid]), qmin, qmax)
    for a, err in zip(alphas, errors):
        better = err < best_err
        best_err[better] = err[better]
        best_a[better] = a
    lo, hi = lo0 * best_a, hi0 * best_a
    if axis is None:
        return float(lo[0]), float(hi[0])
    return lo, hi


# ----------------------------------------------------------------------------- reporting

def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(E[x^2] / E[(x - x')^2]); +inf when there is no noise."""
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))
