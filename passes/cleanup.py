"""Graph cleanup: remove no-op nodes and dead code, fold constant subgraphs, share equal constants.

Steps, in order, each counted in the notes:
  1. Identity nodes and inference-time Dropout (mask output unused, not in training mode) are bypassed;
  2. constant subgraphs are evaluated (onnx-graphsurgeon ``fold_constants``, through ONNX Runtime),
     except Quantize/DequantizeLinear, whose integer weights are the point of a quantized model;
  3. nodes whose outputs nobody reads, and unused initializers, are removed;
  4. initializers with identical dtype, shape and bytes are merged into one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from qgraph import ir
from qgraph.ops import input_at
from qgraph.pipeline import Context, Pass, PassResult, option

#: Ops whose constant inputs must stay as they are (folding would undo quantization).
KEEP_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass
class CleanupOptions:
    fold_constants: bool = option(True, "evaluate constant subgraphs (except Q/DQ) into initializers")
    dedup: bool = option(True, "merge initializers with identical dtype, shape and contents")
    max_folded_mb: float = option(64.0, "do not fold a constant subgraph whose result is larger than this (MB)",
                                  range=(0.0, 1e6))


class Cleanup(Pass):
    name = "cleanup"
    summary = "remove Identity/Dropout and dead nodes, fold constant subgraphs, share identical initializers"
    options = CleanupOptions
    tolerance = 1e-5

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        nodes0 = len(g.nodes)
        inits0 = len(ir.initializers(g))
        removed_noop = self._remove_noops(g)
        folded = self._fold(g) if self.opts.fold_constants else 0
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        merged = self._dedup(g) if self.opts.dedup else 0
        g.cleanup().toposort()
        notes = {
            "removed_nodes": nodes0 - len(g.nodes),
            "noops": removed_noop,
            "folded_nodes": folded,
            "merged_initializers": merged,
            "removed_initializers": inits0 - len(ir.initializers(g)),
        }
        return PassResult(modified=any(v for v in notes.values()), notes=notes)

    @staticmethod
    def _remove_noops(g: ir.Graph) -> int:
        count = 0
        for node in list(g.nodes):
            if node.op == "Identity" and node.inputs and node.outputs:
                ir.bypass(g, node)
                count += 1
            elif node.op == "Dropout" and node.inputs and node.outputs:
                mask_used = len(node.outputs) > 1 and (node.outputs[1].outputs or ir.is_graph_output(g, node.outputs[1]))
                training = input_at(node, 2)
                t_val = ir.const(training) if training is not None else np.array(False)
                if mask_used or t_val is None or bool(np.asarray(t_val).reshape(-1)[0]):
                    continue  # training-mode Dropout or a used mask: not a no-op
                ir.bypass(g, node)
                count += 1
        return count

    def _fold(self, g: ir.Graph) -> int:
        before = len(g.nodes)
        limit = int(self.opts.max_folded_mb * 2**20)
        import onnxruntime
        onnxruntime.set_default_logger_severity(3)  # fold_constants runs ORT; its optimizer warnings are noise here
        try:
            g.fold_constants(
                fold_shapes=True,
                size_threshold=limit,
                should_exclude_node=lambda n: n.op in KEEP_OPS,
                error_ok=True,
            )
        except TypeError:  # older onnx-graphsurgeon without should_exclude_node
            return 0
        g.cleanup().toposort()
        ir.materialize_constants(g)
        return before - len(g.nodes)

    @staticmethod
    def _dedup(g: ir.Graph) -> int:
        seen: dict[tuple, ir.Constant] = {}
        merged = 0
        live = [t for t in ir.initializers(g) if t.outputs]
        by_shape: dict[tuple, int] = {}
        for t in live:
            by_shape[(t.dtype, tuple(t.shape))] = by_shape.get((t.dtype, tuple(t.shape)), 0) + 1
        for t in live:
            if by_shape[(t.dtype, tuple(t.shape))] < 2:
                continue  # nothing else of its dtype and shape: no need to read or hash it
            v = np.ascontiguousarray(t.values)
            key = (v.dtype.str, tuple(np.shape(t.values)), hashlib.sha1(v.tobytes()).hexdigest())  # not v.shape: 0-d -> (1,)
            keep = seen.get(key)
            if keep is None:
                seen[key] = t
                continue
            if not np.array_equal(keep.values, v):
                continue
            for node in ir.consumers(t):
                ir.swap_input(node, t, keep)
            merged += 1
        return merged
