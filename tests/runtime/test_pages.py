"""Page tables, refcounts, exports and copy-on-write decisions (pie_runtime.pages),
against the engine's real host-side page pool."""

from __future__ import annotations

import pytest

from engine_jax.kv_cache import OutOfPages, PagePool
from pie_runtime.errors import ERROR_CODES, PieError
from pie_runtime.pages import PageManager

PAGE_SIZE = 4


class Pages:
    """A PageManager wired to a real PagePool, recording the copies it asks for."""

    def __init__(self, num_pages: int = 8) -> None:
        self.pool = PagePool(num_pages)
        self.pm = PageManager(PAGE_SIZE)
        self.copies: list[tuple[int, int]] = []

    def alloc(self, n: int) -> list[int]:
        try:
            return self.pool.alloc(n)
        except OutOfPages as exc:
            raise PieError.out_of_memory(str(exc)) from exc

    def copy(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))

    def flush(self) -> None:
        self.pool.free(self.pm.take_released())

    def allocate(self, inst: str, n: int) -> list[int]:
        return self.pm.allocate(inst, n, self.alloc)

    def exclusive(self, inst: str, vid: int) -> int:
        return self.pm.ensure_exclusive(inst, vid, self.alloc, self.copy)


def test_error_codes_match_the_wit_enum():
    assert ERROR_CODES == ("invalid-argument", "not-found", "out-of-memory", "unsupported", "closed", "internal",
                           "already-exists")
    err = PieError.out_of_memory("full")
    assert (err.code, err.message) == ("out-of-memory", "full")
    with pytest.raises(ValueError):
        PieError("bogus", "x")


def test_virtual_ids_are_per_instance_and_map_to_distinct_pages():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    p.pm.open_instance("b", "ns", None)
    a = p.allocate("a", 2)
    b = p.allocate("b", 2)
    assert a == b == [0, 1]  # same virtual ids, different physical pages
    phys = {p.pm.physical("a", v) for v in a} | {p.pm.physical("b", v) for v in b}
    assert len(phys) == 4
    assert p.pool.num_free == 4
    p.pm.check_invariants()


def test_quota_and_pool_exhaustion_allocate_nothing():
    p = Pages(num_pages=5)
    p.pm.open_instance("a", "ns", quota=3)
    p.pm.open_instance("b", "ns", None)
    p.allocate("a", 2)
    with pytest.raises(PieError) as exc:
        p.allocate("a", 2)
    assert exc.value.code == "out-of-memory"
    assert p.pm.page_count("a") == 2
    with pytest.raises(PieError) as exc:
        p.allocate("b", 4)
    assert exc.value.code == "out-of-memory"
    assert p.pm.page_count("b") == 0 and p.pool.num_free == 3


def test_free_is_two_phase():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    vids = p.allocate("a", 3)
    p.pm.doom("a", vids[:2])
    # Doomed ids are unusable at once, but the pages are still held.
    with pytest.raises(PieError) as exc:
        p.pm.check_live("a", [vids[0]])
    assert exc.value.code == "not-found"
    with pytest.raises(PieError):
        p.pm.doom("a", [vids[1]])  # double free
    assert p.pm.held_pages() == 3
    p.pm.release("a", vids[:2])
    assert p.pm.held_pages() == 1
    p.flush()
    assert p.pool.num_free == 7


def test_duplicate_ids_in_one_call_are_rejected():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    (v,) = p.allocate("a", 1)
    with pytest.raises(PieError) as exc:
        p.pm.doom("a", [v, v])
    assert exc.value.code == "invalid-argument"


def test_export_import_shares_then_copy_on_write_splits():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    p.pm.open_instance("b", "ns", None)
    vids = p.allocate("a", 2)
    exp = p.pm.reserve_export("a", "prefix", vids, 3, persistent=False)
    with pytest.raises(PieError):
        p.pm.import_export("b", exp)  # not published yet
    assert p.pm.list_exports("ns") == []
    p.pm.publish_export(exp)
    assert p.pm.list_exports("ns") == ["prefix"]
    got, last_len = p.pm.import_export("b", p.pm.lookup_export("ns", "prefix"))
    assert last_len == 3
    shared = p.pm.physical("a", vids[1])
    assert p.pm.physical("b", got[1]) == shared
    assert p.pm.refcount[shared] == 3  # a, the export, b

    # b writes into its last page: it gets a private copy, a keeps the original.
    fresh = p.exclusive("b", got[1])
    assert fresh != shared and p.copies == [(shared, fresh)]
    assert p.pm.physical("a", vids[1]) == shared
    assert p.pm.refcount[shared] == 2 and p.pm.refcount[fresh] == 1
    # A page held once is written in place.
    assert p.exclusive("b", got[1]) == fresh and len(p.copies) == 1
    p.pm.check_invariants()

    # The exporter ends: its non-persistent export goes too; b keeps its pages.
    p.pm.close_instance("a")
    assert p.pm.list_exports("ns") == []
    assert p.pm.refcount[p.pm.physical("b", got[0])] == 1
    p.pm.close_instance("b")
    p.flush()
    assert p.pool.num_free == 8 and p.pm.held_pages() == 0


def test_persistent_export_outlives_its_exporter_until_unexported():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    vids = p.allocate("a", 2)
    p.pm.publish_export(p.pm.reserve_export("a", "cache", vids, 4, persistent=True))
    p.pm.close_instance("a")
    p.flush()
    assert p.pool.num_free == 6
    p.pm.open_instance("c", "ns", None)
    got, _ = p.pm.import_export("c", p.pm.lookup_export("ns", "cache"))
    p.pm.unexport("ns", "cache")
    assert p.pm.held_pages() == 2  # c still holds them
    p.pm.close_instance("c")
    p.flush()
    assert p.pool.num_free == 8


def test_pending_export_withdrawn_by_unexport_is_never_published():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    vids = p.allocate("a", 1)
    exp = p.pm.reserve_export("a", "x", vids, 1, persistent=True)
    p.pm.unexport("ns", "x")
    p.pm.publish_export(exp)  # the queued command runs later and does nothing
    assert not exp.published and p.pm.refcount[p.pm.physical("a", vids[0])] == 1
    p.pm.check_invariants()


def test_namespaces_isolate_exports():
    p = Pages()
    p.pm.open_instance("a", "alice", None)
    p.pm.open_instance("b", "bob", None)
    vids = p.allocate("a", 1)
    p.pm.publish_export(p.pm.reserve_export("a", "secret", vids, 1, persistent=False))
    assert p.pm.list_exports("bob") == []
    with pytest.raises(PieError) as exc:
        p.pm.lookup_export("bob", "secret")
    assert exc.value.code == "not-found"
    # The same name may exist in another namespace.
    (w,) = p.allocate("b", 1)
    p.pm.reserve_export("b", "secret", [w], 1, persistent=False)


def test_export_validation():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    vids = p.allocate("a", 1)
    p.pm.reserve_export("a", "x", vids, 1, persistent=False)
    for args, code in [
        (("x", vids, 1), "already-exists"),  # name taken
        (("", vids, 1), "invalid-argument"),
        (("y", [], 1), "invalid-argument"),
        (("y", vids, 0), "invalid-argument"),
        (("y", vids, PAGE_SIZE + 1), "invalid-argument"),
        (("y", [99], 1), "not-found"),
    ]:
        with pytest.raises(PieError) as exc:
            p.pm.reserve_export("a", *args, persistent=False)
        assert exc.value.code == code, args


def test_cow_failure_when_pool_is_empty_leaves_mapping_intact():
    p = Pages(num_pages=2)
    p.pm.open_instance("a", "ns", None)
    p.pm.open_instance("b", "ns", None)
    vids = p.allocate("a", 2)
    p.pm.publish_export(p.pm.reserve_export("a", "x", vids[:1], 1, persistent=False))
    got, _ = p.pm.import_export("b", p.pm.lookup_export("ns", "x"))
    with pytest.raises(PieError) as exc:
        p.exclusive("b", got[0])
    assert exc.value.code == "out-of-memory"
    assert p.pm.physical("b", got[0]) == p.pm.physical("a", vids[0])
    p.pm.check_invariants()


def test_export_whose_pages_were_freed_first_is_withdrawn():
    p = Pages()
    p.pm.open_instance("a", "ns", None)
    vids = p.allocate("a", 2)
    exp = p.pm.reserve_export("a", "x", vids, 1, persistent=False)
    p.pm.doom("a", vids[1:])  # a free on another queue runs before the export
    p.pm.release("a", vids[1:])
    with pytest.raises(PieError) as exc:
        p.pm.publish_export(exp)
    assert exc.value.code == "not-found"
    assert p.pm.list_exports("ns") == [] and not exp.published
    with pytest.raises(PieError):
        p.pm.lookup_export("ns", "x")
    p.pm.check_invariants()
