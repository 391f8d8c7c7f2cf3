"""qgraph: a compression compiler for ONNX models.

    model, report = qgraph.optimize("model.onnx", "fold,cleanup", output="model.opt.onnx")
"""
from qgraph import container  # noqa: F401  (registers .qgz with ir.read_model: any command reads one)
from qgraph.api import optimize
from qgraph.errors import ModelError, OptionError, PassError, QGraphError
from qgraph.jit import drop_stale_numba_caches
from qgraph.pipeline import Context, Pass, PassManager, PassResult

drop_stale_numba_caches()   # before any kernel is called (imports compile nothing): see its docstring

__version__ = "0.1.0"
__all__ = ["optimize", "Context", "Pass", "PassManager", "PassResult",
           "QGraphError", "ModelError", "OptionError", "PassError"]
