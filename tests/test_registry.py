"""The rules without gRPC: validation, the registry's pages and counts, the SQLite store."""

import contextlib
import re
import sqlite3
import threading
from concurrent import futures

import allure
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import server as presence
from server import Message, Registry, Status

CONNECTED, DISCONNECTED = Status.CONNECTED, Status.DISCONNECTED

pytestmark = [allure.feature("Registry and stores")]


# Characters the id rule is about (controls, bidirectional ones, white space) among plain ones.
ID_TEXT = st.text(st.sampled_from("ab- \t\x00\x1f\x7f\x85\x9f\u00e9\u2003\u202a\u202e\u2066"
                                  "\u2069\U0001f642"), max_size=140)
REPLY_TIMES = st.floats(min_value=0, max_value=4e9, allow_nan=False)
REPLY_SESSIONS = st.sampled_from([(), presence.DEFAULT_SESSIONS,
                                  (presence.Session("tty", 1_800_000_030.5),)])


def id_rule_holds(client_id):
    """The id rule, said once more as plainly as it reads in the README."""
    forbidden = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    return (0 < len(client_id) <= 128 and not client_id.isspace()
            and not forbidden.search(client_id))


def statuses(registry):
    return {record.client_id: record.status for record in registry.snapshot()[0]}


@pytest.fixture
def registry():
    return Registry(presence.MemoryStore(), clock=lambda: 1_800_000_000.0)


class SubmitCountingStore(presence.SqliteStore):
    """The real SQLite store, which also says when `expected` writes have been handed to it."""

    def __init__(self, path, expected):
        super().__init__(path)
        self._left = expected
        self.all_submitted = threading.Event()

    def submit(self, records, position):
        batch = super().submit(records, position)
        self._left -= 1  # the registry calls this under its lock, one writer at a time
        if not self._left:
            self.all_submitted.set()
        return batch

class ControlledSqliteStore(presence.SqliteStore):
    """The real SQLite store with two seams: its commits can be held open, and made to fail."""

    def __init__(self, path):
        super().__init__(path)
        self.released = threading.Event()
        self.released.set()
        self.holding = threading.Event()  # set once a commit waits for `released`
        self.failing = False  # commits that are not held fail, as a broken disk would
        self.submitted = threading.Semaphore(0)  # one permit per hand-over

    def hold(self):
        self.released.clear()

    def submit(self, records, position):
        batch = super().submit(records, position)
        self.submitted.release()
        return batch

    def _save(self, records):
        if not self.released.is_set():
            self.holding.set()
            self.released.wait()
        elif self.failing:
            raise sqlite3.OperationalError("disk I/O error (made by the test)")
        super()._save(records)

@contextlib.contextmanager
def commits_held(store):
    """Hold the store's commits within the block, and let them go however it ends (so a failed
    assertion does not leave a writer waiting forever)."""
    store.hold()
    try:
        yield
    finally:
        store.released.set()

def in_background(pool, call, *args):
    """call(*args) in another thread; its future."""
    return pool.submit(call, *args)

def reads(registry):
    """Everything a reader can learn from the registry, for comparing before and after."""
    return (registry.snapshot(), registry.counts(),
            registry.page(1000), [registry.get(cid) for cid in ("alice", "bob", "new")])

def setup_for_refusal(store, clock):
    """alice with a leased session 'tty' and a plain one 'desk', bob on the default session."""
    registry = Registry(store, clock=clock)
    registry.apply_many([Message("alice", CONNECTED, "tty", lease=30),
                         Message("alice", CONNECTED, "desk"), Message("bob", CONNECTED)])
    return registry


@allure.story("Client id rule")
@pytest.mark.parametrize(("client_id", "reason"), [
    ("", "must not be empty"),
    ("x" * 129, "at most 128 characters, got 129"),
    ("bell\x07", "U+0007 at position 4"),
    ("\x9f", "U+009F at position 0"),
    (" ", "must not be only white space"),
    ("\t\u2003 ", "U+0009 at position 0"),
    ("\u2003\u3000", "must not be only white space"),
    ("\u202aalice", "bidirectional override or isolate characters, found U+202A at position 0"),
    ("ali\u202ece", "found U+202E at position 3"),
    ("bob\u2066", "found U+2066 at position 3"),
    ("\u2069", "found U+2069 at position 0"),
])
def test_client_id_rule_names_what_broke(client_id, reason):
    with pytest.raises(presence.InvalidArgument, match=reason.replace("+", r"\+")):
        presence.validate_client_id(client_id)


@allure.story("Client id rule")
@settings(max_examples=500, deadline=None)
@given(client_id=ID_TEXT)
@example(client_id="x" * 128)
@example(client_id="x" * 129)
@example(client_id="   ")
def test_the_quick_path_for_plain_ids_keeps_the_whole_id_rule(client_id):
    try:
        presence.validate_client_id(client_id)
        accepted = True
    except presence.InvalidArgument:
        accepted = False
    assert accepted == id_rule_holds(client_id)


@allure.story("Replies")
@settings(max_examples=300, deadline=None)
@given(client_id=st.text(min_size=1, max_size=128), changed_at=REPLY_TIMES,
       last_seen=REPLY_TIMES, revision=st.integers(0, 2**62), sessions=REPLY_SESSIONS,
       reason=st.sampled_from(["hello", "goodbye", "lease expired", ""]),
       status=st.sampled_from(list(Status)), session_id=st.sampled_from(["", "tty"]),
       changed=st.booleans())
@example(client_id="a", changed_at=0.0, last_seen=0.0, revision=0, sessions=(), reason="",
         status=DISCONNECTED, session_id="", changed=False)
def test_the_reply_written_as_bytes_is_the_reply_protobuf_writes(
        client_id, changed_at, last_seen, revision, sessions, reason, status, session_id, changed):
    record = presence.Client(client_id, changed_at, last_seen, revision, reason, sessions)
    message = Message(client_id, status, session_id)
    change = presence.Change(presence.EventKind.CONNECTED, record, session_id) if changed else None
    assert (presence.encode_reply(message, record, change)
            == presence.message_response(message, record, change).SerializeToString())


@allure.story("Messages")
@pytest.mark.parametrize(("message", "status"), [
    ("hello", CONNECTED), (" Goodbye\t", DISCONNECTED), ("HELLO\n", CONNECTED)])
def test_messages_map_to_statuses_ignoring_case_and_padding(message, status):
    assert presence.parse_message(message) is status


@allure.story("Page tokens")
@pytest.mark.parametrize("client_id", ["alice", "名前🙂", "a/b+c=d", "x" * 128])
def test_page_token_round_trips_any_id(client_id):
    assert presence.decode_page_token(presence.encode_page_token(client_id)) == client_id


@allure.story("Pages")
def test_page_merges_statuses_in_id_order_and_says_when_more_follow(registry):
    registry.apply_many([Message(f"c{i}", CONNECTED if i % 2 else DISCONNECTED) for i in range(10)])
    page, more, revision = registry.page(4)
    assert ([r.client_id for r in page], more, revision) == (["c0", "c1", "c2", "c3"], True, 10)
    page, more, _ = registry.page(4, after="c7")
    assert ([r.client_id for r in page], more) == (["c8", "c9"], False)
    page, more, _ = registry.page(10, after="c2", status=CONNECTED)
    assert [r.client_id for r in page] == ["c3", "c5", "c7", "c9"]


@allure.story("Filters")
def test_prefix_stops_at_the_first_id_outside_it(registry):
    registry.apply_many([Message(cid, CONNECTED) for cid in ["a", "ab", "abc", "abd", "b", "aa"]])
    page, more, _ = registry.page(10, prefix="ab")
    assert ([r.client_id for r in page], more) == (["ab", "abc", "abd"], False)
    page, more, _ = registry.page(1, prefix="ab", after="ab")
    assert ([r.client_id for r in page], more) == (["abc"], True)


@allure.story("Counts")
def test_counts_move_between_statuses(registry):
    registry.apply_one(Message("a", CONNECTED))
    registry.apply_one(Message("b", CONNECTED))
    registry.apply_one(Message("a", DISCONNECTED))
    assert registry.counts() == presence.Counts(connected=1, disconnected=1, live_sessions=1,
                                                revision=3)
    assert statuses(registry) == {"a": DISCONNECTED, "b": CONNECTED}


@allure.story("SQLite store")
def test_sqlite_store_reloads_every_record_and_the_revision(tmp_path):
    store = presence.SqliteStore(str(tmp_path / "db.sqlite"))
    registry = Registry(store)
    registry.apply_one(Message("a", CONNECTED))
    registry.apply_one(Message("b", CONNECTED))
    registry.apply_one(Message("a", DISCONNECTED))
    store.close()
    reopened = presence.SqliteStore(str(tmp_path / "db.sqlite"))
    again = Registry(reopened)
    assert again.get("a") == registry.get("a")
    assert (again.counts(), statuses(again)) == (registry.counts(), statuses(registry))
    reopened.close()


def registry_gathering(store, seconds):
    """The registry store needs, its committers gathering writers for seconds (a replica's
    registry gathers for its Redis script calls, the SQLite store for its commits)."""
    registry = presence.registry_class(store)(store)
    (registry if getattr(store, "shared", False) else store).gather_seconds = seconds
    return registry


@allure.story("Group commit")
@pytest.mark.parametrize("new_store", ["sqlite", "redis"], indirect=True)
def test_writers_that_keep_meeting_share_commits_rather_than_taking_turns(new_store):
    """16 writers writing in a loop: a committer waits for the others (COMMIT_GATHER_SECONDS,
    made 20 ms here so that a busy machine cannot outlast it), so once they have met a commit
    holds most of them, not the 3-10 each that taking turns gave. Until then they come one
    by one, and a writer alone commits at once (a run had its first 18 commits alone, then
    one of all 16), so the commits before every writer has written once are not counted."""
    store = new_store()
    registry = registry_gathering(store, 0.02)
    writers, writes = 16, 25
    start = threading.Barrier(writers)
    counting = threading.Lock()
    written, have_written = [0], set()
    met = []  # (writes, commits) once every writer has written once

    def write(number):
        start.wait()
        for step in range(writes):
            registry.apply_one(Message(f"w{number}", DISCONNECTED if step % 2 else CONNECTED))
            with counting:
                written[0] += 1
                have_written.add(number)
                if len(have_written) == writers and not met:
                    met.append((written[0], store.commits))

    try:
        with futures.ThreadPoolExecutor(writers) as pool:
            for done in [pool.submit(write, number) for number in range(writers)]:
                done.result(timeout=60)
    finally:
        registry.close()
    (writes_then, commits_then), = met
    commits = store.commits - commits_then
    assert (writers * writes - writes_then) / commits >= 12, f"{commits} commits once met"


@allure.story("Group commit")
@pytest.mark.parametrize("new_store", ["sqlite", "redis"], indirect=True)
def test_a_lone_writer_commits_at_once_even_with_several_messages(new_store):
    """The gather is for writers that meet: one writer alone never waits for it, however many
    messages it sends at once (made 30 s here, so waiting would show)."""
    store = new_store()
    registry = registry_gathering(store, 30)
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            for step in range(3):
                status = DISCONNECTED if step % 2 else CONNECTED
                pool.submit(registry.apply_many, [Message(name, status) for name in "abc"]
                            ).result(timeout=10)
    finally:
        registry.close()
    assert store.commits == 3


@allure.story("Group commit")
def test_writers_arriving_during_a_commit_are_saved_by_one_commit(tmp_path):
    """While a commit waits for the disk, every writer arriving joins the next commit."""
    path = str(tmp_path / "db.sqlite")
    store = SubmitCountingStore(path, expected=16)
    registry = Registry(store)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock: the store's first commit waits
    with futures.ThreadPoolExecutor(16) as pool:
        writes = [pool.submit(registry.apply_one, Message(f"w{n}", CONNECTED)) for n in range(16)]
        assert store.all_submitted.wait(10), "the writers never reached the store"
        other.execute("ROLLBACK")
        for write in writes:
            write.result(timeout=10)
    # the first writer's commit (if it began before the others arrived), then one for the rest
    assert store.commits <= 2, f"{store.commits} commits for 16 writes"
    store.close()
    reopened = presence.SqliteStore(path)
    assert len(reopened.load()) == 16
    reopened.close()


@allure.story("SQLite store")
def test_unopenable_database_is_a_store_error_naming_the_path(tmp_path):
    with pytest.raises(presence.StoreError, match="cannot open SQLite database .*missing"):
        presence.SqliteStore(str(tmp_path / "missing" / "dir" / "db.sqlite"))


@allure.story("SQLite store")
@pytest.mark.parametrize(("query", "level"), [("", 1), ("?sync=normal", 1), ("?sync=full", 2)])
def test_store_url_picks_the_sqlite_sync_level(tmp_path, query, level):
    store = presence.open_store(f"sqlite:///{tmp_path / 'db.sqlite'}{query}")
    assert store._db.execute("PRAGMA synchronous").fetchone() == (level,)
    store.close()


@allure.story("SQLite store")
@pytest.mark.parametrize(("url", "reason"), [
    ("sqlite:///x.db?sync=fast", "sync must be one of normal, full, got 'fast'"),
    ("sqlite:///x.db?cache=big", "unknown option 'cache'"),
    ("postgres://db", "unsupported store URL"),
])
def test_bad_store_urls_say_what_is_wrong(url, reason):
    with pytest.raises(presence.StoreError, match=re.escape(reason)):
        presence.open_store(url)


@allure.story("Expiry on a moved clock")
def test_renewals_keep_one_heap_entry_per_session_and_still_expire_on_time():
    now = [1_800_000_000.0]
    registry = Registry(presence.MemoryStore(), clock=lambda: now[0])
    for _ in range(100):
        registry.apply_one(Message("alice", CONNECTED, "tty", lease=30))
        now[0] += 10
        assert registry.expire_due() == []
    assert len(registry._leases) == 1, "a renewal must not add heap entries"
    now[0] += 20.5
    assert [change.reason for change in registry.expire_due()] == ["lease expired"]
    assert registry.get("alice").status is DISCONNECTED
    assert registry._leases == [] and registry._lease_entries == {}


# --- only durable state is ever read --------------------------------------------------------


@allure.story("Reads show only durable state")
def test_readers_see_a_change_only_once_its_commit_is_done(tmp_path):
    store = ControlledSqliteStore(str(tmp_path / "db.sqlite"))
    registry = Registry(store)
    registry.apply_one(Message("alice", CONNECTED))
    before = reads(registry)
    with futures.ThreadPoolExecutor(1) as pool, commits_held(store):
        goodbye = in_background(pool, registry.apply_one, Message("alice", DISCONNECTED))
        assert store.holding.wait(10), "the goodbye never reached a commit"
        with allure.step("while the commit is held, every read shows the state before it"):
            assert reads(registry) == before
            assert registry.get("alice").status is CONNECTED
            assert (registry.counts().revision, registry.log.durable) == (1, 1)
        store.released.set()
        record, change = goodbye.result(timeout=10)
    with allure.step("once committed, every read shows it"):
        assert registry.get("alice") == record and record.status is DISCONNECTED
        assert registry.counts() == presence.Counts(0, 1, 0, 2)
        assert registry.snapshot()[1] == 2 and registry.log.read(1) == [change]
    store.close()


REFUSED_CHANGES = {
    "hello of a new client": Message("new", CONNECTED),
    "hello of a new session": Message("alice", CONNECTED, "phone"),
    "renewal of a leased session (no revision of its own)": Message("alice", CONNECTED, "tty",
                                                                    lease=30),
    "repeated hello (last seen only)": Message("bob", CONNECTED),
    "goodbye of one session": Message("alice", DISCONNECTED, "tty"),
    "goodbye of every session": Message("alice", DISCONNECTED),
    "goodbye of an unknown client": Message("new", DISCONNECTED),
    "lease expiry": None,
}


@allure.story("A refused write leaves memory as the store has it")
@pytest.mark.parametrize("kind", REFUSED_CHANGES)
def test_a_refused_change_of_any_kind_leaves_memory_exactly_as_the_store_has_it(tmp_path, kind):
    """The refused change waits for a commit while an earlier one is held, then that earlier
    one succeeds and the refused one's fails: the success must not keep the refusal."""
    path = str(tmp_path / "db.sqlite")
    now = [1_800_000_000.0]
    store = ControlledSqliteStore(path)
    registry = setup_for_refusal(store, lambda: now[0])
    now[0] += 31 if kind == "lease expiry" else 5
    with futures.ThreadPoolExecutor(2) as pool, commits_held(store):
        earlier = in_background(pool, registry.apply_one, Message("carol", CONNECTED))
        assert store.holding.wait(10) and store.submitted.acquire(timeout=10)
        message = REFUSED_CHANGES[kind]
        refused = in_background(pool, registry.expire_due) if message is None else (
            in_background(pool, registry.apply_one, message))
        assert store.submitted.acquire(timeout=10), "the change never reached the store"
        store.failing = True
        store.released.set()
        earlier.result(timeout=10)
        with pytest.raises(presence.StoreError, match="disk I/O error"):
            refused.result(timeout=10)
    reopened = presence.SqliteStore(path)
    on_disk = Registry(reopened, clock=lambda: now[0])
    assert reads(registry) == reads(on_disk)
    assert registry.get("carol") is not None, "the earlier change was durable"
    if kind == "lease expiry":
        assert registry.seconds_to_next_expiry() <= 0, "the lease must still come due"
    reopened.close()
    store.close()


@allure.story("The database removed under the server")
@pytest.mark.parametrize("what", ["the database", "its WAL", "the database, replaced"])
def test_a_database_removed_or_replaced_under_the_store_refuses_writes(tmp_path, caplog, what):
    path = tmp_path / "db.sqlite"
    store = presence.SqliteStore(str(path))
    registry = Registry(store)
    registry.apply_one(Message("alice", CONNECTED))
    before = reads(registry)
    if what == "its WAL":
        (tmp_path / "db.sqlite-wal").unlink()
    else:
        path.unlink()
        if what == "the database, replaced":
            sqlite3.connect(path).close()
    with caplog.at_level("ERROR"), pytest.raises(presence.StoreError,
                                                 match="was (removed|replaced) while the server"):
        registry.apply_one(Message("bob", CONNECTED))
    assert any("db.sqlite" in record.message and record.levelname == "ERROR"
               for record in caplog.records)
    assert reads(registry) == before, "the refused write must not show"
    with pytest.raises(presence.StoreError):
        registry.apply_one(Message("carol", CONNECTED))
    store.close()


@allure.story("Expiry on a moved clock")
def test_a_shorter_lease_asked_for_later_expires_on_its_own_time():
    now = [1_800_000_000.0]
    registry = Registry(presence.MemoryStore(), clock=lambda: now[0])
    registry.apply_one(Message("alice", CONNECTED, "tty", lease=3600))
    registry.apply_one(Message("alice", CONNECTED, "tty", lease=5))
    assert registry.seconds_to_next_expiry() == 5
    now[0] += 6
    assert [change.reason for change in registry.expire_due()] == ["lease expired"]
    now[0] += 3600
    assert registry.expire_due() == [], "the entry of the longer lease must not expire it again"
