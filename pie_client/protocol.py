"""The client protocol of `pie-serve`, version 1 (docs/protocol.md is its description).

One WebSocket per client at `/v1/ws`; every frame is a binary frame holding
one MessagePack map. This module is shared by the server and the client, so
both always agree on the names below.
"""

from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL_VERSION = 1
WS_PATH = "/v1/ws"

# Requests a client may make (the `op` field), in the order a session uses them.
OPS = (
    "hello", "has_program", "upload_begin", "upload_chunk", "upload_end", "launch", "send", "close_input",
    "terminate", "list", "detach", "attach",
)

# What an instance's event stream carries (the `event` field).
EVENT_KINDS = ("message", "stdout", "stderr", "result", "error")
TERMINAL_EVENTS = ("result", "error")

# Error codes of failed requests (`error.code`).
ERROR_CODES = (
    "bad-request",  # malformed frame, unknown op, missing or mistyped field
    "unauthenticated",  # no hello yet, or a wrong token
    "not-found",  # no such program / instance / upload (for this tenant)
    "invalid-argument",  # the request is well formed but its values are not acceptable
    "too-large",  # an upload over the server's size limit
    "limit",  # too many instances (per tenant or in all)
    "compile-failed",  # the uploaded bytes are not a component this server can run
    "unavailable",  # the server is starting or draining
    "internal",  # a server bug; the message says what
)


class ProtocolError(Exception):
    """A request that failed, with its code (one of ERROR_CODES) and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
    """One frame as a map; ProtocolError("bad-request") if it is not one."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad input
        raise ProtocolError("bad-request", f"the frame is not MessagePack: {e}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad-request", f"a frame must be a map, got {type(frame).__name__}")
    return frame
