"""ortsoftmax: ONNX Runtime 1.32's float Softmax (MLAS) reproduced bit for bit, in the kernel MLAS picks.

The numba kernel equals its numpy reference for each of MLAS's kernels (tolerance 0: the same float32
operations), and ORT's own Softmax with the kernel ``cpu.ort_softmax_kernel()`` names for this CPU
(tolerance 0: that is the claim). Natively here that is ``avx512f``; under ``qemu-x86_64 -cpu Haswell``
(an emulated AVX2/FMA3 CPU, no AVX-512) it is ``fma3``, under ``-cpu SandyBridge`` or ``-cpu Nehalem``
(no AVX2/FMA3) ``sse2``, run as

    qemu-x86_64 -cpu Haswell $VENV/bin/python -m pytest -q tests/test_kernels_ortsoftmax.py

``neon`` (not x86) is only held to its reference: the ORT tests skip there.
Row lengths cover the 48/24-wide loops, the masked 16/8-wide tails, the 4-lane generic loop with its
scalar tail and rows shorter than one vector; scales cover exp's underflow clamps."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qgraph.kernels import cpu
from qgraph.kernels.ortsoftmax import KERNELS, softmax, softmax_reference

MEASURED = ("avx512f", "fma3", "sse2")
measured = pytest.mark.skipif(cpu.ort_softmax_kernel() not in MEASURED,
                              reason=f"MLAS's {cpu.ort_softmax_kernel()} softmax kernel is not measured against ORT")
SHAPES = [(3, d) for d in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 18, 23, 24, 25, 33, 47, 48, 49, 64, 95, 96, 97,
                           100, 384)]


@pytest.fixture(autouse=True)
def _host_cpu_class(monkeypatch):
    monkeypatch.delenv("QGRAPH_ORT_PATH", raising=False)     # ORT here runs the host's kernel


def _ort_softmax(x, axis, opset):
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], "softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.05, 3.0, 60.0])
def test_kernel_equals_its_numpy_reference(kernel, shape, scale):
    x = (np.random.default_rng(shape[1]).standard_normal(shape) * scale).astype(np.float32)
    np.testing.assert_array_equal(softmax(x, kernel=kernel), softmax_reference(x, kernel=kernel))


def test_the_kernels_differ_so_the_ort_test_tells_them_apart():
    #   each kernel's order leaves different last bits on many rows: matching ORT names the kernel ORT ran
    x = (np.random.default_rng(3).standard_normal((64, 97)) * 3).astype(np.float32)
    ys = {k: softmax(x, kernel=k) for k in KERNELS}
    for i, a in enumerate(KERNELS):
        for b in KERNELS[i + 1:]:
            assert (ys[a] != ys[b]).mean() > 0.1, (a, b)


def test_kernel_follows_the_cpu_class(monkeypatch):
    for path, kernel in (("avx2", "fma3"), ("avxvnni", "fma3"), ("avx512vnni", "avx512f"), ("amx", "avx512f"),
                         ("avx512bw", "avx512f"), ("sse41", "sse2"), ("other", "neon")):
        monkeypatch.setenv("QGRAPH_ORT_PATH", path)
        assert cpu.ort_softmax_kernel() == kernel
    monkeypatch.delenv("QGRAPH_ORT_PATH")
    want = "avx512f" if cpu.has("avx512f") else "fma3" if cpu.has("avx2", "fma") else "sse2"
    assert cpu.ort_softmax_kernel() == want
    with pytest.raises(ValueError, match="softmax kernel 'avx3'"):
        softmax(np.zeros((1, 4), np.float32), kernel="avx3")


@measured
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.05, 3.0, 60.0])
def test_equals_ort_softmax_bit_for_bit(shape, scale):
    x = (np.random.default_rng(100 + shape[1]).standard_normal(shape) * scale).astype(np.float32)
    np.testing.assert_array_equal(softmax(x), _ort_softmax(x, -1, 13))


@measured
@pytest.mark.parametrize("axis,opset", [(-1, 13), (1, 13), (2, 13), (1, 11), (2, 11)])
def test_other_axes_and_opset_11_coercion_equal_ort(axis, opset):
    #   attention scores [N, heads, T, T]; opset < 13 flattens at the axis, 13 moves the axis last
    x = (np.random.default_rng(7).standard_normal((2, 12, 18, 18)) * 5).astype(np.float32)
    np.testing.assert_array_equal(softmax(x, axis, opset), _ort_softmax(x, axis, opset))


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_sum_to_one_and_a_large_gap_underflows_to_zero(kernel):
    x = np.array([[0.0, -200.0, 1.0, 1.0, -87.9]], np.float32)
    y = softmax(x, kernel=kernel)
    assert y[0, 1] == 0.0 and y[0, 2] == y[0, 3]
    assert abs(float(y.sum()) - 1.0) < 1e-6       # float32 sum of 5 terms: a few ulps of 1


@measured
def test_underflow_clamps_equal_ort():
    #   gaps around -87..-104: the AVX-512F kernel keeps subnormal e (vscalefps), FMA3's integer scale gives 0
    x = np.concatenate([np.zeros((1, 1)), -np.linspace(86.0, 105.0, 95)[None]], 1).astype(np.float32)
    np.testing.assert_array_equal(softmax(x), _ort_softmax(x, -1, 13))
