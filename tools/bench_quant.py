"""Benchmark: what post-training quantization costs in qgraph, against ONNX Runtime and NNCF in one run.

    python tools/bench_quant.py                                   # all sections, EfficientNet-Lite0
    python tools/bench_quant.py --sections calib,biascorr --json bench.json
    python tools/bench_quant.py --sections methods --methods entropy percentile

Sections (each measurement a fresh process; wall time and peak RSS are that whole process's, as
``/usr/bin/time -v`` gives them: imports, model loading and data included; the RSS is the process's
own VmHWM):

    calib     ``fold,quant`` with qgraph's defaults (SQNR report on) against ORT ``quantize_static``
              MinMax per-channel (QDQ s8s8) on the BN-folded model, both at ``--batch``, and ORT fed
              one image per batch (its examples' data reader); at 100 and 400 images (peak RSS must
              stay flat). ``--variants`` adds qgraph runs with other options (what each costs).
    biascorr  ``fold,equalize,quant:granularity=tensor,biascorr`` against NNCF ``nncf.quantize`` with
              ``fast_bias_correction=False`` (its full bias correction), 100 calibration images;
              ``--accuracy`` adds both models' top-1 on the evaluation split.
    gptq      ``fold,quant:rounding=gptq`` against ``fold,quant`` and ORT MinMax, per ``--gptq-models``.
    methods   entropy / percentile calibration, qgraph against ORT (ORT keeps every activation:
              several GB; not in the default sections).

Data: the zoo split's 100 calibration images (400: the dataset's first 400) are decoded once into a
raw float32 file that every process reads batch by batch with plain file reads (no memory map, so
the data is not what grows with the image count, and ORT's process imports nothing of qgraph). NNCF
runs in its own virtual environment (``$QGRAPH_CACHE/nncf-venv``; ``--nncf`` creates it) on the
same file. Timings on a shared machine are noisy: read the ratios of one run, and only as ratios.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_common import cpu_model  # noqa: E402

SECTIONS = ("calib", "biascorr", "gptq", "methods")
BIASCORR_PIPELINE = "fold,equalize,quant:granularity=tensor,biascorr"
VARIANTS = ("sqnr=false", "batch_size=1", "batch_size=16", "sqnr_batch=4", "act_method=entropy")


# ----------------------------------------------------------------------------- data, in every process

class RawBatches:
    """Samples of one model input stored as a .npy file, read ``batch`` at a time with seek+read."""

    def __init__(self, path: str, n: int):
        import numpy as np
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            self.offset = f.tell()
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.n = min(n, shape[0])
        self.item = int(np.prod(shape[1:])) * self.dtype.itemsize

    def read(self, start: int, stop: int):
        import numpy as np
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.item)
            a = np.fromfile(f, self.dtype, (stop - start) * self.item // self.dtype.itemsize)
        return a.reshape((stop - start,) + tuple(self.shape[1:]))

    def batches(self, batch: int):
        for s in range(0, self.n, batch):
            yield self.read(s, min(s + batch, self.n))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own address space since exec; ru_maxrss would
    also count the parent's pages at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _finish(seconds: float, **extra) -> None:
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb(), **extra}))


def child(args) -> None:
    data = RawBatches(args.data, args.n)
    if args.tool == "qgraph":
        import numpy as np
        import qgraph
        from qgraph.data import Samples

        def fetch(idx):
            idx = np.asarray(idx)
            if len(idx) and np.all(np.diff(idx) == 1):
                return {args.input: data.read(int(idx[0]), int(idx[-1]) + 1)}
            return {args.input: np.concatenate([data.read(int(i), int(i) + 1) for i in idx])}
        samples = Samples([args.input], data.n, fetch)
        t0 = time.perf_counter()
        _, report = qgraph.optimize(args.model, args.spec, calib=samples, output=args.out, progress=False)
        seconds = time.perf_counter() - t0
        passes = {r["pass"]: r for r in report.to_dict()["passes"]}
        bc = next((r for p, r in passes.items() if p.startswith("biascorr")), None)
        extra = {"pass_seconds": {p: round(r["seconds"], 2) for p, r in passes.items()}}
        if bc is not None:
            extra["biascorr_notes"] = {k: v for k, v in bc["notes"].items() if k != "details"}
        _finish(seconds, **extra)
        return
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data.batches(args.batch))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {args.input: x}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.spec]
    t0 = time.perf_counter()
    quantize_static(args.model, args.out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=method)
    _finish(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the parent

def _measure(cmd: list[str], label: dict) -> dict:
    """One measurement in its own process: its JSON line (with its own peak RSS) and its wall time."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row = dict(label)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        row["error"] = ((proc.stderr.strip().splitlines() or ["failed"])[-1])[:300]
    else:
        row.update(json.loads(lines[-1]))
    row["wall"] = round(wall, 2)
    print(json.dumps(row), flush=True)
    return row


def q_child(model, spec, data, n, batch, out, label):
    return _measure([sys.executable, __file__, "_child", "--tool", "qgraph", "--model", model, "--spec", spec,
                     "--data", data, "--n", str(n), "--batch", str(batch), "--out", out, "--input", "input"], label)


def ort_child(model, method, data, n, batch, out, label):
    return _measure([sys.executable, __file__, "_child", "--tool", "ort", "--model", model, "--spec", method,
                     "--data", data, "--n", str(n), "--batch", str(batch), "--out", out, "--input", "input"], label)


def write_data(zoo: str, n: int, path: str) -> None:
    """The images as one float32 .npy: n <= 100: the zoo split's calibration images; else the
    dataset's first n."""
    import numpy as np
    from zoo_data import open_zoo_dataset, zoo_split
    from zoo_manifest import model_entry
    if n <= 100:
        samples = zoo_split(zoo)[0]
    else:
        entry = model_entry(zoo)
        samples = open_zoo_dataset(entry["dataset"], preset=entry.get("preset"),
                                   input_names=[i["name"] for i in entry.get("inputs", [])] or None)
    samples = samples.subset(range(min(n, len(samples))))
    arr = None
    i = 0
    for feed in samples.batches(20):
        x = next(iter(feed.values()))
        if arr is None:
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(samples),) + x.shape[1:])
        arr[i:i + len(x)] = x
        i += len(x)
    arr.flush()


def top1(path: str, zoo: str) -> float:
    from zoo_eval import evaluate
    return round(evaluate(path, zoo, reference=False, progress=False)["value"] * 100, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="efficientnet_lite0", help="zoo model of the calib and biascorr sections")
    p.add_argument("--sections", default="calib,biascorr,gptq", help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--batch", type=int, default=4, help="calibration batch of both tools (qgraph's default: 4)")
    p.add_argument("--rss", nargs=2, type=int, default=[100, 400], metavar=("SMALL", "LARGE"),
                   help="image counts for the flat-memory check")
    p.add_argument("--variants", nargs="*", default=[], metavar="OPTS",
                   help=f"extra fold,quant runs at SMALL images with these quant options (e.g. {' '.join(VARIANTS)})")
    p.add_argument("--gptq-models", default="efficientnet_lite0,mobilenet_v2")
    p.add_argument("--methods", nargs="+", default=["entropy", "percentile"], help="for --sections methods")
    p.add_argument("--nncf", action="store_true", help="create NNCF's virtual environment if missing")
    p.add_argument("--accuracy", action="store_true", help="biascorr section: top-1 of both outputs")
    p.add_argument("--json", help="write every row and ratio here")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")

    import qgraph
    from zoo_manifest import model_path
    tmp = tempfile.mkdtemp(prefix="bench-quant-")
    small, large = args.rss
    cpu = cpu_model()
    print(f"# {cpu}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    ratios: dict = {}
    data: dict[tuple[str, int], str] = {}

    def data_for(zoo: str, n: int) -> str:
        if (zoo, n) not in data:
            data[(zoo, n)] = os.path.join(tmp, f"{zoo}_{n}.npy")
            write_data(zoo, n, data[(zoo, n)])
        return data[(zoo, n)]

    folded: dict[str, str] = {}

    def folded_model(zoo: str) -> str:
        if zoo not in folded:
            folded[zoo] = os.path.join(tmp, f"{zoo}.folded.onnx")
            qgraph.optimize(str(model_path(zoo)), "fold", output=folded[zoo], progress=False)
        return folded[zoo]

    def out(name: str) -> str:
        return os.path.join(tmp, name + ".onnx")

    if "calib" in sections:
        zoo, src = args.zoo, str(model_path(args.zoo))
        for n in (small, large):
            d = data_for(zoo, n)
            rows.append(q_child(src, f"fold,quant:batch_size={args.batch}", d, n, args.batch, out(f"q{n}"),
                                {"section": "calib", "tool": "qgraph", "run": "fold,quant", "n": n}))
            rows.append(ort_child(folded_model(zoo), "minmax", d, n, args.batch, out(f"o{n}"),
                                  {"section": "calib", "tool": "ort", "run": f"MinMax, batch {args.batch}", "n": n}))
        rows.append(ort_child(folded_model(zoo), "minmax", data_for(zoo, small), small, 1, out("o1"),
                              {"section": "calib", "tool": "ort", "run": "MinMax, batch 1", "n": small}))
        for v in args.variants:
            spec = f"fold,quant:{v}" if v.startswith("batch_size=") else f"fold,quant:batch_size={args.batch},{v}"
            rows.append(q_child(src, spec, data_for(zoo, small), small,
                                args.batch, out("qv"), {"section": "calib", "tool": "qgraph",
                                                         "run": f"fold,quant:{v}", "n": small}))
        q = {n: _find(rows, "calib", "qgraph", "fold,quant", n) for n in (small, large)}
        o = {n: _find(rows, "calib", "ort", f"MinMax, batch {args.batch}", n) for n in (small, large)}
        o1 = _find(rows, "calib", "ort", "MinMax, batch 1", small)
        ratios["calib_rss_vs_ort"] = _ratio(q[small], o[small], "peak_rss_mb")
        ratios["calib_rss_vs_ort_batch1"] = _ratio(q[small], o1, "peak_rss_mb")
        ratios[f"calib_rss_{large}_vs_{small}"] = _ratio(q[large], q[small], "peak_rss_mb")
        ratios[f"ort_rss_{large}_vs_{small}"] = _ratio(o[large], o[small], "peak_rss_mb")
        ratios["calib_wall_vs_ort"] = _ratio(q[small], o[small], "wall")

    if "biascorr" in sections:
        zoo = args.zoo
        d = data_for(zoo, small)
        rows.append(q_child(str(model_path(zoo)), BIASCORR_PIPELINE, d, small, args.batch, out("qbc"),
                            {"section": "biascorr", "tool": "qgraph", "run": BIASCORR_PIPELINE, "n": small}))
        py = _nncf(args.nncf)
        if py is not None:
            rows.append(_measure([str(py), str(ROOT / "tools" / "nncf_baseline.py"), "--model", str(model_path(zoo)),
                                  "--calib", d, "--out", out("nbc"), "--no-fast-bias-correction"],
                                 {"section": "biascorr", "tool": "nncf", "run": "fast_bias_correction=False",
                                  "n": small}))
        q = _find(rows, "biascorr", "qgraph", BIASCORR_PIPELINE, small)
        nn = _find(rows, "biascorr", "nncf", "fast_bias_correction=False", small)
        if nn:
            ratios["biascorr_wall_vs_nncf"] = _ratio(q, nn, "wall")
            ratios["biascorr_rss_vs_nncf"] = _ratio(q, nn, "peak_rss_mb")
        if args.accuracy:
            q["top1"] = top1(out("qbc"), zoo)
            if nn and "error" not in nn:
                nn["top1"] = top1(out("nbc"), zoo)
            print(json.dumps({"top1": {"qgraph": q.get("top1"), "nncf": (nn or {}).get("top1")}}), flush=True)

    if "gptq" in sections:
        for zoo in [z for z in args.gptq_models.split(",") if z]:
            d = data_for(zoo, small)
            src = str(model_path(zoo))
            rows.append(q_child(src, f"fold,quant:batch_size={args.batch}", d, small, args.batch, out(f"{zoo}_n"),
                                {"section": "gptq", "tool": "qgraph", "run": f"{zoo} fold,quant", "n": small}))
            rows.append(q_child(src, f"fold,quant:rounding=gptq,batch_size={args.batch}", d, small, args.batch,
                                out(f"{zoo}_g"), {"section": "gptq", "tool": "qgraph",
                                                  "run": f"{zoo} fold,quant:rounding=gptq", "n": small}))
            rows.append(ort_child(folded_model(zoo), "minmax", d, small, args.batch, out(f"{zoo}_o"),
                                  {"section": "gptq", "tool": "ort", "run": f"{zoo} MinMax", "n": small}))
            g = _find(rows, "gptq", "qgraph", f"{zoo} fold,quant:rounding=gptq", small)
            for ref, key in ((_find(rows, "gptq", "qgraph", f"{zoo} fold,quant", small), "nearest"),
                             (_find(rows, "gptq", "ort", f"{zoo} MinMax", small), "ort")):
                ratios[f"gptq_{zoo}_wall_vs_{key}"] = _ratio(g, ref, "wall")
                ratios[f"gptq_{zoo}_rss_vs_{key}"] = _ratio(g, ref, "peak_rss_mb")

    if "methods" in sections:
        zoo = args.zoo
        for method in args.methods:
            for n in (small, large):
                rows.append(q_child(str(model_path(zoo)), f"fold,quant:act_method={method},batch_size={args.batch}",
                                    data_for(zoo, n), n, args.batch, out("qm"),
                                    {"section": "methods", "tool": "qgraph", "run": method, "n": n}))
            # ORT's histogram calibrators keep every activation and need equal batches: one size only
            rows.append(ort_child(folded_model(zoo), method, data_for(zoo, small), small, 10, out("om"),
                                  {"section": "methods", "tool": "ort", "run": method, "n": small}))
            q = _find(rows, "methods", "qgraph", method, small)
            ratios[f"{method}_wall_vs_ort"] = _ratio(q, _find(rows, "methods", "ort", method, small), "wall")
            ratios[f"{method}_rss_vs_ort"] = _ratio(q, _find(rows, "methods", "ort", method, small), "peak_rss_mb")
            ratios[f"{method}_rss_{large}_vs_{small}"] = _ratio(_find(rows, "methods", "qgraph", method, large), q,
                                                               "peak_rss_mb")

    print()
    print(f"{'section':9} {'tool':7} {'run':58} {'n':>4} {'wall s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['section']:9} {r['tool']:7} {r['run'][:58]:58} {r['n']:>4} {r.get('wall', float('nan')):8.1f} "
              f"{r.get('peak_rss_mb', float('nan')):12.0f}  {r.get('error', '')}")
    for k, v in ratios.items():
        print(f"{k:36} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "rows": rows, "ratios": ratios},
                                              indent=2) + "\n")
    return 0


def _find(rows: list[dict], section: str, tool: str, run: str, n: int) -> dict | None:
    return next((r for r in rows if (r["section"], r["tool"], r["run"], r["n"]) == (section, tool, run, n)), None)


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return round(a[key] / b[key], 3)


def _nncf(create: bool) -> Path | None:
    """NNCF's interpreter, when its virtual environment exists (or ``create``)."""
    from zoo_manifest import cache_dir
    py = cache_dir() / "nncf-venv" / "bin" / "python"
    if (cache_dir() / "nncf-venv" / ".qgraph-ready").exists():
        return py
    if not create:
        print("# NNCF: no virtual environment at " + str(py.parent.parent) + " (--nncf creates it)", flush=True)
        return None
    from zoo_baselines import nncf_python
    return nncf_python()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        ap = argparse.ArgumentParser()
        ap.add_argument("_child")
        for a in ("--tool", "--model", "--spec", "--data", "--out", "--input"):
            ap.add_argument(a, required=True)
        ap.add_argument("--n", type=int, required=True)
        ap.add_argument("--batch", type=int, default=4)
        child(ap.parse_args())
    else:
        sys.exit(main())
