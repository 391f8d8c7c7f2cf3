"""biascorr: per-channel mean correction after quantization (DFQ §4.2), empirical and analytic."""
import numpy as np
import onnx
import pytest
from onnx import helper

from builders import init, make_model
from qgraph import ir
from qgraph.errors import PassError
from qgraph.passes import build_passes
from qgraph.pipeline import BNStats, Context, PassManager
from qgraph.ops import find_groups, qparams_of
from qgraph.ops import dequantize


def chain(rng, cin=3, c=6, cout=4):
    #   x ─Conv1x1(w1, b1)─ h ─Relu─ r ─Conv1x1(w2, b2)─ y
    inits = [init("w1", rng.normal(size=(c, cin, 1, 1)).astype(np.float32)),
             init("b1", rng.normal(0.5, 0.2, size=(c,)).astype(np.float32)),
             init("w2", (rng.normal(size=(cout, c, 1, 1)) * 0.3).astype(np.float32)),
             init("b2", rng.normal(size=(cout,)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    return make_model(nodes, [("x", ["N", cin, 5, 5])], [("y", ["N", cout, 5, 5])], inits)


def quantized(model, calib, bits=6, bn_stats=None):
    g = ir.load(model)
    ctx = Context(calib=calib, progress=False, bn_stats=bn_stats or {})
    PassManager(build_passes(f"quant:bits={bits},granularity=tensor")).run(g, ctx)
    return g, ctx


def conv2_bias(g) -> np.ndarray:
    grp = next(grp for grp in find_groups(g, ("Conv",)) if grp.node.name == "conv2")
    return dequantize(ir.const(grp.b_dq.inputs[0]).astype(np.int64), qparams_of(grp.b_dq)).astype(np.float64)


def samples(rng, n=64):
    from qgraph.data import open_samples
    return open_samples({"x": rng.normal(size=(n, 3, 5, 5)).astype(np.float32)}, ["x"])


def test_analytic_reproduces_the_clipped_normal_correction(rng):
    model = chain(rng)
    beta, gamma = np.array([0.5, -0.3, 1.0, 0.1, 2.0, -1.0]), np.array([1.0, 0.5, 0.2, 2.0, 1.0, 0.3])
    g, ctx = quantized(model, samples(rng), bn_stats={"h": BNStats(beta=beta, gamma=gamma)})
    before = conv2_bias(g)
    grp = next(grp for grp in find_groups(g, ("Conv",)) if grp.node.name == "conv2")
    w_float = ctx.quant.float_weights[grp.w_dq.outputs[0].name].astype(np.float64)
    w_quant = grp.weight_float()
    lo, hi = (float(v) for v in qparams_of(ir.producer(grp.x_dq.inputs[0])).real_range())
    # E[clip(N(β, γ²), max(lo, 0), hi)] by numerical integration, independent of the closed form
    z = np.linspace(-12, 12, 200001)
    pdf = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    ex = np.array([np.trapezoid(np.clip(b + s * z, max(lo, 0.0), hi) * pdf, z) for b, s in zip(beta, gamma)])
    expected = -((w_quant - w_float)[:, :, 0, 0] @ ex)

    PassManager(build_passes("biascorr:mode=analytic")).run(g, ctx)

    scale = float(np.max(qparams_of(grp.b_dq).scale))
    np.testing.assert_allclose(conv2_bias(g) - before, expected, atol=scale)  # int32 rounding: ≤ 1 LSB


def test_empirical_puts_output_means_back_on_the_float_model(rng):
    model = chain(rng)
    data = samples(rng, 128)
    g, ctx = quantized(model, data, bits=5)  # coarse weights: a visible mean shift
    from builders import run_ort
    x = np.concatenate([b["x"] for b in data.batches(128)])

    def conv2_out_mean(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
        return run_ort(m, {"x": x})[-1].mean(axis=(0, 2, 3))

    target = run_ort(model, {"x": x})[0].mean(axis=(0, 2, 3))
    err_before = np.abs(conv2_out_mean(ir.to_model(g)) - target)
    manager = PassManager(build_passes("biascorr"))
    manager.run(g, ctx)
    err_after = np.abs(conv2_out_mean(ir.to_model(g)) - target)
    assert np.max(err_after) < 0.1 * np.max(err_before)
    notes = manager.results[0][1].notes
    assert notes["corrected"] == 2 and notes["runs"] == 2  # conv2 measured after conv1 was corrected


def test_biascorr_without_quant_state_says_what_to_do(rng):
    g, _ = quantized(chain(rng), samples(rng))
    with pytest.raises(PassError, match=r"pass 'biascorr' failed \(after: none\).*after 'quant'"):
        PassManager(build_passes("biascorr")).run(g, Context())


def test_biascorr_error_names_the_passes_that_ran(rng):
    g = ir.load(chain(rng))
    with pytest.raises(PassError, match=r"pass 'biascorr' failed \(after: quant\): mode=empirical needs"):
        PassManager(build_passes("quant:bits=6,weight_only=true,biascorr")).run(g, Context(progress=False))


def test_empirical_without_data_names_the_option(rng):
    g, ctx = quantized(chain(rng), samples(rng))
    ctx.calib = None
    with pytest.raises(PassError, match="mode=analytic"):
        PassManager(build_passes("biascorr")).run(g, ctx)


def test_biascorr_requires_a_quantized_model(rng):
    with pytest.raises(PassError, match="put 'quant' before"):
        PassManager(build_passes("biascorr")).run(ir.load(chain(rng)), Context())


def test_weight_only_model_gets_its_float_bias_corrected(rng):
    #   weight-only quantization leaves activations (and biases) float: the float bias moves
    model = chain(rng)
    data = samples(rng, 64)
    g = ir.load(model)
    ctx = Context(calib=data, progress=False)
    manager = PassManager(build_passes("quant:bits=3,granularity=tensor,weight_only=true,biascorr"))
    manager.run(g, ctx)
    notes = manager.results[-1][1].notes
    assert notes["corrected"] == 2 and "skipped" not in notes
    onnx.checker.check_model(ir.to_model(g))


def relu_means(model, x, name):
    from builders import run_ort
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return run_ort(m, {"x": x})[-1].mean(axis=(0, 2, 3))


def test_activation_target_matches_the_mean_the_next_layer_reads(rng):
    #   conv1 is read through a Relu: what must match the float model is E[relu(h)], not E[h]; a channel
    #   that is (almost) never positive is dead in both models and keeps its bias
    model = chain(rng)
    b1 = next(t for t in model.graph.initializer if t.name == "b1")
    bias = onnx.numpy_helper.to_array(b1).copy()
    bias[0] = -30.0
    b1.CopyFrom(init("b1", bias))
    data = samples(rng, 128)
    x = np.concatenate([b["x"] for b in data.batches(128)])
    target = relu_means(model, x, "r")
    errs, shifts = {}, {}
    for t in ("activation", "output"):
        g = ir.load(model)
        ctx = Context(calib=data, progress=False)
        PassManager(build_passes(f"quant:bits=3,granularity=tensor,weight_only=true,biascorr:target={t}")).run(g, ctx)
        conv1 = next(n for n in g.nodes if n.name == "conv1")
        shifts[t] = ir.const(conv1.inputs[2]).astype(np.float64) - bias
        errs[t] = np.abs(relu_means(ir.to_model(g), x, "r") - target)
    assert shifts["activation"][0] == 0.0 and shifts["output"][0] != 0.0
    assert np.max(errs["activation"]) < 0.02 * np.max(np.abs(target))
    assert np.max(errs["activation"]) <= np.max(errs["output"]) + 1e-6


def bounded(rng, mins, readers=1):
    #   x ─Conv─ h ─Relu─ r ─Min(m)─ y   (and a second reader of h when readers == 2)
    inits = [init("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)),
             init("b", np.zeros(4, np.float32)), init("m", np.asarray(mins, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Min", ["r", "m"], ["y"], name="min")]
    outs = [("y", ["N", 4, 5, 5])]
    if readers == 2:
        nodes.append(helper.make_node("Neg", ["h"], ["z"], name="neg"))
        outs.append(("z", ["N", 4, 5, 5]))
    g = ir.load(make_model(nodes, [("x", ["N", 3, 5, 5])], outs, inits))
    PassManager(build_passes("quant:weight_only=true")).run(g, Context(progress=False))
    return g, next(iter(find_groups(g, ("Conv",))))


@pytest.mark.parametrize("mins, readers, expected", [
    (np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1), 1, ([0, 0, 0, 0], [1, 2, 3, 4])),
    ([6.0], 1, ([0, 0, 0, 0], [6, 6, 6, 6])),
    (np.arange(1, 6, dtype=np.float32), 1, ([0, 0, 0, 0], [np.inf] * 4)),  # [5] broadcasts along W
    ([6.0], 2, None),                                                      # h has another reader
])
def test_output_bounds_follow_the_clipping_chain(rng, mins, readers, expected):
    from qgraph.passes.biascorr import _output_bounds
    g, grp = bounded(rng, mins, readers)
    got = _output_bounds(g, grp)
    if expected is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_w8a8_layer_is_matched_on_its_quantizer_range(rng):
    #   conv1's Relu is absorbed into its output quantizer: what the next layer reads is clip(h, 0, rmax)
    from qgraph.passes.biascorr import _output_bounds
    g, ctx = quantized(chain(rng), samples(rng), bits=8)
    grp = next(grp for grp in find_groups(g, ("Conv",)) if grp.node.name == "conv1")
    assert not any(n.op == "Relu" for n in g.nodes)
    lo, hi = _output_bounds(g, grp)
    q = next(n for n in ir.consumers(grp.node.outputs[0]))
    qlo, qhi = qparams_of(q).real_range()
    np.testing.assert_allclose(lo, np.maximum(qlo, 0.0))
    np.testing.assert_allclose(hi, qhi)
    assert np.all(np.isfinite(hi)) and np.all(hi > 0)


def branchy(rng):
    #   x ─Conv a─ ha ─Relu─ ra ─┬─Conv b─ hb ─Relu─ rb ─Conv c─ hc ─┐
    #                            │                                    ├─Add─ s ─Conv d─ y
    #                            └─Conv e─ he ───────────────────────┘
    #   waves: a | b, e | c | d — e's output crosses two waves to the Add (a cached skip)
    def conv(name, cin, cout):
        return [init(f"w{name}", (rng.normal(size=(cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)),
                init(f"b{name}", rng.normal(0.2, 0.3, size=(cout,)).astype(np.float32))]
    inits = conv("a", 3, 6) + conv("b", 6, 5) + conv("c", 5, 4) + conv("e", 6, 4) + conv("d", 4, 3)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ha"], name="a"),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "wb", "bb"], ["hb"], name="b"),
             helper.make_node("Relu", ["hb"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["rb", "wc", "bc"], ["hc"], name="c"),
             helper.make_node("Conv", ["ra", "we", "be"], ["he"], name="e"),
             helper.make_node("Add", ["hc", "he"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wd", "bd"], ["y"], name="d")]
    return make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 3, 5, 5])], inits)


def whole_model_biascorr(g, ctx, target):
    """The definition, run the slow way: for each wave, the whole corrected QDQ model up to the wave's
    outputs, its per-channel means in float64 (what biascorr computed before it replayed segments)."""
    from qgraph.passes import biascorr as bc
    from qgraph.ops import MATRIX_LAYER_OPS
    layers = find_groups(g, MATRIX_LAYER_OPS)
    names = {grp.node.outputs[0].name: bc._float_name(g, grp) for grp in layers}
    bounds = {n: b for grp in layers if target == "activation" and (b := bc._output_bounds(g, grp)) is not None
              for n in [grp.node.outputs[0].name]}
    x = np.concatenate([b["x"] for b in ctx.calib.batches(1000)])

    def means(model, wanted, rename):
        m = onnx.ModelProto.FromString(model.SerializeToString())
        for n in wanted:
            m.graph.output.append(helper.make_tensor_value_info(rename(n), onnx.TensorProto.FLOAT, None))
        from builders import run_ort
        values = run_ort(m, {"x": x})[-len(wanted):]
        out = {}
        for n, v in zip(wanted, values):
            flat = np.moveaxis(v.astype(np.float64), 1, 0).reshape(v.shape[1], -1)
            st = {"mean": flat.mean(axis=1)}
            if n in bounds:
                lo, hi = (b[:, None] for b in bounds[n])
                st["act"] = np.clip(flat, lo, hi).mean(axis=1)
                st["active"] = ((flat > lo) & (flat < hi)).mean(axis=1)
            out[n] = st
        return out
    fl = means(ctx.quant.float_model, list(names), names.get)
    for wave in bc._waves(g, layers):
        wanted = [grp.node.outputs[0].name for grp in wave]
        qt = means(ir.to_model(g), wanted, lambda n: n)
        for grp in wave:
            bc._add_to_bias(g, grp, bc._shift(fl[grp.node.outputs[0].name], qt[grp.node.outputs[0].name]))


def int_biases(g) -> dict[str, np.ndarray]:
    return {grp.node.name: ir.const(grp.b_dq.inputs[0]) for grp in find_groups(g, ("Conv",))}


@pytest.mark.parametrize("target, cache_mb", [("activation", 512.0), ("output", 512.0), ("activation", 0.0)])
def test_replayed_segments_equal_the_whole_model_definition(rng, target, cache_mb):
    # W6A8: each layer's correction from the corrected QDQ model's own input; replaying segments from
    # cached cuts must give the same int32 biases as running the whole model once per wave. Tolerance
    # 1 LSB of the int32 bias: the means are float32 sums per image and channel in ORT here, float64
    # sums over everything in the reference; a shift within 1e-6 of a rounding boundary may round apart.
    model = branchy(rng)
    data = samples(rng, 40)
    g_ref, ctx_ref = quantized(model, data, bits=6)
    g_new, ctx_new = quantized(model, data, bits=6)
    whole_model_biascorr(g_ref, ctx_ref, target)
    manager = PassManager(build_passes(f"biascorr:target={target},batch_size=16,cache_mb={cache_mb}"))
    manager.run(g_new, ctx_new)
    notes = manager.results[0][1].notes
    assert notes["corrected"] == 5 and notes["runs"] == 4                # waves a | b, e | c | d
    if cache_mb == 0:
        assert notes["spilled_mb"] > 0 and notes["cached_mb"] == 0       # every cut went to files
    ref, new = int_biases(g_ref), int_biases(g_new)
    before = int_biases(quantized(model, data, bits=6)[0])
    assert any(np.any(ref[k] != before[k]) for k in ref)                 # the correction did something
    for k in ref:
        assert np.max(np.abs(ref[k].astype(np.int64) - new[k])) <= 1, k


def test_cuts_hold_the_integer_skip_until_the_add_reads_it(rng):
    from qgraph.passes.biascorr import _cuts, _waves
    from qgraph.ops import MATRIX_LAYER_OPS
    g, _ = quantized(branchy(rng), samples(rng, 8), bits=8)
    waves = _waves(g, find_groups(g, MATRIX_LAYER_OPS))
    assert [[grp.node.name for grp in w] for w in waves] == [["a"], ["b", "e"], ["c"], ["d"]]
    cuts = _cuts(g, waves)
    dtypes = {t.name: t for t in g.tensors().values()}
    producers = [[ir.producer(dtypes[n]).op if ir.producer(dtypes[n]) else "input" for n in cut] for cut in cuts]
    # run 0 leaves the quantized input for run 1 (which recomputes a), run 1 leaves a's quantized
    # output, run 2 keeps e's quantized output (read by the Add after c) next to b's, run 3 is last
    assert producers[0] == ["QuantizeLinear"] and producers[-1] == []
    assert all(op == "QuantizeLinear" for cut in producers for op in cut)
    he_q = next(n.outputs[0].name for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "he")
    assert he_q in cuts[2] and he_q not in cuts[1] and he_q not in cuts[3]


def test_model_without_correctable_layers_is_left_alone(rng):
    #   x ─MatMul(w)─ y      a MatMul has no bias input: skipped with its reason, nothing to replay
    w = rng.normal(size=(4, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", ["N", 4])],
                       [("y", ["N", 3])], [init("w", w)])
    from qgraph.data import open_samples
    data = open_samples({"x": rng.normal(size=(8, 4)).astype(np.float32)}, ["x"])
    g = ir.load(model)
    manager = PassManager(build_passes("quant,biascorr"))
    manager.run(g, Context(calib=data, progress=False))
    notes = manager.results[-1][1].notes
    assert notes["corrected"] == 0 and notes["runs"] == 0
    assert notes["skipped"] == {"matmul_has_no_bias_input": 1}
    assert not manager.results[-1][1].modified
