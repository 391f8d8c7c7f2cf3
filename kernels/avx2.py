"""The AVX2 micro-kernel of the int8 GEMM, for CPUs without VNNI: exact u8 x s8 -> int32 with ``vpmaddwd``.

Without VNNI the x86 way to multiply bytes is ``vpmaddubsw`` (u8 x s8 pairs added into int16), which
saturates: two products of up to 255 * 128 leave int16 (what ONNX Runtime's AVX2 kernels do, see
``qgraph.kernels.cpu``). This kernel widens both operands to int16 instead and multiplies with ``vpmaddwd``
(int16 pairs added into int32): exact for every input, and the same multiply-port work per product
as ``vpmaddubsw`` + ``vpmaddwd`` (one multiply uop per 16 products either way). Written in LLVM IR
through a Numba ``@intrinsic``, as ``vnni.py``:

    A panel  [k4][MR][4]  int16   ``gemm``'s uint8 A panels widened once (``widen_a``): one 8-byte
                                  broadcast (a load, no shuffle) gives the 4 k of a row in every lane
    B panel  [k4][NR][4]  int8    ``gemm``'s B panels as they are: 16 bytes (4 columns x 4 k) are
                                  loaded sign-extended to 16 int16 (``vpmovsxbw``)

A tile is ``MR`` = 6 rows x ``NT`` = 8 columns (a quarter of a 32-column panel): 12 ymm accumulators,
each int32 lane holding one column's sum over k = 0,1 or k = 2,3 of every 4; per step of 4 k, 2 B
loads, 6 A broadcasts, 12 ``vpmaddwd`` and 12 adds. At the end the two half-sums of each column are
added (one even/odd shuffle pair per row) and the 8 columns stored to (or added into) C.

``gemm_u8s8_avx2`` has ``vnni.gemm_u8s8_vnni``'s contract (packed operands; the conv path);
``qgemm_avx2`` is the matmul path: A packed ``MC`` rows at a time into a reused int16 buffer with its
row sums, C computed in cache-sized blocks, zero points applied as each block is written out.
Compiled only when used (``qgraph.kernels.cpu.gemm_kernel`` picks it on AVX2 CPUs without VNNI; any AVX2 CPU
runs it, so its tests run on every x86-64 machine of the last decade).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels.requant import column_terms
from qgraph.kernels.vnni import MR, NR

NT = 8           # columns per tile (two ymm of 4 columns x 4 k)
KC4 = 128        # k block (in units of 4): 6 rows of int16 A = 6 KiB, a 32-column B panel 16 KiB
MC = 16 * MR     # rows of A per block of ``qgemm_avx2``
NC = 4 * NR      # columns of C per block of ``qgemm_avx2``


def _make_tile(accumulate: bool):
    """C[MR, NT] (+)= A16[MR, 4*k4] . B[4*k4, NT]: A16 int16 panels, B int8 panels of NR columns read
    from byte ``b_off`` (the tile's first column inside its panel), C int32 with row stride ``ldc``."""

    @intrinsic
    def tile(typingctx, a, a_off, b, b_off, c, c_off, ldc, k4):
        sig = types.void(a, types.intp, b, types.intp, c, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_arr = context.make_array(signature.args[0])(context, builder, args[0])
            b_arr = context.make_array(signature.args[2])(context, builder, args[2])
            c_arr = context.make_array(signature.args[4])(context, builder, args[4])
            a_off_v, b_off_v, c_off_v, ldc_v, k4_v = args[1], args[3], args[5], args[6], args[7]
            i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
            v16b, v16w, v4w, v8d = ir.VectorType(i8, 16), ir.VectorType(i16, 16), ir.VectorType(i16, 4), \
                ir.VectorType(i32, 8)
            zero = ir.Constant(v8d, None)
            ap = builder.gep(builder.bitcast(a_arr.data, i16.as_pointer()), [a_off_v])      # int16 elements
            bp = builder.gep(builder.bitcast(b_arr.data, i8.as_pointer()), [b_off_v])       # bytes
            cp = builder.gep(builder.bitcast(c_arr.data, i32.as_pointer()), [c_off_v])
            name = "llvm.x86.avx2.pmadd.wd"
            madd = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(v8d, [v16w, v16w]), name)
            bcast = ir.Constant(ir.VectorType(i32, 16), [q % 4 for q in range(16)])

            entry = builder.block
            loop = builder.append_basic_block("avx2_k")
            done = builder.append_basic_block("avx2_store")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            acc = []
            for _ in range(MR * 2):
                p = builder.phi(v8d)
                p.add_incoming(zero, entry)
                acc.append(p)
            a_k = builder.gep(ap, [builder.mul(k, ir.Constant(i64, MR * 4))])
            b_k = builder.gep(bp, [builder.mul(k, ir.Constant(i64, NR * 4))])
            b_vec = [builder.sext(builder.load(builder.bitcast(builder.gep(b_k, [ir.Constant(i64, 16 * v)]),
                                                            v16b.as_pointer()), align=1), v16w) for v in range(2)]
            new = []
            for r in range(MR):
                a4 = builder.load(builder.bitcast(builder.gep(a_k, [ir.Constant(i64, 4 * r)]), v4w.as_pointer()),
                                  align=2)
                a_bc = builder.shuffle_vector(a4, ir.Constant(v4w, None), bcast)
                for v in range(2):
                    new.append(builder.add(acc[r * 2 + v], builder.call(madd, [a_bc, b_vec[v]])))
            k_next = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k_next, loop)
            for p, n in zip(acc, new):
                p.add_incoming(n, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, k4_v), loop, done)

            builder.position_at_end(done)
            even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
            odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))
            for r in range(MR):
                lo, hi = new[r * 2], new[r * 2 + 1]          # columns 0..3 and 4..7, two half-sums each
                val = builder.add(builder.shuffle_vector(lo, hi, even), builder.shuffle_vector(lo, hi, odd))
                q = builder.bitcast(builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)]), v8d.as_pointer())
                if accumulate:
                    val = builder.add(builder.load(q, align=4), val)
                builder.store(val, q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_avx2_tile = _make_tile(True)        # C += the MR x NT tile
_avx2_tile_set = _make_tile(False)   # C = the MR x NT tile


def _make_rows_tile(signed: bool, accumulate: bool):
    """The tile with A read in place: MR rows of the caller's int8 (``signed``) / uint8 matrix, ``lda``
    bytes apart, from byte ``a_off``; each row's 4 bytes of a k step broadcast to all lanes and widened
    (``vpbroadcastd`` + ``vpmovsxbw`` / ``vpmovzxbw``), so A is neither packed nor shifted. The rows
    must be readable 4 * k4 bytes from ``a_off`` (``qgemm_avx2`` copies the last ones when not)."""

    @intrinsic
    def tile(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k4):
        sig = types.void(a, types.intp, types.intp, b, types.intp, c, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_arr = context.make_array(signature.args[0])(context, builder, args[0])
            b_arr = context.make_array(signature.args[3])(context, builder, args[3])
            c_arr = context.make_array(signature.args[5])(context, builder, args[5])
            a_off_v, lda_v, b_off_v, c_off_v, ldc_v, k4_v = args[1], args[2], args[4], args[6], args[7], args[8]
            i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
            v4b, v16b, v16w, v8d = ir.VectorType(i8, 4), ir.VectorType(i8, 16), ir.VectorType(i16, 16), \
                ir.VectorType(i32, 8)
            zero = ir.Constant(v8d, None)
            ap = builder.gep(builder.bitcast(a_arr.data, i8.as_pointer()), [a_off_v])
            bp = builder.gep(builder.bitcast(b_arr.data, i8.as_pointer()), [b_off_v])
            cp = builder.gep(builder.bitcast(c_arr.data, i32.as_pointer()), [c_off_v])
            name = "llvm.x86.avx2.pmadd.wd"
            madd = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(v8d, [v16w, v16w]), name)
            bcast = ir.Constant(ir.VectorType(i32, 16), [q % 4 for q in range(16)])
            rows = [builder.gep(ap, [builder.mul(ir.Constant(i64, r), lda_v)]) for r in range(MR)]

            entry = builder.block
            loop = builder.append_basic_block("avx2_rows_k")
            done = builder.append_basic_block("avx2_rows_store")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            acc = []
            for _ in range(MR * 2):
                p = builder.phi(v8d)
                p.add_incoming(zero, entry)
                acc.append(p)
            k_bytes = builder.mul(k, ir.Constant(i64, 4))
            b_k = builder.gep(bp, [builder.mul(k, ir.Constant(i64, NR * 4))])
            b_vec = [builder.sext(builder.load(builder.bitcast(builder.gep(b_k, [ir.Constant(i64, 16 * v)]),
                                                            v16b.as_pointer()), align=1), v16w) for v in range(2)]
            new = []
            for r in range(MR):
                a4 = builder.load(builder.bitcast(builder.gep(rows[r], [k_bytes]), v4b.as_pointer()), align=1)
                a16 = builder.shuffle_vector(a4, ir.Constant(v4b, None), bcast)
                a_bc = builder.sext(a16, v16w) if signed else builder.zext(a16, v16w)
                for v in range(2):
                    new.append(builder.add(acc[r * 2 + v], builder.call(madd, [a_bc, b_vec[v]])))
            k_next = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k_next, loop)
            for p, n in zip(acc, new):
                p.add_incoming(n, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, k4_v), loop, done)

            builder.position_at_end(done)
            even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
            odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))
            for r in range(MR):
                lo, hi = new[r * 2], new[r * 2 + 1]
                val = builder.add(builder.shuffle_vector(lo, hi, even), builder.shuffle_vector(lo, hi, odd))
                q = builder.bitcast(builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)]), v8d.as_pointer())
                if accumulate:
                    val = builder.add(builder.load(q, align=4), val)
                builder.store(val, q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_rows_s8_add = _make_rows_tile(True, True)
_rows_s8_set = _make_rows_tile(True, False)
_rows_u8_add = _make_rows_tile(False, True)
_rows_u8_set = _make_rows_tile(False, False)


def widen_a(a_packed: np.ndarray) -> np.ndarray:
    """``gemm.pack_a``'s uint8 panels as int16, same layout (what the tile broadcasts from)."""
    return np.ascontiguousarray(a_packed, dtype=np.uint8).astype(np.int16)


@njit(cache=True)
def gemm_u8s8_avx2(a16, b_packed, c, k4):
    """c[Mt*MR, Nt*NR] += A_u8 @ B_s8 from packed panels (A widened to int16); k4 >= 1."""
    mt_n = c.shape[0] // MR
    nt_n = c.shape[1] // NR
    ldc = c.shape[1]
    flat = c.ravel()
    for kb in range(0, k4, KC4):
        kn = min(KC4, k4 - kb)
        for nt in range(nt_n):
            for mt in range(mt_n):
                a_off = (mt * k4 + kb) * MR * 4
                for s in range(NR // NT):
                    _avx2_tile(a16, a_off, b_packed, (nt * k4 + kb) * NR * 4 + s * NT * 4, flat,
                               mt * MR * ldc + nt * NR + s * NT, ldc, kn)


@njit(cache=True)
def _rows_tile(a, a_off, lda, signed, b, b_off, c, c_off, ldc, kn, first):
    if signed:
        if first:
            _rows_s8_set(a, a_off, lda, b, b_off, c, c_off, ldc, kn)
        else:
            _rows_s8_add(a, a_off, lda, b, b_off, c, c_off, ldc, kn)
    elif first:
        _rows_u8_set(a, a_off, lda, b, b_off, c, c_off, ldc, kn)
    else:
        _rows_u8_add(a, a_off, lda, b, b_off, c, c_off, ldc, kn)


@njit(cache=True)
def _block(a, lda, strips, signed, b, k4, nt0, nt1, n, raw, nc):
    """raw[strips*MR, nc] = A rows (in place, ``lda`` apart) @ B panels nt0..nt1, k in KC4 blocks."""
    for kb in range(0, k4, KC4):
        kn = min(KC4, k4 - kb)
        for nt in range(nt0, nt1):
            b_off = (nt * k4 + kb) * NR * 4
            subs = min(NR // NT, -(-(n - nt * NR) // NT))          # tiles with a real column
            for s in range(strips):
                c_off = s * MR * nc + (nt - nt0) * NR
                for t in range(subs):
                    _rows_tile(a, s * MR * lda + kb * 4, lda, signed, b, b_off + t * NT * 4, raw,
                               c_off + t * NT, nc, kn, kb == 0)


@njit(cache=True)
def qgemm_avx2(a, signed, za, b, k4, colsum, ob, zb, out):
    """out[M, N] = (A - za) @ (B - zb) in wrapping int32: A the caller's [M, K] int8 (``signed``) or
    uint8 matrix viewed as uint8 (unit column stride, row stride >= 0), read in place and unshifted
    (oa = 0), za per tensor or per row, zb per tensor or per column (int64), b the packed B panels
    with their column sums and shift ``ob``; out C-contiguous.

    C is computed ``MC`` rows x ``NC`` columns at a time into a scratch block that stays in cache
    (the first k block's tiles store, later ones add) and the zero-point terms are applied as the
    block is written out. A row's last k step may read up to 3 bytes past its K (multiplied by B's
    zero padding); the rows where that could leave the matrix go through a zero-padded copy."""
    m, k = a.shape
    n = out.shape[1]
    lda = a.strides[0]
    zbv, csum, need_sums = column_terms(zb, ob, colsum, 0, n)
    nt_n = -(-n // NR)
    mc = min(MC, -(-m // MR) * MR)
    nc = min(NC, nt_n * NR)
    raw = np.empty(mc * nc, np.int32)
    u = np.zeros(mc, np.int32)
    zai = np.empty(mc, np.int32)
    # rows from ``safe`` on are read from a zero-padded copy: whole strips of the last block
    last_ok = m - 1 if lda == 0 else ((m - 1) * lda + k - 4 * k4) // lda      # last row readable in place
    of = out.reshape(-1)
    for i0 in range(0, m, mc):
        rows = min(mc, m - i0)
        strips = -(-rows // MR)
        if i0 + strips * MR - 1 <= last_ok:
            src, src_lda, s_in = a[i0:], lda, strips
        else:
            s_in = max(0, (last_ok + 1 - i0) // MR)                          # strips still in place
            pad = np.zeros(((strips - s_in) * MR, 4 * k4), np.uint8)
            for r in range(min(rows - s_in * MR, pad.shape[0])):
                pad[r, :k] = a[i0 + s_in * MR + r]
        for r in range(rows):
            zi = np.int64(za[i0 + r if za.size > 1 else 0])
            zai[r] = np.int32(zi & 0xFFFFFFFF)
            if need_sums:
                tot = np.int64(0)
                row = a[i0 + r]
                if signed:
                    for j in range(k):
                        tot += np.int8(row[j])
                else:
                    for j in range(k):
                        tot += row[j]
                u[r] = np.int32((k * zi - tot) & 0xFFFFFFFF)
        for c0 in range(0, nt_n * NR, nc):
            nt0 = c0 // NR
            nt1 = min(nt_n, nt0 + nc // NR)
            if i0 + strips * MR - 1 <= last_ok:
                _block(a[i0:], lda, strips, signed, b, k4, nt0, nt1, n, raw, nc)
            else:
                if s_in:
                    _block(a[i0:], lda, s_in, signed, b, k4, nt0, nt1, n, raw, nc)
                _block(pad, 4 * k4, strips - s_in, signed, b, k4, nt0, nt1, n, raw[s_in * MR * nc:], nc)
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
