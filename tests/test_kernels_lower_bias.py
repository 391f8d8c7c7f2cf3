"""A QDQ Conv / Gemm whose int32 bias is dequantized with a scale other than s_x * s_w (fuzz case 1501:
a bit flip gave one channel 3e-9): the lowering does what ONNX Runtime 1.32 does with it, bit for bit.

ORT's QDQ Conv selector fuses into QLinearConv (reading the raw int32 as if its scale were s_x s_w) only
when |s_b - s_x s_w| <= 1e-6 + 1e-2 |s_x s_w| in every channel (``lower.BIAS_RTOL`` / ``BIAS_ATOL``,
found by bisection); otherwise the Conv runs in float with DQ's bias. QGemm fuses whatever the bias
scale. The tests hold the lowering's float-unit decision equal to ORT's optimized graph and the float
mode's outputs equal to ORT's (tolerance 0 LSB: both paths are reproduced bit for bit)."""
from __future__ import annotations

import importlib
import platform

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import ir
from qgraph.kernels.diff import against_ort, ort_optimized

lw = importlib.import_module("qgraph.kernels.lower")      # the module (``qgraph.kernels.lower`` is also a function)
pytestmark = pytest.mark.skipif(platform.machine().lower() not in lw.X86,
                                reason="the float-unit rules model ORT's x86 CPU provider")


def _model(op: str, ratio: float, channel: int = 1, seed: int = 0, sx: float = 0.02, trans_b: int = 1):
    """x -> Q -> DQ -> op(DQ(int8 w), DQ(int32 b, s_b)) -> Q -> DQ; s_b = s_x s_w except ``channel``: x ratio."""
    rng = np.random.default_rng(seed)
    cin, cout = 8, 6
    if op == "Conv":
        w, shape, ax = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8), [2, cin, 7, 7], 0
        out = [2, cout, 7, 7]
    else:
        w = rng.integers(-127, 128, (cout, cin) if trans_b else (cin, cout)).astype(np.int8)
        shape, ax, out = [5, cin], 0 if trans_b else 1, [5, cout]
    sw = (rng.uniform(0.5, 1.5, cout) * 0.01).astype(np.float32)
    sb = (np.float32(sx) * sw).astype(np.float32)
    sb[channel] = np.float32(float(sb[channel]) * ratio)
    consts = {"sx": np.float32(sx), "zx": np.int8(0), "w": w, "sw": sw, "zw": np.zeros(cout, np.int8),
              "b": rng.integers(-4000, 4000, cout).astype(np.int32), "sb": sb, "zb": np.zeros(cout, np.int32),
              "sy": np.float32(0.05), "zy": np.int8(0)}
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {"transB": trans_b}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=ax),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
             helper.make_node(op, ["xd", "wd", "bd"], ["h"], **attrs),
             helper.make_node("QuantizeLinear", ["h", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "bias_scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    x = (np.random.default_rng(seed + 1).standard_normal(shape) * 1.5).astype(np.float32)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), x


def _ort_fused(model, op: str) -> bool:
    ops = {n.op_type for n in ort_optimized(model).graph.node}
    return {"Conv": "QLinearConv", "Gemm": "QGemm"}[op] in ops


@pytest.mark.parametrize("op,ratio,fused", [
    ("Conv", 1.0, True), ("Conv", 1.005, True), ("Conv", 0.992, True),      # within 1e-6 + 1% of s_x s_w
    ("Conv", 1.05, False), ("Conv", 0.5, False), ("Conv", 0.0, False),
    ("Conv", 1.5e-5, False),                                                  # fuzz case 1501's channel
    ("Gemm", 1.0, True), ("Gemm", 2.0, True), ("Gemm", 0.0, True), ("Gemm", 1.5e-5, True)])
def test_bias_scale_decides_like_ort_and_runs_bit_exact(op, ratio, fused):
    model, x = _model(op, ratio)
    assert _ort_fused(model, op) == fused                  # what ORT 1.32 does (the claim's premise)
    g = ir.load(model)
    assert (not lw.ort_float_units(g, "x86")) == fused
    figures, _, _ = against_ort(model, {"x": x})
    assert figures["y"]["max_lsb"] == 0 and figures["y"]["exact"] == 1.0, figures["y"]


def test_gemm_without_transposed_weight_fuses_whatever_the_bias_scale():
    model, x = _model("Gemm", 3e-4, trans_b=0)
    assert _ort_fused(model, "Gemm")
    figures, _, _ = against_ort(model, {"x": x})
    assert figures["y"]["max_lsb"] == 0, figures["y"]


def test_the_boundary_is_one_percent_plus_1e_6():
    #   s_x = 1e-4: s_x s_w ~ 1e-6, so the absolute term dominates: a scale 1.7x off still fuses, 3x does not
    for ratio, fused in ((1.7, True), (3.0, False)):
        model, _ = _model("Conv", ratio, sx=1e-4)
        assert _ort_fused(model, "Conv") == fused
        assert (not lw.ort_float_units(ir.load(model), "x86")) == fused


def test_a_gemm_reading_16_bit_activations_runs_as_ort_float_gemm():
    #   ORT runs it as DQ -> float Gemm -> Q (its QDQ selectors are 8-bit only); qgraph-run's QGemm
    #   step takes ORT's float Gemm unit (it raised a ValueError from its int8 packing before)
    model, x = _model("Gemm", 1.0)
    for init in model.graph.initializer:
        if init.name in ("zx", "zy"):
            init.CopyFrom(numpy_helper.from_array(np.int16(0), init.name))
    assert lw.ort_float_units(ir.load(model), "x86")
    figures, _, _ = against_ort(model, {"x": x})
    assert figures["y"]["max_lsb"] == 0 and figures["y"]["exact"] == 1.0, figures["y"]
