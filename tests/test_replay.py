"""replay: segments of a graph between given tensors, a per-batch cache that spills to files, and
running a segment over the batches with its inputs from the cache or the samples."""
import os

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model, run_ort
from qgraph import ir
from qgraph.data import open_samples
from qgraph.errors import ModelError
from qgraph.replay import BatchCache, replay


def diamond(rng):
    #   x ─Relu─ r ─┬─Mul(k)─ m ─┐
    #               └────────────┴─Add─ y
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
             helper.make_node("Add", ["r", "m"], ["y"], name="add")]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 4])],
                      [init("k", rng.normal(size=(4,)).astype(np.float32))])


def test_segment_computes_outputs_from_given_tensors_and_leaves_the_graph_alone(rng):
    g = ir.load(diamond(rng))
    before = [n.name for n in g.nodes]
    seg = ir.segment(g, ["y"], {"r": np.float32})
    assert [n.op_type for n in seg.graph.node] == ["Mul", "Add"]
    assert [i.name for i in seg.graph.input] == ["r"] and [o.name for o in seg.graph.output] == ["y"]
    r = np.abs(rng.normal(size=(3, 4))).astype(np.float32)
    k = ir.const(next(t for t in g.tensors().values() if t.name == "k"))
    np.testing.assert_allclose(run_ort(seg, {"r": r})[0], r + r * k, rtol=1e-6)   # float32 ops, as ORT does
    assert [n.name for n in g.nodes] == before and [t.name for t in g.outputs] == ["y"]


def test_segment_names_a_tensor_it_cannot_reach(rng):
    g = ir.load(diamond(rng))
    with pytest.raises(ModelError, match="'x' is needed"):
        ir.segment(g, ["y"], {"m": np.float32})


def test_cache_spills_beyond_its_budget_and_reads_back_the_same_values(rng, tmp_path):
    a, b = rng.normal(size=(5, 4)).astype(np.float32), np.arange(6, dtype=np.int8)
    with BatchCache(budget_bytes=a.nbytes, directory=str(tmp_path)) as cache:
        cache.put("a", 0, a)          # fits
        cache.put("b", 0, b)          # over the budget: a file
        assert cache.in_memory == a.nbytes and cache.spilled == b.nbytes
        files = list(tmp_path.rglob("*.npy"))
        assert len(files) == 1
        np.testing.assert_array_equal(cache.get("a", 0), a)
        np.testing.assert_array_equal(cache.get("b", 0), b)
        cache.drop("b")
        assert not any(p.exists() for p in files) and "b" not in cache
    assert not list(tmp_path.iterdir())   # the temporary directory is gone


def test_replay_chains_two_segments_through_the_cache(rng):
    g = ir.load(diamond(rng))
    x = rng.normal(size=(10, 4)).astype(np.float32)
    samples = open_samples({"x": x}, ["x"])
    with BatchCache(budget_bytes=1 << 20) as cache:
        first = ir.segment(g, ["r"], {"x": np.float32})
        assert list(replay(first, samples, cache, keep=["r"], batch_size=4)) == [{}, {}, {}]
        second = ir.segment(g, ["y"], {"r": np.float32})
        y = np.concatenate([v["y"] for v in replay(second, samples, cache, keep=[], batch_size=4)])
    np.testing.assert_array_equal(y, run_ort(ir.to_model(g), {"x": x})[0])   # same float32 ops, same order
