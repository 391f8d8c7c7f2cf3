"""Calibration: run ONNX Runtime once over the data and stream per-tensor statistics.

One session over the calibration data, fed in batches. What leaves ONNX Runtime is kept small:

- min/max only (``bins=0``, all ``minmax`` needs): reduction nodes are added to the graph
  (ReduceMin, ReduceMax, Size per tensor; ``qgraph.reductions``), so ORT returns three scalars per
  tensor and batch, and each activation is freed right after its reductions, reused from layer to
  layer as in plain inference. Peak memory: about the model's inference at that batch size. (ORT's
  own MinMax calibrator reduces in the graph too, but its reductions run last: every activation
  of the batch stays alive until then.)
- histograms: every tensor to observe is exposed as an extra graph output; each batch's values
  update, per tensor, a ``TensorStats`` and are then dropped. Peak memory: every observed tensor of
  one or two batches (ORT cannot reuse an output's buffer), whatever the number of samples.
- per-channel means (``channel_means``, what bias correction compares): exposed, folded per batch
  by one Numba pass per tensor.

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
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import onnx
from qgraph.jit import njit
from qgraph.errors import ModelError
from qgraph.reductions import with_extremes

DEFAULT_BINS = 2048
#: |x| at or above this is a sentinel, not a value: attention masks add finfo(float32).min (or -1e9 ...)
#: to scores before Softmax. Counted apart, left out of min/max and the histogram: the quantized tensor
#: saturates them to the range's end, which Softmax turns into the same ~0 weight.
SENTINEL = 1e8


@njit(nogil=True)
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

    def add_extremes(self, mn: float, mx: float, count: int) -> None:
        """Fold in a batch seen only through its min, max and element count (the in-graph reductions
        of ``collect``); only for statistics without a histogram (``bins=0``)."""
        if self.bins:
            raise ValueError("a histogram needs the values, not only their extremes")
        if count <= 0:
            return
        self.count += int(count)
        self.min = min(self.min, float(mn))
        self.max = max(self.max, float(mx))

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

def fingerprint(model) -> str:
    """A key for "the same graph state": the hash of the serialized model (a ModelProto, or a model
    kept in a file: ``qgraph.pipeline.SpilledModel``, hashed from the file)."""
    if not isinstance(model, onnx.ModelProto):
        return model.fingerprint()
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()


def _fresh(model) -> tuple[onnx.ModelProto, bool]:
    """(a ModelProto of ``model``, whether the caller may change it): a model kept in a file
    (anything with ``load()``) is read afresh, so nothing else holds it."""
    if isinstance(model, onnx.ModelProto):
        return model, False
    return model.load(), True


def with_outputs(model: onnx.ModelProto, names: Iterable[str], *, copy: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` (``copy=False``: ``model`` itself) that also outputs the (float) tensors
    ``names`` (``model`` itself when it outputs them all already: a copy of the weights is memory too)."""
    names = list(names)
    have = {o.name for o in model.graph.output}
    if all(n in have for n in names):
        return model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
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


def stream(model, names: list[str], samples, *, batch_size: int = 16,
           progress: bool = False, desc: str = "calibrate", threads: int = 0, lean: bool = False,
           own: bool = False, arena: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Run one ORT session over ``samples`` in batches; yield {name: value} for ``names`` per batch.
    ``model``: a ModelProto, or a model kept in a file (``qgraph.pipeline.SpilledModel``: read
    here, its outputs added in place). ``own=True``: the caller hands the ModelProto over (it gets
    the extra outputs in place, no copy). The model is serialized and dropped before the session is
    made, so a caller passing the only reference holds no ModelProto while ORT builds and runs the
    session; ``lean``, ``arena``: see ``ort_session``."""
    from qgraph import ir
    from qgraph.ops import ort_session
    model, fresh = _fresh(model)
    bs = batch_size_for(model, batch_size)
    model = with_outputs(model, names, copy=not (own or fresh))
    if not ir.is_large(model):
        model = model.SerializeToString()
    heap = session_heap()       # while the session lives (see there)
    heap.__enter__()
    try:
        sess = ort_session(model, threads=threads, lean=lean, arena=arena)
    except BaseException:
        heap.__exit__(None, None, None)
        raise
    del model
    release_memory()
    inputs = [i.name for i in sess.get_inputs()]
    bar = progress_bar(len(samples), desc) if progress else None
    try:
        for feed in samples.batches(bs):
            missing = [n for n in inputs if n not in feed]
            if missing:
                raise ModelError(f"calibration data lacks input(s) {', '.join(missing)}")
            values = run_session(sess, names, {n: feed[n] for n in inputs})
            if bar is not None:
                bar.update(len(next(iter(feed.values()))))
            yield dict(zip(names, values))
    finally:
        if bar is not None:
            bar.close()
        del sess
        heap.__exit__(None, None, None)


def release_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps it otherwise: a finished ORT session's
    arena stays resident (EfficientNet-Lite0: ~130 MB after calibration) and adds to the peak of
    whatever runs next."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


#: glibc's M_MMAP_THRESHOLD (mallopt parameter number); the threshold while an ORT session runs, and
#: the one between sessions (glibc's own upper bound for its dynamic threshold).
_M_MMAP_THRESHOLD = -3
SESSION_MMAP_THRESHOLD = 128 * 1024
HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024


def mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold: blocks of ``nbytes`` or more come from mmap and go back to the
    system when freed; smaller ones from the heap, whose freed space stays resident. glibc starts at
    128 KiB and raises it to the size of each large block freed (up to 32 MB); once set, it stays
    where it is put. Left alone when ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the user
    chose). False when not glibc or left alone."""
    import ctypes
    import os
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):   # not glibc
        return False


_session_depth = 0


@contextmanager
def session_heap():
    """The allocator policy for building and running ORT sessions (reentrant): blocks of 128 KiB or
    more (ORT's weights and activations without its arena, serialized models, our batches) are
    mapped and unmapped on their own, so freeing them gives the memory back. With glibc's raised
    threshold they would come from the heap and leave it fragmented (EfficientNet-Lite0 ``fold,quant``:
    ~40-70 MB of peak). Outside, the threshold is glibc's 32 MB bound: small numpy temporaries
    (quant's pair fitting: 4x slower when each is a fresh mapping) stay on the heap."""
    global _session_depth
    _session_depth += 1
    try:
        if _session_depth == 1:
            release_memory()
            mmap_threshold(SESSION_MMAP_THRESHOLD)
        yield
    finally:
        _session_depth -= 1
        if _session_depth == 0:
            mmap_threshold(HEAP_MMAP_THRESHOLD)
            release_memory()


def run_session(sess, names: list[str], feed: dict) -> list[np.ndarray]:
    """``sess.run`` with ORT's long error messages cut to their first line, as a ModelError."""
    try:
        return sess.run(names, feed)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime failed on calibration data: "
                         f"{str(exc).strip().splitlines()[0][:300]}") from None


@njit(nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _channel_sums(x, lo, hi, out):
    """out[c] += [sum x, sum clip(x, lo[c], hi[c]), #(lo[c] < x < hi[c])] over x [N, C, L], in float64.
    Branch-free and reassociated (summed in SIMD lanes), infinities kept (no ``ninf``): ~1 G values/s."""
    n, c, l = x.shape
    for i in range(n):
        for ch in range(c):
            a, b = lo[ch], hi[ch]
            s, sc, k = 0.0, 0.0, 0.0
            for j in range(l):
                v = np.float64(x[i, ch, j])
                s += v
                sc += min(max(v, a), b)
                k += np.float64((v > a) & (v < b))
            out[ch, 0] += s
            out[ch, 1] += sc
            out[ch, 2] += k


def channel_sums_reference(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """What ``_channel_sums`` adds, in plain numpy: [C, 3] of sum, clipped sum, count inside."""
    v = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    lo, hi = np.asarray(lo, np.float64)[:, None], np.asarray(hi, np.float64)[:, None]
    return np.stack([v.sum(axis=1), np.clip(v, lo, hi).sum(axis=1), ((v > lo) & (v < hi)).sum(axis=1)], axis=1)


class ChannelSums:
    """Per-channel means of tensors [N, C, ...] accumulated over batches (``update``, one pass of a
    Numba kernel per tensor, float64 sums): "mean" of the value; for a tensor with bounds (lo, hi)
    per channel also "act", the mean of clip(value, lo, hi), and "active", the fraction of values
    strictly inside (lo, hi)."""

    def __init__(self, names: list[str], bounds: dict | None = None):
        self.names = list(dict.fromkeys(names))
        self.bounds = bounds or {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for n in self.names:
            v = np.asarray(values[n])
            x = np.ascontiguousarray(v.reshape(v.shape[0], v.shape[1], -1), dtype=np.float32)
            c = x.shape[1]
            lo, hi = self.bounds.get(n, (np.full(c, -np.inf), np.full(c, np.inf)))
            acc = self.sums.setdefault(n, np.zeros((c, 3)))
            _channel_sums(x, np.broadcast_to(np.asarray(lo, np.float64), (c,)).copy(),
                          np.broadcast_to(np.asarray(hi, np.float64), (c,)).copy(), acc)
            self.counts[n] = self.counts.get(n, 0) + x.shape[0] * x.shape[2]

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for n in self.names:
            m = self.sums[n] / max(self.counts[n], 1)
            out[n] = {"mean": m[:, 0], "act": m[:, 1], "active": m[:, 2]} if n in self.bounds else {"mean": m[:, 0]}
        return out


def channel_means(model: onnx.ModelProto, names: list[str], samples, *, bounds: dict | None = None,
                  batch_size: int = 16, progress: bool = False, desc: str = "channel means"
                  ) -> dict[str, dict[str, np.ndarray]]:
    """``ChannelSums`` of ``names`` over ``samples``: one session, one pass, the tensors exposed
    (memory: all of them for one batch)."""
    sums = ChannelSums(names, bounds)
    for values in stream(model, sums.names, samples, batch_size=batch_size, progress=progress, desc=desc):
        sums.update(values)
    return sums.result()


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

    Without a histogram (``bins=0``) and a channel axis, a tensor is reduced inside the graph
    (``with_extremes``); a tensor whose extremes turn out to be sentinels (|x| >= SENTINEL, inf,
    nan: attention masks) is observed again, exposed, in a second pass that leaves them out.
    Exposed tensors: while ORT computes batch i+1, a worker thread folds batch i into the statistics
    (ORT, numpy's reductions and the binning kernel all release the GIL); at most two batches are
    alive at once.
    """
    names = list(dict.fromkeys(names))
    axes = axes or {}
    stats = {n: TensorStats(bins, axes.get(n)) for n in names}
    if not names:
        return stats
    reduced = [n for n in names if bins == 0 and axes.get(n) is None]
    exposed = [n for n in names if n not in set(reduced)]
    layout: dict = {}
    source = model
    model, fresh = _fresh(model)
    if reduced:
        model, layout = with_extremes(model, reduced, copy=not fresh)
        fresh = True
    wanted = exposed + [o for outs in layout.values() for o in outs]
    suspect: set[str] = set()

    def fold(values: dict) -> None:
        for n in exposed:
            stats[n].update(values[n])
        for n, (mn, mx, size) in layout.items():
            lo, hi, count = float(values[mn]), float(values[mx]), int(values[size])
            if count and not (abs(lo) < SENTINEL and abs(hi) < SENTINEL):
                suspect.add(n)
            stats[n].add_extremes(lo, hi, count)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgraph-calib") as pool:
        pending = None
        batches = stream(model, wanted, samples, batch_size=batch_size, progress=progress, threads=threads,
                         own=fresh, arena=False)
        del model       # the stream holds the only reference, and drops it once its session is made
        for values in batches:
            if pending is not None:
                pending.result()
            pending = pool.submit(fold, values)
            del values
        if pending is not None:
            pending.result()
    if suspect:
        again = [n for n in names if n in suspect]
        for n in again:
            stats[n] = TensorStats(bins, axes.get(n))
        for values in stream(source, again, samples, batch_size=batch_size, progress=progress,
                             desc="calibrate (masked tensors)", threads=threads):
            for n in again:
                stats[n].update(values[n])
    return stats


def cached_collect(ctx, model, names: Iterable[str], **kw) -> dict[str, TensorStats]:
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
