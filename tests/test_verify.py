"""Verify's noise floor: a function-preserving pass is held to max(tolerance, k x noise) per output,
the noise being the original model's own float32 reassociation noise (ORT's graph optimizations off
and basic vs all). A rewrite that only reassociates passes; a real change (a wrong fold) fails."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from builders import DIGITS, DIGITS_SAMPLE, bn_node, bn_params, init, make_model
from onnx import helper

import qgraph
from qgraph import ir
from qgraph.errors import OptionError, PassError
from qgraph.instruments import NOISE_FACTOR, Report, Verify
from qgraph.pipeline import Context, Pass, PassManager, PassResult

K, N = 64, 8


def cancelling_conv():
    #   x[B, 64, 1, 1] ─Conv(W 1x1)─BN─ y[B, 8, 1, 1]
    # W's entries are ±1e5 (alternating over input channels) plus N(0, 1): on x ~ 1 the partial sums
    # reach 1e5 while y is ~N(0, 8), so float32 reassociation moves y by ~ulp(1e5), ~1e-2 of max|y|.
    # ORT shows it itself: at the basic level and above it folds the BN into W (ConvBNFusion).
    rng = np.random.default_rng(0)
    sign = np.where(np.arange(K) % 2 == 0, 1.0, -1.0)[None, :, None, None]
    w = (sign * 1e5 + rng.standard_normal((N, K, 1, 1))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("t", "y")]
    return make_model(nodes, [("x", ["B", K, 1, 1])], [("y", ["B", N, 1, 1])], [init("w", w)] + bn_params(rng, N))


CALIB = {"x": np.ones((4, K, 1, 1), np.float32)
         + np.float32(1e-3) * np.arange(4, dtype=np.float32)[:, None, None, None]}


class SplitK(Pass):
    """Test pass: Conv(x, W) -> Conv(x[:, :K/2], W[:, :K/2]) + Conv(x[:, K/2:], W[:, K/2:]) (the same
    function, another summation order, as a real rewrite might produce)."""
    name = "splitk"
    tolerance = 1e-4

    def run(self, g, ctx):
        conv = next(n for n in g.nodes if n.op == "Conv")
        x, w, t = conv.inputs[0], ir.const(conv.inputs[1]), conv.outputs[0]
        half = w.shape[1] // 2
        parts = []
        for i, (lo, hi) in enumerate(((0, half), (half, w.shape[1]))):
            xs = gs.Variable(f"x{i}", dtype=np.float32)
            g.nodes.append(gs.Node("Slice", inputs=[x, gs.Constant(f"s{i}", np.array([lo], np.int64)),
                                                    gs.Constant(f"e{i}", np.array([hi], np.int64)),
                                                    gs.Constant(f"a{i}", np.array([1], np.int64))], outputs=[xs]))
            p = gs.Variable(f"p{i}", dtype=np.float32)
            g.nodes.append(gs.Node("Conv", inputs=[xs, gs.Constant(f"w{i}", w[:, lo:hi].copy())], outputs=[p]))
            parts.append(p)
        conv.outputs.clear()
        g.nodes.append(gs.Node("Add", inputs=parts, outputs=[t]))
        return PassResult(True, {})


class WrongFold(Pass):
    """Test pass claiming to preserve function while scaling one weight tensor by 1 + 1e-3 (a fold
    that got a factor slightly wrong)."""
    name = "wrongfold"
    tolerance = 1e-4

    def run(self, g, ctx):
        layer = next(n for n in g.nodes if n.op in ("Conv", "MatMul", "Gemm") and ir.const(n.inputs[1]) is not None)
        w = ir.const(layer.inputs[1])
        layer.inputs[1] = gs.Constant(ir.fresh_name(g, "perturbed"), (w * np.float32(1 + 1e-3)).astype(w.dtype))
        return PassResult(True, {})


def _run(model, passes, factor=NOISE_FACTOR, calib=CALIB):
    from qgraph.data import open_samples
    g = ir.load(model)
    rep = Report()
    ctx = Context(calib=open_samples(calib, [t.name for t in g.inputs]))
    PassManager(passes, [rep, Verify(rep, noise_factor=factor)]).run(g, ctx)
    return rep


def test_reassociation_within_the_noise_floor_passes():
    rep = _run(cancelling_conv(), [SplitK()])
    noise = rep.meta["verify_noise"]["outputs"]["y"]["max_rel"]
    diff = rep.rows[1]["verify"]["outputs"]["y"]["max_rel"]
    assert noise > 1e-4                 # the model's own noise is above the pass's tolerance...
    assert 1e-4 < diff <= NOISE_FACTOR * noise      # ...and the rewrite's difference is of its size
    assert rep.rows[1]["verify"]["bounds"]["y"] == pytest.approx(NOISE_FACTOR * noise)
    assert "noise" in rep.format().splitlines()[2]  # the input row shows the noise


def test_reassociation_fails_without_the_noise_floor():
    with pytest.raises(PassError, match=r"'y' differs .* > bound 0\.0001"):
        _run(cancelling_conv(), [SplitK()], factor=0)


def test_wrong_fold_fails_on_the_digits_cnn():
    # the digits CNN's own noise is ~1e-7: its bound stays the pass's tolerance 1e-4, and one layer's
    # weights 1e-3 off move the logits by ~1e-3 of their range
    with np.load(DIGITS_SAMPLE) as z:
        calib = {"input": z["input"][:8]}
    with pytest.raises(PassError, match="pass 'wrongfold' failed.*model's own float noise"):
        _run(onnx_load(DIGITS), [WrongFold()], calib=calib)


def test_fold_cleanup_reports_noise_per_output_in_json():
    _, rep = qgraph.optimize(DIGITS, "fold,cleanup", calib=DIGITS_SAMPLE, verify=True, progress=False)
    d = rep.to_dict()
    noise = d["verify_noise"]["outputs"]
    assert set(noise) == set(d["passes"][1]["verify"]["outputs"])
    assert d["verify_noise"]["factor"] == NOISE_FACTOR
    for row in d["passes"][1:]:
        for name, bound in row["verify"]["bounds"].items():
            assert bound == max(row["verify"]["tolerance"], NOISE_FACTOR * noise[name]["max_rel"])


def test_negative_noise_factor_is_an_option_error():
    with pytest.raises(OptionError, match="noise factor"):
        Verify(noise_factor=-1)


def onnx_load(path):
    import onnx
    return onnx.load(str(path))
