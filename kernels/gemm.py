"""int8 GEMM with int32 accumulation and zero points: the one matrix kernel conv and matmul share.

Every signedness is reduced to u8 x s8 (what ``vpdpbusd`` multiplies) by shifting operands by 128 and
moving the shift into the zero points, which are then taken out with row and column sums:

    sum_k (A - za)(B - zb) = sum_k (Au - za')(Bs - zb')          Au = A + oa, Bs = B - ob
                           = raw + zb'*(K*za' - rowsum(Au)) - za'*colsum(Bs)
    za' = za + oa,  zb' = zb - ob,   oa = 128 for int8 A,  ob = 128 for uint8 B,  raw = sum_k Au*Bs

``raw`` is exact in int32 (|Au*Bs| <= 32640 per term). The correction is evaluated in wrapping int32:
the true result fits int32, so arithmetic mod 2^32 is exact, and the loops stay branch-free.

Either operand can be the one packed once: matmul packs the constant B (weights), convolution packs
the constant A (weights, ``C[Cout, pixels] = W @ im2col``) and builds B panels per call.

Micro-kernels, chosen at import (``KERNEL``, by ``qgraph.kernels.cpu.gemm_kernel``; ``QGRAPH_GEMM=amx|vnni|avx2|plain``
forces one): AMX tiles (``amx``, when the CPU has AMX-INT8 and Linux grants the tile state;
``QGRAPH_NO_AMX=1`` turns it off), else AVX-512 VNNI (``vnni``), else AVX2 (``avx2``: int16 ``vpmaddwd``
on the same panels, A widened to int16 once), else plain Numba. The
AMX kernels read the same B panels, but A row-major and unshifted (``tdpbssd`` for int8 A,
``tdpbusd`` for uint8 A, so oa = 0): ``qgemm`` reads the caller's A in place, and ``pack_a`` keeps an
extra row-major copy of A (``Packed.amx_rows``) for the conv path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from qgraph.kernels import cpu
from qgraph.kernels import amx, avx2, vnni
from qgraph.kernels.requant import column_terms
from qgraph.kernels.vnni import MR, NR

assert NR == amx.TN, "the AMX kernels read gemm's B panels as they are"

KERNEL = cpu.gemm_kernel(amx_granted=amx.HAS_AMX)       # amx | vnni | avx2 | plain


@dataclass
class Packed:
    """One operand in panel layout (see ``vnni``), plus its sums for the zero-point terms."""
    data: np.ndarray       # flat uint8 (A panels [M/MR][k4][MR][4]) or int8 (B panels [N/NR][k4][NR][4])
    rows: int              # M for A, N for B (the non-k extent)
    k: int
    k4: int
    sums: np.ndarray       # int64 [rows]: sum over k of the shifted operand
    offset: int            # oa (A) or ob (B)
    # for the AMX kernels (``amx``), only when the CPU has AMX:
    amx_tail: np.ndarray | None = None   # B: ``amx.b_tail`` of data (made on first use); A: the A tail
    amx_rows: np.ndarray | None = None   # A: the unshifted row-major copy of ``amx.pack_a_rows``
    amx_sums: np.ndarray | None = None   # A: its row sums (offset 0)
    avx2_a: np.ndarray | None = None     # A: the panels widened to int16 (``avx2.widen_a``), AVX2 kernel only


def k4_of(k: int) -> int:
    return max(1, (k + 3) // 4)


@njit(cache=True)
def _pack(src, k4, tile, flip, out, sums):
    """src [rows, K] (any strides) -> panels [rows/tile][k4][tile][4] of (src ^ flip); sums of the
    shifted values (src ^ 0x80 reinterpreted is src + 128 for int8->uint8 and src - 128 for the reverse)."""
    rows, k = src.shape
    n_t = out.size // (tile * k4 * 4)
    for t in range(n_t):
        for r in range(tile):
            i = t * tile + r
            s = np.int64(0)
            for kk in range(k4):
                base = ((t * k4 + kk) * tile + r) * 4
                for q in range(4):
                    j = kk * 4 + q
                    if i < rows and j < k:
                        v = src[i, j] ^ flip
                        out[base + q] = v
                        s += v
                    else:
                        out[base + q] = 0
            if i < rows:
                sums[i] = s


def pack_a(a: np.ndarray) -> Packed:
    """A [M, K] int8/uint8 (any strides) -> uint8 panels; int8 is shifted by +128 (oa = 128)."""
    if a.ndim != 2 or a.dtype not in (np.int8, np.uint8):
        raise ValueError(f"pack_a wants a 2-D int8/uint8 matrix, got {a.dtype} {a.shape}")
    m, k = a.shape
    k4, oa = k4_of(k), (128 if a.dtype == np.int8 else 0)
    out = np.empty(-(-m // MR) * MR * k4 * 4, np.uint8)
    sums = np.zeros(m, np.int64)
    _pack(a.view(np.uint8), k4, MR, np.uint8(0x80 if oa else 0), out, sums)
    pa = Packed(out, m, k, k4, sums, oa)
    if KERNEL == "amx" and m > 0 and k > 0:
        pa.amx_rows, pa.amx_tail, pa.amx_sums = amx.pack_a_rows(a)
    elif KERNEL == "avx2":
        pa.avx2_a = avx2.widen_a(out)
    return pa


def pack_b(b: np.ndarray) -> Packed:
    """B [K, N] int8/uint8 (any strides) -> int8 panels; uint8 is shifted by -128 (ob = 128)."""
    if b.ndim != 2 or b.dtype not in (np.int8, np.uint8):
        raise ValueError(f"pack_b wants a 2-D int8/uint8 matrix, got {b.dtype} {b.shape}")
    k, n = b.shape
    k4, ob = k4_of(k), (128 if b.dtype == np.uint8 else 0)
    out = amx.aligned_empty(-(-n // NR) * NR * k4 * 4, np.int8)    # 64-byte aligned for the AMX tiles
    sums = np.zeros(n, np.int64)
    _pack(b.T.view(np.int8), k4, NR, np.int8(-128 if ob else 0), out, sums)
    return Packed(out, n, k, k4, sums, ob)


@njit(cache=True)
def gemm_u8s8_generic(a_packed, b_packed, c, k4):
    """Same contract as ``vnni.gemm_u8s8_vnni``, in plain Numba (any CPU)."""
    mt_n = c.shape[0] // MR
    nt_n = c.shape[1] // NR
    acc = np.zeros((MR, NR), np.int32)
    for nt in range(nt_n):
        for mt in range(mt_n):
            acc[:, :] = 0
            for k in range(k4):
                a0 = (mt * k4 + k) * MR * 4
                b0 = (nt * k4 + k) * NR * 4
                for r in range(MR):
                    for q in range(4):
                        av = np.int32(a_packed[a0 + r * 4 + q])
                        for j in range(NR):
                            acc[r, j] = np.int32(acc[r, j] + av * np.int32(b_packed[b0 + j * 4 + q]))
            for r in range(MR):
                for j in range(NR):
                    c[mt * MR + r, nt * NR + j] += acc[r, j]


@njit(cache=True)
def _zero_point_terms(raw, k, rowsum, oa, za, colsum, ob, zb, out):
    """out[i, j] = raw[i, j] + zb'_j * (K*za'_i - rowsum_i) - za'_i * colsum_j, in wrapping int32."""
    m, n = out.shape
    zbv, csum, _ = column_terms(zb, ob, colsum, 0, n)
    for i in range(m):
        zai64 = np.int64(za[i if za.size > 1 else 0]) + oa
        zai = np.int32(zai64 & 0xFFFFFFFF)
        u = np.int32((k * zai64 - rowsum[i]) & 0xFFFFFFFF)
        _epilogue_row(raw[i], zbv, u, zai, csum, out[i])


@njit(cache=True)
def _epilogue_row(raw, zbv, u, zai, csum, out):
    for j in range(out.shape[0]):         # a separate function so LLVM vectorizes it
        out[j] = raw[j] + zbv[j] * u - zai * csum[j]


@njit(cache=True)
def _requant_row_float(raw, zbv, u, zai, csum, b, s, zp, lo, hi, out):
    z32 = np.int32(zp)
    for j in range(out.shape[0]):         # wrapping int32 throughout (numba widens to int64 otherwise)
        v = np.int32(np.int32(raw[j] + b) + np.int32(zbv[j] * u) - np.int32(zai * csum[j]))
        out[j] = np.int32(np.int32(np.rint(min(max(np.float32(v) * s, lo), hi))) + z32)


@njit(cache=True)
def _requant_row_fixed(raw, zbv, u, zai, csum, b, m, sh, zp, qmin, qmax, out):
    half = np.int64(1) << (sh - 1)
    for j in range(out.shape[0]):
        v = np.int64(np.int32(raw[j] + zbv[j] * u - zai * csum[j] + b))
        q = ((v * m + half) >> sh) + zp
        out[j] = qmin if q < qmin else (qmax if q > qmax else q)


@njit(cache=True)
def _requant_block(raw, c0, valid, pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult, shift, zp, qmin,
                   qmax, fixed, o0, out3):
    """``_zero_point_terms`` + bias + per-row requantization (``requant.requant_run`` arithmetic) of
    columns c0..c0+valid of a conv GEMM whose columns are the pixels of consecutive images: row i
    goes to out3[image, o0 + i, pixel], image by image. Rows are output channels."""
    zbv, csum, _ = column_terms(zb, ob, colsum, c0, valid)
    lo = np.float32(qmin - zp)
    hi = np.float32(qmax - zp)
    for i in range(rowsum.shape[0]):
        zai64 = np.int64(za[i if za.size > 1 else 0]) + oa
        zai = np.int32(zai64 & 0xFFFFFFFF)
        u = np.int32((k * zai64 - rowsum[i]) & 0xFFFFFFFF)
        ci = i if scale.size > 1 else 0
        p = c0
        while p < c0 + valid:                      # one image's run of pixels at a time
            n = p // pix
            q0 = p - n * pix
            q1 = min(pix, q0 + c0 + valid - p)
            j0 = p - c0
            j1 = j0 + q1 - q0
            dst = out3[n, o0 + i, q0:q1]
            if fixed:
                _requant_row_fixed(raw[i, j0:j1], zbv[j0:j1], u, zai, csum[j0:j1], np.int32(bias[i]),
                                   np.int64(mult[ci]), np.int64(shift[ci]), zp, qmin, qmax, dst)
            else:
                _requant_row_float(raw[i, j0:j1], zbv[j0:j1], u, zai, csum[j0:j1], np.int32(bias[i]), scale[ci],
                                   zp, lo, hi, dst)
            p += q1 - q0


def _block_cols(mp: int) -> int:
    """Columns per block of the blocked conv GEMM: the int32 block [Mp, cols] stays ~256 KiB (in L2)."""
    return max(NR, 65536 // mp // NR * NR)


@njit(cache=True)
def conv_gemm_vnni(a, b, k4, cols, nb, pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult, shift, zp,
                   qmin, qmax, fixed, o0, out3):
    """C = A @ B (packed) in column blocks of ``nb`` with the requantizing epilogue per block, so the
    int32 result never leaves the cache; out3 [images, Cout, pixels] (see ``_requant_block``)."""
    mp = a.shape[0] // (k4 * 4)
    scratch = np.empty(mp * nb, np.int32)
    ncols = -(-cols // NR) * NR
    for c0 in range(0, ncols, nb):
        w = min(nb, ncols - c0)
        raw = scratch[:mp * w].reshape(mp, w)
        raw[:] = 0
        vnni.gemm_u8s8_vnni(a, b[c0 * k4 * 4:], raw, k4)
        _requant_block(raw, c0, min(w, cols - c0), pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult,
                       shift, zp, qmin, qmax, fixed, o0, out3)


# Deliberately a second copy of ``conv_gemm_vnni``: the micro-kernel is an intrinsic, and a body that
# branched between the two would make LLVM compile the VNNI instructions on CPUs that lack them
# (instruction selection fails there); Numba cannot pass the micro-kernel as a cached argument.
@njit(cache=True)
def conv_gemm_generic(a, b, k4, cols, nb, pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult, shift, zp,
                      qmin, qmax, fixed, o0, out3):
    """``conv_gemm_vnni`` with the plain-Numba micro-kernel (the only line that differs)."""
    mp = a.shape[0] // (k4 * 4)
    scratch = np.empty(mp * nb, np.int32)
    ncols = -(-cols // NR) * NR
    for c0 in range(0, ncols, nb):
        w = min(nb, ncols - c0)
        raw = scratch[:mp * w].reshape(mp, w)
        raw[:] = 0
        gemm_u8s8_generic(a, b[c0 * k4 * 4:], raw, k4)
        _requant_block(raw, c0, min(w, cols - c0), pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult,
                       shift, zp, qmin, qmax, fixed, o0, out3)


@njit(cache=True)
def conv_gemm_avx2(a16, b, k4, cols, nb, pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult, shift, zp,
                   qmin, qmax, fixed, o0, out3):
    """``conv_gemm_vnni`` with the AVX2 micro-kernel (A: the int16 panels of ``avx2.widen_a``)."""
    mp = a16.shape[0] // (k4 * 4)
    scratch = np.empty(mp * nb, np.int32)
    ncols = -(-cols // NR) * NR
    for c0 in range(0, ncols, nb):
        w = min(nb, ncols - c0)
        raw = scratch[:mp * w].reshape(mp, w)
        raw[:] = 0
        avx2.gemm_u8s8_avx2(a16, b[c0 * k4 * 4:], raw, k4)
        _requant_block(raw, c0, min(w, cols - c0), pix, k, rowsum, oa, za, colsum, ob, zb, bias, scale, mult,
                       shift, zp, qmin, qmax, fixed, o0, out3)


@njit(cache=True)
def conv_gemm_amx(a_rows, a_tail, b, k4, cols, nb, pix, k, rowsum, za, colsum, ob, zb, bias, scale, mult, shift, zp,
                  qmin, qmax, fixed, o0, out3):
    """``conv_gemm_vnni`` with the AMX tiles: A from ``amx.pack_a_rows`` (unshifted, oa = 0), so the
    block is overwritten rather than zeroed and accumulated."""
    mp = a_rows.shape[0] // (k4 * 4)
    ld = nb + 16                                   # see amx.gemm_amx_raw
    scratch = amx.aligned_zeros_like(mp * ld, np.empty(0, np.int32)).reshape(mp, ld)
    ncols = -(-cols // NR) * NR
    for c0 in range(0, ncols, nb):
        w = min(nb, ncols - c0)
        amx.gemm_amx_raw(a_rows, a_tail, b[c0 * k4 * 4:], scratch, w, k4)
        _requant_block(scratch, c0, min(w, cols - c0), pix, k, rowsum, 0, za, colsum, ob, zb, bias, scale, mult,
                       shift, zp, qmin, qmax, fixed, o0, out3)


def conv_gemm_requant(pa: Packed, za, pb: Packed, zb, pix: int, rq: tuple, o0: int, out3: np.ndarray) -> None:
    """Requantized (A - za) @ (B - zb) of a conv group, written to out3[image, o0 + row, pixel]
    where B's columns are the pixels (``pix`` per image) of images 0, 1, ... of ``out3``."""
    if pa.k != pb.k:
        raise ValueError(f"qgemm: A has K={pa.k}, B has K={pb.k}")
    za = np.asarray(za, np.int64).reshape(-1)
    zb = np.asarray(zb, np.int64).reshape(-1)
    if pa.amx_rows is not None and KERNEL == "amx":
        mp = -(-pa.rows // amx.TM) * amx.TM
        conv_gemm_amx(pa.amx_rows, pa.amx_tail, pb.data, pa.k4, pb.rows, _block_cols(mp), pix, pa.k, pa.amx_sums,
                      za, pb.sums, pb.offset, zb, *rq, o0, out3)
        return
    mp = -(-pa.rows // MR) * MR
    if KERNEL == "avx2":
        conv_gemm_avx2(pa.avx2_a if pa.avx2_a is not None else avx2.widen_a(pa.data), pb.data, pa.k4, pb.rows,
                       _block_cols(mp), pix, pa.k, pa.sums, pa.offset, za, pb.sums, pb.offset, zb, *rq, o0, out3)
        return
    fn = conv_gemm_vnni if KERNEL in ("vnni", "amx") else conv_gemm_generic
    fn(pa.data, pb.data, pa.k4, pb.rows, _block_cols(mp), pix, pa.k, pa.sums, pa.offset, za, pb.sums, pb.offset,
       zb, *rq, o0, out3)


def qgemm_packed(pa: Packed, za, pb: Packed, zb, out: np.ndarray | None = None):
    """(A - za) @ (B - zb) -> int32 [M, N] from packed operands; za per tensor or per row, zb per
    tensor or per column. ``out`` may be a preallocated [M, N] array (rows contiguous). (A conv's
    requantized product is ``conv_gemm_requant``.)"""
    if pa.k != pb.k:
        raise ValueError(f"qgemm: A has K={pa.k}, B has K={pb.k}")
    if pa.amx_rows is not None and KERNEL == "amx" and pb.rows > 0:
        raw = amx.aligned_empty((-(-pa.rows // amx.TM) * amx.TM, -(-pb.rows // NR) * NR), np.int32)
        amx.gemm_amx_raw(pa.amx_rows, pa.amx_tail, pb.data, raw, raw.shape[1], pa.k4)
        rowsum, oa = pa.amx_sums, 0
    else:
        raw = np.zeros((-(-pa.rows // MR) * MR, -(-pb.rows // NR) * NR), np.int32)
        if KERNEL == "avx2":
            avx2.gemm_u8s8_avx2(pa.avx2_a if pa.avx2_a is not None else avx2.widen_a(pa.data), pb.data, raw, pa.k4)
        else:
            (vnni.gemm_u8s8_vnni if KERNEL in ("vnni", "amx") else gemm_u8s8_generic)(pa.data, pb.data, raw, pa.k4)
        rowsum, oa = pa.sums, pa.offset
    za = np.asarray(za, np.int64).reshape(-1)
    zb = np.asarray(zb, np.int64).reshape(-1)
    if out is None:
        out = np.empty((pa.rows, pb.rows), np.int32)
    _zero_point_terms(raw, pa.k, rowsum, oa, za, pb.sums, pb.offset, zb, out)
    return out


_NO_TAIL = np.zeros(0, np.int8)


def qgemm(a: np.ndarray, za, pb: Packed, zb) -> np.ndarray:
    """sum_k (A[m,k] - za) * (B[k,n] - zb) in int32, B packed once (``pack_b``). With AMX, A is
    read in place by the tile kernel (``amx.qgemm_amx``), with AVX2 too (``avx2.qgemm_avx2``,
    widened in registers); with VNNI it is packed block by block inside ``vnni.qgemm_vnni``; these
    apply the zero points as they write the result. Otherwise A is packed per call (``pack_a``)."""
    a = np.asarray(a)
    if KERNEL == "amx" and a.ndim == 2 and a.dtype in (np.int8, np.uint8) and a.shape[0] > 0 and a.shape[1] == pb.k > 0:
        if pb.amx_tail is None:
            tail = amx.b_tail(pb.data, pb.k4)
            pb.amx_tail = _NO_TAIL if tail is None else tail
        out = amx.aligned_empty((a.shape[0], pb.rows), np.int32)
        if pb.rows:
            amx.qgemm_amx(np.ascontiguousarray(a), np.asarray(za, np.int64).reshape(-1), pb.data, pb.amx_tail,
                          pb.k4, pb.sums, pb.offset, np.asarray(zb, np.int64).reshape(-1), out)
        return out
    if KERNEL == "avx2" and a.ndim == 2 and a.dtype in (np.int8, np.uint8) and a.shape[1] == pb.k > 0:
        if a.shape[1] > 1 and a.strides[1] != 1 or a.strides[0] < a.shape[1]:      # rows read in place
            a = np.ascontiguousarray(a)
        out = np.empty((a.shape[0], pb.rows), np.int32)
        if out.size:
            avx2.qgemm_avx2(a.view(np.uint8), a.dtype == np.int8, np.asarray(za, np.int64).reshape(-1), pb.data,
                            pb.k4, pb.sums, pb.offset, np.asarray(zb, np.int64).reshape(-1), out)
        return out
    if KERNEL in ("vnni", "amx") and a.ndim == 2 and a.dtype in (np.int8, np.uint8) and a.shape[1] == pb.k:
        if a.shape[1] > 1 and a.strides[1] != 1:
            a = np.ascontiguousarray(a)
        out = np.empty((a.shape[0], pb.rows), np.int32)
        if out.size:
            signed = a.dtype == np.int8
            vnni.qgemm_vnni(a.view(np.uint8), np.uint32(0x80808080 if signed else 0), 128 if signed else 0,
                            np.asarray(za, np.int64).reshape(-1), pb.data, pb.k4, pb.sums, pb.offset,
                            np.asarray(zb, np.int64).reshape(-1), out)
        return out
    return qgemm_packed(pack_a(a), za, pb, zb)


def qgemm_reference(a: np.ndarray, za, b: np.ndarray, zb) -> np.ndarray:
    """Plain numpy: (A - za) @ (B - zb) in int64, returned as int32."""
    a64 = np.asarray(a, np.int64) - np.asarray(za, np.int64).reshape(-1, 1)
    b64 = np.asarray(b, np.int64) - np.asarray(zb, np.int64).reshape(1, -1)
    return (a64 @ b64).astype(np.int32)
