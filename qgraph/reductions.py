"""Reductions added to an ONNX model, so ONNX Runtime returns statistics instead of tensors.

Exposing a tensor as a graph output makes ORT allocate it apart and hand it over whole, for every
batch; a reduction inside the graph (min, max, a sum of squares) returns a scalar, and the tensor
stays in ORT's arena, reused from layer to layer as in plain inference. ``Reductions`` places the
nodes so that this holds (see its docstring: ORT's execution order decides); ``with_extremes`` is
what min/max calibration asks for; ``side_by_side`` runs two models on the same inputs in one
session, so a reduction can compare their tensors (the SQNR report of ``quant``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Reductions:
    """Small reductions of a model's tensors, added to a copy of it and returned as graph outputs.

    Where they sit decides the memory. ORT frees a tensor after its last reader in its execution
    order, a depth-first walk back from the graph's leaves that takes a node's inputs from the
    highest node index down. Reductions left as leaves are reached last, after the whole model, and
    keep every observed tensor alive to the end of the batch (ORT's own MinMax calibrator does that:
    EfficientNet-Lite0 at batch 10 peaks at 1.7 GB, inference alone at 0.3 GB). So ``finish`` ties
    them to one leaf, a ``sink`` (Concat of every result as float64, and of the shapes of the
    model's outputs), and numbers them last tensor first: the walk from the sink reaches the first
    observed tensor first, computes the model up to it, reduces it, frees it, and so on (0.4 GB).

    Usage: ``r = Reductions(model)`` (``copy=False`` adds to ``model`` itself); per observed tensor ``r.begin(name)``, then ``r.node(...)`` for
    each reduction node and ``r.result(out)`` for each output; ``r.finish()`` gives the model."""

    def __init__(self, model: onnx.ModelProto, *, copy: bool = True):
        if copy:
            self.model = onnx.ModelProto()
            self.model.CopyFrom(model)
        else:
            self.model = model
        g = self.model.graph
        self._used = ({t for n in g.node for t in (*n.input, *n.output)} | {t.name for t in g.initializer}
                      | {i.name for i in g.input} | {o.name for o in g.output} | {n.name for n in g.node})
        self._anchor = ""
        self._nodes: dict[str, list[onnx.NodeProto]] = {}
        self._results: dict[str, list[str]] = {}

    def fresh(self, hint: str) -> str:
        name, i = f"qgraph_stat::{hint}", 0
        while name in self._used:
            i += 1
            name = f"qgraph_stat::{hint}_{i}"
        self._used.add(name)
        return name

    def begin(self, tensor: str) -> None:
        """The nodes and results that follow reduce ``tensor`` (and tensors computed before it)."""
        self._anchor = tensor

    def const(self, value, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        y = self.fresh(op.lower())
        self._nodes.setdefault(self._anchor, []).append(
            helper.make_node(op, inputs, [y], name=self.fresh(op), **attrs))
        return y

    def result(self, name: str) -> str:
        self.model.graph.output.append(helper.make_empty_tensor_value_info(name))
        self._results.setdefault(self._anchor, []).append(name)
        return name

    def finish(self) -> onnx.ModelProto:
        g = self.model.graph
        flat = self.const(np.array([-1], np.int64), "flat")
        sink: list[str] = []
        tail: list[onnx.NodeProto] = []

        def to_sink(name: str) -> None:
            r, d = self.fresh("sink_in"), self.fresh("sink_in_f64")
            tail.append(helper.make_node("Reshape", [name, flat], [r], name=self.fresh("Reshape")))
            tail.append(helper.make_node("Cast", [r], [d], name=self.fresh("Cast"), to=TensorProto.DOUBLE))
            sink.append(d)
        results = {r for rs in self._results.values() for r in rs}
        for o in [o.name for o in g.output if o.name not in results]:
            shape = self.fresh("shape")
            tail.append(helper.make_node("Shape", [o], [shape], name=self.fresh("Shape")))
            to_sink(shape)
        position = {i.name: -1 for i in g.input}
        position.update((o, k) for k, n in enumerate(g.node) for o in n.output)
        for a in sorted(self._nodes, key=lambda t: position.get(t, -1), reverse=True):
            tail.extend(self._nodes[a])
            for r in self._results.get(a, []):
                to_sink(r)
        if sink:
            out = self.fresh("sink")
            tail.append(helper.make_node("Concat", sink, [out], name=self.fresh("Concat"), axis=0))
            g.output.append(helper.make_empty_tensor_value_info(out))
        g.node.extend(tail)
        model, self.model, self._nodes, self._results = self.model, None, {}, {}
        return model


def with_extremes(model: onnx.ModelProto, names: list[str], *, copy: bool = True
                  ) -> tuple[onnx.ModelProto, dict[str, tuple[str, str, str]]]:
    """A copy of ``model`` (``copy=False``: ``model`` itself, changed) that also outputs, per tensor of
    ``names``, its min, max and element count (ReduceMin, ReduceMax, Size; ``Reductions`` places
    them): {name: (min, max, count output)}."""
    r = Reductions(model, copy=copy)
    layout = {}
    for n in dict.fromkeys(names):
        r.begin(n)
        layout[n] = (r.result(r.node("ReduceMin", [n], keepdims=0)), r.result(r.node("ReduceMax", [n], keepdims=0)),
                     r.result(r.node("Size", [n])))
    return r.finish(), layout


def side_by_side(models: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    """One model running several models on the same inputs: every tensor, initializer and node of
    model ``k`` renamed ``k/name`` (graph inputs shared, by name), opsets merged. ValueError for a
    model with subgraphs (If, Loop, Scan: their outer-scope names are not renamed)."""
    first = next(iter(models.values()))
    for m in models.values():
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in m.graph.node
               for a in n.attribute):
            raise ValueError("models with subgraphs (If/Loop/Scan) are not run side by side")
    inputs = {i.name for m in models.values() for i in m.graph.input} - \
        {t.name for m in models.values() for t in m.graph.initializer}
    graph = onnx.GraphProto(name="side_by_side")
    graph.input.extend(i for i in first.graph.input if i.name in inputs)
    opsets: dict[str, int] = {}
    for prefix, m in models.items():
        rename = lambda t: t if (not t or t in inputs) else f"{prefix}/{t}"   # noqa: E731
        for t in m.graph.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = rename(t.name)
            graph.initializer.append(c)
        for n in m.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = rename(n.name) if n.name else ""
            c.input[:] = [rename(t) for t in n.input]
            c.output[:] = [rename(t) for t in n.output]
            graph.node.append(c)
        for o in m.graph.output:
            c = onnx.ValueInfoProto()
            c.CopyFrom(o)
            c.name = rename(o.name)
            graph.output.append(c)
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    out.ir_version = max(m.ir_version for m in models.values())
    return out
