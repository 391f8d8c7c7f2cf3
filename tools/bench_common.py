"""What the runtime comparisons share (tools/bench_kernels.py, tools/runtime_zoo.py and the zoo
runtime tests): the host's CPU as printed beside every figure, and the one-thread ONNX Runtime
session our kernels are measured and diffed against.
"""
from __future__ import annotations

import platform
from pathlib import Path

import onnx


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD / matrix extensions our int8 kernels care about, as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def one_thread_session(model: onnx.ModelProto):
    """ORT on the CPU, one intra-op and one inter-op thread, default graph optimizations."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
