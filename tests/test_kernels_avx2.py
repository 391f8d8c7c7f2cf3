"""The AVX2 int8 GEMM (``kernels/avx2.py``) and ORT's saturating u8 x s8 arithmetic (``kernels/ortsat.py``).

The AVX2 kernel runs on every x86-64 CPU with AVX2 (this machine included, whatever the kernel the
runtime picked at import), so these tests run everywhere such a CPU is; each fuzz case is seeded and
a failure prints the seed and a command that reruns just that case (``QGRAPH_FUZZ_ONLY=seed``).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from qgraph import ops
from qgraph.kernels import cpu
from qgraph.kernels import avx2, gemm, ortsat, vnni
from qgraph.kernels.conv import ConvGeometry, conv_int, conv_reference, pack_conv
from qgraph.kernels.requant import fixed_multiplier, requantize_into

DT = {"s8": np.int8, "u8": np.uint8}
ONLY = os.environ.get("QGRAPH_FUZZ_ONLY")
needs_avx2 = pytest.mark.skipif(not cpu.features().get("avx2"), reason="this CPU has no AVX2 at all")

# M not a multiple of MR, past one MC block; N not a multiple of 8 or 32, past one NC block; K = 1, 3,
# 27 (the last rows read through the zero-padded copy), 16, 144, 1025 (past one KC4 block, ragged)
SHAPES = [(1, 1, 1), (2, 3, 7), (5, 27, 33), (13, 16, 24), (100, 27, 45), (7, 144, 150), (203, 16, 200),
          (97, 1025, 17), (11, 1025, 70), (3, 1, 129), (6, 8, 8)]


def _ints(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _zero_point(rng, dtype, n, kind):
    return {"zero": lambda: 0, "tensor": lambda: _ints(rng, dtype, ()), "row/column": lambda: _ints(rng, dtype, (n,))}[kind]()


def _seeds(base: int, n: int) -> list[int]:
    return [int(ONLY)] if ONLY else [base + i for i in range(n)]


def _rerun(seed: int, test: str) -> str:
    return f"seed {seed} -> reproduce: QGRAPH_FUZZ_ONLY={seed} python -m pytest tests/test_kernels_avx2.py -k {test}"


@needs_avx2
@pytest.mark.parametrize("a_t,b_t", [("s8", "s8"), ("u8", "s8"), ("u8", "u8"), ("s8", "u8")])
def test_avx2_qgemm_equals_reference_on_awkward_shapes(a_t, b_t):
    for seed in _seeds(100, len(SHAPES)):
        rng = np.random.default_rng(seed)
        m, k, n = SHAPES[seed % len(SHAPES)]
        a, b = _ints(rng, DT[a_t], (m, k)), _ints(rng, DT[b_t], (k, n))
        pb = gemm.pack_b(b)
        for zp in ("zero", "tensor", "row/column"):
            za, zb = _zero_point(rng, DT[a_t], m, zp), _zero_point(rng, DT[b_t], n, zp)
            out = np.empty((m, n), np.int32)
            avx2.qgemm_avx2(a.view(np.uint8), a.dtype == np.int8, np.asarray(za, np.int64).reshape(-1), pb.data,
                            pb.k4, pb.sums, pb.offset, np.asarray(zb, np.int64).reshape(-1), out)
            np.testing.assert_array_equal(out, gemm.qgemm_reference(a, za, b, zb),
                                          err_msg=f"{(m, k, n)} {a_t}{b_t} zero points {zp}: {_rerun(seed, 'awkward')}")


@needs_avx2
def test_avx2_qgemm_takes_extreme_values_exactly():
    # every product at its largest: vpmaddubsw would saturate here (2 * 255 * 128 > 32767), vpmaddwd not
    for a_val, b_val in ((255, -128), (255, 127), (0, -128)):
        a = np.full((7, 40), a_val, np.uint8)
        b = np.full((40, 9), b_val, np.int8)
        out = np.empty((7, 9), np.int32)
        pb = gemm.pack_b(b)
        avx2.qgemm_avx2(a, False, np.zeros(1, np.int64), pb.data, pb.k4, pb.sums, pb.offset, np.zeros(1, np.int64), out)
        np.testing.assert_array_equal(out, np.full((7, 9), 40 * a_val * b_val, np.int32))


@needs_avx2
def test_avx2_qgemm_reads_strided_and_sliced_a_in_place():
    rng = np.random.default_rng(22)
    big = _ints(rng, np.int8, (90, 150))
    b = _ints(rng, np.int8, (27, 33))
    pb = gemm.pack_b(b)
    for a in (big[:45, 10:37], big[::2, 3:30], big[-13:, -27:]):      # row strides 150 and 300; the matrix end
        out = np.empty((a.shape[0], 33), np.int32)
        avx2.qgemm_avx2(a.view(np.uint8), True, np.array([-3]), pb.data, pb.k4, pb.sums, pb.offset, np.array([5]),
                        out)
        np.testing.assert_array_equal(out, gemm.qgemm_reference(a, -3, b, 5))


@needs_avx2
def test_avx2_microkernel_on_packed_panels_equals_the_product():
    # the conv path's contract: A (weights) packed and widened once, B panels, C += A @ B
    for seed in _seeds(200, 4):
        rng = np.random.default_rng(seed)
        m, k, n = int(rng.integers(1, 40)), int(rng.integers(1, 700)), int(rng.integers(1, 90))
        a, b = _ints(rng, np.uint8, (m, k)), _ints(rng, np.int8, (k, n))
        pa, pb = gemm.pack_a(a), gemm.pack_b(b)
        c = np.zeros((-(-m // vnni.MR) * vnni.MR, -(-n // vnni.NR) * vnni.NR), np.int32)
        avx2.gemm_u8s8_avx2(avx2.widen_a(pa.data), pb.data, c, pa.k4)
        np.testing.assert_array_equal(c[:m, :n], a.astype(np.int32) @ b.astype(np.int32), err_msg=_rerun(seed, "panels"))


@needs_avx2
@pytest.mark.parametrize("kind", ["dense", "pointwise", "grouped", "stem"])
def test_conv_through_the_avx2_kernel_equals_reference(monkeypatch, kind):
    # the runtime's conv path with the AVX2 micro-kernel picked (as on a CPU without VNNI)
    monkeypatch.setattr(gemm, "KERNEL", "avx2")
    for seed in _seeds(300 + 10 * ["dense", "pointwise", "grouped", "stem"].index(kind), 3):
        rng = np.random.default_rng(seed)
        g = 2 if kind == "grouped" else 1
        cin = {"dense": 12, "pointwise": 40, "grouped": 8, "stem": 3}[kind]
        cout = int(rng.integers(1, 40)) * g
        k = 1 if kind == "pointwise" else 3
        pads = (0, 0, 0, 0) if kind == "pointwise" else (1, 1, 1, 1)
        geo = ConvGeometry((k, k), (2, 2) if kind == "stem" else (1, 1), (1, 1), pads, g)
        x = _ints(rng, np.int8 if seed % 2 else np.uint8, (2, cin, 9, 11))
        w = _ints(rng, np.int8, (cout, cin // g, k, k))
        zx, zw = int(rng.integers(-5, 5)) + (128 if x.dtype == np.uint8 else 0), rng.integers(-3, 3, cout)
        pc = pack_conv(w, g)
        assert pc.groups[0].avx2_a is not None
        acc = conv_int(x, zx, pc, zw, geo)
        np.testing.assert_array_equal(acc, conv_reference(x, zx, w, zw, geo), err_msg=f"{kind}: {_rerun(seed, kind)}")
        bias = rng.integers(-3000, 3000, cout).astype(np.int32)
        scale = rng.uniform(2e-4, 2e-3, cout).astype(np.float32)
        mult, shift = fixed_multiplier(scale)
        for mode in ("float", "fixed"):
            want = requantize_into((acc + bias.reshape(1, -1, 1, 1)).reshape(2, cout, -1), scale, 3, -128, 127, mode,
                                   np.int8).reshape(acc.shape)
            got = conv_int(x, zx, pc, zw, geo, rq=(bias, scale, mult, shift, 3, -128, 127, mode == "fixed"),
                           out_dtype=np.int8)
            np.testing.assert_array_equal(got, want, err_msg=f"{kind} {mode}: {_rerun(seed, kind)}")


@needs_avx2
def test_matmul_through_the_avx2_kernel_equals_reference(monkeypatch):
    monkeypatch.setattr(gemm, "KERNEL", "avx2")
    rng = np.random.default_rng(31)
    a, b = _ints(rng, np.uint8, (50, 77)), _ints(rng, np.int8, (77, 41))
    pb = gemm.pack_b(b)
    np.testing.assert_array_equal(gemm.qgemm(a, 7, pb, -2), gemm.qgemm_reference(a, 7, b, -2))
    np.testing.assert_array_equal(gemm.qgemm(a[::-1], 7, pb, -2), gemm.qgemm_reference(a[::-1], 7, b, -2))
    np.testing.assert_array_equal(gemm.qgemm_packed(gemm.pack_a(a), 7, pb, -2), gemm.qgemm_reference(a, 7, b, -2))


def test_gemm_kernel_is_forced_by_env_and_refuses_what_the_target_lacks(monkeypatch):
    monkeypatch.setenv("QGRAPH_GEMM", "plain")
    assert cpu.gemm_kernel() == "plain"
    monkeypatch.setenv("QGRAPH_GEMM", "avx512")
    with pytest.raises(ValueError, match="expected one of"):
        cpu.gemm_kernel()
    monkeypatch.setenv("QGRAPH_GEMM", "avx2")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+sse2,+sse4.1")     # a target without AVX2
    with pytest.raises(ValueError, match="has no AVX2"):
        cpu.gemm_kernel()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", cpu.HASWELL_FEATURES)
    monkeypatch.delenv("QGRAPH_GEMM")
    assert cpu.gemm_kernel() == "avx2"                          # Haswell: the best it has


# ----------------------------------------------------------------------------- ORT's int16 pair sums

def test_sat_gemm_saturates_each_pair_as_vpmaddubsw():
    #  a = [255, 255, 255, 1], w = [127, 127, -128, 5]: pair 0 -> 64770 -> 32767, pair 1 -> -32640 + 5
    s = np.array([[255, 255, 255, 1]], np.uint8)
    v = np.array([[127], [127], [-128], [5]], np.int8)
    out = np.empty((1, 1), np.int32)
    ortsat.sat_gemm(s, v, out)
    assert out[0, 0] == 32767 + (-32640 + 5)
    np.testing.assert_array_equal(out, ortsat.sat_gemm_reference(s, v))


def test_sat_gemm_equals_reference():
    for seed in _seeds(400, 6):
        rng = np.random.default_rng(seed)
        m, k, n = (int(v) for v in rng.integers(1, 60, 3))
        signed_s = seed % 2 == 0                   # conv: s = weights (s8); matmul: s = activations (u8)
        s = _ints(rng, np.int8 if signed_s else np.uint8, (m, k))
        v = _ints(rng, np.uint8 if signed_s else np.int8, (k, n))
        out = np.empty((m, n), np.int32)
        ortsat.sat_gemm(s, v, out)
        np.testing.assert_array_equal(out, ortsat.sat_gemm_reference(s, v), err_msg=_rerun(seed, "sat_gemm"))


def test_ort_saturating_conv_equals_exact_when_no_pair_can_saturate():
    # weights in [-64, 63]: 255 * (|w0| + |w1|) <= 32640, inside int16 -> the exact convolution
    rng = np.random.default_rng(41)
    x = _ints(rng, np.int8, (2, 6, 8, 8))
    w = rng.integers(-64, 64, (10, 3, 3, 3)).astype(np.int8)
    geo = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2)
    assert not ops.can_saturate(w, "Conv", group=2)
    np.testing.assert_array_equal(ortsat.conv_acc(x, -4, w, 0, geo), conv_reference(x, -4, w, 0, geo))


def test_ort_saturating_matmul_pairs_k_as_mlas():
    # A as ORT stores int8 codes (uint8 + 128), pairs (0, 1), (2, 3): reference by hand
    a = np.array([[127, 127, -128, 0, 5]], np.int8)                    # ORT's u8: 255, 255, 0, 128, 133
    b = np.array([[100], [90], [7], [-3], [2]], np.int8)
    za, zb = -1, 0                                                      # ORT's za: 127
    pairs = [min(255 * 100 + 255 * 90, 32767), 0 * 7 + 128 * -3, 133 * 2]
    want = sum(pairs) - 127 * int(b.sum())
    assert ortsat.matmul_acc(a, za, b, zb)[0, 0] == want


@pytest.mark.parametrize("op,shape,trans_b", [("Conv", (8, 3, 3, 3), 0), ("Conv", (16, 6, 1, 1), 0),
                                              ("Gemm", (10, 7), 1), ("Gemm", (7, 10), 0), ("MatMul", (2, 5, 6), 0)])
def test_fit_pairs_leaves_no_pair_past_the_limit_and_moves_only_those(op, shape, trans_b):
    rng = np.random.default_rng(51)
    target = rng.uniform(-128.4, 127.4, shape)
    q = np.clip(np.rint(target), -128, 127).astype(np.int8)
    rows = ops.ort_k_rows(q, op, trans_b)
    np.testing.assert_array_equal(ops._from_k_rows(rows, q.shape, op, trans_b), q)     # layouts round-trip
    fitted, moved = ops.fit_pairs(q, target, op, trans_b)
    assert moved > 0 and ops.pair_excess(ops.ort_k_rows(fitted, op, trans_b)).max() <= 0
    pad = lambda r: np.pad(r, ((0, 0), (0, r.shape[1] % 2)))          # noqa: E731
    before, after = pad(rows.astype(int)), pad(ops.ort_k_rows(fitted, op, trans_b).astype(int))
    changed = (before != after).reshape(before.shape[0], -1, 2).any(axis=2)
    bad = (np.maximum(before[:, 0::2], 0) + np.maximum(before[:, 1::2], 0) > ops.PAIR_LIMIT) | \
          (np.maximum(-before[:, 0::2], 0) + np.maximum(-before[:, 1::2], 0) > ops.PAIR_LIMIT)
    np.testing.assert_array_equal(changed, bad)
    assert moved == int(bad.sum())


def test_depthwise_weights_never_saturate_in_ort():
    # MLAS's depthwise kernel widens to int32 first; a channel multiplier goes through GEMM
    w = np.full((8, 1, 3, 3), 127, np.int8)
    assert not ops.can_saturate(w, "Conv", group=8)
    assert ops.can_saturate(np.full((16, 1, 3, 3), 127, np.int8), "Conv", group=8)


def test_ort_path_can_be_named_for_another_cpu_class(monkeypatch):
    monkeypatch.setenv("QGRAPH_ORT_PATH", "avx2")
    assert cpu.ort_path().saturates and "vpmaddubsw" in cpu.ort_path().describe()
    monkeypatch.setenv("QGRAPH_ORT_PATH", "avx512vnni")
    assert not cpu.ort_path().saturates
    monkeypatch.setenv("QGRAPH_ORT_PATH", "neon")
    with pytest.raises(ValueError, match="expected auto or one of"):
        cpu.ort_path()


def _layer_model(rng, op: str):
    """One float layer and its calibration data: a 3x3 conv (Cin 16), the 3x3 stride-2 stem (Cin 3,
    pairs across kernel taps), a pointwise conv, a grouped conv, a depthwise conv, a Gemm, a MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits, attrs = [], {}
    if op.startswith("conv"):
        cin, cout, k, s, g = {"conv3x3": (16, 32, 3, 1, 1), "conv_stem": (3, 16, 3, 2, 1), "conv_pw": (32, 48, 1, 1, 1),
                              "conv_grouped": (16, 32, 3, 1, 4), "conv_dw": (16, 16, 3, 1, 16)}[op]
        w = rng.standard_normal((cout, cin // g, k, k)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[k // 2] * 4, strides=[s, s], group=g)
        x_shape, y_shape = [None, cin, 10, 10], [None, cout, None, None]
        feeds = {"x": (rng.standard_normal((12, cin, 10, 10)) + 0.7).astype(np.float32)}
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
    elif op == "gemm":
        w = rng.standard_normal((24, 40)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        x_shape, y_shape = [None, 40], [None, 24]
        feeds = {"x": rng.standard_normal((32, 40)).astype(np.float32)}
        inits.append(numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b"))
    else:
        w = rng.standard_normal((33, 20)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_shape, y_shape = [None, 6, 33], [None, 6, 20]
        feeds = {"x": rng.standard_normal((16, 6, 33)).astype(np.float32)}
    inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, feeds


LAYERS = ["conv3x3", "conv_stem", "conv_pw", "conv_grouped", "conv_dw", "gemm", "matmul"]


@pytest.mark.parametrize("op", LAYERS)
def test_float_mode_equals_ort_here_on_weights_that_saturate_without_vnni(op):
    # quant:target=vnni keeps weight pairs that leave int16 in ORT's AVX2 / AVX-512BW kernels. On such a
    # CPU ``float`` mode computes ORT's saturated sums, elsewhere the exact ones: bit-exact either way.
    import qgraph
    from qgraph.kernels import lower, run
    from qgraph.kernels.diff import against_ort
    model, feeds = _layer_model(np.random.default_rng(61), op)
    q, _ = qgraph.optimize(model, "quant:target=vnni", calib=feeds, progress=False)
    prog = lower(q)
    assert bool(ortsat.saturating_steps(prog)) == (op != "conv_dw")    # not vacuous: pairs that do saturate
    figures, _, _ = against_ort(q, feeds, "float", prog)
    assert figures["y"]["max_lsb"] == 0, f"{op} on {cpu.ort_path().describe()}: {figures['y']}"


@pytest.mark.parametrize("op", LAYERS)
def test_target_any_weights_compute_the_same_integers_on_every_cpu_class(op, monkeypatch):
    # quant's default: no pair can saturate, so ORT's AVX2 arithmetic (reproduced) equals the exact one
    import qgraph
    from qgraph.kernels import lower, run
    model, feeds = _layer_model(np.random.default_rng(62), op)
    q, rep = qgraph.optimize(model, "quant", calib=feeds, progress=False)
    prog = lower(q)
    assert ortsat.saturating_steps(prog) == [] and ortsat.int16_pair_steps(prog) == (op != "conv_dw")
    monkeypatch.setenv("QGRAPH_ORT_PATH", "avx2")
    on_avx2 = run(prog, feeds, "float")["y"]
    monkeypatch.setenv("QGRAPH_ORT_PATH", "avx512vnni")
    np.testing.assert_array_equal(on_avx2, run(prog, feeds, "float")["y"])


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_zoo_model_quantized_by_default_computes_the_same_integers_on_avx2(name, monkeypatch):
    # the models, quantized by `fold,quant` (target=any): no u8 x s8 layer has a weight pair
    # that can saturate, ORT's AVX2 arithmetic (float mode, QGRAPH_ORT_PATH=avx2) gives the logits ORT
    # computes here bit for bit, so top-1 on an AVX2 CPU is the VNNI figure (docs/cpu.md: the same
    # models with target=vnni lose 4-6 pt there). 16 evaluation images: enough to hit saturation
    # (with target=vnni every image's logits differ, docs/cpu.md).
    import onnx
    from runtime_zoo import qdq_model
    from zoo_data import DataMissing, zoo_split
    from qgraph.kernels import lower, run
    from qgraph.ops import ort_session
    try:
        path = qdq_model(name)
        _, evaluation = zoo_split(name)
    except (FileNotFoundError, DataMissing) as exc:
        pytest.skip(f"{name}: {exc}")
    model = onnx.load(path)
    prog = lower(model)
    assert ortsat.int16_pair_steps(prog) >= 20 and ortsat.saturating_steps(prog) == []
    feeds = next(evaluation.subset(range(16)).batches(16))
    feeds = {k: v for k, v in feeds.items() if k in prog.inputs}
    ref = ort_session(model, threads=1).run(None, feeds)[0]
    monkeypatch.setenv("QGRAPH_ORT_PATH", "avx2")
    np.testing.assert_array_equal(next(iter(run(prog, feeds, "float").values())), ref)
