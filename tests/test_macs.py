"""MACs with dynamic shapes: symbolic dims come from the calibration inputs when given, else the
MACs are unknown (None, printed '?'): never a product of placeholder dims, never a silent 0."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_SAMPLE, init, make_model
from onnx import helper

import qgraph
from qgraph.analysis import model_stats

DIGITS_MACS = 315_968      # the digits CNN at 1x1x8x8, per sample (README tour)


def symbolic_digits(batch="N", h="H", w="W", batch_value=None):
    """The digits CNN with its input's dims made symbolic (or -1, as Paddle exports write them)."""
    m = onnx.load(str(DIGITS))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip((dims[0], dims[2], dims[3]), (batch, h, w)):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v
    del m.graph.value_info[:]
    return m


def test_symbolic_batch_is_one_sample():
    assert model_stats(symbolic_digits(h=8, w=8)).macs == DIGITS_MACS


def test_symbolic_hw_without_inputs_is_unknown_not_partial():
    s = model_stats(symbolic_digits())
    assert s.macs is None
    assert s.unknown_macs                                  # every Conv is listed


def test_symbolic_hw_resolved_from_input_shapes():
    assert model_stats(symbolic_digits(), {"input": (16, 1, 8, 8)}).macs == DIGITS_MACS


def test_negative_dims_are_symbolic_not_negative():
    # Paddle writes -1 for a dynamic dim: taken as dim_value it made the product negative
    m = symbolic_digits()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    assert model_stats(m).macs is None
    assert model_stats(m, {"input": (2, 1, 8, 8)}).macs == DIGITS_MACS


def test_reshape_target_computed_through_cast_is_resolved():
    #   x[N, C=4, H, W] ─Shape─Cast(float)─Cast(int64)─Slice[0:1]─Concat(·, [-1])─┐
    #   x ───────────────────────────────────────────────────────────────Reshape─MatMul(W[4*H*W... ])
    # ONNX's data propagation stops at Cast; the MAC counter folds the shape subgraph itself.
    hw = 3 * 5
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Cast", ["sf"], ["si"], to=onnx.TensorProto.INT64),
             helper.make_node("Slice", ["si", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc")]
    inits = [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)),
             init("minus1", np.array([-1], np.int64)), init("w", np.zeros((4 * hw, 10), np.float32))]
    m = make_model(nodes, [("x", ["N", 4, "H", "W"])], [("y", ["N", 10])], inits)
    assert model_stats(m).macs is None
    assert model_stats(m, {"x": (7, 4, 3, 5)}).macs == 4 * hw * 10


def test_report_takes_shapes_from_calibration_and_prints_question_mark_without(tmp_path):
    model = symbolic_digits()
    with np.load(DIGITS_SAMPLE) as z:
        calib = {"input": z["input"][:4]}
    _, rep = qgraph.optimize(model, "fold", calib=calib, progress=False)
    assert [r["macs"] for r in rep.rows] == [DIGITS_MACS, DIGITS_MACS]
    assert rep.meta["mac_input_shapes"] == {"input": [1, 1, 8, 8]}
    _, rep = qgraph.optimize(model, "fold", progress=False)
    assert [r["macs"] for r in rep.rows] == [None, None]
    assert rep.to_dict()["passes"][0]["unknown_macs"]
    header, _, first = rep.format().splitlines()[:3]
    col = header.split().index("MACs")
    assert first.split()[col] == "?"


def _torch_static_padding_stem(n="N"):
    #   torch.onnx.export of EfficientNet's Conv2dStaticSamePadding: the Pad amounts are a constant
    #   computed by ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast
    pads_hw = np.array([0, 1, 0, 1], np.int64)          # (left, right, top, bottom) as F.pad takes them
    nodes = [helper.make_node("ConstantOfShape", ["four"], ["zeros"], value=helper.make_tensor("v", 7, [1], [0])),
             helper.make_node("Concat", ["hw", "zeros"], ["cat"], axis=0),
             helper.make_node("Reshape", ["cat", "rs1"], ["r1"]),
             helper.make_node("Slice", ["r1", "start", "end", "axis0", "step"], ["rev"]),
             helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
             helper.make_node("Reshape", ["tr", "rs2"], ["r2"]),
             helper.make_node("Cast", ["r2"], ["pads"], to=onnx.TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="stem", strides=[2, 2])]
    inits = [init("four", np.array([4], np.int64)), init("hw", pads_hw), init("rs1", np.array([-1, 2], np.int64)),
             init("start", np.array([-1], np.int64)), init("end", np.array([-(2**63)], np.int64)),
             init("axis0", np.array([0], np.int64)), init("step", np.array([-1], np.int64)),
             init("rs2", np.array([-1], np.int64)), init("w", np.zeros((8, 3, 3, 3), np.float32))]
    return make_model(nodes, [("x", [n, 3, 16, 16])], [("y", [n, 8, 8, 8])], inits)


def test_constant_pad_amounts_of_a_torch_export_are_folded():
    # efficientnet_lite0_raw's stem: MACs were '?' (Reshape and Transpose were not folded); the Pad
    # amounts are constants, so they are known with or without calibration inputs
    m = _torch_static_padding_stem()
    ref = onnx.reference.ReferenceEvaluator(m).run(None, {"x": np.zeros((1, 3, 16, 16), np.float32)})[0]
    assert ref.shape == (1, 8, 8, 8)
    assert model_stats(m).macs == 8 * 8 * 8 * 3 * 3 * 3


def test_shape_of_a_weight_is_folded_without_an_ort_run(monkeypatch):
    #   x[N, 3, 16, 16]          w[8, 3, 3, 3] (an initializer only, not a graph input)
    #   w ─Shape─Slice[2:4]─Sub(1)─Concat(0, 0, k-1, k-1 ...)─ pads ; x ─Pad(pads)─Conv(w)─ y
    # torch's static padding reads the kernel size from the weight's Shape; qgraph's export lists
    # initializers only as initializers, so their dims must feed the folder (else the report fell back
    # to an ORT run of the whole model per pass: +35 MB peak in fold,quant on EfficientNet-Lite0)
    import qgraph.analysis as analysis
    nodes = [helper.make_node("Shape", ["w"], ["ws"]),
             helper.make_node("Slice", ["ws", "two", "three"], ["k"]),
             helper.make_node("Sub", ["k", "one"], ["p"]),
             helper.make_node("Concat", ["zz", "p", "p", "zz", "p", "p"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv")]
    inits = [init("two", np.array([2], np.int64)), init("three", np.array([3], np.int64)),
             init("one", np.array([1], np.int64)), init("zz", np.zeros(2, np.int64)),
             init("w", np.zeros((8, 3, 3, 3), np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 16, 16])], [("y", ["N", 8, None, None])], inits)
    assert "w" not in [i.name for i in m.graph.input]
    monkeypatch.setattr(analysis, "ort_shapes", lambda *a: pytest.fail("ORT run for shapes folding knows"))
    x = np.zeros((1, 3, 16, 16), np.float32)             # pads 2 each side: 20 x 20, 18 x 18 out
    assert model_stats(m, {"x": x.shape}, {"x": x}).macs == 18 * 18 * 8 * 3 * 3 * 3


def _pad_from_an_unfolded_op():
    #   x[N, 3, H, W] ─Shape─Slice[2:3]─Cast(float)─Sqrt─Cast(int64)─ p ; pads = [0, 0, p, p, 0, 0, p, p]
    #   x ──Pad(pads)──Conv 3x3 (8 filters)── y
    # Sqrt is outside the static shape folder: only a run on a real input gives the Pad's output shape
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "two", "three"], ["h"]),
             helper.make_node("Cast", ["h"], ["hf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Sqrt", ["hf"], ["rf"]),
             helper.make_node("Cast", ["rf"], ["p"], to=onnx.TensorProto.INT64),
             helper.make_node("Concat", ["zz", "p", "p", "zz", "p", "p"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv")]
    inits = [init("two", np.array([2], np.int64)), init("three", np.array([3], np.int64)),
             init("zz", np.zeros(2, np.int64)), init("w", np.zeros((8, 3, 3, 3), np.float32))]
    return make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", ["N", 8, None, None])], inits)


def test_shapes_static_inference_cannot_derive_come_from_one_ort_run_on_the_calibration_sample():
    m = _pad_from_an_unfolded_op()
    x = np.zeros((4, 3, 16, 16), np.float32)             # p = sqrt(16) = 4: 24 x 24 padded, 22 x 22 out
    macs = 22 * 22 * 8 * 3 * 3 * 3
    assert model_stats(m).macs is None
    assert model_stats(m, {"x": x.shape}).macs is None    # the shapes alone do not get through Sqrt
    s = model_stats(m, {"x": x.shape}, {"x": x})
    assert s.macs == macs and not s.unknown_macs
    assert [o.name for o in m.graph.output] == ["y"]      # the extra outputs of the run are gone again
    _, rep = qgraph.optimize(m, "fold", calib={"x": x}, progress=False)
    assert [r["macs"] for r in rep.rows] == [macs, macs]
    _, rep = qgraph.optimize(m, "fold", progress=False)
    assert [r["macs"] for r in rep.rows] == [None, None]
