"""Calibration: run ONNX Runtime once over the data and stream per-tensor statistics.

One session exposes every tensor to be observed as an extra graph output; the calibration data is
fed in batches; each batch's values update, per tensor, a ``TensorStats`` and are then dropped. Peak
memory is one batch of activations plus fixed-size statistics, whatever the number of samples.

The histogram is anchored at 0 with a fixed number of bins B of width w: bin k covers [k w, (k+1) w).
When a batch falls outside the B bins, w doubles and bins 2j, 2j+1 merge into j (exact, no
re-sampling), until the range fits again. Since it always contains 0, the histogram holds between
B/2 and B non-empty-range bins over [min(0, min), max(0, max)], whatever order the data comes in.
Exact zeros (ReLU outputs, padding) are counted apart: they quantize without error.

Decisions (scale, zero point) are made elsewhere, by ``qgraph.qparams`` from these statistics.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import onnx
from numba import njit

from qgraph.errors import ModelError

DEFAULT_BINS = 2048
#: |x| at or above this is a sentinel, not a value: attention masks add finfo(float32).min (or -1e9 ...)
#: to scores before Softmax. Counted apart, left out of min/max and the histogram: the quantized tensor
#: saturates them to the range's end, which Softmax turns into the same ~0 weight.
SENTINEL = 1e8


@njit(cache=True, nogil=True)
def _bin(x, hist, inv_w, offset):
    """hist[floor(x / w) - offset] += 1 for every finite x; returns the number of exact zeros."""
    n = hist.shape[0]
    zeros = 0
    for i in range(x.shape[0]):
        v = x[i]
        if v == 0.0:
            zeros += 1
        k = int(np.floor(v * inv_w)) - offset
        if k < 0:
            k = 0
        elif k >= n:
            k = n - 1
        hist[k] += 1
    return zeros


class TensorStats:
    """Streamed statistics of one tensor: count, min, max, exact zeros, an anchored histogram, and
    per-channel min/max along ``axis`` when asked for."""

    def __init__(self, bins: int = DEFAULT_BINS, axis: int | None = None):
        self.bins = int(bins)                # 0: min/max only (all ``minmax`` needs)
        self.axis = axis
        self.count = 0
        self.zeros = 0
        self.min = np.inf
        self.max = -np.inf
        self.width: float | None = None      # bin width w; None until a non-zero value is seen
        self.offset = 0                      # bin index k of hist[0]
        self.k_lo = 0                        # lowest / highest bin index holding data (0 included)
        self.k_hi = 0
        self.hist = np.zeros(max(self.bins, 1), dtype=np.int64)
        self.pending_zeros = 0               # zeros seen before the width was known
        self.sentinels = 0                   # values with |x| >= SENTINEL (masks), inf and nan
        self.ch_min: np.ndarray | None = None
        self.ch_max: np.ndarray | None = None

    # -- streaming ----------------------------------------------------------------------

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if self.axis is not None and x.ndim > self.axis:
            moved = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
            cmin, cmax = moved.min(axis=1), moved.max(axis=1)
            self.ch_min = cmin if self.ch_min is None else np.minimum(self.ch_min, cmin)
            self.ch_max = cmax if self.ch_max is None else np.maximum(self.ch_max, cmax)
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        mn, mx = flat.min(), flat.max()     # numpy's SIMD reductions beat a scalar loop 2x
        if not (np.isfinite(mn) and np.isfinite(mx)) or max(-mn, mx) >= SENTINEL:
            keep = np.abs(flat) < SENTINEL       # also drops inf and nan
            self.sentinels += int(flat.size - np.count_nonzero(keep))
            flat = flat[keep]
            if flat.size == 0:
                return
            mn, mx = flat.min(), flat.max()
        self.count += flat.size
        self.min = min(self.min, float(mn))
        self.max = max(self.max, float(mx))
        if self.bins == 0:
            return
        lo, hi = min(float(mn), 0.0), max(float(mx), 0.0)
        if self.width is None:
            if hi - lo <= 0:
                self.pending_zeros += flat.size
                self.zeros += flat.size
                return
            self.width = (hi - lo) / (self.bins - 2)
            self.offset = int(np.floor(lo / self.width))
            self.k_lo = self.k_hi = 0
            self.hist[-self.offset] += self.pending_zeros
            self.pending_zeros = 0
        self._fit(lo, hi)
        self.zeros += int(_bin(flat, self.hist, 1.0 / self.width, self.offset))

    def _fit(self, lo: float, hi: float) -> None:
        """Widen (double w, merge bin pairs) and shift until [lo, hi] fits in the bins."""
        k_lo, k_hi = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
        while max(self.k_hi, k_hi) - min(self.k_lo, k_lo) + 1 > self.bins:
            ks = self.offset + np.arange(self.bins)
            new_offset = self.offset // 2
            self.hist = np.bincount(ks // 2 - new_offset, weights=self.hist,
                                    minlength=self.bins)[: self.bins].astype(np.int64)
            self.offset = new_offset
            self.k_lo, self.k_hi = self.k_lo // 2, self.k_hi // 2
            self.width *= 2.0
            k_lo, k_hi = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
        self.k_lo, self.k_hi = min(self.k_lo, k_lo), max(self.k_hi, k_hi)
        if self.k_lo < self.offset or self.k_hi > self.offset + self.bins - 1:
            shift = self.offset - self.k_lo          # > 0: move the data right
            new = np.zeros_like(self.hist)
            if shift > 0:
                new[shift:] = self.hist[: self.bins - shift]
            else:
                new[: self.bins + shift] = self.hist[-shift:]
            self.hist = new
            self.offset = self.k_lo

    # -- views for the decisions --------------------------------------------------------

    @property
    def has_hist(self) -> bool:
        return self.bins > 0

    def signed_hist(self) -> tuple[np.ndarray, np.ndarray]:
        """(bin centers, counts) over the bins holding data, in increasing value."""
        if not self.has_hist:
            raise ValueError("these statistics were collected without a histogram (bins=0)")
        if self.width is None:
            return np.zeros(1), np.array([self.count], dtype=np.int64)
        a, b = self._extent()
        ks = np.arange(self.offset + a, self.offset + b, dtype=np.float64)
        return (ks + 0.5) * self.width, self.hist[a:b]

    def _extent(self) -> tuple[int, int]:
        nz = np.flatnonzero(self.hist)
        a, b = self.k_lo - self.offset, self.k_hi - self.offset + 1
        if len(nz):  # float rounding at an edge can put a value one bin out
            a, b = min(a, int(nz[0])), max(b, int(nz[-1]) + 1)
        return a, b

    def zero_bin(self) -> int | None:
        """Index, in ``signed_hist()``, of the bin that holds exact zeros."""
        return None if self.width is None else -self.offset - self._extent()[0]

    def side_hist(self, side: int) -> tuple[np.ndarray, float]:
        """Histogram of |x| over one side (+1: x >= 0, -1: x < 0) as (counts, width); bin j = [j w, (j+1) w)."""
        if not self.has_hist:
            raise ValueError("these statistics were collected without a histogram (bins=0)")
        if self.width is None:
            return np.array([self.count], dtype=np.int64), 1.0
        z = -self.offset
        a, b = self._extent()
        if side > 0:
            return self.hist[z: max(b, z + 1)].copy(), self.width
        neg = self.hist[a: z][::-1].copy()  # bin k=-1 -> |x| bin 0
        return neg, self.width

    def abs_hist(self) -> tuple[np.ndarray, float]:
        """Histogram of |x|: (counts, width)."""
        pos, w = self.side_hist(1)
        neg, _ = self.side_hist(-1)
        n = max(len(pos), len(neg))
        out = np.zeros(n, dtype=np.int64)
        out[: len(pos)] += pos
        out[: len(neg)] += neg
        return out, w

    def moments(self) -> float:
        """E[x^2] estimated from the histogram (for SQNR estimates without another pass)."""
        c, n = self.signed_hist()
        total = n.sum()
        return float((c * c * n).sum() / total) if total else 0.0

    def __repr__(self) -> str:
        return f"TensorStats(n={self.count}, min={self.min:.4g}, max={self.max:.4g}, w={self.width})"


# ----------------------------------------------------------------------------- running ORT

def fingerprint(model: onnx.ModelProto) -> str:
    """A key for "the same graph state": the hash of the serialized model."""
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the (float) tensors ``names``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in out.graph.value_info}
    for name in names:
        if name in have:
            continue
        elem = types.get(name, onnx.TensorProto.FLOAT)
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        have.add(name)
    return out


def batch_size_for(model: onnx.ModelProto, wanted: int) -> int:
    """``wanted``, unless an input has a fixed batch dimension, which then decides."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return wanted


def stream(model: onnx.ModelProto, names: list[str], samples, *, batch_size: int = 16,
           progress: bool = False, desc: str = "calibrate", threads: int = 0
           ) -> Iterator[dict[str, np.ndarray]]:
    """Run one ORT session over ``samples`` in batches; yield {name: value} for ``names`` per batch."""
    from qgraph.ops import ort_session
    sess = ort_session(with_outputs(model, names), threads=threads)
    inputs = [i.name for i in sess.get_inputs()]
    bs = batch_size_for(model, batch_size)
    bar = progress_bar(len(samples), desc) if progress else None
    try:
        for feed in samples.batches(bs):
            missing = [n for n in inputs if n not in feed]
            if missing:
                raise ModelError(f"calibration data lacks input(s) {', '.join(missing)}")
            try:
                values = sess.run(names, {n: feed[n] for n in inputs})
            except Exception as exc:  # ORT's messages are long; the first line says it
                raise ModelError(f"ONNX Runtime failed on calibration data: "
                                 f"{str(exc).strip().splitlines()[0][:300]}") from None
            if bar is not None:
                bar.update(len(next(iter(feed.values()))))
            yield dict(zip(names, values))
    finally:
        if bar is not None:
            bar.close()


def progress_bar(total: int, desc: str, unit: str = "sample"):
    """A tqdm bar that disappears when done (None when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def collect(model: onnx.ModelProto, names: Iterable[str], samples, *, bins: int = DEFAULT_BINS,
            axes: dict[str, int] | None = None, batch_size: int = 16, progress: bool = False,
            threads: int = 0) -> dict[str, TensorStats]:
    """Statistics of every tensor in ``names`` over ``samples`` (one session, one pass).

    While ORT computes batch i+1, a worker thread folds batch i into the statistics (ORT, numpy's
    reductions and the binning kernel all release the GIL); at most two batches are alive at once.
    """
    names = list(dict.fromkeys(names))
    axes = axes or {}
    stats = {n: TensorStats(bins, axes.get(n)) for n in names}
    if not names:
        return stats

    def fold(values: dict) -> None:
        for n, v in values.items():
            stats[n].update(v)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgraph-calib") as pool:
        pending = None
        for values in stream(model, names, samples, batch_size=batch_size, progress=progress, threads=threads):
            if pending is not None:
                pending.result()
            pending = pool.submit(fold, values)
            del values
        if pending is not None:
            pending.result()
    return stats


def cached_collect(ctx, model: onnx.ModelProto, names: Iterable[str], **kw) -> dict[str, TensorStats]:
    """``collect`` through ``ctx.stats``: tensors already observed on this graph state and this data
    are not observed again."""
    bins = kw.get("bins", DEFAULT_BINS)
    key = (fingerprint(model), id(ctx.calib), len(ctx.calib))
    cache = ctx.stats.setdefault("activations", {})
    entry = cache.get(key)
    if entry is None:
        entry = cache[key] = {}
    names = list(dict.fromkeys(names))
    # statistics without a histogram (minmax) do not serve a method that needs one
    missing = [n for n in names if n not in entry or (bins and entry[n].bins < bins)]
    if missing:
        entry.update(collect(model, missing, ctx.calib, progress=getattr(ctx, "progress", False), **kw))
    return {n: entry[n] for n in names}
