"""Durable state: everything survives a restart, failures are one line, writes are atomic,
and the event sink batches without ever growing past its bound."""
import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from lab.events import Events
from lab.hostnames import Hostname, HostnameError
from lab.state import DB_NAME, SCHEMA_VERSION, EventSink, State, StateError


def hostname(id="h1", name="www.newshop.test", status="pending", **kw):
    fields = dict(zone="saas.example", txt_token="tt", http_token="ht", reason="add TXT ...", created=1.5,
                  updated=2.5, ownership=None)
    fields.update(kw)
    return Hostname(id=id, name=name, status=status, **fields)


def fill(st):
    st.save_hostname(hostname())
    st.save_hostname(hostname("h2", "shop.customer.example", "active", ownership="txt"))
    st.save_hostname(hostname("h3", "old.newshop.test", "deleted"))
    st.set_record("_sni-lab-custom-hostname.www.newshop.test", "txt", "tt", 30)
    st.set_record("www.newshop.test", "A", ["127.0.0.11", "127.0.0.12"], 60)
    st.save_override({"id": "o1", "name": "www.victim.example", "type": "A", "value": "127.0.0.11",
                      "client": "127.0.0.50", "expires": 1e10, "ttl": 5})
    st.save_override({"id": 7, "name": "victim.example", "type": "a", "value": "127.0.0.11"})
    st.set("model", "v2")
    st.add_events([{"id": 1, "ts": 10.0, "kind": "dns.answer", "trace": "t1", "qname": "www.victim.example",
                    "answers": ["127.0.0.11"]},
                   {"id": 2, "ts": 11.0, "kind": "lab.model", "trace": None, "model": "v2"}])


def check(st):
    assert [h.id for h in st.hostnames()] == ["h1", "h2", "h3"]
    assert [h.id for h in st.hostnames(include_deleted=False)] == ["h1", "h2"]
    assert st.hostname("h2") == hostname("h2", "shop.customer.example", "active", ownership="txt")
    assert st.hostname("WWW.NewShop.Test.") == hostname()
    assert st.hostname("old.newshop.test").status == "deleted"
    assert st.hostname("nope") is None and st.hostname("nope.example") is None
    assert st.records() == [
        {"name": "_sni-lab-custom-hostname.www.newshop.test", "type": "TXT", "value": "tt", "ttl": 30},
        {"name": "www.newshop.test", "type": "A", "value": "127.0.0.11", "ttl": 60},
        {"name": "www.newshop.test", "type": "A", "value": "127.0.0.12", "ttl": 60},
    ]
    assert st.overrides() == [
        {"id": "o1", "name": "www.victim.example", "type": "A", "value": "127.0.0.11", "client": "127.0.0.50",
         "expires": 1e10, "ttl": 5},
        {"id": 7, "name": "victim.example", "type": "A", "value": "127.0.0.11", "client": None, "expires": None,
         "ttl": 60},
    ]
    assert st.get("model") == "v2" and st.get("nope") is None and st.get("nope", "x") == "x"
    assert st.events() == [
        {"id": 1, "ts": 10.0, "kind": "dns.answer", "trace": "t1", "qname": "www.victim.example",
         "answers": ["127.0.0.11"]},
        {"id": 2, "ts": 11.0, "kind": "lab.model", "trace": None, "model": "v2"},
    ]
    assert st.events(since=1) == st.events()[1:] and st.events(limit=1) == st.events()[:1]
    assert st.last_event_id() == 2


def test_every_kind_survives_a_restart(tmp_path):
    with State(tmp_path / "lab") as st:
        fill(st)
        check(st)
    with State(tmp_path / "lab") as st:  # a new State on the same directory: a restart
        check(st)


def test_written_by_another_process(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_state import fill
        from lab.state import State
        st = State(sys.argv[1]); fill(st); st.close()
    """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "lab")], check=True, timeout=60)
    with State(tmp_path / "lab") as st:
        check(st)


def test_wal_mode_and_private_permissions(tmp_path):
    directory = tmp_path / "lab"
    with State(directory) as st:
        st.set("model", "v1")
        db = sqlite3.connect(directory / DB_NAME)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
        assert (directory / (DB_NAME + "-wal")).exists()
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_loose_db_file_is_tightened(tmp_path):
    (tmp_path / DB_NAME).touch(mode=0o644)
    os.chmod(tmp_path / DB_NAME, 0o644)
    State(tmp_path).close()
    assert stat.S_IMODE((tmp_path / DB_NAME).stat().st_mode) == 0o600


def _one_line_error(directory):
    with pytest.raises(StateError) as e:
        State(directory)
    assert "\n" not in str(e.value) and str(directory / DB_NAME) in str(e.value)
    return str(e.value)


def test_not_sqlite_is_one_line(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database, it is a grocery list\n" * 100)
    assert "not an sni-lab state database" in _one_line_error(tmp_path)


def test_foreign_sqlite_database_refused(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE TABLE recipes (name TEXT)")
    db.commit()
    db.close()
    assert _one_line_error(tmp_path).endswith("not an sni-lab state database")


def test_newer_schema_refused(tmp_path):
    State(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA user_version=99")
    db.close()
    assert "newer sni-lab (schema 99" in _one_line_error(tmp_path)


def test_corrupted_database_is_one_line(tmp_path):
    with State(tmp_path) as st:
        st.add_events([{"id": i, "ts": 0.0, "kind": "dns.answer", "trace": None, "pad": "x" * 500}
                       for i in range(1, 200)])
    db = tmp_path / DB_NAME
    data = bytearray(db.read_bytes())
    data[100:len(data)] = os.urandom(len(data) - 100)  # keep the header, garble every page
    db.write_bytes(bytes(data))
    with pytest.raises(StateError) as e:
        with State(tmp_path) as st:
            st.events()  # some corruption only shows when a page is read
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{db}: corrupted")


def test_a_failed_transaction_leaves_nothing(tmp_path):
    with State(tmp_path) as st:
        good = [{"id": i, "ts": 1.0, "kind": "origin.hit", "trace": None} for i in range(1, 6)]
        bad = good[:3] + [{"id": 4, "ts": 1.0, "kind": None, "trace": None}] + good[4:]  # kind NOT NULL
        with pytest.raises(StateError, match="NOT NULL"):
            st.add_events(bad)
        assert st.events() == [] and st.last_event_id() == 0
        # The connection is usable afterwards (no transaction left open).
        assert st.add_events(good) == 5 and len(st.events()) == 5
        # Replacing an RRset is one transaction too: a bad value keeps the old set whole.
        st.set_record("www.newshop.test", "A", ["127.0.0.11", "127.0.0.12"], 60)
        with pytest.raises(StateError):
            st.set_record("www.newshop.test", "A", ["127.0.0.13", None], 60)
        assert [r["value"] for r in st.records()] == ["127.0.0.11", "127.0.0.12"]


def test_one_live_registration_per_name(tmp_path):
    # The unique index catches two API calls racing past create()'s duplicate check.
    with State(tmp_path) as st:
        st.save_hostname(hostname("h1"))
        with pytest.raises(HostnameError, match="already registered"):
            st.save_hostname(hostname("h2"))
        st.save_hostname(hostname("h1", status="deleted", updated=3.0))  # upsert by id
        st.save_hostname(hostname("h2"))
        assert [(h.id, h.status) for h in st.hostnames()] == [("h1", "deleted"), ("h2", "pending")]
        assert st.hostname("www.newshop.test").id == "h2"  # the live one wins over history


def test_dns_admin(tmp_path):
    with State(tmp_path) as st:
        st.set_record("shop.customer.example", "CNAME", "customers.saas.example", 60)
        st.set_record("shop.customer.example", "cname", "elsewhere.example", 60)  # replaces, not adds
        st.set_record("shop.customer.example", "TXT", ["a", "b"], 60)
        assert [(r["type"], r["value"]) for r in st.records()] == [("CNAME", "elsewhere.example"), ("TXT", "a"),
                                                                     ("TXT", "b")]
        assert st.delete_record("shop.customer.example", "txt") == 2
        assert st.delete_record("shop.customer.example") == 1 and st.records() == []
        assert st.delete_record("nope.example") == 0

        st.save_override({"id": "a", "name": "x.example", "type": "A", "value": "127.0.0.11", "expires": 100.0})
        st.save_override({"id": "b", "name": "y.example", "type": "A", "value": "127.0.0.11", "expires": 200.0})
        st.save_override({"id": "c", "name": "z.example", "type": "A", "value": "127.0.0.11"})
        st.save_override({"id": "a", "name": "x.example", "type": "A", "value": "127.0.0.12", "expires": 100.0})
        assert [o["value"] for o in st.overrides()] == ["127.0.0.12", "127.0.0.11", "127.0.0.11"]
        assert st.purge_expired(150.0) == 1
        assert [o["id"] for o in st.overrides()] == ["b", "c"]  # no expiry: kept
        assert st.delete_override("c") == 1 and st.delete_override("c") == 0
        with pytest.raises(ValueError, match="unknown keys \\['remaining'\\]"):
            st.save_override({"id": "d", "name": "x.example", "type": "A", "value": "1.2.3.4", "remaining": 3})

        st.set("model", "v2")
        st.set("model", "v2-strict")
        assert st.get("model") == "v2-strict"
        st.set("model", None)
        assert st.get("model") is None
        with pytest.raises(TypeError):
            st.set("model", 2)


def test_reset_empties_everything(tmp_path):
    with State(tmp_path) as st:
        fill(st)
        st.reset()
        assert (st.hostnames(), st.records(), st.overrides(), st.events(), st.get("model"),
                st.last_event_id()) == ([], [], [], [], None, 0)
    with State(tmp_path) as st:
        assert st.hostnames() == [] and st.events() == []


def test_exclusive_lock(tmp_path):
    with State(tmp_path, exclusive=True):
        with pytest.raises(StateError, match="is locked by another process"):
            State(tmp_path, exclusive=True)
        State(tmp_path).close()  # a plain reader is fine
    State(tmp_path, exclusive=True).close()  # released on close


def test_busy_database_is_one_line(tmp_path):
    State(tmp_path).close()
    other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with State(tmp_path, timeout=0.05) as st:
            with pytest.raises(StateError, match="is locked by another process$"):
                st.set("model", "v2")
            assert st.get("model") is None  # readers are not blocked in WAL mode
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_closed_state(tmp_path):
    st = State(tmp_path)
    st.close()
    st.close()
    with pytest.raises(StateError, match="closed"):
        st.hostnames()


# -- the event sink -------------------------------------------------------------------


class Spy:
    """Wraps State.add_rows, the sink's write, to count batches (and optionally fail)."""

    def __init__(self, st, fail=0):
        self.batches, self.fail, self.add = [], fail, st.add_rows
        st.add_rows = self

    def __call__(self, rows):
        if self.fail:
            self.fail -= 1
            raise StateError("state.db: is locked by another process")
        self.batches.append(len(rows))
        return self.add(rows)


async def test_sink_flushes_in_batches(tmp_path):
    events = Events()
    with State(tmp_path) as st:
        spy = Spy(st)
        sink = EventSink(events, st, interval=0.05)
        await sink.start()
        for i in range(500):
            events.emit("origin.hit", trace=f"t{i}", origin="victim")
        for _ in range(500):  # wait for the first periodic flush
            if sink.flushes:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a few more (empty) ticks write nothing
        assert spy.batches == [500] and sink.flushes == 1
        for i in range(300):
            events.emit("dns.answer", trace=None, qname="x.example")
        await sink.close()
        assert spy.batches == [500, 300]
        assert len(st.events(limit=10_000)) == 800 and st.last_event_id() == 800
        assert st.events(limit=1)[0]["origin"] == "victim"
        assert sink.dropped == 0 and sink.skipped == 0
        events.emit("origin.hit")  # after close: no longer subscribed
        assert st.last_event_id() == 800


async def test_sink_buffer_is_bounded(tmp_path):
    events = Events()
    with State(tmp_path) as st:
        sink = EventSink(events, st, interval=3600, max_buffer=10)
        await sink.start()
        for _ in range(25):  # emitted faster than any flush: only the newest 10 are kept
            events.emit("origin.hit")
        assert len(sink._buf) == 10 and sink.dropped == 15
        await sink.close()
        assert [e["id"] for e in st.events()] == list(range(16, 26))


async def test_sink_keeps_events_while_the_db_is_busy(tmp_path):
    events = Events()
    with State(tmp_path) as st:
        spy = Spy(st, fail=1)
        sink = EventSink(events, st, interval=3600, max_buffer=100)
        await sink.start()
        for _ in range(30):
            events.emit("origin.hit")
        await sink.flush()  # fails: the batch is kept, in order, for the next round
        assert "locked" in sink.last_error and len(sink._buf) == 30 and spy.batches == []
        for _ in range(75):  # 105 > bound: the 5 oldest go
            events.emit("origin.hit")
        assert sink.dropped == 5
        await sink.close()
        assert spy.batches == [100]
        assert [e["id"] for e in st.events()] == list(range(6, 106))


async def test_sink_lets_requests_in_while_it_encodes_a_big_batch(tmp_path, monkeypatch):
    """Half a second of a busy lab is thousands of events: encoded in one loop step, every
    request waited behind it (4,200 events held the loop 35 ms). A slice at a time, the loop
    runs in between, and the log still gets every event, in order."""
    from lab import state as state_mod

    steps = []
    encode = state_mod.event_rows
    monkeypatch.setattr(state_mod, "event_rows", lambda batch: steps.append(len(batch)) or encode(batch))
    events = Events()
    with State(tmp_path) as st:
        sink = EventSink(events, st, interval=3600, max_buffer=5000)
        await sink.start()
        for _ in range(1000):
            events.emit("origin.hit")
        ticks = []

        async def other_work():  # a request's turn on the loop, as often as the loop gives one
            while True:
                ticks.append(len(steps))
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        await sink.flush()
        other.cancel()
        assert sum(steps) == 1000 and max(steps) <= state_mod.ENCODE_SLICE
        assert {n for n in ticks if 0 < n < len(steps)} == set(range(1, len(steps)))  # a turn after every slice
        assert [e["id"] for e in st.events(0, 2000)] == list(range(1, 1001))
        await sink.close()


async def test_sink_backfills_startup_events_and_skips_stored_ids(tmp_path):
    events = Events()
    with State(tmp_path) as st:
        st.add_events([{"id": 1, "ts": 0.0, "kind": "lab.model", "trace": None}])
        events.emit("lab.model", model="v1")  # id 1: already stored (a restarted counter)
        events.emit("lab.model", model="v2")  # id 2: emitted before the sink started
        sink = EventSink(events, st, interval=3600)
        await sink.start()
        events.emit("origin.hit")
        await sink.close()
        assert [e["id"] for e in st.events()] == [1, 2, 3] and st.events()[1]["model"] == "v2"
        assert sink.skipped == 0  # id 1 was never offered: backfill starts after last_event_id()
        assert st.add_events([{"id": 3, "ts": 0.0, "kind": "origin.hit", "trace": None}]) == 0  # idempotent


def test_many_processes_create_one_database(tmp_path):
    code = "import sys; from lab.state import State; st = State(sys.argv[1]); st.set(sys.argv[2], 'x'); st.close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "lab"), f"k{i}"]) for i in range(6)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    with State(tmp_path / "lab") as st:
        assert [st.get(f"k{i}") for i in range(6)] == ["x"] * 6


def test_event_log_keeps_the_newest(tmp_path):
    from lab.state import State

    state = State(tmp_path)
    state.add_events([{"id": i, "ts": float(i), "kind": "route.decision", "trace": None, "n": i} for i in range(1, 101)])
    assert state.prune_events(30) == 70
    kept = state.events(0, 1000)
    assert [e["id"] for e in kept] == list(range(71, 101)) and kept[0]["n"] == 71
    state.close()


def _size(directory):
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


async def test_long_paths_cannot_grow_the_event_log(tmp_path):
    """The probe's flood: 5000 decisions for a 60 KiB path (was +286 MB of `.lab/`)."""
    events = Events(field_limit=512)
    path = "/" + "a" * (60 * 1024)
    with State(tmp_path / "lab") as st:
        sink = EventSink(events, st, interval=3600, keep_bytes=1_000_000)
        await sink.start()
        before = _size(tmp_path / "lab")
        for i in range(5000):
            events.emit("route.decision", trace=f"t{i}", host="www.victim.example", status=421, path=path,
                        reason="x" * 600, ms=float("inf"))
            if i % 250 == 249:
                await sink.flush()
        await sink.close()
        newest = st.events(since=st.last_event_id() - 1)[0]
        assert st.event_bytes() <= 1_000_000
        grown = _size(tmp_path / "lab") - before
    assert newest["path"] == path[:512] + f"...[{len(path) - 512} more characters]"
    assert newest["reason"] == "x" * 512 + "...[88 more characters]" and newest["ms"] == "inf"
    assert events.since(4999)[0]["path"] == newest["path"]  # the ring buffer holds the bounded event too
    # the data budget, its page overhead and the WAL (cut back to 4 MiB after each checkpoint)
    assert grown < 2 * 1_000_000 + 4 * 1024 * 1024 + 65536, grown


def test_event_log_pruned_by_bytes_keeps_the_newest(tmp_path):
    with State(tmp_path) as st:
        st.add_events([{"id": i, "ts": 0.0, "kind": "origin.hit", "trace": None, "pad": "p" * 1000}
                       for i in range(101, 201)])  # ids of one length: rows of one size
        one = st.event_bytes() // 100
        assert st.prune_events(1000, keep_bytes=10 * one + 5) == 90
        assert [e["id"] for e in st.events()] == list(range(191, 201))
        assert st.prune_events(1000, keep_bytes=10 * one) == 0


def test_pruning_keeps_what_fits_as_events_come_and_go(tmp_path):
    """The stored total is counted as rows come and go, not summed per pruning: through skipped
    rows, a failed write, events stored with their hostname and prunings, each pruning keeps
    exactly the newest events that fit both budgets (as summing the table would say)."""
    budget, keep = 30_000, 120
    with State(tmp_path) as st:
        def stored():
            db = sqlite3.connect(tmp_path / DB_NAME)
            try:
                return db.execute("SELECT id, length(data) FROM events ORDER BY id DESC").fetchall()
            finally:
                db.close()

        next_id = 1
        for n in range(40):
            batch = [{"id": next_id + i, "ts": 0.0, "kind": "origin.hit", "trace": None, "pad": "p" * (i * 37 % 900)}
                     for i in range(40)]
            next_id += len(batch)
            st.add_events(batch)
            if n % 13 == 6:  # stored already: nothing added (which rows, SQLite does not say: summed again)
                assert st.add_events(batch[-3:]) == 0
            if n % 9 == 4:  # a write that fails leaves nothing, counted or stored
                st.before_write = lambda: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error"))
                with pytest.raises(StateError):
                    st.add_events([{"id": next_id, "ts": 0.0, "kind": "origin.hit", "trace": None, "pad": "x" * 5000}])
                st.before_write = None
            if n % 7 == 3:  # stored with its hostname, then offered again by the sink
                event = {"id": next_id, "ts": 0.0, "kind": "hostname.status", "trace": None, "pad": "h" * 700}
                st.save_hostname(hostname(f"h{n}", name=f"www{n}.newshop.test"), event)
                assert st.add_events([event]) == 1
                next_id += 1
            rows, total, expected = stored(), 0, set()
            for id_, size in rows:  # newest first, while both budgets hold
                if len(expected) == keep or total + size > budget:
                    break
                total += size
                expected.add(id_)
            st.prune_events(keep, keep_bytes=budget)
            assert {id_ for id_, _ in stored()} == expected
        assert 0 < st.event_bytes() <= budget
        # A pruning reads the rows it removes, not the table: as many steps with 10x more rows kept.
        steps = []
        for size in (2_000, 20_000):
            st.add_events([{"id": next_id + i, "ts": 0.0, "kind": "origin.hit", "trace": None} for i in range(size)])
            next_id += size
            st.prune_events(size)
            event = {"id": next_id, "ts": 0.0, "kind": "hostname.status", "trace": None}
            st.save_hostname(hostname(f"big{size}", name=f"big{size}.newshop.test"), event)
            st.add_events([event] + [{"id": next_id + i, "ts": 0.0, "kind": "origin.hit", "trace": None}
                                     for i in range(1, 50)])
            next_id += 50
            with st.counting() as seen:
                assert st.prune_events(size, keep_bytes=10**9) == 50
            steps.append(seen["steps"])
        assert steps[1] < 1.5 * steps[0], steps


def test_a_schema_1_database_is_migrated_and_keeps_its_hostnames(tmp_path):
    from lab.state import APPLICATION_ID, SCHEMA

    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    for stmt in filter(str.strip, SCHEMA.split(";")):
        db.execute(stmt)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute("PRAGMA user_version=1")
    db.execute("INSERT INTO hostnames VALUES ('h1', 'shop.customer.example', 'saas.example', 'active', 't', 'h', "
               "'declared active', 1.0, 2.0, 'world')")
    db.close()
    with State(tmp_path) as st:
        (h,) = st.hostnames()
        assert (h.name, h.status, h.ownership, h.failures, h.last_error, h.negatives) == \
               ("shop.customer.example", "active", "world", 0, None, 0)
        st.save_hostname(hostname("h2", failures=2, last_error="no answer", next_check=9.0, negatives=1,
                                  negative_since=3.0))
        assert st.hostname("h2").to_dict() == hostname("h2", failures=2, last_error="no answer", next_check=9.0,
                                                       negatives=1, negative_since=3.0).to_dict()
    assert sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newest_events_filtered_in_the_database(tmp_path):
    with State(tmp_path) as st:
        st.add_events([{"id": i, "ts": float(i), "kind": kind, "trace": f"t{i % 3}", **extra}
                       for i, (kind, extra) in enumerate([("dns.answer", {"internal": True}), ("dns.answer", {}),
                                                          ("route.decision", {}), ("dns.error", {})] * 5, start=1)])
        # ids 1, 5, 9...: internal dns.answer; 2, 6...: dns.answer; 3, 7...: route.decision; 4, 8...: dns.error
        ids = lambda es: [e["id"] for e in es]
        assert ids(st.newest_events(3)) == [18, 19, 20]
        assert ids(st.newest_events(3, kind="dns")) == [16, 18, 20]  # internal ones left out
        assert ids(st.newest_events(3, kind="dns", internal=True)) == [17, 18, 20]
        assert ids(st.newest_events(2, kind="dns.answer", before=14)) == [6, 10]
        assert ids(st.newest_events(9, since=15)) == [16, 18, 19, 20]
        assert ids(st.newest_events(9, trace="t1", since=10)) == [16, 19]
        assert ids(st.newest_events(5, kind="nope")) == []


def test_purge_removes_the_row_and_stores_its_event(tmp_path):
    with State(tmp_path) as st:
        fill(st)
        event = {"id": 3, "ts": 12.0, "kind": "hostname.status", "trace": None, "hostname": "www.newshop.test",
                 "old": "pending", "new": "deleted", "purged": True}
        assert st.purge_hostname("h1", event) == 1 and st.purge_hostname("h3") == 1
        assert [h.id for h in st.hostnames()] == ["h2"] and st.hostname("www.newshop.test") is None
        assert st.events()[-1] == event
        assert st.purge_hostname("h1") == 0


def test_a_schema_2_database_is_migrated_keeps_its_hostnames_and_takes_blocked_and_zones(tmp_path):
    from lab.state import APPLICATION_ID, MIGRATE_2, SCHEMA

    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    for stmt in filter(str.strip, (SCHEMA + ";" + MIGRATE_2).split(";")):
        db.execute(stmt)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO hostnames VALUES ('h1', 'shop.customer.example', 'saas.example', 'active', 't', 'h', "
               "'declared active', 1.0, 2.0, 'world', 1, 'no answer', 5.0, 0, NULL)")
    with pytest.raises(sqlite3.IntegrityError):  # schema 2 knew no blocked status
        db.execute("INSERT INTO hostnames VALUES ('h9', 'x.bank.test', 'saas.example', 'blocked', 't', 'h', "
                   "'r', 1.0, 2.0, NULL, 0, NULL, NULL, 0, NULL)")
    db.close()
    with State(tmp_path) as st:
        (h,) = st.hostnames()
        assert (h.name, h.status, h.failures, h.last_error, h.poisoned_by) == \
               ("shop.customer.example", "active", 1, "no answer", None)
        st.save_hostname(hostname("h2", status="blocked", poisoned_by=None))
        st.save_hostname(hostname("h3", name="www.victim.example", status="active", poisoned_by="ovr-1"))
        assert st.hostname("h2").status == "blocked" and st.hostname("h3").poisoned_by == "ovr-1"
        with pytest.raises(HostnameError):  # the live-name index came back with the table
            st.save_hostname(hostname("h4", name="www.victim.example"))
        st.save_zone({"name": "saas3.example", "origin": "saas2", "saas": True, "hosts": ["saas3.example"]})
        assert [z["name"] for z in st.zones()] == ["saas3.example"]
        assert st.delete_zone("saas3.example") == 1 and st.zones() == []
    assert sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
