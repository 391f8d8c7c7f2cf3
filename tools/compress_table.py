#!/usr/bin/env python
"""k-means weight sharing against uniform quantization at the same bits, on zoo models: top-1 and size.

    python tools/compress_table.py mobilenet_v2 efficientnet_lite0 --bits 8 6 5 4 --json table.json

For each model and each bit width b (weights only; activations stay float in both):
    k-means          fold,share:bits=b,huffman            per-layer codebook of 2^b values, centroids
                                                          refit on the calibration split, as .qgz
    k-means, no refit fold,share:bits=b,refit=false,huffman
    k-means + gptq   fold,share:bits=b,assign=gptq,huffman  assignments by GPTQ onto the codebook, then refit
    uniform          fold,quant:bits=b,weight_only=true   per-channel symmetric grid (QDQ ONNX; 4 bits
                                                          stored as ONNX INT4), nearest rounding
    uniform + gptq   ...,rounding=gptq                    qgraph's best uniform rounding
and the sizes: the k-means .qgz; the QDQ .onnx and the same QDQ model packed by ``huffman`` (.qgz).
Top-1 on the evaluation split (400 images), calibration on the other 100 — as every zoo figure.
Results are appended to ``--json`` as they come (a long run survives an interruption).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_eval import evaluate, zoo_split  # noqa: E402
from zoo_manifest import model_path, zoo_cache  # noqa: E402

import qgraph  # noqa: E402
from qgraph import container, ir  # noqa: E402

PIPELINES = {
    "kmeans": "fold,share:bits={b},huffman",
    "kmeans_gptq": "fold,share:bits={b},assign=gptq,huffman",
    "kmeans_norefit": "fold,share:bits={b},refit=false,huffman",
    "uniform": "fold,quant:bits={b},weight_only=true,sqnr=false",
    "uniform_gptq": "fold,quant:bits={b},weight_only=true,rounding=gptq,sqnr=false",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(name: str, key: str, bits: int, calib, evaluation, out_dir: Path) -> dict:
    pipeline = PIPELINES[key].format(b=bits)
    suffix = ".qgz" if pipeline.endswith("huffman") else ".onnx"
    out = out_dir / f"{name}.{key}.{bits}{suffix}"
    t0 = time.perf_counter()
    qgraph.optimize(model_path(name), pipeline, calib=calib, output=out, progress=False)
    seconds = time.perf_counter() - t0
    r = evaluate(out, name, samples=evaluation, progress=False)
    row = {"model": name, "method": key, "bits": bits, "pipeline": pipeline, "top1": r["top1"],
           "bytes": os.path.getsize(out), "seconds": round(seconds, 1)}
    if suffix == ".onnx":                      # the same QDQ model in the container
        packed = container.pack(ir.read_model(out))
        row["qgz_bytes"] = packed.size
    return row


def markdown(rows: list[dict], fp32: dict[str, tuple[float, int]]) -> str:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        top1, size = fp32[name]
        out.append(f"\n{name} (FP32 {100 * top1:.2f}%, {size / 1e6:.2f} MB)\n")
        out.append("| bits | k-means + refit | k-means, no refit | k-means + gptq + refit | k-means .qgz |"
                   " uniform | uniform + gptq | QDQ .onnx | QDQ .qgz |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        mine = [r for r in rows if r["model"] == name]
        for b in sorted({r["bits"] for r in mine}, reverse=True):
            get = {r["method"]: r for r in mine if r["bits"] == b}

            def pct(key):
                return f"{100 * get[key]['top1']:.2f}" if key in get else "–"

            def mb(key, field="bytes"):
                return f"{get[key][field] / 1e6:.2f} MB" if key in get and field in get[key] else "–"
            out.append(f"| {b} | {pct('kmeans')} | {pct('kmeans_norefit')} | {pct('kmeans_gptq')} | {mb('kmeans')} | "
                       f"{pct('uniform')} | {pct('uniform_gptq')} | {mb('uniform')} | {mb('uniform', 'qgz_bytes')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4])
    ap.add_argument("--methods", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--json", help="append results here (and read what is there: done runs are skipped)")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else []
    out_dir = zoo_cache() / "compress_table"
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = {}
    for name in args.models:
        calib, evaluation = zoo_split(name)
        fp32[name] = (evaluate(model_path(name), name, samples=evaluation, progress=False)["top1"],
                      os.path.getsize(model_path(name)))
        for b in args.bits:
            for key in args.methods:
                if any(r["model"] == name and r["bits"] == b and r["method"] == key for r in rows):
                    continue
                log(f"{name}: {PIPELINES[key].format(b=b)}")
                row = run(name, key, b, calib, evaluation, out_dir)
                log(f"  {json.dumps(row)}")
                rows.append(row)
                if args.json:
                    ir.atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    print(markdown(rows, fp32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
