"""Benchmark the bit-serial kernels against ONNX Runtime's int8 and our int8 kernel, in one run.

    python tools/bench_bitserial.py [--quick] [--sections gemm,conv] [--reps 7] [--json out.json]

One thread everywhere. Every figure is a ratio measured in this process on the same shape (the three
contenders alternate, best of --reps each, so load from other jobs slows them alike):

  gemm   C[M, N] = A[M, K] B[K, N]: ORT MatMulInteger u8s8 (its fastest int8 path; A uint8, B int8
         constant), our int8 GEMM (``gemm.qgemm``, s8s8, B packed once), and the bit-serial GEMM
         (``bitserial.matmul``: B's planes packed once, A's planes packed on every call, zero-point terms
         included), at W1A1 (+-1 x +-1: XNOR-popcount), W2A2, W4A4, W1A8 and W2A8. The bit-serial result
         is checked equal to the int8 kernel's on the same integers.
  conv   one QLinearConv layer (LeNet-5, digits CNN and MobileNetV2 shapes): ORT QLinearConv u8s8 on
         8-bit data vs our runtime's step with ``--kernel int8`` and with ``--kernel bitserial`` on
         data of the given widths (same shapes, our two outputs checked equal; +-1 activations use
         zero point -1, so the zero padding is a +-1 code too and the XOR form applies). The pointwise
         layers at W1A1 and W2A2 are also timed in the kernel itself (``conv_in_chain``): alone (int8 in,
         range pass and packing included, int8 out) and inside a chain of bit-serial layers (planes in as a
         producer writes them, planes out for a pointwise consumer), each against ORT in the same loop.
         Those rows are not in the acceptance: the runtime does not hand planes between steps yet.

GOP/s counts 2*M*N*K (each product-accumulate as two operations), for every contender alike.
Prints the CPU (``bench_common.cpu_model``) and whether it has AVX2, AVX-512 VNNI, AMX-INT8 and
AVX-512 VPOPCNTDQ.

The issue's two targets, as this benchmark reads them (printed with every run, and checked per shape
in the closing summary and the JSON's ``acceptance``):

  1-bit >= 2x ORT    W1A1: +-1 weights x +-1 activations (the XNOR-popcount), bit-serial ops/s over
                     ORT's u8s8 MatMulInteger / QLinearConv ops/s on the same shape (ORT runs 8 bits:
                     it has no narrower kernel)
  2-bit >= our int8  W2A2: 2-bit weights x 2-bit activations (4 plane pairs), bit-serial ops/s over
                     our int8 kernel's on the same integers
W1A8 / W2A8 (narrow weights, 8-bit activations) and W4A4 are shown for what they cost, not targets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

GEMMS = [("256^3", 256, 256, 256), ("512^3", 512, 512, 512), ("1024^3", 1024, 1024, 1024),
         ("LeNet-300 fc1 (batch 64)", 64, 784, 300), ("mbv2 pw 144->24 (im2col)", 3136, 144, 24),
         ("mbv2 pw 576->160 (im2col)", 196, 576, 160), ("mbv2 3x3 full 64ch (im2col)", 784, 576, 64)]
#: (weight bits, activation bits); 1 means +-1
WIDTHS = [(1, 1), (2, 2), (4, 4), (1, 8), (2, 8)]
# (name, batch, Cin, H, Cout, k, stride, group)
CONVS = [("LeNet-5 conv2 5x5 20->50", 16, 20, 12, 50, 5, 1, 1), ("digits 3x3 16->16", 64, 16, 8, 16, 3, 1, 1),
         ("mbv2 pw 144->24 56x56", 1, 144, 56, 24, 1, 1, 1), ("mbv2 pw 192->64 28x28", 1, 192, 28, 64, 1, 1, 1), ("mbv2 3x3 64->64 28x28", 1, 64, 28, 64, 3, 1, 1),
         ("mbv2 pw 960->320 7x7", 4, 960, 7, 320, 1, 1, 1)]


from bench_common import cpu_model, one_thread_session as session  # noqa: E402


def _model(nodes, inputs, outputs, inits, opset=19):
    g = helper.make_graph(nodes, "bench", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def best_of_each(fns: dict, reps: int) -> dict:
    """Best time of each function, the functions run in turn ``reps`` times after one warm-up each."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def operand(rng, shape, bits: int, signed: bool = True) -> np.ndarray:
    """Integers of ``bits`` bits in int8 (1 bit: +-1)."""
    if bits == 1:
        return rng.choice(np.array([-1, 1], np.int8), shape)
    if signed:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(np.int8)
    return rng.integers(0, 1 << bits, shape).astype(np.uint8)


def label(wb: int, ab: int) -> str:
    return f"W{wb}A{ab}" + (" (xnor)" if wb == ab == 1 else "")


#: (widths, contender, factor): the issue's targets (module docstring)
TARGETS = [("W1A1 (xnor)", "vs_ort", 2.0), ("W2A2", "vs_ours_int8", 1.0)]


def acceptance(rows: list[dict]) -> list[dict]:
    """Per shape and target: the measured ratio and whether it meets the target."""
    out = []
    for widths, key, factor in TARGETS:
        for r in rows:
            if r["widths"] == widths:
                out.append({"shape": r.get("shape") or r.get("layer"), "widths": widths, "ratio": key,
                            "target": factor, "measured": r[key], "met": r[key] >= factor})
    return out


def bench_gemm(quick: bool, reps: int) -> list[dict]:
    from qgraph.kernels import bitserial
    from qgraph.kernels.gemm import pack_b, qgemm
    rng = np.random.default_rng(0)
    rows = []
    shapes = GEMMS[:2] + GEMMS[3:5] if quick else GEMMS
    for name, m, k, n in shapes:
        ops = 2.0 * m * n * k
        a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
        b8 = rng.integers(-128, 128, (k, n)).astype(np.int8)
        sess = session(_model([helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                              [numpy_helper.from_array(b8, "b")]))
        for wb, ab in WIDTHS:
            a, b = operand(rng, (m, k), ab), operand(rng, (k, n), wb)
            pb8, pbits = pack_b(b), bitserial.pack(np.ascontiguousarray(b.T), bitserial.NR)
            exact = bool(np.array_equal(bitserial.matmul(a, 0, pbits, 0), qgemm(a, 0, pb8, 0)))
            t = best_of_each({"ort": lambda: sess.run(None, {"a": a8}), "int8": lambda: qgemm(a, 0, pb8, 0),
                              "bits": lambda: bitserial.matmul(a, 0, pbits, 0)}, reps)
            row = {"shape": name, "M": m, "K": k, "N": n, "widths": label(wb, ab),
                   "ort_u8s8_gops": ops / t["ort"] / 1e9, "ours_int8_gops": ops / t["int8"] / 1e9,
                   "bitserial_gops": ops / t["bits"] / 1e9, "vs_ort": t["ort"] / t["bits"],
                   "vs_ours_int8": t["int8"] / t["bits"], "equal_to_int8": exact}
            rows.append(row)
            print(f"  gemm {name:<28} {label(wb, ab):<11} bit-serial {row['bitserial_gops']:7.1f} GOP/s | "
                  f"ORT u8s8 {row['ort_u8s8_gops']:6.1f} (x{row['vs_ort']:.2f}) | ours int8 "
                  f"{row['ours_int8_gops']:6.1f} (x{row['vs_ours_int8']:.2f}) | equal {exact}", flush=True)
    return rows


def _qlinear_conv(x_t, w, g, k, s, x_shape, zx):
    cout = w.shape[0]
    consts = {"sx": np.float32(0.02), "zx": np.array(zx, x_t), "w": w, "sw": np.full(cout, 0.01, np.float32),
              "zw": np.zeros(cout, np.int8), "sy": np.float32(0.05), "zy": np.array(0, x_t),
              "b": np.zeros(cout, np.int32)}
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"],
                            group=g, strides=[s, s], pads=[k // 2] * 4)
    onnx_t = TensorProto.UINT8 if x_t == np.uint8 else TensorProto.INT8
    return _model([node], [helper.make_tensor_value_info("x", onnx_t, list(x_shape))],
                  [helper.make_tensor_value_info("y", onnx_t, [None] * 4)],
                  [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])


def bench_conv(quick: bool, reps: int) -> tuple[list[dict], list[dict]]:
    from qgraph.kernels import lower, run
    rng = np.random.default_rng(1)
    rows, chain_rows = [], []
    for name, nb, cin, h, cout, k, s, g in (CONVS[:2] + CONVS[3:4] if quick else CONVS):
        x_shape = (nb, cin, h, h)
        oh = (h + 2 * (k // 2) - k) // s + 1
        ops = 2.0 * nb * cout * oh * oh * cin // g * k * k
        x8 = rng.integers(0, 256, x_shape).astype(np.uint8)
        ort_sess = session(_qlinear_conv(np.uint8, rng.integers(-128, 128, (cout, cin // g, k, k)).astype(np.int8),
                                         g, k, s, x_shape, 128))
        for wb, ab in WIDTHS:
            w = operand(rng, (cout, cin // g, k, k), wb)
            x = operand(rng, x_shape, ab, signed=ab == 1)          # +-1, or unsigned a-bit (uint8)
            # +-1 codes pad with zero point -1 (a code of the same two): the XNOR form holds over the padding
            model = _qlinear_conv(x.dtype.type, w, g, k, s, x_shape, -1 if ab == 1 else 0)
            p8, pb = lower(model, kernel="int8"), lower(model, kernel="bitserial")
            exact = bool(np.array_equal(run(p8, {"x": x})["y"], run(pb, {"x": x})["y"]))
            t = best_of_each({"ort": lambda: ort_sess.run(None, {"x": x8}), "int8": lambda: run(p8, {"x": x}),
                              "bits": lambda: run(pb, {"x": x})}, reps)
            row = {"layer": name, "widths": label(wb, ab), "ort_u8s8_gops": ops / t["ort"] / 1e9,
                   "ours_int8_gops": ops / t["int8"] / 1e9, "bitserial_gops": ops / t["bits"] / 1e9,
                   "vs_ort": t["ort"] / t["bits"], "vs_ours_int8": t["int8"] / t["bits"], "equal_to_int8": exact}
            rows.append(row)
            print(f"  conv {name:<28} {label(wb, ab):<11} bit-serial {row['bitserial_gops']:7.1f} GOP/s | "
                  f"ORT u8s8 {row['ort_u8s8_gops']:6.1f} (x{row['vs_ort']:.2f}) | ours int8 "
                  f"{row['ours_int8_gops']:6.1f} (x{row['vs_ours_int8']:.2f}) | equal {exact}", flush=True)
            if k == 1 and s == 1 and g == 1 and (wb, ab) in CHAIN_WIDTHS:
                chain_rows.append(_in_chain(name, ops, w, x, -1 if ab == 1 else 0, ort_sess, x8, reps, wb, ab))
    return rows, chain_rows


#: the widths whose pointwise layers are also timed as inside a chain of bit-serial layers (``_in_chain``)
CHAIN_WIDTHS = [(1, 1), (2, 2)]


def _in_chain(name, ops, w, x, zx, ort_sess, x8, reps, wb, ab) -> dict:
    """One pointwise layer timed two ways in the bit-serial kernel itself (``bitconv.conv``, no runtime step
    around it), each against the same ORT QLinearConv u8s8 in the same loop: ``alone`` reads the int8 tensor
    (range pass and packing included) and writes int8; ``in chain`` reads planes as a bit-serial producer
    writes them (``Planes``; no range pass, no packing) and writes its output as the planes of a bit-serial
    pointwise consumer (``planes_out``). The output is requantized to [0, 3] (uint8: a ReLU-clipped 2-bit
    activation, 2 planes) in both, and checked equal to the int8 kernel. At W1A1 the input planes are +-1:
    a producer with binary (sign) activations, which qgraph's quantizer does not make (act_bits >= 2), so
    that chain is hypothetical; W2A2 (2-bit in and out) is what ``quant:bits=2,act_bits=2`` gives."""
    from qgraph.kernels import bitconv
    from qgraph.kernels.conv import conv_int, pack_conv
    from qgraph.ops import ConvGeometry, fixed_multiplier
    cout = w.shape[0]
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    scale = np.full(cout, 0.02, np.float32)
    mult, shift = fixed_multiplier(scale)
    rq = (np.zeros(cout, np.int32), scale, mult, shift, 0, 0, 3, True)
    pc = bitconv.pack_conv(w, 1)
    planes_in = bitconv.pack_planes(x)
    want = conv_int(x, zx, pack_conv(w, 1), 0, geo, rq=rq, out_dtype=np.uint8)
    alone = bitconv.conv(x, zx, pc, 0, geo, rq=rq, out_dtype=np.uint8)
    chained = bitconv.conv(planes_in, zx, pc, 0, geo, rq=rq, out_dtype=np.uint8, planes_out=True)
    exact = bool(np.array_equal(alone, want) and np.array_equal(chained.values(), want))
    pc_alone = bitconv.pack_conv(w, 1)          # its own setup cache: the two calls do not rebuild each other's
    t = best_of_each({"ort": lambda: ort_sess.run(None, {"x": x8}),
                      "alone": lambda: bitconv.conv(x, zx, pc_alone, 0, geo, rq=rq, out_dtype=np.uint8),
                      "chain": lambda: bitconv.conv(planes_in, zx, pc, 0, geo, rq=rq, out_dtype=np.uint8,
                                                    planes_out=True)}, reps)
    row = {"layer": name, "widths": label(wb, ab), "ort_u8s8_gops": ops / t["ort"] / 1e9,
           "alone_gops": ops / t["alone"] / 1e9, "in_chain_gops": ops / t["chain"] / 1e9,
           "alone_vs_ort": t["ort"] / t["alone"], "in_chain_vs_ort": t["ort"] / t["chain"], "equal_to_int8": exact}
    print(f"       kernel alone {row['alone_gops']:7.1f} GOP/s (x{row['alone_vs_ort']:.2f} ORT) | in a chain "
          f"(planes in, 2-bit planes out) {row['in_chain_gops']:7.1f} GOP/s (x{row['in_chain_vs_ort']:.2f} ORT) | "
          f"equal {exact}", flush=True)
    return row


#: chains of real layers, run as whole quantized models (graph input and output float, as qgraph writes them):
#: (name, input [C, H, W], layers (Cout, k, group, clip: ReLU6 / ReLU / none))
CHAINS = [("mbv2 block 56x56: pw 24->144, dw 3x3, pw 144->24", (24, 56, 56),
           [(144, 1, 1, "relu6"), (144, 3, 144, "relu6"), (24, 1, 1, None)]),
          ("resnet18 layer1: 3x 3x3 64->64 56x56 (no residual adds)", (64, 56, 56),
           [(64, 3, 1, "relu"), (64, 3, 1, "relu"), (64, 3, 1, "relu")])]
#: the low-bit chains (a qgraph ``optimize`` spec each) and the 8-bit one ORT runs
CHAIN_SPECS = {"W1A2": "fold,quant:weight_grid=binary,act_bits=2", "W2A2": "fold,quant:bits=2,act_bits=2"}
CHAIN_ORT_SPEC = "fold,quant"


def _float_chain(rng, shape, layers) -> onnx.ModelProto:
    """The float chain: Conv (+ bias) [+ Relu / Clip(0, 6)] per layer, He-scaled random weights."""
    nodes, inits, cur, c = [], [], "x", shape[0]
    for i, (cout, k, g, act) in enumerate(layers):
        w = (rng.standard_normal((cout, c // g, k, k)) * np.sqrt(2.0 / (c // g * k * k))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=g,
                                      pads=[k // 2] * 4))
        cur, c = f"c{i}", cout
        if act == "relu":
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
        elif act == "relu6":
            inits += [numpy_helper.from_array(np.float32(0), f"lo{i}"),
                      numpy_helper.from_array(np.float32(6), f"hi{i}")]
            nodes.append(helper.make_node("Clip", [cur, f"lo{i}", f"hi{i}"], [f"r{i}"], name=f"clip{i}"))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *shape])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, shape[1], shape[2]])], inits, opset=17)


def bench_chain(quick: bool, reps: int) -> list[dict]:
    """Each chain quantized by qgraph at 8 bits (what ORT runs, its u8s8 QDQ path) and at W1A2 / W2A2 (what
    our runtime runs in ``fixed`` mode, integer requantization throughout: ``--kernel auto``, ``bitserial``
    and ``int8``, outputs checked equal), same input. (``float`` mode would emulate ORT's float units
    wherever ORT leaves a narrow-clipped Conv unfused: the integer kernels would not run there.)"""
    import qgraph
    from qgraph.kernels import lower, run
    rng = np.random.default_rng(2)
    rows = []
    for name, shape, layers in CHAINS[:1] if quick else CHAINS:
        fm = _float_chain(rng, shape, layers)
        calib = {"x": rng.standard_normal((8, *shape)).astype(np.float32)}
        feed = {"x": rng.standard_normal((1, *shape)).astype(np.float32)}
        ops = 0.0
        h, w = shape[1:]
        c = shape[0]
        for cout, k, g, _ in layers:
            ops += 2.0 * cout * h * w * (c // g) * k * k
            c = cout
        q8 = qgraph.optimize(fm, CHAIN_ORT_SPEC, calib=calib, progress=False)[0]
        ort8 = session(q8)
        for widths, spec in CHAIN_SPECS.items():
            q = qgraph.optimize(fm, spec, calib=calib, progress=False)[0]
            ort_low = session(q)
            progs = {kern: lower(q, kernel=kern) for kern in ("auto", "bitserial", "int8")}
            outs = {kern: run(p, feed, "fixed")["y"] for kern, p in progs.items()}
            exact = bool(np.array_equal(outs["auto"], outs["int8"]) and np.array_equal(outs["bitserial"], outs["int8"]))
            ran = [s.cache["ran"] for s in progs["auto"].steps if "ran" in s.cache]
            t = best_of_each({"ort": lambda: ort8.run(None, feed), "ort_low": lambda: ort_low.run(None, feed),
                              "auto": lambda: run(progs["auto"], feed, "fixed"),
                              "bits": lambda: run(progs["bitserial"], feed, "fixed"),
                              "int8": lambda: run(progs["int8"], feed, "fixed")}, reps)
            row = {"chain": name, "widths": widths, "ops": ops, "auto_kernels": ran,
                   "ort_u8s8_gops": ops / t["ort"] / 1e9, "ort_lowbit_qdq_gops": ops / t["ort_low"] / 1e9,
                   "ours_auto_gops": ops / t["auto"] / 1e9, "ours_bitserial_gops": ops / t["bits"] / 1e9,
                   "ours_int8_gops": ops / t["int8"] / 1e9, "auto_vs_ort": t["ort"] / t["auto"],
                   "bitserial_vs_ort": t["ort"] / t["bits"], "bitserial_vs_ours_int8": t["int8"] / t["bits"],
                   "auto_vs_ours_int8": t["int8"] / t["auto"], "equal_to_int8": exact}
            rows.append(row)
            print(f"  chain {name} {widths}: ORT 8-bit {row['ort_u8s8_gops']:.1f} GOP/s | ours auto "
                  f"{row['ours_auto_gops']:.1f} (x{row['auto_vs_ort']:.2f} ORT, "
                  f"x{row['auto_vs_ours_int8']:.2f} our int8) | "
                  f"ours bitserial {row['ours_bitserial_gops']:.1f} (x{row['bitserial_vs_ort']:.2f} ORT, "
                  f"x{row['bitserial_vs_ours_int8']:.2f} our int8) | ours int8 {row['ours_int8_gops']:.1f} | ORT on "
                  f"the {widths} QDQ model {row['ort_lowbit_qdq_gops']:.1f} | equal {exact}\n"
                  f"      auto ran: {', '.join(ran)}", flush=True)
    return rows


def markdown(result: dict) -> str:
    """The README's table: one row per shape, each width's ratios (the targets' columns first)."""
    rows = result.get("gemm", []) + result.get("conv", [])
    shapes: dict = {}
    for r in rows:
        name = ("GEMM " + r["shape"] + f" ({r['M']}×{r['K']}×{r['N']})") if "shape" in r else "conv " + r["layer"]
        shapes.setdefault(name, {})[r["widths"]] = r
    lines = ["| shape (M×K×N, or conv layer) | W1A1 (XNOR) ÷ ORT u8s8 / ÷ ours int8 | W2A2 ÷ ours int8 / ÷ ORT | "
             "W4A4 ÷ ours | W1A8 ÷ ours | W2A8 ÷ ours |", "|---|---|---|---|---|---|"]
    for name, by in shapes.items():
        def cell(w, first, second=None):
            r = by.get(w)
            if r is None:
                return "–"
            text = f"{r[first]:.2f}"
            target = next((f for tw, k, f in TARGETS if tw == w and k == first), None)
            if target is not None and r[first] >= target:
                text = f"**{text}**"
            return text + (f" / {r[second]:.2f}" if second else "")
        lines.append(f"| {name} | {cell('W1A1 (xnor)', 'vs_ort', 'vs_ours_int8')} | "
                     f"{cell('W2A2', 'vs_ours_int8', 'vs_ort')} | {cell('W4A4', 'vs_ours_int8')} | "
                     f"{cell('W1A8', 'vs_ours_int8')} | {cell('W2A8', 'vs_ours_int8')} |")
    chain = result.get("conv_in_chain", [])
    if chain:
        lines += ["", "| pointwise layer | widths | ORT u8s8 GOP/s | kernel alone ÷ ORT | in a chain ÷ ORT |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['widths']} | {r['ort_u8s8_gops']:.1f} | {r['alone_vs_ort']:.2f} | "
                  f"{r['in_chain_vs_ort']:.2f} |" for r in chain]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--sections", default="gemm,conv,chain")
    ap.add_argument("--reps", type=int, default=7, help="timed runs of each contender (best counts)")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--markdown", help="write the table of ratios here (bold: a target met)")
    args = ap.parse_args(argv)
    import numba
    import onnxruntime
    from qgraph.kernels import amx, bitserial, cpu, vnni
    flags = cpu.summary()
    head = {"cpu": cpu_model(), "flags": flags, "our_int8_kernel": "amx" if amx.HAS_AMX else
            ("vnni" if vnni.HAS_VNNI else "plain"), "bitserial_tile": f"{bitserial.MR}x{bitserial.NR}",
            "auto_max_pairs": bitserial.AUTO_MAX_PAIRS, "threads": 1, "onnxruntime": onnxruntime.__version__,
            "numba": numba.__version__}
    print(f"CPU: {head['cpu']} | " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
          + f" | our int8 kernel: {head['our_int8_kernel']} | one thread | onnxruntime {head['onnxruntime']}",
          flush=True)
    print("targets: " + "; ".join(f"{w} bit-serial >= {f:g}x {'ORT u8s8' if k == 'vs_ort' else 'our int8 kernel'}"
                                  for w, k, f in TARGETS) + " (same shape, ops/s)", flush=True)
    result = {"host": head}
    if "gemm" in args.sections:
        result["gemm"] = bench_gemm(args.quick, args.reps)
    if "conv" in args.sections:
        result["conv"], result["conv_in_chain"] = bench_conv(args.quick, args.reps)
    if "chain" in args.sections:
        result["chain"] = bench_chain(args.quick, args.reps)
    result["acceptance"] = acceptance(result.get("gemm", []) + result.get("conv", []))
    print("\nacceptance:")
    for a in result["acceptance"]:
        print(f"  {a['widths']:<11} {a['shape']:<28} {a['ratio']:<12} x{a['measured']:.2f} (target {a['target']:g}): "
              f"{'met' if a['met'] else 'NOT met'}")
    met = sum(a["met"] for a in result["acceptance"])
    print(f"  {met} of {len(result['acceptance'])} met", flush=True)
    if result.get("conv_in_chain"):
        print("\npointwise layers, the kernel alone and inside a chain of bit-serial layers (x ORT u8s8; not counted "
              "above: the runtime does not hand planes between steps yet):")
        for r in result["conv_in_chain"]:
            print(f"  {r['widths']:<11} {r['layer']:<28} alone x{r['alone_vs_ort']:.2f}  in a chain "
                  f"x{r['in_chain_vs_ort']:.2f}  equal {r['equal_to_int8']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
