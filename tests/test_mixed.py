"""Mixed precision: the incremental sensitivity equals a full-model run per candidate, the allocator is
optimal (brute force on small tables), quant:budget / exclude=auto:k, and --explain-quant finds a layer
made unquantizable on purpose.

Graph used throughout (a chain with a residual branch, so suffixes need a cached side input):

    x -> Conv1 -> Relu -> Conv2 -> Relu -> Add -> Conv3 -> y
                    \\______________________/
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import init, make_model, run_ort
from qgraph import ir
from qgraph.allocate import brute_force, greedy, min_cost, pareto, solve
from qgraph.data import open_samples
from qgraph.errors import OptionError, PassError
from qgraph.ops import fake_quant
from qgraph.passes import build_passes
from qgraph.passes.mixed import effective_bits, explain_quant, parse_budget, sites_of
from qgraph.pipeline import Context, PassManager, parse_pipeline
from qgraph.qparams import make_qparams, weight_qparams
from qgraph.sensitivity import measure

SEED = 1234


def residual_net(seed: int = SEED, outlier: float = 1.0) -> onnx.ModelProto:
    """The sketch above, 4 -> 8 -> 8 -> 3 channels. ``outlier`` scales channel 0 of Conv2's output (and
    divides Conv3's weights reading it): the function is the same, the Add output gets one huge channel."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (3, 8, 1, 1)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2[0] *= outlier
    b2[0] *= outlier
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Mul", ["r1", "one"], ["r1s"], name="skip"),
        helper.make_node("Add", ["r2", "r1s"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w3"], ["y"], name="conv3"),
    ]
    if outlier != 1.0:
        w3[:, 0] /= outlier
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 6, 6])],
                      [init("w1", w1), init("w2", w2), init("b2", b2), init("w3", w3),
                       init("one", np.ones((1, 8, 1, 1), np.float32))])


def calib(n: int = 12, seed: int = SEED):
    x = np.random.default_rng(seed + 1).normal(0, 1, (n, 4, 6, 6)).astype(np.float32)
    return open_samples({"x": x}, ["x"])


def full_run_noise(model: onnx.ModelProto, data, feeds_changed) -> float:
    """Ω by brute force: the whole model with one tensor replaced (a weight) or fake-quantized (an activation)."""
    import qgraph.calibrate as cal
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kind, name, value = feeds_changed
    if kind == "weight":
        for t in m.graph.initializer:
            if t.name == name:
                t.CopyFrom(onnx.numpy_helper.from_array(value, name))
        ref_model, test_model = model, m
        sig = noise = 0.0
        x = data.batches(1000).__next__()
        ref = run_ort(ref_model, x)[0].astype(np.float64)
        got = run_ort(test_model, x)[0].astype(np.float64)
        return float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    # activation: insert fake quantization by running the prefix, quantizing, running the rest as a
    # model with the tensor as an input
    x = data.batches(1000).__next__()
    vals = next(cal.stream(model, [name, "y"], data, batch_size=1000))
    qx = fake_quant(vals[name], value)
    rest = helper.make_graph([n for n in model.graph.node if n.name in ("conv2", "relu2", "add", "skip", "conv3")],
                             "rest", [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(model.graph.initializer))
    got = run_ort(helper.make_model(rest, opset_imports=model.opset_import), {name: qx})[0].astype(np.float64)
    ref = vals["y"].astype(np.float64)
    return float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))


def test_incremental_sensitivity_equals_full_model_runs():
    """Each (site, candidate) of the suffix-from-cache measurement equals a run of the whole model with only
    that site quantized. Tolerance 1e-4 relative: the same float ops, but batches of 5 here and of 12 in
    the full run (ORT may pick other conv algorithms), and Ω ~ 1e-5 is a difference of float32 outputs whose
    own rounding (~1e-7 relative) becomes ~1e-7/sqrt(Ω) ~ 3e-5 of Ω; a wrong cache or suffix is off by O(1)."""
    model = residual_net()
    g = ir.load(model)
    sites, pinned = sites_of(g, pin=())
    assert not pinned
    keys = {s.key: s for s in sites}
    assert {"conv1", "conv2", "conv3"} <= set(keys)
    data = calib()
    fm = ir.to_model(g)
    table = measure(fm, sites, data, candidates=("w8", "w4", "a8"), executor="serial", batch_size=5)
    for layer, w in (("conv1", "w1"), ("conv2", "w2"), ("conv3", "w3")):
        wv = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
        for bits in (8, 4):
            qp = weight_qparams(wv, bits=bits, storage="int8", symmetric=True, axis=0, method="minmax")
            expect = full_run_noise(fm, data, ("weight", w, fake_quant(wv, qp)))
            assert table.noise[(layer, f"w{bits}")] == pytest.approx(expect, rel=1e-4), (layer, bits)
    # the activation r1 (Relu output: absorbed into conv1's range) at 8 bits, on the whole model
    site = next(s for s in sites if s.kind == "act" and "r1" in s.tensors)
    vals = next(__import__("qgraph.calibrate", fromlist=["stream"]).stream(fm, ["r1"], data, batch_size=1000))["r1"]
    qp = make_qparams(float(vals.min()), float(vals.max()), bits=8, storage="int8", symmetric=False)
    expect = full_run_noise(fm, data, ("act", "r1", qp))
    assert table.noise[(site.key, "a8")] == pytest.approx(expect, rel=1e-4)
    assert table.noise[("conv2", "w4")] > table.noise[("conv2", "w8")] > 0


def _random_options(rng, n_sites: int, integer: bool):
    out = {}
    for i in range(n_sites):
        params = int(rng.integers(1, 40))
        errs = np.sort(rng.random(3) * rng.random())[::-1]    # fewer bits: larger error
        out[f"s{i}"] = {f"w{b}": (params * b / 8 if not integer else params * b, float(e))
                        for b, e in zip((4, 6, 8), errs)}
    return out


@pytest.mark.parametrize("seed", range(12))
def test_allocator_is_optimal_against_brute_force(seed):
    """Exact DP (integer costs within the resolution: no rounding) equals exhaustive search; the Pareto
    frontier holds the optimum of every budget; greedy is never better than the optimum."""
    rng = np.random.default_rng(seed)
    options = _random_options(rng, int(rng.integers(2, 7)), integer=True)
    lo = sum(min(k for k, _ in c.values()) for c in options.values())
    hi = sum(max(k for k, _ in c.values()) for c in options.values())
    front = pareto(options)
    for budget in np.linspace(lo, hi, 7):
        budget = float(np.floor(budget))
        best = brute_force(options, budget)
        got = solve(options, budget)
        assert best is not None, f"seed {seed}: budget {budget} below the minimum {lo}"
        assert got.cost <= budget + 1e-9
        assert got.error == pytest.approx(best[0], abs=1e-12), f"seed {seed} budget {budget}"
        on_front = min(p.error for p in front if p.cost <= budget + 1e-9)
        assert on_front == pytest.approx(best[0], abs=1e-12)
        assert greedy(options, budget).error >= best[0] - 1e-12


def test_allocator_min_cost_and_rounding():
    """min_cost: the cheapest configuration under an error target (brute force); with coarse cost units
    the answer still fits the budget (costs rounded up)."""
    rng = np.random.default_rng(7)
    options = _random_options(rng, 5, integer=True)
    for target in (0.05, 0.2, 0.5, 2.0):
        got = min_cost(options, target)
        combos = [dict(zip(options, c)) for c in itertools.product(*(list(v) for v in options.values()))]
        ok = [sum(options[s][c][0] for s, c in ch.items()) for ch in combos
              if sum(options[s][c][1] for s, c in ch.items()) <= target]
        if ok:
            assert got.feasible and got.cost == min(ok)
        else:
            assert not got.feasible
    lo = sum(min(k for k, _ in c.values()) for c in options.values())
    hi = sum(max(k for k, _ in c.values()) for c in options.values())
    coarse = solve(options, (lo + hi) / 2, resolution=200)   # units of ceil(total/200): every cost rounded up
    assert coarse.feasible and coarse.cost <= (lo + hi) / 2
    with pytest.raises(OptionError, match="nothing to allocate"):
        solve({}, 1.0)


def test_budget_parsing():
    assert parse_budget("5bits").kind == "bits" and parse_budget("5bits").value == 5
    assert parse_budget("avg:4.5").value == 4.5
    assert parse_budget("2.5MB").value == 2.5e6 and parse_budget("900kB").value == 9e5
    assert parse_budget("sqnr:20").value == pytest.approx(0.01)
    assert parse_budget("cosine:0.99").value == pytest.approx(1 / 0.99 ** 2 - 1)
    with pytest.raises(OptionError, match="give average bits"):
        parse_budget("lots")
    # option values may hold ':' (exclude=auto:2, budget=sqnr:20)
    assert parse_pipeline("fold,quant:budget=sqnr:20,exclude=auto:2") == [
        ("fold", {}), ("quant", {"budget": "sqnr:20", "exclude": "auto:2"})]


def _run(model, spec, data, ctx=None):
    ctx = ctx or Context(calib=data, progress=False, executor="serial")
    g = ir.load(model)
    mgr = PassManager(build_passes(spec))
    mgr.run(g, ctx)
    return mgr, ctx


def test_quant_budget_meets_the_size_and_beats_uniform_prediction():
    """quant:budget=5bits: packed weights <= the 5-bit average over all quantized layers (pinned first/last
    at 8 included); each layer's bits are those precision says; ORT runs it."""
    model = residual_net()
    data = calib()
    mgr, ctx = _run(model, "sensitivity:pin=none,candidates=w8;w6;w4,executor=serial,show=3,"
                           "quant:budget=6bits,storage4=int8", data)
    notes = mgr.results[-1][1].notes
    alloc = notes["allocation"]
    params = {"conv1": 8 * 4 * 9, "conv2": 8 * 8 * 9, "conv3": 3 * 8}
    assert alloc["feasible"]
    assert alloc["weight_bytes_packed"] <= 6 * sum(params.values()) / 8
    q = ir.load(mgr.model)
    from qgraph.ops import find_groups
    bits = {grp.node.name: effective_bits(grp.weight_int) for grp in find_groups(q) if grp.w_dq is not None}
    chosen = {r["site"]: int(r["choice"][1:]) for r in notes["details"]["mixed"]["per_site"]}
    assert bits == chosen
    assert sum(params[k] * b for k, b in bits.items()) / 8 <= 6 * sum(params.values()) / 8
    run_ort(mgr.model, {"x": np.zeros((1, 4, 6, 6), np.float32)})


def test_budget_infeasible_and_bad_values():
    model = residual_net()
    data = calib()
    with pytest.raises(PassError, match="needs .* > budget|smallest configuration"):
        _run(model, "sensitivity:candidates=w8;w6;w4,executor=serial,quant:budget=1bits", data)
    with pytest.raises(OptionError):
        build_passes("sensitivity:candidates=w7")
    with pytest.raises(OptionError, match="give average bits"):     # at parse time: exit code 2
        build_passes("quant:budget=lots")
    with pytest.raises(OptionError, match="auto:K"):
        build_passes("quant:exclude=auto:x")


def test_act_budget_picks_fewest_16bit_tensors():
    """budget=sqnr:X with a8/a16 measured: the fewest 16-bit activations whose predicted SQNR (Σ Ω, weights at
    8 bits included) meets X — checked against every subset — and all 16 bits, flagged, when X is out of reach."""
    model = residual_net(outlier=30.0)
    data = calib()
    spec = "sensitivity:candidates=w8;a8;a16,pin=none,executor=serial"
    _, ctx = _run(model, spec, data)
    t = ctx.sensitivity
    acts = [s.key for s in t.sites if s.kind == "act"]
    fixed = sum(t.noise[(s.key, "w8")] for s in t.sites if s.kind == "weight")
    def db(sub):
        return -10 * np.log10(fixed + sum(t.noise[(a, "a16" if a in sub else "a8")] for a in acts))
    lo, hi = db(set()), db(set(acts))
    assert hi > lo + 3, (lo, hi)
    target = (lo + hi) / 2
    fewest = min(len(sub) for k in range(len(acts) + 1) for sub in itertools.combinations(acts, k) if db(set(sub)) >= target)
    g = ir.load(model)
    mgr = PassManager(build_passes(spec + f",quant:budget=sqnr:{target:.3f}"))
    mgr.run(g, ctx)
    alloc = mgr.results[-1][1].notes["allocation"]
    assert alloc["feasible"] and len(alloc["act16"]) == fewest and 0 < fewest < len(acts)
    assert alloc["predicted_sqnr_db"] >= round(target, 2) - 0.01
    mgr = PassManager(build_passes(spec + f",quant:budget=sqnr:{hi + 10:.1f}"))
    mgr.run(ir.load(model), ctx)
    alloc = mgr.results[-1][1].notes["allocation"]
    assert not alloc["feasible"] and len(alloc["act16"]) == len(acts)


def test_explain_quant_ranks_the_outlier_layer_first():
    """A huge outlier channel in the input of conv3 (function unchanged): with per-tensor activation scales
    the other channels of that input lose all resolution, so conv3 is the layer --explain-quant ranks first,
    both one at a time and all-but-one, and exclude=auto:1 leaves exactly it float."""
    model = residual_net(outlier=1000.0)
    data = calib()
    mgr, ctx = _run(model, "quant", data)
    e = explain_quant(ctx, mgr.model, 3, samples=12, executor="serial")
    assert e["layers"][0]["layer"] == "conv3"
    gains = [r["gain_db"] for r in e["layers"]]
    assert gains[0] == max(gains) and gains[0] > 1
    assert "conv3" in e["suggest"]
    mgr, ctx = _run(model, "quant:exclude=auto:1", data)
    notes = mgr.results[-1][1].notes
    assert list(notes["auto_excluded"]) == ["conv3"]
    assert notes["skipped"].get("excluded") == 1


def test_sensitivity_needs_calibration_data():
    with pytest.raises(PassError, match="needs calibration data"):
        _run(residual_net(), "sensitivity", None, Context(progress=False))


def test_process_pool_matches_serial():
    """The local process pool gives the same numbers as the serial loop (same code, other processes)."""
    model = residual_net()
    g = ir.load(model)
    sites, _ = sites_of(g, pin=())
    data = calib(6)
    fm = ir.to_model(g)
    a = measure(fm, sites[:3], data, candidates=("w8", "w4"), executor="serial")
    b = measure(fm, sites[:3], data, candidates=("w8", "w4"), executor="process", workers=2)
    assert a.noise == b.noise


def test_dask_executor_local_cluster():
    """--executor dask://HOST:PORT against a LocalCluster on this machine: same numbers as serial."""
    distributed = pytest.importorskip("distributed", reason="the 'distributed' extra is not installed")
    model = residual_net()
    g = ir.load(model)
    sites, _ = sites_of(g, pin=())
    data = calib(6)
    fm = ir.to_model(g)
    a = measure(fm, sites[:3], data, candidates=("w8", "w4"), executor="serial")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  scheduler_port=0, protocol="tcp") as cluster:
        addr = cluster.scheduler_address.replace("tcp://", "")
        b = measure(fm, sites[:3], data, candidates=("w8", "w4"), executor=f"dask://{addr}")
    assert a.noise == b.noise


def test_cli_explain_quant_and_sensitivity_table(tmp_path, capsys):
    """qgraph-opt ... --explain-quant 3 prints the ranked layers and a suggestion; the sensitivity pass's
    table is printed; --report carries both (the table under the pass's notes, the ranking in the meta)."""
    import json

    from builders import DIGITS, DIGITS_SAMPLE
    from qgraph.cli import main
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main([str(DIGITS), "-p", "fold,sensitivity:candidates=w8;w4,samples=8,quant", "--calib", str(DIGITS_SAMPLE),
                 "--explain-quant", "3", "--executor", "serial", "-o", str(out), "--report", str(rep)])
    text = capsys.readouterr().out
    assert code == 0
    assert "output SQNR (dB) with only that site quantized" in text
    assert "explain-quant:" in text and "suggestion:" in text
    r = json.loads(rep.read_text())
    assert len(r["explain_quant"]["layers"]) == 3
    sens = next(p for p in r["passes"] if p["pass"].startswith("sensitivity"))
    assert sens["notes"]["details"]["sites"] and sens["modified"] is False
