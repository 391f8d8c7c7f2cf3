"""The graph vocabulary passes speak, over onnx-graphsurgeon; loading and saving models.

Passes use these words (``producer``, ``consumers``, ``const``, ``replace_uses``, ``splice``,
``fresh_name``, ``bypass``) instead of protobuf fields, so that only this module knows how the
graph is held. ``load`` refuses what qgraph cannot work on with one line that says why;
``save`` writes atomically and never over the model it was loaded from.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from qgraph.errors import ModelError

from onnx_graphsurgeon.logger import G_LOGGER

# onnx-graphsurgeon's warnings (optional colour output, constant-folding attempts) are not for our users
G_LOGGER.severity = G_LOGGER.CRITICAL

Graph = gs.Graph
Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable

#: The lowest default-domain opset qgraph works on (per-axis QuantizeLinear needs 13).
MIN_OPSET = 13
#: Protobuf cannot serialize a message of 2 GiB; above this, tensors go to an external data file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


# ----------------------------------------------------------------------------- loading

def read_model(src: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Parse a model file (external data included) or copy a ModelProto; ModelError on anything else."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        return model
    if not isinstance(src, (str, os.PathLike)):
        raise ModelError(f"expected a path or an onnx.ModelProto, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"not an ONNX model (protobuf parse failed): {path}: {first_line(exc)}") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"not an ONNX model (no graph nodes; truncated or not a model file?): {path}")
    if any(_uses_external_data(t) for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(f"external data of {path} could not be read: {first_line(exc)}") from None
    return model


def load(src: str | os.PathLike | onnx.ModelProto, *, infer_shapes: bool = True) -> Graph:
    """Load a model as a graph ready for passes.

    Checks the model, upgrades it to ``MIN_OPSET`` when older (refusing with the converter's reason
    when it cannot), runs shape inference, and turns ``Constant`` / constant ``ConstantOfShape`` nodes
    into initializers so that ``const()`` sees every weight.
    """
    model = read_model(src)
    where = str(src) if not isinstance(src, onnx.ModelProto) else "model"
    try:
        check(model)
    except Exception as exc:
        raise ModelError(f"invalid ONNX model {where}: {first_line(exc)}") from None
    model = _upgrade(model, where)
    if infer_shapes:
        model = _infer_shapes(model)
    try:
        g = gs.import_onnx(model)
    except Exception as exc:
        raise ModelError(f"cannot import {where}: {first_line(exc)}") from None
    g.qgraph_meta = {
        "source": str(Path(src).resolve()) if not isinstance(src, onnx.ModelProto) else None,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
        "ir_version": model.ir_version,
    }
    materialize_constants(g)
    return g


def _upgrade(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    version = opset_of(model)
    if version >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter
        light = skeleton(model)
        upgraded = version_converter.convert_version(light, MIN_OPSET)
        _restore_weights(upgraded, model, light)
        check(upgraded)
    except Exception as exc:
        raise ModelError(
            f"{where} uses opset {version}; qgraph needs >= {MIN_OPSET} and the upgrade failed: "
            f"{first_line(exc)}") from None
    return upgraded


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception:
        # A model ORT runs may still defeat ONNX's inference (custom domains, odd shapes); passes
        # that need a shape say so by name when it is missing.
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def skeleton(model: onnx.ModelProto, min_elements: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` without the bulk of its weights, for shape inference and analysis.

    Initializers of ``min_elements`` or more become graph inputs of the same name, type and shape
    (shape inference needs only small constants such as Reshape targets), so nothing copies or
    serializes hundreds of MB just to learn shapes.
    """
    light = onnx.ModelProto()
    graph = model.graph
    big = [t for t in graph.initializer if int(np.prod(t.dims)) >= min_elements]
    if not big:
        light.CopyFrom(model)
        return light
    keep = [t for t in graph.initializer if int(np.prod(t.dims)) < min_elements]
    shell = onnx.GraphProto()
    shell.CopyFrom(onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                                   value_info=graph.value_info, initializer=keep,
                                   sparse_initializer=graph.sparse_initializer))
    have = {i.name for i in graph.input}
    for t in big:
        if t.name not in have:
            shell.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.CopyFrom(shell)
    return light


def _restore_weights(target: onnx.ModelProto, full: onnx.ModelProto, light: onnx.ModelProto) -> None:
    """Put back the initializers ``skeleton`` set aside (and drop the inputs that stood for them)."""
    kept = {t.name for t in light.graph.initializer}
    moved = [t for t in full.graph.initializer if t.name not in kept]
    if not moved:
        return
    names = {t.name for t in moved}
    original_inputs = {i.name for i in full.graph.input}
    inputs = [i for i in target.graph.input if i.name not in names or i.name in original_inputs]
    del target.graph.input[:]
    target.graph.input.extend(inputs)
    target.graph.initializer.extend(moved)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker on the model's structure (on its skeleton: weights need not be copied to C++)."""
    onnx.checker.check_model(skeleton(model))


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, from the skeleton plus each set-aside tensor's data (exact to a few bytes a tensor)."""
    light = skeleton(model)
    kept = {t.name for t in light.graph.initializer}
    extra = 0
    for t in model.graph.initializer:
        if t.name in kept:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        n = int(np.prod(t.dims, dtype=np.int64)) * itemsize
        extra += n + len(t.name) + 4 * len(t.dims) + 16
    return light.ByteSize() + extra


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def materialize_constants(g: Graph) -> int:
    """Replace Constant nodes and ConstantOfShape nodes with a constant shape by initializers."""
    count = 0
    for node in list(g.nodes):
        if node.op == "Constant" and len(node.outputs) == 1:
            values = _constant_node_value(node)
        elif node.op == "ConstantOfShape" and node.inputs and const(node.inputs[0]) is not None:
            shape = [int(d) for d in const(node.inputs[0])]
            fill = node.attrs.get("value")
            fill_arr = np.asarray(fill.values if isinstance(fill, gs.Constant) else 0.0,
                                  dtype=fill.values.dtype if isinstance(fill, gs.Constant) else np.float32)
            values = np.full(shape, fill_arr.reshape(-1)[0] if fill_arr.size else 0, dtype=fill_arr.dtype)
        else:
            continue
        if values is None:
            continue
        out = node.outputs[0]
        is_graph_output = out in g.outputs
        if is_graph_output:
            continue  # a graph output must stay produced by a node
        new = gs.Constant(out.name, values=np.asarray(values))
        for user in list(out.outputs):
            swap_input(user, out, new)
        node.outputs.clear()
        node.inputs.clear()
        count += 1
    if count:
        g.cleanup()
    return count


def _constant_node_value(node: Node) -> np.ndarray | None:
    a = node.attrs
    if "value" in a:
        v = a["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    return None  # sparse / string constants stay as nodes


# ----------------------------------------------------------------------------- saving

def meta_of(g: Graph) -> dict:
    """What ``load`` remembered of the source model (path, metadata_props, IR version)."""
    return g.__dict__.get("qgraph_meta", {})


def to_model(g: Graph) -> onnx.ModelProto:
    """Export the graph as a ModelProto, keeping the source model's metadata."""
    g.toposort()
    _pack_subbyte_constants(g)
    model = gs.export_onnx(g, do_type_check=False)
    meta = meta_of(g)
    for key, value in meta.get("metadata_props", {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    # export_onnx stamps the newest IR version; keep what the source had when it is new enough for
    # the opsets used, so older runtimes still open the result.
    src_ir = meta.get("ir_version")
    if src_ir:
        model.ir_version = max(src_ir, _min_ir_for(opset_of(model)))
    return model


_SUBBYTE = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def _pack_subbyte_constants(g: Graph) -> None:
    """Re-wrap 4-bit constants as packed TensorProtos before export.

    onnx-graphsurgeon exports a numpy int4/uint4 array one byte per element (ONNX wants two per byte),
    and reading ``Constant.values`` turns a lazily held packed proto into such an array; so every
    export packs them again.
    """
    from onnx_graphsurgeon.ir.tensor import LazyValues
    for t in g.tensors().values():
        if not isinstance(t, gs.Constant) or isinstance(t._values, LazyValues):
            continue
        kind = _SUBBYTE.get(getattr(t._values, "dtype", np.dtype(np.float32)).name)
        if kind is None:
            continue
        v = np.asarray(t._values).astype(np.int64)
        t._values = LazyValues(onnx.helper.make_tensor(t.name, kind, list(v.shape), v.reshape(-1).tolist()))


def _min_ir_for(opset: int) -> int:
    table = [(21, 10), (19, 9), (15, 8), (13, 7), (0, 3)]
    return next(ir for op, ir in table if opset >= op)


def save(model: Graph | onnx.ModelProto, path: str | os.PathLike, *,
         protect: Iterable[str | os.PathLike | None] = ()) -> int:
    """Write ``model`` to ``path`` atomically; returns the bytes written (model + external data).

    Refuses a path equal to any in ``protect`` (the input model). Models whose tensors exceed what
    one protobuf can hold are written with external data in ``<name>.data`` beside the file.
    """
    if isinstance(model, gs.Graph):
        protect = list(protect) + [meta_of(model).get("source")]
        model = to_model(model)
    path = Path(path)
    for p in protect:
        if p is not None and same_file(path, Path(p)):
            raise ModelError(f"refusing to write the output over the input model: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelError(f"output directory does not exist: {parent}")
    if _tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        data = model.SerializeToString()
        _atomic_write(path, data)
        return len(data)
    return _save_external(model, path)


def _save_external(model: onnx.ModelProto, path: Path) -> int:
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".qgraph-") as tmp:
        tmp_model = Path(tmp) / path.name
        big = onnx.ModelProto()
        big.CopyFrom(model)
        onnx.save_model(big, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=0)
        total = tmp_model.stat().st_size + (Path(tmp) / data_name).stat().st_size
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return total


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same directory."""
    _atomic_write(Path(path), data)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (also when neither exists yet)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    # from dims and element size: reading raw_data would copy every weight into Python
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model's tensors do not fit in one protobuf (must use external data)."""
    return _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def _uses_external_data(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------- vocabulary

def producer(t: Tensor) -> Node | None:
    """The node that computes ``t``, or None for graph inputs and constants."""
    return t.inputs[0] if t.inputs else None


def consumers(t: Tensor) -> list[Node]:
    """The nodes that read ``t`` (a node reading it twice appears once)."""
    seen: list[Node] = []
    for n in t.outputs:
        if not any(n is s for s in seen):
            seen.append(n)
    return seen


def const(t: Tensor | None) -> np.ndarray | None:
    """The value of ``t`` when it is a constant (initializer or Constant node), else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return t.values
    node = producer(t)
    if node is not None and node.op == "Constant":
        return _constant_node_value(node)
    return None


def is_graph_input(g: Graph, t: Tensor) -> bool:
    return any(t is i for i in g.inputs)


def is_graph_output(g: Graph, t: Tensor) -> bool:
    return any(t is o for o in g.outputs)


def fresh_name(g: Graph, prefix: str) -> str:
    """A tensor/node name not used anywhere in ``g``, starting with ``prefix``."""
    used = g.__dict__.get("_qgraph_names")
    if used is None or len(used) < len(g.nodes):
        used = set(g.tensors().keys()) | {n.name for n in g.nodes}
        g._qgraph_names = used
    name, i = prefix, 0
    while name in used:
        i += 1
        name = f"{prefix}_{i}"
    used.add(name)
    return name


def add_const(g: Graph, prefix: str, values: np.ndarray) -> Constant:
    """A new constant tensor with a fresh name."""
    # np.array, not np.ascontiguousarray: that one turns a 0-d scalar into shape (1,)
    return gs.Constant(fresh_name(g, prefix), values=np.array(values, order="C", copy=True))


def swap_input(node: Node, old: Tensor, new: Tensor) -> None:
    """Make ``node`` read ``new`` wherever it read ``old``."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def replace_uses(g: Graph, old: Tensor, new: Tensor) -> None:
    """Make every reader of ``old`` read ``new`` instead.

    If ``old`` is a graph output, the output keeps its name: ``new`` takes over the name when it is
    computed by a node of its own (and is not a graph input or output itself); otherwise an Identity
    node carries ``new`` to the output name.
    """
    for node in consumers(old):
        swap_input(node, old, new)
    for idx, out in enumerate(g.outputs):
        if out is not old:
            continue
        if (isinstance(new, gs.Variable) and producer(new) is not None
                and not is_graph_input(g, new) and not is_graph_output(g, new)):
            name = old.name
            old.name = fresh_name(g, name + "_replaced")
            new.name = name
            new.dtype = new.dtype or old.dtype
            new.shape = new.shape if new.shape is not None else old.shape
            g.outputs[idx] = new
        else:
            carried = gs.Variable(old.name, dtype=old.dtype, shape=old.shape)
            old.name = fresh_name(g, old.name + "_replaced")
            g.nodes.append(gs.Node("Identity", name=fresh_name(g, carried.name + "_identity"),
                                   inputs=[new], outputs=[carried]))
            g.outputs[idx] = carried


def bypass(g: Graph, node: Node, in_index: int = 0, out_index: int = 0) -> None:
    """Remove ``node`` by connecting its input ``in_index`` to the readers of output ``out_index``."""
    replace_uses(g, node.outputs[out_index], node.inputs[in_index])
    node.inputs.clear()
    node.outputs.clear()


def splice(g: Graph, t: Tensor, op: str, *, extra_inputs: Iterable[Tensor] = (), attrs: dict | None = None,
           only: Iterable[Node] | None = None, name: str | None = None, dtype=None) -> Variable:
    """Insert ``op`` after tensor ``t``: ``t -> op -> new``; readers of ``t`` (or only those in
    ``only``) now read ``new``. Returns ``new``. A graph output keeps its name."""
    base = name or fresh_name(g, f"{t.name}_{op}")
    new = gs.Variable(fresh_name(g, base + "_out"), dtype=dtype or t.dtype, shape=t.shape)
    readers = list(only) if only is not None else consumers(t)
    for node in readers:
        swap_input(node, t, new)
    node = gs.Node(op, name=fresh_name(g, base), inputs=[t, *extra_inputs], outputs=[new], attrs=attrs or {})
    g.nodes.append(node)
    if only is None and is_graph_output(g, t):
        # the output name must stay: rename so the spliced node's output carries it
        idx = next(i for i, o in enumerate(g.outputs) if o is t)
        out_name = t.name
        t.name = fresh_name(g, out_name + "_pre")
        new.name = out_name
        g.outputs[idx] = new
    return new


def initializers(g: Graph) -> list[Constant]:
    return [t for t in g.tensors().values() if isinstance(t, gs.Constant)]


def to_numpy_tensor(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
