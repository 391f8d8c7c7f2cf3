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


def test_numba_caches_are_dropped_when_any_kernel_module_changes(tmp_path):
    # numba keys a cache entry by its own file only: a kernel that inlined another module's kernel
    # would keep the old code when only that module changes, so the caches go as one unit
    from qgraph.jit import drop_stale_numba_caches
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "__pycache__").mkdir(parents=True)
    (a / "tiles.py").write_text("@njit\ndef f(x):\n    return x\n")
    (b / "conv.py").write_text("@njit\ndef g(x):\n    return f(x)\n")
    (b / "plain.py").write_text("x = 1\n")

    def cached():
        (b / "__pycache__" / "conv.g-1.py311.nbi").write_bytes(b"index")
        (a / "__pycache__" / "tiles.f-1.py311.1.nbc").write_bytes(b"code")

    def left():
        return sorted(p.name for d in (a, b) for p in (d / "__pycache__").glob("*.nb?"))

    assert drop_stale_numba_caches((a, b))          # no stamp yet: whatever is there is of unknown age
    cached()
    assert not drop_stale_numba_caches((a, b)) and len(left()) == 2
    (b / "plain.py").write_text("x = 2\n")            # no kernel in it: the caches stay
    assert not drop_stale_numba_caches((a, b)) and len(left()) == 2
    (a / "tiles.py").write_text("@njit\ndef f(x):\n    return x + 1\n")
    assert drop_stale_numba_caches((a, b)) and left() == []
    cached()
    assert not drop_stale_numba_caches((a, b)) and len(left()) == 2
