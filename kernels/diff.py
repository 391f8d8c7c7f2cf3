"""Diff our integer runtime against ONNX Runtime in units of the last bit (LSB).

``compare`` turns two arrays into figures (fraction bit-exact, max |delta| in LSB, histogram);
``against_ort`` runs a model both ways; ``per_layer`` exposes every quantized tensor of the model as
an ORT output and compares them in program order, to find the first layer that diverges (and also
reruns each step on ORT's own inputs, "isolated", to separate an op's error from inherited ones), and
``fixed_vs_float_per_layer`` runs each step in ``fixed`` mode on the ``float`` mode inputs (so errors
do not compound) to bound what integer-only requantization changes per layer.
"""
from __future__ import annotations

import numpy as np
import onnx

from qgraph.kernels.lower import Program, lower
from qgraph.kernels.runtime import KERNELS, run


def compare(ours: np.ndarray, ref: np.ndarray, lsb: float | None = None) -> dict:
    """Figures for one output. Integer outputs are in LSB already; float outputs divide by ``lsb``."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return {"shape_mismatch": [list(ours.shape), list(ref.shape)]}
    if np.issubdtype(ref.dtype, np.integer):
        delta = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    else:
        d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
        delta = np.rint(d / lsb).astype(np.int64) if lsb else (d > 0).astype(np.int64)
    values, counts = np.unique(delta, return_counts=True)
    return {"elements": int(delta.size), "exact": float(np.mean(delta == 0)) if delta.size else 1.0,
            "max_lsb": int(delta.max(initial=0)),
            "histogram": {int(v): int(c) for v, c in zip(values, counts)}}


def output_lsb(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of the DequantizeLinear that produces each float graph output (its LSB), when constant."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    lsb = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in inits:
            s = inits[node.input[1]]
            if s.size == 1:
                lsb[node.output[0]] = float(s.reshape(-1)[0])
    return {o.name: lsb.get(o.name) for o in model.graph.output}


def against_ort(model: onnx.ModelProto, inputs: dict, mode: str = "float", prog: Program | None = None):
    """{output: compare(...)} for our runtime vs ORT (one thread) on the same inputs."""
    from qgraph.instruments import ort_session
    prog = prog or lower(model)
    ours = run(prog, inputs, mode)
    names = [o.name for o in model.graph.output]
    ref = dict(zip(names, ort_session(model, threads=1).run(names, inputs)))
    lsb = output_lsb(model)
    return {n: compare(ours[n], ref[n], lsb.get(n)) for n in names}, ours, ref


def per_layer(model: onnx.ModelProto, inputs: dict, mode: str = "float", prog: Program | None = None):
    """Rows (step, op, output, compare) for every integer tensor our program computes and ORT can show."""
    from qgraph.instruments import ort_session
    prog = prog or lower(model)
    _, env = run(prog, inputs, mode, trace=True)
    wanted = [o for s in prog.steps for o in s.outputs if o and np.issubdtype(env[o].dtype, np.integer)]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    for name in wanted:
        if name not in have:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    names = [o.name for o in exposed.graph.output]
    ref = dict(zip(names, ort_session(exposed, threads=1).run(names, inputs)))
    # "isolated": the step rerun on ORT's values of its inputs, so one op's own error is not mixed
    # with what earlier layers passed on
    ort_env = {**prog.consts, **inputs, **ref}
    rows = []
    for step in prog.steps:
        iso = None
        if all(not n or n in ort_env for n in step.inputs):
            args = [ort_env[n] if n else None for n in step.inputs]
            while args and args[-1] is None:
                args.pop()
            iso = dict(zip(step.outputs, KERNELS[step.op](step, args, mode)))
        for o in step.outputs:
            if o in ref and o in env:
                row = {"step": step.name, "op": step.attrs.get("op", step.op), "output": o, **compare(env[o], ref[o])}
                if iso is not None and o in iso:
                    f = compare(iso[o], ref[o])
                    row["isolated"] = {"exact": f.get("exact"), "max_lsb": f.get("max_lsb")}
                rows.append(row)
    return rows


def fixed_vs_float_per_layer(prog: Program, inputs: dict) -> list[dict]:
    """Each step run in ``fixed`` mode on the ``float``-mode values of its inputs, compared per output."""
    _, env = run(prog, inputs, "float", trace=True)
    env = {**prog.consts, **env}
    rows = []
    for step in prog.steps:
        args = [env[n] if n else None for n in step.inputs]
        while args and args[-1] is None:
            args.pop()
        outs = KERNELS[step.op](step, args, "fixed")
        for name, value in zip(step.outputs, outs):
            if name and np.issubdtype(np.asarray(value).dtype, np.integer):
                rows.append({"step": step.name, "op": step.attrs.get("op", step.op), "output": name,
                             **compare(value, env[name])})
    return rows
