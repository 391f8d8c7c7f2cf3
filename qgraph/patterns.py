"""Rewrite rules as data: a name, the ops a rule is anchored at, a match and a rewrite.

    Rule(name="bn_into_layer", ops=("BatchNormalization",), match=..., rewrite=...)

``match(g, node, state)`` looks at the graph around ``node`` and returns what the rewrite needs (any
object: the bindings), or says why the rule does not apply by raising or returning a ``Skip``;
``rewrite(g, bindings, state)`` changes the graph (or, for an analysis, the ``state``). ``state``
is whatever the pass threads through its rules (options, a plan being built, the context).

``apply_rules`` runs a rule list over a graph in the manner of onnxscript's rewriter and
onnx-graphsurgeon's pattern matching, with the reporting a compiler pass needs:

- rules are tried in the order given for each node whose op they are anchored at; the first that
  matches is rewritten; a rule with ``after`` is tried only when an earlier rule on the same node
  skipped with one of those reasons (a fallback, e.g. folding a BatchNorm forward when there is no
  layer before it);
- a node no rule rewrote is reported once with the first rule's reason (the fallbacks' reasons
  appended to its detail as ``rule: reason``), unless that reason is one of the rule's ``quiet`` ones (a constant
  Add with no layer before it is ordinary arithmetic, not a miss);
- with ``repeat=True`` the sweep runs until nothing fires (chains fold one step per sweep).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from qgraph.ops import Skip


@dataclass(frozen=True)
class Rule:
    name: str
    ops: tuple[str, ...]
    match: Callable[..., Any]
    rewrite: Callable[..., Any]
    after: tuple[str, ...] = ()      # try only when an earlier rule skipped with one of these reasons
    quiet: tuple[str, ...] = ()      # reasons that are not misses (not counted as skipped)
    doc: str = ""

    def try_match(self, g, node, state=None) -> Any:
        """The rule's bindings for ``node``, or the Skip that says why it does not apply."""
        try:
            found = self.match(g, node, state)
        except Skip as s:
            return s
        return found


@dataclass
class RuleReport:
    """What ``apply_rules`` did: rewrites per rule, skipped nodes per reason, and one line per skip."""
    fired: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    sweeps: int = 0

    def skip(self, node, s: Skip) -> None:
        self.skipped[s.reason] += 1
        self.details.append(f"{node.op} '{node.name}': {s}")


def apply_rules(g, rules: list[Rule] | tuple[Rule, ...], state=None, *, repeat: bool = False,
                report: RuleReport | None = None) -> RuleReport:
    """Apply ``rules`` to every node of ``g`` (see the module docstring); returns the report."""
    report = report if report is not None else RuleReport()
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        for op in r.ops:
            by_op.setdefault(op, []).append(r)
    final: dict[int, tuple[Any, Skip]] = {}     # node id -> (node, its reason), reported once at the end
    while True:
        report.sweeps += 1
        changed = False
        for node in list(g.nodes):
            candidates = by_op.get(node.op)
            if not candidates or (not node.inputs and not node.outputs):
                continue                                   # no rule, or removed earlier in this sweep
            first: Skip | None = None
            fallbacks: list[str] = []
            quiet = False
            for rule in candidates:
                if rule.after and (first is None or first.reason not in rule.after):
                    continue
                found = rule.try_match(g, node, state)
                if isinstance(found, Skip):
                    if first is None:
                        first, quiet = found, found.reason in rule.quiet
                    else:
                        fallbacks.append(f"{rule.name}: {found}")
                    continue
                rule.rewrite(g, found, state)
                report.fired[rule.name] += 1
                changed = True
                final.pop(id(node), None)
                break
            else:
                if first is not None and not quiet:
                    if fallbacks:
                        first = Skip(first.reason, "; ".join(x for x in [first.detail] + fallbacks if x))
                    final[id(node)] = (node, first)
        if not (repeat and changed):
            break
    for node, s in final.values():
        report.skip(node, s)
    return report
