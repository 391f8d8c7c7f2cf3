#!/usr/bin/env python
"""STAND-IN for the ``sparsify`` pass (branch ``prune``), until it lands: plain magnitude pruning.

    python tools/sparsify_standin.py MODEL.onnx -o OUT.onnx --sparsity 0.9
    python tools/sparsify_standin.py MODEL.onnx -o OUT.onnx --sparsity 'fc1@0.92;fc2@0.91;fc3@0.74'

Zeroes, in every Conv / ConvTranspose / Gemm / MatMul constant weight, the fraction ``sparsity`` of
weights with the smallest magnitude (per layer: ``name-regex@fraction``, matched against the layer's
node name or its weight's name, first match wins; a bare number is the default for all layers).
Nothing is reconstructed: the real ``sparsify`` (OBS / SparseGPT-style least-squares reconstruction of
the weights kept) should lose less accuracy at the same sparsity, so figures measured with this
stand-in are provisional and, for accuracy, pessimistic. It exists only so that ``share`` and
``huffman`` can be measured on sparse models now; it is not a qgraph pass and never will be.

Deep Compression's per-layer rates (Han et al. 2016, Tables 2 and 3) are in ``DEEP_COMPRESSION``.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.ops import LAYER_OPS, layer_weight
from qgraph.pipeline import Context, Pass, PassResult, option

#: weights kept per layer in the paper (LeNet-300-100 8% overall, LeNet-5 8%), as sparsity specs
DEEP_COMPRESSION = {
    "lenet_300_100": "fc1@0.92/fc2@0.91/fc3@0.74",
    "lenet5": "conv1@0.34/conv2@0.88/fc1@0.92/fc2@0.81",
}


def parse_sparsity(spec: str) -> tuple[float, list[tuple[str, float]]]:
    """'0.9' or 'regex@0.92;regex@0.5[;0.8]' -> (default, [(regex, fraction), ...]); '/' separates
    as ';' does (``tools/zoo.py record --pipelines`` splits pipelines at ';')."""
    default, rules = 0.0, []
    for part in (p.strip() for p in str(spec).replace("/", ";").split(";")):
        if not part:
            continue
        if "@" in part:
            key, value = part.rsplit("@", 1)
            rules.append((key.strip(), float(value)))
        else:
            default = float(part)
    for _, f in rules + [("", default)]:
        if not 0.0 <= f < 1.0:
            raise SystemExit(f"sparsity fractions must be in [0, 1), got {f}")
    return default, rules


def prune_graph(g, spec: str) -> list[dict]:
    """Zero the smallest-magnitude weights of every layer in place; one row per layer."""
    default, rules = parse_sparsity(spec)
    rows, done = [], set()
    for node in g.nodes:
        if node.op not in LAYER_OPS or layer_weight(node) is None:
            continue
        t = node.inputs[1]
        if not isinstance(t, ir.Constant) or id(t) in done:
            continue
        done.add(id(t))
        frac = next((f for key, f in rules if re.search(key, node.name or "") or re.search(key, t.name)), default)
        w = np.asarray(t.values)
        drop = int(round(frac * w.size))
        if drop:
            order = np.argsort(np.abs(w).reshape(-1), kind="stable")[:drop]
            flat = w.reshape(-1).copy()
            flat[order] = 0
            t.values = flat.reshape(w.shape)
        rows.append({"layer": node.name, "weights": int(w.size), "kept": int(np.count_nonzero(t.values)),
                     "sparsity": round(1 - np.count_nonzero(t.values) / w.size, 4)})
    return rows


def prune_model(src, spec: str):
    """A ModelProto: ``src`` (path or ModelProto) with its layers magnitude-pruned by ``spec``."""
    g = ir.load(src)
    rows = prune_graph(g, spec)
    return ir.to_model(g), rows


@dataclass
class StandinOptions:
    sparsity: str = option("0.0", "fraction of weights zeroed per layer, or 'regex@fraction;...' (first match "
                           "wins, a bare number for the rest)")


class StandinSparsify(Pass):
    """STAND-IN for ``sparsify``, for the zoo tools only (not in qgraph's pass registry): magnitude
    pruning, nothing reconstructed. Pipelines naming it (``standin_sparsify:sparsity=...``) are
    measured by ``tools/zoo.py record`` / ``tools/zoo_eval.py``; their figures are provisional."""
    name = "standin_sparsify"
    summary = "STAND-IN magnitude pruning (zoo tools only), until the sparsify pass lands"
    options = StandinOptions
    preserves_function = False

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        rows = prune_graph(g, self.opts.sparsity)
        kept, total = sum(r["kept"] for r in rows), sum(r["weights"] for r in rows)
        notes = {"layers": len(rows), "kept_pct": round(100 * kept / max(total, 1), 2), "details": rows}
        return PassResult(modified=kept < total, notes=notes)


#: tool-level passes the zoo scripts accept in a pipeline, beside qgraph's own
TOOL_PASSES = {StandinSparsify.name: StandinSparsify}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--sparsity", required=True,
                    help="fraction, or 'regex@fraction;...' per layer; or a zoo name in DEEP_COMPRESSION")
    args = ap.parse_args(argv)
    spec = DEEP_COMPRESSION.get(args.sparsity, args.sparsity)
    model, rows = prune_model(args.model, spec)
    ir.save(model, args.output, protect=[args.model])
    for r in rows:
        print(f"{r['layer']:<30} {r['weights']:>10,} weights, {r['kept']:>10,} kept ({100 * r['sparsity']:.1f}% zero)")
    print(f"wrote {args.output} (STAND-IN magnitude pruning, not qgraph's sparsify)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
