"""Static figures of a model: parameters, bytes, MACs per node, op counts; the channel view.

MACs are counted per sample (batch dimension taken as 1) from shapes that ONNX shape inference
gives. Symbolic (or negative, as some exporters write ``-1``) dimensions are taken from
``input_shapes`` when given (the calibration inputs' shapes), propagated through the graph by shape
inference with data propagation and the folding of small int64 shape subgraphs (``_SHAPE_OPS``).
When a dot-product node's shapes are still unknown and a calibration ``sample`` is given, one ONNX
Runtime run on that sample (batch 1) reads the shapes of those nodes' tensors (a Pad whose amounts an
op outside the folder computes, a data-dependent shape). Otherwise, and wherever a dimension stays
unknown, the node's MACs are unknown: it is listed in ``ModelStats.unknown_macs`` and the total is
``None`` (printed ``?``), never a product of placeholder dims nor a silent 0.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph import ir
from qgraph.channels import channel_graph, dependency_groups  # noqa: F401  (the channel view, for pruning)
from qgraph.ops import (LAYER_OPS, QOPERATOR_DOT_OPS, Skip, const_at, in_channels, layer_weight, out_channels,
                        pads_with_zero)

#: Ops whose output is a dot product over weights: the MAC counters below know them.
_DOT_OPS = frozenset(LAYER_OPS + QOPERATOR_DOT_OPS)


@dataclass
class ModelStats:
    bytes: int
    params: int                       # elements of float / quantized weight initializers
    macs: int | None                  # None when a dot-product node's shapes are unknown
    nodes: int
    ops: Counter = field(default_factory=Counter)
    unknown_macs: list[str] = field(default_factory=list)


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None,
                sample: dict[str, np.ndarray] | None = None) -> ModelStats:
    """Figures of ``model``; ``input_shapes`` (input name -> concrete shape, e.g. of a calibration
    batch) resolves symbolic input dimensions, the leading one counted as 1 (MACs per sample).
    ``sample`` (input name -> array, one calibration sample): what static inference leaves unknown
    is read from one ONNX Runtime run on it (``ort_shapes``)."""
    shapes = _shapes(model, input_shapes)
    inits = {t.name: t for t in model.graph.initializer}
    dots = [n for n in model.graph.node if n.op_type in _DOT_OPS]
    if sample and any(node_macs(n, shapes, inits) is None for n in dots):
        wanted = [t for n in dots if node_macs(n, shapes, inits) is None
                  for t in list(n.input) + list(n.output[:1]) if t and t not in inits]
        shapes.update(ort_shapes(model, sample, wanted))
    macs, unknown = 0, []
    for node in dots:
        m = node_macs(node, shapes, inits)
        if m is None:
            unknown.append(node.name or node.op_type)
        else:
            macs += m
    return ModelStats(
        bytes=ir.model_bytes(model),
        params=count_params(model),
        macs=None if unknown else macs,
        nodes=len(model.graph.node),
        ops=Counter(n.op_type for n in model.graph.node),
        unknown_macs=unknown,
    )


def ort_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple]:
    """Shapes of the tensors ``names`` in one ONNX Runtime run of ``model`` (graph optimizations off,
    so every intermediate tensor exists) on ``sample``'s first item along the leading axis (one
    sample: MACs per sample). The names are exposed as extra graph outputs for the run and removed
    again. {} when ORT cannot load or run the model: those MACs stay unknown."""
    from qgraph.ops import ort_session
    g = model.graph
    want = list(dict.fromkeys(names))
    have = {o.name for o in g.output} | {i.name for i in g.input}
    extra = [n for n in want if n not in have]
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    feeds = {k: np.asarray(v)[:1] for k, v in sample.items() if k in inputs}
    if not want or set(feeds) != inputs:
        return {}
    n_out = len(g.output)
    g.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = ort_session(model, threads=1, optimize=False, lean=True)
            values = sess.run(want, feeds)
    except Exception:     # ORT refuses the model or the sample: the MACs stay unknown, never guessed
        return {}
    finally:
        del g.output[n_out:]
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(want, values)}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all initializers that are weights (not shapes/indices: int64 tensors excluded)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64,):
            continue
        total += int(np.prod(t.dims)) if len(t.dims) else 1
    return total


def _shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Tensor name -> shape, a dim None where unknown. A graph input's leading dim, when not a
    positive number, is the batch and becomes 1 (per sample); its other symbolic dims come from
    ``input_shapes`` when given. Shapes are then inferred afresh from the inputs."""
    light = ir.skeleton(model)
    _concrete_inputs(light, input_shapes or {})
    inferred = _infer(light)
    for _ in range(_SHAPE_ROUNDS):
        if not _fold_shape_arithmetic(inferred):
            break
        inferred = _infer(inferred)
    out: dict[str, tuple] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        # symbolic, or -1 as some exporters write it: unknown
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                             for d in tt.shape.dim)
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out


#: Rounds of (fold shape arithmetic, infer again): each round resolves what the previous one exposed.
_SHAPE_ROUNDS = 8
#: Ops evaluated on small int64 shape tensors when every input is known (the exporters' dynamic
#: Reshape targets: Shape -> Cast -> Slice -> Concat -> Reshape; torch's static-padding Pad amounts:
#: ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast).
_SHAPE_OPS = frozenset({"Shape", "Cast", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Add", "Sub",
                        "Mul", "Div", "Floor", "Ceil", "Identity", "Range", "ReduceProd", "Max", "Min",
                        "Equal", "Where", "Expand", "ConstantOfShape", "Reshape", "Transpose"})


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def _fold_shape_arithmetic(model: onnx.ModelProto) -> bool:
    """Evaluate the shape subgraphs that ONNX's data propagation leaves open (it does not go through
    Cast, for one): Shape of a tensor whose shape is fully known, and int64 arithmetic on such
    values (``_SHAPE_OPS``), become initializers. True when anything was folded."""
    from onnx.reference import ReferenceEvaluator
    g = model.graph
    known_shape = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        if dims is not None and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            known_shape[vi.name] = [d.dim_value for d in dims]
    for t in g.initializer:     # a weight's Shape (torch's static padding reads the stem's): its dims
        known_shape.setdefault(t.name, list(t.dims))
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer if int(np.prod(t.dims)) <= 64}
    for node in g.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and int(np.prod(value.dims)) <= 64:
            values[node.output[0]] = numpy_helper.to_array(value)
    folded = []
    for node in g.node:
        if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if any(o in values for o in node.output):
            continue
        if node.op_type == "Shape":
            if node.input[0] not in known_shape:
                continue
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            result = [np.array(known_shape[node.input[0]], np.int64)[start:end]]
        else:
            ins = [i for i in node.input if i]
            if not ins or any(values.get(i) is None for i in ins):
                continue
            try:
                result = ReferenceEvaluator(node).run(None, {i: values[i] for i in ins})
            except Exception:
                continue
        for name, v in zip(node.output, result):
            values[name] = np.asarray(v)
        folded.append(node)
    if not folded:
        return False
    for node in folded:
        g.node.remove(node)
        for name in node.output:
            g.initializer.append(numpy_helper.from_array(values[name], name))
    return True


def _concrete_inputs(light: onnx.ModelProto, input_shapes: dict[str, tuple]) -> None:
    """Replace the graph inputs' non-positive dims: the leading one (the batch) by 1, the others by
    ``input_shapes[name]``'s where given; then drop the inferred value_info and output shapes, whose
    symbolic dims would otherwise stay."""
    g = light.graph
    inits = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        given = input_shapes.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if i == 0:
                value = 1
            elif given is not None and len(given) == len(dims) and int(given[i]) > 0:
                value = int(given[i])
            else:
                continue
            d.Clear()
            d.dim_value = value
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple], inits: dict) -> int | None:
    """Multiply-accumulates of one dot-product node, or None when shapes are unknown."""
    op = node.op_type
    ins = list(node.input)
    get = shapes.get
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_idx = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}[op]
        w, y = get(ins[w_idx]), get(node.output[0])
        if not (_known(w) and _known(y)):
            return None
        # every output element needs (Cin/groups) * prod(kernel) MACs = prod(w.shape[1:])
        return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x, w = get(ins[0]), get(ins[1])
        if not (_known(x) and _known(w)):
            return None
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "QGemm"):
        a_idx = 0
        a, y = get(ins[a_idx]), get(node.output[0])
        if not (_known(a) and _known(y)) or len(a) == 0:
            return None
        k = a[-1]
        if op in ("Gemm", "QGemm"):
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        return int(np.prod(y, dtype=np.int64) * k)
    return None


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


# ----------------------------------------------------------------------------- channel coupling

#: Ops that act on each channel alone and commute with a positive per-channel scale: f(x/s) = f(x)/s.
HOMOGENEOUS = frozenset({"Relu", "PRelu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                         "GlobalMaxPool", "Identity", "Dropout"})
#: Layers cross-layer equalization rescales (per output channel of one, input channel of the next).
EQUALIZABLE_OPS = ("Conv", "Gemm")


@dataclass
class Chain:
    """first (output channel i) -> between (channel-wise ops) -> second (input channel i)."""
    first: Any
    between: list
    second: Any
    channels: int
    clip: Any = None  # a Clip among ``between`` (ReLU6): homogeneous only with its bound rescaled


@dataclass
class CoupledSet:
    """Tensors tied channel by channel (a residual stream joined by Adds, or one layer's output read
    by several layers): every ``producers`` layer writes channel i, every ``consumers`` layer reads
    it. Scaling channel i by 1/s_i in all producers and by s_i in all consumers keeps the function."""
    producers: list
    consumers: list
    channels: int
    tensors: list


def coupled_sets(g) -> tuple[list[CoupledSet], list[tuple[str, Skip]]]:
    """Residual streams and fan-outs that can be equalized as a whole, and (tensor, Skip) for the
    ones that cannot (a reader or writer that is neither a layer nor the joining Add)."""
    parent: dict[str, str] = {}
    tensor = {}

    def find(n: str) -> str:
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in g.nodes:
        if node.op == "Add" and len(node.inputs) == 2 and all(ir.const(t) is None for t in node.inputs):
            a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
            if a.shape is None or b.shape is None or tuple(a.shape) != tuple(b.shape):
                continue
            for t in (a, b, y):
                tensor[t.name] = t
            parent[find(a.name)] = find(y.name)
            parent[find(b.name)] = find(y.name)
    for node in g.nodes:   # a layer's output read by several readers: a set of its own
        if _layer_weight(node) is not None:
            t = node.outputs[0]
            if len(ir.consumers(t)) > 1 and t.name not in tensor:
                tensor[t.name] = t
                find(t.name)
    groups: dict[str, list] = {}
    for name, t in tensor.items():
        groups.setdefault(find(name), []).append(t)
    sets, refused = [], []
    for members in groups.values():
        names = {t.name for t in members}
        producers, consumers, problem = [], [], None
        for t in members:
            if ir.is_graph_output(g, t):
                problem = "stream_is_a_graph_output"
                break
            p = ir.producer(t)
            if p is None:
                problem = "stream_starts_at_a_graph_input"
                break
            if not (p.op == "Add" and p.outputs[0].name in names):
                if _layer_weight(p) is None:
                    problem = f"stream_written_by_{p.op}"
                    break
                producers.append(p)
            for r in ir.consumers(t):
                if r.op == "Add" and r.outputs[0].name in names:
                    continue
                if _layer_weight(r) is None or r.inputs[0] is not t:
                    problem = f"stream_read_by_{r.op}"
                    break
                consumers.append(r)
            if problem:
                break
        rep = members[0].name
        if problem:
            refused.append((rep, Skip(problem)))
            continue
        chans = {_layer_channels(p, out=True) for p in producers} | {_layer_channels(c, out=False) for c in consumers}
        if len(chans) != 1 or not producers or not consumers:
            refused.append((rep, Skip("channel_mismatch")))
            continue
        weights = [l.inputs[1] for l in producers + consumers]
        if any(len(ir.consumers(w)) > 1 for w in weights):
            refused.append((rep, Skip("weight_shared")))
            continue
        unique = list({id(c): c for c in consumers}.values())
        sets.append(CoupledSet(producers, unique, chans.pop(), members))
    return sets, refused


def _layer_weight(node):
    """The constant weight of a Conv / Gemm (no transA) that equalization can rescale, else None."""
    return layer_weight(node) if node.op in EQUALIZABLE_OPS else None


def _layer_channels(node, out: bool) -> int:
    return out_channels(node) if out else in_channels(node)


#: Why a layer has no partner, when that is not a miss: its output is a network output, is read by
#: nothing, or joins others (residual streams are equalized as coupled sets instead).
NO_PAIR = ("graph_output", "no_reader", "joins")


def equalization_pair(g, first) -> Chain:
    """The chain from layer ``first`` (output channel i) to the one layer that reads channel i, or a
    Skip: ``coupled_output`` (read by several), ``stops_at_<op>``, ``channel_mismatch``, ... or one of
    ``NO_PAIR``. Every tensor on the way has exactly one reader: a residual join or a branch would
    see the rescaled channels too."""
    if _layer_weight(first) is None:
        raise Skip("not_a_layer")
    channels = out_channels(first)
    t = first.outputs[0]
    between, clip = [], None
    while True:
        if ir.is_graph_output(g, t):
            raise Skip("graph_output")
        readers = ir.consumers(t)
        if len(readers) != 1:
            raise Skip("coupled_output" if readers else "no_reader")
        nxt = readers[0]
        if nxt.inputs[0] is not t:
            raise Skip("not_first_input")
        if nxt.op in HOMOGENEOUS or _is_channelwise_clip(nxt) or pads_with_zero(nxt) or _is_unit_flatten(nxt, t):
            if nxt.op == "Clip":
                if clip is not None:
                    raise Skip("two_clips")
                clip = nxt
            between.append(nxt)
            t = nxt.outputs[0]
            continue
        if nxt.op in EQUALIZABLE_OPS and const_at(nxt, 1) is not None:
            if nxt.op == "Gemm" and nxt.attrs.get("transA", 0):
                raise Skip("second_gemm_transA")
            if in_channels(nxt) != channels:
                raise Skip("channel_mismatch")
            if len(ir.consumers(nxt.inputs[1])) > 1 or len(ir.consumers(first.inputs[1])) > 1:
                raise Skip("weight_shared")
            return Chain(first, between, nxt, channels, clip)
        if nxt.op in EQUALIZABLE_OPS:
            raise Skip("weight_not_constant")
        raise Skip("joins" if nxt.op in ("Add", "Concat", "Sum", "Mul") else f"stops_at_{nxt.op}")


def _is_channelwise_clip(node) -> bool:
    return node.op == "Clip"


def _is_unit_flatten(node, t) -> bool:
    """Flatten/Reshape of [N, C, 1, 1] to [N, C]: channel i stays feature i."""
    if node.op not in ("Flatten", "Reshape") or t.shape is None or len(t.shape) < 2:
        return False
    if not all(d == 1 for d in t.shape[2:]):
        return False
    if node.op == "Flatten":
        return node.attrs.get("axis", 1) == 1
    out = node.outputs[0].shape
    return out is not None and len(out) == 2 and out[1] == t.shape[1]
