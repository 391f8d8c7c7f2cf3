"""This folder is the qgraph source checkout; the package is ``qgraph/`` inside it.

A script run from the folder that holds a checkout named ``qgraph`` (``git clone``'s default) imports
the checkout itself under that name, ahead of the installed package: without this file it would load
as an empty namespace package ("module 'qgraph' has no attribute 'optimize'"). Imported that way,
this file loads the installed package in its place, or says plainly what happened when there is none.
"""
if __name__ == "qgraph":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _beside = _os.path.realpath(_os.path.dirname(_here))
    _outside = [p for p in _sys.path if _os.path.realpath(p or ".") != _beside]
    _spec = _machinery.PathFinder.find_spec("qgraph", _outside)      # a regular install
    if _spec is None or _spec.origin is None:
        _spec = next((s for f in _sys.meta_path if f is not _machinery.PathFinder and hasattr(f, "find_spec")
                      for s in [f.find_spec("qgraph", None)] if s is not None and s.origin), None)  # editable
    if _spec is None or _os.path.realpath(_spec.origin) == _os.path.realpath(__file__):
        raise ImportError(
            f"'import qgraph' found the qgraph source checkout {_here}, and no installed qgraph package: "
            f"install it (pip install -e {_here}) or run your script from another folder")
    _module = _util.module_from_spec(_spec)
    _sys.modules["qgraph"] = _module
    _spec.loader.exec_module(_module)
