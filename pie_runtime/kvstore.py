"""The key-value store inferlets share.

One `KVStore` per server; each user (namespace) sees only its own keys, so two
users' inferlets can never read or clobber each other's entries (the reference
implementation had one global, unnamespaced store). All instances launched
under one namespace share that namespace's keys.
"""

from __future__ import annotations

import threading

from pie_runtime.errors import PieError

# Bounds keep one inferlet from exhausting the host's memory through the store.
MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 16 * 1024 * 1024


class KVStore:
    """Namespaced string -> string maps, safe to use from many instance threads."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def namespace(self, name: str) -> "NamespacedKV":
        return NamespacedKV(self, name)

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, d in self._data.items() if d)

    def _get(self, ns: str, key: str) -> str | None:
        with self._lock:
            return self._data.get(ns, {}).get(key)

    def _set(self, ns: str, key: str, value: str) -> None:
        if len(key.encode()) > MAX_KEY_BYTES:
            raise PieError.invalid(f"key is longer than {MAX_KEY_BYTES} bytes")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise PieError.invalid(f"value is longer than {MAX_VALUE_BYTES} bytes")
        with self._lock:
            self._data.setdefault(ns, {})[key] = value

    def _delete(self, ns: str, key: str) -> bool:
        with self._lock:
            return self._data.get(ns, {}).pop(key, None) is not None

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
