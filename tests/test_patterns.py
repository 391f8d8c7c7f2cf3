"""The rule layer (qgraph.patterns) and each rewrite rule on its own, on the smallest graph it applies to."""
import numpy as np
import pytest
from builders import bn_node, bn_params, init, make_model
from onnx import helper

from qgraph import ir
from qgraph.ops import Skip
from qgraph.passes.equalize import PAIR, EqualizeCrossLayer, _Pairing
from qgraph.passes.fold import ADD_INTO_LAYER, BN_FORWARD, BN_INTO_LAYER, MUL_INTO_LAYER, Forward, IntoLayer, _Run
from qgraph.passes.quant_placement import BINARY_RULE, CONCAT, LAYER, TIED_RULE, Placement, make_plan
from qgraph.patterns import Rule, apply_rules
from qgraph.pipeline import Context


def node(g, name):
    return next(n for n in g.nodes if n.name == name)


def conv_bn(rng, *, pads=(0, 0, 0, 0), extra=()):
    #   x ─Conv(w)─ c ─BN─ y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=list(pads)), bn_node("c", "y"), *extra]
    out = extra[-1].output[0] if extra else "y"
    return ir.load(make_model(nodes, [("x", [1, 3, 5, 5])], [(out, [1, 4, 5, 5])],
                              [init("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)), *bn_params(rng, 4)]))


# ----------------------------------------------------------------------------- the driver

def _toy_rules(log):
    # rules over a toy graph: "a" fails with reason r1 everywhere; "b" (fallback after r1) fires once
    fired = set()

    def match_a(g, n, st):
        raise Skip("r1", "a's detail")

    def match_b(g, n, st):
        if n.name in fired:
            raise Skip("r2")
        return n

    def rewrite_b(g, n, st):
        fired.add(n.name)
        log.append(n.name)
    return [Rule("a", ("Relu",), match_a, None), Rule("b", ("Relu",), match_b, rewrite_b, after=("r1",))]


def relu_chain():
    #   x ─Relu(r1)─Relu(r2)─ y
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="r1"), helper.make_node("Relu", ["h"], ["y"], name="r2")]
    return ir.load(make_model(nodes, [("x", [2])], [("y", [2])]))


def test_a_fallback_rule_fires_after_the_first_rule_skips():
    log = []
    report = apply_rules(relu_chain(), _toy_rules(log))
    assert log == ["r1", "r2"] and report.fired == {"b": 2} and not report.skipped


def test_a_node_no_rule_rewrote_is_reported_once_with_the_first_reason_and_the_fallbacks():
    log = []
    g = relu_chain()
    rules = _toy_rules(log)
    apply_rules(g, rules)                                  # both fire once; now both fail
    report = apply_rules(g, rules, repeat=True)
    assert report.skipped == {"r1": 2}
    assert report.details[0] == "Relu 'r1': r1 (a's detail; b: r2)"


def test_quiet_reasons_are_not_misses():
    rule = Rule("q", ("Relu",), lambda g, n, st: Skip("ordinary"), None, quiet=("ordinary",))
    assert not apply_rules(relu_chain(), [rule]).skipped


def test_a_rule_after_a_reason_is_not_tried_for_another_reason():
    tried = []
    first = Rule("first", ("Relu",), lambda g, n, st: Skip("other"), None)
    fallback = Rule("fallback", ("Relu",), lambda g, n, st: tried.append(n) or n, None, after=("r1",))
    report = apply_rules(relu_chain(), [first, fallback])
    assert not tried and report.skipped == {"other": 2}


# ----------------------------------------------------------------------------- fold's rules

def test_bn_into_layer_matches_conv_then_bn(rng):
    g = conv_bn(rng)
    m = BN_INTO_LAYER.try_match(g, node(g, "bn"), _Run(Context()))
    assert isinstance(m, IntoLayer) and m.layer.name == "conv" and m.a.shape == (4,) and m.b.shape == (4,)


def test_bn_into_layer_refuses_a_bn_on_a_graph_input(rng):
    #   x ─BN─ y
    g = ir.load(make_model([bn_node("x", "y")], [("x", [1, 4, 2, 2])], [("y", [1, 4, 2, 2])], bn_params(rng, 4)))
    assert BN_INTO_LAYER.try_match(g, node(g, "bn"), _Run(Context())).reason == "bn_input_is_graph_input"


def test_mul_into_layer_matches_a_per_channel_constant(rng):
    #   x ─Conv(w)─ c ─Mul(s)─ y         s: one value per output channel
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    g = ir.load(make_model(nodes, [("x", [1, 3, 2, 2])], [("y", [1, 4, 2, 2])],
                           [init("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)),
                            init("s", np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1))]))
    m = MUL_INTO_LAYER.try_match(g, node(g, "mul"), _Run(Context()))
    assert isinstance(m, IntoLayer) and m.layer.name == "conv" and m.b is None
    np.testing.assert_array_equal(m.a, [1, 2, 3, 4])


def test_mul_after_a_join_is_a_quiet_miss(rng):
    #   x ─Relu─ r ─Mul(s)─ y        ordinary arithmetic: nothing to fold into, nothing to report
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Mul", ["r", "s"], ["y"], name="mul")]
    g = ir.load(make_model(nodes, [("x", [1, 4, 2, 2])], [("y", [1, 4, 2, 2])], [init("s", np.float32(2.0))]))
    s = MUL_INTO_LAYER.try_match(g, node(g, "mul"), _Run(Context()))
    assert s.reason == "not_after_layer" and s.reason in MUL_INTO_LAYER.quiet


def test_add_into_layer_leaves_matmul_bias_alone(rng):
    #   x ─MatMul(w)─ m ─Add(b)─ y        the Add is the MatMul's bias, not something to fold
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    g = ir.load(make_model(nodes, [("x", [2, 3])], [("y", [2, 4])],
                           [init("w", rng.normal(size=(3, 4)).astype(np.float32)), init("b", np.ones(4, np.float32))]))
    s = ADD_INTO_LAYER.try_match(g, node(g, "add"), _Run(Context()))
    assert s.reason == "matmul_bias" and s.reason in ADD_INTO_LAYER.quiet


def test_forward_rule_needs_the_backward_reason_and_matches_bn_relu_conv(rng):
    #   x ─Relu─ r ─BN─ y ─Relu─ z ─Conv(w)─ out        (no layer before the BN)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="r0"), bn_node("r", "y"),
             helper.make_node("Relu", ["y"], ["z"], name="r1"), helper.make_node("Conv", ["z", "w"], ["out"], name="conv")]
    params = bn_params(rng, 4)
    params[0] = init("bn_scale", np.abs(rng.normal(size=4)).astype(np.float32) + 0.5)   # a > 0
    g = ir.load(make_model(nodes, [("x", [1, 4, 3, 3])], [("out", [1, 2, 3, 3])],
                           [init("w", rng.normal(size=(2, 4, 1, 1)).astype(np.float32)), *params]))
    assert BN_FORWARD.after == ("bn_after_join", "not_after_layer", "producer_has_other_consumers",
                                "bn_input_is_graph_input")
    assert BN_INTO_LAYER.try_match(g, node(g, "bn"), _Run(Context())).reason == "not_after_layer"
    m = BN_FORWARD.try_match(g, node(g, "bn"), _Run(Context()))
    assert isinstance(m, Forward) and m.relu.name == "r1" and m.layer.name == "conv"


def test_forward_rule_refuses_a_padded_conv_without_relu(rng):
    #   x ─Relu─ r ─BN─ y ─Conv(pads=1)─ out       a shift b would leak into the zero padding
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="r0"), bn_node("r", "y"),
             helper.make_node("Conv", ["y", "w"], ["out"], name="conv", pads=[1, 1, 1, 1])]
    g = ir.load(make_model(nodes, [("x", [1, 4, 3, 3])], [("out", [1, 2, 3, 3])],
                           [init("w", rng.normal(size=(2, 4, 3, 3)).astype(np.float32)), *bn_params(rng, 4)]))
    assert BN_FORWARD.try_match(g, node(g, "bn"), _Run(Context())).reason == "shift_into_padded_conv"


# ----------------------------------------------------------------------------- quant placement rules

def placing(g, **kw):
    from qgraph.passes.quant_placement import Matcher, Plan, _Placing
    opts = dict(granularity="channel", bits=8, precision={}, absorb=True, weight_only=False)
    opts.update(kw)
    return _Placing(g, Plan(), opts["granularity"], opts["bits"], opts["precision"], Matcher(kw.get("exclude", ()), []),
                    Matcher([], []), opts["absorb"], opts["weight_only"])


def test_layer_rule_places_input_weight_and_bias(rng):
    #   x ─Conv(w, b)─ y
    g = ir.load(make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], [("x", [1, 3, 4, 4])],
                           [("y", [1, 2, 4, 4])], [init("w", rng.normal(size=(2, 3, 1, 1)).astype(np.float32)),
                                           init("b", np.zeros(2, np.float32))]))
    p = LAYER.try_match(g, node(g, "conv"), placing(g))
    assert isinstance(p, Placement) and [t.name for t in p.acts] == ["x"]
    assert [(t.name, axis, bits) for t, axis, bits in p.weights] == [("w", 0, 8)] and p.bias[1].name == "b"


def test_layer_rule_says_excluded(rng):
    g = ir.load(make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [("x", [1, 3, 4, 4])],
                           [("y", [1, 2, 4, 4])], [init("w", rng.normal(size=(2, 3, 1, 1)).astype(np.float32))]))
    assert LAYER.try_match(g, node(g, "conv"), placing(g, exclude=("conv",))).reason == "excluded"


def test_binary_rule_refuses_constant_only_inputs():
    #   Add(c1, c2) ─ y      nothing to quantize
    g = ir.load(make_model([helper.make_node("Add", ["c1", "c2"], ["y"], name="add")], [], [("y", [2])],
                           [init("c1", np.ones(2, np.float32)), init("c2", np.ones(2, np.float32))]), infer_shapes=False)
    assert BINARY_RULE.try_match(g, node(g, "add"), placing(g)).reason == "constant_inputs"


def test_concat_rule_ties_every_input_to_the_output():
    #   a ─┐
    #      ├─Concat─ y
    #   b ─┘
    g = ir.load(make_model([helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)],
                           [("a", [1, 2]), ("b", [1, 3])], [("y", [1, 5])]))
    p = CONCAT.try_match(g, node(g, "cat"), placing(g))
    assert isinstance(p, Placement), p
    assert p.ties == [("y", "a"), ("y", "b")] and not p.output


def test_tied_rule_is_quiet_on_an_unquantized_input():
    g = ir.load(make_model([helper.make_node("Flatten", ["x"], ["y"], name="flat")], [("x", [1, 2, 2])], [("y", [1, 4])]))
    s = TIED_RULE.try_match(g, node(g, "flat"), placing(g))
    assert s.reason == "input_not_quantized" and s.reason in TIED_RULE.quiet


def test_make_plan_reports_each_skip_once(rng):
    g = ir.load(make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [("x", [1, 3, 4, 4])],
                           [("y", [1, 2, 4, 4])], [init("w", rng.normal(size=(2, 3, 1, 1)).astype(np.float32))]))
    plan = make_plan(g, granularity="channel", bits=8, precision={}, exclude=("conv",), absorb=True, weight_only=False)
    assert plan.skipped == {"excluded": 1} and plan.skipped_nodes == ["Conv 'conv': excluded"]


# ----------------------------------------------------------------------------- equalize's pair rule

def test_pair_rule_matches_conv_relu_conv_and_refuses_a_fan_out(rng):
    #   x ─Conv(a)─ h ─Relu─ r ─Conv(b)─ y          and then   r also read by Conv(c)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wb"], ["y"], name="b")]
    inits = [init("wa", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)),
             init("wb", rng.normal(size=(2, 4, 1, 1)).astype(np.float32))]
    g = ir.load(make_model(nodes, [("x", [1, 3, 2, 2])], [("y", [1, 2, 2, 2])], inits))
    st = _Pairing(EqualizeCrossLayer(), [])
    chain = PAIR.try_match(g, node(g, "a"), st)
    assert chain.second.name == "b" and [n.op for n in chain.between] == ["Relu"]
    assert PAIR.try_match(g, node(g, "b"), st).reason == "graph_output"
    fan = nodes + [helper.make_node("Conv", ["r", "wc"], ["z"], name="c")]
    g2 = ir.load(make_model(fan, [("x", [1, 3, 2, 2])], [("y", [1, 2, 2, 2]), ("z", [1, 2, 2, 2])],
                            inits + [init("wc", rng.normal(size=(2, 4, 1, 1)).astype(np.float32))]))
    assert PAIR.try_match(g2, node(g2, "a"), st).reason == "coupled_output"


@pytest.mark.parametrize("relu6", ["skip", "carry"])
def test_pair_rule_follows_the_relu6_option(rng, relu6):
    #   x ─Conv─ h ─Clip(0, 6)─ r ─Conv─ y
    nodes = [helper.make_node("Conv", ["x", "wa"], ["h"], name="a"), helper.make_node("Clip", ["h", "lo", "hi"], ["r"], name="clip"),
             helper.make_node("Conv", ["r", "wb"], ["y"], name="b")]
    g = ir.load(make_model(nodes, [("x", [1, 3, 2, 2])], [("y", [1, 2, 2, 2])],
                           [init("wa", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)),
                            init("wb", rng.normal(size=(2, 4, 1, 1)).astype(np.float32)),
                            init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32))]))
    found = PAIR.try_match(g, node(g, "a"), _Pairing(EqualizeCrossLayer(relu6=relu6), []))
    assert (found.reason == "relu6_skipped") if relu6 == "skip" else (found.clip.name == "clip")
