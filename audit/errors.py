"""Errors the CLI maps to exit codes: input errors are one line, never a traceback."""

from __future__ import annotations


class AuditError(Exception):
    """Base class for errors model-audit raises on purpose."""


class InputError(AuditError):
    """Bad user input (a file, a row, a key). The message names it; the CLI exits with 2."""


class ModelLoadError(InputError):
    """The model file cannot be loaded or run with the given settings."""


class TapError(ModelLoadError):
    """A forward pass was asked for a tap (embedding, layer:NAME) the model cannot serve; the message names it."""


class RuleError(InputError):
    """A rule file is malformed; the message names the file and the key."""


class SampleError(AuditError):
    """One sample cannot be read; the row is skipped and listed in the report."""


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line error reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def printable(text: object) -> str:
    """`text` on one line: control characters written as escapes, so an error message stays one line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))
