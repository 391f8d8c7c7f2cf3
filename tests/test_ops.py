"""The shared vocabulary (qgraph.ops): one definition of each fact, and the compiled kernels equal to it."""
from types import SimpleNamespace

import numpy as np
import pytest
from builders import init, make_model
from onnx import helper

from qgraph import ir
from qgraph.kernels.requant import quantize_linear, requantize_into
from qgraph.ops import (INT_RANGES, ConvGeometry, QParams, channel_index, channel_matrix, channel_ranges, clip_bounds,
                        conv_geometry, dequantize, fixed_multiplier, in_channels, input_at, out_channels, quantize,
                        requantize, rescale, storage_bits, weight_times_input)


def layer(op, **attrs):
    return SimpleNamespace(op=op, attrs=attrs)


LAYOUTS = [(layer("Conv", group=1), (6, 4, 3, 3)), (layer("Conv", group=3), (6, 2, 3, 3)),
           (layer("ConvTranspose", group=1), (6, 4, 3, 3)), (layer("ConvTranspose", group=3), (6, 2, 3, 3)),
           (layer("Gemm", transB=1), (5, 7)), (layer("Gemm", transB=0), (7, 5)), (layer("MatMul"), (7, 5))]


@pytest.mark.parametrize("node,shape", LAYOUTS, ids=[f"{n.op}{n.attrs}" for n, _ in LAYOUTS])
def test_channel_matrix_rows_hold_exactly_the_entries_channel_index_maps_there(node, shape):
    w = np.random.default_rng(0).normal(size=shape)
    for side in ("out", "in"):
        idx = np.broadcast_to(channel_index(node, shape, side), shape)
        m = channel_matrix(node, w, side)
        assert m.shape[0] == idx.max() + 1
        for c in range(m.shape[0]):
            np.testing.assert_array_equal(np.sort(m[c]), np.sort(w[idx == c]))


@pytest.mark.parametrize("node,shape", LAYOUTS, ids=[f"{n.op}{n.attrs}" for n, _ in LAYOUTS])
def test_weight_times_input_is_the_sum_over_each_output_channels_entries(node, shape):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape)
    c = rng.normal(size=channel_matrix(node, w, "in").shape[0])
    want = np.zeros(channel_matrix(node, w, "out").shape[0])
    out_i = np.broadcast_to(channel_index(node, shape, "out"), shape)
    in_i = np.broadcast_to(channel_index(node, shape, "in"), shape)
    np.add.at(want, out_i.ravel(), (w * c[in_i]).ravel())
    np.testing.assert_allclose(weight_times_input(node, w, c), want, rtol=1e-12)
    np.testing.assert_array_equal(channel_ranges(node, w, "in"), np.abs(channel_matrix(node, w, "in")).max(axis=1))


def test_grouped_conv_reads_its_groups_input_channels():
    # Conv group=2, W[4, 2]: outputs 0, 1 read inputs 0, 1; outputs 2, 3 read inputs 2, 3
    idx = np.broadcast_to(channel_index(layer("Conv", group=2), (4, 2, 1, 1), "in"), (4, 2, 1, 1))[:, :, 0, 0]
    np.testing.assert_array_equal(idx, [[0, 1], [0, 1], [2, 3], [2, 3]])


def test_channels_of_each_layer_kind():
    assert out_channels(layer("ConvTranspose", group=3), (6, 2, 3, 3)) == 6
    assert in_channels(layer("Conv", group=3), (6, 2, 3, 3)) == 6
    assert out_channels(layer("Gemm", transB=1), (5, 7)) == 5 and in_channels(layer("Gemm", transB=1), (5, 7)) == 7
    assert out_channels(layer("MatMul"), (7, 5)) == 5


def clip_graph(*inputs, **attrs):
    return ir.load(make_model([helper.make_node("Clip", ["x", *inputs], ["y"], name="clip", **attrs)], [("x", [2])],
                              [("y", [2])], [init(n, np.float32(v)) for n, v in (("lo", 0.0), ("hi", 6.0))]),
                   infer_shapes=False)


def test_clip_bounds_reads_inputs_missing_ones_and_relu():
    g = clip_graph("lo", "hi")
    assert clip_bounds(g.nodes[0]) == (0.0, 6.0)
    g = clip_graph("", "hi")
    assert clip_bounds(g.nodes[0]) == (-np.inf, 6.0) and input_at(g.nodes[0], 1) is None
    assert clip_bounds(SimpleNamespace(op="Relu", attrs={}, inputs=[])) == (0.0, np.inf)


def test_clip_bounds_of_a_variable_bound_is_none():
    g = ir.load(make_model([helper.make_node("Clip", ["x", "lo"], ["y"], name="clip")], [("x", [2]), ("lo", [])],
                           [("y", [2])]), infer_shapes=False)
    assert clip_bounds(g.nodes[0]) is None


def test_one_range_table_gives_the_bits():
    assert [storage_bits(s) for s in ("int4", "uint8", "int16", "int32")] == [4, 8, 16, 32]
    assert INT_RANGES["uint4"] == (0, 15)


def test_conv_geometry_same_upper_pads_like_onnx():
    geo = conv_geometry({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (8, 3, 3, 3), (7, 7))
    assert geo == ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1) and geo.out_hw(7, 7) == (4, 4)


# ----------------------------------------------------------------------------- arithmetic: compiled == plain

def test_numba_requantize_equals_the_plain_definition_in_both_modes():
    rng = np.random.default_rng(7)
    acc = rng.integers(-2**24, 2**24, size=(2, 5, 33)).astype(np.int32)
    scale = rng.uniform(1e-5, 1e-2, 5).astype(np.float32)
    for mode in ("float", "fixed"):
        got = requantize_into(acc, scale, -3, -128, 127, mode, np.int8)
        np.testing.assert_array_equal(got, requantize(acc, scale, -3, -128, 127, mode), err_msg=mode)


def test_rescale_fixed_is_within_one_of_float_and_exact_on_powers_of_two():
    v = np.arange(-1000, 1000, dtype=np.int64)
    assert np.max(np.abs(rescale(v, 0.37, "fixed") - rescale(v, 0.37, "float"))) <= 1
    np.testing.assert_array_equal(rescale(v * 4, 0.25, "fixed"), v)
    m, n = fixed_multiplier([0.37])
    assert 2**30 <= m[0] < 2**31 and abs(m[0] * 2.0 ** -n[0] - 0.37) < 1e-9


def test_numba_quantize_linear_equals_ops_quantize():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=1000) * 3).astype(np.float32)
    x[:4] = [0.5, 1.5, -0.5, 2.5]            # ties round to even
    qp = QParams(scale=np.float32(1.0), zero_point=np.int8(0), qmin=-128, qmax=127)
    np.testing.assert_array_equal(quantize_linear(x, np.float32(1.0), np.int8(0), -128, 127), quantize(x, qp))
    qp = QParams(scale=np.float32(0.02), zero_point=np.uint8(100), storage="uint8", qmin=0, qmax=255)
    q = quantize(x, qp)
    np.testing.assert_array_equal(quantize_linear(x, np.float32(0.02), np.uint8(100), 0, 255), q)
    np.testing.assert_allclose(dequantize(q, qp), (q - 100) * np.float32(0.02), rtol=0, atol=1e-6)
