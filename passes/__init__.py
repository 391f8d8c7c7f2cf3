"""qgraph passes, one family per module. Imported as ``qgraph.passes``; never as bare ``passes``.

``PASSES`` is the one explicit registry: CLI name -> Pass class, in the order ``--list-passes``
shows them.
"""
if __name__ != "qgraph.passes":  # pragma: no cover - guard for the package-dir mapping
    raise ImportError("import the passes as 'qgraph.passes', not as a top-level 'passes' package")

from qgraph.passes.biascorr import BiasCorrection  # noqa: E402
from qgraph.passes.cleanup import Cleanup  # noqa: E402
from qgraph.passes.equalize import EqualizeCrossLayer  # noqa: E402
from qgraph.passes.fold import FoldBatchNorm  # noqa: E402
from qgraph.passes.quant import Quantize  # noqa: E402

PASSES = {cls.name: cls for cls in (
    FoldBatchNorm,
    Cleanup,
    EqualizeCrossLayer,
    Quantize,
    BiasCorrection,
)}

__all__ = ["PASSES", "FoldBatchNorm", "Cleanup", "EqualizeCrossLayer", "Quantize", "BiasCorrection"]
