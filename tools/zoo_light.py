"""The onnx wheel's light topologies (onnx/backend/test/data/light/*.onnx) as zoo models.

The wheel ships them with every weight a ConstantOfShape fill (0.02) at opset 9. The build gives
them seeded weights drawn by role, fits every BatchNormalization's mean/var to its own input
statistics (so each BN normalizes and activations stay finite through 50+ layers), upgrades the
graph to opset 17 and checks it against the opset-9 original carrying the same weights.
Structure only: there is no accuracy to measure, only output differences.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from zoo_manifest import zoo_cache
from zoo_onnx import EXPORT_TOL, OPSET, BuildError, op_counts, save_model

LIGHT_SEED = 0
LIGHT_VERSION = 1            # bump when the light weights / BN fitting change


def light_source(file: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / file


def build_light(name: str, src: str, out: Path, log) -> dict:
    """An onnx-wheel light model with seeded weights, BN statistics fitted to its own activations,
    upgraded to opset 17 (IR 8, initializers not graph inputs). Checked: same outputs as the
    opset-9 original carrying the same weights."""
    from zoo_eval import session
    path = light_source(src)
    if not path.exists():
        raise BuildError(f"{name}: {path} is not in the installed onnx wheel")
    m9 = onnx.load(str(path))
    weights = _light_weights(m9, np.random.default_rng(LIGHT_SEED))
    m9 = _with_weights(m9, weights)
    log(f"{name}: {len(weights)} weight tensors, {sum(w.size for w in weights.values()):,} parameters")
    m9 = _fit_batchnorm(m9, log)
    m = onnx.version_converter.convert_version(m9, OPSET)
    m.ir_version = 8
    m.graph.ClearField("value_info")
    m.metadata_props.append(onnx.StringStringEntryProto(key="qgraph.zoo.name", value=name))
    m.metadata_props.append(onnx.StringStringEntryProto(
        key="qgraph.zoo.source", value=f"onnx {onnx.__version__} backend/test/data/light/{src}, "
                                       f"weights seeded {LIGHT_SEED}"))
    onnx.checker.check_model(m)
    save_model(m, out)
    # same function as the opset-9 model with the same weights
    tmp9 = out.with_name(f".{out.stem}.opset9.onnx")
    onnx.save(m9, str(tmp9))
    try:
        s9, s17 = session(tmp9), session(out)
        name_in = s17.get_inputs()[0].name
        shape = [d if isinstance(d, int) else 1 for d in s17.get_inputs()[0].shape]
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        y9, y17 = s9.run(None, {name_in: x}), s17.run(None, {name_in: x})
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(y9, y17))
        scale = max(float(np.max(np.abs(a))) for a in y9)
    finally:
        tmp9.unlink()
    if diff > EXPORT_TOL * max(1.0, scale):
        raise BuildError(f"{name}: opset-{OPSET} model differs from the original by {diff:.3g}")
    counts = op_counts(m)
    return {"op_counts": counts, "batchnorm": counts.get("BatchNormalization", 0),
            "check": {"opset9_max_abs_diff": diff, "output_max_abs": scale}}


def _consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list] = {}
    for n in g.node:
        for i, t in enumerate(n.input):
            uses.setdefault(t, []).append((n, i))
    return uses


def _light_weights(m: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded weights for every constant the light model carries (ConstantOfShape fills and
    initializers), drawn by role so activations stay in a sane range:
    Conv/Gemm weights He-normal, biases U(-0.1, 0.1), BN scale U(0.5, 1.5), BN bias N(0, 0.1),
    a per-channel Mul after BN U(0.5, 1.5), an Add N(0, 0.1). BN mean/var are fitted later."""
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    shape_inputs = {n.input[0] for n in g.node if n.op_type == "ConstantOfShape"}
    shapes = {n.output[0]: tuple(int(d) for d in inits[n.input[0]])
              for n in g.node if n.op_type == "ConstantOfShape"}
    shapes.update({k: v.shape for k, v in inits.items() if k not in shape_inputs and v.dtype == np.float32})
    uses = _consumers(g)
    out: dict[str, np.ndarray] = {}
    for t, shape in shapes.items():
        node, idx = uses[t][0] if t in uses else (None, -1)
        op = node.op_type if node is not None else ""
        if op == "Unsqueeze":                     # densenet: BN -> Mul(scale) -> Add(bias)
            nxt = uses.get(node.output[0], [(None, -1)])[0][0]
            op = "Mul" if nxt is not None and nxt.op_type == "Mul" else "Add"
            idx = 1
        if op in ("Conv", "Gemm") and idx == 1:
            if op == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                fan_in = shape[1] if trans_b else shape[0]
            else:
                fan_in = int(np.prod(shape[1:]))
            w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op in ("Conv", "Gemm") and idx == 2:
            w = rng.uniform(-0.1, 0.1, shape)
        elif op == "BatchNormalization":
            w = {1: lambda: rng.uniform(0.5, 1.5, shape), 2: lambda: rng.normal(0, 0.1, shape),
                 3: lambda: np.zeros(shape), 4: lambda: np.ones(shape)}[idx]()
        elif op == "Mul":
            w = rng.uniform(0.5, 1.5, shape)
        else:
            w = rng.normal(0, 0.1, shape)
        out[t] = w.astype(np.float32)
    return out


def _with_weights(m: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Drop the ConstantOfShape fills and their shape tensors; weights become initializers."""
    g = m.graph
    fills = [n for n in g.node if n.op_type == "ConstantOfShape"]
    shape_names = {n.input[0] for n in fills}
    new = onnx.ModelProto()
    new.CopyFrom(m)
    ng = new.graph
    ng.ClearField("node")
    ng.node.extend(n for n in g.node if n.op_type != "ConstantOfShape")
    others = [t for t in g.initializer if t.name not in weights and t.name not in shape_names]
    ng.ClearField("initializer")
    ng.initializer.extend(others)
    ng.initializer.extend(numpy_helper.from_array(w, k) for k, w in weights.items())
    init_names = {t.name for t in ng.initializer} | shape_names
    keep = [i for i in g.input if i.name not in init_names]
    ng.ClearField("input")
    ng.input.extend(keep)
    new.ir_version = max(new.ir_version, 4)      # initializers need not be graph inputs from IR 4
    return new


def _fit_batchnorm(m: onnx.ModelProto, log, samples: int = 4, max_iter: int = 200) -> onnx.ModelProto:
    """Set each BN's mean/var to the statistics of its own input under seeded N(0,1) images, so
    every BN normalizes. BN i's input depends on BNs before it: repeat (run, set all) until no
    statistic moves (at most the BN depth of the graph)."""
    from zoo_eval import session
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return m
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    stat_names = [t for n in bns for t in (n.input[3], n.input[4])]
    stats = {t.name: numpy_helper.to_array(t) for t in probe.graph.initializer if t.name in stat_names}
    keep = [t for t in probe.graph.initializer if t.name not in stats]
    probe.graph.ClearField("initializer")
    probe.graph.initializer.extend(keep)
    for t in stat_names:       # statistics become inputs: one session for every iteration
        probe.graph.input.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, list(stats[t].shape)))
    for n in bns:
        probe.graph.output.append(helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    tmp = zoo_cache() / ".bn_probe.onnx"
    onnx.save(probe, str(tmp))
    try:
        sess = session(tmp)
        x_in = [i for i in sess.get_inputs() if i.name not in stats][0]
        shape = [d if isinstance(d, int) else 1 for d in x_in.shape]
        rng = np.random.default_rng(2)
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(samples)]
        first_out = len(m.graph.output)
        for it in range(max_iter):
            acts = [sess.run(None, {x_in.name: x, **stats})[first_out:] for x in xs]
            moved = 0.0
            for k, n in enumerate(bns):
                a = np.concatenate([np.moveaxis(r[k], 1, 0).reshape(r[k].shape[1], -1) for r in acts], 1)
                with np.errstate(all="ignore"):
                    a = a.astype(np.float64)
                    mean, var = a.mean(1), a.var(1) + 1e-3
                if not (np.abs(mean).max() < 1e30 and var.max() < 1e30):
                    moved = np.inf     # overflow upstream of a BN not yet fitted: next pass
                    continue
                old_m, old_v = stats[n.input[3]].astype(np.float64), stats[n.input[4]].astype(np.float64)
                with np.errstate(all="ignore"):
                    change = max(float(np.max(np.abs(mean - old_m) / np.sqrt(var))),
                                 float(np.max(np.abs(np.log(var / old_v)))))
                moved = max(moved, change if np.isfinite(change) else np.inf)
                stats[n.input[3]], stats[n.input[4]] = mean.astype(np.float32), var.astype(np.float32)
            if moved < 1e-3:
                break
        if moved >= 1e-3:
            raise BuildError(f"BN statistics did not settle in {max_iter} passes")
        log(f"BN statistics fitted ({len(bns)} BN, {it + 1} passes)")
    finally:
        tmp.unlink(missing_ok=True)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name in stats:
            t.CopyFrom(numpy_helper.from_array(stats[t.name], t.name))
    return out
