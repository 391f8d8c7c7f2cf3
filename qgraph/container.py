"""The ``.qgz`` container: one file holding a model, its weights Deep-Compression coded.

    header    magic "\\x89QGZ\\r\\n\\x1a\\n" | version | section count | directory size | file size |
              CRC-32 of the directory | CRC-32 of the header                            (``HEADER``)
    directory per section: kind (graph | tensor), codec, name, offset, stored bytes, raw bytes,
              CRC-32 of the stored bytes                                               (``ENTRY``)
    sections  1. the model as ONNX protobuf with the large initializers' data taken out (their
                 dims, type, name and place stay: the restored model is the original, initializer
                 by initializer, byte for byte)
              2. one per large initializer: its raw bytes, coded by
                   symbols  Huffman-coded codebook indices, dense or with relative indices
                            (``qgraph.symbols``: shared weights, integer weights of a QDQ model, indices)
                   zstd / zlib, optionally byte-shuffled (floats: the exponent bytes together)
                   raw      when nothing helps

Reading trusts nothing: the file size, every CRC, every offset and length, the sum of the declared
unpacked sizes (at most ``ratio_limit`` times the file, and ``QGRAPH_QGZ_MAX_BYTES``) are checked
before anything is allocated, and each decoder is bounded by the size it must produce. Any problem is
one ``ModelError`` line naming the file and the section.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qgraph import ir
from qgraph.errors import ModelError

if TYPE_CHECKING:
    from qgraph import symbols

#: the most distinct values a symbol-coded tensor may have (``qgraph.symbols.MAX_ALPHABET``). The
#: symbol coder (and numba with it) is imported only when a tensor is coded or decoded: importing
#: qgraph must not map numba's LLVM
MAX_ALPHABET = 4096

MAGIC = b"\x89QGZ\r\n\x1a\n"
VERSION = (1, 0)
HEADER = struct.Struct("<8sHHIIIQII")     # magic, major, minor, flags, sections, dir bytes, file bytes, crcs
ENTRY = struct.Struct("<BBHQQQI")         # kind, codec, name length, offset, stored, raw, crc (+ name)
GRAPH, TENSOR = 0, 1
KINDS = {GRAPH: "graph", TENSOR: "tensor"}
RAW, ZLIB, ZSTD, SYMBOLS = 0, 1, 2, 3
CODECS = {RAW: "raw", ZLIB: "zlib", ZSTD: "zstd", SYMBOLS: "huffman"}
SHUFFLE = 0x10                            # codec flag: bytes transposed by significance before zlib/zstd
#: unpacked bytes allowed per byte of file (Deep Compression reaches ~50x; an all-zero tensor far more,
#: hence the floor), unless the caller or ``QGRAPH_QGZ_MAX_BYTES`` says otherwise
RATIO_LIMIT = 1024
FLOOR_BYTES = 256 << 20
#: element types coded as 4-bit symbols (two per byte, low nibble first)
_NIBBLE_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set())


def zstd_module():
    """The ``zstandard`` module, or None when it is not installed."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency; tolerated for reading zlib-only files
        return None
    return zstandard


# ----------------------------------------------------------------------------- element types

def elem_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type with fixed-size elements (None for strings)."""
    if data_type in _NIBBLE_TYPES:
        return 4
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ValueError(f"negative dimension {d}")
        n *= int(d)
    return n


# ----------------------------------------------------------------------------- packing

@dataclass
class TensorCoding:
    """What the packer did with one initializer, for the size accounting."""
    name: str
    codec: str                   # huffman | zstd | zlib | raw
    shuffle: bool
    elements: int
    raw_bytes: int
    stored_bytes: int            # section bytes (its directory entry not included)
    coding: symbols.Coding | None = None


@dataclass
class Packed:
    """A packed model: the file's bytes and how each part was coded."""
    data: bytes
    tensors: dict[str, TensorCoding] = field(default_factory=dict)
    graph_bytes: int = 0         # stored bytes of the graph section
    graph_raw_bytes: int = 0
    overhead_bytes: int = 0      # header + directory
    options: "PackOptions | None" = None

    @property
    def size(self) -> int:
        return len(self.data)

    def entry_bytes(self, name: str) -> int:
        return ENTRY.size + len(name.encode())


@dataclass
class PackOptions:
    min_bytes: int = 256         # initializers at least this large get their own section
    codec: str = "auto"          # raw-data compression: auto (zstd when installed, else zlib) | zstd | zlib | none
    level: int = 0               # 0: the codec's default (zstd 9, zlib 6)
    max_alphabet: int = MAX_ALPHABET
    gap_bits: int = 0            # 0: choose per tensor
    layout: str = "auto"         # symbol layout: auto | dense | sparse
    symbols: bool = True         # try the symbol coding at all


def _compressors(o: PackOptions) -> list[tuple[int, callable]]:
    z = zstd_module()
    if o.codec == "none":
        return []
    if o.codec == "zstd" and z is None:
        raise ModelError("huffman:codec=zstd needs the zstandard package (pip install zstandard)")
    out = []
    if o.codec in ("auto", "zstd") and z is not None:
        cctx = z.ZstdCompressor(level=o.level or 9)
        out.append((ZSTD, cctx.compress))
    if o.codec == "zlib" or (o.codec == "auto" and z is None):
        out.append((ZLIB, lambda b, lv=o.level or 6: zlib.compress(b, lv)))
    return out


def _shuffle(buf: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(buf.reshape(-1, width).T).reshape(-1) if width > 1 else buf


def _unshuffle(buf: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(buf.reshape(width, -1).T).reshape(-1) if width > 1 else buf


#: compression is first tried on a sample of this many bytes; below ``_WORTH`` of raw it is not kept
_SAMPLE = 1 << 20
_WORTH = 0.97


def _compress(raw: np.ndarray, width: int, comps) -> tuple[int, bool, bytes]:
    """(codec, shuffled, stored bytes): the best compressor (shuffled or not), when it is worth it."""
    if not comps or raw.size == 0:
        return RAW, False, raw.tobytes()
    candidates = [(c, s) for c, _ in comps for s in ((False, True) if width > 1 else (False,))]
    fns = dict(comps)
    sample = raw
    if raw.size > 2 * _SAMPLE:           # head and middle, whole elements, judge the candidates
        mid = (raw.size // 2) // width * width
        sample = np.concatenate([raw[:_SAMPLE], raw[mid:mid + _SAMPLE]])
    scored = sorted((len(fns[c](_shuffle(sample, width).tobytes() if s else sample.tobytes())), c, s)
                    for c, s in candidates)
    size, codec, shuffled = scored[0]
    if size > _WORTH * sample.size:
        return RAW, False, raw.tobytes()
    stored = fns[codec](_shuffle(raw, width).tobytes() if shuffled else raw.tobytes())
    if len(stored) > _WORTH * raw.size:
        return RAW, False, raw.tobytes()
    return codec, shuffled, stored


def _raw_of(t: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes (typed fields converted; external data must be loaded)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise ModelError(f"initializer '{t.name}' still has external data: load it before packing")
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper
    return numpy_helper.from_array(numpy_helper.to_array(t), t.name).raw_data


def pack(model: onnx.ModelProto, options: PackOptions | None = None) -> Packed:
    """The ``.qgz`` bytes of ``model`` (not modified; its large initializers are set aside only while
    the graph section is serialized)."""
    from qgraph import symbols
    o = options or PackOptions()
    comps = _compressors(o)
    sections: list[tuple[int, int, str, bytes, int]] = []    # kind, codec byte, name, stored, raw length
    codings: dict[str, TensorCoding] = {}
    moved: list[tuple[onnx.TensorProto, bytes | onnx.TensorProto]] = []   # tensor, what to put back
    seen: set[str] = set()
    try:
        for t in model.graph.initializer:
            bits = elem_bits(t.data_type)
            if bits is None or t.name in seen or not t.name:
                continue
            raw = _raw_of(t)
            if len(raw) < o.min_bytes:
                continue
            seen.add(t.name)
            n = _elements(t)
            if symbols.raw_size(n, bits) != len(raw):
                raise ModelError(f"initializer '{t.name}': {len(raw)} data bytes for {n} elements")
            arr = np.frombuffer(raw, np.uint8)
            coding = None
            if o.symbols and bits in symbols.ELEM_BITS:
                coding = symbols.plan(symbols.elements(arr, bits, n), bits, max_alphabet=o.max_alphabet,
                                      gap_bits=o.gap_bits, layout=o.layout)
            width = max(1, bits // 8)
            codec, shuffled, stored = _compress(arr, width, comps)
            if coding is not None and coding.payload_bytes < len(stored):
                codec, shuffled, stored = SYMBOLS, False, symbols.write(coding)
            else:
                coding = None
            sections.append((TENSOR, codec | (SHUFFLE if shuffled else 0), t.name, stored, len(raw)))
            codings[t.name] = TensorCoding(t.name, CODECS[codec], shuffled, n, len(raw), len(stored), coding)
            if t.HasField("raw_data"):
                moved.append((t, raw))
            else:                               # typed fields: restored as raw_data when unpacked
                backup = onnx.TensorProto()
                backup.CopyFrom(t)
                moved.append((t, backup))
            _clear_data(t)
        graph_raw = model.SerializeToString()
    finally:
        for t, back in moved:
            if isinstance(back, onnx.TensorProto):
                t.CopyFrom(back)
            else:
                t.raw_data = back
    graph_arr = np.frombuffer(graph_raw, np.uint8)
    g_codec, _, g_stored = _compress(graph_arr, 1, comps)
    sections.insert(0, (GRAPH, g_codec, "", g_stored, len(graph_raw)))
    data = _assemble(sections)
    overhead = HEADER.size + sum(ENTRY.size + len(name.encode()) for _, _, name, _, _ in sections)
    return Packed(data=data, tensors=codings, graph_bytes=len(g_stored), graph_raw_bytes=len(graph_raw),
                  overhead_bytes=overhead, options=o)


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                "uint64_data")


def _clear_data(t: onnx.TensorProto) -> None:
    for f in _DATA_FIELDS:
        t.ClearField(f)


def _assemble(sections) -> bytes:
    entries = []
    offset = HEADER.size + sum(ENTRY.size + len(name.encode()) for _, _, name, _, _ in sections)
    for kind, codec, name, stored, raw_len in sections:
        nb = name.encode()
        if len(nb) > 0xFFFF:
            raise ModelError(f"initializer name of {len(nb)} bytes is too long for .qgz")
        entries.append(ENTRY.pack(kind, codec, len(nb), offset, len(stored), raw_len,
                                  zlib.crc32(stored)) + nb)
        offset += len(stored)
    directory = b"".join(entries)
    head = HEADER.pack(MAGIC, VERSION[0], VERSION[1], 0, len(sections), len(directory), offset,
                       zlib.crc32(directory), 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    return b"".join([head, directory] + [s[3] for s in sections])


def write(model: onnx.ModelProto, path: str | os.PathLike, options: PackOptions | None = None) -> Packed:
    """Pack ``model`` and write it atomically to ``path``."""
    packed = pack(model, options)
    ir.atomic_write_bytes(path, packed.data)
    return packed


# ----------------------------------------------------------------------------- reading

def is_qgz(path: str | os.PathLike) -> bool:
    """Whether the file starts with the ``.qgz`` magic (the suffix is not looked at)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class Section:
    kind: int
    codec: int
    name: str
    offset: int
    stored: int
    raw: int
    crc: int

    @property
    def codec_name(self) -> str:
        return CODECS[self.codec & ~SHUFFLE] + ("+shuffle" if self.codec & SHUFFLE else "")


def max_unpacked(file_bytes: int) -> int:
    """The most bytes a file of this size may unpack to (``QGRAPH_QGZ_MAX_BYTES`` overrides)."""
    env = os.environ.get("QGRAPH_QGZ_MAX_BYTES")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ModelError(f"QGRAPH_QGZ_MAX_BYTES must be a number of bytes, got {env!r}") from None
    return max(FLOOR_BYTES, RATIO_LIMIT * file_bytes)


def _fail(where: str, msg: str) -> ModelError:
    return ModelError(f"corrupt .qgz {where}: {msg}")


def directory(data: bytes | memoryview, where: str = "<bytes>", *, limit: int | None = None) -> list[Section]:
    """The validated section table of a ``.qgz`` held in ``data``."""
    buf = memoryview(data)
    if len(buf) < HEADER.size:
        raise _fail(where, f"{len(buf)} bytes, shorter than the {HEADER.size}-byte header")
    magic, major, minor, flags, count, dir_bytes, file_bytes, dir_crc, head_crc = HEADER.unpack(buf[:HEADER.size])
    if magic != MAGIC:
        raise ModelError(f"not a .qgz file (bad magic): {where}")
    if zlib.crc32(buf[:HEADER.size - 4]) != head_crc:
        raise _fail(where, "header checksum mismatch")
    if major != VERSION[0]:
        raise ModelError(f"{where}: .qgz version {major}.{minor}; this qgraph reads version {VERSION[0]}.x")
    if file_bytes != len(buf):
        raise _fail(where, f"the header says {file_bytes} bytes, the file has {len(buf)} (truncated or appended to)")
    if HEADER.size + dir_bytes > len(buf):
        raise _fail(where, f"directory of {dir_bytes} bytes runs past the end of the file")
    raw_dir = buf[HEADER.size:HEADER.size + dir_bytes]
    if zlib.crc32(raw_dir) != dir_crc:
        raise _fail(where, "directory checksum mismatch")
    if count > dir_bytes // ENTRY.size:
        raise _fail(where, f"{count} sections cannot fit in a {dir_bytes}-byte directory")
    out, pos, names = [], 0, set()
    data_start = HEADER.size + dir_bytes
    for i in range(count):
        if pos + ENTRY.size > dir_bytes:
            raise _fail(where, f"directory entry {i} runs past the directory")
        kind, codec, name_len, offset, stored, raw, crc = ENTRY.unpack(raw_dir[pos:pos + ENTRY.size])
        pos += ENTRY.size
        if pos + name_len > dir_bytes:
            raise _fail(where, f"directory entry {i}: its name runs past the directory")
        try:
            name = bytes(raw_dir[pos:pos + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(where, f"directory entry {i}: name is not UTF-8") from None
        pos += name_len
        what = f"section {i} ('{name}')" if name else f"section {i}"
        if kind not in KINDS or (codec & ~SHUFFLE) not in CODECS:
            raise _fail(where, f"{what}: unknown kind {kind} or codec {codec}")
        if offset < data_start or offset + stored > len(buf):
            raise _fail(where, f"{what}: bytes [{offset}, {offset + stored}) lie outside the data "
                               f"[{data_start}, {len(buf)})")
        if (kind == GRAPH) != (i == 0):
            raise _fail(where, f"{what}: the graph must be the first section, and only it")
        if kind == TENSOR and name in names:
            raise _fail(where, f"{what}: tensor named twice")
        names.add(name)
        out.append(Section(kind, codec, name, offset, stored, raw, crc))
    if pos != dir_bytes:
        raise _fail(where, f"{dir_bytes - pos} stray bytes in the directory")
    if not out:
        raise _fail(where, "no sections")
    total = sum(s.raw for s in out)
    cap = limit if limit is not None else max_unpacked(len(buf))
    if total > cap:
        raise ModelError(f"{where}: declares {total:,} bytes unpacked from a {len(buf):,}-byte file, over the "
                         f"limit of {cap:,} (a decompression bomb? set QGRAPH_QGZ_MAX_BYTES to allow it)")
    return out


def _section_bytes(buf: memoryview, s: Section, where: str, elem_bits_: int | None = None,
                   n: int | None = None) -> bytes | np.ndarray:
    from qgraph import symbols
    what = f"section '{s.name}'" if s.name else "graph section"
    stored = buf[s.offset:s.offset + s.stored]
    if zlib.crc32(stored) != s.crc:
        raise _fail(where, f"{what}: checksum mismatch")
    base, shuffled = s.codec & ~SHUFFLE, bool(s.codec & SHUFFLE)
    if base == SYMBOLS:
        if elem_bits_ is None or shuffled:
            raise _fail(where, f"{what}: huffman coding is for tensor sections only")
        try:
            return symbols.read(stored, n, elem_bits_)
        except symbols.SymbolError as exc:
            raise _fail(where, f"{what}: {exc}") from None
    if base == RAW:
        if s.stored != s.raw:
            raise _fail(where, f"{what}: raw section of {s.stored} bytes declares {s.raw}")
        out = bytes(stored)
    elif base == ZLIB:
        d = zlib.decompressobj()
        try:
            out = d.decompress(stored, s.raw + 1)
        except zlib.error as exc:
            raise _fail(where, f"{what}: zlib: {exc}") from None
        if len(out) != s.raw or not d.eof or d.unused_data:
            raise _fail(where, f"{what}: zlib data does not unpack to the declared {s.raw} bytes")
    else:
        z = zstd_module()
        if z is None:
            raise ModelError(f"{where}: {what} is zstd-compressed; install zstandard (pip install zstandard)")
        try:
            reader = z.ZstdDecompressor().stream_reader(io.BytesIO(stored), read_across_frames=False)
            out = reader.read(s.raw + 1)
        except z.ZstdError as exc:
            raise _fail(where, f"{what}: zstd: {exc}") from None
        if len(out) != s.raw:
            raise _fail(where, f"{what}: zstd data does not unpack to the declared {s.raw} bytes")
    if shuffled:
        width = (elem_bits_ or 8) // 8
        if width < 1 or len(out) % max(width, 1):
            raise _fail(where, f"{what}: shuffled data of {len(out)} bytes for {width}-byte elements")
        out = _unshuffle(np.frombuffer(out, np.uint8), width).tobytes()
    return out


def read_bytes(data: bytes, where: str = "<bytes>", *, limit: int | None = None) -> onnx.ModelProto:
    """The model stored in ``.qgz`` bytes, exactly as it was packed."""
    from qgraph import symbols
    buf = memoryview(data)
    secs = directory(buf, where, limit=limit)
    graph_raw = _section_bytes(buf, secs[0], where)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph_raw)
    except Exception as exc:
        raise _fail(where, f"graph section is not an ONNX model: {str(exc).splitlines()[0][:200]}") from None
    shells = {}
    for t in model.graph.initializer:
        shells.setdefault(t.name, []).append(t)
    for s in secs[1:]:
        found = shells.get(s.name)
        if not found or len(found) != 1:
            raise _fail(where, f"section '{s.name}' has {'no' if not found else 'several'} initializer(s) of that name")
        t = found[0]
        bits = elem_bits(t.data_type)
        if bits is None:
            raise _fail(where, f"section '{s.name}': initializer type {t.data_type} has no fixed-size elements")
        try:
            n = _elements(t)
        except ValueError as exc:
            raise _fail(where, f"section '{s.name}': {exc}") from None
        if symbols.raw_size(n, bits) != s.raw:
            raise _fail(where, f"section '{s.name}': {s.raw} bytes declared, its shape {list(t.dims)} needs "
                               f"{symbols.raw_size(n, bits)}")
        if any(t.HasField(f) if f == "raw_data" else len(getattr(t, f)) for f in _DATA_FIELDS):
            raise _fail(where, f"section '{s.name}': its initializer already holds data")
        raw = _section_bytes(buf, s, where, bits, n)
        t.raw_data = raw.tobytes() if isinstance(raw, np.ndarray) else raw
    return model


def read(path: str | os.PathLike, *, limit: int | None = None) -> onnx.ModelProto:
    """The model stored in a ``.qgz`` file (``ModelError`` on anything but a valid one)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {p}: {exc.strerror or exc}") from None
    return read_bytes(data, str(p), limit=limit)


def info(path: str | os.PathLike) -> dict:
    """The section table of a ``.qgz`` (validated, nothing decoded) for ``qgraph-unpack --info``."""
    p = Path(path)
    data = p.read_bytes()
    secs = directory(memoryview(data), str(p))
    return {"file": str(p), "bytes": len(data), "version": ".".join(map(str, VERSION)),
            "unpacked_bytes": sum(s.raw for s in secs),
            "sections": [{"kind": KINDS[s.kind], "name": s.name, "codec": s.codec_name, "stored": s.stored,
                          "raw": s.raw} for s in secs]}


ir.register_container(MAGIC, read)
