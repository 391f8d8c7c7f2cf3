"""Canonical Huffman coding of symbol streams (Huffman 1952), in Numba.

A code is given by one length per symbol (0: the symbol does not occur). Canonical codes (as in
DEFLATE, RFC 1951 §3.2.2) number the symbols in order of (length, symbol): the first code of each
length is ``first[l] = (first[l-1] + count[l-1]) << 1``, so the lengths alone define the code and are
all a file has to store. Bits are written most significant first.

    lengths = code_lengths(counts)              # optimal, at most MAX_BITS bits (length-limited)
    data, nbits = encode(symbols, lengths)      # symbols: integers in [0, len(lengths))
    symbols = decode(data, nbits, n, lengths)   # HuffmanError on any stream that is not a valid one

Decoding reads the next ``TABLE_BITS`` bits and finds the symbol and its length in one table lookup;
longer codes (rare by construction: they belong to the rarest symbols) are resolved by the canonical
first-code comparison, one length at a time. The decoder never reads past its input, checks that
every bit it used was inside ``nbits``, and rejects bit patterns that are no code (incomplete codes).
Each kernel has a plain Python reference (``*_reference``) the tests hold it equal to.
"""
from __future__ import annotations

import numpy as np
from numba import njit

#: longest code: 2^24 leaves room for any alphabet the container allows and the smallest counts
MAX_BITS = 24
#: bits resolved by one table lookup when decoding
TABLE_BITS = 11


class HuffmanError(ValueError):
    """A code-length table or a bit stream that is not a valid canonical Huffman code."""


# ----------------------------------------------------------------------------- code lengths

@njit(cache=True)
def _tree_depths(counts_sorted):
    """Depths of the leaves of a Huffman tree over counts sorted ascending (two-queue method, O(n))."""
    n = counts_sorted.shape[0]
    weight = np.empty(2 * n - 1, np.int64)
    parent = np.zeros(2 * n - 1, np.int64)
    weight[:n] = counts_sorted
    leaf, inner, nxt = 0, n, n
    for _ in range(n - 1):
        for _j in range(2):
            if leaf < n and (inner >= nxt or weight[leaf] <= weight[inner]):
                child = leaf
                leaf += 1
            else:
                child = inner
                inner += 1
            parent[child] = nxt
            weight[nxt] = weight[child] if _j == 0 else weight[nxt] + weight[child]
        nxt += 1
    depth = np.zeros(2 * n - 1, np.int64)
    for i in range(2 * n - 3, -1, -1):        # the root is the last node; parents come after children
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def code_lengths(counts: np.ndarray, limit: int = MAX_BITS) -> np.ndarray:
    """Optimal code lengths (uint8, 0 for absent symbols) for ``counts``, none longer than ``limit``.

    The Huffman tree gives the optimal lengths; when some exceed ``limit``, the length histogram is
    repaired as zlib/miniz do (over-long codes cut to ``limit``, then single codes moved one level
    down until Kraft's sum is exactly 1) and the lengths handed out again, shortest to the most
    frequent symbols. One used symbol gets length 1."""
    counts = np.asarray(counts, np.int64)
    lengths = np.zeros(counts.shape[0], np.uint8)
    used = np.flatnonzero(counts > 0)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    if used.size > (1 << limit):
        raise HuffmanError(f"{used.size} symbols cannot have codes of at most {limit} bits")
    order = used[np.argsort(counts[used], kind="stable")]          # ascending count
    depth = _tree_depths(counts[order])
    if depth.max() > limit:
        per_len = np.bincount(np.minimum(depth, limit), minlength=limit + 1).astype(np.int64)
        total = int(sum(int(per_len[l]) << (limit - l) for l in range(1, limit + 1)))
        while total > (1 << limit):
            per_len[limit] -= 1
            for l in range(limit - 1, 0, -1):
                if per_len[l]:
                    per_len[l] -= 1
                    per_len[l + 1] += 2
                    break
            total -= 1
        depth = np.repeat(np.arange(limit + 1), per_len)[::-1]    # longest first: rarest symbols
    lengths[order] = np.sort(depth)[::-1].astype(np.uint8)          # ascending count -> descending length
    return lengths


def check_lengths(lengths: np.ndarray, limit: int = MAX_BITS) -> None:
    """HuffmanError unless ``lengths`` is a prefix code (Kraft sum <= 1) with lengths <= ``limit``."""
    lengths = np.asarray(lengths)
    if lengths.size and int(lengths.max()) > limit:
        raise HuffmanError(f"code length {int(lengths.max())} exceeds {limit}")
    per_len = np.bincount(lengths.astype(np.int64), minlength=limit + 1)
    kraft = sum(int(per_len[l]) << (limit - l) for l in range(1, limit + 1))
    if kraft > (1 << limit):
        raise HuffmanError("code lengths over-subscribe the code space (not a prefix code)")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint32) of every symbol, from its length."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.shape[0], np.uint32)
    if lengths.size == 0:
        return codes
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order:
        l = int(lengths[s])
        code <<= (l - prev)
        codes[s] = code
        code += 1
        prev = l
    return codes


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the symbols with these counts take under these lengths."""
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


# ----------------------------------------------------------------------------- encoding

@njit(cache=True, nogil=True)
def _encode(symbols, codes, lengths, out):
    acc = np.uint64(0)
    nacc = 0
    pos = 0
    for i in range(symbols.shape[0]):
        s = symbols[i]
        l = np.int64(lengths[s])
        acc = (acc << np.uint64(l)) | np.uint64(codes[s])
        nacc += l
        if nacc >= 32:
            nacc -= 32
            v = acc >> np.uint64(nacc)
            out[pos] = np.uint8((v >> np.uint64(24)) & np.uint64(0xFF))
            out[pos + 1] = np.uint8((v >> np.uint64(16)) & np.uint64(0xFF))
            out[pos + 2] = np.uint8((v >> np.uint64(8)) & np.uint64(0xFF))
            out[pos + 3] = np.uint8(v & np.uint64(0xFF))
            pos += 4
    while nacc >= 8:
        nacc -= 8
        out[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
        pos += 1
    if nacc > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
        pos += 1
    return pos


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Bit stream (uint8, last byte zero-padded) and its length in bits. Every symbol must have a code."""
    symbols = np.ascontiguousarray(symbols)
    lengths = np.asarray(lengths, np.uint8)
    if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) >= lengths.size
                         or np.any(lengths[symbols] == 0)):
        raise HuffmanError("a symbol to encode has no code")
    counts = np.bincount(symbols.astype(np.int64, copy=False), minlength=lengths.size) if symbols.size else \
        np.zeros(lengths.size, np.int64)
    nbits = encoded_bits(counts, lengths)
    out = np.zeros((nbits + 7) // 8, np.uint8)
    if symbols.size:
        written = _encode(symbols, canonical_codes(lengths), lengths, out)
        assert written == out.size
    return out, nbits


def encode_reference(symbols, lengths) -> tuple[bytes, int]:
    """Plain Python: the code of each symbol as a bit string, concatenated."""
    codes = canonical_codes(lengths)
    bits = "".join(format(int(codes[s]), f"0{int(lengths[s])}b") for s in symbols)
    padded = bits + "0" * (-len(bits) % 8)
    return bytes(int(padded[i:i + 8], 2) for i in range(0, len(padded), 8)), len(bits)


# ----------------------------------------------------------------------------- decoding

class Decoder:
    """Decoding tables of one code: a 2^TABLE_BITS lookup for short codes, canonical ranges for long ones."""

    def __init__(self, lengths: np.ndarray):
        lengths = np.asarray(lengths, np.uint8)
        check_lengths(lengths)
        self.alphabet = lengths.size
        self.max_len = int(lengths.max()) if lengths.size else 0
        self.tbits = max(1, min(TABLE_BITS, self.max_len))
        codes = canonical_codes(lengths).astype(np.int64)
        self.table_sym = np.zeros(1 << self.tbits, np.int32)
        self.table_len = np.zeros(1 << self.tbits, np.uint8)
        short = np.flatnonzero((lengths > 0) & (lengths <= self.tbits))
        for s in short:                          # every table slot whose prefix is this code
            l = int(lengths[s])
            lo = int(codes[s]) << (self.tbits - l)
            self.table_sym[lo:lo + (1 << (self.tbits - l))] = s
            self.table_len[lo:lo + (1 << (self.tbits - l))] = l
        # canonical ranges per length, for the codes longer than the table
        self.first = np.zeros(MAX_BITS + 2, np.int64)
        self.count = np.zeros(MAX_BITS + 2, np.int64)
        self.offset = np.zeros(MAX_BITS + 2, np.int64)
        order = np.lexsort((np.arange(lengths.size), lengths))
        order = order[lengths[order] > 0]
        self.sorted_syms = order.astype(np.int32)
        per_len = np.bincount(lengths.astype(np.int64), minlength=MAX_BITS + 2)
        per_len[0] = 0
        code, idx = 0, 0
        for l in range(1, MAX_BITS + 1):               # RFC 1951 §3.2.2: first code of each length
            code = (code + int(per_len[l - 1])) << 1
            self.first[l] = code
            self.count[l] = per_len[l]
            self.offset[l] = idx
            idx += int(per_len[l])

    def decode(self, data: np.ndarray, nbits: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``n`` symbols (int32) from the first ``nbits`` bits of ``data``; HuffmanError when invalid."""
        data = np.ascontiguousarray(data, np.uint8)
        if nbits > 8 * data.size:
            raise HuffmanError(f"stream declares {nbits} bits but holds {8 * data.size}")
        if n and self.max_len == 0:
            raise HuffmanError("symbols to decode but the code is empty")
        if n > nbits:
            raise HuffmanError(f"{n} symbols cannot fit in {nbits} bits")
        out = np.empty(n, np.int32) if out is None else out
        if n == 0:
            return out
        status = _decode(data, nbits, n, self.table_sym, self.table_len, self.tbits, self.max_len,
                         self.first, self.count, self.offset, self.sorted_syms, out)
        if status == -1:
            raise HuffmanError("a bit pattern in the stream is no code")
        if status == -2:
            raise HuffmanError("the stream ends before its last symbol")
        return out


@njit(cache=True, nogil=True)
def _decode(data, nbits, n, table_sym, table_len, tbits, max_len, first, count, offset, sorted_syms, out):
    """0 on success, -1 on a bit pattern that is no code, -2 when the symbols need more than nbits."""
    size = data.shape[0]
    buf = np.uint64(0)                   # next bits, left-aligned
    have = 0                             # valid bits in buf
    pos = 0                              # next byte of data
    used = 0                             # bits consumed
    shift_t = np.uint64(64 - tbits)
    for i in range(n):
        if have < 32:
            if pos + 4 <= size:
                v = (np.uint64(data[pos]) << np.uint64(24)) | (np.uint64(data[pos + 1]) << np.uint64(16)) | \
                    (np.uint64(data[pos + 2]) << np.uint64(8)) | np.uint64(data[pos + 3])
                buf |= v << np.uint64(32 - have)
                have += 32
                pos += 4
            else:
                while have <= 56 and pos < size:
                    buf |= np.uint64(data[pos]) << np.uint64(56 - have)
                    have += 8
                    pos += 1
                if have < max_len:
                    have = max_len       # zeros past the end; ``used`` catches a read beyond nbits
        peek = buf >> shift_t
        l = np.int64(table_len[peek])
        if l > 0:
            out[i] = table_sym[peek]
        else:
            sym = -1
            for ln in range(tbits + 1, max_len + 1):
                code = np.int64(buf >> np.uint64(64 - ln))
                d = code - first[ln]
                if d >= 0 and d < count[ln]:
                    sym = sorted_syms[offset[ln] + d]
                    l = ln
                    break
            if sym < 0:
                return -1
            out[i] = sym
        buf = buf << np.uint64(l)
        have -= l
        used += l
        if used > nbits:
            return -2
    return 0


def decode(data: np.ndarray, nbits: int, n: int, lengths: np.ndarray) -> np.ndarray:
    """``n`` symbols from a stream written by ``encode`` with these lengths."""
    return Decoder(lengths).decode(data, nbits, n)


def decode_reference(data: bytes, nbits: int, n: int, lengths) -> list[int]:
    """Plain Python: match the growing bit string against the code table."""
    codes = canonical_codes(lengths)
    table = {format(int(codes[s]), f"0{int(l)}b"): s for s, l in enumerate(lengths) if l}
    bits = "".join(format(b, "08b") for b in data)[:nbits]
    out, cur = [], ""
    for bit in bits:
        cur += bit
        if cur in table:
            out.append(table[cur])
            cur = ""
            if len(out) == n:
                break
    if len(out) != n:
        raise HuffmanError("stream too short or not a code")
    return out
