"""ortsoftmax: ONNX Runtime 1.32's float Softmax (MLAS, AVX-512F order) reproduced bit for bit.

The numba kernel equals its numpy reference everywhere (tolerance 0: the same float32 operations), and
ORT's own Softmax on a CPU with AVX-512F (tolerance 0: that is the claim; elsewhere MLAS takes its FMA3
kernel with 8 lanes, which this does not model). Row lengths cover the 48-wide loop, the masked
16-wide tail and rows shorter than one vector; scales cover exp's underflow clamp."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qgraph.kernels import cpu
from qgraph.kernels.ortsoftmax import softmax, softmax_reference

avx512 = pytest.mark.skipif(not cpu.has("avx512f"), reason="MLAS's AVX-512F softmax kernel needs AVX-512F")
SHAPES = [(3, d) for d in (1, 2, 7, 15, 16, 17, 18, 33, 47, 48, 49, 64, 95, 96, 97, 100, 384)]


def _ort_softmax(x, axis, opset):
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], "softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.05, 3.0, 60.0])
def test_kernel_equals_its_numpy_reference(shape, scale):
    x = (np.random.default_rng(shape[1]).standard_normal(shape) * scale).astype(np.float32)
    np.testing.assert_array_equal(softmax(x), softmax_reference(x))


@avx512
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.05, 3.0, 60.0])
def test_equals_ort_softmax_bit_for_bit(shape, scale):
    x = (np.random.default_rng(100 + shape[1]).standard_normal(shape) * scale).astype(np.float32)
    np.testing.assert_array_equal(softmax(x), _ort_softmax(x, -1, 13))


@avx512
@pytest.mark.parametrize("axis,opset", [(-1, 13), (1, 13), (2, 13), (1, 11), (2, 11)])
def test_other_axes_and_opset_11_coercion_equal_ort(axis, opset):
    #   attention scores [N, heads, T, T]; opset < 13 flattens at the axis, 13 moves the axis last
    x = (np.random.default_rng(7).standard_normal((2, 12, 18, 18)) * 5).astype(np.float32)
    np.testing.assert_array_equal(softmax(x, axis, opset), _ort_softmax(x, axis, opset))


def test_rows_sum_to_one_and_a_large_gap_underflows_to_zero():
    x = np.array([[0.0, -200.0, 1.0, 1.0]], np.float32)
    y = softmax(x)
    assert y[0, 1] == 0.0 and y[0, 2] == y[0, 3]
    assert abs(float(y.sum()) - 1.0) < 1e-6
