"""Unit tests of the bootstrap registry (real SQLite file, injected clock) and input checks."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.server import ApiError, parse_device_id, parse_record, record_json_text
from bootstrap.store import (
    RegisterOutcome,
    RegistryFull,
    RegistryStore,
    StaleRegistration,
    TooManyLegacyIds,
    UnregisterOutcome,
)
from node.contact import ContactRecord
from node.errors import LocalIOError
from node.identity import Identity

T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path):
    s = RegistryStore(tmp_path / "reg.sqlite3")
    yield s
    s.close()


def test_register_new_then_refresh(store: RegistryStore) -> None:
    assert store.register("dev1", None, now=T0, expires_at=T0 + 10) is RegisterOutcome.NEW
    assert store.register("dev1", None, now=T0 + 5, expires_at=T0 + 15) is RegisterOutcome.REFRESHED
    reg = store.get("dev1", now=T0 + 12)
    assert reg is not None and reg.last_seen == T0 + 5 and reg.expires_at == T0 + 15


def test_expired_registration_is_not_online_and_counts_as_new(store: RegistryStore) -> None:
    store.register("dev1", None, now=T0, expires_at=T0 + 10)
    assert store.count_online(now=T0 + 9) == 1
    assert store.get("dev1", now=T0 + 10) is None
    assert store.count_online(now=T0 + 10) == 0
    assert store.page(10, None, now=T0 + 11) == []
    assert store.register("dev1", None, now=T0 + 11, expires_at=T0 + 20) is RegisterOutcome.NEW


def test_replay_guard_rejects_lower_seq_and_accepts_equal(store: RegistryStore) -> None:
    store.register("p", "{}", now=T0, expires_at=T0 + 10, seq=5, timestamp=100)
    with pytest.raises(StaleRegistration):
        store.register("p", "{}", now=T0 + 1, expires_at=T0 + 11, seq=4, timestamp=200)
    with pytest.raises(StaleRegistration):  # same seq, older timestamp
        store.register("p", "{}", now=T0 + 1, expires_at=T0 + 11, seq=5, timestamp=99)
    assert store.register("p", "{}", now=T0 + 1, expires_at=T0 + 11, seq=5,
                          timestamp=100) is RegisterOutcome.REFRESHED
    assert store.register("p", "{}", now=T0 + 2, expires_at=T0 + 12, seq=6,
                          timestamp=101) is RegisterOutcome.REFRESHED


def test_replay_guard_outlives_expiry_and_purge(store: RegistryStore) -> None:
    store.register("p", "{}", now=T0, expires_at=T0 + 10, seq=5, timestamp=100)
    assert store.purge_expired(T0 + 20) >= 1
    assert store.count_rows() == 0
    with pytest.raises(StaleRegistration):
        store.register("p", "{}", now=T0 + 30, expires_at=T0 + 40, seq=3, timestamp=90)
    assert store.count_rows() == 0  # the rejected write left nothing behind


def test_signed_unregister_and_its_replays(store: RegistryStore) -> None:
    store.register("p", "{}", now=T0, expires_at=T0 + 100, seq=1, timestamp=1000)
    with pytest.raises(StaleRegistration):  # a request older than the record
        store.unregister("p", now=T0, signed_timestamp=999)
    assert store.get("p", now=T0) is not None
    assert store.unregister("p", now=T0, signed_timestamp=1001) is UnregisterOutcome.REMOVED
    assert store.get("p", now=T0) is None
    assert store.unregister("p", now=T0, signed_timestamp=1001) is UnregisterOutcome.UNKNOWN
    # the last record, replayed after the unregister, is refused
    with pytest.raises(StaleRegistration):
        store.register("p", "{}", now=T0 + 1, expires_at=T0 + 100, seq=1, timestamp=1000)
    # a newer record registers again; the old unregister request cannot remove it
    store.register("p", "{}", now=T0 + 2, expires_at=T0 + 100, seq=2, timestamp=1002)
    with pytest.raises(StaleRegistration):
        store.unregister("p", now=T0 + 2, signed_timestamp=1001)
    assert store.get("p", now=T0 + 2) is not None


def test_unsigned_unregister_of_unknown_id(store: RegistryStore) -> None:
    assert store.unregister("nobody", now=T0) is UnregisterOutcome.UNKNOWN


def test_keyset_paging_covers_every_online_row_once(store: RegistryStore) -> None:
    rows = [(f"dev{i:04d}", None, T0, T0 + (5 if i % 7 == 0 else 100)) for i in range(250)]
    store.bulk_load(rows)
    seen: list[str] = []
    after = None
    while True:
        page = store.page(40, after, now=T0 + 10)
        seen += [r.device_id for r in page]
        if len(page) < 40:
            break
        after = (page[-1].slot, page[-1].device_id)
    expected = sorted(d for d, _, _, exp in rows if exp > T0 + 10)
    assert seen == expected


def test_page_query_uses_the_order_index(store: RegistryStore) -> None:
    plan = store.explain_page()
    assert "registrations_order" in plan and "TEMP B-TREE" not in plan, plan


def test_others_excludes_self_newest_first(store: RegistryStore) -> None:
    for i in range(10):
        store.register(f"d{i}", None, now=T0 + i, expires_at=T0 + 100)
    store.register("old", None, now=T0, expires_at=T0 + 1)
    got = store.others("d9", 3, now=T0 + 50)
    assert [d for d, _ in got] == ["d8", "d7", "d6"]


def test_purge_in_batches(store: RegistryStore) -> None:
    store.bulk_load([(f"x{i}", None, T0, T0 + 1) for i in range(25)])
    store.bulk_load([("keep", None, T0, T0 + 100)])
    assert store.purge_expired(T0 + 2, batch_rows=10) == 10
    while store.purge_expired(T0 + 2, batch_rows=10):
        pass
    assert store.count_rows() == 1


def test_survives_reopen(tmp_path: Path) -> None:
    s = RegistryStore(tmp_path / "r.sqlite3")
    s.register("p", '{"a":1}', now=T0, expires_at=T0 + 100, seq=3, timestamp=5)
    s.close()
    s = RegistryStore(tmp_path / "r.sqlite3")
    try:
        reg = s.get("p", now=T0 + 1)
        assert reg is not None and reg.record_json == '{"a":1}'
        with pytest.raises(StaleRegistration):
            s.register("p", "{}", now=T0 + 1, expires_at=T0 + 100, seq=2, timestamp=5)
    finally:
        s.close()


def test_wrong_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "r.sqlite3")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', '99')")
    db.commit()
    db.close()
    with pytest.raises(LocalIOError, match="schema"):
        RegistryStore(tmp_path / "r.sqlite3")


def test_unopenable_file_is_local_io_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(LocalIOError, match="dir.sqlite3"):
        RegistryStore(tmp_path / "dir.sqlite3")


# -- pure input checks of the server ------------------------------------------


def test_parse_device_id_canonicalises_peer_ids() -> None:
    ident = Identity.generate()
    text, pid = parse_device_id(ident.peer_id.compact.lower())
    assert pid == ident.peer_id and text == str(ident.peer_id)
    assert parse_device_id("laptop-1") == ("laptop-1", None)


def test_parse_device_id_refuses_mistyped_peer_id() -> None:
    compact = Identity.generate().peer_id.compact
    bad = compact[:10] + ("A" if compact[10] != "A" else "B") + compact[11:]
    with pytest.raises(ApiError) as err:
        parse_device_id(bad)
    assert err.value.status == 400


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.integers(), st.none(), st.lists(st.text())))
def test_parse_device_id_only_raises_api_errors(value: object) -> None:
    try:
        text, _ = parse_device_id(value)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    else:
        assert 0 < len(text) <= 128 and text.isprintable()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_parse_record_fuzzed_fields_only_raise_api_errors(data: st.DataObject) -> None:
    ident = Identity.generate()
    good = ContactRecord.create(ident, ["127.0.0.1"], {"tcp": 1234}, 1).to_json()
    key = data.draw(st.sampled_from(sorted(good)))
    mutated = dict(good)
    mutated[key] = data.draw(_json)
    try:
        rec = parse_record(mutated, ident.peer_id, time.time())
    except ApiError as exc:
        assert exc.status in (400, 403)
    else:  # only an unchanged value can pass
        assert rec.to_json() == good


def test_registrations_are_written_behind_and_flushed(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    s = RegistryStore(path)
    try:
        s.register("queued", None, now=T0, expires_at=T0 + 100)
        assert s.pending_rows == 1
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT count(*) FROM registrations").fetchone()[0] == 0
            assert s.flush() == 1 and s.pending_rows == 0
            assert other.execute("SELECT count(*) FROM registrations").fetchone()[0] == 1
        finally:
            other.close()
        s.register("at-close", None, now=T0, expires_at=T0 + 100)
    finally:
        s.close()
    s = RegistryStore(path)
    try:
        # slots of one source in registration order
        assert [r.device_id for r in s.page(10, None, now=T0)] == ["queued", "at-close"]
        # the in-memory state is rebuilt from the file: refresh and ring
        assert s.register("queued", None, now=T0 + 1, expires_at=T0 + 100) \
            is RegisterOutcome.REFRESHED
        assert [d for d, _ in s.others("x", 5, now=T0 + 1)] == ["queued", "at-close"]
    finally:
        s.close()


def test_fast_record_codec_matches_contact_record() -> None:
    ident = Identity.generate("näme")
    rec = ContactRecord.create(ident, ["127.0.0.1", "::1"], {"udp": 2, "tcp": 1, "dht": 3}, 7)
    text, pid = parse_device_id(str(ident.peer_id))
    assert pid is not None
    assert record_json_text(rec, text) == json.dumps(rec.to_json(), separators=(",", ":"))
    assert parse_record(rec.to_json(), pid, time.time(), text) == rec
    spelled = {**rec.to_json(), "peer_id": ident.peer_id.compact.lower()}
    assert parse_record(spelled, pid, time.time(), text) == rec
    other = ContactRecord.create(Identity.generate(), ["h"], {"tcp": 1}, 1).to_json()
    with pytest.raises(ApiError) as err:
        parse_record(other, pid, time.time(), text)
    assert err.value.status == 403


def test_registry_cap_refuses_new_ids_but_refreshes_known_ones(tmp_path: Path) -> None:
    s = RegistryStore(tmp_path / "r.sqlite3", max_registrations=2)
    try:
        s.register("a", None, now=T0, expires_at=T0 + 1)
        s.register("b", None, now=T0, expires_at=T0 + 100)
        with pytest.raises(RegistryFull):
            s.register("c", None, now=T0, expires_at=T0 + 100)
        assert s.register("b", None, now=T0, expires_at=T0 + 100) is RegisterOutcome.REFRESHED
        while s.purge_expired(T0 + 2):
            pass
        assert s.register("c", None, now=T0 + 2, expires_at=T0 + 100) is RegisterOutcome.NEW
    finally:
        s.close()


# -- fair order across sources -------------------------------------------------


def test_flooding_source_cannot_push_others_out_of_the_first_page(store: RegistryStore) -> None:
    honest = [f"zz-honest-{i}" for i in range(10)]  # sort after every flood id
    for i, d in enumerate(honest):
        store.register(d, None, now=T0 + i, expires_at=T0 + 1000, source="127.0.0.3")
    store.bulk_load([(f"aa-flood-{i:05d}", None, T0, T0 + 1000) for i in range(5000)],
                    source="127.0.0.2")
    first = [r.device_id for r in store.page(100, None, now=T0 + 20)]
    assert set(honest) <= set(first)
    # round robin: every slot level holds one id of each source
    assert first[:4] == ["aa-flood-00000", "zz-honest-0", "aa-flood-00001", "zz-honest-1"]
    # and the registration answer is shared as fairly
    got = [d for d, _ in store.others("new", 20, now=T0 + 20)]
    assert sum(d.startswith("zz-honest") for d in got) == 10


def test_paging_in_fair_order_covers_every_row_once(store: RegistryStore) -> None:
    for i in range(120):
        store.register(f"d{i:03d}", None, now=T0, expires_at=T0 + 100,
                       source=f"10.0.0.{i % 7}")
    seen: list[str] = []
    after = None
    while True:
        page = store.page(13, after, now=T0 + 1)
        seen += [r.device_id for r in page]
        if len(page) < 13:
            break
        after = (page[-1].slot, page[-1].device_id)
    assert sorted(seen) == [f"d{i:03d}" for i in range(120)] and len(seen) == 120


def test_freed_slots_are_reused_first(store: RegistryStore) -> None:
    for d in ("a", "b", "c"):
        store.register(d, None, now=T0, expires_at=T0 + 100, source="s")
    store.unregister("b", now=T0 + 1)
    store.register("d", None, now=T0 + 1, expires_at=T0 + 100, source="s")
    slots = {d: store.placement(d).slot for d in ("a", "c", "d")}  # type: ignore[union-attr]
    assert slots == {"a": 0, "c": 2, "d": 1}
    assert store.source_rows("s") == (3, 3)


def test_legacy_ids_are_capped_per_source(tmp_path: Path) -> None:
    s = RegistryStore(tmp_path / "r.sqlite3", max_legacy_per_source=3)
    try:
        for i in range(3):
            s.register(f"l{i}", None, now=T0, expires_at=T0 + 1, source="flood")
        with pytest.raises(TooManyLegacyIds):
            s.register("l3", None, now=T0, expires_at=T0 + 100, source="flood")
        # refreshing a held id is fine; other sources and signed ids are not affected
        assert s.register("l0", None, now=T0, expires_at=T0 + 1,
                          source="flood") is RegisterOutcome.REFRESHED
        s.register("x", None, now=T0, expires_at=T0 + 100, source="other")
        s.register("p", "{}", now=T0, expires_at=T0 + 100, seq=1, timestamp=1, source="flood")
        assert s.count_online(now=T0) == 5
        while s.purge_expired(T0 + 2):  # expired ones free their place at the purge
            pass
        s.register("l3", None, now=T0 + 2, expires_at=T0 + 100, source="flood")
    finally:
        s.close()


def test_replayed_record_from_elsewhere_does_not_move_it(store: RegistryStore) -> None:
    store.register("p", "{}", now=T0, expires_at=T0 + 100, seq=3, timestamp=10, source="home")
    store.register("p", "{}", now=T0 + 1, expires_at=T0 + 100, seq=3, timestamp=10,
                   source="attacker")
    assert store.placement("p") is not None and store.placement("p").source == "home"  # type: ignore[union-attr]
    store.register("p", "{}", now=T0 + 2, expires_at=T0 + 100, seq=4, timestamp=11,
                   source="roamed")
    assert store.placement("p").source == "roamed"  # type: ignore[union-attr]
    assert store.source_rows("home") == (0, 0)


def test_placements_survive_reopen_and_v1_files_migrate(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    s = RegistryStore(path)
    s.register("a", None, now=T0, expires_at=T0 + 100, source="x")
    s.register("b", None, now=T0, expires_at=T0 + 100, source="x")
    s.close()
    s = RegistryStore(path)
    try:
        assert s.placement("b") is not None and s.placement("b").slot == 1  # type: ignore[union-attr]
        s.register("c", None, now=T0, expires_at=T0 + 100, source="x")
        assert s.placement("c").slot == 2  # type: ignore[union-attr]
    finally:
        s.close()
    v1 = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(v1)
    db.executescript("""
        CREATE TABLE registrations (device_id TEXT PRIMARY KEY, record TEXT,
            last_seen REAL NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO registrations VALUES ('old-b', NULL, 1.0, 1e12), ('old-a', NULL, 1.0, 1e12);
    """)
    db.commit()
    db.close()
    s = RegistryStore(v1)
    try:
        assert [(r.device_id, r.slot) for r in s.page(10, None, now=T0)] == \
            [("old-a", 0), ("old-b", 1)]
    finally:
        s.close()


@settings(max_examples=30, deadline=None)
@given(names=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                              max_size=20), min_size=1, max_size=8, unique=True),
       seen=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_page_items_are_the_rows_of_page_as_json(tmp_path_factory: pytest.TempPathFactory,
                                                  names: list[str], seen: float) -> None:
    """GET /peers splices the JSON text SQLite writes (page_items): it must be the rows
    of page() exactly, whatever the device id holds (quotes, backslashes, non-ASCII)."""
    store = RegistryStore(tmp_path_factory.mktemp("pi") / "r.sqlite3")
    try:
        record = json.dumps({"peer_id": "x", "hosts": ["127.0.0.1"]}, separators=(",", ":"))
        for i, name in enumerate(names):
            store.register(name, record if i % 2 else None, now=seen, expires_at=seen + 600,
                           source=f"10.0.0.{i % 3}")
        rows = store.page(100, None, now=seen)
        items = store.page_items(100, None, now=seen)
        assert [(r.slot, r.device_id) for r in rows] == [(s, d) for s, d, _ in items]
        for r, (_s, _d, text) in zip(rows, items, strict=True):
            got = json.loads(text)
            assert got["device_id"] == r.device_id
            assert got["record"] == (json.loads(r.record_json) if r.record_json else None)
            assert got["last_seen"] == pytest.approx(round(r.last_seen, 3), abs=1e-6)
        # and the keyset cursor leads on the same way
        if len(rows) > 1:
            after = (rows[0].slot, rows[0].device_id)
            assert [d for _s, d, _ in store.page_items(100, after, now=seen)] == \
                [r.device_id for r in store.page(100, after, now=seen)]
    finally:
        store.close()
