"""calibrate: streamed statistics equal the ones computed on all the data at once, in any order, and
the collector runs one ORT session over batches without keeping activations."""
import numpy as np
import pytest
from onnx import helper

from builders import init, make_model
from qgraph.calibrate import TensorStats, cached_collect, collect
from qgraph.data import open_samples
from qgraph.pipeline import Context


def _direct_hist(s: TensorStats, x: np.ndarray) -> np.ndarray:
    centers, _ = s.signed_hist()
    edges = np.concatenate([centers - s.width / 2, [centers[-1] + s.width / 2]])
    return np.histogram(x, edges)[0]


def test_widening_histogram_equals_histogram_of_all_data(rng):
    # batches of growing range force several doublings; merging bin pairs must lose nothing
    parts = [rng.standard_normal(5000).astype(np.float32) * k for k in (0.01, 1.0, 7.0, 0.5, 60.0)]
    s = TensorStats(bins=256)
    for p in parts:
        s.update(p)
    x = np.concatenate(parts)
    _, counts = s.signed_hist()
    assert counts.sum() == x.size
    assert np.array_equal(counts, _direct_hist(s, x))
    assert (s.min, s.max) == (float(x.min()), float(x.max()))


def test_histogram_resolution_stays_at_least_half_the_bins(rng):
    s = TensorStats(bins=512)
    for k in (1e-3, 1.0, 1e3):
        s.update(rng.uniform(-k, k, 1000))
    _, counts = s.signed_hist()
    assert len(counts) >= 256


def test_order_of_batches_does_not_change_min_max_or_count(rng):
    parts = [rng.standard_normal(1000) * k for k in (1, 10, 0.1)]
    a, b = TensorStats(), TensorStats()
    for p in parts:
        a.update(p)
    for p in reversed(parts):
        b.update(p)
    assert (a.min, a.max, a.count) == (b.min, b.max, b.count)


def test_exact_zeros_are_counted_including_before_the_first_nonzero_batch():
    s = TensorStats(bins=128)
    s.update(np.zeros(50))
    s.update(np.array([0.0, 0.0, 1.0, -2.0]))
    assert s.zeros == 52
    centers, counts = s.signed_hist()
    assert counts[s.zero_bin()] == 52
    assert counts.sum() == 54


def test_abs_hist_folds_negative_side(rng):
    x = rng.standard_normal(10_000).astype(np.float32)
    s = TensorStats(bins=1024)
    s.update(x)
    counts, w = s.abs_hist()
    assert counts.sum() == x.size
    ref = np.histogram(np.abs(x), np.arange(len(counts) + 1) * w)[0]
    assert np.abs(counts - ref).sum() <= 2   # |x| exactly on a bin edge can fall either way


def test_per_channel_min_max(rng):
    s = TensorStats(axis=1)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    s.update(x[:2])
    s.update(x[2:])
    np.testing.assert_array_equal(s.ch_max, x.max(axis=(0, 2)))
    np.testing.assert_array_equal(s.ch_min, x.min(axis=(0, 2)))


def _two_layer_model(rng):
    #   x ─MatMul(w)─ h ─Relu─ r ─MatMul(w2)─ y
    w = rng.standard_normal((4, 6)).astype(np.float32)
    w2 = rng.standard_normal((6, 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])], [init("w", w), init("w2", w2)]), w


def test_collect_streams_batches_and_matches_numpy(rng):
    model, w = _two_layer_model(rng)
    x = rng.standard_normal((37, 4)).astype(np.float32)
    samples = open_samples({"x": x}, ["x"])
    stats = collect(model, ["h", "r"], samples, batch_size=8)
    h = x @ w
    assert stats["h"].count == h.size
    assert stats["h"].min == pytest.approx(h.min(), rel=1e-6)
    assert stats["r"].max == pytest.approx(h.max(), rel=1e-6)
    assert stats["r"].min == 0.0


def test_cached_collect_reuses_statistics_on_the_same_graph(rng):
    model, _ = _two_layer_model(rng)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    ctx = Context(calib=open_samples({"x": x}, ["x"]), progress=False)
    first = cached_collect(ctx, model, ["h"])
    again = cached_collect(ctx, model, ["h", "r"])
    assert again["h"] is first["h"]                 # not observed twice
    assert again["r"].count == 8 * 6
