"""Graph cleanup: remove no-op nodes and dead code, fold constant subgraphs, share equal constants.

Steps, in order, each counted in the notes:
  1. Identity nodes and inference-time Dropout (mask output unused, not in training mode) are bypassed;
  2. constant subgraphs are evaluated (onnx-graphsurgeon ``fold_constants``, through ONNX Runtime),
     except Quantize/DequantizeLinear, whose integer weights are the point of a quantized model,
     and nodes whose result would exceed ``max_folded_mb`` (known from the inferred shapes, or
     computed from the constant shape of ConstantOfShape / Expand / Tile / Range / Pad) *before*
     anything is evaluated: a 196-byte model must not make this pass allocate 149 GiB;
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
    handles_subgraphs = True   # onnx-graphsurgeon's cleanup and constant folding recurse into them

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:
        nodes0 = len(g.nodes)
        inits0 = len(ir.initializers(g))
        removed_noop = self._remove_noops(g)
        folded, too_large = self._fold(g) if self.opts.fold_constants else (0, 0)
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
        modified = any(v for v in notes.values())
        if too_large:
            notes["skipped"] = {"larger_than_max_folded_mb": too_large}
        return PassResult(modified=modified, notes=notes)

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

    def _fold(self, g: ir.Graph) -> tuple[int, int]:
        """(nodes folded, nodes left unevaluated because their result would be too large)."""
        before = len(g.nodes)
        limit = int(self.opts.max_folded_mb * 2**20)
        too_large = {id(n) for n in g.nodes if (result_bytes(n) or 0) > limit}
        import onnxruntime
        onnxruntime.set_default_logger_severity(4)  # fold_constants runs ORT; its warnings and failed evaluations are noise here
        try:
            g.fold_constants(
                fold_shapes=True,
                size_threshold=limit,
                should_exclude_node=lambda n: n.op in KEEP_OPS or id(n) in too_large,
                error_ok=True,
            )
        except TypeError:  # older onnx-graphsurgeon without should_exclude_node
            return 0, 0
        g.cleanup().toposort()
        ir.materialize_constants(g)
        skipped = sum(1 for n in g.nodes if id(n) in too_large and _has_constant_inputs(n))
        return before - len(g.nodes), skipped

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


# ----------------------------------------------------------------------------- result sizes

def result_bytes(node: ir.Node) -> int | None:
    """The largest output of ``node`` in bytes, before evaluating it: from the inferred output
    shapes, or from the constant that decides the size (ConstantOfShape's shape, Expand's shape,
    Tile's repeats, Range's bounds, Pad's pads); None when neither tells."""
    best = None
    for t in node.outputs:
        if t.shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
            best = max(best or 0, _volume(t.shape) * _itemsize(t.dtype))
    estimate = _estimate(node)
    if estimate is not None:
        best = max(best or 0, estimate)
    return best


def _estimate(node: ir.Node) -> int | None:
    def value(i):
        t = input_at(node, i)
        v = ir.const(t) if t is not None else None
        return None if v is None else np.asarray(v)

    def in_shape(i):
        t = input_at(node, i)
        if t is None:
            return None
        v = ir.const(t)
        if v is not None:
            return tuple(np.shape(v))
        if t.shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
            return tuple(int(d) for d in t.shape)
        return None

    try:
        if node.op == "ConstantOfShape":
            shape = value(0)
            fill = node.attrs.get("value")
            size = fill.values.dtype.itemsize if isinstance(fill, ir.Constant) else 4
            return None if shape is None else _volume(shape.reshape(-1)) * size
        out_size = _itemsize(node.outputs[0].dtype) if node.outputs else 4
        if node.op == "Expand":
            shape, x = value(1), in_shape(0)
            if shape is None:
                return None
            dims = [abs(int(d)) for d in shape.reshape(-1)]
            return max(_volume(dims), _volume(x) if x else 0) * out_size
        if node.op == "Tile":
            reps, x = value(1), in_shape(0)
            return None if reps is None or x is None else _volume(x) * _volume(reps.reshape(-1)) * out_size
        if node.op == "Range":
            start, limit, delta = value(0), value(1), value(2)
            if start is None or limit is None or delta is None or float(delta) == 0:
                return None
            return max(0, int(np.ceil((float(limit) - float(start)) / float(delta)))) * out_size
        if node.op == "Pad":
            pads, x = value(1), in_shape(0)
            if pads is None or x is None or pads.size != 2 * len(x):
                return None
            p = pads.reshape(-1).astype(np.int64)
            return _volume([max(0, d + int(p[i]) + int(p[i + len(x)])) for i, d in enumerate(x)]) * out_size
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def _volume(dims) -> int:
    n = 1
    for d in dims:
        n *= abs(int(d))
    return n


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 4


def _has_constant_inputs(node: ir.Node) -> bool:
    return all(ir.const(t) is not None for t in node.inputs if t is not None and t.name)
