"""The channel view (qgraph.channels): which channels are coupled, and why a group is frozen.

Each test builds a tiny graph (drawn in tests/channel_models.py or above the test) and checks the
groups: which tensors share a unit, how channel ids map across Concat / Flatten / shuffle, the balance
classes of grouped convolutions, and the reason every unsupported coupling reports.
"""
import networkx as nx
import numpy as np
import onnx
from onnx import helper

import channel_models as cm
from builders import init, make_model
from qgraph import ir
from qgraph.analysis import channel_graph as analysis_channel_graph, dependency_groups as analysis_groups
from qgraph.channel_rules import reshape_map
from qgraph.channels import channel_graph, dependency_groups


def groups_of(model):
    return dependency_groups(ir.load(model))


def group_with(deps, tensor):
    return next(grp for grp in deps.groups if tensor in grp.tensors)


def test_analysis_reexports_the_channel_view():
    assert analysis_channel_graph is channel_graph and analysis_groups is dependency_groups


def test_channel_graph_is_an_annotated_networkx_view_rebuilt_on_demand(rng):
    g = ir.load(cm.chain(rng))
    view = channel_graph(g)
    assert isinstance(view, nx.DiGraph)
    assert view.nodes[("tensor", "a")]["axis"] == 1 and view.nodes[("tensor", "a")]["channels"] == 8
    assert view.nodes[("tensor", "y")]["frozen"] == ["graph_output"]
    conv = next(k for k, d in view.nodes(data=True) if d.get("name") == "conv1")
    assert view.has_edge(("tensor", "x"), conv) and view.has_edge(conv, ("tensor", "a"))
    # a new view sees the graph as it is now: nothing is kept in sync by hand
    g.outputs.append(g.tensors()["r"])
    assert "graph_output" in channel_graph(g).nodes[("tensor", "r")]["frozen"]
    assert "graph_output" not in view.nodes[("tensor", "r")]["frozen"]


def test_chain_couples_conv_bn_relu_and_the_next_layers_input(rng):
    deps = groups_of(cm.chain(rng))
    grp = group_with(deps, "a")
    assert grp.tensors == ["a", "b", "r"] and grp.size == 8 and not grp.frozen
    assert grp.producers == ["conv1"] and grp.consumers == ["conv2"]
    assert deps.unit_atoms(grp.units[[2]]) == {"a": [2], "b": [2], "r": [2]}


def test_residual_add_couples_both_branches_and_every_reader(rng):
    deps = groups_of(cm.residual(rng))
    grp = group_with(deps, "s")
    assert set(grp.tensors) == {"s", "t", "u", "v"}
    assert set(grp.producers) == {"conv0", "conv2"} and set(grp.consumers) == {"conv1", "conv3"}
    inner = group_with(deps, "h")                 # conv1 -> conv2 inside the block: free of the residual
    assert set(inner.tensors) == {"h0", "h"} and not inner.frozen


def test_concat_maps_each_input_to_its_offset(rng):
    deps = groups_of(cm.concat(rng))
    b = group_with(deps, "b")
    assert b.size == 6
    assert {k: list(v) for k, v in deps.unit_atoms(b.units[[1]]).items()} == {"b": [1], "c": [6], "r": [6]}
    a = group_with(deps, "a")
    assert {k: list(v) for k, v in deps.unit_atoms(a.units[[4]]).items()} == {"a": [4], "c": [4], "r": [4]}


def test_flatten_ties_a_channel_to_its_block_of_features(rng):
    deps = groups_of(cm.flatten_gemm(rng, c=6))
    grp = group_with(deps, "r")
    assert grp.size == 6 and grp.consumers == ["fc"]
    assert list(deps.unit_atoms(grp.units[[2]])["f"]) == list(range(18, 27))      # 3x3 positions of channel 2


def test_depthwise_conv_ties_its_input_and_output_channels(rng):
    deps = groups_of(cm.depthwise(rng, c=12))
    grp = group_with(deps, "e")
    assert set(grp.tensors) == {"e", "f", "d", "k"} and grp.size == 12
    assert set(grp.producers) == {"expand", "dw"} and set(grp.consumers) == {"dw", "project"}


def test_channel_shuffle_prunes_the_same_index_of_every_group(rng):
    deps = groups_of(cm.shuffle(rng, g=2, k=4))
    grp = group_with(deps, "a")
    unit = {k: list(v) for k, v in deps.unit_atoms(grp.units[[1]]).items()}
    assert unit["a"] == [1, 5]                     # index 1 of each of the 2 groups of g1's output
    assert unit["s"] == [2, 3] and unit["d"] == [2, 3]    # after the shuffle: one block of 2
    # g2 reads 2 groups of 4: blocks 0,1 sit in its first group, 2,3 in its second: rounds of one each
    assert grp.classes is not None and sorted(set(grp.classes.tolist())) == [0, 1]


def test_squeeze_excite_gate_is_tied_to_the_tensor_it_scales(rng):
    deps = groups_of(cm.squeeze_excite(rng))
    grp = group_with(deps, "t")
    assert {"t", "p", "e", "s", "m"} <= set(grp.tensors)
    assert set(grp.producers) == {"conv", "se_expand"} and set(grp.consumers) == {"se_reduce", "out"}
    assert not group_with(deps, "q").frozen        # the squeezed channels are a group of their own


def test_grouped_conv_balances_its_groups(rng):
    deps = groups_of(cm.grouped(rng, groups=2))
    inp = group_with(deps, "r")
    assert inp.classes is not None and list(inp.classes) == [0, 0, 0, 0, 1, 1, 1, 1]
    out = group_with(deps, "b")
    assert list(out.classes) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert inp.id != out.id                          # wider groups: inputs and outputs stay independent


def test_split_and_slice_map_channel_offsets(rng):
    deps = groups_of(cm.split_slice(rng))
    assert group_with(deps, "a0").tensors == ["a", "a0"]
    grp = group_with(deps, "z")                       # a[5:9] = a1[1:5] = z
    assert {k: list(v) for k, v in deps.unit_atoms(grp.units[[1]]).items()} == {"a": [6], "a1": [2], "z": [1]}
    outside = [g for g in deps.groups if g.tensors == ["a", "a1"]]   # a1[0], a1[5]: read by no layer
    assert len(outside) == 1 and outside[0].size == 2 and outside[0].consumers == []


def test_reshape_map_cases():
    # whole axis, inner split (shuffle rows), merge with what follows (Flatten), mixing (refused)
    assert reshape_map((None, 6, 4, 4), 1, (None, 6, 16))[0] == 1
    axis, cin, cout = reshape_map((None, 6, 4, 4), 1, (None, 2, 3, 4, 4))
    assert axis == 2 and list(cout) == [0, 1, 2, 0, 1, 2]
    axis, cin, cout = reshape_map((None, 6, 2, 2), 1, (None, 24))
    assert axis == 1 and list(cin[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert reshape_map((None, 6, 4, 4), 1, (None, 4, 6, 4)) is None


# --------------------------------------------------------------------------- frozen, with reasons

def _reasons(model, tensor):
    return group_with(groups_of(model), tensor).frozen


def _conv_then(op_nodes, extra_inits=(), out_shape=(2, 4, 6, 6), opset=17, domain_ops=()):
    #   x ─Conv(3→4)─ a ─<op under test>─ y
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]), *op_nodes]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", list(out_shape))],
                       [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), *extra_inits], opset=opset)
    for d in domain_ops:
        model.opset_import.append(helper.make_opsetid(d, 1))
    return model


def test_graph_output_is_frozen(rng):
    assert _reasons(cm.chain(rng), "y") == ["graph_output"]


def test_lrn_is_frozen_as_normalizing_across_channels():
    model = _conv_then([helper.make_node("LRN", ["a"], ["y"], size=3)])
    assert "normalizes_across_channels:LRN" in _reasons(model, "a")


def test_softmax_over_channels_is_frozen_and_over_space_is_not():
    over_c = _conv_then([helper.make_node("Softmax", ["a"], ["y"], axis=1)])
    assert "normalizes_across_channels:Softmax" in _reasons(over_c, "a")
    over_w = _conv_then([helper.make_node("Softmax", ["a"], ["b"], axis=3), helper.make_node("Relu", ["b"], ["y"])])
    assert _reasons(over_w, "a") == ["graph_output"]           # frozen only because y is the output


def test_unknown_op_is_frozen_with_its_name():
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("Foo", ["a"], ["b"], domain="custom.x"),
         helper.make_node("Relu", ["b"], ["y"])], "t",
        [helper.make_tensor_value_info("x", 1, [2, 3, 6, 6])], [helper.make_tensor_value_info("y", 1, [2, 4, 6, 6])],
        [init("w", np.ones((4, 3, 3, 3), np.float32))]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.x", 1)])
    g = ir.load(model, infer_shapes=True)
    deps = dependency_groups(g)
    assert "unknown_op:Foo" in group_with(deps, "a").frozen


def test_reshape_that_mixes_channels_is_frozen():
    model = _conv_then([helper.make_node("Reshape", ["a", "s"], ["y"])], [init("s", np.array([2, 6, 4, 6], np.int64))],
                       out_shape=(2, 6, 4, 6))
    assert "reshape_mixes_channels:Reshape" in _reasons(model, "a")


def test_pad_on_the_channel_axis_is_frozen():
    model = _conv_then([helper.make_node("Pad", ["a", "p"], ["y"])], [init("p", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))],
                       out_shape=(2, 6, 6, 6))
    assert "pads_channels" in _reasons(model, "a")


def test_shape_read_of_the_channel_dim_is_frozen():
    #   a ─Shape─Gather(1)─ c ; a ─Relu─ y : the channel count flows into arithmetic
    model = _conv_then([helper.make_node("Shape", ["a"], ["sh"]), helper.make_node("Gather", ["sh", "one"], ["c"]),
                        helper.make_node("Relu", ["a"], ["y"])], [init("one", np.array(1, np.int64))])
    assert "shape_read" in _reasons(model, "a")


def test_shuffle_block_straddling_two_groups_evenly_is_free(rng):
    #   2 groups of 3 shuffled (blocks {0,1} {2,3} {4,5}) into a conv with 2 groups of 3: block {2,3} hits
    #   both of the reader's groups once, so removing it alone keeps them balanced; the others go in rounds
    deps = groups_of(cm.shuffle(rng, g=2, k=3, g2=2))
    grp = group_with(deps, "s")
    assert not grp.frozen and not grp.fixed.any()
    assert list(grp.classes) == [0, -1, 1]


def test_grouped_conv_whose_groups_a_unit_hits_unevenly_fixes_that_unit(rng):
    #   3 groups of 2 shuffled (blocks {0,1,2} {3,4,5}) into a conv with 3 groups of 2: each block takes
    #   two channels of one group and one of another: neither can go
    deps = groups_of(cm.shuffle(rng, g=3, k=2, g2=3))
    grp = group_with(deps, "s")
    assert list(grp.fixed) == [True, True]
