"""jit: Numba kernels of the core compile on their first call; importing qgraph loads no LLVM."""
import subprocess
import sys

import numpy as np


def test_importing_qgraph_and_its_passes_loads_no_numba():
    # numba maps ~120 MB of LLVM: the default quant pipeline (min/max in the graph) must not pay it
    code = "import sys, qgraph, qgraph.passes, qgraph.calibrate, qgraph.qparams; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_lazy_kernel_compiles_on_first_call_and_equals_python(rng):
    from qgraph import calibrate
    from qgraph.jit import _Lazy
    x = rng.standard_normal(1000).astype(np.float32)
    hist = np.zeros(64, np.int64)
    zeros = calibrate._bin(x, hist, 8.0, -32)
    assert not isinstance(calibrate.__dict__["_bin"], _Lazy)         # the module now holds numba's
    ref = np.clip(np.floor(x * 8.0).astype(np.int64) + 32, 0, 63)
    np.testing.assert_array_equal(hist, np.bincount(ref, minlength=64))
    assert zeros == int(np.sum(x == 0))
