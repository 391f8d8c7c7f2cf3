"""The .qgz container (qgraph/container.py): exact round trips, the CLI, and bad input.

Round trips are compared byte for byte (the unpacked ModelProto serializes to the same bytes as the
packed one). Bad input must give one ModelError line, never another exception, never a large
allocation: a seeded mutation fuzz (bit flips, truncations, lying lengths and sizes with the
checksums recomputed so that the parser behind them is reached) checks 1,500 mutants.
"""
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from builders import DIGITS, DIGITS_SAMPLE, init, make_model, run_ort
from qgraph import cli, container, ir
from qgraph.errors import ModelError
from qgraph.cli import run_main


def mixed_model(seed: int = 0) -> onnx.ModelProto:
    """Every kind of tensor the packer codes differently:

        x ─Gemm(W float32, zstd)─ h ─Gemm(Gather(book, Cast(idx)) sparse huffman)─ y1
        x ─Add(t16 → Cast float16→32)── y2          float16 constant
        i4 (INT4, odd element count), qw (int8, few levels), typed (float_data), a tiny bias in the graph
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(48, 32)).astype(np.float32)
    idx = rng.integers(1, 33, size=(40, 48)).astype(np.uint8)
    idx[rng.random(idx.shape) < 0.8] = 0
    book = np.concatenate([[0.0], np.linspace(-1, 1, 32)]).astype(np.float32)
    t16 = rng.normal(size=(2, 32)).astype(np.float16)
    qw = rng.integers(-3, 4, size=(64, 16)).astype(np.int8)
    i4 = helper.make_tensor("i4", TensorProto.INT4, [301], rng.integers(-8, 8, 301).tolist())
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [300], rng.normal(size=300).astype(np.float32).tolist())
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Cast", ["idx"], ["idx32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["book", "idx32"], ["w2"], axis=0),
             helper.make_node("Gemm", ["h", "w2"], ["y1"], transB=1),
             helper.make_node("Cast", ["t16"], ["t32"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "t32"], ["y2"]),
             helper.make_node("Cast", ["qw"], ["qwf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["qwf"], ["y3"], keepdims=0),
             helper.make_node("Cast", ["i4"], ["i4f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["i4f"], ["y4"], keepdims=0),
             helper.make_node("ReduceSum", ["typed"], ["y5"], keepdims=0)]
    outputs = [("y1", [2, 40]), ("y2", [2, 32]), ("y3", []), ("y4", []), ("y5", [])]
    model = make_model(nodes, [("x", [2, 32])], outputs,
                       [init("w", w), init("b", np.zeros(48, np.float32)), init("idx", idx), init("book", book),
                        init("t16", t16), init("qw", qw), i4, typed], opset=21)
    model.ir_version = 10
    return model


def digits() -> onnx.ModelProto:
    return ir.read_model(DIGITS)


# ----------------------------------------------------------------------------- round trips

def test_round_trip_is_byte_identical_for_every_tensor_kind():
    model = mixed_model()
    model_raw = onnx.ModelProto()
    model_raw.CopyFrom(model)
    packed = container.pack(model)
    assert model.SerializeToString() == model_raw.SerializeToString(), "pack must not change its input"
    codecs = {name: t.codec for name, t in packed.tensors.items()}
    assert codecs["idx"] == "huffman" and codecs["qw"] == "huffman"
    assert packed.tensors["idx"].coding.layout_name == "sparse"
    back = container.read_bytes(packed.data)
    # the typed-field tensor comes back as raw_data: same values, bit for bit
    want = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].tobytes() == arr.tobytes(), name
    del model.graph.initializer[:]
    del back.graph.initializer[:]
    assert back.SerializeToString() == model.SerializeToString()


def test_round_trip_of_raw_data_models_serializes_identically():
    model = digits()
    back = container.read_bytes(container.pack(model).data)
    assert back.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
def test_every_raw_codec_round_trips(codec):
    if codec == "zstd":
        pytest.importorskip("zstandard", reason="codec=zstd needs the optional zstandard package (extra 'zstd')")
    model = digits()
    packed = container.pack(model, container.PackOptions(codec=codec, symbols=False))
    assert {t.codec for t in packed.tensors.values()} <= {"raw", codec if codec != "none" else "raw"}
    assert container.read_bytes(packed.data).SerializeToString() == model.SerializeToString()


def test_unpacked_model_runs_like_the_original():
    model = mixed_model()
    back = container.read_bytes(container.pack(model).data)
    x = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    for a, b in zip(run_ort(model, {"x": x}), run_ort(back, {"x": x})):
        assert np.array_equal(a, b)


def test_ir_load_reads_a_qgz_by_its_magic_not_its_name(tmp_path):
    path = tmp_path / "model.onnx"                   # a .qgz under another name
    path.write_bytes(container.pack(digits()).data)
    assert container.is_qgz(path)
    assert ir.read_model(path).SerializeToString() == digits().SerializeToString()
    g = ir.load(path)
    assert len(g.nodes) > 0


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_qgz_and_unpacks_it_bit_exactly(tmp_path, capsys):
    out, onnx_out, ref = tmp_path / "d.qgz", tmp_path / "d.onnx", tmp_path / "ref.onnx"
    assert cli.main([str(DIGITS), "-p", "fold,share:refit=false,huffman", "-o", str(out), "-q"]) == 0
    qgraph.optimize(DIGITS, "fold,share:refit=false", output=ref, progress=False)
    assert cli.main([str(out), "-o", str(onnx_out)]) == 0                  # no -p: unpack
    assert onnx_out.read_bytes() == ref.read_bytes()                        # exactly the model before huffman
    capsys.readouterr()
    assert cli.unpack_main([str(out), "--info"]) == 0
    text = capsys.readouterr().out
    assert "(graph)" in text and "_indices" in text


def test_qgz_output_without_huffman_is_refused(tmp_path, capsys):
    assert cli.main([str(DIGITS), "-p", "fold", "-o", str(tmp_path / "d.qgz")]) == 2
    err = capsys.readouterr().err
    assert "huffman" in err and len(err.strip().splitlines()) == 1


def test_passes_after_huffman_are_packed_too(tmp_path):
    out = tmp_path / "d.qgz"
    model, _ = qgraph.optimize(DIGITS, "fold,share:refit=false,huffman,cleanup", output=out, progress=False)
    assert container.read(out).SerializeToString() == model.SerializeToString()


def test_qgraph_run_executes_a_quantized_qgz(tmp_path, capsys):
    out = tmp_path / "dq.qgz"
    qgraph.optimize(DIGITS, "fold,quant,huffman", calib=str(DIGITS_SAMPLE), output=out, progress=False)
    assert run_main([str(out), "--inputs", str(DIGITS_SAMPLE), "--limit", "8", "--compare-ort"]) == 0
    assert "bit-exact" in capsys.readouterr().out


def test_installed_unpack_script_is_a_thin_wrapper(tmp_path):
    out = tmp_path / "d.qgz"
    out.write_bytes(container.pack(digits()).data)
    exe = Path(sys.executable).with_name("qgraph-unpack")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from qgraph.cli import unpack_main as m; "
                                                                "raise SystemExit(m())"]
    run = subprocess.run(cmd + [str(out), "-o", str(tmp_path / "d.onnx")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "d.onnx").read_bytes() == digits().SerializeToString()


@pytest.mark.parametrize("tool", ["opt", "unpack", "run"])
def test_corrupt_qgz_is_one_line_and_exit_2(tmp_path, capsys, tool):
    data = bytearray(container.pack(digits()).data)
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.qgz"
    bad.write_bytes(bytes(data))
    main, argv = {"opt": (cli.main, [str(bad), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")]),
                  "unpack": (cli.unpack_main, [str(bad)]),
                  "run": (run_main, [str(bad), "--inputs", str(DIGITS_SAMPLE)])}[tool]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checksum" in lines[0], lines


# ----------------------------------------------------------------------------- bad input

def sections_of(data: bytes):
    head = container.HEADER.unpack(data[:container.HEADER.size])
    count, dir_bytes = head[4], head[5]
    pos, out = container.HEADER.size, []
    for _ in range(count):
        e = list(container.ENTRY.unpack(data[pos:pos + container.ENTRY.size]))
        out.append((pos, e))
        pos += container.ENTRY.size + e[2]
    return out, dir_bytes


def refresh_checksums(data: bytearray) -> bytearray:
    """Recompute every CRC (sections, directory, header) so that a mutation reaches the parser."""
    secs, dir_bytes = sections_of(bytes(data))
    for pos, e in secs:
        off, stored = e[3], e[4]
        if 0 <= off and off + stored <= len(data):
            e[6] = zlib.crc32(bytes(data[off:off + stored]))
            data[pos:pos + container.ENTRY.size] = container.ENTRY.pack(*e)
    h = list(container.HEADER.unpack(bytes(data[:container.HEADER.size])))
    d0 = container.HEADER.size
    h[7] = zlib.crc32(bytes(data[d0:d0 + dir_bytes]))
    data[:container.HEADER.size] = container.HEADER.pack(*h)
    data[container.HEADER.size - 4:container.HEADER.size] = struct.pack(
        "<I", zlib.crc32(bytes(data[:container.HEADER.size - 4])))
    return data


def set_entry(data: bytes, index: int, field: int, value: int, fix_size: bool = False) -> bytearray:
    out = bytearray(data)
    secs, _ = sections_of(data)
    pos, e = secs[index]
    e[field] = value
    out[pos:pos + container.ENTRY.size] = container.ENTRY.pack(*e)
    return refresh_checksums(out)


def test_truncated_file_is_refused():
    data = container.pack(digits()).data
    with pytest.raises(ModelError, match="truncated"):
        container.read_bytes(data[:-10])


def test_declared_sizes_far_beyond_the_file_are_refused_before_allocating():
    data = container.pack(digits()).data
    bomb = set_entry(data, 1, 5, 1 << 50)             # raw bytes of one section: a petabyte
    with pytest.raises(ModelError, match="decompression bomb"):
        container.read_bytes(bytes(bomb))


def test_lying_lengths_are_refused():
    data = container.pack(mixed_model()).data
    with pytest.raises(ModelError, match="outside the data"):
        container.read_bytes(bytes(set_entry(data, 1, 4, 1 << 40)))          # stored bytes past the end
    with pytest.raises(ModelError, match="declared|needs"):
        container.read_bytes(bytes(set_entry(data, 1, 5, 7)))               # raw bytes vs the shape


def test_zlib_bomb_is_cut_at_the_declared_size():
    #   a 1 GB run of zeros in ~1 MB of zlib, declared as 4 KB: decoding stops at 4 KB + 1
    model = make_model([helper.make_node("Identity", ["w"], ["y"])], [], [("y", [1024])],
                       [init("w", np.arange(1024, dtype=np.float32))])
    data = container.pack(model, container.PackOptions(codec="zlib", symbols=False)).data
    secs, _ = sections_of(data)
    idx = next(i for i, (_, e) in enumerate(secs) if e[0] == container.TENSOR)
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    pos, e = secs[idx]
    off = e[3]
    new = bytearray(data[:off]) + bomb + bytearray(data[off + e[4]:])
    new = set_entry(bytes(new), idx, 4, len(bomb))
    h = list(container.HEADER.unpack(bytes(new[:container.HEADER.size])))
    h[6] = len(new)
    new[:container.HEADER.size] = container.HEADER.pack(*h)
    new = refresh_checksums(new)
    with pytest.raises(ModelError, match="does not unpack"):
        container.read_bytes(bytes(new))


def test_unknown_major_version_is_named():
    data = bytearray(container.pack(digits()).data)
    h = list(container.HEADER.unpack(bytes(data[:container.HEADER.size])))
    h[1] = 9
    data[:container.HEADER.size] = container.HEADER.pack(*h)
    with pytest.raises(ModelError, match="version 9"):
        container.read_bytes(bytes(refresh_checksums(data)))


FUZZ_MUTANTS = 1500


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One mutant and how it was made."""
    kind = int(rng.integers(0, 7))
    buf = bytearray(data)
    if kind == 0:                                       # flip bits anywhere (checksums stay: must fail)
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(0, len(buf)))] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf), "flip"
    if kind == 1:                                       # truncate
        return bytes(buf[:int(rng.integers(0, len(buf)))]), "truncate"
    if kind == 2:                                       # append
        return bytes(buf) + rng.bytes(int(rng.integers(1, 64))), "append"
    secs, _ = sections_of(data)
    i = int(rng.integers(0, len(secs)))
    if kind == 3:                                       # a directory field lies, checksums fixed
        field = int(rng.choice([1, 3, 4, 5]))
        value = int(rng.choice([0, 1, 255, 1 << 31, 1 << 62, int(rng.integers(0, 1 << 20))]))
        if field == 1:
            value &= 0xFF
        return bytes(set_entry(data, i, field, value)), f"entry {i} field {field} = {value}"
    # payload bytes changed, checksums fixed: the decoders themselves must refuse or produce a model
    off, stored = secs[i][1][3], secs[i][1][4]
    if stored == 0:
        return bytes(buf[:-1]), "truncate"
    for _ in range(int(rng.integers(1, 5 if kind < 6 else 40))):
        p = off + int(rng.integers(0, min(stored, 64 if kind == 4 else stored)))   # kind 4: headers
        buf[p] = int(rng.integers(0, 256)) if kind != 5 else buf[p] ^ 0xFF
    return bytes(refresh_checksums(buf)), f"payload of section {i}"


def test_seeded_mutation_fuzz_never_crashes():
    originals = [container.pack(mixed_model(0)).data, container.pack(digits()).data,
                 container.pack(mixed_model(1), container.PackOptions(codec="zlib")).data]
    failures = []
    for seed in range(FUZZ_MUTANTS):
        rng = np.random.default_rng(seed)
        which = seed % len(originals)
        mutant, how = mutate(originals[which], rng)
        try:
            container.read_bytes(mutant, limit=64 << 20)
        except ModelError as exc:
            assert "\n" not in str(exc)
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            failures.append(f"seed {seed} (original {which}, {how}): {type(exc).__name__}: {exc}")
    assert not failures, (f"{len(failures)} mutants crashed; reproduce with "
                          f"python -c 'import test_container as t; ...mutate(..., np.random.default_rng(SEED))': "
                          + "; ".join(failures[:5]))


def test_container_names_the_alphabet_limit_the_symbol_coder_has():
    from qgraph import symbols
    assert container.MAX_ALPHABET == symbols.MAX_ALPHABET
