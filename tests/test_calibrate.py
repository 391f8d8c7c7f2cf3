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


def _masked_scores_model():
    #   x ─Add(mask)─ s ─Relu─ r        the mask adds finfo(float32).min to one column (attention-style)
    mask = np.zeros((1, 4), np.float32)
    mask[0, 3] = np.finfo(np.float32).min
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Relu", ["s"], ["r"])]
    return make_model(nodes, [("x", ["N", 4])], [("r", ["N", 4])], [init("mask", mask)])


def test_minmax_reduced_in_the_graph_equals_the_exposed_statistics(rng):
    # bins=0 reduces min/max/count inside ORT; with a histogram the values are exposed: same extremes
    model, _ = _two_layer_model(rng)
    x = rng.standard_normal((37, 4)).astype(np.float32)
    samples = open_samples({"x": x}, ["x"])
    reduced = collect(model, ["h", "r"], samples, bins=0, batch_size=8)
    exposed = collect(model, ["h", "r"], samples, bins=128, batch_size=8)
    for n in ("h", "r"):
        assert (reduced[n].min, reduced[n].max, reduced[n].count) == (exposed[n].min, exposed[n].max, exposed[n].count)
        assert not reduced[n].has_hist


def test_minmax_of_a_masked_tensor_leaves_the_sentinels_out(rng):
    # the reduced min is finfo.min: the tensor is observed again, exposed, without the mask values
    x = rng.standard_normal((10, 4)).astype(np.float32)
    stats = collect(_masked_scores_model(), ["s", "r"], open_samples({"x": x}, ["x"]), bins=0, batch_size=4)
    assert stats["s"].min == pytest.approx(float(x[:, :3].min()))
    assert stats["s"].max == pytest.approx(float(x[:, :3].max()))
    assert stats["s"].sentinels == 10 and stats["s"].count == 30
    assert stats["r"].count == 40 and stats["r"].sentinels == 0     # not suspect: one pass


def test_channel_means_match_numpy_with_and_without_bounds(rng):
    #   x ─Conv1x1(w)─ h          per-channel mean, mean of clip(h, lo, hi), fraction strictly inside
    from qgraph.calibrate import channel_means
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"])], [("x", ["N", 2, 4, 5])],
                       [("h", ["N", 3, 4, 5])], [init("w", w)])
    x = rng.standard_normal((11, 2, 4, 5)).astype(np.float32)
    lo, hi = np.array([0.0, -np.inf, -0.5]), np.array([np.inf, 0.3, 0.5])
    got = channel_means(model, ["h"], open_samples({"x": x}, ["x"]), bounds={"h": (lo, hi)}, batch_size=4)["h"]
    h = np.einsum("oi,nihw->nohw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
    flat = np.moveaxis(h, 1, 0).reshape(3, -1)
    # ORT's float32 conv against a float64 einsum: values agree to ~1e-6, sums are float64 on both sides
    np.testing.assert_allclose(got["mean"], flat.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(got["act"], np.clip(flat, lo[:, None], hi[:, None]).mean(axis=1), atol=1e-6)
    np.testing.assert_array_equal(got["active"], ((flat > lo[:, None]) & (flat < hi[:, None])).mean(axis=1))


def test_channel_sums_kernel_equals_its_reference(rng):
    # the Numba kernel sums in SIMD lanes (reassociated): float64 sums of float32 values agree to
    # ~1e-12 relative; the counts are exact. Infinite bounds (no clipping) included.
    from qgraph.calibrate import _channel_sums, channel_sums_reference
    for seed in range(3):
        r = np.random.default_rng(seed)
        x = (r.standard_normal((3, 5, 37)) * 4).astype(np.float32)
        x[0, 0, :5] = 0.0                                      # values exactly on a bound
        lo = r.uniform(-2, 0, 5)
        hi = r.uniform(0, 2, 5)
        lo[0], hi[1] = 0.0, np.inf
        lo[2] = -np.inf
        got = np.zeros((5, 3))
        _channel_sums(x, lo, hi, got)
        ref = channel_sums_reference(x, lo, hi)
        np.testing.assert_allclose(got[:, :2], ref[:, :2], rtol=1e-12, atol=1e-9, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(got[:, 2], ref[:, 2], err_msg=f"seed {seed}")


def test_side_by_side_runs_both_models_on_the_same_inputs(rng):
    #   model a: x ─MatMul(w)─ h ─Relu─ r        model b: the same graph, other weights
    from qgraph.reductions import side_by_side
    from builders import run_ort
    a, wa = _two_layer_model(rng)
    b, wb = _two_layer_model(rng)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    both = side_by_side({"a": a, "b": b})
    assert [i.name for i in both.graph.input] == ["x"]
    outs = dict(zip([o.name for o in both.graph.output], run_ort(both, {"x": x})))
    np.testing.assert_array_equal(outs["a/y"], run_ort(a, {"x": x})[0])   # same ops, same order
    np.testing.assert_array_equal(outs["b/y"], run_ort(b, {"x": x})[0])


def test_reductions_feed_one_sink_and_come_last_tensor_first(rng):
    # the reductions are numbered in reverse order of the tensors they read and all feed one Concat,
    # the graph's only leaf: ORT's depth-first order then reduces (and frees) each tensor right away
    from qgraph.reductions import with_extremes
    model, _ = _two_layer_model(rng)
    m, layout = with_extremes(model, ["h", "r"])
    ops_ = [n.op_type for n in m.graph.node]
    first_min = [n.input[0] for n in m.graph.node if n.op_type == "ReduceMin"]
    assert first_min == ["r", "h"]
    consumed = {i for n in m.graph.node for i in n.input}
    leaves = [n for n in m.graph.node if not any(o in consumed for o in n.output)]
    assert [n.op_type for n in leaves] == ["Concat"] and ops_[-1] == "Concat"


def test_mmap_threshold_is_set_unless_the_environment_chose(monkeypatch):
    import ctypes
    from qgraph.calibrate import HEAP_MMAP_THRESHOLD, mmap_threshold
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert mmap_threshold(HEAP_MMAP_THRESHOLD) is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert mmap_threshold(HEAP_MMAP_THRESHOLD) is False


def test_ort_session_from_bytes_or_a_file_runs_the_same(tmp_path, rng):
    from qgraph.ops import ort_session
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for src in (model, model.SerializeToString(), path, str(path)):
        np.testing.assert_array_equal(ort_session(src, arena=False).run(None, {"x": x})[0], np.maximum(x, 0))
