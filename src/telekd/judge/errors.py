"""The judge's two errors: a call that gave no usable answer, and a judge that cannot be built at all."""

from __future__ import annotations


class JudgeError(RuntimeError):
    """A judge call that gave no usable answer. `retryable` is False for deterministic failures."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class JudgeSetupError(RuntimeError):
    """The judge cannot be built at all (missing package, missing key, bad endpoint)."""

