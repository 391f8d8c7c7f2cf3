"""Numba kernels compiled on their first call, not at import.

Importing numba maps LLVM into the process (~120 MB resident). Most pipelines call no kernel of the
core (min/max calibration reduces inside ONNX Runtime), so they should not pay for it. ``njit``
here marks a module-level function like ``numba.njit(cache=True, ...)`` does; on the first call of
any such function, every one of its module is handed to numba (so kernels calling kernels compile
together) and the module's globals point to the compiled versions from then on. The on-disk cache
works as for a decorated function: same module, same name, same source.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path


class _Lazy:
    def __init__(self, fn, options: dict):
        self.py_func = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        return _compile(self.py_func.__globals__)[self.py_func.__name__](*args)


def _compile(module_globals: dict) -> dict:
    import numba
    for name, value in list(module_globals.items()):
        if isinstance(value, _Lazy):
            module_globals[name] = numba.njit(cache=True, **value.options)(value.py_func)
    return module_globals


def njit(**options):
    """``numba.njit(cache=True, **options)``, applied on the first call."""
    return lambda fn: _Lazy(fn, options)


#: The folders whose modules hold Numba kernels (qgraph/ and the runtime's kernels/).
_KERNEL_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "kernels")
_STAMP = "qgraph-numba-sources.stamp"


def drop_stale_numba_caches(dirs=_KERNEL_DIRS) -> bool:
    """Delete the on-disk Numba caches of ``dirs`` when any Numba module's source changed.

    Numba keys a cached function by its own file only (path, mtime, size). A compiled function that
    inlined a kernel from another module keeps running the old code when only that other module
    changes (seen: bitconv's tile loop kept a broken bitserial epilogue). So the caches of all these
    modules are one unit: a digest of the source of every module that mentions ``njit`` is kept next
    to them, and a different digest empties every ``__pycache__/*.nbi|*.nbc`` of ``dirs``. Read-only
    installs (numba then caches elsewhere, and a reinstall rewrites every file) are left alone.
    Returns whether caches were dropped."""
    digest = hashlib.sha1()
    for d in dirs:
        for f in sorted(d.glob("*.py")):
            src = f.read_bytes()
            if b"njit" in src:
                digest.update(f.name.encode() + b"\0" + src)
    want = digest.hexdigest()
    stamp = dirs[0] / "__pycache__" / _STAMP
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    try:
        for d in dirs:
            for f in list((d / "__pycache__").glob("*.nb[ic]")):
                f.unlink(missing_ok=True)
        stamp.parent.mkdir(exist_ok=True)
        tmp = stamp.with_name(f"{_STAMP}.{id(want)}.tmp")
        tmp.write_text(want)
        tmp.replace(stamp)
    except OSError:
        return False
    return True
