"""The graph vocabulary passes speak, over onnx-graphsurgeon; loading and saving models.

Passes use these words (``producer``, ``consumers``, ``const``, ``replace_uses``, ``splice``,
``fresh_name``, ``bypass``) instead of protobuf fields, so that only this module knows how the
graph is held. ``load`` refuses what qgraph cannot work on with one line that says why;
``save`` writes atomically and never over the model it was loaded from.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from qgraph import modelfile
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
#: With external data, tensors of at least this many bytes go to the data file (as onnx.save does).
EXTERNAL_MIN_BYTES = 1024


# ----------------------------------------------------------------------------- loading

def read_model(src: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Parse a model file (external data included) or copy a ModelProto; ModelError on anything else.

    Every tensor's data is checked against its declared dims, and external data against the
    model's folder (``qgraph.modelfile``), before any weight byte is read.
    """
    return _read(src)[0]


def _read(src, map_min_bytes: int | None = None) -> tuple[onnx.ModelProto, dict, set]:
    """(model, external tensors left to memory-map {name: (file, offset)}, external files used)."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        modelfile.check_strings(model)
        modelfile.check_sizes(model, None)
        return model, {}, set()
    if not isinstance(src, (str, os.PathLike)):
        raise ModelError(f"expected a path or an onnx.ModelProto, got {type(src).__name__}")
    path = Path(src)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"model path is not a regular file: {path}")
    if st.st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"not an ONNX model (protobuf parse failed): {path}: {first_line(exc)}") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"not an ONNX model (no graph nodes; truncated or not a model file?): {path}")
    base = path.parent if str(path.parent) else Path(".")
    modelfile.check_strings(model, str(path))
    modelfile.check_sizes(model, base)
    mapped, files = modelfile.read_external(model, base, map_min_bytes=map_min_bytes)
    return model, mapped, files


def load(src: str | os.PathLike | onnx.ModelProto, *, infer_shapes: bool = True,
         progress: bool = False) -> Graph:
    """Load a model as a graph ready for passes.

    Checks the model (tensor sizes against their data, external data inside the model's folder,
    ``onnx.checker``), upgrades it to ``MIN_OPSET`` when older (refusing with the converter's reason
    when it cannot), runs shape inference, turns ``Constant`` / constant ``ConstantOfShape`` nodes
    into initializers so that ``const()`` sees every weight (up to ``max_expanded_bytes()``), and
    refuses weights no model computes with (``modelfile.check_weights``). Large external tensors are
    memory-mapped, not read. ``progress`` shows a progress line when loading takes a few seconds.
    """
    where = str(src) if not isinstance(src, onnx.ModelProto) else "model"
    bar = _load_bar(progress)
    try:
        bar.step("read")
        model, mapped, files = _read(src, map_min_bytes=modelfile.MAP_MIN_BYTES)
        bar.step("check")
        _check_opset_known(model, where)
        try:
            check(model)
        except Exception as exc:
            cycle = modelfile.find_cycle(model.graph)
            if cycle:
                raise ModelError(f"invalid ONNX model {where}: the graph has a cycle "
                                 f"({' -> '.join(cycle)})") from None
            raise ModelError(f"invalid ONNX model {where}: {one_line(exc)}") from None
        bar.step("upgrade")
        model = _upgrade(model, where)
        bar.step("shapes")
        if infer_shapes:
            model = _infer_shapes(model, where)
        bar.step("import")
        try:
            g = gs.import_onnx(model)
        except Exception as exc:
            raise ModelError(f"cannot import {where}: {first_line(exc)}") from None
        g.qgraph_meta = {
            "source": str(Path(src).resolve()) if not isinstance(src, onnx.ModelProto) else None,
            "metadata_props": {p.key: p.value for p in model.metadata_props},
            "ir_version": model.ir_version,
            "external_files": sorted(str(Path(f).resolve()) for f in files),
        }
        del model  # the graph holds what it needs; mapped weights are read when touched
        _map_external(g, mapped)
        bar.step("constants")
        materialize_constants(g)
        bar.step("weights")
        modelfile.check_weights(g)
        modelfile.check_layers(g)
    finally:
        bar.close()
    return g


class _load_bar:
    """A progress line for ``load`` on stderr, shown only when loading takes more than 2 s."""

    STEPS = ("read", "check", "upgrade", "shapes", "import", "constants", "weights")
    DELAY = 2.0

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            try:
                import sys
                from tqdm import tqdm
                self.bar = tqdm(total=len(self.STEPS), desc="load", unit="step", delay=self.DELAY, leave=False,
                                file=sys.stderr, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            if name != self.STEPS[0]:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _map_external(g: Graph, mapped: dict) -> None:
    """Give the imported constants left external their memory maps (see ``modelfile.read_external``)."""
    if not mapped:
        return
    from onnx_graphsurgeon.ir.tensor import LazyValues
    for t in g.tensors().values():
        if not isinstance(t, gs.Constant) or t.name not in mapped or not isinstance(t._values, LazyValues):
            continue
        proto = t._values.tensor
        if proto.data_location != onnx.TensorProto.EXTERNAL:
            continue
        path, offset = mapped[t.name]
        t._values = modelfile.map_array(path, offset, proto.dims, proto.data_type)


def _upgrade(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    version = opset_of(model)
    if version >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter
        light = skeleton(model)
        with modelfile.quiet_c_output():
            upgraded = version_converter.convert_version(light, MIN_OPSET)
        _restore_weights(upgraded, model, light)
        check(upgraded)
    except Exception as exc:
        gone = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")
                       and not onnx.defs.has(n.op_type, MIN_OPSET, "")})
        reason = (f"{', '.join(gone)} exist{'s' if len(gone) == 1 else ''} in no opset >= {MIN_OPSET}"
                  if gone else first_line(exc))
        raise ModelError(
            f"{where} uses opset {version}; qgraph needs >= {MIN_OPSET} and the upgrade failed: {reason}") from None
    return upgraded


def _check_opset_known(model: onnx.ModelProto, where: str) -> None:
    """An opset newer than the installed onnx knows cannot be checked or upgraded: say so."""
    newest = onnx.defs.onnx_opset_version()
    version = opset_of(model)
    if version > newest:
        raise ModelError(f"{where} uses opset {version}, newer than the newest this installation of onnx "
                         f"knows ({newest}): export the model at opset <= {newest}, or upgrade onnx")


def _infer_shapes(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """Shape inference in strict mode: a model whose declared types or shapes contradict what its
    ops compute, or whose attributes are out of range (Flatten axis=1000), is refused here as bad
    input instead of failing in the first pass that runs it through ONNX Runtime. Ops of domains
    ONNX does not know are skipped, and shapes it cannot tell stay unknown (passes that need one
    say so by name)."""
    light = skeleton(model)
    try:
        with modelfile.quiet_c_output():
            inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"invalid ONNX model {where}: {one_line(exc)}") from None
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
    """onnx.checker on the model's structure (on its skeleton: weights need not be copied to C++).

    onnx's C++ side prints some warnings ("Model contains experimental ops") straight to the
    process's stdout; they are silenced here (and in the version converter and shape inference), so
    what a user sees stays ours: a report, or one line of error."""
    light = skeleton(model)
    with modelfile.quiet_c_output():
        onnx.checker.check_model(light)


def check_strict(model: onnx.ModelProto, where: str = "model") -> None:
    """``check``, then ONNX shape inference in strict mode: a model whose declared shapes contradict
    what its ops compute (a node rewired to a tensor of other channels) is refused with ModelError.
    For consumers that execute the graph themselves (``qgraph-run``) and trust its shapes."""
    try:
        light = skeleton(model)
        with modelfile.quiet_c_output():
            onnx.checker.check_model(light)
            onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"invalid ONNX model {where}: {one_line(exc)}") from None


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


def max_expanded_bytes() -> int:
    """The largest constant ``materialize_constants`` expands from a ConstantOfShape: 64 MB, or
    ``QGRAPH_MAX_CONSTANT_MB``. A constant computed from a few bytes of shape would otherwise be
    written out in full (a 196-byte model asking for [400000, 100000] floats is 149 GiB)."""
    raw = os.environ.get("QGRAPH_MAX_CONSTANT_MB", "")
    try:
        mb = float(raw) if raw.strip() else 64.0
    except ValueError:
        raise ModelError(f"QGRAPH_MAX_CONSTANT_MB must be a number of MB, got {raw!r}") from None
    return int(max(mb, 0.0) * 2**20)


def materialize_constants(g: Graph) -> int:
    """Replace Constant nodes and ConstantOfShape nodes with a constant shape by initializers.

    A ConstantOfShape whose result would exceed ``max_expanded_bytes()`` stays a node (ONNX Runtime
    computes it when the model runs); its name and size are listed in ``meta_of(g)["kept_constants"]``
    and the report's input row.
    """
    count = 0
    limit = max_expanded_bytes()
    kept = meta_of(g).setdefault("kept_constants", {}) if hasattr(g, "qgraph_meta") else {}
    for node in list(g.nodes):
        if node.op == "Constant" and len(node.outputs) == 1:
            values = _constant_node_value(node)
        elif node.op == "ConstantOfShape" and node.inputs and const(node.inputs[0]) is not None:
            shape = [int(d) for d in np.asarray(const(node.inputs[0])).reshape(-1)]
            if any(d < 0 for d in shape):
                raise ModelError(f"ConstantOfShape '{node.name}' has a negative dim in its shape {shape}")
            fill = node.attrs.get("value")
            fill_arr = np.asarray(fill.values if isinstance(fill, gs.Constant) else 0.0,
                                  dtype=fill.values.dtype if isinstance(fill, gs.Constant) else np.float32)
            nbytes = _volume(shape) * fill_arr.dtype.itemsize
            if nbytes > limit:
                kept[node.name] = nbytes
                continue
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


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


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


def to_model(g: Graph, *, light: bool = False) -> onnx.ModelProto:
    """Export the graph as a ModelProto, keeping the source model's metadata.

    ``light=True`` leaves the weights out: every constant of ``LIGHT_MIN_ELEMENTS`` or more becomes
    a placeholder with its dims and data type but no data (``is_light`` tells such a model), enough
    for ``onnx.checker`` on the skeleton, shapes, sizes and op counts without copying a large model
    (``PassManager`` uses it for models over ``EXTERNAL_DATA_THRESHOLD``). A light model cannot run
    or be saved: use the graph for that (``save(g, ...)``, ``ops.ort_session(g)``).
    """
    g.toposort()
    _pack_subbyte_constants(g)
    swapped = _swap_to_refs(g, LIGHT_LOCATION) if light else []
    try:
        model = gs.export_onnx(g, do_type_check=False)
    finally:
        _restore_values(swapped)
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


#: Constants with at least this many elements are left out of a light model (as ``skeleton`` does).
LIGHT_MIN_ELEMENTS = 1024
#: The external-data location of a light model's placeholders: no file has this name.
LIGHT_LOCATION = "<qgraph: held in memory by the graph>"


def is_light(model: onnx.ModelProto) -> bool:
    """Whether ``model`` came from ``to_model(g, light=True)`` with weights left out."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL
               and any(e.key == "location" and e.value == LIGHT_LOCATION for e in t.external_data)
               for t in model.graph.initializer)


def _constant_meta(c: Constant) -> tuple[tuple, int, int] | None:
    """(shape, ONNX data type, bytes) of a constant without loading lazily held values."""
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
    v = c._values
    if isinstance(v, SparseValues):
        return None
    if isinstance(v, LazyValues):
        t = v.tensor
        if t.data_type == onnx.TensorProto.STRING:
            return None
        return tuple(int(d) for d in t.dims), t.data_type, modelfile.data_bytes(t)
    if isinstance(v, np.ndarray):
        try:
            dt = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
        except Exception:
            return None
        if dt == onnx.TensorProto.STRING:
            return None
        return tuple(v.shape), dt, int(v.nbytes)
    return None


def _swap_to_refs(g: Graph, location: str) -> list:
    """Give every large constant of ``g`` a placeholder (external reference to ``location``)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues
    swapped = []
    for t in g.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        meta = _constant_meta(t)
        if meta is None or _volume(meta[0]) < LIGHT_MIN_ELEMENTS:
            continue
        swapped.append((t, t._values))
        t._values = LazyValues(modelfile.ref_proto(t.name, meta[0], meta[1], location))
    return swapped


def _restore_values(swapped: list) -> None:
    for t, values in swapped:
        t._values = values


def graph_bytes(g: Graph) -> int:
    """Bytes of all constants of ``g``, from their shapes (nothing is loaded)."""
    total = 0
    for t in g.tensors().values():
        if isinstance(t, gs.Constant):
            meta = _constant_meta(t)
            total += meta[2] if meta else 0
    return total


def segment(g: Graph, outputs: Iterable[str], given: dict[str, np.dtype]) -> onnx.ModelProto:
    """The part of ``g`` that computes the tensors ``outputs`` from the tensors ``given`` (name ->
    numpy dtype), as a model: its inputs are the given tensors it reads (in ``given``'s order), its
    outputs ``outputs`` (untyped: ONNX Runtime infers them). ``g`` itself is not changed.

    Raises ModelError when an output needs a tensor that is neither computed nor given."""
    tensors = g.tensors()
    outputs = [n for n in dict.fromkeys(outputs) if n not in given]
    reads: set[str] = set()

    def maker(t: Tensor) -> Node | None:
        if not t.name or isinstance(t, gs.Constant):
            return None
        if t.name in given:
            reads.add(t.name)
            return None
        node = producer(t)
        if node is None:
            raise ModelError(f"tensor '{t.name}' is needed but neither computed by the segment nor given")
        return node

    # depth-first from the outputs, a node after its inputs: a topological order of what is needed
    order: list[Node] = []
    done: set[int] = set()
    stack = [(n, False) for n in reversed([maker(tensors[o]) for o in outputs]) if n is not None]
    while stack:
        node, inputs_done = stack.pop()
        if id(node) in done:
            continue
        if inputs_done:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((p, False) for t in reversed(node.inputs) if (p := maker(t)) is not None and id(p) not in done)
    _pack_subbyte_constants(g, [t for n in order for t in n.inputs])
    sub = gs.Graph(nodes=order, inputs=[gs.Variable(n, dtype=np.dtype(d)) for n, d in given.items() if n in reads],
                   outputs=[gs.Variable(n) for n in outputs], opset=g.opset, import_domains=g.import_domains)
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = max(meta_of(g).get("ir_version") or 0, _min_ir_for(opset_of(model)))
    return model


_SUBBYTE = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def _pack_subbyte_constants(g: Graph, tensors: Iterable[Tensor] | None = None) -> None:
    """Re-wrap 4-bit constants (of ``g``, or only those among ``tensors``) as packed TensorProtos
    before export.

    onnx-graphsurgeon exports a numpy int4/uint4 array one byte per element (ONNX wants two per byte),
    and reading ``Constant.values`` turns a lazily held packed proto into such an array; so every
    export packs them again.
    """
    from onnx_graphsurgeon.ir.tensor import LazyValues
    for t in (g.tensors().values() if tensors is None else tensors):
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

    Refuses a path equal to any in ``protect`` (the input model, which a graph remembers, and its
    external data files), a directory, or a missing folder; every error is one ModelError line and
    leaves no file behind. Models whose tensors exceed what one protobuf can hold are written with
    external data in ``<name>.data`` beside the file, streamed tensor by tensor (never a second
    copy of the weights in memory). Files get the mode the umask allows.
    """
    with modelfile.Outputs() as out:
        written = stage(out, model, path, protect=protect)
        out.commit()
    return written[0]


def stage(out: modelfile.Outputs, model: Graph | onnx.ModelProto, path: str | os.PathLike, *,
          protect: Iterable[str | os.PathLike | None] = ()) -> tuple[int, onnx.ModelProto]:
    """Write ``model`` into ``out`` (put in place by ``out.commit()``, with the other files of the
    same result). Returns (bytes, the ModelProto as written: with external data, its tensors refer to
    ``<name>.data`` beside ``path``)."""
    protect = [p for p in protect if p is not None]
    if isinstance(model, gs.Graph):
        meta = meta_of(model)
        protect += [meta.get("source")] + list(meta.get("external_files", ()))
    path = modelfile.check_output_path(path)
    data_path = path.with_name(path.name + ".data")
    for p in protect:
        if p is None:
            continue
        if same_file(path, Path(p)):
            raise ModelError(f"refusing to write the output over the input model: {path}")
        if same_file(data_path, Path(p)):
            raise ModelError(f"refusing to write the output's external data over the input's: {data_path}")
    if isinstance(model, gs.Graph):
        if graph_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            return _stage_external(out, model, path, data_path)
        model = to_model(model)
    if is_light(model):
        raise ModelError("a light model (weights held by its graph) cannot be saved: save the graph")
    if _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return _stage_external(out, model, path, data_path)
    data = model.SerializeToString()
    return out.write_bytes(path, data), model


def _stage_external(out: modelfile.Outputs, model: Graph | onnx.ModelProto, path: Path,
                    data_path: Path) -> tuple[int, onnx.ModelProto]:
    """Stream every tensor of 1 KB or more into ``data_path``, then write the model referring to it."""
    data_name = data_path.name
    with out.open(data_path) as f:
        if isinstance(model, gs.Graph):
            written = _stream_graph(model, f, data_name)
        else:
            written = modelfile.stream_proto(model, f, data_name, EXTERNAL_MIN_BYTES)
        data_size = f.tell()
    return out.write_bytes(path, written.SerializeToString()) + data_size, written


def _stream_graph(g: Graph, f, data_name: str) -> onnx.ModelProto:
    from onnx_graphsurgeon.ir.tensor import LazyValues
    _pack_subbyte_constants(g)
    swapped = []
    try:
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant):
                continue
            meta = _constant_meta(t)
            if meta is None or meta[2] < EXTERNAL_MIN_BYTES:
                continue
            offset = f.tell()
            modelfile.write_values(f, t._values)
            swapped.append((t, t._values))
            t._values = LazyValues(modelfile.ref_proto(t.name, meta[0], meta[1], data_name, offset, meta[2]))
        return to_model(g)
    finally:
        _restore_values(swapped)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same directory (see ``save``)."""
    with modelfile.Outputs() as out:
        out.write_bytes(path, data)
        out.commit()


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


def is_large(model: onnx.ModelProto | Graph) -> bool:
    """True when the model's tensors do not fit in one protobuf (must use external data)."""
    if isinstance(model, gs.Graph):
        return graph_bytes(model) >= EXTERNAL_DATA_THRESHOLD
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


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The whole message on one line (onnx.checker spreads one sentence over several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
