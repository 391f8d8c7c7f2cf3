"""The AVX-512 VNNI micro-kernel of the int8 GEMM (u8 x s8 -> int32 with ``vpdpbusd``).

LLVM does not turn a plain Numba dot-product loop into ``vpdpbusd`` (Numba promotes to int64, and even
when narrowed back to int32 it picks ``vpmulld``), so this one tile is written in LLVM IR through a
Numba ``@intrinsic``: ``MR`` rows of A x ``NR = 16 * NV`` columns of B, ``MR * NV`` zmm accumulators
held in registers across the whole k loop. Per step of 4 k: one 4-byte broadcast of A per row, one
64-byte load of B per zmm, ``MR * NV`` ``vpdpbusd``. Layouts (made by ``gemm.pack_a`` / ``pack_b``):

    A panel  [k4][MR][4]  uint8     (4 consecutive k of one row are one int32 lane)
    B panel  [k4][NR][4]  int8      (one zmm = 16 columns x 4 k)

The tile adds its sums into C (row stride ``ldc``), so k can be split into cache-sized blocks. Only
compiled when the CPU has AVX-512 VNNI (``HAS_VNNI``); ``gemm.py`` falls back to plain Numba otherwise.
"""
from __future__ import annotations

import os

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

MR = 6          # rows of A per tile
NV = 2          # zmm registers of B per tile
NR = 16 * NV    # columns of B per tile
KC4 = 256       # k block (in units of 4): a 32-column B panel of 1024 k is 32 KiB, L1-sized


def _host_has_vnni() -> bool:
    if os.environ.get("QGRAPH_NO_VNNI"):
        return False
    try:
        import llvmlite.binding as ll
        feats = ll.get_host_cpu_features()
        return bool(feats.get("avx512vnni")) and bool(feats.get("avx512bw"))
    except Exception:  # pragma: no cover - llvmlite without host feature query
        return False


HAS_VNNI = _host_has_vnni()


@intrinsic
def _vnni_tile(typingctx, a, a_off, b, b_off, c, c_off, ldc, k4):
    sig = types.void(a, types.intp, b, types.intp, c, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a_arr = context.make_array(signature.args[0])(context, builder, args[0])
        b_arr = context.make_array(signature.args[2])(context, builder, args[2])
        c_arr = context.make_array(signature.args[4])(context, builder, args[4])
        a_off_v, b_off_v, c_off_v, ldc_v, k4_v = args[1], args[3], args[5], args[6], args[7]
        i8p = ir.IntType(8).as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16 = ir.VectorType(i32, 16)
        zero = ir.Constant(v16, None)
        ap = builder.gep(builder.bitcast(a_arr.data, i8p), [a_off_v])
        bp = builder.gep(builder.bitcast(b_arr.data, i8p), [b_off_v])
        cp = builder.gep(c_arr.data, [c_off_v])
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), name)

        entry = builder.block
        loop = builder.append_basic_block("vnni_k")
        done = builder.append_basic_block("vnni_store")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), entry)
        acc = []
        for _ in range(MR * NV):
            p = builder.phi(v16)
            p.add_incoming(zero, entry)
            acc.append(p)
        a_k = builder.gep(ap, [builder.mul(k, ir.Constant(i64, MR * 4))])
        b_k = builder.gep(bp, [builder.mul(k, ir.Constant(i64, NR * 4))])
        b_vec = [builder.load(builder.bitcast(builder.gep(b_k, [ir.Constant(i64, 64 * v)]), v16.as_pointer()),
                              align=1) for v in range(NV)]
        new = []
        for r in range(MR):
            a4 = builder.load(builder.bitcast(builder.gep(a_k, [ir.Constant(i64, 4 * r)]), i32.as_pointer()),
                              align=1)
            a_bc = builder.shuffle_vector(builder.insert_element(zero, a4, ir.Constant(i32, 0)), zero, zero)
            for v in range(NV):
                new.append(builder.call(fn, [acc[r * NV + v], a_bc, b_vec[v]]))
        k_next = builder.add(k, ir.Constant(i64, 1))
        k.add_incoming(k_next, loop)
        for p, n in zip(acc, new):
            p.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", k_next, k4_v), loop, done)

        builder.position_at_end(done)
        for r in range(MR):
            row = builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)])
            for v in range(NV):
                q = builder.bitcast(builder.gep(row, [ir.Constant(i64, 16 * v)]), v16.as_pointer())
                builder.store(builder.add(builder.load(q, align=4), new[r * NV + v]), q, align=4)
        return context.get_dummy_value()

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
