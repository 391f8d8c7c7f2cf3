"""The compiled weight searches (qgraph.weight_search) equal their numpy definitions bit for bit.

quant's decisions pick the candidate scale with the least summed squared error; the compiled forms
must sum in numpy's own (pairwise) order so the same candidate wins: equality is exact, no tolerance.
"""
import numpy as np
import pytest

from qgraph import ops
from qgraph import weight_search as ws
from qgraph.qparams import scale_zero_point

STEPS = np.linspace(1.0, 2.0, 21)


@pytest.mark.parametrize("n", [1, 7, 8, 100, 128, 129, 1000, 10007, 300001])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_sum_is_numpys_sum_bit_for_bit(n, dtype):
    x = (np.random.default_rng(n).standard_normal((3, n)) ** 2).astype(dtype)
    sums = x.sum(axis=1)
    assert all(ws.pairwise_sum(x[i], 0, n) == sums[i] for i in range(3))


@pytest.mark.parametrize("shape", [(4, 1000), (1, 300001), (16, 27), (3, 5), (2, 129)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_errors_equal_the_numpy_form(shape, symmetric):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0, 0] = 1.0                                          # an outlier: candidates clip it differently
    qmin, qmax = (-127, 127) if symmetric else (-128, 127)
    for a in np.linspace(0.3, 1.0, 7):
        s, z = scale_zero_point(w.min(axis=1) * a, w.max(axis=1) * a, qmin, qmax, symmetric, zp_dtype=np.int64)
        got = ws.mse_errors(w, s, z, qmin, qmax)
        want = ws.mse_errors_reference(w, s.astype(np.float32), z.astype(np.float32), qmin, qmax)
        assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)


def test_mse_errors_of_many_candidates_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((3, 1000)) * 0.05).astype(np.float32)
    scales = np.stack([np.abs(w).max(axis=1) * a / 127 for a in np.linspace(0.3, 1.0, 9)]).astype(np.float32)
    zps = np.zeros_like(scales)
    many = ws.mse_errors(w, scales, zps, -127, 127)
    assert many.shape == (9, 3)
    for i in range(9):
        assert np.array_equal(many[i], ws.mse_errors_reference(w, scales[i], zps[i], -127, 127))


@pytest.mark.parametrize("shape", [(8, 1000), (5, 27), (3, 1), (2, 2), (4, 129)])
def test_pair_fit_errors_equal_the_numpy_form(shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape).astype(np.float32)
    row_scale = np.abs(w).max(axis=1) / 127 * 0.6          # codes up to ~212 before the clip: pairs to fit
    got = ws.pair_fit_errors(w, row_scale, STEPS, -127, 127, 127)
    assert np.array_equal(got, ws.pair_fit_errors_reference(w, row_scale, STEPS, -127, 127, 127))
    t = w / row_scale[:, None]
    over = ops.pair_excess(np.clip(np.rint(t), -127, 127)).max() > 0
    assert ws.pairs_over(w, row_scale, -127, 127) == over


@pytest.mark.parametrize("op,shape,trans_b", [("Conv", (8, 3, 3, 3), 0), ("Gemm", (40, 64), 1),
                                              ("Gemm", (64, 40), 0), ("MatMul", (2, 64, 40), 0),
                                              ("Conv", (4, 5, 3), 0)])
def test_fit_pairs_equals_ops_fit_pairs_and_leaves_its_input(op, shape, trans_b):
    t = np.random.default_rng(3).standard_normal(shape) * 255
    q = np.clip(np.rint(t), -127, 127).astype(np.int8)
    before = q.copy()
    got, moved = ws.fit_pairs(q, t, op, trans_b, -127, 127)
    want, n = ops.fit_pairs(q, t, op, trans_b, -127, 127)
    assert moved == n > 0 and got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(q, before)


class _Node:
    def __init__(self, op, attrs):
        self.op, self.attrs = op, attrs


@pytest.mark.parametrize("op,attrs,shape", [("Gemm", {"transB": 1}, (7, 5)), ("Gemm", {}, (7, 5)),
                                            ("MatMul", {}, (7, 5)), ("MatMul", {}, (7, 1)),
                                            ("Gemm", {"transB": 1}, (1, 5)), ("Conv", {"group": 2}, (4, 3, 3, 3))])
@pytest.mark.parametrize("side", ["out", "in"])
def test_channel_ranges_without_copies_equal_the_float64_form(op, attrs, shape, side):
    node = _Node(op, attrs)
    w = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = ops.channel_ranges(node, w, side)
    want = np.abs(ops.channel_matrix(node, w.astype(np.float64), side)).max(axis=1)
    assert got.dtype == np.float64 and np.array_equal(got, want)


@pytest.mark.parametrize("shape,factor_shape", [((300, 5000), (300, 1)), ((300, 5000), (1, 5000)),
                                                ((3, 4), (3, 1)), ((600, 3, 3, 3), (1, 3, 1, 1))])
def test_equalize_scaling_by_slabs_equals_the_whole_array_product(shape, factor_shape, monkeypatch):
    from qgraph.passes import equalize
    monkeypatch.setattr(equalize, "_CHUNK_ELEMENTS", 4096)      # many slabs, a short last one
    rng = np.random.default_rng(5)
    w = rng.standard_normal(shape).astype(np.float32)
    f = rng.uniform(0.3, 3.0, factor_shape)
    got = equalize._times(w, f)
    assert got.dtype == np.float32 and np.array_equal(got, (w.astype(np.float64) * f).astype(np.float32))
