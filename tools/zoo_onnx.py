"""What both zoo builders share (tools/zoo_build.py: PyTorch recipes and checked-in files;
tools/zoo_light.py: the onnx wheel's light topologies): the opset they write, the tolerance a built
model is checked to, their error, op counts and the atomic save of a built file.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx

OPSET = 17
EXPORT_TOL = 1e-4            # max |ONNX Runtime - PyTorch| on logits / embeddings


class BuildError(RuntimeError):
    pass


def op_counts(m: onnx.ModelProto) -> dict:
    """Op type -> number of nodes, sorted by op type."""
    return dict(sorted(Counter(n.op_type for n in m.graph.node).items()))


def save_model(m: onnx.ModelProto, out: Path) -> None:
    """Write ``m`` to ``out`` through a temporary file beside it, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, out)
