"""The one error type the runtime hands back to inferlets.

`PieError.code` is the name of a WIT `types.error-code` case, so the Wasm host
can translate it into the guest's `error` record without a lookup table.
"""

from __future__ import annotations

from typing import Final

# The WIT `error-code` enum cases, in declaration order.
ERROR_CODES: Final[tuple[str, ...]] = (
    "invalid-argument",
    "not-found",
    "out-of-memory",
    "unsupported",
    "closed",
    "internal",
    "already-exists",
)


class PieError(Exception):
    """A failure reported to an inferlet: a WIT error code and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> "PieError":
        return cls("invalid-argument", message)

    @classmethod
    def not_found(cls, message: str) -> "PieError":
        return cls("not-found", message)

    @classmethod
    def out_of_memory(cls, message: str) -> "PieError":
        return cls("out-of-memory", message)

    @classmethod
    def unsupported(cls, message: str) -> "PieError":
        return cls("unsupported", message)

    @classmethod
    def closed(cls, message: str) -> "PieError":
        return cls("closed", message)

    @classmethod
    def internal(cls, message: str) -> "PieError":
        return cls("internal", message)

    @classmethod
    def already_exists(cls, message: str) -> "PieError":
        return cls("already-exists", message)

    def __reduce__(self):  # keep code/message through pickling (e.g. across processes)
        return (type(self), (self.code, self.message))
