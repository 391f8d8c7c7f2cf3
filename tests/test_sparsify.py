"""sparsify: unstructured sparsity by magnitude or OBS (SparseGPT), exact zeros that quant keeps.

Numbers are checked against their definitions: magnitude pruning zeroes exactly the smallest |w| (per
layer or under one global threshold), SparseGPT with H = I reduces to magnitude pruning, and with
real calibration data its layer output error is below magnitude pruning's. Zeros are checked to be
exactly 0.0 after quantization (sym and asym grids, nearest and gptq rounding).
"""
import numpy as np
import onnx
import pytest
from onnx import helper

from builders import init, make_model
from recorded import check_recorded, recorded_pipelines
from qgraph import ir
from qgraph.data import open_samples
from qgraph.errors import OptionError, QGraphError
from qgraph.passes import build_passes
from qgraph.passes.sparsify import Sparsify
from qgraph.pipeline import Context, PassManager
from qgraph.reconstruct import sparse_gpt


def mlp(rng, widths=(20, 32, 24, 6)):
    #   x [N, 20] ─Gemm(20→32)─Relu─Gemm(32→24)─Relu─Gemm(24→6)─ y
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits += [init(f"w{i}", rng.normal(0, 1 / np.sqrt(a), (b, a)).astype(np.float32)),
                  init(f"b{i}", rng.normal(0, 0.1, b).astype(np.float32))]
        y = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y + ("" if y == "y" else "_pre")],
                                      name=f"fc{i}", transB=1))
        if y != "y":
            nodes.append(helper.make_node("Relu", [y + "_pre"], [y], name=f"relu{i}"))
        x = y
    return make_model(nodes, [("x", ["N", widths[0]])], [("y", ["N", widths[-1]])], inits)


def convnet(rng):
    #   x [N,3,8,8] ─Conv(3→8, 3x3)─Relu─Conv(8→8, 3x3, 2 groups)─Relu─GlobalAveragePool─Flatten─Gemm(8→4)─ y
    inits = [init("w0", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             init("w1", rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)),
             init("w2", rng.normal(0, 0.5, (4, 8)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["b"], name="conv1", pads=[1, 1, 1, 1], group=2),
             helper.make_node("Relu", ["b"], ["s"]), helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], inits)


def run(model, spec, calib=None, ctx=None):
    g = ir.load(model)
    ctx = ctx or Context(progress=False)
    if calib is not None:
        ctx.calib = open_samples(calib, [t.name for t in g.inputs])
    pm = PassManager(build_passes(spec))
    pm.run(g, ctx)
    return pm.model, pm.results[-1][1].notes, ctx


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def layer_weights(model) -> dict[str, np.ndarray]:
    w = weights(model)
    return {n.name: w[n.input[1]] for n in model.graph.node if n.op_type in ("Gemm", "Conv")}


# --------------------------------------------------------------------------- magnitude

def test_layer_scope_zeroes_the_smallest_weights_of_every_layer(rng):
    model = mlp(rng)
    out, notes, _ = run(model, "sparsify:sparsity=0.75,scope=layer,reconstruct=false")
    before, after = layer_weights(model), layer_weights(out)
    for name, w in before.items():
        zero = after[name] == 0
        assert zero.sum() == round(0.75 * w.size)
        assert np.abs(w[zero]).max() <= np.abs(w[~zero]).min()          # the smallest went
        np.testing.assert_array_equal(after[name][~zero], w[~zero])     # the rest untouched
        assert notes["per_layer"][name] == pytest.approx(0.75, abs=1 / w.size)


def test_global_scope_uses_one_threshold(rng):
    model = mlp(rng)
    out, notes, _ = run(model, "sparsify:sparsity=0.8,reconstruct=false")
    before, after = layer_weights(model), layer_weights(out)
    kept = np.concatenate([np.abs(before[n][after[n] != 0]) for n in before])
    gone = np.concatenate([np.abs(before[n][after[n] == 0]) for n in before])
    assert gone.max() <= kept.min()
    assert notes["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert len(set(notes["per_layer"].values())) > 1                    # layers end unequal


# --------------------------------------------------------------------------- OBS (SparseGPT)

def test_sparse_gpt_with_identity_hessian_is_magnitude_pruning(rng):
    w = rng.normal(size=(1, 6, 16))
    h = np.eye(16)[None]
    got = sparse_gpt(w, h, 0.5, damp=0.0, block=16)
    want = w.copy().reshape(-1)
    want[np.argsort(np.abs(want))[:48]] = 0
    np.testing.assert_allclose(got, want.reshape(w.shape), atol=1e-12)


def test_sparse_gpt_beats_magnitude_on_correlated_inputs(rng):
    #   inputs with strong correlations: moving each pruned weight's error onto the others must leave a
    #   smaller output error tr(ΔW H ΔWᵀ) than zeroing the same number of smallest weights
    x = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 24)) + 0.1 * rng.normal(size=(500, 24))
    h = (x.T @ x / 500)[None]
    w = rng.normal(size=(1, 10, 24))
    mag = w.copy().reshape(-1)
    mag[np.argsort(np.abs(mag))[:180]] = 0
    mag = mag.reshape(w.shape)
    obs = sparse_gpt(w, h, 0.75)

    def err(q):
        d = (w - q)[0]
        return float(np.einsum("rk,kl,rl->", d, h[0], d))
    assert np.count_nonzero(obs == 0) == 180
    assert err(obs) < 0.5 * err(mag)


def test_reconstruct_lowers_the_layers_output_error(rng):
    model = mlp(rng)
    calib = {"x": rng.normal(size=(256, 20)).astype(np.float32)}
    out, notes, ctx = run(model, "sparsify:sparsity=0.7", calib)
    assert notes["output_error"]["obs"] < notes["output_error"]["magnitude"]
    assert notes["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert set(ctx.sparsity) == {"fc0", "fc1", "fc2"}


def test_grouped_conv_and_flatten_gemm_sparsify(rng):
    calib = {"x": rng.normal(size=(32, 3, 8, 8)).astype(np.float32)}
    out, notes, _ = run(convnet(rng), "sparsify:sparsity=0.5,scope=layer", calib)
    for name, w in layer_weights(out).items():
        assert np.count_nonzero(w == 0) >= round(0.5 * w.size) - 1, name


# --------------------------------------------------------------------------- zeros stay zeros

@pytest.mark.parametrize("quant", ["quant", "quant:weight_scheme=asym", "quant:rounding=gptq",
                                   "quant:rounding=gptq,weight_scheme=asym,bits=4"])
def test_zeros_stay_exact_through_quant(rng, quant):
    model = mlp(rng)
    calib = {"x": rng.normal(size=(64, 20)).astype(np.float32)}
    sparse, _, _ = run(model, "sparsify:sparsity=0.6,reconstruct=false")
    zeros = {n: w == 0 for n, w in layer_weights(sparse).items()}
    out, _, _ = run(model, f"sparsify:sparsity=0.6,reconstruct=false,{quant}", calib)
    w = weights(out)
    for node in out.graph.node:
        if node.op_type != "Gemm":
            continue
        dq = next(n for n in out.graph.node if n.output[0] == node.input[1])
        q = w[dq.input[0]].astype(np.int64)
        zp = w[dq.input[2]].astype(np.int64) if len(dq.input) > 2 else np.zeros(1, np.int64)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        zp = zp.reshape([-1 if i == axis else 1 for i in range(q.ndim)]) if zp.size > 1 else zp
        assert np.all(q[zeros[node.name]] == np.broadcast_to(zp, q.shape)[zeros[node.name]]), node.name


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("value", ["0", "1", "1.2"])
def test_sparsity_outside_the_open_interval_is_an_option_error(value):
    with pytest.raises(OptionError, match=r"sparsity must be in \(0, 1\)"):
        Sparsify(sparsity=value)


def test_ops_must_be_layer_types():
    with pytest.raises(OptionError, match="Relu is not a layer type"):
        Sparsify(ops="Gemm;Relu")


def test_reconstruct_without_calibration_data_is_an_error(rng):
    with pytest.raises(QGraphError, match="needs calibration data"):
        Sparsify().run(ir.load(mlp(rng)), Context())


# --------------------------------------------------------------------------- zoo (pytest -m zoo)

@pytest.mark.zoo
@pytest.mark.parametrize("name,pipeline", recorded_pipelines("sparsify") or [("-", "-")])
def test_recorded_sparsify_figures(name, pipeline):
    if name == "-":
        pytest.skip("no sparsify pipeline recorded in models/manifest.toml (python tools/zoo.py record ...)")
    check_recorded(name, pipeline)
