"""qparams: range decisions on known distributions, and scale / zero-point edge cases.

The distributions are built so the right answer is known: a Gaussian with a few far outliers should
be clipped below its maximum by entropy, mse and percentile, never by minmax.
"""
import numpy as np
import pytest

from qgraph.calibrate import TensorStats
from qgraph.ops import dequantize, fake_quant, quantize
from qgraph.qparams import act_range, make_qparams, qrange, scale_zero_point, weight_qparams


def stats_of(*arrays, bins=2048) -> TensorStats:
    s = TensorStats(bins)
    for a in arrays:
        s.update(np.asarray(a, dtype=np.float32))
    return s


@pytest.fixture
def gaussian_with_outliers(rng):
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:20] = rng.uniform(20, 30, 20)          # 0.01 % far outliers on the positive side
    return x


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_clipping_methods_clip_outliers_far_below_max(gaussian_with_outliers, method):
    s = stats_of(gaussian_with_outliers)
    lo, hi = act_range(s, method, percentile=99.99)
    assert hi < 0.5 * s.max, f"{method} kept the outliers: hi={hi}, max={s.max}"
    assert hi > 2.5, f"{method} clipped the Gaussian body: hi={hi}"
    assert lo < -2.5


def test_mse_clips_below_max(gaussian_with_outliers):
    # 0.01 % outliers at 20..30 cost (x - hi)^2 each when clipped: mse trims only the sparse top
    s = stats_of(gaussian_with_outliers)
    lo, hi = act_range(s, "mse")
    assert 2.5 < hi < 0.95 * s.max and lo < -2.5


def test_minmax_keeps_the_full_range(gaussian_with_outliers):
    s = stats_of(gaussian_with_outliers)
    lo, hi = act_range(s, "minmax")
    assert (lo, hi) == (s.min, s.max)


def test_entropy_on_one_sided_relu_output(rng):
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    x[:5] = 40.0
    lo, hi = act_range(stats_of(x), "entropy")
    assert lo == 0.0 and 2.0 < hi < 20.0


def test_mse_range_lowers_expected_error_versus_minmax(gaussian_with_outliers):
    x = gaussian_with_outliers
    s = stats_of(x)
    errs = {}
    for method in ("minmax", "mse"):
        lo, hi = act_range(s, method)
        qp = make_qparams(lo, hi, bits=8, storage="int8", symmetric=False)
        errs[method] = float(np.mean((fake_quant(x, qp) - x) ** 2))
    assert errs["mse"] < 0.95 * errs["minmax"]


def test_all_zero_tensor_gets_unit_scale():
    qp = make_qparams(0.0, 0.0, bits=8, storage="int8", symmetric=False)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 0
    x = np.zeros(10, np.float32)
    assert np.array_equal(fake_quant(x, qp), x)


def test_all_zero_stats_decide_zero_range():
    s = stats_of(np.zeros(100))
    for method in ("minmax", "percentile", "mse", "entropy"):
        assert act_range(s, method) == (0.0, 0.0)


def test_constant_tensor_is_exact():
    # range widened to [0, 5]: 5 is qmax exactly
    x = np.full(7, 5.0, np.float32)
    s = stats_of(x)
    for method in ("minmax", "percentile", "mse", "entropy"):
        lo, hi = act_range(s, method)
        qp = make_qparams(lo, hi, bits=8, storage="int8", symmetric=False)
        np.testing.assert_allclose(fake_quant(x, qp), x, rtol=1e-6)


def test_negative_only_tensor_maps_zero_to_qmax():
    qp = make_qparams(-4.0, -1.0, bits=8, storage="int8", symmetric=False)
    assert int(qp.zero_point) == 127                  # 0 is the top of the range
    x = np.array([-4.0, -1.0, 0.0], np.float32)
    np.testing.assert_allclose(fake_quant(x, qp), x, atol=float(qp.scale) / 2)


def test_uint8_and_int8_asymmetric_give_the_same_grid():
    s8, z8 = scale_zero_point(-1.0, 3.0, -128, 127, False, np.int8)
    su, zu = scale_zero_point(-1.0, 3.0, 0, 255, False, np.uint8)
    assert s8 == su
    assert int(zu) - int(z8) == 128


def test_symmetric_int8_is_narrow_with_zero_point_zero():
    qp = make_qparams(-2.0, 1.0, bits=8, storage="int8", symmetric=True)
    assert (qp.qmin, qp.qmax) == (-127, 127) and int(qp.zero_point) == 0
    assert float(qp.scale) == pytest.approx(2.0 / 127)


def test_four_bit_range_is_narrow_and_stored_in_int8(rng):
    assert qrange(4, True, True) == (-7, 7)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    qp = weight_qparams(w, bits=4, storage="int8", axis=0)
    q = quantize(w, qp)
    assert q.min() >= -7 and q.max() <= 7 and q.min() == -7 or q.max() == 7
    assert qp.np_dtype == np.int8


def test_per_channel_weight_scales_follow_each_row(rng):
    w = rng.standard_normal((4, 32)).astype(np.float32) * np.array([[0.01], [1], [10], [100]], np.float32)
    qp = weight_qparams(w, bits=8, storage="int8", axis=0)
    np.testing.assert_allclose(qp.scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(dequantize(quantize(w, qp), qp) - w).max(axis=1)
    assert np.all(err <= qp.scale / 2 + 1e-7)


def test_weight_mse_clips_an_outlier_weight(rng):
    w = rng.standard_normal(4096).astype(np.float32)
    w[0] = 40.0
    mm = weight_qparams(w, bits=4, storage="int8", method="minmax")
    ms = weight_qparams(w, bits=4, storage="int8", method="mse")
    assert float(ms.scale) < float(mm.scale)
    assert np.sum((fake_quant(w, ms) - w) ** 2) < np.sum((fake_quant(w, mm) - w) ** 2)


def test_sixteen_bit_activation_range():
    qp = make_qparams(-1.0, 1.0, bits=16, storage="int16", symmetric=False)
    assert (qp.qmin, qp.qmax) == (-32768, 32767)
    assert float(qp.scale) == pytest.approx(2.0 / 65535)
