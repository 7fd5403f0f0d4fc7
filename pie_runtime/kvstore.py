"""The key-value store inferlets share.

One `KVStore` per server; each user (namespace) sees only its own keys, so two
users' inferlets can never read or clobber each other's entries (the reference
implementation had one global, unnamespaced store). All instances launched
under one namespace share that namespace's keys, and at most
`TenantLimits.kv_bytes` bytes (keys plus values, UTF-8) in at most
`TenantLimits.kv_keys` keys: a `set` past either is refused with
`out-of-memory` and changes nothing.
"""

from __future__ import annotations

import threading

from pie_runtime.errors import PieError
from pie_runtime.limits import TenantLimits

# Bounds keep one inferlet from exhausting the host's memory through the store.
MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 16 * 1024 * 1024


class KVStore:
    """Namespaced string -> string maps, safe to use from many instance threads."""

    def __init__(self, limits: TenantLimits | None = None) -> None:
        self.limits = limits if limits is not None else TenantLimits()
        self._data: dict[str, dict[str, str]] = {}
        self._bytes: dict[str, int] = {}  # namespace -> UTF-8 bytes of its keys and values
        self._lock = threading.Lock()

    def namespace(self, name: str) -> "NamespacedKV":
        return NamespacedKV(self, name)

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, d in self._data.items() if d)

    def _get(self, ns: str, key: str) -> str | None:
        with self._lock:
            return self._data.get(ns, {}).get(key)

    def namespace_usage(self, ns: str) -> tuple[int, int]:
        """(bytes, keys) the namespace stores."""
        with self._lock:
            return self._bytes.get(ns, 0), len(self._data.get(ns, {}))

    def _set(self, ns: str, key: str, value: str) -> None:
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if key_bytes > MAX_KEY_BYTES:
            raise PieError.invalid(f"key is longer than {MAX_KEY_BYTES} bytes")
        if value_bytes > MAX_VALUE_BYTES:
            raise PieError.invalid(f"value is longer than {MAX_VALUE_BYTES} bytes")
        with self._lock:
            entries = self._data.setdefault(ns, {})
            old = entries.get(key)
            freed = 0 if old is None else key_bytes + len(old.encode())
            used = self._bytes.get(ns, 0) - freed + key_bytes + value_bytes
            if old is None and len(entries) >= self.limits.kv_keys:
                raise PieError.out_of_memory(
                    f"the key-value store of namespace {ns!r} holds {len(entries)} keys, the most allowed (kv_keys)")
            if used > self.limits.kv_bytes:
                raise PieError.out_of_memory(
                    f"the key-value store of namespace {ns!r} would hold {used} bytes; at most "
                    f"{self.limits.kv_bytes} are allowed (kv_bytes)")
            entries[key] = value
            self._bytes[ns] = used

    def _delete(self, ns: str, key: str) -> bool:
        with self._lock:
            old = self._data.get(ns, {}).pop(key, None)
            if old is None:
                return False
            self._bytes[ns] -= len(key.encode()) + len(old.encode())
            return True

    def _list(self, ns: str, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data.get(ns, {}) if k.startswith(prefix))


class NamespacedKV:
    """One namespace's view of the store: what an instance's kvstore calls use."""

    def __init__(self, store: KVStore, namespace: str) -> None:
        self.store = store
        self.name = namespace

    def get(self, key: str) -> str | None:
        return self.store._get(self.name, key)

    def set(self, key: str, value: str) -> None:
        self.store._set(self.name, key, value)

    def delete(self, key: str) -> bool:
        return self.store._delete(self.name, key)

    def list_keys(self, prefix: str = "") -> list[str]:
        return self.store._list(self.name, prefix)
