"""The float Gemm unit (ORT's Gemm<float> with MLAS's kernels) and the table of float units.

``lower.ort_float_units`` could mark a Gemm as a unit ONNX Runtime leaves in float, but the lowering
had no float Gemm: it ran as an integer QGemm, 1 LSB off ORT on requantization ties (issue 19). Now
a marked Gemm's QGemm step carries ``ort_float`` and ``float`` mode computes ORT's float32 Gemm in
its order (``ortfloat.gemm_float``): C broadcast first, MLAS's two M = 1 kernels, the general
k-blocked path with alpha / beta. Every check is bit for bit (tolerance 0: the same float32
operations in the same order). Skipped off x86, where ORT fuses and sums differently.
"""
from __future__ import annotations

import importlib
import itertools
import platform

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import ort_session_1t
from qgraph import ir
from qgraph.errors import ModelError
from qgraph.kernels import lower, run
from qgraph.kernels.diff import ort_float_nodes
from qgraph.kernels.lower import FLOAT_UNIT_STEPS, X86, ort_float_units
from qgraph.kernels.ortfloat import gemm_float

lower_mod = importlib.import_module("qgraph.kernels.lower")
x86 = pytest.mark.skipif(platform.machine().lower() not in X86, reason="ORT's fusion rules and kernels differ off x86")


def _model(nodes, inputs, outputs, consts, opset=19):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _float_gemm_vs_ort(m, k, n, ta, tb, alpha, beta, cshape, seed, gemm=gemm_float) -> int:
    """Bits that differ between ``gemm`` and ORT's float Gemm; A, B (and C) are graph inputs so ORT
    does not prepack B (a QDQ unit's B is DQ's output, never prepacked either)."""
    rng = np.random.default_rng(seed)
    ash, bsh = ((k, m) if ta else (m, k)), ((n, k) if tb else (k, n))
    feeds = {"a": rng.standard_normal(ash).astype(np.float32), "b": rng.standard_normal(bsh).astype(np.float32)}
    if cshape is not None:
        feeds["c"] = np.asarray(rng.standard_normal(cshape) * 3, np.float32)
    ins = [helper.make_tensor_value_info(k_, TensorProto.FLOAT, v.shape) for k_, v in feeds.items()]
    node = helper.make_node("Gemm", list(feeds), ["y"], transA=ta, transB=tb, alpha=alpha, beta=beta)
    ref = ort_session_1t(_model([node], ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], {}, 13)) \
        .run(None, feeds)[0]
    ours = gemm(feeds["a"], feeds["b"], feeds.get("c"), alpha, beta, bool(ta), bool(tb))
    return int((np.asarray(ours, np.float32).view(np.int32) != ref.view(np.int32)).sum())


@x86
def test_float_gemm_is_orts_gemm_bit_for_bit():
    # M = 1 (MlasSgemmKernelM1Avx, and with transB the 8-lane MlasSgemmKernelM1TransposeBAvx: a
    # classifier at batch 1), N = 1 (A and B swapped into those kernels), K > 128 with N < K (k-blocks
    # doubled unless A is transposed), alpha / beta (the general path), every C broadcast form
    shapes = [(1, 300, 37), (1, 2048, 1000), (1, 13, 7), (4, 700, 6), (3, 40, 1), (5, 300, 1), (7, 200, 50),
              (9, 1024, 100), (6, 5, 300), (2, 3, 1)]
    forms = [(1.0, 1.0, "n"), (1.0, 1.0, None), (0.5, 1.0, "n"), (1.0, 0.7, "mn"), (1.3, 0.0, "1n"),
             (1.0, 1.0, "m1"), (1.0, 1.0, "s")]
    checked = 0
    for (m, k, n), ta, tb in itertools.product(shapes, (0, 1), (0, 1)):
        for alpha, beta, cs in forms:
            cshape = {"n": (n,), "mn": (m, n), "1n": (1, n), "m1": (m, 1), "s": (), None: None}[cs]
            assert _float_gemm_vs_ort(m, k, n, ta, tb, alpha, beta, cshape, m * 1000 + k + n) == 0, \
                (m, k, n, ta, tb, alpha, beta, cs)
            checked += m * n
    assert checked > 100_000

    def numpy_gemm(a, b, c, alpha, beta, ta, tb):       # another summation order: the check can fail
        y = np.float32(alpha) * ((a.T if ta else a) @ (b.T if tb else b))
        return y if c is None else y + np.float32(beta) * c
    assert _float_gemm_vs_ort(1, 2048, 1000, 0, 1, 1.0, 1.0, (1000,), 5, numpy_gemm) > 0
    assert _float_gemm_vs_ort(9, 1024, 100, 0, 0, 1.0, 1.0, (100,), 5, numpy_gemm) > 0


def _gemm_unit(rng, m, k, n, form, ta=0, tb=1):
    #   x ─Q─DQ─┐  DQ(w int8) DQ(b int32)
    #           Gemm (transA, transB, alpha, beta) ─[Relu]─ Q ─DQ─ y       [+ DQ(x) as a graph output]
    # relu: Q's zero point -17 keeps the Relu (FusedGemm); shared: x's int8 Q has two readers;
    # alpha / beta: ORT's QDQ Gemm selector wants alpha 1 and, with a bias, beta 1. ORT runs each float.
    sx, sw = np.float32(0.05), np.float32(0.0123)
    sy = np.float32(sx * sw * 2)                   # y / sy = acc / 2: a requantization tie on every odd sum
    consts = {"sx": sx, "zx": np.int8(3), "sw": sw, "wz": np.int8(0),
              "w": rng.integers(-2, 3, (n, k) if tb else (k, n)).astype(np.int8),
              "b": rng.integers(-50, 50, n).astype(np.int32), "bs": np.float32(sx * sw), "bz": np.int32(0),
              "sy": sy * (4 if form in ("alpha", "beta") else 1), "zy": np.int8(-17 if form == "relu" else -5)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"], name="Qx"),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"], name="DQx"),
             helper.make_node("DequantizeLinear", ["w", "sw", "wz"], ["dw"], name="DQw"),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["db"], name="DQb"),
             helper.make_node("Gemm", ["dx", "dw", "db"], ["g"], name="Gemm", transA=ta, transB=tb,
                              alpha=0.75 if form == "alpha" else 1.0, beta=0.5 if form == "beta" else 1.0)]
    out = "g"
    if form == "relu":
        nodes.append(helper.make_node("Relu", ["g"], ["r"], name="Relu"))
        out = "r"
    nodes += [helper.make_node("QuantizeLinear", [out, "sy", "zy"], ["qy"], name="Qy"),
              helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"], name="DQy")]
    xs = [k, m] if ta else [m, k]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])]
    if form == "shared":
        outs.append(helper.make_tensor_value_info("dx", TensorProto.FLOAT, xs))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)], outs, consts)


@x86
@pytest.mark.parametrize("form", ["relu", "shared", "alpha", "beta"])
def test_float_gemm_units_match_ort_bit_for_bit(form):
    """Each situation that keeps a Gemm float in ORT: predicted as ORT's optimized graph says, and
    ``float`` mode equal to ORT on tie-rich data. The integer QGemm the lowering used to run (the
    float units ignored) is off on such ties: 63 of 300 outputs for (6, 200, 50) here."""
    int_off, distinct = 0, set()
    for (m, k, n, ta, tb) in [(1, 300, 37, 0, 1), (1, 64, 10, 0, 0), (6, 200, 50, 0, 1), (5, 40, 1, 0, 0),
                              (4, 300, 20, 1, 0)]:
        rng = np.random.default_rng(m * 100 + k + n)
        model = _gemm_unit(rng, m, k, n, form, ta, tb)
        g = ir.load(model)
        g.toposort()
        assert {u.name for u in ort_float_units(g, "x86")} == ort_float_nodes(model) == {"Gemm"}
        x = (rng.standard_normal((k, m) if ta else (m, k)) * 0.1).astype(np.float32)
        ref = ort_session_1t(model).run(None, {"x": x})[0]
        prog = lower(model)
        assert [s for s in prog.steps if s.op == "QGemm" and "ort_float" in s.attrs]
        ours = run(prog, {"x": x})["y"]
        distinct.update(np.unique(ref).tolist())
        np.testing.assert_array_equal(ours, ref, err_msg=str((m, k, n, ta, tb)))
        if form in ("relu", "shared"):                 # what ran before: the unit as an integer QGemm
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(lower_mod, "ort_float_units", lambda g, platform="auto": [])
                int_off += int((run(lower(model), {"x": x})["y"] != ref).sum())
        else:                                          # no integer form: refused by name, not approximated
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(lower_mod, "ort_float_units", lambda g, platform="auto": [])
                with pytest.raises(ModelError, match="Gemm with alpha"):
                    lower(model)
            with pytest.raises(ModelError, match="alpha|beta"):
                run(prog, {"x": x}, mode="fixed")
    assert len(distinct) > 10                          # not all clamped: the outputs say something
    assert form not in ("relu", "shared") or int_off > 0


@x86
def test_bias_free_gemm_with_alpha_is_orts_qgemm_and_refused_by_name():
    """Without a bias ORT fuses any alpha into QGemm (not a float unit); the integer QGemm here has no
    alpha, so ``lower`` refuses it naming the node rather than computing something else."""
    model = _gemm_unit(np.random.default_rng(1), 2, 16, 4, "alpha")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    del gemm.input[2]
    g = ir.load(model)
    g.toposort()
    assert ort_float_units(g, "x86") == [] and ort_float_nodes(model) == set()
    with pytest.raises(ModelError, match=r"cannot lower node Gemm \(Gemm\): Gemm with alpha 0.75"):
        lower(model)


def _shared_input_unit(op, rng):
    """x ─Q(int8)─DQ─ op ─Q─DQ─ y, DQ(x) also a graph output: x's int8 Q has two readers, so ORT's
    int8 -> uint8 rewrite skips it and the unit (input int8, output uint8 after the rewrite) stays float."""
    shape = {"Conv": [1, 4, 5, 5], "GlobalAveragePool": [1, 6, 5, 5]}.get(op, [3, 16])
    consts = {"sx": np.float32(0.05), "zx": np.int8(3), "sy": np.float32(0.07), "zy": np.int8(-5),
              "s2": np.float32(0.04), "z2": np.int8(1)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"], name="Qx"),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"], name="DQx")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    if op in ("Conv", "MatMul", "Gemm"):
        wshape = {"Conv": (6, 4, 3, 3), "MatMul": (16, 8), "Gemm": (8, 16)}[op]
        consts.update(w=rng.integers(-127, 128, wshape).astype(np.int8), sw=np.float32(0.01), wz=np.int8(0))
        nodes.append(helper.make_node("DequantizeLinear", ["w", "sw", "wz"], ["dw"], name="DQw"))
        attrs = {"transB": 1} if op == "Gemm" else {"pads": [1] * 4} if op == "Conv" else {}
        nodes.append(helper.make_node(op, ["dx", "dw"], ["o"], name=op, **attrs))
    elif op in ("Add", "Mul"):
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, shape))
        nodes += [helper.make_node("QuantizeLinear", ["x2", "s2", "z2"], ["q2"], name="Q2"),
                  helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"], name="DQ2"),
                  helper.make_node(op, ["dx", "d2"], ["o"], name=op)]
    else:
        nodes.append(helper.make_node(op, ["dx"], ["o"], name=op))
    nodes += [helper.make_node("QuantizeLinear", ["o", "sy", "zy"], ["qy"], name="Qy"),
              helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"], name="DQy")]
    yshape = {"Conv": [1, 6, 5, 5], "GlobalAveragePool": [1, 6, 1, 1], "MatMul": [3, 8], "Gemm": [3, 8]}.get(op, shape)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape),
            helper.make_tensor_value_info("dx", TensorProto.FLOAT, shape)]
    model = _model(nodes, inputs, outs, consts)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in inputs}
    return model, feeds


#: one graph per op ``ort_float_units`` can mark (``lower.FLOAT_UNIT_STEPS``): a new op there fails
#: ``test_every_op_ort_float_units_can_mark_has_a_float_unit`` until it has a float unit and a case here
FLOAT_UNIT_CASES = ("Conv", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool")


@x86
def test_every_op_ort_float_units_can_mark_has_a_float_unit():
    """The audit of issue 19: for every op ``ort_float_units`` can mark, the lowered step is the one
    ``FLOAT_UNIT_STEPS`` names, it carries ``ort_float`` (its kernel runs ORT's float unit in
    ``float`` mode) and equals ORT bit for bit. Gemm was the one without (it ran as integers)."""
    assert set(FLOAT_UNIT_CASES) == set(FLOAT_UNIT_STEPS)
    for i, op in enumerate(FLOAT_UNIT_CASES):
        rng = np.random.default_rng(90 + i)
        model, feeds = _shared_input_unit(op, rng)
        g = ir.load(model)
        g.toposort()
        assert {u.name for u in ort_float_units(g, "x86")} == ort_float_nodes(model) == {op}, op
        prog = lower(model)
        steps = [s for s in prog.steps if s.name == op]
        assert [s.op for s in steps] == [FLOAT_UNIT_STEPS[op]] and "ort_float" in steps[0].attrs, op
        np.testing.assert_array_equal(run(prog, feeds)["y"], ort_session_1t(model).run(None, feeds)[0], err_msg=op)


def test_a_marked_unit_without_a_float_step_is_refused_by_name(monkeypatch):
    """If ``ort_float_units`` marks a node whose lowered step has no float unit, ``lower`` says so
    naming the node, instead of running it as integers (a silent mismatch with ORT): here a Concat
    group (QLinearConcat has none) marked by a stand-in for ``ort_float_units``."""
    model, _ = _shared_input_unit("Add", np.random.default_rng(3))
    g = ir.load(model)
    g.toposort()
    node = next(n for n in g.nodes if n.op == "Add")
    node.op = "Concat"
    node.attrs["axis"] = 0
    monkeypatch.setattr(lower_mod, "ort_float_units", lambda g_, platform="auto": [node])
    with pytest.raises(ModelError, match=r"cannot lower node Add \(Concat\).*no float unit"):
        lower(g)
    monkeypatch.setattr(lower_mod, "ort_float_units", lambda g_, platform="auto": [])
    assert "QLinearConcat" in {s.op for s in lower(g).steps}       # unmarked, the same graph lowers
