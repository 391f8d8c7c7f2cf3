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
from qgraph.ops import ort_session
from qgraph.kernels.runtime import run
from qgraph.kernels.table import KERNELS


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
    prog = prog or lower(model)
    ours = run(prog, inputs, mode)
    names = [o.name for o in model.graph.output]
    ref = dict(zip(names, ort_session(model, threads=1).run(names, inputs)))
    lsb = output_lsb(model)
    return {n: compare(ours[n], ref[n], lsb.get(n)) for n in names}, ours, ref


def ort_optimized(model: onnx.ModelProto, level: str = "ORT_ENABLE_EXTENDED") -> onnx.ModelProto:
    """The graph ONNX Runtime actually runs on this machine (its QDQ fusions applied), as a model.

    ORT_ENABLE_EXTENDED has every QDQ fusion of the default level (ORT_ENABLE_ALL adds only layout
    changes: NHWC QLinearConv with Transposes, which compute the same integers) and is portable."""
    import os
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def ort_float_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the Conv (FusedConv too) / MatMul / Gemm (FusedGemm too) / Add / Mul / GlobalAveragePool nodes ONNX Runtime
    leaves as float ops, read from its optimized graph: the ground truth that ``lower.ort_float_units`` predicts."""
    opt = ort_optimized(model)
    return {n.name.removeprefix("fused ") if n.op_type == "FusedGemm" else n.name for n in opt.graph.node
            if (n.op_type in ("Conv", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool")
                and n.domain in ("", "ai.onnx"))
            or (n.op_type in ("FusedConv", "FusedGemm") and n.domain == "com.microsoft")}   # float op + activation


def _ort_values(model: onnx.ModelProto, prog: Program, wanted: list[str], inputs: dict) -> dict:
    """ORT's values of our program's tensors ``wanted``, read from the graph ORT runs.

    Adding a QDQ tensor of the original model as a graph output would change what ORT fuses (a Q
    output that is also a graph output blocks the int8 -> uint8 rewrite and the fusion), so the
    optimized graph is exposed instead, with fusions frozen. Its fused nodes are named after the
    node they replace (``<name>`` or ``<name>_token_<n>``); a renamed tensor maps through the name
    of the node that wrote it (a kept Q) or else of the step's node (a fused group). uint8 tensors that ORT rewrote from int8 (same real
    values, codes + 128) come back as int8."""
    opt = ort_optimized(model)
    tensors = {o for n in opt.graph.node for o in n.output} | {i.name for i in opt.graph.input}
    by_node = {}
    for n in opt.graph.node:
        if n.name and n.output:                              # unnamed nodes cannot be traced
            by_node.setdefault(n.name.split("_token_")[0], n.output[0])
    producer = {o: s for s in prog.steps for o in s.outputs}
    writer = {o: n.name for n in model.graph.node for o in n.output if n.name}   # e.g. the Q that made it
    where = {}
    for name in wanted:
        if name in tensors:
            where[name] = name
        elif by_node.get(writer.get(name)):                  # a kept (renamed) Q: same node name
            where[name] = by_node[writer[name]]
        elif name in producer and by_node.get(producer[name].name):   # fused: the group's node
            where[name] = by_node[producer[name].name]
    have = {o.name for o in opt.graph.output}
    for t in set(where.values()) - have:
        opt.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = ort_session(opt, threads=1, optimize=False)   # already optimized
    names = [o.name for o in opt.graph.output]
    feeds = {k: v for k, v in inputs.items() if k in {i.name for i in opt.graph.input}}
    got = dict(zip(names, sess.run(names, feeds)))
    return {ours: got[theirs] for ours, theirs in where.items()
            if np.issubdtype(got[theirs].dtype, np.integer) or ours in prog.outputs}


def per_layer(model: onnx.ModelProto, inputs: dict, mode: str = "float", prog: Program | None = None):
    """Rows (step, op, output, compare) for every integer tensor our program computes and ORT can show.

    "chained": our value vs ORT's; "isolated": the step rerun on ORT's values of its inputs, so one
    op's own error is not mixed with what earlier layers passed on. ORT's values come from its
    optimized graph (``_ort_values``); tensors it cannot trace there are exposed as outputs of the
    model itself, which may change what ORT fuses around them."""
    prog = prog or lower(model)
    _, env = run(prog, inputs, mode, trace=True)
    wanted = [o for s in prog.steps for o in s.outputs if o and np.issubdtype(env[o].dtype, np.integer)]
    wanted += [n for s in prog.steps for n in s.inputs if n and n in env and n not in wanted
               and np.issubdtype(env[n].dtype, np.integer)]
    wanted += [n for n in prog.outputs if n not in wanted]
    ref = {k: _as_dtype(v, env[k].dtype) for k, v in _ort_values(model, prog, wanted, inputs).items()}
    missing = [n for n in wanted if n not in ref]
    if missing:     # not traceable in the optimized graph: expose them in the model itself
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        have = {o.name for o in exposed.graph.output}
        exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in missing if n not in have)
        names = [o.name for o in exposed.graph.output]
        got = dict(zip(names, ort_session(exposed, threads=1).run(names, inputs)))
        ref.update({n: got[n] for n in missing if n in got})
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


def _as_dtype(v: np.ndarray, dtype) -> np.ndarray:
    """ORT's value in our storage type: ORT rewrites int8 Q/DQ pairs to uint8 (codes + 128)."""
    v = np.asarray(v)
    if v.dtype == np.uint8 and np.dtype(dtype) == np.int8:
        return (v.astype(np.int16) - 128).astype(np.int8)
    if v.dtype == np.int8 and np.dtype(dtype) == np.uint8:
        return (v.astype(np.int16) + 128).astype(np.uint8)
    return v


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
