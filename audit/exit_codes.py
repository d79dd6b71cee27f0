"""The exit codes of every command, in one table (the README and `--help` print the same one)."""

from __future__ import annotations

PASSED = 0  # no fail/error finding reaches --fail-on
FINDINGS = 1  # a fail/error finding reaches --fail-on
INPUT = 2  # usage or input error: one line on stderr naming the file, row or key
VERIFY = 3  # reserved: a signed run that does not verify (sign-off)
RENDER = 4  # results saved, reports could not be rendered; the earlier run is kept
INTERRUPTED = 130  # SIGINT (Ctrl-C); the earlier run is kept
TERMINATED = 143  # SIGTERM; the earlier run is kept

TABLE = (
    (PASSED, "passed the gate: no fail/error finding reaches --fail-on"),
    (FINDINGS, "a fail/error finding reaches --fail-on"),
    (INPUT, "usage or input error (one line naming the file, row or key)"),
    (VERIFY, "reserved for a failed verify (sign-off)"),
    (RENDER, "results saved, but the reports could not be rendered"),
    (INTERRUPTED, "interrupted (SIGINT)"),
    (TERMINATED, "terminated (SIGTERM)"),
)


def help_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in TABLE)
