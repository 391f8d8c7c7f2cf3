"""The one ``KERNELS`` table: step op -> kernel function ``f(step, args, mode) -> [outputs]``.

The lowering (``lower.py``) emits only steps whose op is a key here; the runtime (``runtime.py``)
executes them through it.
"""
from __future__ import annotations

from qgraph.kernels import eltwise, floatops, movement, qlinear, softmax

KERNELS = {**qlinear.KERNELS, **eltwise.KERNELS, **movement.KERNELS, **softmax.KERNELS, **floatops.KERNELS}
