"""qgraph passes, one family per module. Imported as ``qgraph.passes``; never as bare ``passes``.

``PASSES`` is the one explicit registry: CLI name -> Pass class, in the order ``--list-passes``
shows them. ``build_passes`` turns a ``-p`` pipeline into Pass objects through it.
"""
if __name__ != "qgraph.passes":  # pragma: no cover - guard for the package-dir mapping
    raise ImportError("import the passes as 'qgraph.passes', not as a top-level 'passes' package")

import difflib  # noqa: E402
from typing import Sequence  # noqa: E402

from qgraph.errors import OptionError  # noqa: E402
from qgraph.passes.biascorr import BiasCorrection  # noqa: E402
from qgraph.passes.cleanup import Cleanup  # noqa: E402
from qgraph.passes.equalize import EqualizeCrossLayer  # noqa: E402
from qgraph.passes.fold import FoldBatchNorm  # noqa: E402
from qgraph.passes.prune import Prune  # noqa: E402
from qgraph.passes.quant import Quantize  # noqa: E402
from qgraph.passes.sparsify import Sparsify  # noqa: E402
from qgraph.pipeline import Pass, parse_pipeline  # noqa: E402

PASSES = {cls.name: cls for cls in (
    FoldBatchNorm,
    Cleanup,
    EqualizeCrossLayer,
    Quantize,
    BiasCorrection,
    Prune,
    Sparsify,
)}


def lookup(name: str) -> type[Pass]:
    """The pass class registered as ``name``; OptionError with a did-you-mean otherwise."""
    if name in PASSES:
        return PASSES[name]
    guess = difflib.get_close_matches(name, list(PASSES), n=1, cutoff=0.5)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    raise OptionError(f"unknown pass '{name}'{hint}; known passes: {', '.join(PASSES)}")


def build_passes(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Pass objects from a ``-p`` string, a list of such strings, or Pass instances."""
    if isinstance(spec, (str, Pass)):
        items: list[str | Pass] = [spec]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise OptionError(f"passes must be a string such as 'fold,cleanup' or a list of passes, "
                              f"got {type(spec).__name__}") from None
    out: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise OptionError(f"a pipeline item must be a pass name or a Pass, got {type(item).__name__}")
        for name, values in parse_pipeline(item):
            out.append(lookup(name)(**values))
    if not out:
        raise OptionError("the pipeline is empty")
    return out


__all__ = ["PASSES", "lookup", "build_passes", "FoldBatchNorm", "Cleanup", "EqualizeCrossLayer", "Quantize",
           "BiasCorrection", "Prune", "Sparsify"]
