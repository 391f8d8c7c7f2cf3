"""fold,cleanup on every ``light_*`` topology that ships inside the onnx wheel.

Their weights are ConstantOfShape nodes (every element equal, so the outputs are degenerate). The
fixture replaces each such weight with seeded random values that look like a trained network's
(He-scaled conv/FC weights, plausible BatchNorm statistics), so that folding has something to get
wrong. Then: onnx.checker passes, ORT runs the result, outputs match the original.

Tolerance 1e-4 relative (max|Δ| / max|ref|): up to 50 folded layers in a row, each a float32
re-association (~1e-7 each), compounded through ReLU nets; a wrong fold gives errors of order 1.
"""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qgraph
from builders import rel_err, run_ort

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512"]
TOL = 1e-4


def randomize_weights(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Replace every ConstantOfShape weight by a seeded random initializer suited to its role."""
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    keep = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in inits[node.input[0]])
        use = readers.get(node.output[0], [])
        op, idx = (use[0][0].op_type, use[0][1]) if use else ("", -1)
        values = _values_for(rng, op, idx, shape, use[0][0] if use else None)
        model.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        if model.ir_version < 4:  # IR < 4 lists every initializer among the graph inputs
            model.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _values_for(rng, op: str, idx: int, shape, node) -> np.ndarray:
    f = np.float32
    if op == "Conv" and idx == 1:
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(f)
    if op == "Gemm" and idx == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        fan_in = shape[1] if trans_b else shape[0]
        return rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(f)
    if op == "BatchNormalization":
        return {1: rng.uniform(0.5, 1.5, shape), 2: rng.normal(0, 0.1, shape),
                3: rng.normal(0, 0.1, shape), 4: rng.uniform(0.5, 1.5, shape)}[idx].astype(f)
    if op == "Mul":
        return rng.uniform(0.5, 1.5, shape).astype(f)
    return rng.normal(0, 0.05, shape).astype(f)  # biases, Add offsets


def data_inputs(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        dims = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.normal(size=dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", NAMES)
def test_fold_cleanup_light_model_matches_original(name):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx wheel")
    original = randomize_weights(onnx.load(str(path)), seed=0)
    bn_before = sum(n.op_type == "BatchNormalization" for n in original.graph.node)

    result, report = qgraph.optimize(original, "fold,cleanup")

    onnx.checker.check_model(result)
    feeds = data_inputs(original, np.random.default_rng(1))
    ref, got = run_ort(original, feeds), run_ort(result, feeds)
    for r, o in zip(ref, got):
        assert r.shape == o.shape
        assert rel_err(r, o) <= TOL
    fold_notes = report.rows[1]["notes"]
    bn_after = report.rows[-1]["ops"].get("BatchNormalization", 0)
    # every BN is either folded or reported with its reason
    assert fold_notes["folded"] + sum(fold_notes.get("skipped", {}).values()) == bn_before
    assert bn_after == bn_before - fold_notes["folded"]
    assert report.rows[-1]["ops"].get("ConstantOfShape", 0) == 0
