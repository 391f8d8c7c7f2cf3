"""One exception family. The CLI maps ModelError/OptionError to exit 2 and PassError to exit 1
(a PassInputError, a pass stopped by bad input, is both a PassError and a ModelError: exit 2)."""
from __future__ import annotations


class QGraphError(Exception):
    """Base of every error qgraph raises on purpose; its message is one line meant for a person."""


class ModelError(QGraphError):
    """The input is wrong: path, protobuf, missing initializer, unsupported op or opset, bad data."""


class OptionError(QGraphError):
    """Bad ``-p`` syntax, unknown pass or option, or an option value of the wrong type or range."""


class PassError(QGraphError):
    """A pass failed. Names the pass and the passes already run before it."""

    def __init__(self, pass_name: str, done: list[str] | tuple[str, ...], reason: str):
        self.pass_name = pass_name
        self.done = list(done)
        self.reason = reason
        before = ", ".join(self.done) if self.done else "none"
        super().__init__(f"pass '{pass_name}' failed (after: {before}): {reason}")


class PassInputError(PassError, ModelError):
    """A pass stopped on bad input (calibration data with NaN, a model it cannot handle): it names
    the pass like a PassError and is a ModelError, so ``except ModelError`` catches it and the CLI
    exits 2. The ModelError the pass raised is its ``__cause__``."""
