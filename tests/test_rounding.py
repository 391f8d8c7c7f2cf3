"""quant:rounding=gptq — weight rounding that minimizes each layer's output error on its inputs.

What is checked, and why it can fail:
- the im2col patches the Hessian is built from are the Conv's own (W @ patches == ORT's Conv, for
  strides, dilations, asymmetric pads, SAME padding, groups and depthwise): a wrong order of
  (cin, kh, kw) or a wrong window would make H describe some other layer;
- on inputs with correlated features, GPTQ's output error tr(ΔW H ΔWᵀ) is well below nearest
  rounding's, on the same grid (same scales, integers within [qmin, qmax]);
- through the pass: the QDQ model runs in ORT, its layer outputs are closer to the float model's than
  with nearest rounding, the notes say how many layers were rounded, and no data is a named error.
"""
import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from builders import DIGITS, DIGITS_SAMPLE, init, make_model, run_ort
from qgraph import ir
from qgraph.data import open_samples
from qgraph.errors import PassError
from qgraph.qparams import weight_qparams
from qgraph.rounding import _conv_geometry, _conv_patches, gptq, layer_matrix, output_error, row_scales


@pytest.mark.parametrize("attrs, cin, cout", [
    ({"pads": [1, 1, 1, 1]}, 4, 6),
    ({"strides": [2, 2], "pads": [0, 1, 2, 1]}, 4, 6),
    ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, 4, 6),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4, 6),
    ({"group": 2, "pads": [1, 1, 1, 1]}, 4, 6),
    ({"group": 4, "pads": [1, 1, 1, 1]}, 4, 4),          # depthwise
], ids=["pad1", "stride2_asym_pads", "dilation", "same_upper", "groups2", "depthwise"])
def test_conv_patches_reproduce_the_convolution(rng, attrs, cin, cout):
    groups = attrs.get("group", 1)
    w = rng.normal(size=(cout, cin // groups, 3, 3)).astype(np.float32)
    x = rng.normal(size=(1, cin, 9, 8)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
                       [("x", list(x.shape))], [("y", [1, cout, "h", "w"])], [init("w", w)])
    ref = run_ort(model, {"x": x})[0][0]
    node = ir.load(model).nodes[0]
    patches = _conv_patches(x[0], _conv_geometry(node, w.shape, x.shape))        # [G, K, L]
    m, _ = layer_matrix(node, w)                                                  # [G, R, K]
    got = (m @ patches).reshape(cout, *ref.shape[1:])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_gptq_beats_nearest_on_correlated_inputs(rng, per_channel):
    k, r, n = 48, 16, 4000
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(n, k)) @ mix + 0.3 * rng.normal(size=(n, k))       # correlated features
    h = (x.T @ x / n)[None]
    w = rng.normal(size=(r, k)).astype(np.float32)
    for bits in (4, 8):
        qp = weight_qparams(w, bits=bits, storage="int8", axis=0 if per_channel else None)
        gnode = type("N", (), {"op": "Gemm", "attrs": {"transB": 1}})()
        m, back = layer_matrix(gnode, w.astype(np.float64))
        s, z = row_scales(qp, gnode, w.shape, m.shape)
        q = gptq(m, h, s, z, qp.qmin, qp.qmax)
        assert q.min() >= qp.qmin and q.max() <= qp.qmax and back(q).shape == w.shape
        near = np.clip(np.rint(m / s[:, :, None]), qp.qmin, qp.qmax)
        e_near = output_error(m, near * s[:, :, None], h)
        e_gptq = output_error(m, q * s[:, :, None], h)
        assert e_gptq < 0.75 * e_near, (bits, e_gptq, e_near)


def _layer_outputs(model, feeds, names):
    from qgraph.calibrate import with_outputs
    return dict(zip(names, run_ort(with_outputs(model, names), feeds)[-len(names):]))


def test_quant_gptq_on_the_digits_cnn_lowers_layer_error():
    base = qgraph.optimize(DIGITS, "fold", progress=False)[0]
    calib = open_samples(DIGITS_SAMPLE, [i.name for i in base.graph.input])
    near, rep_n = qgraph.optimize(base, "quant:weight_only=true,bits=4", calib=calib, progress=False)
    gq, rep_g = qgraph.optimize(base, "quant:weight_only=true,bits=4,rounding=gptq", calib=calib, progress=False)
    notes = rep_g.rows[-1]["notes"]
    convs = sum(1 for n in base.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    assert notes["rounding"]["gptq"] == convs and notes["rounding"]["output_error_vs_nearest"] < 1.0
    onnx.checker.check_model(gq)
    feeds = next(iter(calib.batches(64)))
    feeds = {i.name: feeds[i.name] for i in base.graph.input}
    ref = run_ort(base, feeds)[0]
    err = {name: float(np.mean((run_ort(m, feeds)[0] - ref) ** 2)) for name, m in (("near", near), ("gptq", gq))}
    assert err["gptq"] < err["near"], err


def test_gptq_without_calibration_data_is_a_named_error(rng):
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                       [("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])], [init("w", w)])
    with pytest.raises(PassError, match="rounding=gptq needs calibration data"):
        qgraph.optimize(model, "quant:weight_only=true,rounding=gptq", progress=False)


def test_gptq_chooses_each_rows_clipping_and_never_loses_to_nearest(rng):
    # Gaussian rows at 4 bits: the min-max scale wastes levels on the tails, a smaller one is better
    # (for K = 256 Gaussian weights the MSE-optimal clipping is well inside the max)
    from qgraph.rounding import _round_one
    k, r = 256, 12
    x = rng.normal(size=(2000, k))
    h = x.T @ x / len(x)
    w = rng.normal(size=(r, k)).astype(np.float32)
    gnode = type("N", (), {"op": "Gemm", "attrs": {"transB": 1}})()
    qp = weight_qparams(w, bits=4, storage="int8", axis=0)
    q, (e_near, e_gptq), scale = _round_one(gnode, w, qp, h[None])
    assert e_gptq < 0.8 * e_near     # measured 0.69 (uncorrelated inputs: the clipping does most)
    assert np.all(scale <= qp.scale * (1 + 1e-6)) and np.any(scale < 0.95 * qp.scale)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax


@pytest.mark.parametrize("g, k", [(1, 60), (3, 9), (1, 300)])
def test_the_inverse_factor_is_the_cholesky_factor_of_the_inverse(rng, g, k):
    # U = J chol(J H J)⁻¹ J must be what the definition gives: H⁻¹ = Uᵀ U, U upper with a positive
    # diagonal (the unique such factor); float64 roundoff on a damped H (condition ~1e3-1e4): 1e-9
    from qgraph.rounding import _upper_cholesky_of_inverse
    x = rng.normal(size=(g, 2 * k, k)) @ rng.normal(size=(g, k, k))      # correlated features
    h = np.einsum("gnk,gnl->gkl", x, x) / (2 * k)
    idx = np.arange(k)
    h[:, idx, idx] += 0.01 * h[:, idx, idx].mean(axis=1, keepdims=True)
    u = _upper_cholesky_of_inverse(h)
    assert np.array_equal(u, np.triu(u)) and np.all(np.diagonal(u, axis1=1, axis2=2) > 0)
    hinv = np.linalg.inv(h)
    assert np.abs(u.transpose(0, 2, 1) @ u - hinv).max() <= 1e-9 * np.abs(hinv).max()
    want = np.linalg.cholesky(hinv).transpose(0, 2, 1)
    assert np.abs(u - want).max() <= 1e-9 * np.abs(want).max()


def test_gptq_leaves_a_layer_too_wide_for_its_statistics_to_nearest_rounding(monkeypatch):
    # a layer whose K x K input statistics pass MAX_HESSIAN_BYTES is not rounded by GPTQ (its memory
    # would be several times H): it keeps nearest rounding, and the notes name the reason
    from qgraph import rounding
    base = qgraph.optimize(DIGITS, "fold", progress=False)[0]
    calib = open_samples(DIGITS_SAMPLE, [i.name for i in base.graph.input])
    monkeypatch.setattr(rounding, "MAX_HESSIAN_BYTES", 100 * 100 * 8)    # K <= 100 only
    _, rep = qgraph.optimize(base, "quant:weight_only=true,bits=4,rounding=gptq", calib=calib, progress=False)
    notes = rep.rows[-1]["notes"]["rounding"]
    assert notes["nearest"] >= 1 and notes["gptq"] >= 1
    assert all("input statistics would take" in why for why in notes["nearest_because"].values())


def test_errors_from_kept_input_rows_equal_the_second_moment_form(rng):
    # an FC fed few samples keeps its input rows X (n <= K / 4): ||D Xᵀ||² / n must be tr(D H Dᵀ) with
    # H = Xᵀ X / n (float32 products in H, float64 here: 1e-5 relative); many rows are not kept
    from qgraph.rounding import Hessians, _row_errors
    node = type("Node", (), {"op": "Gemm", "attrs": {"transB": 1}})()
    acc = Hessians({"fc": (node, "x", (6, 64), (None, 64))})
    for _ in range(2):
        acc.update("fc", rng.normal(size=(4, 64)).astype(np.float32))
    x = acc.input_rows("fc")
    assert x is not None and x.shape == (8, 64)
    h = acc.h["fc"] / acc.count["fc"]
    w, wq = rng.normal(size=(1, 6, 64)), rng.normal(size=(1, 6, 64))
    assert output_error(w, wq, h, x) == pytest.approx(output_error(w, wq, h), rel=1e-5)
    assert np.allclose(_row_errors(w, wq, h, x), _row_errors(w, wq, h), rtol=1e-5)
    acc.update("fc", rng.normal(size=(16, 64)).astype(np.float32))      # 24 rows > 64 / 4
    assert acc.input_rows("fc") is None
