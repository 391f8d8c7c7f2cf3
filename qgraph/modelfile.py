"""Model files on disk: what ``ir.load`` trusts of a file, and how every output is written.

Reading a model from an untrusted source, before any byte of weight data is read:

- every tensor's declared dims must match the data it holds: ``raw_data`` bytes, the count of its
  typed field (``float_data``, ``int32_data`` ...), or the byte range of its external data; a
  tensor that declares [4000, 3000, 3, 3] with 16 bytes is refused here, not deep in a pass;
- external data must live inside the model's folder: a ``location`` that is absolute, has a
  ``..`` part, passes through a symbolic link (as ONNX's own loader refuses them) or names
  anything but a regular file is refused, and so is a range beyond the end of the file.

Then, on the parsed model: a cycle is named (``find_cycle``); onnx's C++ prints are kept off the
user's terminal (``quiet_c_output``); and once imported, weights no model computes with (NaN, an
infinite layer parameter, a BatchNormalization variance + epsilon <= 0) are refused
(``check_weights``), and so are convolution attributes that contradict the weight
(``check_layers``: group=0, a group not dividing the channels).

Large external tensors (``MAP_MIN_BYTES`` and more, of the main graph) are not read but mapped
copy-on-write (``np.memmap(mode="c")``): a page is read when a pass touches it, and a tensor a
pass replaces releases its mapping, so a model over 2 GB is held once, never as protobuf bytes
*and* numpy arrays.

Writing: ``write_values`` / ``stream_proto`` stream tensors into an external data file one at a
time (``ref_proto`` is the reference left in their place); ``Outputs`` stages every file of one result (model, its external data, the report) under
a temporary name beside its destination, with the mode the umask gives (``mkstemp`` alone makes
0600), and puts them in place together by ``commit``; a failure before that leaves no file and no
temporary behind. A destination that is a directory, or whose folder is missing or is a file, is
refused with one line before anything is written.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from qgraph.errors import ModelError

#: External tensors at least this large are memory-mapped by ``ir.load`` instead of read.
MAP_MIN_BYTES = 1 << 20

_EXTERNAL_KEYS = ("location", "offset", "length", "checksum", "basepath")


# ----------------------------------------------------------------------------- tensors of a model

def all_tensors(model: onnx.ModelProto, main_initializers: bool = True) -> Iterator[tuple[TensorProto, str]]:
    """Every TensorProto of the model (initializers, sparse parts, attribute tensors, in every
    subgraph and function), with where it sits, for messages."""
    yield from _graph_tensors(model.graph, "graph", main_initializers)
    for f in model.functions:
        for node in f.node:
            yield from _node_tensors(node, f"function '{f.name}'")


def _graph_tensors(graph: onnx.GraphProto, where: str, initializers: bool = True
                   ) -> Iterator[tuple[TensorProto, str]]:
    if initializers:
        for t in graph.initializer:
            yield t, f"initializer '{t.name}'"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer '{s.values.name}'"
        yield s.indices, f"sparse initializer '{s.values.name}' (indices)"
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[TensorProto, str]]:
    label = f"attribute '{{}}' of node '{node.name or node.op_type}'"
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t, label.format(a.name)
        for t in a.tensors:
            yield t, label.format(a.name)
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values, label.format(a.name)
            yield a.sparse_tensor.indices, label.format(a.name)
        if a.HasField("g"):
            yield from _graph_tensors(a.g, where)
        for sub in a.graphs:
            yield from _graph_tensors(sub, where)


# element counts per stored unit: 4-bit types pack two elements in a byte (and 2-bit types four)
_PACKED = {getattr(TensorProto, n): k for n, k in
           (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4)) if hasattr(TensorProto, n)}
_TYPED_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
}


def elements(t: TensorProto, where: str = "") -> int:
    """The element count the dims declare; ModelError on a negative dim."""
    n = 1
    for d in t.dims:
        if d < 0:
            raise ModelError(f"{where or repr(t.name)} has a negative dim {list(t.dims)}")
        n *= int(d)
    return n


def itemsize(data_type: int, where: str = "") -> int:
    """Bytes per element as stored in raw data (packed types: 1, see ``data_bytes``)."""
    if data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        raise ModelError(f"{where}: data type {onnx.TensorProto.DataType.Name(data_type)} has no fixed size")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:
        raise ModelError(f"{where} has an unknown data type {data_type}") from None


def data_bytes(t: TensorProto, where: str = "") -> int:
    """The bytes the tensor's data must hold, from its dims and data type."""
    n = elements(t, where)
    per = _PACKED.get(t.data_type)
    return -(-n // per) if per else n * itemsize(t.data_type, where)


def check_sizes(model: onnx.ModelProto, base_dir: Path | None) -> None:
    """ModelError unless every tensor's data matches its declared dims (external data included,
    whose location is checked first: see ``external_file``). Reads no weight data."""
    for t, where in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            _check_external(t, where, base_dir)
            continue
        if t.data_type == TensorProto.UNDEFINED:
            raise ModelError(f"{where} has no data type")
        n = elements(t, where)
        raw = len(t.raw_data)
        if t.data_type == TensorProto.STRING:
            have, want, unit = len(t.string_data), n, "strings"
        elif raw:
            have, want, unit = raw, data_bytes(t, where), "bytes"
        else:
            field, k = _TYPED_FIELD.get(t.data_type, ("int32_data", 1))
            per = _PACKED.get(t.data_type)
            have = len(getattr(t, field))
            want, unit = (-(-n // per) if per else n * k), "values"
            if have == 0 and n > 0:
                raise ModelError(f"{where} declares {_shape(t)} ({n:,} elements) but holds no data")
        if have != want:
            raise ModelError(f"{where} declares {_shape(t)}, which needs {want:,} {unit}, "
                             f"but holds {have:,} (truncated or corrupt)")


def check_strings(message, where: str = "model") -> None:
    """ModelError when a string field is not UTF-8. Protobuf parses such a model and fails only when
    the field is read, anywhere later; every string is read once here (weights are not touched)."""
    try:
        _touch_strings(message)
    except (UnicodeDecodeError, _NotUtf8):
        raise ModelError(f"not a valid ONNX model: {where} has a name or string that is not UTF-8 "
                         "(corrupt file?)") from None


class _NotUtf8(Exception):
    pass


def _touch_strings(message) -> None:
    # protobuf returns an invalid string as bytes (and fails when it is copied into another message)
    for fd in message.DESCRIPTOR.fields:
        if fd.message_type is None:
            if fd.type == fd.TYPE_STRING:
                value = getattr(message, fd.name)
                if any(isinstance(v, bytes) for v in (value if _is_repeated(fd) else [value])):
                    raise _NotUtf8()
            continue
        if _is_repeated(fd):
            for item in getattr(message, fd.name):
                _touch_strings(item)
        elif message.HasField(fd.name):
            _touch_strings(getattr(message, fd.name))


def _is_repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _shape(t: TensorProto) -> str:
    return "[" + ", ".join(str(d) for d in t.dims) + "]"


# ----------------------------------------------------------------------------- external data

def external_info(t: TensorProto, where: str) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor; ModelError on malformed entries."""
    info: dict[str, str] = {}
    for e in t.external_data:
        if e.key in _EXTERNAL_KEYS:
            info[e.key] = e.value
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise ModelError(f"{where}: external data offset/length is not an integer") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where}: external data offset/length is negative")
    return info.get("location", ""), offset, length


def external_file(base_dir: Path | None, location: str, where: str) -> Path:
    """The file an external ``location`` names, checked to be a regular file inside ``base_dir``
    reached through no symbolic link. Raises ModelError naming the problem; reads nothing."""
    if base_dir is None:
        raise ModelError(f"{where} has external data ('{location}') but the model was given as a "
                         "ModelProto: give its path so the data can be found beside it")
    if not location:
        raise ModelError(f"{where} has external data without a location")
    if "\0" in location:
        raise ModelError(f"{where}: external data location contains a NUL byte")
    posix, win = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or win.is_absolute() or win.drive or location.startswith(("/", "\\")):
        raise ModelError(f"{where}: external data location '{location}' is an absolute path; "
                         "refused (it must be a file in the model's folder)")
    parts = [p for p in location.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ModelError(f"{where}: external data location '{location}' leaves the model's folder "
                         "('..'); refused")
    if not parts:
        raise ModelError(f"{where}: external data location '{location}' names no file")
    path = base_dir
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ModelError(f"{where}: external data file not found: {path}") from None
        except OSError as exc:
            raise ModelError(f"{where}: cannot read external data {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ModelError(f"{where}: external data path {path} is a symbolic link; refused")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ModelError(f"{where}: external data path {path} is not a folder")
        if last and not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{where}: external data {path} is not a regular file")
    return path


def _check_external(t: TensorProto, where: str, base_dir: Path | None) -> None:
    location, offset, length = external_info(t, where)
    path = external_file(base_dir, location, where)
    want = data_bytes(t, where)
    if length is not None and length != want:
        raise ModelError(f"{where} declares {_shape(t)} ({want:,} bytes) but its external data "
                         f"length is {length:,}")
    size = path.stat().st_size
    if offset + want > size:
        raise ModelError(f"{where} needs {want:,} bytes at offset {offset:,} of {path.name}, "
                         f"which holds {size:,} (truncated or corrupt)")


def _open_external(t: TensorProto, where: str, base_dir: Path | None) -> tuple[IO[bytes], int, int]:
    """(file, offset, bytes) of an external tensor, opened without following a symbolic link and
    re-checked on the open file (so a swap after the check reads nothing it should not)."""
    location, offset, _ = external_info(t, where)
    path = external_file(base_dir, location, where)
    want = data_bytes(t, where)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelError(f"{where}: cannot open external data {path}: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or offset + want > st.st_size:
        f.close()
        raise ModelError(f"{where}: external data {path} changed while being read")
    return f, offset, want


def read_external(model: onnx.ModelProto, base_dir: Path | None, *, map_min_bytes: int | None = None
                  ) -> tuple[dict[str, tuple[Path, int]], set[Path]]:
    """Read external data into the tensors (as ``onnx.load`` would), after ``check_sizes``.

    With ``map_min_bytes``, main-graph initializers of that size or more stay external and are
    returned as {name: (file, offset)} for ``map_array`` to memory-map once the graph is imported.
    Returns that and the set of external files the model uses (outputs must never replace them).
    """
    mapped: dict[str, tuple[Path, int]] = {}
    files: set[Path] = set()
    # (protobuf hands out a new Python wrapper on every access: tensors are told apart by name and
    # place, never by id())
    main = [(t, f"initializer '{t.name}'", True) for t in model.graph.initializer]
    rest = [(t, w, False) for t, w in all_tensors(model, main_initializers=False)]
    for t, where, is_main in main + rest:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        location, offset, _ = external_info(t, where)
        path = external_file(base_dir, location, where)
        files.add(path)
        if (map_min_bytes is not None and is_main and _mappable(t.data_type)
                and data_bytes(t) >= map_min_bytes):
            mapped[t.name] = (path, offset)
            continue
        f, offset, want = _open_external(t, where, base_dir)
        with f:
            f.seek(offset)
            data = f.read(want)
        if len(data) != want:
            raise ModelError(f"{where}: external data ended after {len(data):,} of {want:,} bytes")
        t.raw_data = data
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
    return mapped, files


def _mappable(data_type: int) -> bool:
    """Types stored one little-endian numpy element per element (not packed, not strings)."""
    if data_type in _PACKED or data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return False
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return False
    return dt.kind in "biufc"


def map_array(path: Path, offset: int, t_dims, data_type: int) -> np.ndarray:
    """A copy-on-write memory map of one external tensor (checked by ``read_external``)."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in t_dims)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelError(f"cannot open external data {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"external data {path} is not a regular file")
        return np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape)


# ----------------------------------------------------------------------------- structure

def find_cycle(graph: onnx.GraphProto) -> list[str] | None:
    """The node names of one cycle in ``graph`` (first node repeated at the end), or None."""
    writer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(graph.node)]
    state = [0] * len(graph.node)          # 0 new, 1 on the current path, 2 done
    for start in range(len(graph.node)):
        if state[start]:
            continue
        path, stack = [], [(start, iter(graph.node[start].input))]
        state[start] = 1
        path.append(start)
        while stack:
            i, inputs = stack[-1]
            nxt = next((writer[t] for t in inputs if t in writer), None)
            if nxt is None:
                state[i] = 2
                stack.pop()
                path.pop()
            elif state[nxt] == 1:
                loop = path[path.index(nxt):] + [nxt]
                return [names[k] for k in reversed(loop)]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(graph.node[nxt].input)))
    return None


class quiet_c_output:
    """Send file descriptors 1 and 2 to /dev/null for a ``with`` block (prints from C++ code)."""

    def __enter__(self):
        import sys
        self.saved = []
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError, AttributeError):
            return self
        try:
            for fd in (1, 2):
                try:
                    self.saved.append((fd, os.dup(fd)))
                    os.dup2(null, fd)
                except OSError:
                    pass
        finally:
            os.close(null)
        return self

    def __exit__(self, *exc) -> None:
        for fd, saved in self.saved:
            os.dup2(saved, fd)
            os.close(saved)


# ----------------------------------------------------------------------------- weights

#: Ops whose constant inputs are parameters (weights, biases, normalization statistics): a NaN or
#: infinite value there makes every output it reaches NaN or infinite.
PARAMETER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                           "InstanceNormalization", "LayerNormalization", "GroupNormalization"})


_CHUNK = 1 << 22


def check_weights(g) -> None:
    """ModelError when a weight cannot be computed with: a NaN in any float constant (NaN propagates
    through every op), an infinity among the parameters of a layer or normalization
    (``PARAMETER_OPS``: inf · 0 is NaN; an infinity elsewhere, such as an attention mask or a Clip
    bound, is legitimate), or a BatchNormalization whose variance + epsilon is not positive (ONNX
    Runtime would take the square root of a negative number or divide by zero). Decided at load,
    not in a pass, because no pass can make such a model compute numbers."""
    seen: set[tuple[int, bool]] = set()
    for graph in _graphs(g):
        for node in graph.nodes:
            strict = node.op in PARAMETER_OPS
            for t in node.inputs:
                if not isinstance(t, gs.Constant) or (id(t), strict) in seen:
                    continue
                seen.add((id(t), strict))
                nan, inf = _nonfinite(t, strict)
                if nan or inf:
                    what = f"{nan:,} NaN" if nan else f"{inf:,} infinite"
                    raise ModelError(f"weight '{t.name}' (input of {node.op} '{node.name}') holds {what} "
                                     f"value(s): the model cannot compute numbers; refused")
            if node.op == "BatchNormalization" and len(node.inputs) >= 5:
                var = node.inputs[4].values if isinstance(node.inputs[4], gs.Constant) else None
                if var is not None and np.issubdtype(var.dtype, np.floating):
                    eps = float(node.attrs.get("epsilon", 1e-5))
                    bad = np.flatnonzero(~(var.astype(np.float64).reshape(-1) + eps > 0))
                    if bad.size:
                        c = int(bad[0])
                        raise ModelError(
                            f"BatchNormalization '{node.name}': variance + epsilon is not positive in "
                            f"{bad.size} of {var.size} channel(s) (channel {c}: variance "
                            f"{float(var.reshape(-1)[c]):g}, epsilon {eps:g}); refused")


def _graphs(g) -> list:
    out = [g]
    try:
        out += list(g.subgraphs(recursive=True))
    except (AttributeError, TypeError):  # older onnx-graphsurgeon
        pass
    return out


def _nonfinite(t, count_inf: bool) -> tuple[int, int]:
    """(NaN count, infinity count if ``count_inf``) of a float constant, read in chunks (a mapped
    weight is paged in once, never copied whole) and without loading a lazily held proto."""
    from onnx_graphsurgeon.ir.tensor import LazyValues
    v = t._values
    if isinstance(v, LazyValues):
        proto = v.tensor
        if proto.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return 0, 0
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)).newbyteorder("<")
        flat = (np.frombuffer(proto.raw_data, dtype) if proto.raw_data
                else numpy_helper.to_array(proto).reshape(-1))
    elif isinstance(v, np.ndarray):
        if v.dtype.kind != "f":
            return 0, 0
        flat = v.reshape(-1)
    else:
        return 0, 0
    nan = inf = 0
    for i in range(0, flat.size, _CHUNK):
        part = flat[i:i + _CHUNK]
        finite = np.isfinite(part)
        if finite.all():
            continue
        k = int(np.count_nonzero(np.isnan(part)))
        nan += k
        inf += (part.size - int(np.count_nonzero(finite)) - k) if count_inf else 0
    return nan, inf


def check_layers(g) -> None:
    """ModelError when a convolution's attributes contradict its weight (onnx's checker and shape
    inference let ``group=0`` or a group that does not divide the channels through; ONNX Runtime
    refuses them only when it runs, and passes that index channels by group would divide by zero)."""
    for graph in _graphs(g):
        for node in graph.nodes:
            if node.op not in ("Conv", "ConvTranspose") or len(node.inputs) < 2:
                continue
            what = f"{node.op} '{node.name}'"
            group = node.attrs.get("group", 1)
            if not isinstance(group, int) or group < 1:
                raise ModelError(f"{what}: group must be a positive integer, got {group!r}")
            for key in ("strides", "dilations", "kernel_shape"):
                values = node.attrs.get(key)
                if values is not None and any(not isinstance(v, int) or v < 1 for v in values):
                    raise ModelError(f"{what}: {key} must be positive, got {list(values)}")
            shape = node.inputs[1].shape     # a constant's, or (a QDQ weight) the inferred one
            if not shape or len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in shape):
                continue
            if shape[0] % group:
                raise ModelError(f"{what}: group {group} does not divide the weight's {shape[0]} "
                                 f"{'output' if node.op == 'Conv' else 'input'} channels")
            x = node.inputs[0].shape
            if x is not None and len(x) == len(shape) and isinstance(x[1], int) and x[1] > 0:
                want = shape[1] * group if node.op == "Conv" else shape[0]
                if x[1] != want:
                    raise ModelError(f"{what}: input has {x[1]} channels, the weight and group={group} "
                                     f"need {want}")
            kernel = node.attrs.get("kernel_shape")
            if kernel is not None and list(kernel) != list(shape[2:]):
                raise ModelError(f"{what}: kernel_shape {list(kernel)} contradicts the weight's {list(shape[2:])}")


# ----------------------------------------------------------------------------- writing tensors

def ref_proto(name: str, shape: tuple, data_type: int, location: str, offset: int = 0,
               length: int | None = None) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=list(shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def write_values(f, values) -> None:
    """Write a constant's bytes as ONNX stores them (little-endian), one bounded chunk at a time."""
    t = getattr(values, "tensor", None)
    if isinstance(t, onnx.TensorProto):
        f.write(t.raw_data if t.raw_data else numpy_helper.to_array(t).astype(
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")).tobytes())
        return
    a = np.asarray(values)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(a).reshape(-1)
    step = max(1, (64 << 20) // max(flat.itemsize, 1))
    for i in range(0, flat.size, step):
        f.write(flat[i:i + step].view(np.uint8).data)


def stream_proto(model: onnx.ModelProto, f, data_name: str, min_bytes: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers refer to ``data_name``, their bytes streamed to ``f``
    (the copy holds no weight bytes, so nothing model-sized is duplicated)."""
    out = onnx.ModelProto()
    graph = model.graph
    small = []
    refs = []
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"initializer '{t.name}' refers to external data that was not loaded")
        if t.data_type == onnx.TensorProto.STRING:
            small.append(t)
            continue
        nbytes = data_bytes(t)
        if nbytes < min_bytes:
            small.append(t)
            continue
        offset = f.tell()
        write_values(f, _Lazy(t))
        refs.append(ref_proto(t.name, tuple(t.dims), t.data_type, data_name, offset, nbytes))
    shell = onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                            value_info=graph.value_info, initializer=small + refs,
                            sparse_initializer=graph.sparse_initializer, doc_string=graph.doc_string)
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.metadata_props.extend(model.metadata_props)
    out.graph.CopyFrom(shell)
    return out


class _Lazy:
    """A stand-in for LazyValues around a TensorProto, for ``_write_values``."""

    def __init__(self, tensor: onnx.TensorProto):
        self.tensor = tensor


# ----------------------------------------------------------------------------- outputs

def umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but read once a write)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path, or ModelError when it cannot be a file we write: a directory, or a folder
    that is missing or is not a folder."""
    p = Path(path)
    if str(p) in ("", ".") or p.name in ("", ".", ".."):
        raise ModelError(f"{what} path '{path}' names no file")
    if p.is_dir():
        raise ModelError(f"{what} path is a directory: {p}")
    parent = p.parent
    if not parent.exists():
        raise ModelError(f"{what} folder does not exist: {parent}")
    if not parent.is_dir():
        raise ModelError(f"{what} folder is not a directory: {parent}")
    return p


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """``check_output_path``, then create and remove a temporary file beside ``path``: a folder that
    cannot be written (read-only, full, /proc) is found before any work is done."""
    p = check_output_path(path, what)
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as exc:
        raise ModelError(f"cannot write {what} {p}: {exc.strerror or exc}") from None
    os.close(fd)
    _unlink(tmp)
    return p


def check_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """ModelError unless ``path`` is, or can be created as, a folder we can write in (tried with a
    temporary file in it or in its nearest existing parent; nothing is created)."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ModelError(f"{what} {p}: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".qgraph-probe-", suffix=".tmp")
    except OSError as exc:
        raise ModelError(f"cannot write {what} {p}: {exc.strerror or exc}") from None
    os.close(fd)
    _unlink(tmp)
    return p


class Outputs:
    """Files of one result, written under temporary names beside their destinations and put in
    place together by ``commit``; leaving the ``with`` block without ``commit`` removes them.

        with Outputs() as out:
            out.write_bytes("a.onnx", data)
            with out.open("a.onnx.data") as f: ...
            out.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path, bool]] = []   # (temporary, destination, existed before)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def open(self, path: str | os.PathLike, what: str = "output") -> "_Staged":
        """A binary file to write that becomes ``path`` at ``commit``."""
        final = check_output_path(path, what)
        if any(final == f for _, f, _ in self._staged):
            raise ModelError(f"two outputs would be written to the same file: {final}")
        try:
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        except OSError as exc:
            raise ModelError(f"cannot write {what} {final}: {exc.strerror or exc}") from None
        try:
            os.fchmod(fd, 0o666 & ~umask())
        except OSError:
            pass
        self._staged.append((tmp, final, final.exists()))
        return _Staged(os.fdopen(fd, "wb"), final, what)

    def write_bytes(self, path: str | os.PathLike, data: bytes, what: str = "output") -> int:
        with self.open(path, what) as f:
            f.write(data)
        return len(data)

    def commit(self) -> None:
        """Move every staged file to its destination (in the order staged)."""
        placed: list[tuple[Path, bool]] = []
        try:
            for tmp, final, existed in self._staged:
                os.replace(tmp, final)
                placed.append((final, existed))
        except OSError as exc:
            for final, existed in placed:
                if not existed:
                    _unlink(final)
            self.discard()
            raise ModelError(f"cannot write {final}: {exc.strerror or exc}") from None
        self._staged = []

    def discard(self) -> None:
        for tmp, _, _ in self._staged:
            _unlink(tmp)
        self._staged = []


class _Staged:
    """A temporary output file; OSError while writing becomes a one-line ModelError."""

    def __init__(self, f: IO[bytes], final: Path, what: str):
        self.f, self.final, self.what = f, final, what

    def __enter__(self) -> "_Staged":
        return self

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            raise ModelError(f"cannot write {self.what} {self.final}: {exc.strerror or exc}") from None

    def tell(self) -> int:
        return self.f.tell()

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        except OSError as e:
            raise ModelError(f"cannot write {self.what} {self.final}: {e.strerror or e}") from None
        finally:
            self.f.close()


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
