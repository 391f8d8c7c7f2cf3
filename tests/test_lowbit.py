"""Low-bit quantization: binary / ternary / power-of-two grids (``qgraph.grids``), 2-4-bit activations,
``rounding=gptq`` and ``biascorr`` on them, and the bit-serial runtime end to end.

Positive cases run the QDQ model in ONNX Runtime and compare it with the float model whose weights are
replaced by the grid's values computed here in numpy: both sides then hold the same weights, and the
tolerance (rel_err <= 0.02) covers the 8-bit activation roundings only (a few steps of 1/255 of the
output range). A wrong α, threshold or channel axis moves the output by far more than that.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from builders import DIGITS, DIGITS_SAMPLE, init, make_model, rel_err, run_ort
from qgraph.errors import OptionError, QGraphError
from qgraph.grids import pot_levels, weight_integers, grid_qparams
from qgraph.ops import QParams, find_groups, nearest_level, quantize
from qgraph import ir

TOL = 0.02


def conv_relu_model(rng, cout: int = 6, cin: int = 8):
    #   x ─Conv(w, b)─ Relu ─ Conv(w2, b2) ─ y
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, cout, 1, 1)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w", w), init("b", rng.standard_normal(cout).astype(np.float32) * 0.1),
             init("w2", w2), init("b2", np.zeros(4, np.float32))]
    return make_model(nodes, [("x", ["N", cin, 6, 6])], [("y", ["N", 4, 6, 6])], inits), w, w2


def _with_weights(model, **weights):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(init(t.name, weights[t.name].astype(np.float32)))
    return m


def _quantize(model, spec, rng, n=32):
    calib = {"x": rng.standard_normal((n, 8, 6, 6)).astype(np.float32)}
    q, rep = qgraph.optimize(model, spec, calib=calib, progress=False)
    return q, rep.rows[-1]["notes"], calib


# ----------------------------------------------------------------------------- the grids' decisions

def test_binary_is_sign_times_mean_magnitude_per_channel(rng):
    w = rng.standard_normal((3, 4, 3, 3))
    w[1, 0, 0, 0] = 0.0
    qp = grid_qparams(w, grid="binary", bits=8, storage="int8", axis=0)
    q = weight_integers(w, qp)
    assert set(np.unique(q)) <= {-1, 1} and q[1, 0, 0, 0] == 1                 # sign(0) = +1
    assert np.allclose(qp.scale, np.abs(w).reshape(3, -1).mean(axis=1), rtol=1e-6)
    assert qp.bits == 1 and list(qp.levels) == [-1, 1]


def test_ternary_thresholds_at_0_7_mean_magnitude(rng):
    w = rng.standard_normal((2, 50))
    qp = grid_qparams(w, grid="ternary", bits=8, storage="int8", axis=0)
    q = weight_integers(w, qp)
    delta = 0.7 * np.abs(w).mean(axis=1, keepdims=True)
    assert np.array_equal(q, (np.sign(w) * (np.abs(w) > delta)).astype(np.int64))
    kept = np.abs(w) > delta
    assert np.allclose(qp.scale, (np.abs(w) * kept).sum(1) / kept.sum(1), rtol=1e-6)


@pytest.mark.parametrize("bits,top", [(2, 1), (3, 4), (4, 64)])
def test_pot_levels_are_zero_and_powers_of_two(bits, top):
    lv = pot_levels(bits)
    mags = lv[lv > 0]
    assert 0 in lv and lv.max() == top and np.array_equal(lv, -lv[::-1])
    assert np.all(mags == 2 ** np.round(np.log2(mags)))


def test_pot_integers_are_the_nearest_level_and_mse_is_no_worse(rng):
    w = rng.standard_normal((4, 64))
    mm = grid_qparams(w, grid="pot", bits=3, storage="int8", axis=0, method="minmax")
    ms = grid_qparams(w, grid="pot", bits=3, storage="int8", axis=0, method="mse")
    for qp in (mm, ms):
        q = weight_integers(w, qp)
        assert set(np.unique(q)) <= set(pot_levels(3))
        assert np.array_equal(q, nearest_level(w / qp.scale[:, None], pot_levels(3)))
    err = [np.square(weight_integers(w, qp) * qp.scale[:, None] - w).sum() for qp in (mm, ms)]
    assert err[1] <= err[0] + 1e-12
    # minmax: the largest weight of each row sits on the top level
    assert np.allclose(np.abs(w).max(1), mm.scale * 4, rtol=1e-6)


def test_nearest_level_ties_go_up():
    assert list(nearest_level(np.array([-0.5, 0.0, 0.49, 0.5, 1.5, 3.0]), np.array([-1, 0, 1, 2, 4]))) == \
        [0, 0, 0, 1, 2, 4]
    qp = QParams(scale=np.float32(0.5), zero_point=np.int8(0), levels=np.array([-1, 1]))
    assert list(quantize(np.array([-0.1, 0.0, 3.0]), qp)) == [-1, 1, 1]


# ----------------------------------------------------------------------------- the quant pass

@pytest.mark.parametrize("grid,extra", [("binary", ""), ("ternary", ""), ("pot", ",bits=4"), ("pot", ",bits=3")])
@pytest.mark.parametrize("storage4", ["int4", "int8"])
def test_grid_weights_run_in_ort_as_the_grid(rng, grid, extra, storage4):
    model, w, w2 = conv_relu_model(rng)
    q, notes, calib = _quantize(model, f"quant:weight_grid={grid},storage4={storage4}{extra}", rng)
    assert notes["weight_grid"] == {grid: 2}
    groups = {grp.node.name: grp for grp in find_groups(ir.load(q))}
    for name, wf in (("conv", w), ("conv2", w2)):
        qp = groups[name].weight_qparams
        ints = groups[name].weight_int.astype(np.int64)
        assert set(np.unique(ints)) <= set(notes_levels(grid, extra))
        want_storage = "int4" if storage4 == "int4" and max(notes_levels(grid, extra)) <= 7 else "int8"
        assert qp.storage == want_storage
    # ORT on the QDQ model == the float model with the grid's weights (8-bit activations only differ)
    g = ir.load(q)
    wq = {grp.node.name: grp.weight_float() for grp in find_groups(g)}
    ref = _with_weights(model, w=wq["conv"], w2=wq["conv2"])
    feeds = {"x": calib["x"][:4]}
    assert rel_err(run_ort(ref, feeds)[0], run_ort(q, feeds)[0]) < TOL


def notes_levels(grid, extra):
    return {"binary": [-1, 1], "ternary": [-1, 0, 1]}.get(grid) or list(pot_levels(int(extra.split("=")[1])))


def test_precision_keeps_named_layers_uniform(rng):
    model, _, _ = conv_relu_model(rng)
    _, notes, _ = _quantize(model, "quant:weight_grid=binary,precision=first@8", rng)
    assert notes["weight_grid"] == {"binary": 1}
    assert notes["weight_bits"] == {"1b": 1, "8b": 1}


@pytest.mark.parametrize("spec,message", [
    ("quant:weight_grid=pot", "weight_grid=pot takes bits 2..4"),
    ("quant:weight_grid=binary,weight_scheme=asym", "is symmetric"),
    ("quant:act_bits=5", "act_bits"),
])
def test_bad_low_bit_options_say_why(rng, spec, message):
    model, _, _ = conv_relu_model(rng)
    with pytest.raises(OptionError, match=message):
        _quantize(model, spec, rng)


# ----------------------------------------------------------------------------- 2-4-bit activations

@pytest.mark.parametrize("act_dtype,bits", [("int8", 2), ("uint8", 3), ("int8", 4)])
def test_narrow_activations_are_clipped_to_their_range_before_q(rng, act_dtype, bits):
    #   x ─Q(8b)─DQ─Conv─[Clip]─Q(bits)─DQ─Conv─Q(8b)─DQ─ y       (graph input and output stay 8-bit)
    model, _, _ = conv_relu_model(rng)
    q, notes, calib = _quantize(model, f"quant:act_bits={bits},act_dtype={act_dtype}", rng)
    assert notes["act_bits"] == {f"{bits}b": 1, "8b": 2}
    assert notes["act_kept_8_bits"] == {"graph_input": 1, "graph_output": 1}
    clips = [n for n in q.graph.node if n.op_type == "Clip"]
    assert len(clips) == 1
    # the integers Q writes stay inside the narrow range
    qs = [n.output[0] for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith("_Clip_out")]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(q)
    for name in qs:
        exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    outs = run_ort(exposed, {"x": calib["x"][:8]})[1:]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if act_dtype == "int8" else (0, (1 << bits) - 1)
    for v in outs:
        assert v.min() >= lo and v.max() <= hi and len(np.unique(v)) > 1


def test_narrow_activation_written_by_a_pool_stays_8_bits(rng):
    #   x ─Conv─ c ─GlobalAveragePool─ p ─Flatten─ f ─Gemm─ y       p: written by a pool, kept at 8 bits
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    g = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "g"], ["y"], name="fc")]
    model = make_model(nodes, [("x", ["N", 8, 6, 6])], [("y", ["N", 3])], [init("w", w), init("g", g)])
    _, notes, _ = _quantize(model, "quant:act_bits=2", rng)
    assert notes["act_kept_8_bits"] == {"graph_input": 1, "graph_output": 1, "written_by_GlobalAveragePool": 1}


# ----------------------------------------------------------------------------- gptq and biascorr on grids

@pytest.mark.parametrize("grid", ["binary", "ternary", "pot,bits=3"])
def test_gptq_on_a_grid_lowers_the_output_error(rng, grid):
    model, _, _ = conv_relu_model(rng)
    q, notes, calib = _quantize(model, f"quant:weight_grid={grid},rounding=gptq", rng, n=64)
    assert notes["rounding"]["gptq"] == 2
    assert notes["rounding"]["output_error_vs_nearest"] <= 1.0
    levels = {"binary": [-1, 1], "ternary": [-1, 0, 1]}.get(grid, list(pot_levels(3)))
    for grp in find_groups(ir.load(q)):
        assert set(np.unique(grp.weight_int.astype(np.int64))) <= set(levels)


def test_biascorr_after_binary_weights_moves_the_output_mean_back(rng):
    model, _, _ = conv_relu_model(rng)
    calib = {"x": rng.standard_normal((64, 8, 6, 6)).astype(np.float32)}
    plain, _ = qgraph.optimize(model, "quant:weight_grid=binary", calib=calib, progress=False)
    corrected, rep = qgraph.optimize(model, "quant:weight_grid=binary,biascorr", calib=calib, progress=False)
    assert rep.rows[-1]["notes"]["corrected"] == 2
    ref = run_ort(model, calib)[0]
    shift = [np.abs((run_ort(m, calib)[0] - ref).mean(axis=(0, 2, 3))).mean() for m in (plain, corrected)]
    assert shift[1] < 0.5 * shift[0]


# ----------------------------------------------------------------------------- sparsify, then a grid

@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_sparse_layer_cannot_be_binary(rng, rounding):
    #   x ─Conv(w)─Relu─Conv(w2)─ y      sparsify zeroes 60 % of both weights; binary has no 0 to keep them
    #   (nearest would make them +α, gptq the code 0: a ternary layer), so quant refuses and names the layers
    model, _, _ = conv_relu_model(rng)
    with pytest.raises(QGraphError, match=r"weight_grid=binary has no zero level.*2 layer\(s\): conv \(60% zeros\), "
                                          r"conv2 \(58% zeros\); use weight_grid=ternary"):
        _quantize(model, f"sparsify:sparsity=0.6,scope=layer,reconstruct=false,"
                         f"quant:weight_grid=binary,rounding={rounding}", rng)


def _sparse_zeros(model, spec: str) -> dict[str, np.ndarray]:
    """Per Conv, where ``spec`` (a sparsify pass alone) leaves its weight exactly 0."""
    sparse, _ = qgraph.optimize(model, spec, progress=False)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in sparse.graph.initializer}
    return {n.name: w[n.input[1]] == 0 for n in sparse.graph.node if n.op_type == "Conv"}


def test_sparse_layer_kept_off_the_binary_grid_by_precision(rng):
    #   x ─Conv(w: sparse, precision=conv@4: uniform)─Relu─Conv(w2: dense, binary)─ y
    model, _, _ = conv_relu_model(rng)
    sparsify = "sparsify:sparsity=0.6,scope=layer,reconstruct=false,exclude=conv2"
    zeros = _sparse_zeros(model, sparsify)
    q, _, _ = _quantize(model, f"{sparsify},quant:weight_grid=binary,precision=conv@4", rng)
    ints = {grp.node.name: grp.weight_int.astype(np.int64) for grp in find_groups(ir.load(q))}
    assert zeros["conv"].mean() > 0.5 and not zeros["conv2"].any()
    assert set(np.unique(ints["conv2"])) == {-1, 1}                     # dense: binary
    assert np.all(ints["conv"][zeros["conv"]] == 0)                     # sparse, uniform 4-bit: zeros kept
    assert ints["conv"].min() < -1 and ints["conv"].max() > 1


@pytest.mark.parametrize("grid", ["ternary", "pot,bits=3"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_sparse_zeros_stay_exact_on_grids_with_zero(rng, grid, rounding):
    #   ternary and power-of-two grids hold 0: sparsify's zeros are the code 0 (nearest, and gptq's pinned zeros)
    model, _, _ = conv_relu_model(rng)
    sparsify = "sparsify:sparsity=0.6,scope=layer,reconstruct=false"
    zeros = _sparse_zeros(model, sparsify)
    q, _, _ = _quantize(model, f"{sparsify},quant:weight_grid={grid},rounding={rounding}", rng)
    groups = find_groups(ir.load(q))
    assert len(groups) == 2
    for grp in groups:
        assert np.all(grp.weight_int[zeros[grp.node.name]] == 0), grp.node.name


# ----------------------------------------------------------------------------- end to end on the digits CNN

DIGITS_LOW_BIT = {
    "W1A8": "fold,quant:weight_grid=binary,storage4=int8",
    "W2A8": "fold,quant:bits=2,storage4=int8",
    "ternary": "fold,quant:weight_grid=ternary",
    "W1A2": "fold,quant:weight_grid=binary,act_bits=2",
}


@pytest.fixture(scope="module")
def digits_low_bit():
    data = np.load(DIGITS_SAMPLE)
    calib = {"input": data["input"]}
    out = {}
    for key, spec in DIGITS_LOW_BIT.items():
        out[key] = qgraph.optimize(str(DIGITS), spec, calib=calib, progress=False)[0]
    return out, {"input": data["input"][:96]}


@pytest.mark.parametrize("key", list(DIGITS_LOW_BIT))
@pytest.mark.parametrize("mode", ["float", "fixed"])
def test_digits_bitserial_equals_int8_end_to_end(digits_low_bit, key, mode):
    from qgraph.kernels import lower, run
    models, feeds = digits_low_bit
    outs, ran = {}, {}
    for kernel in ("int8", "bitserial", "auto"):
        prog = lower(models[key], kernel=kernel)
        outs[kernel] = run(prog, feeds, mode)["logits"]
        ran[kernel] = [s.cache["ran"] for s in prog.steps if "ran" in s.cache]
    assert np.array_equal(outs["bitserial"], outs["int8"]) and np.array_equal(outs["auto"], outs["int8"])
    dots = [s for s in prog.steps if s.op in ("QLinearConv", "QGemm", "QLinearMatMul")]
    if mode == "float" and all("ort_float" in s.attrs for s in dots):
        # ORT runs every unit in float (4-bit weight storage; W1A2's Clips narrower than Q's range):
        # so does float mode, Gemm included since it has a float unit: no dot product runs
        assert ran["bitserial"] == [] and ran["auto"] == []
        return
    assert ran["bitserial"] and all(r.startswith("bitserial") for r in ran["bitserial"])
    if mode == "fixed":        # no unit runs ORT's float path: every Conv and Gemm was a dot product
        assert len(ran["bitserial"]) == 7
    if key == "W1A2":          # auto takes the 2-bit activations x binary weights bit-serially
        assert any(r.startswith("bitserial") for r in ran["auto"])


@pytest.mark.parametrize("key", list(DIGITS_LOW_BIT))
def test_digits_low_bit_float_mode_is_orts_result(digits_low_bit, key):
    from qgraph.kernels import lower
    from qgraph.kernels.diff import against_ort
    models, feeds = digits_low_bit
    figures, _, _ = against_ort(models[key], feeds, "float", lower(models[key], kernel="bitserial"))
    assert all(f["exact"] == 1.0 for f in figures.values()), figures


def test_digits_predicted_float_units_are_orts_with_int4_weights_and_narrow_clips(digits_low_bit):
    from qgraph.kernels.diff import ort_float_nodes
    from qgraph.kernels.lower import ort_float_units
    models, _ = digits_low_bit
    for key in ("ternary", "W1A2"):
        g = ir.load(models[key])
        g.toposort()
        assert {n.name for n in ort_float_units(g)} == ort_float_nodes(models[key]), key


# ----------------------------------------------------------------------------- zoo (pytest -m zoo)

#: low-bit pipelines whose LeNet / digits figures are recorded in models/manifest.toml, with and without
#: gptq (python tools/zoo.py record lenet5 lenet_300_100 digits_cnn --pipelines "<these, ;-separated>")
ZOO_LOW_BIT = ("fold,quant:weight_grid=binary", "fold,quant:bits=2", "fold,quant:weight_grid=ternary")
ZOO_LOW_BIT_GPTQ = tuple(p + ",rounding=gptq" for p in ZOO_LOW_BIT)


def _zoo(name: str):
    import sys
    from builders import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import zoo_manifest
    from zoo_data import DataMissing, zoo_split
    path = zoo_manifest.model_path(name)
    if not path.exists():
        pytest.skip(f"zoo model {name} not built ({path}): python tools/zoo.py build {name}")
    try:
        calib, evaluation = zoo_split(name)
    except DataMissing as exc:
        pytest.skip(str(exc))
    return zoo_manifest, path, calib, evaluation


@pytest.mark.zoo
@pytest.mark.parametrize("name,pipeline",
                         [(n, p) for n in ("lenet5", "lenet_300_100", "digits_cnn") for p in ZOO_LOW_BIT + ZOO_LOW_BIT_GPTQ]
                         + [("mobilenet_v2", "fold,quant:bits=4,rounding=gptq")])   # MobileNetV2's headline cell
def test_zoo_low_bit_accuracy_is_the_recorded_one(name, pipeline):
    zoo_manifest, _, _, _ = _zoo(name)
    from zoo_eval import compare, run_pipeline
    recorded = zoo_manifest.load_manifest()["models"][name].get("pipelines", {}).get(pipeline)
    if not recorded:
        pytest.skip(f"{name}: '{pipeline}' not recorded: python tools/zoo.py record {name} --pipelines '{pipeline}'")
    problems = compare(run_pipeline(name, pipeline), recorded)
    assert not problems, f"{name} / {pipeline}: " + "; ".join(problems)


@pytest.mark.zoo
@pytest.mark.parametrize("pipeline", ZOO_LOW_BIT + ("fold,quant:weight_grid=binary,storage4=int8",))
@pytest.mark.parametrize("name", ["lenet5", "digits_cnn"])
def test_zoo_bitserial_equals_int8_end_to_end(name, pipeline):
    """W1A8, W2A8, ternary: the bit-serial program's outputs are the int8 program's, element for
    element, in both requantization modes; float mode is ORT's result (int4 weights: ORT's float
    units, reproduced; int8 storage: ORT's integer kernels)."""
    from qgraph.kernels import lower, run
    from qgraph.kernels.diff import against_ort
    _, path, calib, evaluation = _zoo(name)
    model, _ = qgraph.optimize(str(path), pipeline, calib=calib, progress=False)
    feeds = next(evaluation.subset(range(min(512, len(evaluation)))).batches(512))
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in model.graph.input}}
    for mode in ("float", "fixed"):
        progs = {k: lower(model, kernel=k) for k in ("int8", "bitserial")}
        outs = {k: run(p, feeds, mode) for k, p in progs.items()}
        for out in outs["int8"]:
            assert np.array_equal(outs["bitserial"][out], outs["int8"][out]), (name, pipeline, mode, out)
        ran = [s.cache["ran"] for s in progs["bitserial"].steps if "ran" in s.cache]
        assert ran and all(r.startswith("bitserial") for r in ran)
    figures, _, _ = against_ort(model, feeds, "float", lower(model, kernel="bitserial"))
    assert all(f["exact"] == 1.0 for f in figures.values()), figures


def test_qgraph_run_kernel_option_reports_what_ran(digits_low_bit, tmp_path, capsys):
    from qgraph.cli import run_main
    models, feeds = digits_low_bit
    path, inputs = tmp_path / "w1a2.onnx", tmp_path / "x.npz"
    onnx.save(models["W1A2"], path)
    np.savez(inputs, **feeds)
    assert run_main([str(path), "--inputs", str(inputs), "--kernel", "bitserial", "--mode", "fixed",
                     "--compare-ort", "--max-lsb", "255"]) == 0
    text = capsys.readouterr().out
    assert "dot products (--kernel bitserial): bitserial W ±1 x A 2-bit signed: 5, bitserial W ±1 x A 8-bit signed: 2" \
        in text, text
    with pytest.raises(SystemExit) as exc:           # argparse: one line, exit code 2
        run_main([str(path), "--inputs", str(inputs), "--kernel", "nope"])
    assert exc.value.code == 2
