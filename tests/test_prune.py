"""prune: channel pruning with coupled groups, least-squares reconstruction, and the pass's contract.

Zero-channel equivalence: the channels of a group are made irrelevant by hand (every layer that reads
them gets zero weights for them), exactly those channels are pruned, and the pruned model must give
the unpruned model's outputs in ONNX Runtime. Tolerance 1e-5 (max|Δ| / max|ref|): the pruned model
adds the same float32 products minus exact zeros, in a different order; a wrong channel or a
misaligned offset gives errors of order 1.
"""
import numpy as np
import onnx
import pytest

import channel_models as cm
from builders import DIGITS, DIGITS_SAMPLE, init, make_model, qgraph_opt_cmd, rel_err, run_ort
from recorded import check_recorded, recorded_pipelines
from qgraph import ir
from qgraph.channel_edit import remove_units
from qgraph.channels import dependency_groups
from qgraph.errors import OptionError, QGraphError
from qgraph.instruments import seeded_inputs
from qgraph.passes.prune import Prune
from qgraph.pipeline import Context
from qgraph.reconstruct import Fit, refit

TOL = 1e-5


def zero_readers(g, deps, units) -> None:
    """Give every layer reading the channels of ``units`` zero weights for them."""
    atoms = deps.unit_atoms(units)
    for node in g.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or node.inputs[0].name not in atoms:
            continue
        ids = atoms[node.inputs[0].name]
        w = np.array(ir.const(node.inputs[1]))
        if node.op == "Conv":
            groups = int(node.attrs.get("group", 1))
            cpg_in, cpg_out = w.shape[1], w.shape[0] // groups
            for c in ids:
                j = c // cpg_in
                w[j * cpg_out:(j + 1) * cpg_out, c % cpg_in] = 0
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            w[:, ids] = 0
        else:
            w[ids] = 0
        node.inputs[1] = ir.add_const(g, node.inputs[1].name, w)


def prune_zeroed(model, tensor: str, pick=None):
    """Zero the readers of some units of the group holding ``tensor``, prune them; return the zeroed
    model, the pruned model and the removed channel ids per tensor."""
    g = ir.load(model)
    deps = dependency_groups(g)
    grp = next(x for x in deps.groups if tensor in x.tensors)
    assert not grp.frozen, grp.frozen
    if pick is not None:
        units = pick(grp)
    elif grp.classes is not None:              # one unit of every class: the groups stay balanced
        units = np.array([grp.units[np.flatnonzero(grp.classes == c)[0]] for c in np.unique(grp.classes) if c >= 0])
    else:
        units = grp.units[::2]
    zero_readers(g, deps, units)
    zeroed = ir.to_model(g)
    remove_units(g, deps, units)
    g.cleanup().toposort()
    pruned = ir.to_model(g)
    onnx.checker.check_model(pruned, full_check=True)
    return zeroed, pruned, deps.unit_atoms(units)


def check_same(zeroed, pruned, seed=0):
    feeds = seeded_inputs(zeroed, seed)
    for ref, got in zip(run_ort(zeroed, feeds), run_ort(pruned, feeds)):
        assert ref.shape == got.shape
        assert rel_err(ref, got) <= TOL


def dims(model, name):
    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}[name]
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- zero-channel equivalence

def test_chain_with_batchnorm(rng):
    zeroed, pruned, removed = prune_zeroed(cm.chain(rng), "a")
    check_same(zeroed, pruned)
    assert dims(pruned, "r")[1] == 4 and len(removed["a"]) == 4
    bn = next(n for n in pruned.graph.node if n.op_type == "BatchNormalization")
    assert all(len(onnx.numpy_helper.to_array(t)) == 4 for t in pruned.graph.initializer if t.name in bn.input[1:])


def test_residual_block_prunes_the_stream_in_every_branch(rng):
    zeroed, pruned, removed = prune_zeroed(cm.residual(rng), "s")
    check_same(zeroed, pruned)
    assert set(removed) == {"s", "t", "u", "v"} and dims(pruned, "u")[1] == 4


def test_concat_prunes_each_input_at_its_offset(rng):
    # channels 1 and 3 of b = positions 6 and 8 of the concat
    zeroed, pruned, removed = prune_zeroed(cm.concat(rng), "b", pick=lambda grp: grp.units[[1, 3]])
    check_same(zeroed, pruned)
    assert list(removed["c"]) == [6, 8] and dims(pruned, "c")[1] == 9


def test_depthwise_block_shrinks_its_groups(rng):
    zeroed, pruned, _ = prune_zeroed(cm.depthwise(rng, c=12), "e")
    check_same(zeroed, pruned)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 6


def test_flatten_into_gemm_removes_a_block_of_features(rng):
    zeroed, pruned, removed = prune_zeroed(cm.flatten_gemm(rng, c=6), "r")
    check_same(zeroed, pruned)
    assert len(removed["f"]) == 3 * 9 and dims(pruned, "f")[1] == 27


def test_channel_shuffle_keeps_shuffling(rng):
    zeroed, pruned, removed = prune_zeroed(cm.shuffle(rng, g=2, k=4), "a")
    check_same(zeroed, pruned)
    shapes = {t.name: list(onnx.numpy_helper.to_array(t)) for t in pruned.graph.initializer
              if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] in (4, 5)}
    # one block from each of g2's two groups: every row of the shuffle keeps 2 of 4
    assert [2, 2, 2, 6, 6] in shapes.values() and [2, 4, 6, 6] in shapes.values()


def test_shuffle_block_that_straddles_groups_is_pruned_alone(rng):
    zeroed, pruned, removed = prune_zeroed(cm.shuffle(rng, g=2, k=3, g2=2), "s",
                                           pick=lambda grp: grp.units[grp.classes == -1])
    check_same(zeroed, pruned)
    assert list(removed["s"]) == [2, 3]


def test_squeeze_excite_prunes_gate_and_gated_together(rng):
    zeroed, pruned, removed = prune_zeroed(cm.squeeze_excite(rng), "t")
    check_same(zeroed, pruned)
    assert {"t", "p", "e", "s", "m"} <= set(removed)
    zeroed, pruned, _ = prune_zeroed(cm.squeeze_excite(rng), "q", pick=lambda grp: grp.units[:2])
    check_same(zeroed, pruned)


@pytest.mark.parametrize("tensor", ["r", "b"], ids=["inputs", "outputs"])
def test_grouped_conv_loses_as_many_channels_per_group(rng, tensor):
    zeroed, pruned, removed = prune_zeroed(cm.grouped(rng, groups=2), tensor)
    check_same(zeroed, pruned)
    assert len(removed[tensor]) == 2 and removed[tensor][0] < 4 <= removed[tensor][1]


def test_split_and_slice_bounds_follow_the_channels(rng):
    zeroed, pruned, removed = prune_zeroed(cm.split_slice(rng), "z", pick=lambda grp: grp.units[[0, 2]])
    check_same(zeroed, pruned)
    assert list(removed["a"]) == [5, 7] and dims(pruned, "z")[1] == 2
    zeroed, pruned, _ = prune_zeroed(cm.split_slice(rng), "a0", pick=lambda grp: grp.units[[1]])
    check_same(zeroed, pruned)


def test_pruned_model_with_batchnorm_still_folds(rng):
    from qgraph.passes.fold import FoldBatchNorm
    zeroed, pruned, _ = prune_zeroed(cm.chain(rng), "a")
    g = ir.load(pruned)
    assert FoldBatchNorm().run(g, Context()).notes["folded"] == 1
    g.cleanup().toposort()
    check_same(zeroed, ir.to_model(g))


# --------------------------------------------------------------------------- reconstruction

def _gather_gemm(rng, n_samples):
    #   original:  x [N, 12] ─Gemm(W, b)─ y [N, 5]
    #   pruned:    x [N, 12] ─Gather(kept columns)─ xk [N, 9] ─Gemm(W[:, kept], b)─ y
    w = rng.normal(size=(5, 12)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    keep = np.array([0, 1, 2, 4, 5, 6, 9, 10, 11])
    original = make_model([onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                          [("x", ["N", 12])], [("y", ["N", 5])], [init("w", w), init("b", b)])
    pruned = make_model([onnx.helper.make_node("Gather", ["x", "keep"], ["xk"], name="cols", axis=1),
                         onnx.helper.make_node("Gemm", ["xk", "w", "b"], ["y"], name="fc", transB=1)],
                        [("x", ["N", 12])], [("y", ["N", 5])], [init("w", w[:, keep]), init("b", b), init("keep", keep)])
    x = (rng.normal(size=(n_samples, 12)) + np.linspace(-1, 1, 12)).astype(np.float32)
    return original, pruned, x, w, b, keep


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_reconstruction_recovers_the_least_squares_weights(rng, ridge):
    #   refit on 64 samples must give the solution of its documented objective, computed here by numpy:
    #   argmin ||[xk, 1] [W'; b']ᵀ - y||² + λ ||W' - W[:, kept]||²,  λ = mean(diag(xkᵀ xk)) · (ridge + 9 / 64)
    from qgraph.data import open_samples
    original, pruned, x, w, b, keep = _gather_gemm(rng, 64)
    g = ir.load(pruned)
    fc = next(n for n in g.nodes if n.name == "fc")
    errors = refit(g, original, {"fc": Fit(fc, "y")}, open_samples({"x": x}, ["x"]), ridge=ridge, batch_size=16)
    xk = x[:, keep].astype(np.float64)
    y = x.astype(np.float64) @ w.T.astype(np.float64) + b
    a = np.concatenate([xk, np.ones((64, 1))], axis=1)
    lam = np.mean(np.sum(xk * xk, axis=0)) * (ridge + 9 / 64)
    pen = np.diag(np.r_[np.full(9, lam), 0.0])
    prior = np.concatenate([w[:, keep], b[:, None]], axis=1).astype(np.float64)
    sol = np.linalg.solve(a.T @ a + pen, a.T @ y + pen @ prior.T)
    np.testing.assert_allclose(ir.const(fc.inputs[1]), sol[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ir.const(fc.inputs[2]), sol[-1], rtol=1e-4, atol=1e-5)
    assert errors["fc"][1] < errors["fc"][0]


def test_reconstruction_with_ample_data_is_ordinary_least_squares(rng):
    #   20,000 samples for 9 inputs: the penalty (9/20000 of the diagonal) is negligible, the refit is the
    #   ordinary least-squares solution to 1e-3
    from qgraph.data import open_samples
    original, pruned, x, w, b, keep = _gather_gemm(rng, 20000)
    g = ir.load(pruned)
    fc = next(n for n in g.nodes if n.name == "fc")
    refit(g, original, {"fc": Fit(fc, "y")}, open_samples({"x": x}, ["x"]), ridge=0.0, batch_size=4096)
    a = np.concatenate([x[:, keep].astype(np.float64), np.ones((len(x), 1))], axis=1)
    sol = np.linalg.lstsq(a, x.astype(np.float64) @ w.T.astype(np.float64) + b, rcond=None)[0]
    np.testing.assert_allclose(ir.const(fc.inputs[1]), sol[:-1].T, rtol=1e-3, atol=1e-3)


def test_reconstruction_refits_a_pruned_conv_to_the_original_output(rng):
    #   chain(): prune half of conv1's channels, refit conv2 on 16 samples: its output error must drop
    model = cm.chain(rng)
    g = ir.load(model)
    deps = dependency_groups(g)
    grp = next(x for x in deps.groups if "a" in x.tensors)
    remove_units(g, deps, grp.units[::2])
    x = rng.normal(size=(16, 3, 6, 6)).astype(np.float32)
    from qgraph.data import open_samples
    conv2 = next(n for n in g.nodes if n.name == "conv2")
    errors = refit(g, model, {"conv2": Fit(conv2, "y")}, open_samples({"x": x}, ["x"]), locations=0)
    before, after = errors["conv2"]
    assert after < 0.5 * before
    g.cleanup().toposort()
    ref = np.concatenate([run_ort(model, {"x": x[i:i + 2]})[0] for i in range(0, 16, 2)])   # batch fixed at 2
    got = np.concatenate([run_ort(ir.to_model(g), {"x": x[i:i + 2]})[0] for i in range(0, 16, 2)])
    # the error the normal equations predict is the one ORT measures
    assert np.sum((got - ref) ** 2) / np.sum(ref ** 2) == pytest.approx(after, rel=1e-3)


# --------------------------------------------------------------------------- the pass

def run_prune(model, calib=None, **opts):
    g = ir.load(model)
    from qgraph.data import open_samples
    ctx = Context(calib=open_samples(calib, [t.name for t in g.inputs]) if calib is not None else None,
                  progress=False)
    result = Prune(latency=False, **opts).run(g, ctx)
    g.cleanup().toposort()
    out = ir.to_model(g)
    onnx.checker.check_model(out)
    return out, result.notes


def test_pass_reaches_the_mac_ratio_within_one_percent(rng):
    from qgraph.analysis import model_stats
    #   residual() with 96 channels: one channel of a group is ~1% of the MACs, so some step lands within 1%
    model = cm.residual(rng, c=96)
    out, notes = run_prune(model, ratio=0.3, criterion="l2", reconstruct=False, round_to=1, min_channels=2)
    before, after = model_stats(model).macs, model_stats(out).macs
    assert abs((1 - after / before) - 0.3) <= 0.01
    assert "target_missed" not in notes
    run_ort(out, seeded_inputs(out, 0))


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_gamma", "taylor_act"])
def test_every_criterion_prunes_the_chain(rng, criterion):
    model = cm.chain(rng, c=32)
    calib = {"x": rng.normal(size=(8, 3, 6, 6)).astype(np.float32)}
    out, notes = run_prune(model, calib=calib, ratio=0.3, criterion=criterion, reconstruct=False, min_channels=4)
    assert dims(out, "a")[1] < 32 and dims(out, "a")[1] % 8 == 0


def test_bn_gamma_after_fold_says_to_prune_first(rng):
    from qgraph.passes.fold import FoldBatchNorm
    g = ir.load(cm.chain(rng))
    FoldBatchNorm().run(g, Context())
    with pytest.raises(QGraphError, match="put prune before fold"):
        Prune(criterion="bn_gamma", reconstruct=False, latency=False).run(g, Context())


def test_reconstruct_without_calibration_data_is_an_error(rng):
    with pytest.raises(QGraphError, match="needs calibration data.*set reconstruct=false and criterion=l2"):
        Prune(latency=False).run(ir.load(cm.chain(rng)), Context())


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_the_open_interval_is_an_option_error(ratio):
    with pytest.raises(OptionError, match=r"ratio must be in \(0, 1\)"):
        Prune(ratio=ratio)


def test_min_channels_larger_than_every_layer_is_an_error(rng):
    with pytest.raises(QGraphError, match="min_channels=64 is not below any prunable layer"):
        Prune(min_channels=64, criterion="l2", reconstruct=False, latency=False).run(ir.load(cm.chain(rng)), Context())


def test_unreachable_ratio_names_the_most_that_can_go(rng):
    with pytest.raises(QGraphError, match="cannot be reached: at most"):
        run_prune(cm.chain(rng, c=16), ratio=0.9, criterion="l2", reconstruct=False, min_channels=8)


def test_excluded_layers_keep_their_channels(rng):
    #   residual(): excluding conv3 leaves the stream s/t/u/v (which conv3 reads) alone; conv1 -> conv2 is pruned
    out, notes = run_prune(cm.residual(rng, c=32), ratio=0.2, criterion="l2", reconstruct=False, exclude=("conv3",),
                           min_channels=2, round_to=1)
    assert dims(out, "u")[1] == 32 and dims(out, "h")[1] < 32 and notes["skipped"]["excluded"] == 1


def test_cli_bad_options_are_one_line_errors(tmp_path):
    import subprocess
    for spec, code, text in (("fold,prune:ratio=1.2", 2, "ratio must be in (0, 1)"),
                             ("fold,prune:ratio=0.3,min_channels=4096,reconstruct=false,criterion=l2", 1, "min_channels=4096")):
        r = subprocess.run(qgraph_opt_cmd() + [str(DIGITS), "-p", spec, "-o", str(tmp_path / "o.onnx")],
                           capture_output=True, text=True)
        assert r.returncode == code, r.stderr
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_digits_cnn_prunes_and_reconstructs_with_quant_after(tmp_path):
    import qgraph
    model, report = qgraph.optimize(DIGITS, "fold,prune:ratio=0.25,min_channels=4,round_to=4,latency=false,quant",
                                    calib=DIGITS_SAMPLE, output=tmp_path / "p.onnx", progress=False)
    row = report.rows[2]
    assert row["notes"]["reconstruct"]["output_error_after"] < row["notes"]["reconstruct"]["output_error_before"]
    assert row["macs"] < report.rows[1]["macs"]
    data = np.load(DIGITS_SAMPLE)
    run_ort(model, {"input": data["input"][:4]})


# --------------------------------------------------------------------------- zoo (pytest -m zoo)

@pytest.mark.zoo
@pytest.mark.parametrize("name,pipeline", recorded_pipelines("prune") or [("-", "-")])
def test_recorded_prune_figures(name, pipeline):
    """Pruning figures recorded beyond the standard fold,prune,quant (which test_zoo.py checks)."""
    if name == "-":
        pytest.skip("no prune pipeline recorded in models/manifest.toml (python tools/zoo.py record ...)")
    check_recorded(name, pipeline)


# --------------------------------------------------------------------------- speed paths and recovery options

def test_compiled_obs_step_matches_the_numpy_reference():
    from qgraph import importance as imp
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 300))
    h, w = x @ x.T, rng.normal(size=(6, 40))
    ref = {"w": w.copy(), "hinv": np.linalg.inv(h)}
    wt, hinv, cost = np.ascontiguousarray(w.T), np.linalg.inv(h), np.zeros(40)
    for j in (5, 0, 39, 17):
        imp._remove(ref, np.array([j]))
        imp.obs_remove_column(wt, hinv, j, cost)
    # float64 throughout, the same operations in another order: agreement to rounding (1e-9 relative)
    assert np.allclose(wt.T, ref["w"], rtol=1e-9, atol=1e-12)
    assert np.allclose(hinv, ref["hinv"], rtol=1e-9, atol=1e-15)
    assert np.allclose(cost, imp._column_costs(wt, hinv), rtol=1e-9)


def test_residual_joins_are_left_alone_unless_asked(rng):
    #   residual(): the stream s/t/u/v is summed by the Add; by default only conv1 -> conv2 (h) is pruned
    model = cm.residual(rng, c=32)
    out, notes = run_prune(model, ratio=0.2, criterion="l2", reconstruct=False, min_channels=2, round_to=1)
    assert dims(out, "u")[1] == 32 and dims(out, "h")[1] < 32 and notes["skipped"]["residual"] == 1
    out, notes = run_prune(model, ratio=0.5, criterion="l2", reconstruct=False, min_channels=2, round_to=1,
                           residual=True)
    assert dims(out, "u")[1] < 32 and "residual" not in notes.get("skipped", {})


def test_restore_stats_gives_downstream_layers_their_original_moments(rng):
    #   chain() without reconstruction: after restore_stats conv2's output channels have the mean and
    #   variance they had before pruning, on the calibration data (float32 ORT: 1e-4 relative)
    from qgraph.passes.fold import FoldBatchNorm
    g = ir.load(cm.chain(rng, c=32))
    FoldBatchNorm().run(g, Context())
    g.cleanup().toposort()
    model = ir.to_model(g)
    calib = {"x": rng.normal(size=(16, 3, 6, 6)).astype(np.float32)}
    out, notes = run_prune(model, calib=calib, ratio=0.4, criterion="l2", reconstruct=False, compensate=False,
                           min_channels=4, restore_stats=True)
    assert notes["restore_stats"]["layers"] == 1
    ya, yb = (np.concatenate([run_ort(m, {"x": calib["x"][i:i + 2]})[0] for i in range(0, 16, 2)])
              for m in (model, out))
    mom = lambda y: (y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3)))  # noqa: E731
    (ma, va), (mb, vb) = mom(ya), mom(yb)
    assert np.allclose(mb, ma, rtol=1e-4, atol=1e-4 * np.abs(ma).max())
    assert np.allclose(vb, va, rtol=1e-3)


def test_block_target_fits_the_join_output_minus_the_pruned_skip(rng):
    #   original:  x ─Gemm(W, b)─ t ─Add─ u          pruned:  x ─Gather─ xk ─Gemm(W[:, kept], b)─ t ─Add─ u
    #              x ─Gemm(V)──── s ─┘                        x ─Gemm(V + E)─ s' ─────────────────────┘
    #   Fit(fc, "u", skip="s") must solve argmin ||[xk, 1] [W'; b']ᵀ − (u − s')||² + λ||W' − W[:, kept]||²
    #   (numpy here, λ as in test_reconstruction_recovers_the_least_squares_weights, ridge 0)
    from qgraph.data import open_samples
    original, pruned, x, w, b, keep = _gather_gemm(rng, 64)
    v = rng.normal(size=(5, 12)).astype(np.float32)
    e = 0.3 * rng.normal(size=(5, 12)).astype(np.float32)

    def with_skip(model, vv):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.node[-1].output[0] = "t"
        m.graph.node.extend([onnx.helper.make_node("Gemm", ["x", "v"], ["s"], name="skipfc", transB=1),
                             onnx.helper.make_node("Add", ["t", "s"], ["u"], name="add")])
        m.graph.initializer.append(init("v", vv))
        m.graph.output[0].name = "u"
        return m
    original, pruned = with_skip(original, v), with_skip(pruned, v + e)
    g = ir.load(pruned)
    fc = next(n for n in g.nodes if n.name == "fc")
    refit(g, original, {"fc": Fit(fc, "u", skip="s")}, open_samples({"x": x}, ["x"]), ridge=0.0, batch_size=16)
    xk = x[:, keep].astype(np.float64)
    target = x.astype(np.float64) @ w.T.astype(np.float64) + b - x.astype(np.float64) @ e.T.astype(np.float64)
    a = np.concatenate([xk, np.ones((64, 1))], axis=1)
    lam = np.mean(np.sum(xk * xk, axis=0)) * (9 / 64)
    pen = np.diag(np.r_[np.full(9, lam), 0.0])
    prior = np.concatenate([w[:, keep], b[:, None]], axis=1).astype(np.float64)
    sol = np.linalg.solve(a.T @ a + pen, a.T @ target + pen @ prior.T)
    np.testing.assert_allclose(ir.const(fc.inputs[1]), sol[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ir.const(fc.inputs[2]), sol[-1], rtol=1e-4, atol=1e-5)


def test_block_target_is_used_for_a_layer_before_a_residual_join(rng):
    #   residual(): conv2's output t is summed with the stream s: its fit targets u, minus the pruned s
    from qgraph.passes.prune import _residual_join
    g = ir.load(cm.residual(rng))
    nodes = {n.name: n for n in g.nodes}
    assert _residual_join(nodes["conv2"]) == ("u", "s")
    assert _residual_join(nodes["conv1"]) is None


def test_output_loss_is_the_kl_divergence_of_the_class_scores():
    from qgraph.importance import output_loss
    z = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    q = np.array([[1.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    p_ref = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    p = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    kl = float(np.sum(p_ref * np.log(p_ref / p)))
    assert output_loss([z], [z]) == 0.0
    assert output_loss([z], [q]) == pytest.approx(kl, rel=1e-9)           # logits
    assert output_loss([p_ref], [p]) == pytest.approx(kl, rel=1e-9)       # probabilities (rows sum to 1)


def _two_branches(rng, quiet=0.02):
    #   x ─ConvA(3→16)─Relu─ a ─ConvA2(16→4)────────── ya ─┐
    #   x ─ConvB(3→16)─Relu─ b ─ConvB2(16→4, ×quiet)── yb ─Add─ y
    inits = [init("wa", cm._w(rng, 16, 3, 3, 3)), init("wa2", cm._w(rng, 4, 16, 1, 1)),
             init("wb", cm._w(rng, 16, 3, 3, 3)), init("wb2", quiet * cm._w(rng, 4, 16, 1, 1))]
    nodes = [cm._conv("convA", "x", "a0", "wa"), onnx.helper.make_node("Relu", ["a0"], ["a"], name="reluA"),
             cm._conv("convA2", "a", "ya", "wa2", pads=0),
             cm._conv("convB", "x", "b0", "wb"), onnx.helper.make_node("Relu", ["b0"], ["b"], name="reluB"),
             cm._conv("convB2", "b", "yb", "wb2", pads=0), onnx.helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    return make_model(nodes, [("x", [2, 3, cm.H, cm.W])], [("y", [2, 4, cm.H, cm.W])], inits)


def test_measured_allocation_takes_the_branch_the_output_hardly_sees(rng):
    #   branch B reaches the output 50x weaker than A: its measured loss curve is ~2500x lower, so the
    #   measured allocation takes the MACs from B; each curve starts at 0 and never decreases
    model = _two_branches(rng)
    calib = {"x": rng.normal(size=(32, 3, cm.H, cm.W)).astype(np.float32)}
    out, notes = run_prune(model, calib=calib, ratio=0.3, min_channels=2, round_to=1, probe_samples=8,
                           probe_points=3)
    assert notes["allocation"].startswith("measured")
    assert dims(out, "a")[1] == 16 and dims(out, "b")[1] < 16
    curves = notes["details"]["loss_curves"]
    assert len(curves) == 2
    for curve in curves.values():
        assert curve[0] == [0, 0.0] and all(b[1] >= a[1] for a, b in zip(curve, curve[1:]))


def test_measured_allocation_needs_calibration_data(rng):
    with pytest.raises(QGraphError, match="allocation=measured"):
        run_prune(cm.chain(rng), ratio=0.3, criterion="l2", reconstruct=False, allocation="measured")


def test_match_variance_gives_the_refit_output_its_target_variance(rng):
    #   chain(): half of conv1's channels pruned, conv2 refit by least squares (which keeps each output
    #   channel's mean and shrinks its variance); with match_variance the refit output channels have the
    #   original variance and mean on the calibration rows (all positions: locations=0; float32 ORT, 1e-3)
    from qgraph.data import open_samples
    from qgraph.passes.fold import FoldBatchNorm
    g0 = ir.load(cm.chain(rng, c=16))
    FoldBatchNorm().run(g0, Context())
    g0.cleanup().toposort()
    model = ir.to_model(g0)
    x = rng.normal(size=(16, 3, cm.H, cm.W)).astype(np.float32)
    moments = {}
    for match in (False, True):
        g = ir.load(model)
        deps = dependency_groups(g)
        grp = next(t for t in deps.groups if "a" in t.tensors)
        remove_units(g, deps, grp.units[::2])
        conv2 = next(n for n in g.nodes if n.name == "conv2")
        conv2.inputs.append(ir.add_const(g, "b2", np.zeros(4, np.float32)))   # a bias to take the mean
        refit(g, model, {"conv2": Fit(conv2, "y")}, open_samples({"x": x}, ["x"]), locations=0, match_variance=match)
        g.cleanup().toposort()
        y = np.concatenate([run_ort(ir.to_model(g), {"x": x[i:i + 2]})[0] for i in range(0, 16, 2)])
        moments[match] = (y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3)))
    ref = np.concatenate([run_ort(model, {"x": x[i:i + 2]})[0] for i in range(0, 16, 2)])
    m0, v0 = ref.mean(axis=(0, 2, 3)), ref.var(axis=(0, 2, 3))
    assert np.all(moments[False][1] < 0.99 * v0)                     # least squares shrinks the variance
    np.testing.assert_allclose(moments[True][1], v0, rtol=1e-3)
    np.testing.assert_allclose(moments[True][0], m0, rtol=1e-3, atol=1e-3 * np.abs(m0).max())


def test_measured_curves_split_the_model_with_int64_tensors_typed(rng):
    #   x ─Shape─ s (int64) ────────────────────────┐
    #   x ─Conv1─Relu─ h ─Conv2 (the reader)─ y ─Reshape(s)─ out
    #   the tail after conv2 reads s from the head: the cut keeps its type, and head + tail give the model
    from qgraph.importance import _split_at
    from qgraph.ops import ort_session
    inits = [init("w1", cm._w(rng, 8, 3, 3, 3)), init("w2", cm._w(rng, 3, 8, 1, 1))]
    nodes = [onnx.helper.make_node("Shape", ["x"], ["s"], name="shape"), cm._conv("conv1", "x", "h0", "w1"),
             onnx.helper.make_node("Relu", ["h0"], ["h"], name="relu"), cm._conv("conv2", "h", "y", "w2", pads=0),
             onnx.helper.make_node("Reshape", ["y", "s"], ["out"], name="reshape")]
    model = make_model(nodes, [("x", [2, 3, cm.H, cm.W])], [("out", [2, 3, cm.H, cm.W])], inits)
    head, tail = _split_at(model, ["conv2"])
    x = rng.normal(size=(2, 3, cm.H, cm.W)).astype(np.float32)
    hs = ort_session(head)
    cut = dict(zip([o.name for o in head.graph.output], hs.run(None, {"x": x})))
    assert cut["s"].dtype == np.int64
    ts = ort_session(tail)
    got = ts.run(None, {i.name: cut[i.name] for i in ts.get_inputs()})[0]
    np.testing.assert_array_equal(got, run_ort(model, {"x": x})[0])
