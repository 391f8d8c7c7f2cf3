"""equalize: cross-layer equalization (DFQ §4.1) and bias absorption (§4.2).

Function checks use ONNX Runtime with a relative tolerance of 1e-5 (max|Δ| / max|ref|): equalization
is exact in real arithmetic, so only float32 rounding of the rescaled weights remains.
"""
import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from builders import DIGITS, DIGITS_SAMPLE, init, make_model, ops, rel_err, run_ort
from qgraph import ir
from qgraph.passes.equalize import EqualizeCrossLayer
from qgraph.pipeline import BNStats, Context

TOL = 1e-5


def equalize(model, ctx=None, **opts):
    g = ir.load(model)
    result = EqualizeCrossLayer(**opts).run(g, ctx or Context())
    g.cleanup().toposort()
    out = ir.to_model(g)
    onnx.checker.check_model(out)
    return out, result.notes


def weights(model) -> dict:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def check_same(a, b, feeds, tol=TOL):
    for r, o in zip(run_ort(a, feeds), run_ort(b, feeds)):
        assert rel_err(r, o) <= tol


def two_conv(rng, mid=("Relu",), cin=3, c=4, cout=5):
    #   x ─Conv(w1, b1)─ ─[Relu | Clip(0,6) | ...]─ ─Conv(w2, b2)─ y
    # channel ranges of w1 differ by 100x so there is something to equalize
    w1 = rng.normal(size=(c, cin, 1, 1)).astype(np.float32) * np.array([100, 1, 0.1, 10], np.float32)[:c, None, None, None]
    inits = [init("w1", w1), init("b1", rng.normal(size=(c,)).astype(np.float32)),
             init("w2", rng.normal(size=(cout, c, 3, 3)).astype(np.float32)),
             init("b2", rng.normal(size=(cout,)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h0"], name="conv1")]
    t = "h0"
    for i, op in enumerate(mid):
        out = f"h{i + 1}"
        if op == "Clip":
            inits += [init("lo", np.float32(0)), init("hi", np.float32(6))]
            nodes.append(helper.make_node("Clip", [t, "lo", "hi"], [out], name="clip"))
        else:
            nodes.append(helper.make_node(op, [t], [out], name=op.lower()))
        t = out
    nodes.append(helper.make_node("Conv", [t, "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    return make_model(nodes, [("x", [2, cin, 6, 6])], [("y", [2, cout, 6, 6])], inits)


def test_two_layer_chain_matches_closed_form(rng):
    model = two_conv(rng)
    before = weights(model)
    out, notes = equalize(model)
    after = weights(out)
    r1 = np.abs(before["w1"]).reshape(4, -1).max(axis=1)
    r2 = np.abs(before["w2"]).transpose(1, 0, 2, 3).reshape(4, -1).max(axis=1)
    s = np.sqrt(r1 * r2) / r2
    np.testing.assert_allclose(after["w1"], before["w1"] / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(after["b1"], before["b1"] / s, rtol=1e-6)
    np.testing.assert_allclose(after["w2"], before["w2"] * s[None, :, None, None], rtol=1e-6)
    # both layers now have range sqrt(r1 r2) in every shared channel
    np.testing.assert_allclose(np.abs(after["w1"]).reshape(4, -1).max(axis=1), np.sqrt(r1 * r2), rtol=1e-6)
    assert notes["pairs"] == 1 and notes["sweeps"] <= 3
    check_same(model, out, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})


def test_depthwise_chain_is_equalized_and_keeps_function(rng):
    #   x ─Conv1x1(3→4)─Relu─DWConv3x3(4, group=4)─Relu─Conv1x1(4→5)─ y
    c = 4
    inits = [init("w1", (rng.normal(size=(c, 3, 1, 1)) * np.array([50, 1, .02, 3])[:, None, None, None]).astype(np.float32)),
             init("wd", rng.normal(size=(c, 1, 3, 3)).astype(np.float32)),
             init("bd", rng.normal(size=(c,)).astype(np.float32)),
             init("w3", rng.normal(size=(5, c, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="expand"),
             helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["dr"], name="r2"),
             helper.make_node("Conv", ["dr", "w3"], ["y"], name="project")]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 5, 5, 5])], inits)
    out, notes = equalize(model, iterations=200, tol=1e-9)
    assert notes["pairs"] == 2
    w = weights(out)
    # after convergence each shared channel has equal ranges on both sides
    r_expand = np.abs(w["w1"]).reshape(c, -1).max(axis=1)
    r_dw = np.abs(w["wd"]).reshape(c, -1).max(axis=1)
    r_proj = np.abs(w["w3"]).transpose(1, 0, 2, 3).reshape(c, -1).max(axis=1)
    np.testing.assert_allclose(r_expand, r_dw, rtol=1e-4)
    np.testing.assert_allclose(r_dw, r_proj, rtol=1e-4)
    check_same(model, out, {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)})


def test_residual_coupled_pair_is_skipped_with_reason(rng):
    #   x ─Conv1─Relu─ h ─Conv2─ y
    #                   └────────Add─ z     h has two readers: rescaling it would change z
    model = two_conv(rng)
    model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4, 6, 6]))
    model.graph.node.append(helper.make_node("Add", ["h1", "h1"], ["z"], name="join"))
    out, notes = equalize(model)
    assert notes["pairs"] == 0
    # as a pair it is coupled; as a set it is written by a Relu, which no scale passes exactly
    assert notes["skipped"] == {"coupled_output": 1, "stream_written_by_Relu": 1}
    assert not notes.get("coupled_sets")


def test_residual_stream_is_equalized_as_a_set(rng):
    #   x ─Conv_a─ t0 ─┬─Conv_e─Relu─Conv_p─ t1 ─┐
    #                  └─────────────────────────Add─ s ─Conv_n─ y
    #   producers of the stream {t0, t1, s}: Conv_a, Conv_p; consumers: Conv_e, Conv_n.
    #   Channel i scaled by 1/s_i in both producers and s_i in both consumers keeps y.
    c = 4
    spread = np.array([40, 1, 0.05, 5])[:, None, None, None]
    inits = [init("wa", (rng.normal(size=(c, 3, 1, 1)) * spread).astype(np.float32)),
             init("ba", rng.normal(size=c).astype(np.float32)),
             init("we", rng.normal(size=(6, c, 1, 1)).astype(np.float32)),
             init("wp", (rng.normal(size=(c, 6, 3, 3)) * spread).astype(np.float32)),
             init("wn", rng.normal(size=(5, c, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["t0"], name="conv_a"),
             helper.make_node("Conv", ["t0", "we"], ["e"], name="conv_e"),
             helper.make_node("Relu", ["e"], ["er"], name="relu"),
             helper.make_node("Conv", ["er", "wp"], ["t1"], name="conv_p", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["t0", "t1"], ["s"], name="join"),
             helper.make_node("Conv", ["s", "wn"], ["y"], name="conv_n")]
    model = make_model(nodes, [("x", [2, 3, 5, 5])], [("y", [2, 5, 5, 5])], inits)
    out, notes = equalize(model, iterations=200, tol=1e-9)
    assert notes["coupled_sets"] == 1
    w = weights(out)
    r_prod = np.maximum(np.abs(w["wa"]).reshape(c, -1).max(axis=1), np.abs(w["wp"]).reshape(c, -1).max(axis=1))
    r_cons = np.maximum(np.abs(w["we"]).transpose(1, 0, 2, 3).reshape(c, -1).max(axis=1),
                        np.abs(w["wn"]).transpose(1, 0, 2, 3).reshape(c, -1).max(axis=1))
    np.testing.assert_allclose(r_prod, r_cons, rtol=1e-4)
    assert np.ptp(np.log(r_prod)) < np.ptp(np.log(np.abs(spread.reshape(-1))))   # the 800x spread shrank
    check_same(model, out, {"x": rng.normal(size=(2, 3, 5, 5)).astype(np.float32)})
    _, off = equalize(model, coupled=False)
    assert "coupled_sets" not in off


def test_relu6_carry_keeps_function_with_per_channel_bound(rng):
    model = two_conv(rng, mid=("Clip",))
    out, notes = equalize(model, relu6="carry")
    assert notes["pairs"] == 1 and notes["relu6_carry"] == 1
    assert "Min" in ops(out)  # the bound 6/s_i differs per channel
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    check_same(model, out, {"x": x})
    # the clip is active on this input, so the bound really is exercised
    h = run_ort(helper_model_with_output(model, "h0"), {"x": x})
    assert float(np.max(h[-1])) > 6.0


def helper_model_with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_relu6_relu_mode_replaces_clip_and_says_function_changes(rng):
    model = two_conv(rng, mid=("Clip",))
    out, notes = equalize(model, relu6="relu")
    assert "Clip" not in ops(out) and notes["relu6_relu"] == 1
    assert EqualizeCrossLayer(relu6="relu").preserves_function is False


def test_relu6_skip_mode_reports_reason(rng):
    out, notes = equalize(two_conv(rng, mid=("Clip",)), relu6="skip")
    assert notes["pairs"] == 0 and notes["skipped"] == {"relu6_skipped": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pair(rng, trans_b):
    #   x[4, 6] ─Gemm(B1)─Relu─Gemm(B2)─ y[4, 3]
    b1 = (rng.normal(size=(6, 5)) * np.array([30, 1, 0.05, 2, 8])).astype(np.float32)
    b2 = rng.normal(size=(5, 3)).astype(np.float32)
    inits = [init("B1", b1.T.copy() if trans_b else b1), init("C1", rng.normal(size=(5,)).astype(np.float32)),
             init("B2", b2.T.copy() if trans_b else b2)]
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h"], name="g1", transB=trans_b),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "B2"], ["y"], name="g2", transB=trans_b)]
    model = make_model(nodes, [("x", [4, 6])], [("y", [4, 3])], inits)
    out, notes = equalize(model)
    assert notes["pairs"] == 1
    check_same(model, out, {"x": rng.normal(size=(4, 6)).astype(np.float32)})


def test_bias_absorption_is_exact_when_relu_never_clips(rng):
    #   x ≥ 0 ─Conv1x1(w1 ≥ 0, b1 = 5)─Relu─Conv1x1(w2)─ y
    # pre-activations are ≥ 5 > c = max(0, β − 3γ) = 2, so relu(y − c) = relu(y) − c exactly
    c = 4
    inits = [init("w1", rng.uniform(0.1, 1, (c, 3, 1, 1)).astype(np.float32)),
             init("b1", np.full(c, 5.0, np.float32)),
             init("w2", rng.normal(size=(2, c, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Conv", ["hr", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], inits)
    ctx = Context()
    ctx.bn_stats = {"h": BNStats(beta=np.full(c, 5.0), gamma=np.full(c, 1.0))}
    out, notes = equalize(model, ctx, absorb=True)
    assert notes["absorbed"] == 1
    plain, _ = equalize(model)
    # equalization leaves b1 = 5/s; absorption then removes c = (β − 3γ)/s = 2/s: b1 = 3/s
    np.testing.assert_allclose(weights(out)["b1"], weights(plain)["b1"] * 3 / 5, rtol=1e-5)
    check_same(model, out, {"x": rng.uniform(0, 1, (1, 3, 4, 4)).astype(np.float32)})


def test_equalize_keeps_demo_model_function():
    result, report = qgraph.optimize(DIGITS, "fold,equalize", calib=DIGITS_SAMPLE, verify=True)
    row = report.rows[-1]
    assert row["notes"]["pairs"] >= 3
    assert max(d["max_rel"] for d in row["verify"]["outputs"].values()) <= 1e-4


def test_equalize_requires_fold_first():
    from qgraph.errors import PassError
    with pytest.raises(PassError, match="put 'fold' before"):
        qgraph.optimize(DIGITS, "equalize")


def test_plots_one_png_per_equalized_pair(tmp_path):
    pytest.importorskip("matplotlib")
    _, report = qgraph.optimize(DIGITS, "fold,equalize", plots=tmp_path)
    pngs = sorted(tmp_path.glob("equalize_*.png"))
    assert len(pngs) == report.rows[-1]["notes"]["pairs"] == report.rows[-1]["notes"]["plots"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_bias_absorption_through_relu6_lowers_the_carried_bound(rng):
    #   x ≥ 0 ─Conv1x1(w1 ≥ 0, b1 = 3)─Clip(0, 6)─Conv1x1(w2)─ y
    # pre-activations lie in [3, 6) and c = β − 3γ = 2.4 < 3: min(relu(y − c), 6/s − c) = min(y, 6/s) − c
    c = 4
    inits = [init("w1", rng.uniform(0.01, 0.2, (c, 3, 1, 1)).astype(np.float32)),
             init("b1", np.full(c, 3.0, np.float32)), init("lo", np.float32(0)), init("hi", np.float32(6)),
             init("w2", (rng.normal(size=(2, c, 1, 1)) * np.array([5, .2, 1, 3])[None, :, None, None]).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["hc"], name="clip"),
             helper.make_node("Conv", ["hc", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], inits)
    ctx = Context()
    ctx.bn_stats = {"h": BNStats(beta=np.full(c, 3.0), gamma=np.full(c, 0.2))}
    out, notes = equalize(model, ctx, absorb=True, relu6="carry")
    assert notes["absorbed"] == 1 and "Min" in ops(out)
    check_same(model, out, {"x": rng.uniform(0, 1, (1, 3, 4, 4)).astype(np.float32)})
