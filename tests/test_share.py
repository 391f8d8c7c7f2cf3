"""share: exact 1-D k-means (qgraph/kmeans.py) and the weight-sharing pass (passes/share.py).

k-means is checked against a plain Lloyd on the points (argmin assignment, mean update) from the same
start: the same centroids to 1e-9 (the sorted version sums by prefix differences, the reference
directly) and the same labels exactly. The pass is checked on tiny graphs through ONNX Runtime: the
shared model computes with the codebook values exactly (max |Δ| / max |ref| <= 1e-5: float32
re-association in the layer only), pruned zeros stay zero, and the least-squares refit lowers the
layer's output error on the calibration data and zeroes its mean there.
"""
import numpy as np
import onnx
import pytest
from onnx import helper

from builders import init, make_model, rel_err, run_ort
from qgraph import ir, kmeans
from qgraph.errors import ModelError, PassError
from qgraph.kmeans import normal_equations as _normal_equations
from qgraph.passes.share import INITS, ShareWeights
from qgraph.pipeline import Context, PassManager
from qgraph.rounding import layer_matrix

TOL = 1e-5


# ----------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("seed", range(30))
def test_sorted_lloyd_equals_lloyd_on_the_points(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(40, 2500)), int(rng.integers(2, 70))
    x = rng.standard_t(3, n).astype(np.float32 if seed % 2 else np.float64)
    if seed % 3 == 0:
        x = np.round(x * 4) / 4                       # ties and repeated values
    init_name = kmeans.INITS[seed % 3]
    for repair in (False, True):
        r = kmeans.kmeans_1d(x, k, init=init_name, rng=np.random.default_rng(seed), repair=repair)
        assert np.array_equal(r.labels, kmeans.assign_reference(x, r.centroids)), f"seed {seed}"
        inertia = float(np.sum((x.astype(np.float64) - r.centroids[r.labels]) ** 2))
        assert r.inertia == pytest.approx(inertia, rel=1e-9, abs=1e-12)
        if np.unique(x).size > k and not repair:    # plain Lloyd: the same fixed point as on the points
            start = kmeans.init_centroids(np.sort(x).astype(np.float64), k, init_name, np.random.default_rng(seed))
            ref, iters = kmeans.lloyd_reference(x, start, 300)
            assert np.allclose(r.centroids, ref, rtol=1e-9, atol=1e-12), f"seed {seed}"
            assert r.iterations == iters and r.converged


def test_empty_clusters_are_refilled_by_splitting_the_worst_one():
    #   heavy tails, linear start: most centroids start with (almost) no points
    x = (np.random.default_rng(0).standard_t(3, 20000) * 0.02).astype(np.float32)
    plain = kmeans.kmeans_1d(x, 64, repair=False)
    fixed = kmeans.kmeans_1d(x, 64)
    assert plain.splits == 0 and fixed.splits > 0
    assert np.bincount(fixed.labels, minlength=64).min() > 0
    assert fixed.inertia < 0.5 * plain.inertia


def test_split_cuts_the_largest_error_cluster_at_its_mean():
    #   clusters [0, 1, 2, 3] (centroid 1.5) and [10, 10.1]; cluster 2 empty: 1.5's interval splits at 1.5
    xs = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 10.1])
    s, s2 = kmeans.prefix_sums(xs)
    t = np.array([0, 4, 6, 6])
    c = np.array([1.5, 10.05, 99.0])
    assert kmeans.split_for_empty(xs, s, s2, t, c) == 1
    assert c.tolist() == [0.5, 10.05, 2.5]


def test_radix_sort_equals_numpy_sort_on_edge_values():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=5000), [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38]])
    x = x.astype(np.float32)
    got = kmeans.radix_sort_f32(x)
    assert np.array_equal(got, np.sort(x))
    zeros = got[got == 0]
    assert np.signbit(zeros).tolist() == [True, False]      # -0.0 before +0.0 (a total order on bits)


def test_few_distinct_values_are_their_own_centroids():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0], np.float32)
    r = kmeans.kmeans_1d(x, 4)
    assert r.centroids.tolist() == [1.0, 2.0, 3.0] and r.inertia == 0.0
    assert r.labels.tolist() == [2, 0, 2, 1, 0]


def test_linear_init_spans_min_to_max_and_density_follows_the_cdf():
    xs = np.sort(np.random.default_rng(1).exponential(size=1000))
    lin = kmeans.init_centroids(xs, 8, "linear")
    assert lin[0] == xs[0] and lin[-1] == xs[-1] and np.allclose(np.diff(lin), np.diff(lin)[0])
    den = kmeans.init_centroids(xs, 8, "density")
    assert np.all(np.diff(den) > 0) and den[-1] < lin[-1]    # quantiles stay away from the tail


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="finite"):
        kmeans.kmeans_1d(np.array([1.0, np.nan, 2.0], np.float32), 2)


# ----------------------------------------------------------------------------- graphs

def fc(rng, *, zeros: float = 0.0, n_in: int = 64, n_out: int = 32, bias: bool = True):
    #   x ─Gemm(W[n_out, n_in], b, transB)─ y
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    w[rng.random(w.shape) < zeros] = 0.0
    inits = [init("w", w)] + ([init("b", rng.normal(size=n_out).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"], name="fc", transB=1)
    return make_model([node], [("x", [8, n_in])], [("y", [8, n_out])], inits)


def conv(rng, *, group: int = 1, cin: int = 8, cout: int = 8):
    #   x ─Conv(W[cout, cin/group, 3, 3], b, pad 1, group)─ y
    w = rng.normal(size=(cout, cin // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], group=group)
    return make_model([node], [("x", [4, cin, 6, 6])], [("y", [4, cout, 6, 6])],
                      [init("w", w), init("b", rng.normal(size=cout).astype(np.float32))])


def matmul(rng, *, with_add: bool):
    #   x ─MatMul(W[K, N])─ [Add(b)] ─ y
    w = rng.normal(size=(48, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if with_add else "y"], name="mm")]
    inits = [init("w", w)]
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
        inits.append(init("b", rng.normal(size=24).astype(np.float32)))
    return make_model(nodes, [("x", [2, 5, 48])], [("y", [2, 5, 24])], inits)


def share(model, ctx=None, **opts):
    g = ir.load(model)
    ctx = ctx or Context(seed=0)
    ctx.original = model
    result = ShareWeights(**opts).run(g, ctx)
    g.cleanup().toposort()
    out = ir.to_model(g)
    onnx.checker.check_model(out)
    return out, result.notes


def shared_weight(model, name="w"):
    """The weight the shared model computes with (evaluating its Gather through ONNX Runtime)."""
    out_name = next((n.output[0] for n in model.graph.node if n.op_type == "Gather"), None)
    if out_name is None:
        return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    x = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
         for i in model.graph.input}
    return run_ort(probe, x)[-1]


class Calib:
    """A tiny in-memory Samples stand-in: batches of one input."""

    def __init__(self, x: np.ndarray, name: str = "x"):
        self.x, self.name = x, name

    def __len__(self):
        return len(self.x)

    def batches(self, bs):
        for i in range(0, len(self.x), bs):
            yield {self.name: self.x[i:i + bs]}

    def subset(self, idx):
        return Calib(self.x[list(idx)], self.name)


# ----------------------------------------------------------------------------- the pass

def test_gather_form_computes_with_the_codebook(rng):
    model = fc(rng)
    out, notes = share(model, bits=3, refit="false")
    assert [n.op_type for n in out.graph.node] == ["Cast", "Gather", "Gemm"]
    idx = next(t for t in out.graph.initializer if t.name.endswith("_indices"))
    assert idx.data_type == onnx.TensorProto.UINT8
    w = shared_weight(out)
    assert np.unique(w).size <= 8
    x = rng.normal(size=(8, 64)).astype(np.float32)
    b = onnx.numpy_helper.to_array(model.graph.initializer[1])
    assert rel_err(x @ w.T + b, run_ort(out, {"x": x})[0]) <= TOL
    assert notes["layers"] == 1 and notes["weights"] == 64 * 32 and notes["clusters"] == {"3b": 1}


def test_pruned_zeros_stay_exactly_zero_and_are_no_cluster(rng):
    model = fc(rng, zeros=0.6)
    w0 = onnx.numpy_helper.to_array(model.graph.initializer[0])
    out, notes = share(model, bits=2, refit="false")
    w = shared_weight(out)
    assert np.array_equal(w == 0, w0 == 0)
    assert np.unique(w[w != 0]).size == 4                    # 2^2 clusters among the nonzeros
    book = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith("_codebook"))
    assert book[0] == 0.0 and book.size == 5
    assert notes["zeros_kept"] == int(np.sum(w0 == 0))


def test_dequantized_form_keeps_the_graph(rng):
    out, _ = share(fc(rng), bits=4, refit="false", form="dequantized")
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    assert np.unique(shared_weight(out)).size <= 16


def test_centroids_are_the_kmeans_of_the_layer(rng):
    model = fc(rng)
    w0 = onnx.numpy_helper.to_array(model.graph.initializer[0])
    out, _ = share(model, bits=4, refit="false", form="dequantized")
    ref = kmeans.kmeans_1d(w0, 16)
    assert np.allclose(np.unique(shared_weight(out)), ref.centroids.astype(np.float32), rtol=0, atol=1e-7)


@pytest.mark.parametrize("builder", ["fc", "conv", "depthwise", "matmul_add", "matmul"])
def test_refit_lowers_the_output_error_and_zeroes_its_mean(rng, builder):
    model = {"fc": lambda: fc(rng), "conv": lambda: conv(rng), "depthwise": lambda: conv(rng, group=8),
             "matmul_add": lambda: matmul(rng, with_add=True), "matmul": lambda: matmul(rng, with_add=False)}[builder]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    # correlated, off-centre inputs: what makes the refit differ from plain k-means
    base = rng.normal(size=[64] + shape[1:]).astype(np.float32)
    x = (base + 0.8 * np.roll(base, 1, axis=-1) + 0.5).astype(np.float32)
    calib = Calib(x)
    ref = np.concatenate([run_ort(model, {"x": x[i:i + shape[0]]})[0] for i in range(0, 64, shape[0])])
    errs = {}
    for refit in ("false", "true"):
        out, notes = share(model, Context(calib=calib, progress=False), bits=3, refit=refit)
        got = np.concatenate([run_ort(out, {"x": x[i:i + shape[0]]})[0] for i in range(0, 64, shape[0])])
        errs[refit] = float(np.mean((got - ref) ** 2))
        if refit == "true":
            assert notes["refit"] == 1 and notes["bias_moved"] == 1
            axis = 1 if builder in ("conv", "depthwise") else -1
            d = np.moveaxis(got - ref, axis, 0).reshape(got.shape[axis], -1)
            # mean output error over the calibration data: zero up to float32 rounding of the sums
            assert np.max(np.abs(d.mean(axis=1))) <= 1e-4 * np.max(np.abs(ref))
    # least squares over the centroids and the bias: plain k-means with the old bias is one candidate
    assert errs["true"] < errs["false"], errs


@pytest.mark.parametrize("builder", ["fc", "depthwise"])
def test_gptq_assignment_lowers_the_output_error_and_keeps_zeros(rng, builder):
    #   correlated inputs: moving each column's error onto the next ones beats nearest centroids
    model = fc(rng, zeros=0.3) if builder == "fc" else conv(rng, group=8)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    base = rng.normal(size=[64] + shape[1:]).astype(np.float32)
    x = (base + 0.9 * np.roll(base, 1, axis=-1)).astype(np.float32)
    calib = Calib(x)
    ref = np.concatenate([run_ort(model, {"x": x[i:i + shape[0]]})[0] for i in range(0, 64, shape[0])])
    errs = {}
    for assign in ("nearest", "gptq"):
        out, notes = share(model, Context(calib=calib, progress=False), bits=2, refit="false", assign=assign)
        got = np.concatenate([run_ort(out, {"x": x[i:i + shape[0]]})[0] for i in range(0, 64, shape[0])])
        errs[assign] = float(np.mean((got - ref) ** 2))
        w0 = onnx.numpy_helper.to_array(model.graph.initializer[0])
        assert np.array_equal(shared_weight(out) == 0, w0 == 0)
    assert notes["gptq"] == 1
    assert errs["gptq"] < errs["nearest"], errs


def test_normal_equations_equal_the_one_hot_formula(rng):
    #   Σ_n P_nᵀ C P_n and Σ_n P_nᵀ C w_n with explicit one-hot matrices
    g, r, kk, k = 2, 5, 7, 4
    labels = rng.integers(-1, k, size=(g, r, kk)).astype(np.int32)
    w = rng.normal(size=(g, r, kk))
    a = rng.normal(size=(g, kk, kk))
    cov = a @ a.transpose(0, 2, 1)
    m, rhs = _normal_equations(labels, w, cov, k)
    m_ref, r_ref = np.zeros((k, k)), np.zeros(k)
    for gi in range(g):
        for n in range(r):
            p = np.zeros((kk, k))
            for i, j in enumerate(labels[gi, n]):
                if j >= 0:
                    p[i, j] = 1
            m_ref += p.T @ cov[gi] @ p
            r_ref += p.T @ cov[gi] @ w[gi, n]
    assert np.allclose(m, m_ref, rtol=1e-12, atol=1e-12) and np.allclose(rhs, r_ref, rtol=1e-12, atol=1e-12)


def test_layer_matrix_layout_of_labels_matches_weights(rng):
    model = conv(rng, group=2)
    g = ir.load(model)
    node = g.nodes[0]
    w = node.inputs[1].values
    m, _ = layer_matrix(node, w)
    lab, _ = layer_matrix(node, np.arange(w.size).reshape(w.shape))
    assert np.array_equal(w.reshape(-1)[lab.reshape(-1)], m.reshape(-1))


def test_bits_per_layer_kind_and_precision_map(rng):
    #   x ─Conv─ Flatten ─Gemm─ y: conv_bits for the Conv, fc_bits for the Gemm, precision overrides
    w1 = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(10, 4 * 16)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, 10])], [init("w1", w1), init("w2", w2)])
    _, notes = share(model, refit="false", conv_bits=5, fc_bits=3)
    assert {r["weight"]: r["bits"] for r in notes["details"]} == {"w1": 5, "w2": 3}
    _, notes = share(model, refit="false", conv_bits=5, fc_bits=3, precision={"last": 2})
    assert {r["weight"]: r["bits"] for r in notes["details"]} == {"w1": 5, "w2": 2}


def test_skip_reasons_are_counted(rng):
    #   x ─Gemm(w_in: a graph input)─ a      weight_not_constant
    #   x ─Gemm(ws)─ b,  ws ─Add─ c          weight_read_by_other_nodes
    #   x ─Gemm(tiny[2, 4])─ d               fewer_weights_than_clusters (2^5 > 8)
    #   x ─Gemm(wx)─ e                       excluded
    ws = rng.normal(size=(6, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w_in"], ["a"], name="g_in", transB=1),
             helper.make_node("Gemm", ["x", "ws"], ["b"], name="g_shared", transB=1),
             helper.make_node("Add", ["ws", "ws"], ["c"], name="add"),
             helper.make_node("Gemm", ["x", "tiny"], ["d"], name="g_tiny", transB=1),
             helper.make_node("Gemm", ["x", "wx"], ["e"], name="g_excluded", transB=1)]
    model = make_model(nodes, [("x", [1, 4]), ("w_in", [6, 4])],
                       [("a", [1, 6]), ("b", [1, 6]), ("c", [6, 4]), ("d", [1, 2]), ("e", [1, 50])],
                       [init("ws", ws), init("tiny", rng.normal(size=(2, 4)).astype(np.float32)),
                        init("wx", rng.normal(size=(50, 4)).astype(np.float32))])
    _, notes = share(model, refit="false", exclude=("g_excluded",))
    assert notes["skipped"] == {"excluded": 1, "fewer_weights_than_clusters": 1, "weight_not_constant": 1,
                                "weight_read_by_other_nodes": 1}
    assert notes["layers"] == 0


def test_refit_true_without_data_names_calib(rng):
    with pytest.raises(ModelError, match="--calib"):
        share(fc(rng), refit="true")


def test_share_refuses_a_quantized_model(rng):
    from qgraph.passes.quant import Quantize
    g = ir.load(fc(rng))
    with pytest.raises(PassError, match="before 'quant'"):
        PassManager([Quantize(weight_only=True, sqnr=False), ShareWeights(refit="false")]).run(g, Context())


def test_share_names_the_initializations_kmeans_has():
    assert INITS == kmeans.INITS
