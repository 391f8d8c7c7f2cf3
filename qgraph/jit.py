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
