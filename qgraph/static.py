"""Shape arithmetic on constants: found, evaluated, written back.

Exporters compute parameters such as padding from shapes (EfficientNet: ``Shape(const) -> Gather ->
Sub -> ConstantOfShape -> Concat -> ... -> Pad``). Those tensors are not data, and passes that rewrite
shapes need them as the constants they are:

    static_tensors(g)   tensors computed from constants only
    ConstEval(g)(t)     the value of such a tensor (ONNX's reference evaluator, node by node, cached)
    resolve_static(g)   write those values back as initializers where data ops read them
    refresh_shapes(g)   run shape inference again and store the shapes on the graph's tensors
"""
from __future__ import annotations

import numpy as np

from qgraph import ir


def known_shape(t) -> tuple | None:
    """The shape of ``t`` with unknown (symbolic) dims as None, or None when the rank is unknown."""
    if t is None or t.shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in t.shape)


class ConstEval:
    """Values of tensors computed from constants only (EfficientNet's pads come from Shape(const) ...
    Cast chains): evaluated node by node with ONNX's reference evaluator, cached, never written back."""

    def __init__(self, g):
        self.g = g
        self.cache: dict[str, np.ndarray | None] = {}

    def __call__(self, t, depth: int = 0) -> np.ndarray | None:
        if t is None:
            return None
        v = ir.const(t)
        if v is not None:
            return np.asarray(v)
        if t.name in self.cache:
            return self.cache[t.name]
        self.cache[t.name] = None
        node = ir.producer(t)
        if node is None or depth > 32:
            return None
        if node.op in ("Shape", "Size"):
            return self._shape_value(node) if node.op == "Shape" and ir.const(node.inputs[0]) is not None else None
        ins = [self(x, depth + 1) if x is not None and x.name else None for x in node.inputs]
        if any(v is None and x is not None and x.name for v, x in zip(ins, node.inputs)):
            return None
        try:
            outs = _run_node(node, ins, int(getattr(self.g, "opset", 0) or 17))
        except Exception:  # an op the reference evaluator lacks: not a constant we can know
            return None
        for o, v in zip(node.outputs, outs):
            self.cache[o.name] = np.asarray(v)
        return self.cache.get(t.name)

    @staticmethod
    def _shape_value(node) -> np.ndarray | None:
        shp = known_shape(node.inputs[0])
        if shp is None or any(d is None for d in shp) or node.attrs.get("start") or node.attrs.get("end"):
            return None
        return np.asarray(shp, np.int64)


def static_tensors(g) -> set[str]:
    """Tensors computed from constants only: shape arithmetic, not data. The shape of an activation
    is not one of them, even when fully known: pruning changes it."""
    static = {t.name for t in g.tensors().values() if isinstance(t, ir.Constant)}
    for node in g.nodes:
        if node.op == "Shape":
            # the shape of a constant only: an activation's shape changes when passes prune channels
            ok = node.inputs[0].name in static and known_shape(node.inputs[0]) is not None
        else:
            ok = bool(node.outputs) and node.op not in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                                        "RandomUniformLike", "Multinomial") \
                and all(t is None or not t.name or t.name in static for t in node.inputs)
        if ok:
            static.update(o.name for o in node.outputs)
    return static


def resolve_static(g) -> int:
    """Replace every static tensor that a non-static node reads by an initializer of its value
    (EfficientNet's padding arithmetic becomes the constant pads it always was), so that shape
    inference and rewriting see constants. Returns how many tensors were resolved."""
    static = static_tensors(g)
    value = ConstEval(g)
    done = 0
    for node in list(g.nodes):
        if all(o.name in static for o in node.outputs):
            continue
        for k, t in enumerate(node.inputs):
            if t is None or not t.name or t.name not in static or isinstance(t, ir.Constant):
                continue
            v = value(t)
            if v is None:
                continue
            node.inputs[k] = ir.Constant(ir.fresh_name(g, t.name + "_static"), values=np.array(v))
            done += 1
    if done:
        g.cleanup()
    return done


def refresh_shapes(g) -> None:
    """Run ONNX shape inference on the graph as it is now and store the shapes on its tensors."""
    import onnx
    model = ir.skeleton(ir.to_model(g))
    del model.graph.value_info[:]          # stale shapes would win over the inferred ones
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return
    found = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in g.tensors().values():
        if isinstance(t, ir.Variable) and t.name in found:
            t.shape = found[t.name]
    for node in g.nodes:
        if node.op in ("Reshape", "Flatten") and node.inputs[0].shape is not None and node.outputs[0].shape is not None:
            node.outputs[0].shape = _complete_reshape(list(node.inputs[0].shape), list(node.outputs[0].shape))


def _unknown_dim(d) -> bool:
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _complete_reshape(xs: list, ys: list) -> list:
    """Fill the one unknown dim of a reshape's output when every symbolic dim of the input appears in
    the output too (a batch 'N' carried by Shape -> Gather -> Concat, which ONNX's inference misses)."""
    missing = [k for k, d in enumerate(ys) if _unknown_dim(d)]
    if len(missing) != 1 or any(_unknown_dim(d) for d in xs):
        return ys
    sym_x = sorted(d for d in xs if isinstance(d, str))
    sym_y = sorted(d for d in ys if isinstance(d, str) and not _unknown_dim(d))
    if sym_x != sym_y:
        return ys
    px = int(np.prod([d for d in xs if isinstance(d, int)], dtype=np.int64))
    py = int(np.prod([d for d in ys if isinstance(d, int)], dtype=np.int64))
    if py <= 0 or px % py:
        return ys
    out = list(ys)
    out[missing[0]] = px // py
    return out


def _run_node(node, values: list, opset: int) -> list:
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(values)]
    outs = [f"o{k}" for k in range(len(node.outputs))]
    attrs = {k: (v.values if isinstance(v, ir.Constant) else v) for k, v in node.attrs.items()}
    attrs = {k: (numpy_helper.from_array(np.asarray(v)) if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}
    proto = helper.make_node(node.op, names, outs, domain=node.domain or None, **attrs)
    graph = helper.make_graph(
        [proto], "c", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values) if v is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {})


# ----------------------------------------------------------------------------- the rules
