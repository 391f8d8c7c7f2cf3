"""Post-training accuracy of low-bit weights on the zoo: binary, ternary, power-of-two, 2/3/4-bit uniform,
each with and without equalize / gptq / biascorr.

    python tools/lowbit_table.py [--models lenet5,lenet_300_100,digits_cnn,mobilenet_v2] [--rows KEY,...]
                                 [--variants KEY,...] [--json out.json] [--markdown out.md]

Every cell is ``qgraph.optimize(model, pipeline, calib=<calibration split>)`` evaluated by ONNX Runtime on
the evaluation split (``tools/zoo_data.py`` ``zoo_split``: MNIST test set 10,000 for the LeNets with 1,000 training
images to calibrate; digits 288 / 72; ImageNet sample 400 / 100). Weights per output channel,
activations 8-bit (rows marked A4 / A2 quantize activations to 4 / 2 bits), ``fold`` first. Columns:

    quant                      fold,quant:<grid>
    + equalize                 fold,equalize,quant:<grid>
    + gptq                     fold,quant:<grid>,rounding=gptq
    + biascorr                 fold,quant:<grid>,biascorr
    + equalize + gptq + biascorr
    first/last 8-bit           all three, with precision=first@8;last@8 (XNOR-Net and TWN keep the
                               first and last layers at full precision)

Top-1 % is printed with the two halves of the evaluation split (even / odd positions) as a check on
noise; the markdown table and the JSON hold every figure, the CPU and the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# one BLAS thread: GPTQ's Cholesky factorizations on a shared 2-core machine ran 40x slower with two
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    # (key, label, quant options)
    ("binary", "binary (XNOR-Net: sign, α = mean abs w)", "weight_grid=binary"),
    ("ternary", "ternary (TWN: Δ = 0.7·mean abs w)", "weight_grid=ternary"),
    ("pot4", "power-of-two, 4 bits (0, ±2^0..±2^6)", "weight_grid=pot,bits=4"),
    ("pot3", "power-of-two, 3 bits (0, ±1, ±2, ±4)", "weight_grid=pot,bits=3"),
    ("w4", "uniform 4-bit", "bits=4"),
    ("w3", "uniform 3-bit", "bits=3"),
    ("w2", "uniform 2-bit ({-1, 0, 1}·s)", "bits=2"),
    ("binary_a4", "binary, A4", "weight_grid=binary,act_bits=4"),
    ("w2_a2", "uniform 2-bit, A2", "bits=2,act_bits=2"),
]
#: rows run only on the small models (low-bit activations on MobileNetV2 post-training: not informative)
SMALL_ONLY = {"binary_a4", "w2_a2"}
VARIANTS = [
    # (key, label, pipeline template; {q} = the quant options)
    ("plain", "quant", "fold,quant:{q}"),
    ("eq", "+ equalize", "fold,equalize,quant:{q}"),
    ("gptq", "+ gptq", "fold,quant:{q},rounding=gptq"),
    ("bc", "+ biascorr", "fold,quant:{q},biascorr"),
    ("all", "+ equalize + gptq + biascorr", "fold,equalize,quant:{q},rounding=gptq,biascorr"),
    ("all_fl8", "all three, first/last 8-bit", "fold,equalize,quant:{q},rounding=gptq,precision=first@8;last@8,biascorr"),
]
MODELS = ("lenet5", "lenet_300_100", "digits_cnn", "mobilenet_v2")


def top1(model, samples) -> tuple[float, float, float]:
    """Top-1 over ``samples``, and over its even and odd positions."""
    from qgraph.ops import ort_session
    sess = ort_session(model if not isinstance(model, (str, Path)) else __import__("onnx").load(str(model)))
    names = [i.name for i in sess.get_inputs()]
    preds = []
    for batch in samples.batches(100):
        out = sess.run(None, {n: batch[n] for n in names})[0]
        preds.append(out.reshape(len(out), -1).argmax(axis=1))
    hit = np.concatenate(preds) == np.asarray(samples.labels)[: sum(len(p) for p in preds)]
    return float(hit.mean()), float(hit[0::2].mean()), float(hit[1::2].mean())


def markdown(results: dict) -> str:
    lines = []
    for name, fig in results["models"].items():
        cols = [v for v in VARIANTS if any(f"{r}:{v[0]}" in fig for r, _, _ in ROWS)]
        lines.append(f"**{name}** (FP32 {fig['fp32'][0] * 100:.2f}, n = {fig['n']})\n")
        lines.append("| weights | " + " | ".join(label for _, label, _ in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for key, label, _ in ROWS:
            cells = [fig.get(f"{key}:{v[0]}") for v in cols]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join("–" if c is None else f"{c[0] * 100:.2f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", help="comma-separated row keys (default all)")
    ap.add_argument("--variants", help="comma-separated column keys (default all)")
    ap.add_argument("--json", help="write every figure here (updated after each cell)")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)

    import qgraph
    sys.path.insert(0, str(ROOT / "tools"))
    from zoo_manifest import model_path
    from zoo_data import zoo_split
    from qgraph.kernels.cpu import cpu_name
    import onnxruntime
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    results: dict = {"cpu": cpu_name(), "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
                     "command": "python tools/lowbit_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d"), "models": {}}
    if args.json and Path(args.json).exists():          # resume: keep what an earlier run measured
        results["models"] = json.loads(Path(args.json).read_text()).get("models", {})
    print(f"CPU: {results['cpu']}, onnxruntime {results['onnxruntime']}", flush=True)
    for name in args.models.split(","):
        path = model_path(name)
        if not path.exists():
            print(f"{name}: not built ({path}); python tools/zoo.py build {name}", file=sys.stderr)
            return 2
        calib, evaluation = zoo_split(name)
        fig = results["models"].setdefault(name, {})
        fig["fp32"] = top1(path, evaluation)
        fig["n"] = len(evaluation)
        print(f"{name}: FP32 top-1 {fig['fp32'][0] * 100:.2f} ({len(evaluation)} eval, {len(calib)} calib)", flush=True)
        for key, label, q in rows:
            if key in SMALL_ONLY and name == "mobilenet_v2":
                continue
            for vkey, vlabel, template in variants:
                cell = f"{key}:{vkey}"
                if cell in fig and fig.get(f"{cell}:pipeline") == template.format(q=q):
                    continue
                pipe = template.format(q=q)
                t0 = time.perf_counter()
                model, _ = qgraph.optimize(path, pipe, calib=calib, progress=False)
                fig[cell] = top1(model, evaluation)
                fig[f"{cell}:pipeline"] = pipe
                a, even, odd = fig[cell]
                print(f"  {label:40s} {vlabel:30s} {a * 100:6.2f}  (halves {even * 100:.2f} / {odd * 100:.2f}, "
                      f"{time.perf_counter() - t0:.0f}s)  [{pipe}]", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(f"{results['command']} — {results['cpu']}, onnxruntime "
                                       f"{results['onnxruntime']}, {results['date']}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
