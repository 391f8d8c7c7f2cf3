"""ONNX Runtime's float32 reductions in its summation order (``kernels/ortreduce.py``), against ORT.

Tolerance 0 throughout: the point is ORT's bits (Eigen's SSE 4-lane redux for a contiguous axis,
MLAS's M = 1 SGEMM for a middle axis, row-by-row adds for a leading one, the sequential loop for
SumSquare / L2 and mixed axes). numpy's pairwise ``sum`` differs in the last ulp on most rows,
which is what kept MiniLM's float embedding at 27.9% bit-exact (issue 19).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qgraph.kernels import lower, run
from qgraph.kernels.ortreduce import OPS, eigen_sum, reduce, reduce_reference

LAYOUTS = [
    ((16, 384), [1]),          # KR: MiniLM's ReduceL2 / a LayerNorm's ReduceMean over the last axis
    ((5, 37), [1]),            # KR with rows that start off a 16-byte boundary (37 floats per row)
    ((3, 2), [1]),             # KR shorter than a packet: sequential from x[0]
    ((16, 18, 48), [1]),       # KRK: MiniLM's mean pooling over the tokens
    ((4, 130, 3), [-2]),       # KRK over more than one group of four, negative axis
    ((7, 13), [0]),            # RK: row 0, then + row i
    ((2, 3, 4, 5), [0, 1]),    # RK after merging the leading axes
    ((2, 3, 4, 5), [0, 2]),    # mixed axes: the generic loop, row-major over the reduced axes
    ((3, 50), [0, 1]),         # every axis: Eigen over the whole tensor
    ((2, 3, 1, 9), [2]),       # a reduced axis of size 1 merges with its neighbours
]


def _session(op, shape, axes, keepdims):
    axes_init = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
    graph = helper.make_graph([helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)], "r",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [axes_init])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,axes", LAYOUTS)
def test_reductions_equal_ort_bit_for_bit(op, shape, axes):
    rng = np.random.default_rng(len(shape) * 100 + sum(shape) + OPS.index(op))
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
    for keepdims in (0, 1):
        ref = _session(op, shape, axes, keepdims).run(None, {"x": x})[0]
        ours = reduce(op, x, axes, bool(keepdims))
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref, err_msg=f"{op} {shape} axes={axes} keepdims={keepdims}")
        np.testing.assert_array_equal(reduce_reference(op, x, axes, bool(keepdims)), ours)


def test_eigen_head_and_tail_follow_the_alignment():
    # the elements before the first 16-byte boundary are added after the packets, not before
    x = np.array([1e8, 1, 1, 1, 1, -1e8, 3, 0.5, 0.25, 0.125], np.float32)
    assert eigen_sum(x, 0) != eigen_sum(x, 1) or eigen_sum(x, 0) != eigen_sum(x, 3)
    assert eigen_sum(x[:3], 0) == np.float32(np.float32(x[0] + x[1]) + x[2])     # shorter than a packet


def test_mean_pooling_and_l2_normalization_after_dequantize_match_ort():
    #   x ─Q─DQ─ReduceSum(axis 1: tokens)─Div(count)─┬─────────────────────Div─ y   (MiniLM's tail)
    #                                                └─ReduceL2(axis 1)─Clip─┘
    # the float output after the last DequantizeLinear: ORT's reduction orders, bit for bit
    rng = np.random.default_rng(19)
    n, t, c = 4, 18, 40
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("z", TensorProto.INT8, [], [3]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1]), helper.make_tensor("cnt", TensorProto.FLOAT, [], [t]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("ReduceSum", ["d", "ax1"], ["sum"], keepdims=0),
             helper.make_node("Div", ["sum", "cnt"], ["mean"]),
             helper.make_node("ReduceL2", ["mean", "ax1"], ["norm"], keepdims=1),
             helper.make_node("Clip", ["norm", "eps"], ["normc"]),
             helper.make_node("Div", ["mean", "normc"], ["y"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, t, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = (rng.standard_normal((n, t, c)) * 2).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(lower(model), {"x": x})["y"], ref)
