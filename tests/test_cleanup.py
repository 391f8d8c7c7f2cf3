"""cleanup: no-op removal, dead code, constant folding (Q/DQ kept), initializer dedup."""
import numpy as np
import onnx
from onnx import helper

from builders import init, make_model, ops, rel_err, run_ort
from qgraph import ir
from qgraph.passes.cleanup import Cleanup
from qgraph.pipeline import Context


def clean(model):
    g = ir.load(model)
    result = Cleanup().run(g, Context())
    out = ir.to_model(g)
    onnx.checker.check_model(out)
    return out, result.notes


def test_removes_identity_dropout_and_dead_nodes(rng):
    #   x ─Identity─ a ─Dropout─ b ─Relu─ y
    #                └─Sigmoid─ (unused)
    model = make_model([helper.make_node("Identity", ["x"], ["a"], name="id"),
                        helper.make_node("Dropout", ["a"], ["b"], name="drop"),
                        helper.make_node("Sigmoid", ["a"], ["dead"], name="dead"),
                        helper.make_node("Relu", ["b"], ["y"], name="relu")],
                       [("x", [2, 3])], [("y", [2, 3])])
    out, notes = clean(model)
    assert ops(out) == ["Relu"]
    assert notes["noops"] == 2 and notes["removed_nodes"] == 3
    x = rng.normal(size=(2, 3)).astype(np.float32)
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(out, {"x": x})[0]) == 0.0


def test_keeps_dropout_whose_mask_is_used():
    model = make_model([helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop")],
                       [("x", [2, 3])],
                       [("y", [2, 3]), helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [2, 3])])
    out, _ = clean(model)
    assert ops(out) == ["Dropout"]


def test_folds_constant_subgraph_but_keeps_dequantize(rng):
    #   w ─Transpose─ wt ─┐
    #   x ────────────────MatMul─ m ─Add(DQ(q8, s))─ y     Transpose of a constant folds; DQ stays
    w = rng.normal(size=(4, 3)).astype(np.float32)
    q = np.array([1, -2, 3, 4], dtype=np.int8)
    model = make_model([helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "wt"], ["m"], name="mm"),
                        helper.make_node("DequantizeLinear", ["q", "s"], ["bias"], name="dq"),
                        helper.make_node("Add", ["m", "bias"], ["y"], name="add")],
                       [("x", [2, 3])], [("y", [2, 4])],
                       [init("w", w), init("q", q), init("s", np.float32(0.5))])
    out, notes = clean(model)
    assert ops(out) == ["MatMul", "DequantizeLinear", "Add"]
    assert notes["folded_nodes"] == 1
    x = rng.normal(size=(2, 3)).astype(np.float32)
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(out, {"x": x})[0]) == 0.0


def test_merges_identical_initializers(rng):
    #   x ─Add(c1)─ a ─Add(c2)─ y    with c1 == c2 bytewise: one initializer remains
    c = rng.normal(size=(3,)).astype(np.float32)
    model = make_model([helper.make_node("Add", ["x", "c1"], ["a"], name="a1"),
                        helper.make_node("Add", ["a", "c2"], ["y"], name="a2")],
                       [("x", [2, 3])], [("y", [2, 3])], [init("c1", c), init("c2", c.copy())])
    out, notes = clean(model)
    assert notes["merged_initializers"] == 1
    assert len(out.graph.initializer) == 1


def test_does_not_merge_equal_values_of_different_dtype():
    model = make_model([helper.make_node("Cast", ["i"], ["f"], name="cast", to=1),
                        helper.make_node("Add", ["x", "c"], ["a"], name="a1"),
                        helper.make_node("Add", ["a", "f"], ["y"], name="a2")],
                       [("x", [3])], [("y", [3])],
                       [init("c", np.zeros(3, np.float32)), init("i", np.zeros(3, np.int32))])
    g = ir.load(model)
    notes = Cleanup(fold_constants=False).run(g, Context()).notes
    assert notes["merged_initializers"] == 0


def test_does_not_merge_a_scalar_with_a_one_element_vector():
    #   a scalar (shape ()) and a (1,) constant hold the same bytes; merging them changes shapes
    #   (a (1,) scale reads as per-axis to DequantizeLinear)
    model = make_model([helper.make_node("Add", ["x", "s"], ["a"], name="a1"),
                        helper.make_node("Add", ["a", "v"], ["y"], name="a2")],
                       [("x", [3])], [("y", [3])],
                       [init("s", np.float32(2.0)), init("v", np.array([2.0], np.float32))])
    g = ir.load(model)
    notes = Cleanup(fold_constants=False).run(g, Context()).notes
    assert notes["merged_initializers"] == 0
