"""Fuzz qgraph-opt and qgraph-run with mutated models: seeded, bounded in count and time.

Each case takes one of the small checked-in models (``models/*.onnx``), applies one to three seeded
mutations (bytes: flipped bits, overwritten / cut / inserted / repeated ranges; protobuf: dims,
data types, raw data, op types and domains, node inputs and outputs, attributes, node order,
opsets, NaN/Inf weights, negative variances, hostile external-data locations, huge
ConstantOfShape, input shapes and types), and runs the command line on it in this process
(``qgraph.cli.main`` / ``run_main``, the console scripts' own code) with a random pipeline and
options. A case *fails* when:

- the exit code is not 0, 1 or 2, or a traceback or an "internal error" (an unexpected exception
  class) is printed, or an error is not exactly one line;
- an output (model, external data, report) exists after a non-zero exit, a temporary file is left
  beside the output or in the temp folder, or the input file changed.

A case running longer than ``--case-seconds`` is stopped and counted as a timeout (reported, not a
failure). Every failure prints its seed and case number and the command that rebuilds it:

    python tools/fuzz_cli.py --seed 0 --count 10000              # the recorded run
    python tools/fuzz_cli.py --seed 0 --case 1234 --keep /tmp/c  # rebuild case 1234 and show its command
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench_common import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits_cnn.onnx", "lenet5.onnx", "lenet_300_100.onnx")
PIPELINES = ("fold", "fold,cleanup", "cleanup", "fold,equalize", "fold,cleanup,equalize",
             "fold,quant:sqnr=false", "fold,equalize,quant:sqnr=false,granularity=tensor",
             "fold,quant:weight_only=true,sqnr=false")
OPS = ("Relu", "Conv", "Gemm", "BatchNormalization", "Add", "Mul", "MatMul", "Identity", "Flatten", "Reshape",
       "QuantizeLinear", "DequantizeLinear", "If", "Loop", "Frobnicate", "Softmax", "Concat", "ConstantOfShape")


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


@dataclass
class Case:
    index: int
    prog: str
    base: str
    mutations: list[str]
    argv: list[str]
    model: Path
    outputs: list[Path]


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    pass_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- mutations

def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["flip", "overwrite", "truncate", "insert", "repeat", "zero"])
    at = int(rng.integers(0, len(b)))
    n = int(rng.integers(1, 64))
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "overwrite":
        b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == "truncate":
        b = b[:at]
    elif kind == "insert":
        b[at:at] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == "repeat":
        b[at:at] = b[at:at + n]
    else:
        b[at:at + n] = bytes(min(n, len(b) - at))
    return bytes(b), f"bytes:{kind}@{at}"


def _pick(rng, seq):
    return seq[int(rng.integers(0, len(seq)))] if len(seq) else None


def _float_inits(m):
    return [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims]


def mutate_proto(m: onnx.ModelProto, rng: np.random.Generator, folder: Path) -> str:
    """Mutate ``m`` in place; return what was done."""
    g = m.graph
    kind = _pick(rng, ["dims", "raw_data", "data_type", "op_type", "domain", "dangling_input", "rewire_input",
                       "duplicate_output", "remove_node", "duplicate_node", "swap_nodes", "remove_initializer",
                       "attribute", "opset", "ir_version", "nan_weight", "inf_weight", "negative_variance",
                       "external_escape", "external_lie", "huge_constant", "input_shape", "input_type",
                       "value_info", "drop_output",
                       # valid but unusual: these reach the passes
                       "scale_weight", "scale_weight", "zero_variance", "symbolic_dims", "share_weight"])
    node = _pick(rng, g.node)
    t = _pick(rng, list(g.initializer))
    if kind == "dims" and t is not None and t.dims:
        i = int(rng.integers(0, len(t.dims)))
        t.dims[i] = int(_pick(rng, [0, -1, 1, t.dims[i] + 1, t.dims[i] * 2, 2**31, 2**40]))
    elif kind == "raw_data" and t is not None and t.raw_data:
        cut = int(rng.integers(0, len(t.raw_data)))
        t.raw_data = t.raw_data[:cut] if rng.random() < 0.5 else t.raw_data + t.raw_data[:cut]
    elif kind == "data_type" and t is not None:
        t.data_type = int(_pick(rng, [0, 2, 3, 6, 7, 8, 10, 11, 16, 21, 22, 99]))
    elif kind == "op_type" and node is not None:
        node.op_type = _pick(rng, OPS)
    elif kind == "domain" and node is not None:
        node.domain = _pick(rng, ["com.example", "com.microsoft", "ai.onnx.ml", "bogus"])
    elif kind == "dangling_input" and node is not None and node.input:
        node.input[int(rng.integers(0, len(node.input)))] = "no_such_tensor"
    elif kind == "rewire_input" and node is not None and node.input:
        names = [o for n in g.node for o in n.output] + [i.name for i in g.input]
        node.input[int(rng.integers(0, len(node.input)))] = _pick(rng, names)   # may make a cycle
    elif kind == "duplicate_output" and len(g.node) > 1:
        a, b = rng.choice(len(g.node), 2, replace=False)
        g.node[int(a)].output[0] = g.node[int(b)].output[0]
    elif kind == "remove_node" and node is not None:
        g.node.remove(node)
    elif kind == "duplicate_node" and node is not None:
        g.node.append(node)
    elif kind == "swap_nodes" and len(g.node) > 1:
        a, b = sorted(int(x) for x in rng.choice(len(g.node), 2, replace=False))
        na, nb = onnx.NodeProto(), onnx.NodeProto()
        na.CopyFrom(g.node[a])
        nb.CopyFrom(g.node[b])
        g.node[a].CopyFrom(nb)
        g.node[b].CopyFrom(na)
    elif kind == "remove_initializer" and t is not None:
        g.initializer.remove(t)
    elif kind == "attribute" and node is not None and node.attribute:
        a = _pick(rng, node.attribute)
        if a.type == onnx.AttributeProto.INT:
            a.i = int(_pick(rng, [-1, 0, 2, 3, 1000, 2**40]))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(_pick(rng, [-1.0, 0.0, 1e30, float("nan"), float("inf")]))
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[int(rng.integers(0, len(a.ints)))] = int(_pick(rng, [-5, 0, 7, 10**6]))
        else:
            node.attribute.remove(a)
    elif kind == "opset":
        m.opset_import[0].version = int(_pick(rng, [1, 6, 9, 11, 12, 13, 19, 21, 27, 99]))
    elif kind == "ir_version":
        m.ir_version = int(_pick(rng, [0, 1, 3, 7, 10, 99]))
    elif kind in ("nan_weight", "inf_weight") and _float_inits(m):
        t = _pick(rng, _float_inits(m))
        a = numpy_helper.to_array(t).copy()
        a.reshape(-1)[int(rng.integers(0, a.size))] = np.nan if kind == "nan_weight" else -np.inf
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    elif kind == "negative_variance":
        bns = [n for n in g.node if n.op_type == "BatchNormalization" and len(n.input) >= 5]
        if bns:
            name = _pick(rng, bns).input[4]
            v = next((x for x in g.initializer if x.name == name), None)
            if v is not None:
                a = numpy_helper.to_array(v).copy()
                a.reshape(-1)[0] = -abs(float(rng.normal())) - 1
                v.CopyFrom(numpy_helper.from_array(a, v.name))
    elif kind in ("external_escape", "external_lie") and _float_inits(m):
        t = _pick(rng, _float_inits(m))
        raw = numpy_helper.to_array(t).astype("<f4").tobytes()
        if kind == "external_escape":
            location = _pick(rng, ["../../etc/passwd", "/etc/passwd", "link.data", "../outside.data", "sub/../../x"])
            if location == "link.data" and not (folder / "link.data").exists():
                os.symlink("/etc/hostname", folder / "link.data")
        else:
            location = "w.data"
            (folder / location).write_bytes(raw[: int(rng.integers(0, len(raw) + 1))])
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(int(_pick(rng, [0, 0, 8, 2**40])))),
                     ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
    elif kind == "huge_constant":   # on the side, kept alive by a new graph output
        # 149 GiB (the allocation fails at once) or 1.2 MB: never one that a shared machine would grant
        shape = numpy_helper.from_array(np.array([_pick(rng, [400000, 3]), 100000], np.int64),
                                        "huge_shape")
        g.initializer.append(shape)
        g.node.insert(0, helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"], name="huge",
                                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])))
        g.node.insert(1, helper.make_node("ReduceSum", ["huge"], ["huge_sum"], name="huge_sum", keepdims=0))
        g.output.append(helper.make_tensor_value_info("huge_sum", TensorProto.FLOAT, []))
    elif kind == "input_shape" and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            d = dims[int(rng.integers(0, len(dims)))]
            if rng.random() < 0.5:
                d.dim_value = int(_pick(rng, [0, 1, 3, 10**6]))
            else:
                d.dim_param = "sym"
    elif kind == "input_type" and g.input:
        g.input[0].type.tensor_type.elem_type = int(_pick(rng, [2, 6, 7, 10, 11]))
    elif kind == "value_info":
        g.value_info.append(helper.make_tensor_value_info(_pick(rng, [n.output[0] for n in g.node]) or "z",
                                                          int(_pick(rng, [1, 6, 10])), [7, 7]))
    elif kind == "scale_weight" and _float_inits(m):
        t = _pick(rng, _float_inits(m))
        with np.errstate(over="ignore"):   # 1e30 x a weight may overflow to inf: that is the mutation
            a = numpy_helper.to_array(t).astype(np.float32) * np.float32(_pick(rng, [0.0, -1.0, 1e-30, 1e-42, 1e20, 1e30]))
        t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    elif kind == "zero_variance":
        names = [n.input[4] for n in g.node if n.op_type == "BatchNormalization" and len(n.input) >= 5]
        v = next((x for x in g.initializer if names and x.name == _pick(rng, names)), None)
        if v is not None:
            v.CopyFrom(numpy_helper.from_array(np.zeros(tuple(v.dims), np.float32), v.name))
    elif kind == "symbolic_dims" and g.input:
        for d in g.input[0].type.tensor_type.shape.dim:
            d.dim_param = "d"
    elif kind == "share_weight":
        layers = [n for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1]
        inits = {t.name: tuple(t.dims) for t in g.initializer}
        pairs = [(a, b) for a in layers for b in layers if a is not b and inits.get(a.input[1]) is not None
                 and inits.get(a.input[1]) == inits.get(b.input[1])]
        if pairs:
            a, b = _pick(rng, pairs)
            b.input[1] = a.input[1]
        else:
            return mutate_proto(m, rng, folder)
    elif kind == "drop_output" and len(g.output) > 0:
        g.output[0].name = "renamed_output"
    else:
        return mutate_proto(m, rng, folder) if rng.random() < 0.9 else "none"
    return f"proto:{kind}"


# ----------------------------------------------------------------------------- cases

def calib_file(base: str, folder: Path) -> Path:
    """Seeded calibration samples of the right shape for a base model (the digits' own for digits)."""
    path = folder / f"{base}.calib.npz"
    if not path.exists():
        if base == "digits_cnn":
            x = np.load(ROOT / "models" / "digits_sample.npz")["input"][:32]
        else:
            x = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
        np.savez(path, input=x)
    return path


def quantized_digits(folder: Path) -> Path:
    path = folder / "digits_q.onnx"
    if not path.exists():
        import qgraph
        qgraph.optimize(ROOT / "models" / "digits_cnn.onnx", "fold,quant:sqnr=false",
                        calib=ROOT / "models" / "digits_sample.npz", calib_limit=32, output=path, progress=False)
    return path


def make_case(seed: int, index: int, work: Path, shared: Path) -> Case:
    rng = np.random.default_rng([seed, index])
    folder = work / f"case{index}"
    folder.mkdir(parents=True)
    prog = "run" if rng.random() < 0.15 else "opt"
    base = "digits_q" if prog == "run" else _pick(rng, [m[:-5] for m in MODELS])
    src = quantized_digits(shared) if prog == "run" else ROOT / "models" / f"{base}.onnx"
    data = src.read_bytes()
    mutations = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.35:
            data, what = mutate_bytes(data, rng)
        else:
            m = onnx.ModelProto()
            try:
                m.ParseFromString(data)
            except Exception:
                data, what = mutate_bytes(data, rng)
                mutations.append(what)
                continue
            try:
                what = mutate_proto(m, rng, folder)
                data = m.SerializeToString()
            except Exception:          # an earlier mutation left something this one cannot read
                data, what = mutate_bytes(data, rng)
        mutations.append(what)
    model = folder / "model.onnx"
    model.write_bytes(data)
    out = folder / "out"
    out.mkdir()
    if prog == "run":
        argv = [str(model), "--inputs", str(calib_file("digits_cnn", shared)), "--limit", "8"]
        outputs = []
        if rng.random() < 0.5:
            argv.append("--compare-ort")
        if rng.random() < 0.3:
            outputs.append(out / "o.npz")
            argv += ["--output", str(outputs[-1])]
        return Case(index, prog, base, mutations, argv, model, outputs)
    passes = _pick(rng, PIPELINES)
    outputs = [out / "o.onnx", out / "o.onnx.data"]
    argv = [str(model), "-p", passes, "-o", str(outputs[0]), "-q"]
    if "quant" in passes or rng.random() < 0.3:
        argv += ["--calib", str(calib_file(base, shared)), "--calib-limit", "16"]
    if rng.random() < 0.4:
        argv.append("--verify")
    if rng.random() < 0.3:
        outputs.append(out / "r.json")
        argv += ["--report", str(outputs[-1])]
    return Case(index, prog, base, mutations, argv, model, outputs)


def run_case(case: Case, seconds: float) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stderr, stdout) of one in-process run; stderr includes what C++
    code (ONNX Runtime, onnx) wrote to file descriptor 2, as a terminal would show it."""
    from qgraph.cli import main, run_main
    err, out = io.StringIO(), io.StringIO()
    c_err = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(c_err.fileno(), 2)

    def alarm(signum, frame):
        raise CaseTimeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = (main if case.prog == "opt" else run_main)(case.argv)
    except CaseTimeout:
        code = None
    except SystemExit as exc:      # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:   # anything escaping the CLI's guard is a crash
        import traceback
        code = -1
        err.write("Traceback (escaped the CLI):\n" + "".join(traceback.format_exception(exc)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    c_err.seek(0)
    native = c_err.read().decode(errors="replace")
    c_err.close()
    return code, native + err.getvalue(), out.getvalue()


def check(case: Case, code: int | None, err: str, before: str, systmp: Path) -> list[str]:
    problems = []
    name = "qgraph-opt" if case.prog == "opt" else "qgraph-run"
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if code is not None:
        if code not in (0, 1, 2):
            problems.append(f"exit code {code}")
        if "Traceback" in err:
            problems.append("traceback printed")
        if "internal error" in err:
            problems.append("internal error: " + next((ln for ln in lines if "internal error" in ln), ""))
        # qgraph-run --compare-ort's exit 1 ("N of M outputs differ ...") is a finding, not an error
        prefix = f"{name}:" if (case.prog == "run" and code == 1) else f"{name}: error:"
        if code in (1, 2) and (len(lines) != 1 or not lines[0].startswith(prefix)):
            problems.append(f"error is not one line: {lines[:3]}")
        # qgraph-run writes --output whenever its run completed, also when --compare-ort then finds
        # a difference (exit 1): the outputs are whole, and what one inspects next
        verdict = case.prog == "run" and code == 1 and "differ from ONNX Runtime" in err
        if code != 0 and not verdict:
            left = [p.name for p in case.outputs if p.exists()]
            if left:
                problems.append(f"partial output after exit {code}: {left}")
    leftovers = [p.name for p in case.model.parent.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".qgraph")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    if any(systmp.iterdir()):
        problems.append(f"temp folder not empty: {[p.name for p in systmp.iterdir()]}")
        for p in systmp.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if hashlib.sha256(case.model.read_bytes()).hexdigest() != before:
        problems.append("input model changed")
    return problems


def fuzz(seed: int, count: int, *, case_seconds: float = 30.0, budget: float | None = None,
         only: int | None = None, keep: Path | None = None, quiet: bool = False) -> Tally:
    """Run ``count`` cases (or case ``only``); return the tally. Failures are printed as they happen."""
    tally = Tally()
    root = Path(tempfile.mkdtemp(prefix="qgraph-fuzz-")) if keep is None else keep
    shared = root / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    systmp = root / "systmp"
    systmp.mkdir(exist_ok=True)
    saved_tmp = tempfile.tempdir
    start = time.perf_counter()
    try:
        indices = [only] if only is not None else range(count)
        for done, i in enumerate(indices):
            if budget is not None and time.perf_counter() - start > budget:
                if not quiet:
                    print(f"time budget of {budget:.0f} s reached after {done} cases")
                break
            case = make_case(seed, i, root / "cases", shared)
            before = hashlib.sha256(case.model.read_bytes()).hexdigest()
            tempfile.tempdir = str(systmp)
            try:
                code, err, out = run_case(case, case_seconds)
            finally:
                tempfile.tempdir = saved_tmp
            problems = check(case, code, err, before, systmp)
            tally.codes["timeout" if code is None else code] += 1
            tally.mutations.update(m.split("@")[0] for m in case.mutations)
            if code is None:
                tally.timeouts.append(i)
            elif code != 0:
                line = next((ln for ln in reversed(err.splitlines()) if "error:" in ln),
                            next((ln for ln in reversed(err.splitlines()) if ln.strip()), ""))
                tally.messages[" ".join(line.split(":", 3)[-1].split()[:5])] += 1
                if code == 1:
                    tally.pass_failures.append(f"case {i} ({', '.join(case.mutations)}): {line[:200]}")
            if only is not None:
                prog = "qgraph-opt" if case.prog == "opt" else "qgraph-run"
                print(f"case {i} ({case.base}; {', '.join(case.mutations)}): exit {code}")
                print(f"  {prog} " + " ".join(case.argv))
                print("  " + (err.strip() or "(no error)").replace("\n", "\n  "))
            if problems:
                msg = (f"FAIL seed {seed} case {i} ({case.base}; {', '.join(case.mutations)}): {'; '.join(problems)}\n"
                       f"  reproduce: python tools/fuzz_cli.py --seed {seed} --case {i} --keep /tmp/qgraph-case")
                tally.failures.append(msg)
                print(msg, flush=True)
            if keep is None:
                shutil.rmtree(case.model.parent, ignore_errors=True)
            if not quiet and (done + 1) % 500 == 0:
                print(f"{done + 1} cases, {time.perf_counter() - start:.0f} s, failures {len(tally.failures)}, "
                      f"exit codes {dict(tally.codes)}", flush=True)
    finally:
        tempfile.tempdir = saved_tmp
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    tally.seconds = time.perf_counter() - start
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=200, help="number of cases (default 200)")
    p.add_argument("--case", type=int, help="run only this case (with --keep to look at its files)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep the cases")
    p.add_argument("--case-seconds", type=float, default=30.0, help="stop a case after this long (a timeout)")
    p.add_argument("--budget", type=float, help="stop after this many seconds in all")
    p.add_argument("--max-memory-gb", type=float, default=12.0,
                   help="address-space limit for this process (a case allocating more fails with MemoryError)")
    args = p.parse_args(argv)
    if args.max_memory_gb:
        lim = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import qgraph  # noqa: F401  (import outside the timed cases)
    print(f"fuzz_cli: seed {args.seed}, {args.count if args.case is None else 1} cases, CPU {cpu_model()}, "
          f"python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}", flush=True)
    tally = fuzz(args.seed, args.count, case_seconds=args.case_seconds, budget=args.budget, only=args.case,
                 keep=args.keep)
    n = sum(tally.codes.values())
    print(f"\n{n} cases in {tally.seconds:.0f} s: exit codes {dict(sorted(tally.codes.items(), key=str))}; "
          f"{len(tally.failures)} failures; {len(tally.timeouts)} timeouts {tally.timeouts[:10]}")
    print("most frequent errors:")
    for msg, k in tally.messages.most_common(12):
        print(f"  {k:6d}  {msg}")
    print("exit 1 (a pass failed, or qgraph-run differs from ORT), first ones:")
    for line in tally.pass_failures[:12]:
        print("  " + line)
    print("mutations:", ", ".join(f"{k} {v}" for k, v in sorted(tally.mutations.items())))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
