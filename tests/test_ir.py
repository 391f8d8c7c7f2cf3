"""qgraph.ir: loading what real models look like, refusing what cannot be worked on, saving safely."""
import os

import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from builders import init, make_model, ops, rel_err, run_ort
from qgraph import ir
from qgraph.errors import ModelError


def small_conv(rng, opset=17):
    #   x ─Conv(w, b)─ y
    inits = [init("w", rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(size=(8,)).astype(np.float32))]
    return make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                      [("x", [1, 3, 8, 8])], [("y", [1, 8, 6, 6])], inits, opset=opset)


def test_load_materializes_constant_and_constant_of_shape_weights(rng):
    #   shape ─ConstantOfShape(0.5)─ w ─┐
    #   x ──────────────────────────────Conv─ y       Constant node ─ b ─┘
    shape = init("shape", np.array([4, 3, 1, 1], dtype=np.int64))
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], name="cos",
                              value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Constant", [], ["b"], name="const",
                              value=onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32))),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])], [shape])
    g = ir.load(model)
    conv = next(n for n in g.nodes if n.op == "Conv")
    assert np.array_equal(ir.const(conv.inputs[1]), np.full((4, 3, 1, 1), 0.5, np.float32))
    assert np.array_equal(ir.const(conv.inputs[2]), np.arange(4, dtype=np.float32))
    out = ir.to_model(g)
    assert ops(out) == ["Conv"]
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(out, {"x": x})[0]) == 0.0


def test_load_external_data(tmp_path, rng):
    model = small_conv(rng)
    path = tmp_path / "ext.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # save_model moves the data out of the proto it is given
    onnx.save_model(on_disk, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    g = ir.load(path)
    conv = g.nodes[0]
    assert ir.const(conv.inputs[1]).shape == (8, 3, 3, 3)
    result, _ = qgraph.optimize(path, "cleanup")
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(result, {"x": x})[0]) == 0.0


def test_load_missing_external_data_is_a_model_error(tmp_path, rng):
    path = tmp_path / "ext.onnx"
    onnx.save_model(small_conv(rng), str(path), save_as_external_data=True, location="gone.data",
                    size_threshold=0)
    os.unlink(tmp_path / "gone.data")
    with pytest.raises(ModelError, match="external data"):
        ir.load(path)


def test_old_opset_is_upgraded(rng):
    model = small_conv(rng, opset=9)
    g = ir.load(model)
    assert ir.opset_of(ir.to_model(g)) == ir.MIN_OPSET


def test_old_opset_that_cannot_be_upgraded_is_refused_with_the_reason(rng, monkeypatch):
    # the converter's own failure (here forced: every model onnx 1.x ships for its tests upgrades)
    from onnx import version_converter

    def refuse(model, target):
        raise RuntimeError("convert_graph: no adapter for Foo from opset 9 to 10\nmore detail")
    monkeypatch.setattr(version_converter, "convert_version", refuse)
    with pytest.raises(ModelError) as info:
        ir.load(small_conv(rng, opset=9))
    msg = str(info.value)
    assert "opset 9" in msg and "upgrade failed" in msg and "no adapter for Foo" in msg
    assert "\n" not in msg


def test_save_refuses_the_input_path(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(small_conv(rng), str(path))
    before = path.read_bytes()
    g = ir.load(path)
    with pytest.raises(ModelError, match="over the input"):
        ir.save(g, path)
    assert path.read_bytes() == before


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, rng):
    g = ir.load(small_conv(rng))
    n = ir.save(g, tmp_path / "out.onnx")
    assert n == (tmp_path / "out.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_to_missing_directory_is_a_model_error(tmp_path, rng):
    with pytest.raises(ModelError, match="does not exist"):
        ir.save(ir.load(small_conv(rng)), tmp_path / "no" / "out.onnx")


def test_save_large_model_uses_external_data(tmp_path, rng, monkeypatch):
    # the 2 GB limit is lowered so the test stays small; the code path is the same
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 100)
    model = small_conv(rng)
    ir.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    assert rel_err(run_ort(model, {"x": x})[0], sess.run(None, {"x": x})[0]) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_replace_uses_keeps_graph_output_name(rng):
    #   x ─Relu─ r ─Identity─ y      bypassing the Identity: Relu's output takes the name y
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                        helper.make_node("Identity", ["r"], ["y"], name="id")],
                       [("x", [2, 3])], [("y", [2, 3])])
    g = ir.load(model)
    ident = next(n for n in g.nodes if n.op == "Identity")
    ir.bypass(g, ident)
    g.cleanup()
    out = ir.to_model(g)
    assert ops(out) == ["Relu"] and out.graph.output[0].name == "y"


def test_replace_uses_with_graph_input_inserts_identity():
    #   x ─Identity─ y      removing it would make the output the input itself: keep the name with Identity
    model = make_model([helper.make_node("Identity", ["x"], ["y"], name="id")], [("x", [2])], [("y", [2])])
    g = ir.load(model)
    ir.bypass(g, g.nodes[0])
    g.cleanup()
    out = ir.to_model(g)
    assert out.graph.output[0].name == "y" and ops(out) == ["Identity"]
    onnx.checker.check_model(out)


def test_fresh_name_never_collides(rng):
    g = ir.load(small_conv(rng))
    names = {ir.fresh_name(g, "w") for _ in range(5)}
    assert len(names) == 5 and "w" not in names and "x" not in names


def test_splice_inserts_node_after_tensor(rng):
    g = ir.load(small_conv(rng))
    y = g.outputs[0]
    ir.splice(g, y, "Relu")
    out = ir.to_model(g)
    assert ops(out) == ["Conv", "Relu"] and out.graph.output[0].name == "y"
