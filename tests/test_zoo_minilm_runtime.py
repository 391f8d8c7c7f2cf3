"""all-MiniLM-L6-v2 through ``qgraph-run`` (``pytest -m zoo``): ``fold,quant`` calibrated on the first
16 calibration sentences, run on all 60 evaluation sentences (batches of 16) in ``float`` mode against ONNX
Runtime (one thread). The output is the float embedding after the last DequantizeLinear (mean pooling
and L2 normalization: ReduceSum over the tokens, ReduceL2, Div), compared bit for bit: the acceptance
bound is >= 99.9% of the elements; on this AMD EPYC (AVX-512 VNNI) with ORT 1.32 it is 100%, the
reductions in ORT's summation order (``kernels/ortreduce.py``; 27.9% with numpy's sums) and the
LayerNormalizations in its kernel's order (``floatops._layernorm``; 98.35% of the 60 sentences
before it). Skipped, saying why, when the model or the data is absent.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.zoo

N = 16


@pytest.mark.parametrize("pipeline", ["fold,quant", "cleanup,quant:act_bits=16"])
def test_minilm_fold_quant_float_output_bit_exact(tmp_path, pipeline):
    """``cleanup,quant:act_bits=16``: every unit float (16-bit borders), MatMul weights written [1, K, N]
    so that ORT runs them as written (not its MatMulNBits rewrite), Softmax in the order of MLAS's kernel
    for this CPU's class (``ortsoftmax``: AVX-512F, FMA3 or SSE2): 100% on this CPU."""
    import qgraph
    from qgraph.kernels import cpu
    from qgraph.kernels.diff import against_ort
    from zoo_data import DataMissing, zoo_split
    from zoo_manifest import model_path
    path = model_path("minilm")
    if not path.exists():
        pytest.skip(f"minilm: {path} not built (python tools/zoo.py build minilm)")
    try:
        calib, evaluation = zoo_split("minilm")
    except DataMissing as e:
        pytest.skip(f"minilm: {e}")
    model, _ = qgraph.optimize(path, pipeline, calib=calib.subset(range(N)), output=tmp_path / "q.onnx",
                               progress=False)
    exact = elements = 0
    for feeds in evaluation.batches(N):
        figures, _, _ = against_ort(model, feeds, "float")
        for f in figures.values():
            exact += f["exact"] * f["elements"]
            elements += f["elements"]
    share = exact / elements
    print(f"minilm {pipeline} sentence_embedding: {100 * share:.4f}% bit-exact of {elements}")
    assert share >= 0.999, share
    if cpu.ort_path().name == "avx512vnni" and cpu.has("avx512f"):     # measured here
        assert share == 1.0, share
