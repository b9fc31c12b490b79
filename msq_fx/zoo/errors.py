"""One-line descriptions of exceptions, as the model zoo's spec errors and the check's findings
give them."""
from __future__ import annotations

import re

__all__ = ["describe_error"]

_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def describe_error(error: BaseException) -> str:
    """``ExceptionType: first line of the message``, and the first line of the error it was
    raised from (the deepest ``raise ... from``) where the message does not say it already,
    so a wrapper's generic message still shows what went wrong. Terminal colour codes are
    removed."""
    described = _first_line(error)
    cause = error.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None:
        cause_message = _first_line(cause).partition(": ")[2]
        if cause_message not in described:
            described += f" (from {_first_line(cause)})"
    return described


def _first_line(error: BaseException) -> str:
    lines = _TERMINAL_COLOURS.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
