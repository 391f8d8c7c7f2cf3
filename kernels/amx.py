"""The AMX micro-kernel of the int8 GEMM (``tdpbssd`` s8 x s8 / ``tdpbusd`` u8 x s8 -> int32 tiles).

Intel AMX (Sapphire Rapids and later) multiplies whole tiles: one ``tdpb*d`` does C[16, 16] (int32)
+= A[16, Kb] . B[Kb, 16] with Kb <= 64 bytes of k. The tile instructions are emitted through LLVM's
fixed-register intrinsics (``llvm.x86.tileloadd64`` etc., tile numbers are immediates), one Numba
``@intrinsic`` per instruction, so the loops around them are plain Numba. Tile registers:

    tmm0 tmm1       C[rows 0..15 ][cols 0..15]  C[rows 0..15 ][cols 16..31]    int32, 16 x 64 bytes
    tmm2 tmm3       C[rows 16..31][cols 0..15]  C[rows 16..31][cols 16..31]
    tmm4 tmm5       A rows 0..15 / 16..31, Kb = 4 * min(k4, 16) bytes of k      (u8 or s8)
    tmm6 tmm7       B cols 0..15 / 16..31, min(k4, 16) rows of [16 cols][4 k]  (s8)

Layouts (matmul: no packing of A at all):

    A      the caller's row-major [M, K] int8 or uint8 matrix, loaded with its row stride. Signed A
           uses ``tdpbssd`` and unsigned A ``tdpbusd``, so A needs no +128 shift (oa = 0).
    B      the VNNI panels of ``gemm.pack_b`` unchanged: [N/32][k4][32][4] int8. Row r of a panel
           (128 bytes) holds k = 4r..4r+3 of 32 columns, so the B tile of columns 0..15 (16..31)
           is the panel read from byte 0 (64) with a row stride of 128.
    B tail when k4 > 16 and k4 % 16 != 0 the last k block is the *overlapping* block k4-16..k4-1
           (so one tile configuration serves every block): ``b_tail`` [N/32][16][128] is those
           panel rows with the rows already counted by the previous blocks set to 0.

    A packed (``pack_a_rows``, the conv path, where A is the weights): the same row-major A,
           unshifted, zero-padded to [Mp = 32*ceil(M/32)][4*k4], with its own overlapping tail
           [Mp][64] (0 in the columns already counted), so B's tail block is read in place.

``qgemm_amx`` (matmul: A as given, B packed) fuses the zero points into the store of each 32 x 32
block; ``gemm_amx_raw`` (conv: both packed) writes raw sums for ``gemm``'s requantizing epilogue.
A row's k block may read up to 3 bytes (K to 4*k4) past the row's K values (the next row's bytes,
multiplied by B's zero padding); only the matrix's last row could read past the array, so the last
rows (and a ragged M tail) are copied into a zero-padded 32-row buffer first.

Zero points are applied to each 32 x 32 block on its way out (the ``gemm`` formula with oa = 0);
without them the tiles are stored straight into the result. The kernel is only used when the CPU
has AMX-INT8 *and* Linux grants the process the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``),
see ``HAS_AMX``; ``QGRAPH_NO_AMX=1`` disables it. Tile rows are 64 bytes, so B panels, the result
and the buffers made here start on 64-byte boundaries (``aligned_empty``); A is read where it is.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels.cpu import compile_features
from qgraph.kernels.requant import column_terms

TM = 32         # rows of C per block (two 16-row tiles)
TN = 32         # columns of C per block = the NR of gemm.pack_b's panels
TK4 = 16        # k (in units of 4) per tile multiply: 64 bytes

_SYS_ARCH_PRCTL = 158            # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def _request_amx() -> bool:
    """AMX-INT8 in the CPU, tile state granted by the kernel, and not disabled by QGRAPH_NO_AMX."""
    if os.environ.get("QGRAPH_NO_AMX"):
        return False
    try:
        feats = compile_features()      # what Numba compiles for (the host unless NUMBA_CPU_FEATURES)
        if not (feats.get("amx-tile") and feats.get("amx-int8")):
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                            ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
    except Exception:  # pragma: no cover - no llvmlite feature query, no libc.syscall
        return False


HAS_AMX = _request_amx()

# ----------------------------------------------------------------------------- tile instructions

_I8, _I64 = ir.IntType(8), ir.IntType(64)


def _declare(builder, name, arg_types):
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), arg_types), name)
    return fn


def _tile_id(ty) -> int:
    if not isinstance(ty, types.IntegerLiteral) or not 0 <= ty.literal_value < 8:
        raise TypeError("the tile number must be a constant 0..7")
    return ty.literal_value


def _byte_ptr(context, builder, arr_ty, arr, off):
    """i8* to element ``off`` of a contiguous array."""
    data = context.make_array(arr_ty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), _I8.as_pointer())


@intrinsic
def tile_config(typingctx, cfg):
    """ldtilecfg from a 64-byte uint8 array (see ``tile_config_for``)."""
    def codegen(context, builder, sig, args):
        p = _byte_ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [_I8.as_pointer()]), [p])
        return context.get_dummy_value()
    return types.void(cfg), codegen


@intrinsic
def tile_release(typingctx):
    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic(prefer_literal=True)
def tile_zero(typingctx, t):
    tid = _tile_id(t)

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilezero", [_I8]), [ir.Constant(_I8, tid)])
        return context.get_dummy_value()
    return types.void(t), codegen


def _tile_memory(llvm_name: str, doc: str):
    """An intrinsic ``f(t, arr, off, stride)`` calling the AMX tile load or store ``llvm_name`` on the
    rows of ``arr`` from element ``off``, ``stride`` bytes apart (shape from the tile config)."""
    @intrinsic(prefer_literal=True)
    def tile_memory(typingctx, t, arr, off, stride):
        tid = _tile_id(t)

        def codegen(context, builder, sig, args):
            p = _byte_ptr(context, builder, sig.args[1], args[1], args[2])
            fn = _declare(builder, llvm_name, [_I8, _I8.as_pointer(), _I64])
            builder.call(fn, [ir.Constant(_I8, tid), p, args[3]])
            return context.get_dummy_value()
        return types.void(t, arr, types.intp, types.intp), codegen
    tile_memory.__doc__ = doc
    return tile_memory


tile_load = _tile_memory("llvm.x86.tileloadd64", "tmm[t] = rows of ``arr`` from element ``off``, ``stride`` bytes apart.")
tile_store = _tile_memory("llvm.x86.tilestored64", "Rows of tmm[t] -> ``arr`` from element ``off``, ``stride`` bytes apart.")


@intrinsic(prefer_literal=True)
def tile_dp(typingctx, a, c, ta, tb):
    """tmm[c] += tmm[ta] . tmm[tb]: ``tdpbssd`` when the A matrix ``a`` is int8, ``tdpbusd`` when uint8."""
    ids = _tile_id(c), _tile_id(ta), _tile_id(tb)
    if a.dtype not in (types.int8, types.uint8):
        raise TypeError("tile_dp: A must be int8 or uint8")
    name = "llvm.x86.tdpbssd" if a.dtype.signed else "llvm.x86.tdpbusd"

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, name, [_I8] * 3), [ir.Constant(_I8, i) for i in ids])
        return context.get_dummy_value()
    return types.void(a, c, ta, tb), codegen


# ----------------------------------------------------------------------------- the GEMM
# Tile rows are 64 bytes: a row that straddles two cache lines costs a second access, which halves
# the kernel's speed when both A and B do; every buffer made here starts on a 64-byte boundary.

def aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty whose data starts on a 64-byte boundary (a view into a slightly larger buffer)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + n].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    out = aligned_empty(shape, dtype)
    out[...] = 0
    return out


@njit(cache=True)
def aligned_zeros_like(n, like):
    """njit: 1-D zeros of ``like``'s dtype starting on a 64-byte boundary."""
    buf = np.zeros(n + 64 // like.itemsize, like.dtype)
    off = (-buf.ctypes.data % 64) // like.itemsize
    return buf[off:off + n]


@njit(cache=True)
def tile_config_for(k4):
    """Palette 1: tmm0-3 C (16 x 64 B), tmm4-5 A (16 x 4*kb B), tmm6-7 B (kb x 64 B), kb = min(k4, 16)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    kb = min(k4, TK4)
    for t in range(8):
        colsb = 4 * kb if t in (4, 5) else 64
        cfg[16 + 2 * t] = colsb & 0xFF
        cfg[17 + 2 * t] = colsb >> 8
        cfg[48 + t] = kb if t >= 6 else 16
    return cfg


def b_tail(b_data: np.ndarray, k4: int) -> np.ndarray | None:
    """The overlapping last k block of every B panel (module docstring); None when k4 needs none."""
    if k4 <= TK4 or k4 % TK4 == 0:
        return None
    panels = b_data.reshape(-1, k4, TN * 4)
    tail = aligned_empty((panels.shape[0], TK4, TN * 4), np.int8)
    tail[...] = panels[:, k4 - TK4:, :]
    tail[:, :TK4 * (-(-k4 // TK4)) - k4, :] = 0
    return tail.reshape(-1)


def pack_a_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [M, K] (weights packed once, e.g. a conv's) -> (rows [Mp, 4*k4] flat, zero-padded to Mp = 32*ceil(M/32)
    rows, same dtype, unshifted; tail [Mp, 64] flat: the overlapping last k block of A with the
    columns already counted by the previous blocks set to 0 (empty when k4 needs none); row sums int64)."""
    m, k = a.shape
    k4 = max(1, -(-k // 4))
    mp = -(-m // TM) * TM
    rows = aligned_zeros((mp, 4 * k4), a.dtype)
    rows[:m, :k] = a
    tail = np.zeros(0, a.dtype)
    if k4 > TK4 and k4 % TK4:
        t = aligned_empty((mp, 4 * TK4), a.dtype)
        t[...] = rows[:, 4 * (k4 - TK4):]
        t[:, :4 * (TK4 * (-(-k4 // TK4)) - k4)] = 0
        tail = t.reshape(-1)
    return rows.reshape(-1), tail, a.astype(np.int64).sum(axis=1)


@njit(cache=True)
def _block(a, a_off, lda, at, at_off, ldat, b, b_off, bt, bt_off, k4, nkb, load_b):
    """C tiles (tmm0-3) = A[32 rows from a_off, row stride lda bytes] . B[the 32-column panel at b_off]
    over every k block; with a ragged k4 > 16 the last block is the overlapping one, A from ``at`` and
    B from ``bt`` (module docstring). ``load_b=False``: one k block whose B tiles are loaded already."""
    tile_zero(0)
    tile_zero(1)
    tile_zero(2)
    tile_zero(3)
    tail = nkb > 1 and k4 % TK4 != 0
    for kb in range(nkb):
        if tail and kb == nkb - 1:
            tile_load(6, bt, bt_off, 4 * TN)
            tile_load(7, bt, bt_off + 64, 4 * TN)
            tile_load(4, at, at_off, ldat)
            tile_load(5, at, at_off + 16 * ldat, ldat)
        else:
            if load_b:
                tile_load(6, b, b_off + kb * TK4 * 4 * TN, 4 * TN)
                tile_load(7, b, b_off + kb * TK4 * 4 * TN + 64, 4 * TN)
            tile_load(4, a, a_off + 64 * kb, lda)
            tile_load(5, a, a_off + 16 * lda + 64 * kb, lda)
        tile_dp(a, 0, 4, 6)
        tile_dp(a, 1, 4, 7)
        tile_dp(a, 2, 5, 6)
        tile_dp(a, 3, 5, 7)


@njit(cache=True)
def gemm_amx_raw(a_rows, a_tail, b, c, w, k4):
    """c[:Mp, :w] = A . B (raw sums, overwritten) with A from ``pack_a_rows`` (Mp rows) and B the first
    w/32 panels of ``b`` (``gemm.pack_b`` layout, k4 rows each); Mp and w multiples of 32, c C-ordered
    [Mp, >= w] (a row stride that is not a multiple of 4 KiB keeps the 16 rows of a tile store out
    of one L1 set)."""
    mp = c.shape[0]
    lda = 4 * k4
    nkb = -(-k4 // TK4)
    ldw = c.shape[1]
    ldc = 4 * ldw
    cf = c.reshape(-1)
    tile_config(tile_config_for(k4))
    for nt in range(w // TN):
        b_off = nt * k4 * 4 * TN
        bt_off = b_off + (k4 - TK4) * 4 * TN
        if nkb == 1:
            tile_load(6, b, b_off, 4 * TN)
            tile_load(7, b, b_off + 64, 4 * TN)
        for mt in range(mp // TM):
            r0 = mt * TM
            _block(a_rows, r0 * lda, lda, a_tail, r0 * 64, 64, b, b_off, b, bt_off, k4, nkb, nkb > 1)
            o = r0 * ldw + nt * TN
            tile_store(0, cf, o, ldc)
            tile_store(1, cf, o + 16, ldc)
            tile_store(2, cf, o + 16 * ldw, ldc)
            tile_store(3, cf, o + 16 * ldw + 16, ldc)
    tile_release()


@njit(cache=True)
def qgemm_amx(a, za, b, tail, k4, colsum, ob, zb, out):
    """out[M, N] = (A - za) @ (B - zb) in wrapping int32: A the raw [M, K] int8/uint8 matrix (C order),
    za per tensor or per row, zb per tensor or per column (int64), b / tail the packed B (module
    docstring) with its column sums ``colsum`` and shift ``ob``. Uses the tiles: needs ``HAS_AMX``."""
    m, k = a.shape
    n = out.shape[1]
    af = a.reshape(-1)
    nkb = -(-k4 // TK4)
    # zero-point terms (gemm's formula, oa = 0): out = raw + zbv_j * u_i - za_i * csum_j
    zbv, csum, any_zb = column_terms(zb, ob, colsum, 0, n)
    zai = np.empty(m, np.int32)
    u = np.zeros(m, np.int32)
    any_za = False
    for i in range(m):
        zi = np.int64(za[i if za.size > 1 else 0])
        zai[i] = np.int32(zi & 0xFFFFFFFF)
        any_za = any_za or zi != 0
        if any_zb:
            s = np.int64(0)
            for c in range(k):
                s += np.int64(af[i * k + c])
            u[i] = np.int32((k * zi - s) & 0xFFFFFFFF)
    correct = any_za or any_zb
    # rows read straight from A: whole 32-row blocks, but not the last row when it would be over-read
    m_direct = m // TM * TM
    if k % 4 != 0 and m_direct == m and m > 0:
        m_direct -= TM
    pad = aligned_zeros_like(TM * 4 * k4, af)
    for r in range(m - m_direct):
        for c in range(k):
            pad[r * 4 * k4 + c] = af[(m_direct + r) * k + c]
    scratch = aligned_zeros_like(TM * TN, zbv)
    ldo = out.shape[1]
    of = out.reshape(-1)
    ka_tail = 4 * (k4 - TK4)
    tile_config(tile_config_for(k4))
    n_blocks = -(-n // TN)
    m_blocks = -(-m // TM)
    for nt in range(n_blocks):
        c0 = nt * TN
        b_off = nt * k4 * 4 * TN
        t_off = nt * TK4 * 4 * TN
        cols = min(TN, n - c0)
        hoist = nkb == 1
        if hoist:
            tile_load(6, b, b_off, 4 * TN)
            tile_load(7, b, b_off + 64, 4 * TN)
        for mt in range(m_blocks):
            r0 = mt * TM
            if r0 < m_direct:
                _block(af, r0 * k, k, af, r0 * k + ka_tail, k, b, b_off, tail, t_off, k4, nkb, not hoist)
            else:
                _block(pad, 0, 4 * k4, pad, ka_tail, 4 * k4, b, b_off, tail, t_off, k4, nkb, not hoist)
            rows = min(TM, m - r0)
            if not correct and rows == TM and cols == TN:
                o = r0 * ldo + c0
                tile_store(0, of, o, 4 * ldo)
                tile_store(1, of, o + 16, 4 * ldo)
                tile_store(2, of, o + 16 * ldo, 4 * ldo)
                tile_store(3, of, o + 16 * ldo + 16, 4 * ldo)
                continue
            tile_store(0, scratch, 0, 4 * TN)
            tile_store(1, scratch, 16, 4 * TN)
            tile_store(2, scratch, 16 * TN, 4 * TN)
            tile_store(3, scratch, 16 * TN + 16, 4 * TN)
            for r in range(rows):
                i = r0 + r
                ui = u[i]
                zi = zai[i]
                for j in range(cols):           # wrapping int32 (the store truncates)
                    of[i * ldo + c0 + j] = scratch[r * TN + j] + zbv[c0 + j] * ui - zi * csum[c0 + j]
    tile_release()
