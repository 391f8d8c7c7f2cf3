"""Each integer kernel equals its plain-numpy reference exactly on seeded random inputs."""
from __future__ import annotations

import numpy as np
import pytest

from qgraph.kernels import amx, gemm, pool, vnni
from qgraph.kernels.conv import conv_int, conv_reference, pack_conv
from qgraph.kernels.requant import requantize_into
from qgraph.ops import ConvGeometry, fixed_multiplier
from qgraph.ops import requantize as requantize_reference

DT = {"s8": np.int8, "u8": np.uint8}


def _ints(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _zero_point(rng, dtype, n, kind):
    """A GEMM operand's zero point: none, one per tensor, or one per row (A) / column (B) of ``n``."""
    return {"zero": lambda: 0, "tensor": lambda: _ints(rng, dtype, ()),
            "row/column": lambda: _ints(rng, dtype, (n,)), "channel": lambda: _ints(rng, dtype, (n,))}[kind]()


@pytest.mark.parametrize("a_t,b_t", [("s8", "s8"), ("u8", "s8"), ("u8", "u8"), ("s8", "u8")])
def test_qgemm_equals_reference_with_zero_points(a_t, b_t):
    rng = np.random.default_rng(7)
    for trial in range(12):
        m, k, n = (int(v) for v in rng.integers(1, 80, 3))
        a, b = _ints(rng, DT[a_t], (m, k)), _ints(rng, DT[b_t], (k, n))
        za = _ints(rng, DT[a_t], (m,) if trial % 2 else ())          # per-row or per-tensor
        zb = _ints(rng, DT[b_t], (n,) if trial % 3 else ())          # per-column or per-tensor
        got = gemm.qgemm(a, za, gemm.pack_b(b), zb)
        np.testing.assert_array_equal(got, gemm.qgemm_reference(a, za, b, zb), err_msg=f"trial {trial}")


def test_generic_and_vnni_microkernels_agree():
    # the plain-Numba fallback must compute the same raw u8 x s8 sums as the VNNI tile
    rng = np.random.default_rng(3)
    a, b = _ints(rng, np.uint8, (37, 301)), _ints(rng, np.int8, (301, 45))
    pa, pb = gemm.pack_a(a), gemm.pack_b(b)
    c = np.zeros((-(-37 // vnni.MR) * vnni.MR, -(-45 // vnni.NR) * vnni.NR), np.int32)
    gemm.gemm_u8s8_generic(pa.data, pb.data, c, pa.k4)
    np.testing.assert_array_equal(c[:37, :45], a.astype(np.int32) @ b.astype(np.int32))
    if vnni.HAS_VNNI:
        c2 = np.zeros_like(c)
        vnni.gemm_u8s8_vnni(pa.data, pb.data, c2, pa.k4)
        np.testing.assert_array_equal(c2, c)


def test_packing_either_operand_gives_the_same_product():
    # conv packs the weights as A and the activations as B; matmul the other way round
    rng = np.random.default_rng(4)
    a, b = _ints(rng, np.int8, (19, 40)), _ints(rng, np.uint8, (40, 23))
    left = gemm.qgemm_packed(gemm.pack_a(a), 3, gemm.pack_b(b), 130)
    right = gemm.qgemm_packed(gemm.pack_a(np.ascontiguousarray(b.T)), 130, gemm.pack_b(np.ascontiguousarray(a.T)), 3)
    np.testing.assert_array_equal(left, right.T)
    np.testing.assert_array_equal(left, gemm.qgemm_reference(a, 3, b, 130))


def test_qgemm_long_k_crosses_cache_blocks():
    rng = np.random.default_rng(11)
    k = vnni.KC4 * 4 * 2 + 13                                        # three k blocks, ragged tail
    a, b = _ints(rng, np.int8, (9, k)), _ints(rng, np.int8, (k, 33))
    np.testing.assert_array_equal(gemm.qgemm(a, 3, gemm.pack_b(b), -2), gemm.qgemm_reference(a, 3, b, -2))


needs_vnni = pytest.mark.skipif(not vnni.HAS_VNNI, reason="no AVX-512 VNNI here (CPU without avx512vnni/avx512bw, "
                                                         "or QGRAPH_NO_VNNI set)")
# M not a multiple of MR (and past one MC-row block), N not a multiple of 16 or 32 (last panel <= 16
# columns: the 16-column tile; past one NC-column block), K = 1, 3, 27 (tail word, assembled byte
# by byte in the last rows), 16, 144 (whole words), 1025 (two k blocks of KC4, the second short)
VNNI_SHAPES = [(1, 1, 1), (2, 3, 7), (5, 27, 33), (13, 16, 24), (100, 27, 45), (7, 144, 150), (203, 16, 200),
               (97, 1025, 17), (11, 1025, 70), (3, 1, 129)]


@needs_vnni
@pytest.mark.parametrize("a_t,b_t", [("s8", "s8"), ("u8", "s8"), ("u8", "u8"), ("s8", "u8")])
def test_vnni_qgemm_equals_reference_on_awkward_shapes(a_t, b_t):
    rng = np.random.default_rng(21)
    for m, k, n in VNNI_SHAPES:
        a, b = _ints(rng, DT[a_t], (m, k)), _ints(rng, DT[b_t], (k, n))
        pb = gemm.pack_b(b)
        for zp in ("zero", "tensor", "row/column"):
            za, zb = _zero_point(rng, DT[a_t], m, zp), _zero_point(rng, DT[b_t], n, zp)
            want = gemm.qgemm_reference(a, za, b, zb)
            signed = a.dtype == np.int8
            out = np.empty((m, n), np.int32)
            vnni.qgemm_vnni(a.view(np.uint8), np.uint32(0x80808080 if signed else 0), 128 if signed else 0,
                            np.asarray(za, np.int64).reshape(-1), pb.data, pb.k4, pb.sums, pb.offset,
                            np.asarray(zb, np.int64).reshape(-1), out)
            np.testing.assert_array_equal(out, want, err_msg=f"direct {(m, k, n)} {zp}")
            np.testing.assert_array_equal(gemm.qgemm(a, za, pb, zb), want, err_msg=f"qgemm {(m, k, n)} {zp}")


@needs_vnni
def test_vnni_qgemm_reads_strided_a():
    # row strides other than K (views, reversed rows) and a column-strided A (copied first)
    rng = np.random.default_rng(22)
    big = _ints(rng, np.int8, (90, 150))
    b = _ints(rng, np.int8, (27, 33))
    pb = gemm.pack_b(b)
    for a in (big[:45, 10:37], big[::2, 3:30], big[::-1, :27], big[:40, ::5][:, :27], np.asfortranarray(big[:40, :27])):
        out = np.empty((a.shape[0], 33), np.int32)
        if a.strides[1] == 1:
            vnni.qgemm_vnni(a.view(np.uint8), np.uint32(0x80808080), 128, np.array([-3]), pb.data, pb.k4, pb.sums,
                            pb.offset, np.array([5]), out)
            np.testing.assert_array_equal(out, gemm.qgemm_reference(a, -3, b, 5))
        np.testing.assert_array_equal(gemm.qgemm(a, -3, pb, 5), gemm.qgemm_reference(a, -3, b, 5))


needs_amx = pytest.mark.skipif(not amx.HAS_AMX, reason="no AMX-INT8 here (CPU without amx-tile/amx-int8, "
                                                       "tile state not granted by the OS, or QGRAPH_NO_AMX set)")
# M, N not multiples of 16/32; K = 1, 3 and 27 (one short k block, A rows over-read into B's zero
# padding), 64 and 128 (whole blocks), 65, 144 and 200 (the overlapping last block)
AMX_SHAPES = [(1, 1, 1), (5, 3, 7), (31, 27, 33), (32, 27, 32), (33, 1, 17), (64, 64, 64), (70, 65, 24),
              (17, 144, 45), (96, 128, 31), (40, 200, 70), (3, 65, 96)]


@needs_amx
@pytest.mark.parametrize("a_t,b_t", [("s8", "s8"), ("u8", "s8"), ("u8", "u8"), ("s8", "u8")])
def test_amx_qgemm_equals_reference_on_awkward_shapes(a_t, b_t):
    rng = np.random.default_rng(17)
    for trial, (m, k, n) in enumerate(AMX_SHAPES):
        a, b = _ints(rng, DT[a_t], (m, k)), _ints(rng, DT[b_t], (k, n))
        for zp in ("zero", "tensor", "channel"):
            za, zb = _zero_point(rng, DT[a_t], m, zp), _zero_point(rng, DT[b_t], n, zp)
            pb = gemm.pack_b(b)
            want = gemm.qgemm_reference(a, za, b, zb)
            np.testing.assert_array_equal(gemm.qgemm(a, za, pb, zb), want, err_msg=f"{(m, k, n)} {zp}")
            # the same through the tile kernel called directly (qgemm's dispatch aside)
            out = np.empty((m, n), np.int32)
            tail = amx.b_tail(pb.data, pb.k4)
            tail = np.zeros(0, np.int8) if tail is None else tail
            amx.qgemm_amx(a, np.asarray(za, np.int64).reshape(-1), pb.data, tail, pb.k4, pb.sums, pb.offset,
                          np.asarray(zb, np.int64).reshape(-1), out)
            np.testing.assert_array_equal(out, want, err_msg=f"direct {(m, k, n)} {zp}")
            # packed A (the conv path's tile kernel: A row-major copy, B panels as they are)
            np.testing.assert_array_equal(gemm.qgemm_packed(gemm.pack_a(a), za, pb, zb), want,
                                          err_msg=f"packed {(m, k, n)} {zp}")


@needs_amx
def test_amx_qgemm_reads_strided_a_and_reuses_the_packed_b():
    rng = np.random.default_rng(18)
    big = _ints(rng, np.int8, (90, 150))
    b = _ints(rng, np.int8, (75, 33))
    pb = gemm.pack_b(b)
    for a in (big[::2, ::2], big[:45, 10:85], np.asfortranarray(big[:40, :75])):
        np.testing.assert_array_equal(gemm.qgemm(a, -3, pb, 5), gemm.qgemm_reference(a, -3, b, 5))
    np.testing.assert_array_equal(pb.data, gemm.pack_b(b).data)        # the B tail is a copy


@needs_amx
@pytest.mark.parametrize("cin,kernel", [(20, 3), (40, 1), (3, 3)])
def test_amx_conv_with_ragged_k_equals_reference(cin, kernel):
    # k = kernel^2 * channels padded to 4: 180 (k4 = 45, overlapping last block), 40, 36
    rng = np.random.default_rng(cin)
    x = _ints(rng, np.uint8, (2, cin, 11, 13))
    w = _ints(rng, np.int8, (37, cin, kernel, kernel))
    zw = rng.integers(-3, 3, 37)
    geo = ConvGeometry((kernel, kernel), (1, 2), (1, 1), (1, 0, 1, 2) if kernel > 1 else (0, 0, 0, 0), 1)
    pc = pack_conv(w, 1)
    acc = conv_int(x, 133, pc, zw, geo)
    np.testing.assert_array_equal(acc, conv_reference(x, 133, w, zw, geo))
    bias = rng.integers(-3000, 3000, 37).astype(np.int32)
    scale = rng.uniform(2e-4, 2e-3, 37).astype(np.float32)
    mult, shift = fixed_multiplier(scale)
    for mode in ("float", "fixed"):
        want = requantize_into((acc + bias.reshape(1, -1, 1, 1)).reshape(2, 37, -1), scale, 120, 0, 255, mode,
                               np.uint8).reshape(acc.shape)
        got = conv_int(x, 133, pc, zw, geo, rq=(bias, scale, mult, shift, 120, 0, 255, mode == "fixed"),
                       out_dtype=np.uint8)
        np.testing.assert_array_equal(got, want, err_msg=mode)


def test_amx_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("QGRAPH_NO_AMX", "1")
    assert amx._request_amx() is False


def test_amx_kernel_compiles_to_tile_instructions_on_any_x86_cpu(tmp_path):
    # The AMX tests above run only on AMX hardware; this one compiles (never runs) the AMX GEMM for
    # a Sapphire Rapids target in a subprocess, so a broken intrinsic is caught on every x86 CPU.
    import platform
    import subprocess
    import sys
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("AMX is an x86-64 extension")
    code = ("from numba import types; from qgraph.kernels import amx; a = types.Array(types.int8, 1, 'C'); "
            "sig = (a, a, a, types.Array(types.int32, 2, 'C'), types.intp, types.intp); "
            "amx.gemm_amx_raw.compile(sig); asm = amx.gemm_amx_raw.overloads[sig].library.get_asm_str(); "
            "print(all(i in asm for i in ('tileloadd', 'tilestored', 'tdpbssd', 'tilezero')))")
    feats = "+amx-tile,+amx-int8,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+avx2,+fma,+avx,+bmi2"
    env = {**__import__("os").environ, "NUMBA_CPU_NAME": "sapphirerapids", "NUMBA_CPU_FEATURES": feats,
           "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


@pytest.mark.parametrize("kind", ["dense", "grouped", "depthwise", "depthwise_multiplier", "conv1d"])
def test_conv_equals_reference(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    for trial in range(6):
        g = {"dense": 1, "grouped": 2, "depthwise": 4, "depthwise_multiplier": 3, "conv1d": 1}[kind]
        cin = g if kind.startswith("depthwise") else g * int(rng.integers(1, 4))
        cout = cin * 2 if kind == "depthwise_multiplier" else (cin if kind == "depthwise" else g * 3)
        kh = 1 if kind == "conv1d" else int(rng.integers(1, 4))
        kw = int(rng.integers(1, 4))
        geo = ConvGeometry((kh, kw), (1 if kind == "conv1d" else int(rng.integers(1, 3)), int(rng.integers(1, 3))),
                           (1, int(rng.integers(1, 3))),
                           (0 if kind == "conv1d" else int(rng.integers(0, 3)), int(rng.integers(0, 3)),
                            0 if kind == "conv1d" else int(rng.integers(0, 3)), int(rng.integers(0, 3))), g)
        x = _ints(rng, np.int8 if trial % 2 else np.uint8, (2, cin, 1 if kind == "conv1d" else 7, 9))
        w = _ints(rng, np.int8, (cout, cin // g, kh, kw))
        zx, zw = int(rng.integers(-5, 5)) + (128 if x.dtype == np.uint8 else 0), rng.integers(-3, 3, cout)
        got = conv_int(x, zx, pack_conv(w, g), zw, geo)
        np.testing.assert_array_equal(got, conv_reference(x, zx, w, zw, geo), err_msg=f"{kind} {trial} {geo}")


@pytest.mark.parametrize("mode", ["float", "fixed"])
def test_requantize_equals_reference(mode):
    rng = np.random.default_rng(5)
    acc = rng.integers(-200_000, 200_000, (3, 8, 50)).astype(np.int32)
    acc[0, 0, :4] = [0, 1, -1, 2**31 - 1]
    scale = rng.uniform(1e-5, 1e-3, 8).astype(np.float32)
    got = requantize_into(acc, scale, -3, -128, 127, mode, np.int8)
    np.testing.assert_array_equal(got, requantize_reference(acc, scale, -3, -128, 127, mode))


def test_requantize_channels_last_layout_equals_reference():
    # (pixels, C, 1): the NHWC / matmul layout takes a separate vectorized loop
    rng = np.random.default_rng(6)
    acc = rng.integers(-100_000, 100_000, (300, 24, 1)).astype(np.int32)
    scale = rng.uniform(1e-5, 1e-3, 24).astype(np.float32)
    for mode in ("float", "fixed"):
        got = requantize_into(acc, scale, 7, -128, 127, mode, np.int8)
        np.testing.assert_array_equal(got, requantize_reference(acc, scale, 7, -128, 127, mode))


def test_requantize_float_mode_rounds_half_to_even():
    acc = np.array([1, 3, 5, -1, -3], np.int32).reshape(1, 1, -1)   # x 0.5 -> .5 ties
    got = requantize_into(acc, [0.5], 0, -128, 127, "float", np.int8).reshape(-1)
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2])


def test_fixed_multiplier_represents_scale_to_31_bits():
    scale = np.array([0.75, 1e-4, 3.0e-7, 0.999999], np.float32)
    mult, shift = fixed_multiplier(scale)
    assert ((mult >= 2**30) & (mult < 2**31)).all()
    np.testing.assert_allclose(mult / 2.0**shift, scale, rtol=2**-30)


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3]},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2]},
    {"kernel_shape": [2, 3], "dilations": [2, 1], "pads": [1, 1, 0, 0]},
])
def test_max_pool_and_window_sums_equal_reference(attrs):
    rng = np.random.default_rng(9)
    x = _ints(rng, np.int8, (2, 3, 8, 7))
    np.testing.assert_array_equal(pool.max_pool(x, attrs), pool.pool_reference(x, attrs, True))
    # fixed mode: integer window sums of (x - zx), one fixed-point requantization per window size
    sums = pool.pool_reference(x, attrs, False, zx=5)
    counts = pool.pool_reference(np.ones_like(x), attrs, False, zx=0)
    y = pool.average_pool(x, np.float32(0.02), 5, np.float32(0.03), np.int8(0), attrs, "fixed")
    want = np.empty_like(y)
    for cnt in np.unique(counts):
        sel = counts == cnt
        m = np.float32(np.float32(0.02) / (np.float32(0.03) * np.float32(cnt)))
        want[sel] = requantize_reference(sums[sel].reshape(1, 1, -1), [m], 0, -128, 127, "fixed").reshape(-1)
    np.testing.assert_array_equal(y, want)


def test_average_pool_float_mode_averages_dequantized_values_as_ort():
    # ORT's QLinearAveragePool: float32 sum of dequantized values in window order, / count,
    # then rne(avg / sy + zy); written out by hand for a 2x2 / stride-2 pool
    rng = np.random.default_rng(10)
    x = _ints(rng, np.int8, (1, 2, 4, 4))
    sx, sy, zx, zy = np.float32(0.05), np.float32(0.07), 3, -2
    y = pool.average_pool(x, sx, zx, sy, np.int8(zy), {"kernel_shape": [2, 2], "strides": [2, 2]}, "float")
    for c in range(2):
        for i in range(2):
            for j in range(2):
                acc = np.float32(0)
                for v in x[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1):
                    acc = np.float32(acc + np.float32(sx * np.float32(int(v) - zx)))
                want = np.clip(np.rint(np.float32(np.float32(acc / np.float32(4)) / sy) + np.float32(zy)), -128, 127)
                assert y[0, c, i, j] == want


def test_global_average_pool_rounds_the_integer_mean():
    x = np.array([1, 2, 2, 2], np.int8).reshape(1, 1, 2, 2)          # sum 7, mean 1.75 -> 2
    y = pool.global_average_pool(x, np.float32(1.0), 0, np.float32(1.0), np.int8(0), "float")
    assert y.shape == (1, 1, 1, 1) and int(y.reshape(())) == 2


@pytest.mark.parametrize("mode", ["float", "fixed"])
@pytest.mark.parametrize("group,w_shape", [(2, (10, 3, 3, 3)), (1, (4, 1, 3, 2))], ids=["grouped", "cin1"])
def test_requantization_fused_in_the_gemm_epilogue_equals_the_separate_pass(mode, group, w_shape):
    # conv_int(rq=...) requantizes inside the GEMM epilogue; it must equal conv_int + requantize
    rng = np.random.default_rng(8)
    x, w = _ints(rng, np.uint8, (2, w_shape[1] * group, 9, 9)), _ints(rng, np.int8, w_shape)
    geo = ConvGeometry(w_shape[2:], (2, 1), (1, 2), (1, 0, 2, 1), group)
    pc, zw = pack_conv(w, group), np.zeros(w_shape[0], np.int64)
    cout = w_shape[0]
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    scale = rng.uniform(2e-4, 2e-3, cout).astype(np.float32)
    mult, shift = fixed_multiplier(scale)
    acc = conv_int(x, 131, pc, zw, geo) + bias.reshape(1, -1, 1, 1)
    want = requantize_into(acc.reshape(2, cout, -1), scale, 120, 0, 255, mode, np.uint8).reshape(acc.shape)
    got = conv_int(x, 131, pc, zw, geo, rq=(bias, scale, mult, shift, 120, 0, 255, mode == "fixed"),
                   out_dtype=np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["int32", "float", "fixed"])
def test_depthwise_kernels_equal_reference(mode):
    # two kernels (depthwise.py): stride 1 with OW == W ("same" padding) and the residue planes for
    # the rest; each with the bias and requantization of its epilogue, against conv_reference
    rng = np.random.default_rng(21)
    seen = set()
    for trial in range(24):
        per, kh, kw = int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        same = trial % 2 == 0
        if same:
            pl = int(rng.integers(0, (kw - 1) * dw + 1))
            pads, strides = (int(rng.integers(0, 3)), pl, int(rng.integers(0, 3)), (kw - 1) * dw - pl), (1, 1)
        else:
            pads = tuple(int(v) for v in rng.integers(0, 3, 4))
            strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        c = int(rng.integers(1, 5))
        hw = (int(rng.integers(kh * dh, 20)), int(rng.integers(1 if same else kw * dw, 20)))   # W < KW too
        x = _ints(rng, np.int8 if trial % 3 else np.uint8, (2, c) + hw)
        w = _ints(rng, np.int8, (c * per, 1, kh, kw))
        zx, zw = int(rng.integers(-5, 5)) + (128 if x.dtype == np.uint8 else 0), rng.integers(-3, 3, c * per)
        geo = ConvGeometry((kh, kw), strides, (dh, dw), pads, c)
        bias = rng.integers(-3000, 3000, c * per).astype(np.int32)
        acc = conv_reference(x, zx, w, zw, geo).astype(np.int64) + bias.reshape(1, -1, 1, 1)
        scale = rng.uniform(2e-3, 2e-2, c * per).astype(np.float32)
        mult, shift = fixed_multiplier(scale)
        if mode == "int32":
            rq, dtype, want = None, np.int32, acc.astype(np.int32)
        else:
            rq, dtype = (bias, scale, mult, shift, -3, -128, 127, mode == "fixed"), np.int8
            want = requantize_reference(acc.reshape(2, c * per, -1), scale, -3, -128, 127, mode).reshape(acc.shape)
        pc = pack_conv(w, c)
        got = conv_int(x, zx, pc, zw, geo, rq=rq, out_dtype=dtype)
        if mode == "int32":
            got = got + bias.reshape(1, -1, 1, 1)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial} {geo}")
        seen.add("same" if strides == (1, 1) and got.shape[3] == x.shape[3] else "planes")
    assert seen == {"same", "planes"}
