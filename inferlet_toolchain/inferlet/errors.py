"""The SDK's exception type. Pure Python: no binding imports."""

from __future__ import annotations

from typing import Any


class InferletError(Exception):
    """An error the server returned: `code` to branch on, `message` for people.

    `code` is the contract's error-code name: "invalid-argument", "not-found",
    "out-of-memory", "unsupported", "closed", "internal" or "already-exists".
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_wit(cls, error: Any) -> "InferletError":
        """From the contract's `error` record (or anything else a host put in an Err)."""
        code = getattr(error, "code", None)
        if code is not None and hasattr(code, "name"):
            return cls(code.name.lower().replace("_", "-"), str(getattr(error, "message", "")))
        return cls("internal", repr(error))
