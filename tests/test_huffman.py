"""Canonical Huffman codec (qgraph/huffman.py), symbol coding (qgraph/symbols.py) and the huffman pass.

The Numba encoder and decoder are held equal, bit for bit, to plain-Python references on seeded
random streams; code lengths are checked optimal against a heap-built Huffman tree (equal total bits)
and within the length limit. Every round trip is exact: these are integer codecs, no tolerance.
"""
import heapq

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model
from qgraph import container, huffman, ir, symbols
from qgraph.passes.huffman import HuffmanCoding, size_table
from qgraph.pipeline import Context

SEEDS = range(40)


def heap_huffman_bits(counts) -> int:
    """Total bits of an optimal (unlimited) Huffman code: the sum of the merged weights."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


def random_stream(seed: int):
    rng = np.random.default_rng(seed)
    a = int(rng.integers(1, 400))
    p = rng.dirichlet(np.full(a, rng.uniform(0.05, 2.0)))
    n = int(rng.integers(0, 3000))
    return rng.choice(a, size=n, p=p).astype(np.int32), a


@pytest.mark.parametrize("seed", SEEDS)
def test_code_lengths_are_optimal_and_canonical_codes_prefix_free(seed):
    sym, a = random_stream(seed)
    counts = np.bincount(sym, minlength=a)
    lengths = huffman.code_lengths(counts)
    if sym.size:
        assert huffman.encoded_bits(counts, lengths) == heap_huffman_bits(counts), f"seed {seed}"
    huffman.check_lengths(lengths)
    codes = huffman.canonical_codes(lengths)
    words = sorted(format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths))
    assert all(not b.startswith(a_) for a_, b in zip(words, words[1:])), f"seed {seed}: not prefix-free"


@pytest.mark.parametrize("seed", SEEDS)
def test_numba_codec_equals_the_python_reference(seed):
    sym, a = random_stream(seed)
    lengths = huffman.code_lengths(np.bincount(sym, minlength=a), limit=int(12 + seed % 13))
    data, nbits = huffman.encode(sym, lengths)
    ref, ref_bits = huffman.encode_reference(sym, lengths)
    assert (data.tobytes(), nbits) == (ref, ref_bits), f"seed {seed}: python -c 'from test_huffman import *'"
    out = huffman.decode(data, nbits, sym.size, lengths)
    assert np.array_equal(out, sym), f"seed {seed}"
    if sym.size <= 400:
        assert huffman.decode_reference(ref, ref_bits, sym.size, lengths) == sym.tolist()


def test_length_limit_keeps_kraft_and_costs_little():
    # Fibonacci-like counts make the optimal tree as deep as the alphabet is large
    counts = np.array([1, 1] + [2 ** i for i in range(38)], np.int64)
    free = huffman.code_lengths(counts, limit=64)
    assert free.max() > 24
    limited = huffman.code_lengths(counts, limit=16)
    assert limited.max() == 16
    huffman.check_lengths(limited, 16)
    sym = np.repeat(np.arange(counts.size), np.minimum(counts, 50)).astype(np.int32)
    data, nbits = huffman.encode(sym, limited)
    assert np.array_equal(huffman.decode(data, nbits, sym.size, limited), sym)


def test_long_codes_beyond_the_lookup_table_decode():
    #   skewed counts: codes up to 20 bits, longer than TABLE_BITS (11): the slow path decodes them
    counts = np.array([2 ** (20 - i) for i in range(21)], np.int64)
    lengths = huffman.code_lengths(counts)
    assert lengths.max() > huffman.TABLE_BITS
    sym = np.arange(21, dtype=np.int32).repeat(3)
    data, nbits = huffman.encode(sym, lengths)
    assert np.array_equal(huffman.decode(data, nbits, sym.size, lengths), sym)


def test_single_symbol_and_empty_streams():
    lengths = huffman.code_lengths(np.array([0, 7, 0]))
    assert lengths.tolist() == [0, 1, 0]
    data, nbits = huffman.encode(np.ones(7, np.int32), lengths)
    assert nbits == 7 and np.array_equal(huffman.decode(data, nbits, 7, lengths), np.ones(7))
    data, nbits = huffman.encode(np.zeros(0, np.int32), lengths)
    assert nbits == 0 and huffman.decode(data, 0, 0, lengths).size == 0


def test_decoder_rejects_a_stream_that_ends_early():
    lengths = huffman.code_lengths(np.array([5, 3, 1, 1]))
    data, nbits = huffman.encode(np.array([0, 1, 2, 3, 0], np.int32), lengths)
    with pytest.raises(huffman.HuffmanError, match="ends before"):
        huffman.decode(data, nbits - 1, 5, lengths)
    with pytest.raises(huffman.HuffmanError, match="cannot fit"):
        huffman.decode(data, 3, 5, lengths)


def test_decoder_rejects_patterns_outside_an_incomplete_code():
    lengths = np.array([1, 2], np.uint8)          # codes 0, 10: 11 is no code
    with pytest.raises(huffman.HuffmanError, match="no code"):
        huffman.decode(np.array([0b11000000], np.uint8), 2, 1, lengths)


def test_oversubscribed_lengths_are_refused():
    with pytest.raises(huffman.HuffmanError, match="over-subscribe"):
        huffman.Decoder(np.array([1, 1, 1], np.uint8))
    with pytest.raises(huffman.HuffmanError, match="exceeds"):
        huffman.Decoder(np.array([30, 1], np.uint8))


# ----------------------------------------------------------------------------- symbol coding

@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bits", [4, 8, 16, 32, 64])
def test_symbol_coding_round_trips_bit_exactly(seed, bits):
    rng = np.random.default_rng([seed, bits])
    n = int(rng.integers(1, 5000))
    a = int(rng.integers(1, 16 if bits == 4 else 300))
    top = 1 << min(bits, 62)
    alphabet = np.unique(rng.integers(0, top, size=a, dtype=np.uint64))
    values = alphabet[rng.integers(0, alphabet.size, n)]
    if seed % 2:                                    # sparse: mostly one value
        values[rng.random(n) < 0.9] = alphabet[0]
    values = values.astype(np.uint8 if bits == 4 else np.dtype(f"<u{bits // 8}"))
    raw = symbols.raw_bytes(values, bits)
    for layout in ("dense", "sparse"):
        c = symbols.plan(symbols.elements(raw, bits, n), bits, layout=layout)
        payload = symbols.write(c)
        assert len(payload) == c.payload_bytes
        assert symbols.read(payload, n, bits).tobytes() == raw.tobytes(), f"seed {seed} bits {bits} {layout}"


def test_sparse_coding_uses_fillers_for_long_gaps():
    #   one nonzero every 100 elements with 2-bit relative indices: 24 fillers bridge each gap
    values = np.zeros(1000, np.uint8)
    values[99::100] = 7
    c = symbols.plan(values, 8, layout="sparse", gap_bits=2)
    assert c.fillers == 10 * (99 // 4) and c.entries == 10 + c.fillers
    assert np.array_equal(np.frombuffer(symbols.read(symbols.write(c), 1000, 8), np.uint8), values)
    best = symbols.plan(values, 8)                     # the width is chosen for the smallest payload
    assert best.layout_name == "sparse"
    assert best.payload_bytes <= min(symbols.plan(values, 8, gap_bits=b).payload_bytes for b in (2, 7, 12))


def test_float_palette_keeps_negative_zero_and_nan_payloads():
    v = np.array([0.0, -0.0, 1.5, np.nan, 1.5, 0.0] * 50, np.float32)
    v.view(np.uint32)[3] = 0x7FC00123                     # a NaN with a payload
    raw = v.view(np.uint8)
    c = symbols.plan(symbols.elements(raw, 32, v.size), 32)
    assert c is not None and c.alphabet.size == 5
    assert symbols.read(symbols.write(c), v.size, 32).tobytes() == raw.tobytes()


def test_too_many_distinct_values_is_not_symbol_coded():
    v = np.arange(10000, dtype=np.uint32)
    assert symbols.plan(v, 32, max_alphabet=4096) is None


# ----------------------------------------------------------------------------- the pass

def shared_fc(rng, zeros: float = 0.9):
    #   x ─Gemm(W = Gather(codebook, Cast(indices)))─ y      a sparse, shared FC layer as share writes it
    idx = rng.integers(1, 17, size=(64, 128)).astype(np.uint8)
    idx[rng.random(idx.shape) < zeros] = 0
    book = np.concatenate([[0.0], np.linspace(-1, 1, 16)]).astype(np.float32)
    nodes = [helper.make_node("Cast", ["idx"], ["idx32"], to=6),
             helper.make_node("Gather", ["book", "idx32"], ["w"], axis=0),
             helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [("x", [2, 128])], [("y", [2, 64])],
                      [init("idx", idx), init("book", book), init("b", np.zeros(64, np.float32))])


def test_huffman_pass_accounts_every_byte_like_deep_compression(rng):
    model = shared_fc(rng)
    g = ir.load(model)
    ctx = Context(original=model)
    result = HuffmanCoding().run(g, ctx)
    assert not result.modified
    notes = result.notes
    assert notes["qgz_bytes"] == ctx.container.size
    rows = notes["table"]
    fc = rows[0]
    assert fc["layer"] == "fc" and fc["weights"] == 64 * 128
    assert fc["coding"] == "huffman/sparse"
    assert 5.0 < fc["kept_pct"] < 15.0
    assert fc["codebook"] == 16 and fc["bits"] == 4   # 16 shared values (the zero is implied)
    assert fc["index_bits"] >= 1 and fc["bits_huffman"] <= 4.5    # 16 equally likely values + fillers
    assert sum(r["bytes"] for r in rows) == ctx.container.size
    assert fc["ratio"] == pytest.approx(4 * 64 * 128 / fc["bytes"], rel=1e-2)


def test_huffman_pass_reports_plain_float_layers_as_stored(rng):
    #   x ─Gemm(W float, not shared)─ y: zstd or raw, 32 bits a weight
    w = rng.normal(size=(32, 64)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
                       [("x", [1, 64])], [("y", [1, 32])], [init("w", w)])
    g = ir.load(model)
    rows = size_table(g, container.pack(model))
    assert rows[0]["bits"] == 32 and rows[0]["codebook"] is None
    assert rows[0]["coding"] in ("zstd+shuffle", "zstd", "raw")
