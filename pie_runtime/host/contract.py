"""The contract this host implements: the WIT package, its version and the names of its interfaces."""

from __future__ import annotations

WIT_PACKAGE = "pie:inferlet"
WIT_VERSION = "0.2.0"


def interface_name(name: str) -> str:
    """The full name of one interface of the contract, e.g. ``pie:inferlet/model@0.2.0``."""
    return f"{WIT_PACKAGE}/{name}@{WIT_VERSION}"


# The interface every inferlet exports.
RUN_INTERFACE = interface_name("run")
