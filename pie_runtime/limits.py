"""What the operator lets each tenant use: one record that every server front end fills.

`TenantLimits` holds every bound the runtime enforces on tenants (KV pages,
instances, launch trees, the key-value store, guest output). `pie-run` fills
it from command-line flags (`add_arguments` / `from_args`), a network server
from its configuration file (`from_mapping`), a program by keyword. The
serving core (`ServingCore(limits=...)`) reads the page bounds, the Wasm host
(`Host(limits=...)`) the rest.

A tenant is a namespace: its instances share its key-value store, its
exports and its page quota. What happens at each bound:

- KV pages. An instance may hold at most `instance_pages` pages and a
  namespace `namespace_pages` (its instances' pages and its exports',
  copy-on-write copies included; a page shared by a fork or an import counts
  once). An allocation past either, or larger than the whole pool, fails at
  once with `out-of-memory`. Within them, an allocation the pool cannot
  serve now waits: see `pie_runtime.pressure` (fair order, preemption).
- Persistent exports are a cache charged to their namespace: at most
  `export_pages` pages per namespace; publishing past it evicts that
  namespace's least recently used persistent exports (an importer of an
  evicted name gets `not-found`), and the pool evicts ended instances'
  persistent exports (least recently used first) before it preempts anyone.
- Instances: at most `max_instances` on the server and `max_tree_instances`
  in one launch tree (a client-launched instance and all its descendants),
  children at most `max_launch_depth` levels deep, and the linear-memory
  limits of one tree's live instances summing to at most
  `tree_memory_bytes` (a child gets the rest when that is less than its
  parent's limit, and is refused below `MIN_CHILD_MEMORY_BYTES`). An
  instance counts until its thread has ended.
- Key-value store: at most `kv_bytes` (keys plus values, UTF-8) and
  `kv_keys` keys per namespace; a `set` past either fails with
  `out-of-memory`.
- Guest stdout/stderr: at most `output_bytes` per instance (the rest is
  dropped, with one notice), lines cut at `output_line_bytes`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

MIB = 1 << 20
MIN_CHILD_MEMORY_BYTES = 64 * MIB


@dataclass(frozen=True)
class TenantLimits:
    """Bounds on what tenants may use. `None` page bounds are relative to the pool (see `page_bounds`)."""

    instance_pages: int | None = None  # KV pages one instance may hold; None = the whole pool
    namespace_pages: int | None = None  # KV pages one namespace may hold; None = the whole pool
    export_pages: int | None = None  # pages of one namespace's persistent exports; None = a quarter of the pool
    swap_pages: int | None = None  # host memory for preempted pages, in pages; None = the pool's size
    max_instances: int = 256  # live instances on the server
    max_tree_instances: int = 64  # live instances in one launch tree, its root included
    max_launch_depth: int = 4  # levels of children below a client-launched instance
    tree_memory_bytes: int = 4096 * MIB  # summed linear-memory limits of one tree's live instances
    kv_bytes: int = 64 * MIB  # key-value store bytes (keys + values) per namespace
    kv_keys: int = 100_000  # key-value store keys per namespace
    output_bytes: int = 1 * MIB  # guest stdout + stderr bytes per instance
    output_line_bytes: int = 16 * 1024  # longest line of guest output kept whole

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limit {f.name} must be a non-negative integer, got {value!r}")
        if self.max_instances < 1 or self.max_tree_instances < 1:
            raise ValueError("max_instances and max_tree_instances must be >= 1")

    def page_bounds(self, pool_pages: int) -> "PageBounds":
        """The page bounds for a pool of `pool_pages` pages (none larger than the pool)."""

        def bound(value: int | None, default: int) -> int:
            return min(pool_pages, default if value is None else value)

        return PageBounds(
            pool=pool_pages,
            instance=bound(self.instance_pages, pool_pages),
            namespace=bound(self.namespace_pages, pool_pages),
            exports=bound(self.export_pages, max(1, pool_pages // 4)),
            swap=pool_pages if self.swap_pages is None else self.swap_pages,
        )

    # ---- filling it ------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "TenantLimits":
        """From a configuration mapping; keys may use dashes or underscores
        (`instance-pages`); an unknown key or a bad value is a ValueError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        given: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown limit {key!r}; known: {', '.join(sorted(n.replace('_', '-') for n in names))}")
            given[name] = value
        return cls(**given)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Adds one `--NAME` option per limit to a command-line parser."""
        group = parser.add_argument_group(
            "tenant limits", "what each tenant (namespace) and instance may use; see README 'Tenants'")
        for f in dataclasses.fields(TenantLimits):
            flag = "--" + f.name.replace("_", "-")
            shown = _POOL_DEFAULTS.get(f.name, f.default)
            group.add_argument(flag, dest=f"limit_{f.name}", type=_non_negative_int, default=None, metavar="N",
                               help=f"{_HELP[f.name]} (default: {shown})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TenantLimits":
        """The limits given on a command line parsed with `add_arguments` (defaults for the rest)."""
        given = {f.name: getattr(args, f"limit_{f.name}") for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class PageBounds:
    """`TenantLimits`' page bounds resolved against one pool."""

    pool: int
    instance: int
    namespace: int
    exports: int
    swap: int


_HELP = {
    "instance_pages": "KV pages one instance may hold",
    "namespace_pages": "KV pages one namespace (tenant) may hold, its exports included",
    "export_pages": "KV pages one namespace's persistent exports may hold (least recently used evicted)",
    "swap_pages": "KV pages of preempted instances kept in host memory",
    "max_instances": "live instances on the server",
    "max_tree_instances": "live instances in one launch tree (a client-launched instance and its children)",
    "max_launch_depth": "levels of children below a client-launched instance",
    "tree_memory_bytes": "summed linear-memory limits of one launch tree's live instances, in bytes",
    "kv_bytes": "key-value store bytes (keys + values) per namespace",
    "kv_keys": "key-value store keys per namespace",
    "output_bytes": "bytes of stdout + stderr kept per instance",
    "output_line_bytes": "longest guest output line kept whole, in bytes",
}


_POOL_DEFAULTS = {
    "instance_pages": "the whole pool",
    "namespace_pages": "the whole pool",
    "export_pages": "a quarter of the pool",
    "swap_pages": "the pool's size",
}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
