"""fold: BatchNormalization and constant per-channel Mul/Add into the producing layer.

Positive cases check the structure (BN gone) and the numbers against ONNX Runtime. Tolerance: the
folded model computes (a·W)x + (a·c + b) instead of a·(Wx + c) + b, a float32 re-association; the
relative error (max|Δ| / max|ref|) stays near float32's epsilon (1.2e-7) times a small factor, so
1e-5 leaves room without hiding a wrong channel (which gives errors of order 1).
"""
import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from builders import bn_node, bn_params, init, make_model, ops, rel_err, run_ort
from qgraph import ir
from qgraph.passes.fold import FoldBatchNorm
from qgraph.pipeline import Context

TOL = 1e-5


def fold(model: onnx.ModelProto):
    """Run fold alone; return (folded model, notes)."""
    g = ir.load(model)
    result = FoldBatchNorm().run(g, Context())
    g.cleanup().toposort()
    out = ir.to_model(g)
    onnx.checker.check_model(out)
    return out, result.notes


def check_same(model, folded, feeds):
    ref = run_ort(model, feeds)
    got = run_ort(folded, feeds)
    for r, o in zip(ref, got):
        assert rel_err(r, o) <= TOL


# --------------------------------------------------------------------------- Conv family

def conv_bn(rng, *, bias=True, groups=1, cin=4, cout=6, eps=1e-5):
    #   x ─Conv(w[,b], group)─ c ─BN─ y
    w = rng.normal(0, 0.5, (cout, cin // groups, 3, 3)).astype(np.float32)
    inits = [init("w", w), *bn_params(rng, cout)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", rng.normal(0, 0.1, cout).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1], group=groups),
             bn_node("c", "y", eps=eps)]
    return make_model(nodes, [("x", [2, cin, 7, 7])], [("y", [2, cout, 7, 7])], inits)


@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "no_bias"])
def test_fold_conv_bn(rng, bias):
    model = conv_bn(rng, bias=bias)
    folded, notes = fold(model)
    assert ops(folded) == ["Conv"]
    assert notes["folded"] == 1
    assert len(folded.graph.node[0].input) == 3  # a bias was created when there was none
    check_same(model, folded, {"x": rng.normal(size=(2, 4, 7, 7)).astype(np.float32)})


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (4, 4, 4)], ids=["grouped", "depthwise"])
def test_fold_grouped_and_depthwise_conv_bn(rng, groups, cin, cout):
    model = conv_bn(rng, groups=groups, cin=cin, cout=cout)
    folded, notes = fold(model)
    assert ops(folded) == ["Conv"] and notes["folded"] == 1
    check_same(model, folded, {"x": rng.normal(size=(2, cin, 7, 7)).astype(np.float32)})


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 1e-12])
def test_fold_respects_bn_epsilon_with_tiny_variance(rng, eps):
    #   x ─Conv─ BN(ε, σ² down to 1e-4) ─ y : ε must enter a = γ / sqrt(σ² + ε)
    model = conv_bn(rng, eps=eps)
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    v = onnx.numpy_helper.to_array(var).copy()
    v[:3] = 1e-4
    var.CopyFrom(init("bn_var", v))
    folded, _ = fold(model)
    check_same(model, folded, {"x": rng.normal(size=(2, 4, 7, 7)).astype(np.float32)})


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_conv_transpose_bn(rng, groups):
    #   x ─ConvTranspose(w[Cin, Cout/g, 3, 3], group)─ c ─BN─ y
    cin, cout = 4, 6
    w = rng.normal(0, 0.5, (cin, cout // groups, 3, 3)).astype(np.float32)
    inits = [init("w", w), init("b", rng.normal(0, 0.1, cout).astype(np.float32)), *bn_params(rng, cout)]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", strides=[2, 2],
                              group=groups), bn_node("c", "y")]
    model = make_model(nodes, [("x", [1, cin, 5, 5])], [("y", [1, cout, 11, 11])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["ConvTranspose"] and notes["folded"] == 1
    check_same(model, folded, {"x": rng.normal(size=(1, cin, 5, 5)).astype(np.float32)})


# --------------------------------------------------------------------------- Gemm / MatMul

@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c,beta", [(True, 1.0), (True, 0.5), (False, 1.0)], ids=["C", "C_beta", "noC"])
def test_fold_gemm_bn(rng, trans_b, with_c, beta):
    #   x[3, 5] ─Gemm(B, C, transB, beta)─ g[3, 4] ─BN─ y
    k, n = 5, 4
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("B", b), *bn_params(rng, n)]
    gin = ["x", "B"]
    if with_c:
        inits.append(init("C", rng.normal(size=(n,)).astype(np.float32)))
        gin.append("C")
    nodes = [helper.make_node("Gemm", gin, ["g"], name="gemm", transB=trans_b, beta=beta, alpha=0.8),
             bn_node("g", "y")]
    model = make_model(nodes, [("x", [3, k])], [("y", [3, n])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["Gemm"] and notes["folded"] == 1
    check_same(model, folded, {"x": rng.normal(size=(3, k)).astype(np.float32)})


def test_fold_matmul_bn_becomes_matmul_add(rng):
    #   x[3, 5] ─MatMul(W[5, 4])─ m ─BN─ y    →    x ─MatMul(W')─Add(b')─ y
    inits = [init("W", rng.normal(size=(5, 4)).astype(np.float32)), *bn_params(rng, 4)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node("m", "y")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["MatMul", "Add"] and notes["folded"] == 1
    assert folded.graph.output[0].name == "y"
    check_same(model, folded, {"x": rng.normal(size=(3, 5)).astype(np.float32)})


def test_fold_conv_mul_add_constants(rng):
    #   x ─Conv─ c ─Mul(s[1,C,1,1])─ m ─Add(t[C,1,1])─ y     →   x ─Conv(W', b')─ y
    cout = 6
    inits = [init("w", rng.normal(size=(cout, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(size=(cout,)).astype(np.float32)),
             init("s", rng.uniform(0.5, 2, (1, cout, 1, 1)).astype(np.float32)),
             init("t", rng.normal(size=(cout, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["t", "m"], ["y"], name="add")]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, cout, 4, 4])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["Conv"]
    assert notes["folded_mul"] == 1 and notes["folded_add"] == 1
    check_same(model, folded, {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)})


def test_fold_keeps_graph_output_name(rng):
    model = conv_bn(rng)
    folded, _ = fold(model)
    assert [o.name for o in folded.graph.output] == ["y"]


# --------------------------------------------------------------------------- negative cases

def test_fold_skips_bn_after_join(rng):
    #   x ─Conv(w1)─┐
    #               ├─Add─BN─ y       BN sits after a join: nothing to fold into
    #   x ─Conv(w2)─┘
    inits = [init("w1", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
             init("w2", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)), *bn_params(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2"),
             helper.make_node("Add", ["a", "b"], ["s"], name="join"), bn_node("s", "y")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], inits)
    folded, notes = fold(model)
    assert "BatchNormalization" in ops(folded)
    assert notes["folded"] == 0
    assert notes["skipped"] == {"bn_after_join": 1}


def _concat_bn(rng, tail, cin_each=3, extra_inits=()):
    """x1, x2 -Concat- cat -BN- bnout -> ``tail`` nodes (which read 'bnout' and write 'y')."""
    c = 2 * cin_each
    nodes = [helper.make_node("Concat", ["x1", "x2"], ["cat"], axis=1, name="cat"), bn_node("cat", "bnout"), *tail]
    return c, nodes, [*bn_params(rng, c), *extra_inits]


def test_fold_forward_through_relu_into_padded_conv(rng):
    #   x1 ─┐
    #       ├─Concat─BN─Mul(s)─Add(t)─Relu─Conv(3x3, pad 1, groups 2)─ y
    #   x2 ─┘
    #   →   Concat─Add(b/a)─Relu─Conv(W·a)      (DenseNet's pattern; every a > 0)
    c = 6
    tail = [helper.make_node("Mul", ["bnout", "s"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "t"], ["u"], name="add"),
            helper.make_node("Relu", ["u"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w", "cb"], ["y"], pads=[1, 1, 1, 1], group=2, name="conv")]
    inits = [init("s", rng.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32)),
             init("t", rng.normal(0, 0.3, (1, c, 1, 1)).astype(np.float32)),
             init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             init("cb", rng.normal(size=4).astype(np.float32))]
    _, nodes, inits = _concat_bn(rng, tail, extra_inits=inits)
    model = make_model(nodes, [("x1", [2, 3, 5, 5]), ("x2", [2, 3, 5, 5])], [("y", [2, 4, 5, 5])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["Concat", "Add", "Relu", "Conv"]
    assert notes["folded"] == 1 and notes["folded_forward"] == {"into_layer": 0, "through_relu": 1}
    assert "skipped" not in notes
    check_same(model, folded, {"x1": rng.normal(size=(2, 3, 5, 5)).astype(np.float32),
                               "x2": rng.normal(size=(2, 3, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("layer", ["conv1x1", "gemm_transB", "matmul"])
def test_fold_forward_into_layer(rng, layer):
    #   x1, x2 ─Concat─BN─ Conv 1x1 (no padding) | Gemm(transB=1) | MatMul   →   Concat─layer(W·a, bias + W·b)
    c = 6
    if layer == "conv1x1":
        tail = [helper.make_node("Conv", ["bnout", "w"], ["y"], name="conv")]
        w, xs, ys = rng.normal(size=(5, c, 1, 1)), [2, 3, 4, 4], [2, 5, 4, 4]
    elif layer == "gemm_transB":
        tail = [helper.make_node("Gemm", ["bnout", "w", "cb"], ["y"], transB=1, alpha=0.5, beta=2.0, name="gemm")]
        w, xs, ys = rng.normal(size=(5, c)), [2, 3], [2, 5]
    else:
        tail = [helper.make_node("MatMul", ["bnout", "w"], ["y"], name="mm")]
        w, xs, ys = rng.normal(size=(c, 5)), [2, 3], [2, 5]
    extra = [init("w", w.astype(np.float32))] + ([init("cb", rng.normal(size=5).astype(np.float32))]
                                                 if layer == "gemm_transB" else [])
    _, nodes, inits = _concat_bn(rng, tail, extra_inits=extra)
    model = make_model(nodes, [("x1", xs), ("x2", xs)], [("y", ys)], inits)
    folded, notes = fold(model)
    assert "BatchNormalization" not in ops(folded)
    assert notes["folded_forward"] == {"into_layer": 1, "through_relu": 0}
    check_same(model, folded, {"x1": rng.normal(size=xs).astype(np.float32),
                               "x2": rng.normal(size=xs).astype(np.float32)})


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "MaxPool"])
def test_fold_forward_through_relu_pool_and_flatten_into_gemm(rng, pool):
    #   Concat─BN─Relu─pool─Flatten─Gemm     a > 0 commutes with pooling; Flatten repeats a per position
    #   (MaxPool 2x2 on 4x4 leaves 2x2 positions per channel: Gemm's K = 6·4)
    k = 6 if pool == "GlobalAveragePool" else 24
    pool_node = (helper.make_node(pool, ["r"], ["p"], name="pool") if pool == "GlobalAveragePool"
                 else helper.make_node(pool, ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"))
    tail = [helper.make_node("Relu", ["bnout"], ["r"], name="relu"), pool_node,
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "w", "cb"], ["y"], transB=1, name="gemm")]
    extra = [init("w", rng.normal(size=(5, k)).astype(np.float32)), init("cb", rng.normal(size=5).astype(np.float32))]
    _, nodes, inits = _concat_bn(rng, tail, extra_inits=extra)
    model = make_model(nodes, [("x1", [2, 3, 4, 4]), ("x2", [2, 3, 4, 4])], [("y", [2, 5])], inits)
    folded, notes = fold(model)
    assert "BatchNormalization" not in ops(folded) and notes["folded_forward"]["through_relu"] == 1
    check_same(model, folded, {"x1": rng.normal(size=(2, 3, 4, 4)).astype(np.float32),
                               "x2": rng.normal(size=(2, 3, 4, 4)).astype(np.float32)})


def test_fold_sees_constants_behind_unsqueeze(rng):
    #   x ─Conv─BN─Mul(Unsqueeze(s))─ y      Caffe2-style exports write per-channel constants this way
    inits = [init("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)), *bn_params(rng, 4),
             init("s", rng.uniform(0.5, 2, 4).astype(np.float32)), init("axes", np.array([1, 2], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "b"),
             helper.make_node("Unsqueeze", ["s", "axes"], ["s3"], name="unsq"),
             helper.make_node("Mul", ["b", "s3"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["Conv"] and notes["constants_resolved"] == 1 and notes["folded_mul"] == 1
    check_same(model, folded, {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_fold_forward_refuses_shift_into_padded_conv_and_negative_scale_before_relu(rng):
    #   Concat─BN─Conv(3x3, pad 1)        b would shift the padded zeros: kept
    #   Concat─BN(γ<0 somewhere)─Relu─Conv   Relu(a x + b) != a Relu(x + b/a) for a < 0: kept
    tail = [helper.make_node("Conv", ["bnout", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    _, nodes, inits = _concat_bn(rng, tail, extra_inits=[init("w", rng.normal(size=(4, 6, 3, 3)).astype(np.float32))])
    model = make_model(nodes, [("x1", [1, 3, 4, 4]), ("x2", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])], inits)
    folded, notes = fold(model)
    assert "BatchNormalization" in ops(folded) and notes["skipped"] == {"bn_after_join": 1}
    assert "forward: shift_into_padded_conv" in notes["details"][0]

    tail = [helper.make_node("Relu", ["bnout"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w"], ["y"], name="conv")]
    _, nodes, inits = _concat_bn(rng, tail, extra_inits=[init("w", rng.normal(size=(4, 6, 1, 1)).astype(np.float32))])
    inits[0] = init("bn_scale", np.array([1, 1, -0.5, 1, 1, 1], np.float32))
    model = make_model(nodes, [("x1", [1, 3, 4, 4]), ("x2", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])], inits)
    folded, notes = fold(model)
    assert "BatchNormalization" in ops(folded)
    assert "forward: nonpositive_scale_before_relu (1 of 6 channels)" in notes["details"][0]


def test_rest_affine_turns_unfoldable_bn_into_mul_add(rng):
    #   x ─Relu─ r ─BN─ y     →    x ─Relu─ r ─Mul(a)─Add(b)─ y     (a = γ/sqrt(σ²+ε), b = β − aμ)
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")],
                       [("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], bn_params(rng, 4))
    g = ir.load(model)
    notes = FoldBatchNorm(rest="affine").run(g, Context()).notes
    out = ir.to_model(g)
    assert ops(out) == ["Relu", "Mul", "Add"] and notes["to_affine"] == 1
    assert notes["skipped"] == {"not_after_layer": 1}
    check_same(model, out, {"x": rng.normal(size=(2, 4, 3, 3)).astype(np.float32)})


def test_fold_skips_bn_fed_by_graph_input(rng):
    #   x ─BN─ y
    model = make_model([bn_node("x", "y")], [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], bn_params(rng, 4))
    folded, notes = fold(model)
    assert ops(folded) == ["BatchNormalization"]
    assert notes["skipped"] == {"bn_input_is_graph_input": 1}


def test_fold_skips_when_conv_output_has_other_readers(rng):
    #   x ─Conv─ c ─BN─ y
    #            └──Relu─ z      folding would change what Relu sees
    inits = [init("w", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)), *bn_params(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y"),
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3]), ("z", [1, 4, 3, 3])], inits)
    _, notes = fold(model)
    assert notes["skipped"] == {"producer_has_other_consumers": 1}


def test_fold_skips_shared_weight(rng):
    #   x ─Conv(w)─BN1─ y1
    #   x ─Conv(w)─BN2─ y2     one initializer w, two different BNs: cannot hold both foldings
    inits = [init("w", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
             *bn_params(rng, 4, "bn1"), *bn_params(rng, 4, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1"), bn_node("a", "y1", "bn1"),
             helper.make_node("Conv", ["x", "w"], ["b"], name="c2"), bn_node("b", "y2", "bn2")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y1", [1, 4, 3, 3]), ("y2", [1, 4, 3, 3])], inits)
    folded, notes = fold(model)
    assert notes["skipped"] == {"weight_shared": 2}
    assert ops(folded).count("BatchNormalization") == 2


def test_fold_skips_matmul_whose_bn_axis_is_not_features(rng):
    #   x[2, 3, 5] ─MatMul(W[5, 4])─ m[2, 3, 4] ─BN(C=3)─ y    BN normalizes axis 1 (3), not features (4)
    inits = [init("W", rng.normal(size=(5, 4)).astype(np.float32)), *bn_params(rng, 3)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node("m", "y")]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", [2, 3, 4])], inits)
    folded, notes = fold(model)
    assert notes["folded"] == 0
    assert set(notes["skipped"]) <= {"matmul_channel_axis", "channel_mismatch"}
    check_same(model, folded, {"x": rng.normal(size=(2, 3, 5)).astype(np.float32)})


def test_fold_skips_mul_that_is_not_per_channel(rng):
    #   x ─Conv─ c[1,4,3,3] ─Mul(s[1,1,3,3])─ y      a spatial mask is not a per-channel scale
    inits = [init("w", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
             init("s", rng.normal(size=(1, 1, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], inits)
    folded, notes = fold(model)
    assert ops(folded) == ["Conv", "Mul"]
    assert notes["skipped"] == {"not_per_channel": 1}


def test_fold_through_optimize_reports_bn_count_zero_on_demo_model():
    from builders import DIGITS, DIGITS_SAMPLE
    model, report = qgraph.optimize(DIGITS, "fold,cleanup", calib=DIGITS_SAMPLE, verify=True)
    first, last = report.rows[0], report.rows[-1]
    assert first["ops"]["BatchNormalization"] == 6
    assert last["ops"].get("BatchNormalization", 0) == 0
    worst = max(d["max_rel"] for d in last["verify"]["outputs"].values())
    assert worst <= 1e-5
