"""Execute a lowered ``Program`` step by step from one ``KERNELS`` table (op -> function).

    run(model, {"input": x}, mode="float") -> {output name: array}

``model`` may be a path, a ModelProto, a qgraph.ir Graph or an already lowered Program. With
``trace=True`` every value computed on the way is returned too (for per-layer diffs).
"""
from __future__ import annotations

import numpy as np

from qgraph.errors import ModelError
from qgraph.kernels.lower import Program, lower
from qgraph.kernels.requant import MODES
from qgraph.kernels.table import KERNELS


def run(model, inputs: dict[str, np.ndarray], mode: str = "float", *, trace: bool = False):
    if mode not in MODES:
        raise ModelError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    prog = model if isinstance(model, Program) else lower(model)
    env: dict[str, np.ndarray] = dict(prog.consts)
    for name in prog.inputs:
        if name in prog.consts:
            continue
        if name not in inputs:
            raise ModelError(f"missing input {name!r} (the model needs {', '.join(prog.inputs)})")
        env[name] = np.asarray(inputs[name])
    for step in prog.steps:
        try:
            args = [env[n] if n else None for n in step.inputs]
        except KeyError as exc:
            raise ModelError(f"step {step.name} ({step.op}) reads {exc.args[0]!r}, which nothing computed") from None
        while args and args[-1] is None:
            args.pop()
        try:
            outs = KERNELS[step.op](step, args, mode)
        except ModelError as exc:
            if step.name and step.name in str(exc):
                raise
            raise ModelError(f"node {step.name} ({step.attrs.get('op', step.op)}): {exc}") from None
        for name, value in zip(step.outputs, outs):
            if name:
                env[name] = value
    result = {name: env[name] for name in prog.outputs}
    if trace:
        return result, {k: v for k, v in env.items() if k not in prog.consts}
    return result
