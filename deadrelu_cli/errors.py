"""Exceptions and the one place that maps them to exit codes.

0 ok, 1 gate failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class DeadreluError(Exception):
    """Base of the errors the tool raises on purpose; carries its exit code."""

    exit_code = EXIT_INTERNAL


class UserError(DeadreluError):
    """Bad input or usage: one line saying what is wrong and what to do (exit 2)."""

    exit_code = EXIT_USAGE


class GateFailed(DeadreluError):
    """The report is fine but it fails a configured limit (exit 1)."""

    exit_code = EXIT_GATE_FAILED


def one_line(message: str, limit: int = 400) -> str:
    """Collapse a message to one line so that stderr stays greppable."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
