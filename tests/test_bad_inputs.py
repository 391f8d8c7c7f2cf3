"""Hostile and broken input, one row per case (issue [H]): what qgraph-opt / qgraph-run / the Python
API do when the model, the data, the options or the destination are wrong.

Every row of ``ROWS`` runs the command line in-process (``qgraph.cli.main`` / ``run_main``: the same
code as the console scripts, ~100x faster than a subprocess per row) in a sandbox folder and checks
what a user must be able to rely on:

- the exit code: 2 for bad input or options, 1 only when a pass fails on valid input;
- exactly one line on stderr, starting ``<prog>: error:``, naming the problem; no traceback, no
  "internal error" (an unexpected exception class);
- every file in the sandbox unchanged (the input untouched), no new file (no partial output, no
  temporary left beside the destination), and the temp folder empty (no ``qgraph-ort-*`` left).

Cases that are *not* errors (a custom-domain op, control flow, shared initializers, a huge
ConstantOfShape, a model over 2 GB) have their own tests below, checked against ONNX Runtime.
Root runs CI, and a read-only folder does not stop root: unwritable destinations here are ones that
fail for root too (a directory, a folder that is a file, a missing folder, /proc).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from builders import DIGITS, DIGITS_SAMPLE, ROOT, bn_node, bn_params, init, make_model, rel_err, run_ort
from qgraph import ir, modelfile
from qgraph.cli import main, run_main
from qgraph.errors import ModelError, OptionError, PassError

F = TensorProto.FLOAT


# ----------------------------------------------------------------------------- sandbox

@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder, and a private temp folder (tempfile.tempdir) that must end empty."""
    work = tmp_path / "work"
    work.mkdir()
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.chdir(work)
    return work


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p.relative_to(folder))] = "link" if p.is_symlink() else "dir"
        else:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def invoke(prog: str, argv: list[str], capsys) -> tuple[int, str, str]:
    code = (main if prog == "opt" else run_main)([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- models

def conv_bn(rng=None, w=None, var=None) -> onnx.ModelProto:
    #   x ─Conv(w)─ c ─BN─ y
    rng = rng or np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32) if w is None else w
    params = bn_params(rng, 4)
    if var is not None:
        params[3] = init("bn_var", np.asarray(var, np.float32))
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")],
                      [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])], [init("w", w), *params])


def raw_model(nodes, inits=(), opset=17, ir_version=8, domains=(), y=(1, 3, 8, 8), x=(1, 3, 8, 8)):
    """An unchecked model (the cases below are invalid on purpose)."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, list(x))],
                          [helper.make_tensor_value_info("y", F, list(y))], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]
                          + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = ir_version
    return m


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def external(model: onnx.ModelProto, name: str, location: str, folder: Path, data: bytes | None = None):
    """Point initializer ``name`` at external data ``location`` (writing ``data`` there when given)."""
    t = next(t for t in model.graph.initializer if t.name == name)
    raw = numpy_helper.to_array(t).astype("<f4").tobytes()
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = t.external_data.add()
        e.key, e.value = k, v
    if data is not None:
        (folder / location).write_bytes(data if data else raw)
    return raw


def digits(d: Path) -> Path:
    return Path(shutil.copy(DIGITS, d / "digits.onnx"))


def npz(d: Path, name: str, **arrays) -> Path:
    np.savez(d / name, **arrays)
    return d / name


def sample(n=8) -> np.ndarray:
    return np.load(DIGITS_SAMPLE)["input"][:n].copy()


# ----------------------------------------------------------------------------- the rows

@dataclass
class Row:
    id: str
    setup: Callable[[Path], list]      # builds the inputs in the folder, returns argv
    code: int
    mentions: str
    prog: str = "opt"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _file(name: str, data: bytes):
    def setup(d: Path):
        (d / name).write_bytes(data)
        return [d / name, "-p", "fold", "-o", d / "out.onnx"]
    return setup


def _model(model_fn, *extra, passes="fold,cleanup"):
    def setup(d: Path):
        path = save(model_fn(), d / "m.onnx")
        return [path, "-p", passes, "-o", d / "out.onnx", *extra]
    return setup


def _png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.onnx", DIGITS.read_bytes())
    return buf.getvalue()


def _fifo(d: Path):
    os.mkfifo(d / "pipe.onnx")
    return [d / "pipe.onnx", "-p", "fold", "-o", d / "out.onnx"]


W = init("w", np.ones((4, 3, 3, 3), np.float32))


def _cycle():
    #   x ─Add─ y        a ─Relu─ b ─Relu─ a   (the two Relus feed each other)
    return raw_model([helper.make_node("Relu", ["b"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
                      helper.make_node("Add", ["x", "b"], ["y"], name="add")])


def _ext_escape(location: str, link: bool = False):
    def setup(d: Path):
        model = conv_bn()
        if link:   # a data file in the folder that is a symbolic link to one outside it
            outside = d / "outside"
            outside.mkdir()
            (outside / "w.data").write_bytes(np.ones(108, "<f4").tobytes())
            os.symlink(outside / "w.data", d / "w.data")
        external(model, "w", location, d)
        return [save(model, d / "m.onnx"), "-p", "fold", "-o", d / "out.onnx"]
    return setup


def _ext(data_fn):
    def setup(d: Path):
        model = conv_bn()
        raw = external(model, "w", "w.data", d)
        data_fn(d, raw)
        return [save(model, d / "m.onnx"), "-p", "fold", "-o", d / "out.onnx"]
    return setup


def _lying_dims():
    #   the initializer says [4000, 3000, 3, 3] floats and holds 16 bytes
    m = conv_bn()
    t = next(t for t in m.graph.initializer if t.name == "w")
    del t.dims[:]
    t.dims.extend([4000, 3000, 3, 3])
    t.raw_data = b"\0" * 16
    return m


def _typed_short():
    m = conv_bn()
    t = next(t for t in m.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(t).reshape(-1)[:50]
    t.ClearField("raw_data")
    t.float_data.extend(values.tolist())
    return m


def _negative_dim():
    m = conv_bn()
    t = next(t for t in m.graph.initializer if t.name == "w")
    t.dims[0] = -4
    return m


def _nan_weight():
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0] = np.nan
    return conv_bn(w=w)


def _inf_weight():
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[2, 1, 0, 0] = np.inf
    return conv_bn(w=w)


def _calib(data_fn, passes="fold,quant"):
    def setup(d: Path):
        return [digits(d), "-p", passes, "--calib", data_fn(d), "-o", d / "out.onnx"]
    return setup


def _pickle_npz(d: Path):
    np.savez(d / "p.npz", input=np.array([{"x": 1}], dtype=object))
    return d / "p.npz"


def _raw_pickle(d: Path):
    import pickle
    (d / "p.npz").write_bytes(pickle.dumps({"input": [1, 2, 3]}))
    return d / "p.npz"


def _nan_at(i):
    def make(d: Path):
        x = np.load(DIGITS_SAMPLE)["input"][:40].copy()
        x[i, 0, 3, 3] = np.nan
        return npz(d, "c.npz", input=x)
    return make


def _shared_weight_bns():
    #   x ─Conv(w)─BN1─ a ─┐
    #   x ─Conv(w)─BN2─ b ─┴─Add─ y      w shared: fold skips both BNs (weight_shared)
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), bn_node("c1", "a", "bn1"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), bn_node("c2", "b", "bn2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])],
                      [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                       *bn_params(rng, 4, "bn1"), *bn_params(rng, 4, "bn2")])


def _opt(*args):
    def setup(d: Path):
        return [digits(d), "-p", "fold", *args]
    return setup


def _not_utf8():
    m = conv_bn()
    data = m.SerializeToString().replace(b"conv", b"co\xeev")   # the node's name, no longer UTF-8
    broken = onnx.ModelProto()
    broken.ParseFromString(data)
    return broken


def _int_bias():
    #   x ─Gemm(w, b:int32)─ y       Gemm's T binds float and int32: ORT refuses it
    m = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm")], [("x", [2, 3])], [("y", [2, 4])],
                   [init("w", np.ones((3, 4), np.float32)), init("b", np.ones(4, np.float32))])
    next(t for t in m.graph.initializer if t.name == "b").CopyFrom(init("b", np.ones(4, np.int32)))
    return m


def _with_group(m: onnx.ModelProto, group: int) -> onnx.ModelProto:
    """``m`` with its first Conv's group attribute set (onnx's checks let a contradicting one through)."""
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    attr = next((a for a in conv.attribute if a.name == "group"), None)
    if attr is None:
        conv.attribute.append(helper.make_attribute("group", group))
    else:
        attr.i = group
    return m


def _regrouped(d: Path) -> Path:
    """The quantized digits CNN with its first Conv's group attribute contradicting its weights."""
    return save(_with_group(onnx.load(str(_quantized(d))), 2), d / "regrouped.onnx")


def _quantized(d: Path) -> Path:
    qgraph.optimize(DIGITS, "fold,quant:sqnr=false", calib=DIGITS_SAMPLE, output=d / "q.onnx", calib_limit=16,
                    progress=False)
    return d / "q.onnx"


def _run(inputs_fn, *extra):
    def setup(d: Path):
        (d / "sub").mkdir()
        q = _quantized(d)
        return [q, "--inputs", inputs_fn(d), *extra]
    return setup


def _fp16_digits(d: Path) -> Path:
    m = onnx.load(str(DIGITS))
    for t in m.graph.initializer:
        if t.data_type == F:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.tensor_type.elem_type == F:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return save(m, d / "digits16.onnx")


ROWS = [
    # the model file
    Row("missing_file", lambda d: [d / "nope.onnx", "-p", "fold"], 2, "not found"),
    Row("empty_file", _file("empty.onnx", b""), 2, "empty"),
    Row("truncated_protobuf", _file("cut.onnx", DIGITS.read_bytes()[: len(DIGITS.read_bytes()) // 2]), 2, "onnx model"),
    Row("corrupt_protobuf", _file("noise.onnx", np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()),
        2, "onnx model"),
    Row("png_named_onnx", _file("image.onnx", _png()), 2, "onnx model"),
    Row("zip_named_onnx", _file("bundle.onnx", _zip()), 2, "onnx model"),
    Row("directory_as_model", lambda d: [d, "-p", "fold"], 2, "directory"),
    Row("fifo_as_model", _fifo, 2, "not a regular file"),
    # the graph
    Row("graph_cycle", _model(_cycle), 2, "cycle"),
    Row("dangling_input_name", _model(lambda: raw_model([helper.make_node("Relu", ["nope"], ["y"])])), 2, "'nope'"),
    Row("missing_initializer", _model(lambda: raw_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                                                        y=(1, 4, 6, 6))), 2, "'w'"),
    Row("duplicate_node_outputs", _model(lambda: raw_model([helper.make_node("Relu", ["x"], ["y"]),
                                                           helper.make_node("Sigmoid", ["x"], ["y"])])), 2, "'y'"),
    Row("string_not_utf8", _model(_not_utf8), 2, "not UTF-8"),
    Row("initializer_type_contradicts_op", _model(_int_bias), 2, "inconsistent type"),
    Row("conv_group_zero", _model(lambda: _with_group(conv_bn(), 0)), 2, "group must be a positive integer"),
    Row("conv_group_not_dividing", _model(lambda: _with_group(conv_bn(), 3)), 2, "group 3 does not divide"),
    Row("unknown_op", _model(lambda: raw_model([helper.make_node("Frobnicate", ["x"], ["y"])])), 2, "Frobnicate"),
    Row("unknown_domain_with_verify",
        _model(lambda: raw_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
                                 domains=["com.example"]), "--verify"), 2, "Frobnicate"),
    Row("opset_too_old_to_upgrade",
        _model(lambda: raw_model([helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0, bias=[0.0] * 3)], opset=8,
                                 ir_version=4)), 2, "ImageScaler exists in no opset"),
    Row("opset_too_new", _model(lambda: raw_model([helper.make_node("Relu", ["x"], ["y"])], opset=99)), 2, "opset 99"),
    Row("ir_version_too_new", _model(lambda: raw_model([helper.make_node("Relu", ["x"], ["y"])], ir_version=99)),
        2, "ir_version 99"),
    Row("dynamic_shapes_verify_without_data",
        _model(lambda: make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                                  [("x", ["N", "C", "H", "W"])], [("y", ["N", 4, "h", "w"])], [W]), "--verify"),
        2, "--verify cannot run the original model"),
    # declared sizes against the data
    Row("huge_dims_little_data", _model(_lying_dims), 2, "[4000, 3000, 3, 3]"),
    Row("typed_field_too_short", _model(_typed_short), 2, "holds 50"),
    Row("negative_dim", _model(_negative_dim), 2, "negative dim"),
    # external data
    Row("external_data_parent_escape", _ext_escape("../../etc/passwd"), 2, "leaves the model's folder"),
    Row("external_data_absolute_path", _ext_escape("/etc/passwd"), 2, "absolute path"),
    Row("external_data_symlink", _ext_escape("w.data", link=True), 2, "symbolic link"),
    Row("external_data_missing", _ext(lambda d, raw: None), 2, "not found"),
    Row("external_data_truncated", _ext(lambda d, raw: (d / "w.data").write_bytes(raw[:100])), 2, "truncated"),
    Row("external_data_is_a_folder", _ext(lambda d, raw: (d / "w.data").mkdir()), 2, "not a regular file"),
    # weights no model computes with
    Row("nan_weight", _model(_nan_weight, "--verify", "--report", "r.json"), 2, "NaN"),
    Row("inf_weight", _model(_inf_weight), 2, "infinite"),
    Row("bn_negative_variance", _model(lambda: conv_bn(var=[1, -2, 1, 1]), "--verify"), 2, "variance"),
    Row("bn_nan_variance", _model(lambda: conv_bn(var=[1, np.nan, 1, 1])), 2, "NaN"),
    Row("verify_reference_is_nan", _model(lambda: make_model([helper.make_node("Log", ["x"], ["y"])],
                                                             [("x", [2, 3])], [("y", [2, 3])]), "--verify",
                                          passes="cleanup"), 2, "NaN"),
    # calibration data
    Row("calib_pickled_npz", _calib(_pickle_npz), 2, "pickled"),
    Row("calib_raw_pickle", _calib(_raw_pickle), 2, "pickled"),
    Row("calib_wrong_keys", _calib(lambda d: npz(d, "c.npz", a=sample(), b=sample())), 2, "do not match"),
    Row("calib_wrong_shape", _calib(lambda d: npz(d, "c.npz", input=np.zeros((4, 1, 4, 4), np.float32))), 2, "shape"),
    Row("calib_wrong_dtype", _calib(lambda d: npz(d, "c.npz", input=sample().astype(np.float64))), 2, "float64"),
    Row("calib_all_nan", _calib(lambda d: npz(d, "c.npz", input=np.full((8, 1, 8, 8), np.nan, np.float32))), 2, "NaN"),
    Row("calib_inf", _calib(lambda d: npz(d, "c.npz", input=np.full((8, 1, 8, 8), np.inf, np.float32))), 2,
        "infinite"),
    Row("calib_nan_found_by_quant", _calib(_nan_at(33)), 2, "sample 33"),
    Row("calib_no_samples", _calib(lambda d: npz(d, "c.npz", input=np.zeros((0, 1, 8, 8), np.float32))), 2,
        "no samples"),
    Row("calib_a_device", _calib(lambda d: "/dev/null"), 2, "neither a file nor a folder"),
    Row("calib_not_a_zip", _calib(lambda d: _write(d / "c.npz", b"PK\x03\x04 not really")), 2, "cannot read"),
    Row("calib_float16_model", lambda d: [_fp16_digits(d), "-p", "fold,quant", "--calib",
                                          npz(d, "c16.npz", input=sample().astype(np.float16)), "-o", d / "o.onnx"],
        2, "float32"),
    # options and destinations
    Row("output_is_a_directory", lambda d: [digits(d), "-p", "fold", "-o", d], 2, "is a directory"),
    Row("output_folder_is_a_file", lambda d: [digits(d), "-p", "fold", "-o", d / "digits.onnx" / "out.onnx"], 2,
        "not a directory"),
    Row("output_folder_missing", _opt("-o", "no/such/out.onnx"), 2, "does not exist"),
    Row("output_in_proc", _opt("-o", "/proc/qgraph-out.onnx"), 2, "cannot write"),
    Row("report_in_proc_writes_no_model", _opt("-o", "out.onnx", "--report", "/proc/qgraph-r.json"), 2, "cannot write"),
    Row("report_is_the_output", _opt("-o", "out.onnx", "--report", "out.onnx"), 2, "same file"),
    Row("output_over_input", lambda d: [digits(d), "-p", "fold", "-o", d / "digits.onnx"], 2, "over the input"),
    Row("negative_tolerance", _opt("--tolerance", "-1"), 2, "tolerance"),
    Row("nan_tolerance", _opt("--tolerance", "nan"), 2, "tolerance"),
    Row("negative_seed", _opt("--seed", "-1"), 2, "seed"),
    Row("zero_calib_limit", _opt("--calib-limit", "0"), 2, "calib_limit"),
    Row("dump_dir_is_a_file", lambda d: [digits(d), "-p", "fold", "--dump-dir", d / "digits.onnx"], 2, "dump folder"),
    Row("dump_dir_in_proc", _opt("--dump-dir", "/proc/qgraph-dump"), 2, "dump folder"),
    Row("plots_dir_is_a_file", lambda d: [digits(d), "-p", "fold,equalize", "--plots", d / "digits.onnx"], 2,
        "plots folder"),
    Row("unknown_pass", _opt("-o", "x.onnx", "-p", "fodl"), 2, "did you mean 'fold'"),
    # a pass failing on valid input: exit 1
    Row("bn_left_by_fold", _model(_shared_weight_bns, passes="fold,equalize"), 1,
        "'fold' ran before this pass but left them (skipped: weight_shared=2)"),
    Row("pass_fails_verify", _opt("--verify", "--tolerance", "0", "--noise-factor", "0"), 1, "pass 'fold' failed"),
    # qgraph-run
    Row("run_wrong_shape", _run(lambda d: npz(d, "i.npz", input=np.zeros((3, 1, 4, 4), np.float32))), 2, "shape",
        prog="run"),
    Row("run_wrong_shape_compare_ort", _run(lambda d: npz(d, "i.npz", input=np.zeros((3, 1, 4, 4), np.float32)),
                                            "--compare-ort"), 2, "shape", prog="run"),
    Row("run_wrong_dtype", _run(lambda d: npz(d, "i.npz", input=sample().astype(np.float64))), 2, "float64", prog="run"),
    Row("run_pickled_inputs", _run(_pickle_npz), 2, "pickled", prog="run"),
    Row("run_nan_inputs", _run(lambda d: npz(d, "i.npz", input=np.full((2, 1, 8, 8), np.nan, np.float32))), 2, "NaN",
        prog="run"),
    Row("run_output_folder_missing", _run(lambda d: Path(DIGITS_SAMPLE), "--output", "no/o.npz"), 2, "does not exist",
        prog="run"),
    Row("run_output_in_proc", _run(lambda d: Path(DIGITS_SAMPLE), "--output", "/proc/o.npz"), 2, "cannot write",
        prog="run"),
    Row("run_output_is_a_directory", _run(lambda d: Path(DIGITS_SAMPLE), "--output", "sub"), 2, "directory",
        prog="run"),
    Row("run_conv_group_contradicts_weight", lambda d: [_regrouped(d), "--inputs", DIGITS_SAMPLE, "--limit", "4"], 2,
        "group=2", prog="run"),
    Row("run_model_is_garbage", lambda d: [_write(d / "g.onnx", b"\x08\x07junk"), "--inputs", DIGITS_SAMPLE], 2,
        "onnx model", prog="run"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_row(row: Row, sandbox: Path, capsys):
    argv = row.setup(sandbox)
    capsys.readouterr()
    before = snapshot(sandbox)
    code, out, err = invoke(row.prog, argv, capsys)
    # as a terminal shows it: a progress bar redraws with "\r" and erases itself when done
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    name = "qgraph-opt" if row.prog == "opt" else "qgraph-run"
    assert code == row.code, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith(f"{name}: error:"), lines[0]
    assert "Traceback" not in err and "internal error" not in err, err
    assert row.mentions.lower() in lines[0].lower(), lines[0]
    assert snapshot(sandbox) == before, "files were created, changed or left behind"
    assert os.listdir(tempfile.tempdir) == [], "temporary files left behind"


def test_debug_shows_the_traceback(sandbox, capsys):
    save(_nan_weight(), sandbox / "m.onnx")
    code, _, err = invoke("opt", ["m.onnx", "-p", "fold", "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "NaN" in err


# ----------------------------------------------------------------------------- reading nothing it must not read

def test_external_data_escapes_are_refused_before_any_byte_is_read(sandbox, capsys):
    """The refusal happens on the location alone: the audit hook sees no open() of the target."""
    opened: list[str] = []
    armed = [True]

    def hook(event, args):
        if armed[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(hook)       # hooks cannot be removed: this one is disarmed at the end
    try:
        for location, link in (("../../etc/passwd", False), ("/etc/passwd", False), ("w.data", True)):
            folder = sandbox / f"case{len(opened)}_{link}"
            folder.mkdir()
            argv = _ext_escape(location, link)(folder)
            opened.clear()
            code, _, err = invoke("opt", argv, capsys)
            assert code == 2, err
            read = [p for p in opened if p.endswith(("passwd", "w.data"))]
            assert read == [], f"{location}: opened {read}"
    finally:
        armed[0] = False


# ----------------------------------------------------------------------------- not errors: passes leave alone

def test_custom_domain_op_passes_through_untouched(sandbox, capsys):
    #   x ─Conv─ c ─BN─ b ─com.example:Frobnicate─ y      fold folds the BN, the custom op stays
    rng = np.random.default_rng(0)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "b"),
         helper.make_node("Frobnicate", ["b"], ["y"], name="frob", domain="com.example")], "g",
        [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
        [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), *bn_params(rng, 4)]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    save(model, sandbox / "m.onnx")
    code, _, err = invoke("opt", ["m.onnx", "-p", "fold,cleanup", "-o", "out.onnx", "-q"], capsys)
    assert code == 0, err
    ops = [(n.domain, n.op_type) for n in onnx.load("out.onnx").graph.node]
    assert ops == [("", "Conv"), ("com.example", "Frobnicate")]


def if_model(rng) -> onnx.ModelProto:
    #   x ─Conv(w0)─ c ─BN0─ t ─If(cond)─ y
    #                                 then: t ─Conv(w1)─BN1─       else: t ─Relu─
    def branch(name, nodes, inits, shape):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", F, shape)], inits)
    then = branch("then", [helper.make_node("Conv", ["t", "w1"], ["tc"], name="conv1"), bn_node("tc", "then_y", "bn1")],
                  [init("w1", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)), *bn_params(rng, 4, "bn1")], [1, 4, 6, 6])
    other = branch("else", [helper.make_node("Relu", ["t"], ["else_y"], name="relu")], [], [1, 4, 6, 6])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv0"), bn_node("c", "t", "bn0"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
                          [init("w0", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), *bn_params(rng, 4, "bn0")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_if_subgraphs_are_left_untouched_and_said_so(rng):
    """fold does not rewrite inside control flow: the branch's BN stays and the notes count the
    subgraphs it left; the top-level BN folds. Same outputs as the original on both branches
    (1e-5: fold's float32 re-association, see test_fold)."""
    model = if_model(rng)
    out, rep = qgraph.optimize(model, "fold", progress=False)
    notes = rep.rows[1]["notes"]
    assert notes["folded"] == 1 and notes["untouched_subgraphs"] == 2
    top = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in top
    branch = next(a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Conv", "BatchNormalization"]
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert rel_err(run_ort(model, feeds)[0], run_ort(out, feeds)[0]) <= 1e-5


def loop_model(rng) -> onnx.ModelProto:
    #   x ─Conv(w0)─BN0─ t ─Loop(M=2, v=t)─ y        body: v ─Conv(w1)─BN1─ v'   (w1, BN1 inside)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Conv", ["v_in", "w1"], ["vc"], name="conv1"), bn_node("vc", "v_out", "bn1")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", F, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", F, [1, 4, 6, 6])],
        [init("w1", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)), *bn_params(rng, 4, "bn1")])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv0"), bn_node("c", "t", "bn0"),
             helper.make_node("Loop", ["trips", "go", "t"], ["y"], name="loop", body=body)]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])],
                       [init("w0", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), *bn_params(rng, 4, "bn0"),
                        init("trips", np.array(2, np.int64)), init("go", np.array(True))])
    onnx.checker.check_model(model)
    return model


def test_loop_body_is_left_untouched_by_every_pass_and_said_so(rng):
    """fold, equalize and quant do not rewrite inside a Loop body: each one's notes count it, the
    body's Conv+BN come out as they went in (cleanup recurses into subgraphs, as graphsurgeon does,
    and says nothing). fold keeps the function (1e-5: fold's float32 re-association, see
    test_fold); with equalize and quant the result still runs in ORT."""
    model = loop_model(rng)
    body_of = lambda m: next(a.g for n in m.graph.node if n.op_type == "Loop" for a in n.attribute)  # noqa: E731
    calib = {"x": rng.normal(size=(8, 3, 8, 8)).astype(np.float32)}
    out, rep = qgraph.optimize(model, "fold,cleanup,equalize,quant", calib=calib, progress=False)
    assert [r["notes"].get("untouched_subgraphs") for r in rep.rows[1:]] == [1, None, 1, 1]
    assert [n.op_type for n in body_of(out).node if n.op_type != "Identity"] == ["Conv", "BatchNormalization"]
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(run_ort(out, {"x": x})[0]).all()
    folded, rep = qgraph.optimize(model, "fold", progress=False)
    assert rep.rows[1]["notes"]["folded"] == 1
    assert body_of(folded).SerializeToString() == body_of(model).SerializeToString()
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(folded, {"x": x})[0]) <= 1e-5


def test_initializer_shared_by_two_convs_is_not_half_rewritten(rng):
    #   x ─Conv(w)─BN1─ a ─┐
    #   x ─Conv(w)─BN2─ b ─┴─Add─ y      folding BN1 into w would change the other conv: both skip
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), bn_node("c1", "a", "bn1"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), bn_node("c2", "b", "bn2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])],
                       [init("w", w), *bn_params(rng, 4, "bn1"), *bn_params(rng, 4, "bn2")])
    out, rep = qgraph.optimize(model, "fold:forward=false,rest=affine,equalize", progress=False, verify=True)
    fold_notes, eq_notes = rep.rows[1]["notes"], rep.rows[2]["notes"]
    assert fold_notes["skipped"] == {"weight_shared": 2}
    assert not rep.rows[2]["modified"], eq_notes
    weights = [t for t in out.graph.initializer if t.name == "w"]
    assert len(weights) == 1 and np.array_equal(numpy_helper.to_array(weights[0]), w)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert rel_err(run_ort(model, {"x": x})[0], run_ort(out, {"x": x})[0]) <= 1e-5


def test_prune_couples_two_convs_sharing_a_weight(rng):
    #   x ─Conv(w)─Relu─ a ─Conv(v)─ d1 ─┐
    #   x ─Conv(w)─Relu─ b ─Conv(v)─ d2 ─┴─Add─ y     w shared: its channels go from both readers
    # together (one initializer, both convs read it), each reader of a/b loses the same inputs.
    # Without reconstruction the result equals the original with those channels of w zeroed
    # (Relu(0) = 0 reaches nothing): 1e-5 for float32 summation order.
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    v = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["a"]),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), helper.make_node("Relu", ["c2"], ["b"]),
             helper.make_node("Conv", ["a", "v"], ["d1"], name="conv3"),
             helper.make_node("Conv", ["b", "v"], ["d2"], name="conv4"),
             helper.make_node("Add", ["d1", "d2"], ["y"], name="add")]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])], [init("w", w), init("v", v)])
    out, rep = qgraph.optimize(model, "prune:ratio=0.5,criterion=l1,min_channels=1,round_to=1,reconstruct=false",
                               progress=False)
    assert rep.rows[1]["notes"]["groups"]["pruned"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    assert convs["conv1"].input[1] == convs["conv2"].input[1]
    kept_w = inits[convs["conv1"].input[1]]
    assert kept_w.shape == (4, 3, 3, 3)
    kept = [next(i for i in range(8) if np.array_equal(w[i], row)) for row in kept_w]
    for name in ("conv3", "conv4"):
        assert np.array_equal(inits[convs[name].input[1]], v[:, kept])
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    wz = np.zeros_like(w)
    wz[kept] = w[kept]
    zeroed.graph.initializer[0].CopyFrom(numpy_helper.from_array(wz, "w"))
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert rel_err(run_ort(zeroed, {"x": x})[0], run_ort(out, {"x": x})[0]) <= 1e-5


def test_dynamic_shapes_everywhere_fold_with_data(sandbox, capsys, rng):
    #   x[N, C, H, W] ─Conv─BN─ y[N, 4, h, w]: every dim symbolic; with data, verify runs on it
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")],
                       [("x", ["N", "C", "H", "W"])], [("y", ["N", 4, "h", "w"])],
                       [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), *bn_params(rng, 4)])
    save(model, sandbox / "m.onnx")
    npz(sandbox, "c.npz", x=rng.normal(size=(4, 3, 10, 9)).astype(np.float32))
    code, _, err = invoke("opt", ["m.onnx", "-p", "fold", "--calib", "c.npz", "--verify", "-o", "o.onnx", "-q"], capsys)
    assert code == 0, err
    assert [n.op_type for n in onnx.load("o.onnx").graph.node] == ["Conv"]


def test_huge_constant_of_shape_stays_a_node(sandbox, capsys):
    """A 196-byte model asking for a [400000, 100000] constant (149 GiB): load keeps the node (over
    the 64 MB expansion limit), cleanup does not evaluate it; the report says so, nothing grows."""
    shape = [400000, 100000]
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["c"], name="cos",
                              value=helper.make_tensor("v", F, [1], [1.0])),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    model = make_model(nodes, [("x", shape)], [("y", shape)], [init("s", np.array(shape, np.int64))])
    save(model, sandbox / "m.onnx")
    code, _, err = invoke("opt", ["m.onnx", "-p", "fold,cleanup", "-o", "o.onnx", "--report", "r.json", "-q"], capsys)
    assert code == 0, err
    rows = json.loads(Path("r.json").read_text())["passes"]
    assert rows[0]["notes"]["constants_not_expanded"] == 1
    assert rows[2]["notes"]["skipped"] == {"larger_than_max_folded_mb": 1}
    assert [n.op_type for n in onnx.load("o.onnx").graph.node] == ["ConstantOfShape", "Add"]
    assert Path("o.onnx").stat().st_size < 1000


def test_constant_expansion_limit_is_an_env_var(monkeypatch, rng):
    #   shape ─ConstantOfShape(0.5)─ w ─Conv─ y: expanded under the limit, kept over it
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], name="cos",
                              value=helper.make_tensor("v", F, [1], [0.5])),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])],
                       [init("shape", np.array([4, 3, 1, 1], np.int64))])
    assert [n.op for n in ir.load(model).nodes] == ["Conv"]
    monkeypatch.setenv("QGRAPH_MAX_CONSTANT_MB", "0.00001")   # 10 bytes < 48
    g = ir.load(model)
    assert [n.op for n in g.nodes] == ["ConstantOfShape", "Conv"] and ir.meta_of(g)["kept_constants"] == {"cos": 48}


# ----------------------------------------------------------------------------- verify and reports

def test_verify_fails_on_nan_output_whatever_the_tolerance(rng):
    from qgraph.instruments import Verify, VerifyError
    from qgraph.pipeline import Context, Pass, PassResult
    good = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])])
    bad = make_model([helper.make_node("Sqrt", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])])

    class Lossy(Pass):
        name, preserves_function = "lossy", False
    v = Verify(tolerance=1e9)
    v.start(None, good, Context())
    with pytest.raises(VerifyError, match="NaN"):
        v.after(1, Lossy(), None, bad, PassResult(True), 0.0, Context())


def test_report_json_is_standard_json_with_null_for_nan():
    from qgraph.instruments import Report
    rep = Report()
    rep.rows = [{"pass": "x", "notes": {"sqnr_db": float("inf"), "worst": [float("nan"), 1.0]}}]

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    data = json.loads(rep.to_json(), parse_constant=refuse)
    assert data["passes"][0]["notes"] == {"sqnr_db": None, "worst": [None, 1.0]}


def test_float16_model_folds_and_verifies_at_half_precision(sandbox, capsys):
    """fold on a float16 model moves outputs by an eps or two of float16 (measured 1.6 eps on the
    digits CNN): --verify holds it to 16 eps of float16 (see HALF_PRECISION_EPS), not float32's 1e-4."""
    path = _fp16_digits(sandbox)
    npz(sandbox, "c16.npz", input=sample(32).astype(np.float16))
    code, _, err = invoke("opt", [path, "-p", "fold,cleanup", "--calib", "c16.npz", "--verify", "-o", "o.onnx",
                                  "--report", "r.json", "-q"], capsys)
    assert code == 0, err
    verify = json.loads(Path("r.json").read_text())["passes"][1]["verify"]
    assert verify["tolerance"] == 16 * 2.0**-10
    assert 0 < max(o["max_rel"] for o in verify["outputs"].values()) <= verify["tolerance"]


def test_runtime_refusing_the_input_inside_a_pass_is_bad_input(monkeypatch):
    """quant needs ONNX Runtime; when ORT refuses the model quant got, the manager asks whether it
    refuses the *input* too: then the input is at fault (exit 2), else the passes before (exit 1)."""
    from qgraph import pipeline
    from qgraph.ops import OrtLoadError

    def refuse_all(model, **kw):
        raise OrtLoadError("ONNX Runtime cannot load the model: (test)")

    class NeedsOrt(pipeline.Pass):
        name = "needs_ort"

        def run(self, g, ctx):
            pipeline.ort_session(ir.to_model(g))
            return pipeline.PassResult(False)
    monkeypatch.setattr(pipeline, "ort_session", refuse_all)
    with pytest.raises(PassError) as info:
        qgraph.optimize(DIGITS, [NeedsOrt()], progress=False)
    assert isinstance(info.value, ModelError) and "refuses the input model too" in str(info.value)
    monkeypatch.setattr(pipeline, "_runtime_refuses", lambda original: False)
    with pytest.raises(PassError) as info:
        qgraph.optimize(DIGITS, [NeedsOrt()], progress=False)
    assert not isinstance(info.value, ModelError)


# ----------------------------------------------------------------------------- outputs

def test_outputs_get_the_umask_mode(sandbox, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = invoke("opt", [digits(sandbox), "-p", "fold", "-o", "o.onnx", "--report", "r.json", "-q"],
                              capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert oct(Path("o.onnx").stat().st_mode & 0o777) == oct(0o640)
    assert oct(Path("r.json").stat().st_mode & 0o777) == oct(0o640)


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    with modelfile.Outputs() as out:
        out.write_bytes(tmp_path / "a", b"1")
        out.write_bytes(tmp_path / "b", b"2")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
        out.commit()
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"
    with pytest.raises(RuntimeError):
        with modelfile.Outputs() as out:
            out.write_bytes(tmp_path / "c", b"3")
            raise RuntimeError("a failure before commit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ----------------------------------------------------------------------------- the Python API

@pytest.mark.parametrize("kwargs, error, mentions", [
    (dict(model=42), ModelError, "path or an onnx.ModelProto"),
    (dict(passes=None), OptionError, "no passes"),
    (dict(passes=42), OptionError, "passes must be"),
    (dict(tolerance="x"), OptionError, "tolerance"),
    (dict(seed=1.5), OptionError, "seed"),
    (dict(calib_limit=-3), OptionError, "calib_limit"),
    (dict(output=123), OptionError, "output must be a path"),
    (dict(output="/proc/qgraph.onnx"), ModelError, "cannot write"),
    (dict(calib="PICKLE"), ModelError, "pickled"),
    (dict(calib="NAN_AT_20"), ModelError, "sample 20"),
], ids=["model_42", "passes_none", "passes_42", "tolerance_str", "seed_float", "calib_limit", "output_int",
        "output_proc", "calib_pickle", "calib_nan_in_pass"])
def test_api_raises_only_qgraph_errors(tmp_path, kwargs, error, mentions):
    args = dict(model=DIGITS, passes="fold,quant:sqnr=false", calib=DIGITS_SAMPLE, progress=False)
    args.update(kwargs)
    if args["calib"] == "PICKLE":
        args["calib"] = _pickle_npz(tmp_path)
    elif args["calib"] == "NAN_AT_20":
        args["calib"] = _nan_at(20)(tmp_path)
    with pytest.raises(error, match=None) as info:
        qgraph.optimize(args.pop("model"), args.pop("passes"), **args)
    assert mentions in str(info.value) and "\n" not in str(info.value)


def test_bad_data_found_inside_a_pass_is_both_a_pass_error_and_a_model_error(tmp_path):
    with pytest.raises(PassError) as info:
        qgraph.optimize(DIGITS, "fold,quant:sqnr=false", calib=_nan_at(20)(tmp_path), progress=False)
    assert isinstance(info.value, ModelError) and info.value.pass_name == "quant"
    assert isinstance(info.value.__cause__, ModelError)


# ----------------------------------------------------------------------------- models over 2 GB

def gemm_bn_model(path: Path, layers: int, width: int, seed: int = 0) -> None:
    """x[N, width] ─(Gemm(W_i) ─BN─ Relu) x layers─ y, every weight written straight into the external
    data file ``<name>.data`` (the generator never holds more than one layer)."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits = [], []
    with open(path.parent / data_name, "wb") as f:
        cur = "x"
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(width))
            t = onnx.TensorProto(name=f"w{i}", data_type=F, dims=[width, width], data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(f.tell())), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            f.write(w.astype("<f4").tobytes())
            del w
            inits += [t, *bn_params(rng, width, f"bn{i}")]
            out = "y" if i == layers - 1 else f"r{i}"
            nodes += [helper.make_node("Gemm", [cur, f"w{i}"], [f"g{i}"], name=f"gemm{i}"),
                      bn_node(f"g{i}", f"n{i}", f"bn{i}"), helper.make_node("Relu", [f"n{i}"], [out], name=f"relu{i}")]
            cur = out
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", F, ["N", width])],
                          [helper.make_tensor_value_info("y", F, ["N", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())


def test_model_over_the_protobuf_limit_is_held_once(tmp_path, monkeypatch, rng):
    """The >2 GB path on a 4 MB model (the limit lowered; the code is the same): weights are
    memory-mapped at load, every pass's ModelProto is light (no weight bytes copied), the output is
    streamed with external data, the returned model refers to it, and ORT computes the same
    (1e-5: fold's float32 re-association)."""
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    src = tmp_path / "src"
    src.mkdir()
    gemm_bn_model(src / "m.onnx", layers=4, width=512)
    g = ir.load(src / "m.onnx")
    assert all(isinstance(ir.const(t), np.memmap) for t in ir.initializers(g) if t.name.startswith("w"))
    seen = []
    from qgraph.instruments import Report

    class Spy(Report):
        def after(self, index, p, g, model, result, seconds, ctx):
            seen.append(ir.is_light(model) and sum(len(t.raw_data) for t in model.graph.initializer))
            super().after(index, p, g, model, result, seconds, ctx)
    from qgraph.pipeline import Context, PassManager
    from qgraph.passes import build_passes
    manager = PassManager(build_passes("fold,cleanup"), [Spy()])
    manager.run(g, Context())
    assert seen and all(0 < n < 200_000 for n in seen), seen      # BN-free weights stay out of the protos
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result, rep = qgraph.optimize(src / "m.onnx", "fold,cleanup", output=out_dir / "o.onnx", verify=True,
                                  progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx", "o.onnx.data"]
    assert all(t.data_location == TensorProto.EXTERNAL for t in result.graph.initializer if t.name.startswith("w"))
    x = rng.normal(size=(3, 512)).astype(np.float32)
    import onnxruntime as ort
    ref = ort.InferenceSession(str(src / "m.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out_dir / "o.onnx")).run(None, {"x": x})[0]
    assert rel_err(ref, got) <= 1e-5


def test_output_never_replaces_the_inputs_external_data(tmp_path, monkeypatch):
    #   m.onnx keeps its weights in o.onnx.data: writing o.onnx beside it would replace them
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    gemm_bn_model(tmp_path / "m.onnx", layers=2, width=512)
    (tmp_path / "m.onnx.data").rename(tmp_path / "o.onnx.data")
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "o.onnx.data"
    save(m, tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(ModelError, match="external data over the input"):
        qgraph.optimize(tmp_path / "m.onnx", "fold", output=tmp_path / "o.onnx", progress=False)
    assert snapshot(tmp_path) == before


def only_with_slow(request, what: str) -> None:
    """Skip unless the run asked for slow tests (``-m slow`` or QGRAPH_SLOW=1)."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("QGRAPH_SLOW"):
        pytest.skip(f"{what}: use -m slow or QGRAPH_SLOW=1")


@pytest.mark.slow
def test_2_5_gb_model_loads_folds_and_saves_within_1_5x_its_size(tmp_path, request):
    """20 Gemm+BN layers of 5632x5632 float32 (2.54 GB) through `qgraph-opt -p fold` in a child
    process: peak RSS (ru_maxrss of a wrapper whose only child is qgraph-opt) <= 1.5x the model.
    Writes 5 GB to the temp folder and takes about a minute and a half."""
    only_with_slow(request, "2.5 GB model")
    from builders import qgraph_opt_cmd
    gemm_bn_model(tmp_path / "big.onnx", layers=20, width=5632)
    size = (tmp_path / "big.onnx").stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *qgraph_opt_cmd(), str(tmp_path / "big.onnx"), "-p", "fold",
                           "-o", str(out / "big.opt.onnx"), "-q"], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.strip().splitlines()[-1]) * 1024
    print(f"\n2.5 GB model: {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x")
    assert peak <= 1.5 * size
    assert sorted(p.name for p in out.iterdir()) == ["big.opt.onnx", "big.opt.onnx.data"]
    folded = onnx.load(str(out / "big.opt.onnx"), load_external_data=False)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}


# ----------------------------------------------------------------------------- small things a new user meets

def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"qgraph-opt {version('qgraph')}"


def test_explain_quant_does_not_send_quant_before_itself():
    from qgraph.cli import explain
    assert "before 'quant'" not in explain("quant")
    assert "run 'equalize' before 'quant'" in explain("equalize")


def test_script_beside_a_checkout_named_qgraph_gets_the_installed_package(tmp_path):
    """`import qgraph` from the folder holding a checkout named qgraph finds the checkout first; it
    then loads the installed package (or says plainly that there is none)."""
    os.symlink(ROOT, tmp_path / "qgraph")
    code = "import qgraph; print(qgraph.optimize.__module__, qgraph.passes.__name__)"
    proc = subprocess.run([sys.executable, "-c", "import qgraph.passes; " + code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["qgraph.api", "qgraph.passes"]
    bare = subprocess.run([sys.executable, "-S", "-c", "import qgraph"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)   # -S: no site-packages, so no installed qgraph
    assert bare.returncode != 0 and "no installed qgraph package" in bare.stderr


def test_slow_load_shows_a_progress_line(monkeypatch, capsys):
    monkeypatch.setattr(ir._load_bar, "DELAY", 0.0)
    ir.load(DIGITS, progress=True)
    assert "load" in capsys.readouterr().err
    ir.load(DIGITS, progress=False)
    assert capsys.readouterr().err == ""
