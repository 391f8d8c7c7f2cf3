"""Measure data-free / post-training quantization pipelines on the zoo: naive vs each added pass.

    python tools/dfq_table.py [--models efficientnet_lite0,mobilenet_v2] [--json out.json] [--only KEY,...]

For each model: FP32 top-1 on the evaluation split, FP32 after ``fold,equalize`` (equalization must
keep the function), then each quantized pipeline's top-1 with calibration on the calibration split
(zoo split of tools/zoo_data.py: 100 calibration / 400 evaluation images). Prints a markdown table (the
README's) and writes every figure as JSON. Needs the zoo built (python tools/zoo.py build NAME) and
../shared/data.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINES = [
    # (key, label, pipeline)
    ("fp32_equalize", "FP32 after fold,equalize", "fold,equalize"),
    ("w8a8_tensor_naive", "W8A8 per-tensor: fold,quant", "fold,quant:granularity=tensor"),
    ("w8a8_tensor_eq", "W8A8 per-tensor: + equalize", "fold,equalize,quant:granularity=tensor"),
    ("w8a8_tensor_eq_bc", "W8A8 per-tensor: + equalize + biascorr",
     "fold,equalize,quant:granularity=tensor,biascorr"),
    ("w8a8_tensor_eq_gptq_bc", "W8A8 per-tensor: + equalize + gptq rounding, mse ranges + biascorr",
     "fold,equalize,quant:granularity=tensor,rounding=gptq,act_method=mse,biascorr"),
    ("w8a8_tensor_eq_bc_output", "W8A8 per-tensor: + equalize + biascorr on raw output means",
     "fold,equalize,quant:granularity=tensor,biascorr:target=output"),
    ("w8a8_tensor_eq_bc_analytic", "W8A8 per-tensor: + equalize + analytic biascorr (no data)",
     "fold,equalize,quant:granularity=tensor,biascorr:mode=analytic"),
    ("w8a8_channel_naive", "W8A8 per-channel: fold,quant", "fold,quant:granularity=channel"),
    ("w8a8_channel_eq_bc", "W8A8 per-channel: + equalize + biascorr",
     "fold,equalize,quant:granularity=channel,biascorr"),
    ("w8a8_channel_eq_bc_analytic", "W8A8 per-channel: + equalize + analytic biascorr (no data)",
     "fold,equalize,quant:granularity=channel,biascorr:mode=analytic"),
    ("w8a8_channel_eq_gptq_bc", "W8A8 per-channel: + equalize + gptq rounding, mse ranges + biascorr",
     "fold,equalize,quant:granularity=channel,rounding=gptq,act_method=mse,biascorr"),
    ("w8a8_channel_eq_gptq_bc_output", "W8A8 per-channel: + equalize + gptq rounding, mse ranges + biascorr "
     "on raw output means", "fold,equalize,quant:granularity=channel,rounding=gptq,act_method=mse,"
     "biascorr:target=output"),
    ("w6_tensor_naive", "W6 weight-only per-tensor: fold,quant",
     "fold,quant:bits=6,granularity=tensor,weight_only=true"),
    ("w6_tensor_eq", "W6 weight-only per-tensor: + equalize",
     "fold,equalize,quant:bits=6,granularity=tensor,weight_only=true"),
    ("w6_tensor_eq_bc", "W6 weight-only per-tensor: + equalize + biascorr",
     "fold,equalize,quant:bits=6,granularity=tensor,weight_only=true,biascorr"),
    ("w6_tensor_eq_bc_analytic", "W6 weight-only per-tensor: + equalize + analytic biascorr (no data)",
     "fold,equalize,quant:bits=6,granularity=tensor,weight_only=true,biascorr:mode=analytic"),
    ("w6_tensor_eq_gptq_bc", "W6 weight-only per-tensor: + equalize + gptq rounding + biascorr",
     "fold,equalize,quant:bits=6,granularity=tensor,weight_only=true,rounding=gptq,biascorr"),
    ("w4_channel_naive", "W4 weight-only per-channel: fold,quant", "fold,quant:bits=4,weight_only=true"),
    ("w4_channel_eq_bc", "W4 weight-only per-channel: + equalize + biascorr",
     "fold,equalize,quant:bits=4,weight_only=true,biascorr"),
    ("w4_channel_gptq", "W4 weight-only per-channel: + gptq rounding",
     "fold,quant:bits=4,weight_only=true,rounding=gptq"),
    ("w4_channel_eq_gptq", "W4 weight-only per-channel: + equalize + gptq rounding",
     "fold,equalize,quant:bits=4,weight_only=true,rounding=gptq"),
    ("w4_channel_eq_gptq_bc", "W4 weight-only per-channel: + equalize + gptq rounding + biascorr",
     "fold,equalize,quant:bits=4,weight_only=true,rounding=gptq,biascorr"),
    ("w4_channel_eq_gptq_bc_output", "W4 weight-only per-channel: + equalize + gptq rounding + biascorr on "
     "raw output means", "fold,equalize,quant:bits=4,weight_only=true,rounding=gptq,biascorr:target=output"),
]


def top1(model, samples) -> float:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    preds = []
    for batch in samples.batches(50):
        preds.append(sess.run(None, {n: batch[n] for n in names})[0].argmax(axis=1))
    pred = np.concatenate(preds)
    return float((pred == np.asarray(samples.labels)[: len(pred)]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--only", help="comma-separated pipeline keys")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import qgraph
    from zoo_data import zoo_split
    from zoo_manifest import model_path
    only = set(args.only.split(",")) if args.only else None
    results: dict = {"cpu": platform.processor() or platform.machine(), "models": {}}
    for name in args.models.split(","):
        path = model_path(name)
        if not path.exists():
            print(f"{name}: not built ({path}); run python tools/zoo.py build {name}", file=sys.stderr)
            return 2
        calib, evaluation = zoo_split(name)
        fig = {"fp32": top1(path, evaluation)}
        print(f"{name}: FP32 top-1 {fig['fp32'] * 100:.2f} ({len(evaluation)} eval, {len(calib)} calib)", flush=True)
        for key, label, pipe in PIPELINES:
            if only and key not in only:
                continue
            t0 = time.perf_counter()
            model, _ = qgraph.optimize(path, pipe, calib=calib, progress=False)
            fig[key] = top1(model, evaluation)
            print(f"  {label:50s} {fig[key] * 100:6.2f}  ({time.perf_counter() - t0:.0f}s)  [{pipe}]", flush=True)
        results["models"][name] = fig
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    models = list(results["models"])
    print("| pipeline | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    print("| FP32 | " + " | ".join(f"{results['models'][m]['fp32'] * 100:.2f}" for m in models) + " |")
    for key, label, pipe in PIPELINES:
        if all(key in results["models"][m] for m in models):
            print(f"| {label} (`{pipe}`) | " + " | ".join(f"{results['models'][m][key] * 100:.2f}" for m in models) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
