"""Huffman coding of the weights and the ``.qgz`` container (Han et al. 2016, "Deep Compression", §2, §4).

The graph is not changed: this pass packs the model as it stands into the ``.qgz`` format
(``qgraph.container``) and accounts for every byte, as the paper's tables do. ``qgraph-opt ... -o
m.qgz`` writes what it packed; ``qgraph-opt m.qgz -o m.onnx`` (or ``qgraph-unpack``) gives the model
back exactly as it was here.

Every initializer of at least ``min_bytes`` is coded the smallest way that is exact:
  * as Huffman-coded symbols (``qgraph.symbols``) when its elements take at most ``max_alphabet``
    distinct values: ``share``'s codebook indices (uint8) or shared float values, the integer
    weights of a ``quant`` model, any tensor with a small palette. Sparse tensors store only the
    elements that are not the most frequent value, each with its distance to the previous one in
    ``gap_bits`` bits (§2: relative indices, a filler entry when a distance does not fit); both the
    codebook indices and the distances are Huffman coded (§4). Deep Compression's weight bits,
    index bits, their Huffman averages and each layer's compression rate are in the notes;
  * else zstd / zlib (floats byte-shuffled first) where that saves at least 3%, or raw.
The graph itself (without those initializers' data) is one more zstd / zlib section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qgraph import container, ir
from qgraph.ops import LAYER_OPS, input_at, is_dq
from qgraph.pipeline import Context, Pass, PassResult, option


@dataclass
class HuffmanOptions:
    gap_bits: int = option(0, "relative-index bits of sparse tensors (0: the smallest per tensor)", range=(0, 16))
    layout: str = option("auto", "symbol layout: auto (the smaller), dense (every element coded), sparse "
                         "(relative indices for the most frequent value)", choices=("auto", "dense", "sparse"))
    codec: str = option("auto", "compression of tensors that are not symbol-coded, and of the graph: auto "
                        "(zstd), zstd, zlib, none", choices=("auto", "zstd", "zlib", "none"))
    min_bytes: int = option(256, "initializers smaller than this stay inside the graph section", range=(0, 1 << 40))
    max_alphabet: int = option(container.MAX_ALPHABET, "most distinct values a symbol-coded tensor "
                               "may have", range=(2, container.MAX_ALPHABET))

    def pack_options(self) -> container.PackOptions:
        return container.PackOptions(min_bytes=self.min_bytes, codec=self.codec, gap_bits=self.gap_bits,
                                     layout=self.layout, max_alphabet=self.max_alphabet)


class HuffmanCoding(Pass):
    __doc__ = __doc__
    name = "huffman"
    summary = "pack the model as .qgz: Huffman-coded shared/quantized weights, relative indices, zstd (sizes per layer)"
    options = HuffmanOptions
    tolerance = 0.0                       # the graph is not changed

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        g.cleanup().toposort()            # what the pass manager leaves: the model that gets written
        model = ir.to_model(g)
        packed = container.pack(model, self.opts.pack_options())
        ctx.container = packed
        reference = ir.model_bytes(ctx.original) if ctx.original is not None else ir.model_bytes(model)
        rows = size_table(g, packed)
        notes = {"qgz_bytes": packed.size, "onnx_bytes": reference,
                 "ratio": round(reference / packed.size, 2),
                 "tensors": dict(sorted(_count(t.codec for t in packed.tensors.values()).items())),
                 "table": rows}
        return PassResult(modified=False, notes=notes)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# ----------------------------------------------------------------------------- accounting

def weight_tensors(node) -> list[ir.Constant]:
    """The stored constants a layer's weight is computed from: the initializer itself, the integers
    (and scale) behind a DequantizeLinear, or the indices and codebook behind share's Gather."""
    t = input_at(node, 1)
    if t is None:
        return []
    if isinstance(t, ir.Constant):
        return [t]
    p = ir.producer(t)
    if is_dq(p):
        return [x for x in p.inputs if isinstance(x, ir.Constant)]
    if p is not None and p.op == "Gather" and isinstance(p.inputs[0], ir.Constant):
        idx = p.inputs[1]
        cast = ir.producer(idx)
        if cast is not None and cast.op == "Cast" and isinstance(cast.inputs[0], ir.Constant):
            return [cast.inputs[0], p.inputs[0]]
        if isinstance(idx, ir.Constant):
            return [idx, p.inputs[0]]
    return []


def size_table(g: ir.Graph, packed: container.Packed) -> list[dict]:
    """One row per layer, as Deep Compression's tables (Han et al. 2016, Tables 2-5):

    weights             elements of the layer's weight
    kept_pct            share of them not zero (pruned weights are not stored)
    codebook            distinct nonzero values (shared weights, integer levels), when few
    bits                bits a stored weight takes before Huffman coding: ceil(log2 codebook), or the
                        element width of a weight stored as plain numbers
    bits_huffman        the same after Huffman coding (the symbol stream over the stored weights)
    index_bits          relative-index width b (sparse layout), and its Huffman average per stored weight
    bytes               the layer's sections and directory entries (codebooks and scales kept inside the
                        graph section counted at their raw size)
    bits_per_kept       8 · bytes / stored weights: everything, whatever the coding
    ratio               float32 dense bytes (4 per weight) / bytes
    Then a row for everything else (biases, graph, header): the rows add up to the file."""
    rows, owned = [], set()
    for node in g.nodes:
        if node.op not in LAYER_OPS:
            continue
        parts = [t for t in weight_tensors(node) if t.name not in owned]
        if not parts:
            continue
        main = parts[0]
        owned.update(t.name for t in parts)
        values = _effective_weight(node, parts)
        n = int(values.size)
        kept = int(np.count_nonzero(values))
        coding = packed.tensors.get(main.name)
        c = coding.coding if coding is not None else None
        size = sum(_bytes_of(t, packed) for t in parts)
        distinct = np.unique(values[values != 0]).size if kept else 0
        few = c is not None or main.values.dtype.kind in "iu"
        row = {"layer": node.name, "op": node.op, "weights": n,
               "kept_pct": round(100.0 * kept / n, 2) if n else 0.0,
               "codebook": distinct if few else None,
               "bits": max(1, math.ceil(math.log2(max(distinct, 2)))) if few
               else container.elem_bits(_dtype_of(main)) or 32,
               "bits_huffman": round(c.sym_bits / max(c.kept, 1), 2) if c is not None else None,
               "index_bits": (c.gap_bits if c is not None and c.layout_name == "sparse" else 0),
               "index_bits_huffman": (round(c.gap_bits_total / max(c.kept, 1), 2)
                                      if c is not None and c.layout_name == "sparse" else None),
               "bytes": size, "bits_per_kept": round(8 * size / max(kept, 1), 2),
               "ratio": round(4 * n / size, 2) if size else None,
               "coding": (f"huffman/{c.layout_name}" if c is not None else
                          (coding.codec + ("+shuffle" if coding.shuffle else "")) if coding else "in graph")}
        rows.append(row)
    layer_bytes = sum(r["bytes"] for r in rows)
    rows.append({"layer": "(rest: graph, biases, header)", "op": "", "weights": None,
                 "bytes": packed.size - layer_bytes, "ratio": None})
    return rows


def _effective_weight(node, parts: list[ir.Constant]) -> np.ndarray:
    """The weight as the layer computes with it, up to scale: codebook[indices], integers minus the
    zero point, or the values themselves (for counting zeros and distinct values)."""
    main = np.asarray(parts[0].values)
    p = ir.producer(node.inputs[1])
    if p is not None and p.op == "Gather" and len(parts) == 2:
        table = np.asarray(parts[1].values).reshape(-1)
        return table[np.clip(main.astype(np.int64), 0, table.size - 1)]
    if is_dq(p):
        zp = input_at(p, 2)
        z = ir.const(zp) if zp is not None else None
        axis = int(p.attrs.get("axis", 1))
        if z is not None and np.ndim(z) == 1 and np.size(z) > 1:
            shape = [1] * main.ndim
            shape[axis] = -1
            z = np.reshape(z, shape)
        return main.astype(np.int64) - (np.asarray(z).astype(np.int64) if z is not None else 0)
    return main


def _dtype_of(t: ir.Constant) -> int:
    import onnx
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(t.values).dtype)


def _bytes_of(t: ir.Constant, packed: container.Packed) -> int:
    c = packed.tensors.get(t.name)
    if c is not None:
        return c.stored_bytes + packed.entry_bytes(t.name)
    return int(np.asarray(t.values).nbytes)
