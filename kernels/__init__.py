"""qgraph integer reference runtime. Imported as ``qgraph.kernels``; never as bare ``kernels``."""
if __name__ != "qgraph.kernels":  # pragma: no cover - guard for the package-dir mapping
    raise ImportError("import the kernels as 'qgraph.kernels', not as a top-level 'kernels' package")
