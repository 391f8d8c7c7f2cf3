"""qgraph integer reference runtime. Imported as ``qgraph.kernels``; never as bare ``kernels``.

    from qgraph.kernels import lower, run
    outputs = run("model_qdq.onnx", {"input": x}, mode="float")      # or mode="fixed"
"""
if __name__ != "qgraph.kernels":  # pragma: no cover - guard for the package-dir mapping
    raise ImportError("import the kernels as 'qgraph.kernels', not as a top-level 'kernels' package")

# Bound after the submodules load, so ``qgraph.kernels.lower`` / ``.run`` are the functions even
# though a submodule is also named ``lower`` (Python sets that attribute on first submodule import).
from qgraph.kernels.lower import Program, lower  # noqa: E402
from qgraph.kernels.runtime import run  # noqa: E402

__all__ = ["Program", "lower", "run"]
