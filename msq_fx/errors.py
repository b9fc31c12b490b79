"""The one exception type msq_fx raises for a model, input, file or setting it cannot process."""
from __future__ import annotations

__all__ = ["MSQError"]


class MSQError(RuntimeError):
    """A model or its inputs cannot be processed; the message says what and how to fix it."""
