"""The AVX-512 VNNI micro-kernel of the int8 GEMM (u8 x s8 -> int32 with ``vpdpbusd``).

LLVM does not turn a plain Numba dot-product loop into ``vpdpbusd`` (Numba promotes to int64, and even
when narrowed back to int32 it picks ``vpmulld``), so this one tile is written in LLVM IR through a
Numba ``@intrinsic``: ``MR`` rows of A x ``NR = 16 * NV`` columns of B, ``MR * NV`` zmm accumulators
held in registers across the whole k loop. Per step of 4 k: one 4-byte broadcast of A per row, one
64-byte load of B per zmm, ``MR * NV`` ``vpdpbusd``. Layouts (made by ``gemm.pack_a`` / ``pack_b``):

    A panel  [k4][MR][4]  uint8     (4 consecutive k of one row are one int32 lane)
    B panel  [k4][NR][4]  int8      (one zmm = 16 columns x 4 k)

The tile adds its sums into C (row stride ``ldc``), so k can be split into cache-sized blocks; a
variant stores instead (the first or only k block: no load of C, which dominates short k loops), and
16-column variants (``NV = 1``) serve a last panel with at most 16 real columns.

``gemm_u8s8_vnni`` multiplies two packed operands (the conv path); ``qgemm_vnni`` is the matmul
path: it packs A itself, ``MC`` rows at a time into a small reusable buffer (whole 4-byte words per
load, the row sums in the same pass), computes [MC, NC] blocks of C into a cached scratch and adds
the zero-point terms as each block is written to the [M, N] result (no padded C, no zero fill, no
separate pass). Only compiled when the CPU has AVX-512 VNNI (``HAS_VNNI``); ``gemm.py`` falls back
to plain Numba otherwise.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels.cpu import compile_features
from qgraph.kernels.requant import column_terms
from qgraph.kernels.tiles import broadcast, tile_loop

MR = 6          # rows of A per tile
NV = 2          # zmm registers of B per tile
NR = 16 * NV    # columns of B per tile
KC4 = 256       # k block (in units of 4): a 32-column B panel of 1024 k is 32 KiB, L1-sized
MC = 16 * MR    # rows of A packed at a time by ``qgemm_vnni`` (16 strips share each B panel in L1)
NC = 4 * NR     # columns of C per block of ``qgemm_vnni``: its int32 block [MC, NC] is 48 KiB


def _host_has_vnni() -> bool:
    if os.environ.get("QGRAPH_NO_VNNI"):
        return False
    feats = compile_features()          # what Numba compiles for (the host unless NUMBA_CPU_FEATURES)
    return bool(feats.get("avx512vnni")) and bool(feats.get("avx512bw"))


HAS_VNNI = _host_has_vnni()


def _make_tile(nv: int, accumulate: bool):
    """The tile intrinsic for ``nv`` zmm of B (16 * nv columns, read from 32-column panels: one k
    step of B is ``NR * 4`` bytes whatever ``nv``). ``accumulate``: C += the tile (k split in blocks);
    otherwise C = the tile (the first or only k block: no load of C)."""

    @intrinsic
    def tile(typingctx, a, a_off, b, b_off, c, c_off, ldc, k4):
        sig = types.void(a, types.intp, b, types.intp, c, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_arr = context.make_array(signature.args[0])(context, builder, args[0])
            b_arr = context.make_array(signature.args[2])(context, builder, args[2])
            c_arr = context.make_array(signature.args[4])(context, builder, args[4])
            a_off_v, b_off_v, c_off_v, ldc_v, k4_v = args[1], args[3], args[5], args[6], args[7]
            i8p = ir.IntType(8).as_pointer()
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v16 = ir.VectorType(i32, 16)
            ap = builder.gep(builder.bitcast(a_arr.data, i8p), [a_off_v])
            bp = builder.gep(builder.bitcast(b_arr.data, i8p), [b_off_v])
            cp = builder.gep(builder.bitcast(c_arr.data, i32.as_pointer()), [c_off_v])
            name = "llvm.x86.avx512.vpdpbusd.512"
            fn = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(v16, [v16, v16, v16]), name)

            def load_a(k, r):   # 4 bytes A[r, 4k:4k+4] as one i32 in every lane
                a_k = builder.gep(ap, [builder.add(builder.mul(k, ir.Constant(i64, MR * 4)), ir.Constant(i64, 4 * r))])
                return broadcast(builder, builder.load(builder.bitcast(a_k, i32.as_pointer()), align=1), v16)

            def load_b(k, v):
                b_k = builder.gep(bp, [builder.add(builder.mul(k, ir.Constant(i64, NR * 4)), ir.Constant(i64, 64 * v))])
                return builder.load(builder.bitcast(b_k, v16.as_pointer()), align=1)

            _, _, _, new = tile_loop(builder, k4_v, rows=MR, vecs=nv, vec_type=v16, load_a=load_a, load_b=load_b,
                                     mac=lambda acc, a, b: builder.call(fn, [acc, a, b]))
            for r in range(MR):
                row = builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)])
                for v in range(nv):
                    q = builder.bitcast(builder.gep(row, [ir.Constant(i64, 16 * v)]), v16.as_pointer())
                    val = new[r * nv + v]
                    if accumulate:
                        val = builder.add(builder.load(q, align=4), val)
                    builder.store(val, q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_vnni_tile = _make_tile(NV, True)           # C += the MR x NR tile
_vnni_tile_set = _make_tile(NV, False)      # C = the MR x NR tile
_vnni_half_add = _make_tile(1, True)        # the same on the first 16 columns of a panel
_vnni_half_set = _make_tile(1, False)


@intrinsic
def _load_u32(typingctx, arr, byte_off):
    """The 4 bytes at byte ``byte_off`` of ``arr``'s data as one uint32 (unaligned load)."""
    sig = types.uint32(arr, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i32 = ir.IntType(32)
        p = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        return builder.load(builder.bitcast(p, i32.as_pointer()), align=1)

    return sig, codegen


@njit(cache=True)
def gemm_u8s8_vnni(a_packed, b_packed, c, k4):
    """c[Mt*MR, Nt*NR] += A_u8 @ B_s8 from packed panels (see module docstring); k4 >= 1."""
    mt_n = c.shape[0] // MR
    nt_n = c.shape[1] // NR
    ldc = c.shape[1]
    flat = c.ravel()
    for kb in range(0, k4, KC4):
        kn = min(KC4, k4 - kb)
        for nt in range(nt_n):
            b_off = (nt * k4 + kb) * NR * 4
            for mt in range(mt_n):
                _vnni_tile(a_packed, (mt * k4 + kb) * MR * 4, b_packed, b_off, flat,
                           mt * MR * ldc + nt * NR, ldc, kn)


@njit(cache=True)
def _pack_rows(a, lda, i0, m, k, k4, flip, buf, sums, with_sums):
    """Rows i0.. of A (uint8 view, unit column stride, row stride ``lda`` bytes) -> ``buf``, the A
    panels [strips][k4][MR] as uint32 words of 4 k (``A ^ flip``: flip = 0x80808080 shifts int8 to
    uint8), for as many MR-row strips as fit in ``buf``; rows past M are zero. Words are read with
    one unaligned load each; a K % 4 tail word too (its extra bytes masked to 0) unless that could
    read past the matrix (the last 3 rows), where it is assembled byte by byte. ``sums[r]`` gets
    the row sums of the shifted values when ``with_sums``."""
    strips = buf.size // (k4 * MR)
    kf = k // 4
    fb = flip & 0xFF
    keep = (1 << (8 * (k - 4 * kf))) - 1          # the real bytes of the tail word
    for s in range(strips):
        if not with_sums and lda > 0 and i0 + (s + 1) * MR + 3 <= m:
            # a whole strip, no sums: k-major, so the MR words of one k step are stored together
            ws = s * k4 * MR
            base = (i0 + s * MR) * lda
            for kk in range(kf):
                for r in range(MR):
                    buf[ws + kk * MR + r] = _load_u32(a, base + r * lda + 4 * kk) ^ flip
            if kf < k4:
                for r in range(MR):
                    buf[ws + kf * MR + r] = (_load_u32(a, base + r * lda + 4 * kf) ^ flip) & keep
            continue
        for r in range(MR):
            i = i0 + s * MR + r
            w0 = s * k4 * MR + r
            if i >= m:
                for kk in range(k4):
                    buf[w0 + kk * MR] = 0
                continue
            base = i * lda
            tot = 0
            for kk in range(kf):
                w = _load_u32(a, base + 4 * kk) ^ flip
                buf[w0 + kk * MR] = w
                if with_sums:
                    t = (w & 0x00FF00FF) + ((w >> 8) & 0x00FF00FF)
                    tot += (t & 0xFFFF) + (t >> 16)
            if kf < k4 and i + 3 < m and lda > 0:
                # one load: the <= 3 bytes past the row's K are in the next rows; masked off
                tail = (_load_u32(a, base + 4 * kf) ^ flip) & keep
                buf[w0 + kf * MR] = tail
                if with_sums:
                    t = (tail & 0x00FF00FF) + ((tail >> 8) & 0x00FF00FF)
                    tot += (t & 0xFFFF) + (t >> 16)
            elif kf < k4:
                tail = 0
                for q in range(k - 4 * kf):
                    v = a[i, 4 * kf + q] ^ fb
                    tail |= np.int64(v) << (8 * q)
                    tot += v
                buf[w0 + kf * MR] = tail
            sums[s * MR + r] = tot


@njit(cache=True)
def qgemm_vnni(a, flip, oa, za, b, k4, colsum, ob, zb, out):
    """out[M, N] = (A - za) @ (B - zb) in wrapping int32 (``gemm``'s formula), A the caller's [M, K]
    matrix as uint8 (unit column stride, any row stride; ``flip`` 0x80808080 and oa = 128 when it
    holds int8), za per tensor or per row, zb per tensor or per column (int64), b the packed B
    panels with their column sums and shift ``ob``; out C-contiguous.

    A is packed ``MC`` rows at a time into a small reusable buffer (with its row sums in the same
    pass) and used while it is hot; C is computed in [MC, NC] blocks of raw sums in a scratch that
    stays in cache (the first k block's tiles store, later ones add: no zero fill), and the
    zero-point terms are applied to each block on its way to ``out``. The last panel uses the
    16-column tile when at most 16 of its columns are real."""
    m, k = a.shape
    n = out.shape[1]
    lda = a.strides[0]
    zbv, csum, need_sums = column_terms(zb, ob, colsum, 0, n)
    nt_n = -(-n // NR)
    mc = min(MC, -(-m // MR) * MR)
    nc = min(NC, nt_n * NR)
    buf = np.empty(mc * k4, np.uint32)
    sums = np.zeros(mc, np.int64)
    u = np.zeros(mc, np.int32)
    zai = np.empty(mc, np.int32)
    raw = np.empty(mc * nc, np.int32)
    of = out.reshape(-1)
    for i0 in range(0, m, mc):
        rows = min(mc, m - i0)
        strips = -(-rows // MR)
        _pack_rows(a, lda, i0, m, k, k4, flip, buf[:strips * k4 * MR], sums, need_sums)
        for r in range(rows):
            zi = np.int64(za[i0 + r if za.size > 1 else 0]) + oa
            zai[r] = np.int32(zi & 0xFFFFFFFF)
            if need_sums:
                u[r] = np.int32((k * zi - sums[r]) & 0xFFFFFFFF)
        for c0 in range(0, nt_n * NR, nc):
            nt0 = c0 // NR
            nt1 = min(nt_n, nt0 + nc // NR)
            for kb in range(0, k4, KC4):
                kn = min(KC4, k4 - kb)
                for nt in range(nt0, nt1):
                    b_off = (nt * k4 + kb) * NR * 4
                    half = n - nt * NR <= 16
                    for s in range(strips):
                        a_off = (s * k4 + kb) * MR * 4
                        c_off = s * MR * nc + (nt - nt0) * NR
                        if half:
                            if kb == 0:
                                _vnni_half_set(buf, a_off, b, b_off, raw, c_off, nc, kn)
                            else:
                                _vnni_half_add(buf, a_off, b, b_off, raw, c_off, nc, kn)
                        elif kb == 0:
                            _vnni_tile_set(buf, a_off, b, b_off, raw, c_off, nc, kn)
                        else:
                            _vnni_tile(buf, a_off, b, b_off, raw, c_off, nc, kn)
            # the zero-point terms, block row by block row into out; unsigned indices, so LLVM
            # knows they are not negative (no wrap-around) and emits plain vector loads / stores
            w = min(nc, n - c0)
            for r in range(rows):
                o = np.uint64((i0 + r) * n + c0)
                ro = np.uint64(r * nc)
                cz = np.uint64(c0)
                ur = u[r]
                zr = zai[r]
                for j in range(w):
                    uj = np.uint64(j)
                    of[o + uj] = raw[ro + uj] + zbv[cz + uj] * ur - zr * csum[cz + uj]
