"""Benchmark qgraph's integer kernels against ONNX Runtime in one run, one thread each.

    python tools/bench_kernels.py [--quick] [--batches 1,8] [--model QDQ.onnx --inputs x.npz] [--json out.json]
                                  [--isa native|avx2]

Sections (every figure is a ratio against ORT measured in the same process, same shapes):
  gemm   int8 GEMM C[M,N] = A[M,K] B[K,N] (256^3, 512^3, 1024^3 and im2col shapes of MobileNetV2
         layers) vs ORT MatMulInteger, s8s8 and u8s8 (ORT's fastest path; ours is one kernel for both:
         AMX tiles when the CPU and OS allow them, else AVX-512 VNNI; QGRAPH_NO_AMX=1 forces the latter)
  conv   QLinearConv layers of MobileNetV2 (224x224 input, s8s8) vs ORT QLinearConv
  model  whole-model latency of a QDQ model vs ORT on the same model, at each --batches size: by default
         MobileNetV2 and EfficientNet-Lite0 quantized s8s8 by qgraph (tools/runtime_zoo.py, cached),
         on evaluation images of the zoo; digits_cnn (ORT's quantize_static, after fold) when the zoo
         is absent; or --model with --inputs. Ours and ORT alternate, best of each.
  jit    start-up of the runtime in a fresh process: cold (empty Numba cache) and warm (cache filled)
Best of N repetitions after a warm-up; GOP/s counts 2*M*N*K. The header names the CPU, its int8 ISA
(AVX2, AVX-512BW, AVX-512 VNNI, AVX-VNNI, AMX-INT8, VPOPCNTDQ), our GEMM kernel and the path ORT's
u8s8 kernels take (``qgraph.kernels.cpu``).

``--isa avx2`` reruns the benchmark with our kernels compiled for Haswell (NUMBA_CPU_NAME /
NUMBA_CPU_FEATURES: AVX2 + FMA, no AVX-512), so the AVX2 kernel's own GOP/s are what an AVX2 CPU of
this clock would run. ONNX Runtime picks its kernels by cpuid and cannot be held to AVX2 the same way:
its figures stay those of this CPU's own path, which the header names.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench_common import cpu_flags, cpu_model, one_thread_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (name, M = OH*OW, K = Cin*KH*KW, N = Cout): pointwise and full convs of MobileNetV2 at 224x224
IM2COL = [("mbv2 stem 3x3", 112 * 112, 27, 32), ("mbv2 pw 16->96", 112 * 112, 16, 96),
          ("mbv2 pw 144->24", 56 * 56, 144, 24), ("mbv2 pw 192->64", 28 * 28, 192, 64),
          ("mbv2 pw 576->160", 7 * 7 * 4, 576, 160), ("mbv2 pw 320->1280", 7 * 7, 320, 1280)]
# (name, Cin, H, Cout, k, stride, group) for QLinearConv layers of MobileNetV2
CONVS = [("stem 3x3 s2", 3, 224, 32, 3, 2, 1), ("dw 3x3 32", 32, 112, 32, 3, 1, 32),
         ("pw 32->16", 32, 112, 16, 1, 1, 1), ("pw 16->96", 16, 112, 96, 1, 1, 1),
         ("dw 3x3 s2 96", 96, 112, 96, 3, 2, 96), ("pw 144->24", 144, 56, 24, 1, 1, 1),
         ("pw 192->64", 192, 28, 64, 1, 1, 1), ("dw 3x3 384", 384, 14, 384, 3, 1, 384),
         ("pw 960->320", 960, 7, 320, 1, 1, 1), ("pw 320->1280", 320, 7, 1280, 1, 1, 1)]


def best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _model(nodes, inputs, outputs, inits, opset=19):
    g = helper.make_graph(nodes, "bench", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def bench_gemm(quick: bool) -> list[dict]:
    from qgraph.kernels.gemm import pack_b, qgemm
    rng = np.random.default_rng(0)
    shapes = [(f"{s}^3", s, s, s) for s in ((256, 512) if quick else (256, 512, 1024))] + \
        (IM2COL[:3] if quick else IM2COL)
    rows = []
    for name, m, k, n in shapes:
        b = rng.integers(-128, 128, (k, n)).astype(np.int8)
        pb = pack_b(b)
        ops = 2.0 * m * n * k
        row = {"shape": name, "M": m, "K": k, "N": n}
        for a_t, onnx_t in (("s8", TensorProto.INT8), ("u8", TensorProto.UINT8)):
            a = (rng.integers(-128, 128, (m, k)).astype(np.int8) if a_t == "s8"
                 else rng.integers(0, 256, (m, k)).astype(np.uint8))
            sess = one_thread_session(_model([helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
                                  [helper.make_tensor_value_info("a", onnx_t, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                                  [numpy_helper.from_array(b, "b")]))
            reps = 3 if ops > 1e9 else 7
            t_ort = best_of(lambda: sess.run(None, {"a": a}), reps)
            t_ours = best_of(lambda: qgemm(a, 0, pb, 0), reps)
            row[f"ort_{a_t}s8_gops"] = ops / t_ort / 1e9
            row[f"ours_{a_t}s8_gops"] = ops / t_ours / 1e9
        row["ratio_s8s8"] = row["ours_s8s8_gops"] / row["ort_s8s8_gops"]
        row["ratio_vs_ort_u8s8"] = row["ours_s8s8_gops"] / row["ort_u8s8_gops"]
        rows.append(row)
        print(f"  gemm {name:<20} ours s8s8 {row['ours_s8s8_gops']:7.1f} GOP/s (u8s8 {row['ours_u8s8_gops']:6.1f}) | "
              f"ORT s8s8 {row['ort_s8s8_gops']:7.1f} "
              f"(x{row['ratio_s8s8']:.2f}) | ORT u8s8 {row['ort_u8s8_gops']:7.1f} (x{row['ratio_vs_ort_u8s8']:.2f})",
              flush=True)
    return rows


def bench_conv(quick: bool) -> list[dict]:
    from qgraph.kernels import lower, run
    rng = np.random.default_rng(1)
    rows = []
    for name, cin, h, cout, k, s, g in (CONVS[:4] if quick else CONVS):
        w = rng.integers(-127, 128, (cout, cin // g, k, k)).astype(np.int8)
        x = rng.integers(-128, 128, (1, cin, h, h)).astype(np.int8)
        consts = {"sx": np.float32(0.02), "zx": np.int8(0), "w": w, "sw": np.full(cout, 0.01, np.float32),
                  "zw": np.zeros(cout, np.int8), "sy": np.float32(0.02 * 0.01 * 40 * np.sqrt(cin // g * k * k)),
                  "zy": np.int8(0), "b": rng.integers(-500, 500, cout).astype(np.int32)}
        node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"],
                                group=g, strides=[s, s], pads=[k // 2] * 4)
        model = _model([node], [helper.make_tensor_value_info("x", TensorProto.INT8, list(x.shape))],
                       [helper.make_tensor_value_info("y", TensorProto.INT8, [None] * 4)],
                       [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
        sess, prog = one_thread_session(model), lower(model)
        exact = bool((run(prog, {"x": x})["y"] == sess.run(None, {"x": x})[0]).all())
        t_ort = best_of(lambda: sess.run(None, {"x": x}), 5)
        t_ours = best_of(lambda: run(prog, {"x": x}), 5)
        rows.append({"layer": name, "ours_ms": t_ours * 1e3, "ort_ms": t_ort * 1e3,
                     "ratio": t_ours / t_ort, "bit_exact": exact})
        print(f"  conv {name:<14} ours {t_ours * 1e3:7.2f} ms | ORT {t_ort * 1e3:7.2f} ms | "
              f"ours/ORT x{t_ours / t_ort:.2f} | bit-exact {exact}", flush=True)
    return rows


def digits_qdq(tmp: Path) -> tuple[Path, dict]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from qgraph.api import optimize
    data = np.load(ROOT / "models" / "digits_sample.npz")
    folded, _ = optimize(str(ROOT / "models" / "digits_cnn.onnx"), "fold", progress=False)
    onnx.save(folded, tmp / "fold.onnx")
    feeds = iter([{"input": data["input"][i:i + 60]} for i in range(0, 360, 60)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(str(tmp / "fold.onnx"), str(tmp / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return tmp / "qdq.onnx", {"input": data["input"]}


ZOO_MODELS = ("mobilenet_v2", "efficientnet_lite0")


def zoo_models(batches: list[int]) -> list[tuple[str, Path, dict]]:
    """(label, s8s8 QDQ model, feeds) per zoo model and batch size; models whose zoo data is absent
    are reported and left out."""
    sys.path.insert(0, str(ROOT / "tools"))
    from runtime_zoo import qdq_model
    from zoo_data import zoo_split
    out = []
    for name in ZOO_MODELS:
        try:
            path = qdq_model(name)
            feeds = next(zoo_split(name)[1].batches(max(batches)))
        except Exception as exc:  # noqa: BLE001 - any missing piece of the zoo: say so, go on
            print(f"  model {name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            continue
        out += [(f"{name} batch {b}", path, {k: v[:b] for k, v in feeds.items()}) for b in batches]
    return out


def best_pair(fa, fb, reps: int) -> tuple[float, float]:
    """Best time of each of two functions, run alternately (a noisy shared machine slows both alike)."""
    fa(), fb()
    ta = tb = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta = min(ta, time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb = min(tb, time.perf_counter() - t)
    return ta, tb


def bench_model(label: str, path: Path, feeds: dict, reps: int = 10) -> dict:
    from qgraph.kernels import lower, run
    from qgraph.kernels.diff import against_ort
    model = onnx.load(path)
    sess, prog = one_thread_session(model), lower(model)
    figures, _, _ = against_ort(model, feeds, "float", prog)
    t_ours, t_ort = best_pair(lambda: run(prog, feeds), lambda: sess.run(None, feeds), reps)
    row = {"model": label, "path": str(path), "ours_ms": t_ours * 1e3, "ort_ms": t_ort * 1e3,
           "ratio": t_ours / t_ort, "diff": figures}
    exact = min(f.get("exact", 0.0) for f in figures.values())
    worst = max(f.get("max_lsb", -1) for f in figures.values())
    print(f"  model {label:<28} ours {t_ours * 1e3:8.2f} ms | ORT {t_ort * 1e3:8.2f} ms | ours/ORT x{row['ratio']:.2f}"
          f" | float mode {100 * exact:.4f}% bit-exact, max {worst} LSB", flush=True)
    return row


def bench_jit(path: Path, npz: Path) -> dict:
    code = ("import time; t=time.perf_counter(); import numpy as np; from qgraph.kernels import run; "
            f"d=np.load({str(npz)!r}); run({str(path)!r}, {{k: d[k] for k in d.files}}); "
            "print(time.perf_counter()-t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            out[f"{label}_s"] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    print(f"  jit start (import + lower + first run): cold {out['cold_s']:.2f} s, warm cache {out['warm_s']:.2f} s",
          flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--sections", default="gemm,conv,model,jit")
    ap.add_argument("--model", help="QDQ model for the whole-model section (default: the zoo's MobileNetV2 and "
                                    "EfficientNet-Lite0, s8s8)")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the zoo models in the model section")
    ap.add_argument("--inputs", help=".npz inputs for --model")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: compile our kernels for Haswell (AVX2 + FMA, no AVX-512) in a fresh process")
    args = ap.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        from qgraph.kernels.cpu import HASWELL_FEATURES
        env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL_FEATURES}
        env.pop("QGRAPH_GEMM", None)
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    import numba
    import onnxruntime
    from qgraph.kernels import cpu
    from qgraph.kernels import gemm
    head = {"cpu": cpu_model(), "flags": cpu_flags(), "gemm_kernel": gemm.KERNEL,
            "compiled_for": os.environ.get("NUMBA_CPU_NAME", "host"), "ort_path": cpu.host_ort_path().describe(),
            "threads": 1, "onnxruntime": onnxruntime.__version__, "numba": numba.__version__}
    print(f"CPU: {cpu.describe_host()}  flags: {' '.join(head['flags'])}\n"
          f"our int8 GEMM kernel: {head['gemm_kernel']} (compiled for {head['compiled_for']})  "
          f"ORT's int8 path here: {head['ort_path']}  threads: 1  onnxruntime {head['onnxruntime']}  "
          f"numba {head['numba']}", flush=True)
    if head["compiled_for"] != "host":
        print(f"  note: ours runs {head['compiled_for']} code; ORT cannot be restricted the same way and runs its "
              f"{cpu.host_ort_path().isa} path: the ratios below are not those of a {head['compiled_for']} CPU",
              flush=True)
    result = {"host": head}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "gemm" in sections:
            result["gemm"] = bench_gemm(args.quick)
        if "conv" in sections:
            result["conv"] = bench_conv(args.quick)
        if "model" in sections or "jit" in sections:
            batches = [int(b) for b in args.batches.split(",")]
            if args.model:
                d = np.load(args.inputs)
                runs = [(Path(args.model).name, Path(args.model), {k: d[k] for k in d.files})]
            else:
                runs = zoo_models(batches) or [("digits_cnn (s8s8, quantize_static)", *digits_qdq(Path(tmp)))]
            if "model" in sections:
                print(f"  whole model, one thread, on {head['cpu']} ({' '.join(head['flags'])})", flush=True)
                result["model"] = [bench_model(*r) for r in runs]
            if "jit" in sections:
                label, path, feeds = runs[0]
                npz = Path(tmp) / "inputs.npz"
                np.savez(npz, **{k: v[:1] for k, v in feeds.items()})
                result["jit"] = bench_jit(path, npz)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
