"""Tiny graphs with coupled channels, shared by test_channels.py and test_prune.py (importable as
``channel_models``: pytest's pythonpath holds tests/). Every builder draws its graph."""
from __future__ import annotations

import numpy as np
from onnx import helper

from builders import bn_node, bn_params, init, make_model

H = W = 6


def _w(rng, *shape, scale=0.5):
    return rng.normal(0, scale, shape).astype(np.float32)


def _conv(name, x, y, w, *, b=None, group=1, pads=1):
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [y], name=name, group=group, pads=[pads] * 4)


def chain(rng, c=8):
    #   x ─Conv1(3→c)─ a ─BN─ b ─Relu─ r ─Conv2(c→4)─ y
    inits = [init("w1", _w(rng, c, 3, 3, 3)), init("b1", _w(rng, c)), *bn_params(rng, c),
             init("w2", _w(rng, 4, c, 3, 3))]
    nodes = [_conv("conv1", "x", "a", "w1", b="b1"), bn_node("a", "b"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"), _conv("conv2", "r", "y", "w2")]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 4, H, W])], inits)


def residual(rng, c=8):
    #   x ─Conv0─ s ─┬──────────────────────────────┐
    #                └─Conv1─Relu─ h ─Conv2─ t ─────Add─ u ─Relu─ v ─Conv3─ y
    inits = [init("w0", _w(rng, c, 3, 1, 1)), init("w1", _w(rng, c, c, 3, 3)), init("w2", _w(rng, c, c, 3, 3)),
             init("w3", _w(rng, 4, c, 1, 1)), init("b2", _w(rng, c))]
    nodes = [_conv("conv0", "x", "s", "w0", pads=0), _conv("conv1", "s", "h0", "w1"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu1"), _conv("conv2", "h", "t", "w2", b="b2"),
             helper.make_node("Add", ["t", "s"], ["u"], name="add"), helper.make_node("Relu", ["u"], ["v"], name="relu2"),
             _conv("conv3", "v", "y", "w3", pads=0)]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 4, H, W])], inits)


def concat(rng):
    #   x ─ConvA(3→5)─ a ─┐
    #                     ├─Concat─ c (11) ─Relu─ r ─Conv(11→4)─ y
    #   x ─ConvB(3→6)─ b ─┘
    inits = [init("wa", _w(rng, 5, 3, 3, 3)), init("wb", _w(rng, 6, 3, 1, 1)), init("wc", _w(rng, 4, 11, 3, 3))]
    nodes = [_conv("convA", "x", "a", "wa"), _conv("convB", "x", "b", "wb", pads=0),
             helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), _conv("convC", "r", "y", "wc")]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 4, H, W])], inits)


def depthwise(rng, c=12):
    #   x ─Conv(expand 4→c)─ e ─Clip(0,6)─ f ─DWConv(c, group=c)─ d ─Clip─ k ─Conv(project c→4)─ y
    inits = [init("we", _w(rng, c, 4, 1, 1)), init("be", _w(rng, c)), init("wd", _w(rng, c, 1, 3, 3)),
             init("bd", _w(rng, c)), init("wp", _w(rng, 4, c, 1, 1)), init("lo", np.float32(0)), init("hi", np.float32(6))]
    nodes = [_conv("expand", "x", "e", "we", b="be", pads=0), helper.make_node("Clip", ["e", "lo", "hi"], ["f"]),
             _conv("dw", "f", "d", "wd", b="bd", group=c), helper.make_node("Clip", ["d", "lo", "hi"], ["k"]),
             _conv("project", "k", "y", "wp", pads=0)]
    return make_model(nodes, [("x", [2, 4, H, W])], [("y", [2, 4, H, W])], inits)


def flatten_gemm(rng, c=6):
    #   x ─Conv(3→c)─ a ─Relu─ r [N,c,3,3] ─Flatten─ f [N, 9c] ─Gemm(9c→10)─ y
    inits = [init("w", _w(rng, c, 3, 3, 3)), init("fc", _w(rng, 10, 9 * c)), init("fb", _w(rng, 10))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 10])], inits)


def shuffle(rng, g=2, k=4, g2=None):
    #   x ─GConv(g groups, 2g→g·k)─ a ─Reshape[N,g,k,H,W]─Transpose(0,2,1,3,4)─Reshape[N,g·k,H,W]─ s
    #     ─DWConv─ d ─GConv(g2 groups, g·k→2·g2)─ y
    c, g2 = g * k, g2 or g
    inits = [init("w1", _w(rng, c, 2, 1, 1)), init("wd", _w(rng, c, 1, 3, 3)),
             init("w2", _w(rng, 2 * g2, c // g2, 1, 1)), init("s1", np.array([2, g, k, H, W], np.int64)),
             init("s2", np.array([2, c, H, W], np.int64))]
    nodes = [_conv("g1", "x", "a", "w1", group=g, pads=0),
             helper.make_node("Reshape", ["a", "s1"], ["a5"], name="split_groups"),
             helper.make_node("Transpose", ["a5"], ["t5"], name="swap", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s2"], ["s"], name="merge"),
             _conv("dw", "s", "d", "wd", group=c), _conv("g2", "d", "y", "w2", group=g2, pads=0)]
    return make_model(nodes, [("x", [2, 2 * g, H, W])], [("y", [2, 2 * g2, H, W])], inits)


def squeeze_excite(rng, c=8, r=4):
    #   x ─Conv(3→c)─ t ─┬────────────────────────────────────────────────────── Mul ─ m ─Conv(c→4)─ y
    #                    └─GlobalAveragePool─ p ─Conv(c→r)─Relu─Conv(r→c)─Sigmoid─ s ─┘
    inits = [init("w", _w(rng, c, 3, 3, 3)), init("w1", _w(rng, r, c, 1, 1)), init("b1", _w(rng, r)),
             init("w2", _w(rng, c, r, 1, 1)), init("b2", _w(rng, c)), init("wo", _w(rng, 4, c, 1, 1))]
    nodes = [_conv("conv", "x", "t", "w"), helper.make_node("GlobalAveragePool", ["t"], ["p"], name="gap"),
             _conv("se_reduce", "p", "q", "w1", b="b1", pads=0), helper.make_node("Relu", ["q"], ["q2"], name="se_relu"),
             _conv("se_expand", "q2", "e", "w2", b="b2", pads=0), helper.make_node("Sigmoid", ["e"], ["s"], name="gate"),
             helper.make_node("Mul", ["t", "s"], ["m"], name="scale"), _conv("out", "m", "y", "wo", pads=0)]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 4, H, W])], inits)


def grouped(rng, groups=2):
    #   x ─Conv(3→8)─ a ─Relu─ r ─GConv(8→8, 2 groups of 4)─ b ─Relu─ s ─Conv(8→4)─ y
    inits = [init("w1", _w(rng, 8, 3, 3, 3)), init("w2", _w(rng, 8, 8 // groups, 3, 3)), init("b2", _w(rng, 8)),
             init("w3", _w(rng, 4, 8, 1, 1))]
    nodes = [_conv("conv1", "x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             _conv("gconv", "r", "b", "w2", b="b2", group=groups), helper.make_node("Relu", ["b"], ["s"], name="relu2"),
             _conv("conv3", "s", "y", "w3", pads=0)]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y", [2, 4, H, W])], inits)


def split_slice(rng):
    #   x ─Conv(3→10)─ a ─Split(axis 1: 4, 6)─ a0 ─Conv(4→4)────────── y0
    #                                         └ a1 ─Slice(ch 1:5)─ z ─Conv(4→4)─ y1
    inits = [init("w", _w(rng, 10, 3, 3, 3)), init("sp", np.array([4, 6], np.int64)), init("w0", _w(rng, 4, 4, 1, 1)),
             init("w1", _w(rng, 4, 4, 1, 1)), init("st", np.array([1], np.int64)), init("en", np.array([5], np.int64)),
             init("ax", np.array([1], np.int64))]
    nodes = [_conv("conv", "x", "a", "w"), helper.make_node("Split", ["a", "sp"], ["a0", "a1"], name="split", axis=1),
             _conv("c0", "a0", "y0", "w0", pads=0), helper.make_node("Slice", ["a1", "st", "en", "ax"], ["z"], name="slice"),
             _conv("c1", "z", "y1", "w1", pads=0)]
    return make_model(nodes, [("x", [2, 3, H, W])], [("y0", [2, 4, H, W]), ("y1", [2, 4, H, W])], inits)
