"""ONNX Runtime's u8 x s8 arithmetic on CPUs without VNNI (AVX2, AVX-512BW): int16 pair sums that saturate.

There MLAS multiplies u8 activations by s8 weights with ``vpmaddubsw`` (two adjacent products added
into int16, saturating) and ``vpmaddwd`` with ones (int16 -> int32), so the raw sum is

    raw[m, n] = sum_j sat16(a[m, 2j] * w[2j, n] + a[m, 2j+1] * w[2j+1, n])

over the GEMM's K order (``qgraph.ops``), followed by the exact zero-point terms. ``float`` mode
computes this (instead of the exact sum) for the steps ORT runs as u8 x s8 when ``qgraph.kernels.cpu.ort_path``
saturates and the weights have a pair that can (``qgraph.ops.can_saturate``); everywhere else the
two are the same integers. ``conv_acc`` / ``matmul_acc`` return the int32 accumulators (bias not
added) in ORT's operand values: int8 activations are the uint8 codes + 128 ORT stores them as, the
zero point likewise.

The kernel (``sat_gemm``) is plain Numba, vectorized over the columns of the vector operand: it
reproduces ORT, it is not meant to race it (quantize with ``quant:target=any`` and it is never used).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.ops import can_saturate, ort_k_rows, pairs_in_int16


@njit(cache=True)
def _pair_row(acc, s0, v0, s1, v1):
    for t in range(acc.shape[0]):          # a separate function: LLVM vectorizes it
        p = np.int32(s0 * np.int32(v0[t])) + np.int32(s1 * np.int32(v1[t]))
        acc[t] = np.int32(acc[t] + min(max(p, np.int32(-32768)), np.int32(32767)))


@njit(cache=True)
def sat_gemm(s, v, out):
    """out[m, n] = sum_j sat16(s[m, 2j] v[2j, n] + s[m, 2j+1] v[2j+1, n]) (int32), s [M, K] and
    v [K, N] int8/uint8 (one of them unsigned, as vpmaddubsw multiplies), K odd: a last lone product."""
    m, k = s.shape
    n = v.shape[1]
    acc = np.empty(n, np.int32)
    zero = np.zeros(n, v.dtype)
    for i in range(m):
        acc[:] = 0
        for j in range(0, k - 1, 2):
            _pair_row(acc, np.int32(s[i, j]), v[j], np.int32(s[i, j + 1]), v[j + 1])
        if k % 2:
            _pair_row(acc, np.int32(s[i, k - 1]), v[k - 1], np.int32(0), zero)
        out[i, :] = acc


def sat_gemm_reference(s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Plain numpy definition of ``sat_gemm`` (int64, then int32)."""
    s64, v64 = np.asarray(s, np.int64), np.asarray(v, np.int64)
    k = s64.shape[1]
    if k % 2:
        s64 = np.concatenate([s64, np.zeros((s64.shape[0], 1), np.int64)], axis=1)
        v64 = np.concatenate([v64, np.zeros((1, v64.shape[1]), np.int64)], axis=0)
    pairs = s64[:, 0::2, None] * v64[None, 0::2, :] + s64[:, 1::2, None] * v64[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1).astype(np.int32)


def as_ort_u8(x: np.ndarray, zx: int) -> tuple[np.ndarray, int]:
    """An activation and its zero point as ORT stores them on x86: int8 codes become uint8 + 128."""
    x = np.asarray(x)
    if x.dtype == np.int8:
        return (x.view(np.uint8) ^ np.uint8(0x80)), int(zx) + 128
    return x, int(zx)


def matmul_acc(a: np.ndarray, za, b: np.ndarray, zb) -> np.ndarray:
    """(A - za) @ (B - zb) in int32 as MLAS's saturating u8 x s8 kernel computes it: A [M, K] u8 (or
    int8 codes, taken as ORT's uint8), B [K, N] int8, za per tensor, zb per tensor or column."""
    za = np.asarray(za, np.int64).reshape(-1)
    if za.size != 1:
        raise ValueError("the saturating u8 x s8 path takes one zero point for A")
    a_u8, za_u8 = as_ort_u8(np.ascontiguousarray(a), int(za[0]))
    b = np.ascontiguousarray(b)
    if b.dtype != np.int8:
        raise ValueError(f"the saturating u8 x s8 path needs int8 B, got {b.dtype}")
    m, k = a_u8.shape
    raw = np.empty((m, b.shape[1]), np.int32)
    sat_gemm(a_u8, b, raw)
    zb = np.asarray(zb, np.int64).reshape(1, -1)
    acc = (raw.astype(np.int64) - za_u8 * b.sum(axis=0, dtype=np.int64)[None, :]
           - zb * a_u8.sum(axis=1, dtype=np.int64)[:, None] + k * za_u8 * zb)
    return acc.astype(np.int32)


def _im2col(xg: np.ndarray, pad_value: int, geo, oh: int, ow: int) -> np.ndarray:
    """[Cin_g, H, W] -> [K, OH*OW] in ORT's order k = (i*KW + j)*Cin_g + c, padding = ``pad_value``."""
    c, h, w = xg.shape
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    pt, pl, pb, pr = geo.pads
    hp = max(h + pt + pb, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + pl + pr, (ow - 1) * sw + (kw - 1) * dw + 1)
    xp = np.full((c, hp, wp), pad_value, xg.dtype)
    xp[:, pt:pt + h, pl:pl + w] = xg
    cols = np.empty((kh, kw, c, oh, ow), xg.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[i, j] = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    return cols.reshape(kh * kw * c, oh * ow)


def conv_acc(x: np.ndarray, zx: int, w: np.ndarray, zw, geo) -> np.ndarray:
    """Integer convolution accumulators (bias not added) -> int32 [N, Cout, OH, OW], as MLAS's
    saturating u8 x s8 kernels compute them (x [N, C, H, W] u8 or int8 codes, w int8 OIHW)."""
    w = np.asarray(w)
    if w.dtype != np.int8:
        raise ValueError(f"the saturating u8 x s8 path needs int8 weights, got {w.dtype}")
    x_u8, zx_u8 = as_ort_u8(np.ascontiguousarray(x), zx)
    n_b, _, h, wd = x_u8.shape
    cout = w.shape[0]
    g = geo.group
    cout_g, cin_g = cout // g, w.shape[1]
    oh, ow = geo.out_hw(h, wd)
    zw = np.broadcast_to(np.asarray(zw, np.int64).reshape(-1), (cout,))
    rows = ort_k_rows(w, "Conv")                          # [Cout, K] in ORT's k order
    k = rows.shape[1]
    rowsum = rows.sum(axis=1, dtype=np.int64)
    out = np.empty((n_b, cout, oh * ow), np.int32)
    raw = np.empty((cout_g, oh * ow), np.int32)
    for n in range(n_b):
        for gi in range(g):
            cols = _im2col(x_u8[n, gi * cin_g:(gi + 1) * cin_g], zx_u8, geo, oh, ow)
            sl = slice(gi * cout_g, (gi + 1) * cout_g)
            sat_gemm(np.ascontiguousarray(rows[sl]), cols, raw)
            colsum = cols.sum(axis=0, dtype=np.int64)
            acc = (raw.astype(np.int64) - zx_u8 * rowsum[sl, None] - zw[sl, None] * colsum[None, :]
                   + k * zx_u8 * zw[sl, None])
            out[n, sl] = acc.astype(np.int32)
    return out.reshape(n_b, cout, oh, ow)


def _int16_pair_step(step, consts) -> tuple[np.ndarray, str, int] | None:
    """(weights, op, group) of a step ORT runs as u8 activations x constant int8 weights through int16
    pair sums on AVX2 / AVX-512BW CPUs, else None."""
    op = {"QLinearConv": "Conv", "ConvInteger": "Conv", "QLinearMatMul": "MatMul", "MatMulInteger": "MatMul",
          "QGemm": "Gemm"}.get(step.op)
    if op is None or "ort_float" in step.attrs:
        return None
    w = consts.get(step.inputs[3] if step.op in ("QLinearConv", "QLinearMatMul", "QGemm") else step.inputs[1])
    if w is None or np.asarray(w).dtype != np.int8 or step.attrs.get("ort_act", "uint8") != "uint8":
        return None
    group = int(step.attrs.get("group", 1))
    if not pairs_in_int16(op, np.shape(w), group):
        return None
    return np.asarray(w), op, int(step.attrs.get("transB", 0))


def int16_pair_steps(prog) -> int:
    """How many steps of a lowered program ORT runs through int16 pair sums on AVX2 / AVX-512BW CPUs
    (u8 x s8 Conv / MatMul / Gemm with constant weights, depthwise convolutions excepted)."""
    return sum(_int16_pair_step(s, prog.consts) is not None for s in prog.steps)


def saturating_steps(prog) -> list[str]:
    """Names of those steps whose weights have an adjacent pair that can leave int16 (``qgraph.ops``)."""
    out = []
    for s in prog.steps:
        hit = _int16_pair_step(s, prog.consts)
        if hit is not None and can_saturate(hit[0], hit[1], hit[2]):
            out.append(s.name)
    return out
