"""Baselines: the quantizers users would otherwise pick, on the zoo's calibration/evaluation split.

    ort_qdq_per_tensor / ort_qdq_per_channel
        ONNX Runtime ``quant_pre_process`` (its documented first step: shape inference + graph
        optimization, which folds BN), then ``quantize_static``: QDQ format, QInt8 activations and
        weights (s8s8), MinMax calibration, per_channel False / True, everything else default.
    nncf_default / nncf_bias_correction
        NNCF ``nncf.quantize`` on the ONNX model with its defaults, and with
        ``fast_bias_correction=False``. NNCF runs in its own virtual environment
        (``$QGRAPH_CACHE/nncf-venv``, created on first use with pip install nncf onnx onnxruntime),
        so its pins never touch qgraph's; tools/nncf_baseline.py is the script that runs there.

Calibration: the zoo split's calibration samples (e.g. 100 ImageNet images); evaluation: the
evaluation split, with tools/zoo_eval.py in this environment, against the FP32 model.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qgraph.data import Samples
from zoo_data import zoo_split
from zoo_eval import evaluate, fixed_batch, session
from zoo_manifest import REPO, cache_dir, model_path, zoo_cache

NNCF_PACKAGES = ["nncf", "onnx", "onnxruntime"]


def _out_dir() -> Path:
    d = zoo_cache() / "baselines"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _figures(r: dict) -> dict:
    out = {"size_bytes": r["size_bytes"], "metric": r.get("value", 0.0),
           "max_output_diff": r.get("max_output_diff", 0.0)}
    for k in ("top5", "cosine_min"):
        if k in r:
            out[k] = r[k]
    return out


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a Samples."""

    def __init__(self, samples: Samples, batch: int):
        self.samples, self.batch = samples, batch
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.samples.batches(self.batch))


def run_ort(name: str, log=print) -> dict:
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    src = model_path(name)
    calib, evaluation = zoo_split(name)
    out_dir = _out_dir()
    pre = out_dir / f"{name}.ort_pre.onnx"
    note = "quant_pre_process"
    try:
        # ORT's symbolic shape inference writes temp files into the working directory: keep them out of ours
        import os
        import tempfile
        here = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="qgraph-ortpre-") as tmp:
            os.chdir(tmp)
            try:
                quant_pre_process(str(Path(src).resolve()), str(Path(pre).resolve()))
            finally:
                os.chdir(here)
    except Exception as e:                    # report, then quantize the model as it is
        log(f"{name}: quant_pre_process failed ({type(e).__name__}: {e}); quantizing the FP32 file as is")
        pre, note = src, f"no quant_pre_process ({type(e).__name__})"
    batch = fixed_batch(session(src)) or 10
    results = {}
    for key, per_channel in (("ort_qdq_per_tensor", False), ("ort_qdq_per_channel", True)):
        out = out_dir / f"{name}.{key}.onnx"
        settings = (f"{note}; quantize_static QDQ, activations QInt8, weights QInt8, MinMax, "
                    f"per_channel={per_channel}; {len(calib)} calibration samples")
        t0 = time.perf_counter()
        try:
            quantize_static(str(pre), str(out), Reader(calib, batch), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, per_channel=per_channel)
        except Exception as e:
            results[key] = {"tool": f"onnxruntime {onnxruntime.__version__}", "settings": settings,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        seconds = time.perf_counter() - t0
        r = evaluate(out, name, samples=evaluation)
        results[key] = {"tool": f"onnxruntime {onnxruntime.__version__}", "settings": settings,
                        **_figures(r), "seconds": round(seconds, 1)}
    return results


# ----------------------------------------------------------------------------- NNCF

def nncf_python() -> Path:
    """The NNCF venv's interpreter, created (pip install nncf onnx onnxruntime) when missing."""
    venv = cache_dir() / "nncf-venv"
    py = venv / "bin" / "python"
    marker = venv / ".qgraph-ready"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *NNCF_PACKAGES], check=True)
        marker.write_text(json.dumps(_venv_versions(py)) + "\n")
    return py


def _venv_versions(py: Path) -> dict:
    code = ("import json, importlib.metadata as m; "
            f"print(json.dumps({{p: m.version(p) for p in {NNCF_PACKAGES!r}}}))")
    return json.loads(subprocess.run([str(py), "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def _calib_npz(name: str, calib: Samples) -> Path:
    """The calibration samples as one .npz (keys = input names), for the other environment."""
    path = _out_dir() / f"{name}.calib.npz"
    if not path.exists():
        parts: dict[str, list] = {}
        for feed in calib.batches(32):
            for k, v in feed.items():
                parts.setdefault(k, []).append(v)
        np.savez(path, **{k: np.concatenate(v) for k, v in parts.items()})
    return path


def run_nncf(name: str, log=print) -> dict:
    src = model_path(name)
    calib, evaluation = zoo_split(name)
    py = nncf_python()
    versions = json.loads((py.parent.parent / ".qgraph-ready").read_text())
    npz = _calib_npz(name, calib)
    results = {}
    for key, extra in (("nncf_default", []), ("nncf_bias_correction", ["--no-fast-bias-correction"])):
        out = _out_dir() / f"{name}.{key}.onnx"
        settings = ("nncf.quantize defaults" + (", fast_bias_correction=False" if extra else "") +
                    f"; {len(calib)} calibration samples")
        tool = f"nncf {versions.get('nncf')} (onnxruntime {versions.get('onnxruntime')})"
        log(f"{name}: {key} in {py.parent.parent}")
        t0 = time.perf_counter()
        proc = subprocess.run([str(py), str(REPO / "tools" / "nncf_baseline.py"), "--model", str(src),
                               "--calib", str(npz), "--out", str(out), *extra],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results[key] = {"tool": tool, "settings": settings, "error": tail[:200]}
            continue
        seconds = time.perf_counter() - t0
        r = evaluate(out, name, samples=evaluation)
        results[key] = {"tool": tool, "settings": settings, **_figures(r), "seconds": round(seconds, 1)}
    return results

