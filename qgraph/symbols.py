"""A tensor as Huffman-coded symbols: Deep Compression's storage of shared, sparse weights.

Han et al. 2016 ("Deep Compression", §2 and §4) store a pruned, weight-shared layer as
  * its codebook (the distinct values),
  * for every weight kept, the index of its value in the codebook, and
  * its position as the distance to the previous kept weight ("relative index") in b bits; a
    distance that does not fit is bridged by a *filler* entry (a stored zero),
and Huffman-code the codebook indices and the distances. Here any tensor whose elements take few
distinct bit patterns is coded that way (a Gather codebook's indices, weights ``share`` dequantized,
a QDQ model's integer weights): the alphabet is the sorted distinct bit patterns, so decoding gives
the exact bytes back, -0.0 and NaN payloads included.

Two layouts, whichever is smaller (sizes are computed exactly from the histograms before coding):
    dense     one code per element
    sparse    the most frequent symbol z (the zero of a pruned layer) is implied; the others are
              entries (gap, symbol), gap = elements of z skipped since the previous entry, in
              [0, 2^b); an entry (2^b - 1, FILLER) stands for a z that bridges a longer gap

Payload (little-endian), after ``SYM_HEAD`` (element bits, layout, alphabet size A):
    alphabet        A values, each in max(1, bits/8) bytes, strictly increasing
    dense:          A code lengths (u8) | stream
    sparse:         z (u32) | b (u8) | entries (u64) | 2^b gap code lengths | gap stream
                    | A+1 symbol code lengths (symbol A is FILLER) | symbol stream
    stream:         nbits (u64) | ceil(nbits / 8) bytes
Everything read is checked against what is left of the payload before anything is allocated.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numba import njit

from qgraph import huffman

SYM_HEAD = struct.Struct("<BBI")
DENSE, SPARSE = 0, 1
LAYOUTS = {DENSE: "dense", SPARSE: "sparse"}
#: element widths the coding handles (4: two elements per byte, low nibble first, as ONNX INT4)
ELEM_BITS = (4, 8, 16, 32, 64)
#: the largest alphabet coded (its code-length table is stored; beyond this, raw + zstd wins anyway)
MAX_ALPHABET = 4096
#: gap widths tried when choosing the relative-index bits
GAP_BITS = tuple(range(1, 17))


class SymbolError(ValueError):
    """A payload that is not a valid symbol coding (the container names the tensor)."""


# ----------------------------------------------------------------------------- elements

def _uint(bits: int):
    return np.dtype(f"<u{bits // 8}")


def elements(raw: bytes | np.ndarray, elem_bits: int, n: int) -> np.ndarray:
    """The ``n`` elements of raw tensor bytes as unsigned integers (their bit patterns)."""
    buf = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8)
    if elem_bits == 4:
        out = np.empty(2 * buf.size, np.uint8)
        out[0::2] = buf & 0x0F
        out[1::2] = buf >> 4
        return out[:n]
    return buf.view(_uint(elem_bits))[:n]


def raw_bytes(values: np.ndarray, elem_bits: int) -> np.ndarray:
    """Inverse of ``elements``: uint8 array of the tensor's raw bytes."""
    if elem_bits == 4:
        v = values.astype(np.uint8)
        if v.size % 2:
            v = np.concatenate([v, np.zeros(1, np.uint8)])
        return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(values.astype(_uint(elem_bits), copy=False)).view(np.uint8)


def raw_size(n: int, elem_bits: int) -> int:
    return (n * elem_bits + 7) // 8


def palette(values: np.ndarray, max_alphabet: int = MAX_ALPHABET) -> tuple[np.ndarray, np.ndarray] | None:
    """(alphabet, index per element) when ``values`` has at most ``max_alphabet`` distinct values,
    else None. A sample decides cheaply when there are far more (float weights not shared)."""
    if values.size == 0:
        return None
    if values.dtype.itemsize == 1:
        counts = np.bincount(values, minlength=256)
        alphabet = np.flatnonzero(counts).astype(values.dtype)
        if alphabet.size > max_alphabet:
            return None
        lut = np.zeros(256, np.int32)
        lut[alphabet] = np.arange(alphabet.size, dtype=np.int32)
        return alphabet, lut[values]
    step = max(1, values.size // 65536)
    candidate = np.unique(values[::step])
    if candidate.size > max_alphabet:
        return None
    idx = np.searchsorted(candidate, values).astype(np.int32)
    np.minimum(idx, candidate.size - 1, out=idx)
    if not np.array_equal(candidate[idx], values):       # a value the sample missed
        alphabet, inverse = np.unique(values, return_inverse=True)
        if alphabet.size > max_alphabet:
            return None
        return alphabet, inverse.astype(np.int32).reshape(-1)
    return candidate, idx


# ----------------------------------------------------------------------------- planning

@dataclass
class Coding:
    """How one tensor is coded, with its exact sizes (bits of each stream, bytes of the payload)."""
    elem_bits: int
    n: int
    alphabet: np.ndarray          # distinct bit patterns, increasing
    index: np.ndarray             # alphabet index of each element (int32)
    counts: np.ndarray            # occurrences of each alphabet entry
    layout: int                   # DENSE or SPARSE
    zero: int = -1                # sparse: the implied symbol
    gap_bits: int = 0             # sparse: b
    entries: int = 0              # sparse: stored entries, fillers included
    fillers: int = 0
    sym_lengths: np.ndarray | None = None
    gap_lengths: np.ndarray | None = None
    sym_bits: int = 0             # bits of the symbol stream
    gap_bits_total: int = 0       # bits of the gap stream
    payload_bytes: int = 0

    @property
    def kept(self) -> int:
        """Elements coded explicitly (all of them, dense; those not equal to z, sparse)."""
        return self.n if self.layout == DENSE else self.n - int(self.counts[self.zero])

    @property
    def layout_name(self) -> str:
        return LAYOUTS[self.layout]


def _stream_bytes(nbits: int) -> int:
    return 8 + (nbits + 7) // 8


def _alphabet_bytes(a: int, elem_bits: int) -> int:
    return a * max(1, elem_bits // 8)


def plan(values: np.ndarray, elem_bits: int, *, max_alphabet: int = MAX_ALPHABET,
         gap_bits: int = 0, layout: str = "auto") -> Coding | None:
    """The smallest symbol coding of ``values`` (None when the alphabet is too large).

    gap_bits -- 0: try every width in GAP_BITS; else that width
    layout   -- auto (smaller of the two), dense or sparse
    """
    pal = palette(values, max_alphabet)
    if pal is None:
        return None
    alphabet, index = pal
    counts = np.bincount(index, minlength=alphabet.size).astype(np.int64)
    a = alphabet.size
    head = SYM_HEAD.size + _alphabet_bytes(a, elem_bits)
    best = None
    if layout in ("auto", "dense"):
        lengths = huffman.code_lengths(counts)
        bits = huffman.encoded_bits(counts, lengths)
        best = Coding(elem_bits, values.size, alphabet, index, counts, DENSE, sym_lengths=lengths,
                      sym_bits=bits, payload_bytes=head + a + _stream_bytes(bits))
    if layout in ("auto", "sparse") and a >= 1:
        z = int(np.argmax(counts))
        positions = np.flatnonzero(index != z)
        gaps = np.diff(positions, prepend=-1) - 1
        sym_counts = np.append(counts, 0)
        sym_counts[z] = 0
        for b in ((gap_bits,) if gap_bits else GAP_BITS):
            size = 1 << b
            fill = gaps >> b
            fillers = int(fill.sum())
            gap_counts = np.bincount(gaps & (size - 1), minlength=size).astype(np.int64)
            gap_counts[size - 1] += fillers
            sc = sym_counts.copy()
            sc[a] = fillers
            g_len = huffman.code_lengths(gap_counts)
            s_len = huffman.code_lengths(sc)
            g_bits = huffman.encoded_bits(gap_counts, g_len)
            s_bits = huffman.encoded_bits(sc, s_len)
            total = head + 4 + 1 + 8 + size + _stream_bytes(g_bits) + (a + 1) + _stream_bytes(s_bits)
            if best is None or total < best.payload_bytes:
                best = Coding(elem_bits, values.size, alphabet, index, counts, SPARSE, zero=z, gap_bits=b,
                              entries=positions.size + fillers, fillers=fillers, sym_lengths=s_len,
                              gap_lengths=g_len, sym_bits=s_bits, gap_bits_total=g_bits, payload_bytes=total)
    return best


# ----------------------------------------------------------------------------- writing

@njit(cache=True, nogil=True)
def _sparse_entries(index, zero, b, filler, gaps_out, syms_out):
    """Entries (gap, symbol) of every element not equal to ``zero``, fillers bridging long gaps."""
    limit = (1 << b) - 1
    e = 0
    run = 0
    for i in range(index.shape[0]):
        s = index[i]
        if s == zero:
            run += 1
            continue
        while run > limit:
            gaps_out[e] = limit
            syms_out[e] = filler
            e += 1
            run -= limit + 1
        gaps_out[e] = run
        syms_out[e] = s
        e += 1
        run = 0
    return e


def write(c: Coding) -> bytes:
    """The payload of a planned coding."""
    parts = [SYM_HEAD.pack(c.elem_bits, c.layout, c.alphabet.size)]
    width = max(1, c.elem_bits // 8)
    parts.append(c.alphabet.astype(_uint(8 * width)).tobytes())
    if c.layout == DENSE:
        parts.append(c.sym_lengths.tobytes())
        data, nbits = huffman.encode(c.index, c.sym_lengths)
        assert nbits == c.sym_bits
        parts += [struct.pack("<Q", nbits), data.tobytes()]
    else:
        gaps = np.empty(c.entries, np.int32)
        syms = np.empty(c.entries, np.int32)
        written = _sparse_entries(c.index, c.zero, c.gap_bits, c.alphabet.size, gaps, syms)
        assert written == c.entries
        g_data, g_bits = huffman.encode(gaps, c.gap_lengths)
        s_data, s_bits = huffman.encode(syms, c.sym_lengths)
        assert (g_bits, s_bits) == (c.gap_bits_total, c.sym_bits)
        parts += [struct.pack("<IBQ", c.zero, c.gap_bits, c.entries), c.gap_lengths.tobytes(),
                  struct.pack("<Q", g_bits), g_data.tobytes(), c.sym_lengths.tobytes(),
                  struct.pack("<Q", s_bits), s_data.tobytes()]
    out = b"".join(parts)
    assert len(out) == c.payload_bytes, (len(out), c.payload_bytes)
    return out


# ----------------------------------------------------------------------------- reading

class _Cursor:
    """Reads a payload front to back; every read is checked against what is left."""

    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise SymbolError(f"{what} needs {n} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct | str, what: str):
        s = struct.Struct(fmt) if isinstance(fmt, str) else fmt
        return s.unpack(self.take(s.size, what))

    def lengths(self, n: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(n, what), np.uint8)

    def stream(self, what: str) -> tuple[np.ndarray, int]:
        (nbits,) = self.unpack("<Q", what + " length")
        if nbits > 8 * (len(self.buf) - self.pos):
            raise SymbolError(f"{what} declares {nbits} bits, more than the payload holds")
        return np.frombuffer(self.take((nbits + 7) // 8, what), np.uint8), nbits


@njit(cache=True, nogil=True)
def _scatter(gaps, syms, zero, filler, out):
    """Inverse of ``_sparse_entries``: ``out`` pre-filled with ``zero``; -1 when an entry lands outside."""
    n = out.shape[0]
    pos = -1
    for e in range(gaps.shape[0]):
        pos += gaps[e] + 1
        if pos >= n:
            return -1
        s = syms[e]
        out[pos] = zero if s == filler else s
    return 0


def read(payload: bytes | memoryview, n: int, elem_bits: int) -> np.ndarray:
    """The raw bytes (uint8 array) of a tensor of ``n`` elements of ``elem_bits`` from its payload."""
    cur = _Cursor(memoryview(payload))
    bits, layout, a = cur.unpack(SYM_HEAD, "symbol header")
    if bits != elem_bits:
        raise SymbolError(f"element width {bits} bits, the tensor's type has {elem_bits}")
    if layout not in LAYOUTS:
        raise SymbolError(f"unknown layout {layout}")
    if not 1 <= a <= MAX_ALPHABET:
        raise SymbolError(f"alphabet of {a} symbols (1..{MAX_ALPHABET} allowed)")
    width = max(1, elem_bits // 8)
    alphabet = np.frombuffer(cur.take(a * width, "alphabet"), _uint(8 * width))
    if a > 1 and not np.all(alphabet[1:] > alphabet[:-1]):
        raise SymbolError("alphabet is not strictly increasing")
    if elem_bits == 4 and int(alphabet.max()) > 15:
        raise SymbolError("4-bit alphabet holds a value above 15")
    try:
        if layout == DENSE:
            lengths = cur.lengths(a, "code lengths")
            data, nbits = cur.stream("symbol stream")
            index = huffman.Decoder(lengths).decode(data, nbits, n)
        else:
            zero, b, entries = cur.unpack("<IBQ", "sparse header")
            if zero >= a:
                raise SymbolError(f"implied symbol {zero} outside the alphabet of {a}")
            if not 1 <= b <= max(GAP_BITS):
                raise SymbolError(f"relative index of {b} bits")
            if entries > n:
                raise SymbolError(f"{entries} entries for {n} elements")
            g_len = cur.lengths(1 << b, "gap code lengths")
            g_data, g_bits = cur.stream("gap stream")
            s_len = cur.lengths(a + 1, "symbol code lengths")
            s_data, s_bits = cur.stream("symbol stream")
            if entries > min(g_bits, s_bits):
                raise SymbolError(f"{entries} entries cannot fit in {min(g_bits, s_bits)} bits")
            gaps = huffman.Decoder(g_len).decode(g_data, g_bits, entries)
            syms = huffman.Decoder(s_len).decode(s_data, s_bits, entries)
            index = np.full(n, zero, np.int32)
            if _scatter(gaps, syms, np.int32(zero), np.int32(a), index) < 0:
                raise SymbolError("relative indices run past the end of the tensor")
    except huffman.HuffmanError as exc:
        raise SymbolError(str(exc)) from None
    if cur.pos != len(cur.buf):
        raise SymbolError(f"{len(cur.buf) - cur.pos} bytes after the payload")
    return raw_bytes(alphabet[index], elem_bits)
