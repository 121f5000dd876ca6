"""The redis:// store on a real redis-server: compare-and-set commits, one revision sequence for
every replica, the change stream and its history, leases, loading, and Redis going away.

Each test starts its own redis-server (conftest `redis_server`) on a free loopback port with a
folder of its own; two RedisStore objects on one Redis stand for two replicas.
"""

import socket
import threading
from concurrent import futures

import allure
import pytest

import server as presence
from conftest import DEADLINE, RedisServer, free_address
from server import Client, EventKind, RedisStore, Session, StoreError

pytestmark = [allure.feature("Redis store")]

NOW = 1_800_000_000.0


def hello(client_id, session_id="", lease_until=0.0, revision=0, seen=NOW):
    """A connected record with one session, as a writer would make it."""
    return Client(client_id, NOW, seen, revision, "hello", (Session(session_id, lease_until),))


def add_session(store, client_id, session_id):
    """Add a session the way a replica does: read, work the change out, compare-and-set, and
    again from the stored record when another writer came first. Its revision."""
    record, stored = store.fetch(client_id)
    while True:
        sessions = record.sessions if record else ()
        new = presence.put_session(sessions, Session(session_id, 0.0))
        kind = EventKind.SESSION_STARTED if sessions else EventKind.CONNECTED
        changed = Client(client_id, NOW, NOW, 0, "hello", new)
        saved, revision, stored_now = store.commit(client_id, stored, changed, (kind, session_id))
        if saved:
            return revision
        stored = stored_now
        record = presence.decode_record(client_id, stored) if stored is not None else None


@pytest.fixture
def stores(redis_url):
    """Open RedisStores on the test's Redis with `stores(**options)`; all closed afterwards."""
    opened = []

    def open_one(**options):
        opened.append(RedisStore(redis_url, **options))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(stores):
    return stores()


@allure.story("Compare and set")
def test_commit_refuses_a_stale_record_and_returns_the_stored_bytes(store):
    saved, revision, _ = store.commit("alice", None, hello("alice", "a"),
                                      (EventKind.CONNECTED, "a"))
    assert (saved, revision) == (True, 1)
    record, stored = store.fetch("alice")
    assert record == hello("alice", "a", revision=1)
    with allure.step("a writer that still thinks alice is unknown is refused"):
        assert store.commit("alice", None, hello("alice", "b"), (EventKind.CONNECTED, "b")) \
            == (False, 0, stored)
    with allure.step("a renewal changes the bytes, so a writer that read before it is refused"):
        renewed = record._replace(last_seen=NOW + 5)
        assert store.commit("alice", stored, renewed, None) == (True, 1, None)
        late = store.commit("alice", stored, hello("alice", "c"), (EventKind.SESSION_STARTED, "c"))
        assert late[:2] == (False, 0)
    assert store.fetch("alice")[0] == renewed
    assert store.last_id() == "1-1"


@allure.story("Compare and set")
def test_a_cached_record_encodes_to_the_stored_bytes(store):
    records = [
        hello("default"),
        Client("gone", NOW, NOW + 0.125, 0, "goodbye", ()),
        Client("many", NOW - 1e-6, NOW, 0, "hello",
               tuple(Session(f"t\u00e9rminal-{n}", NOW + n / 3 if n % 2 else 0.0)
                     for n in range(5))),
    ]
    store.commit_many([(record.client_id, None, record, (EventKind.CONNECTED, ""))
                       for record in records])
    for record in records:
        cached, stored = store.fetch(record.client_id)
        assert presence.encode_record(cached) == stored
        assert cached == record._replace(revision=cached.revision)


@allure.story("Compare and set")
def test_a_batch_is_saved_whole_or_not_at_all(store):
    store.commit("bob", None, hello("bob"), (EventKind.CONNECTED, ""))
    _, bob = store.fetch("bob")
    with allure.step("one stale item refuses the batch: nothing saved, no revision taken"):
        result = store.commit_many([
            ("alice", None, hello("alice", "a"), (EventKind.CONNECTED, "a")),
            ("bob", None, hello("bob", "b"), (EventKind.CONNECTED, "b")),
        ])
        assert (result.ok, result.conflict, result.current) == (False, 1, bob)
        assert store.fetch("alice") == (None, None)
        assert store.last_id() == "1-0"
    with allure.step("a client twice in a batch: the second item follows from the first, "
                     "whatever it says it read"):
        alice = hello("alice", "a")
        both = alice._replace(sessions=(Session("a", 0.0), Session("b", 0.0)))
        result = store.commit_many([
            ("alice", None, alice, (EventKind.CONNECTED, "a")),
            ("bob", bob, hello("bob", revision=1, seen=NOW + 1), None),
            ("alice", b"not compared", both, (EventKind.SESSION_STARTED, "b")),
        ])
        assert (result.ok, result.revisions) == (True, [2, 1, 3])
    assert store.fetch("alice")[0] == both._replace(revision=3)
    assert [(entry_id, kind) for entry_id, _, kind, _ in store.read_changes("1-0", 0, 10)] == [
        ("2-0", EventKind.CONNECTED), ("2-1", None), ("3-0", EventKind.SESSION_STARTED)]


@allure.story("Compare and set")
def test_writers_sharing_a_call_are_each_saved_or_refused_on_their_own(store):
    store.commit("bob", None, hello("bob"), (EventKind.CONNECTED, ""))
    _, bob = store.fetch("bob")
    results = store.commit_groups([
        [("alice", None, hello("alice", "a"), (EventKind.CONNECTED, "a"))],
        [("dave", None, hello("dave"), (EventKind.CONNECTED, "")),
         ("bob", None, hello("bob", "b"), (EventKind.CONNECTED, "b"))],
        [("carol", None, hello("carol"), (EventKind.CONNECTED, ""))],
        [("bob", b"follows the refused one", hello("bob", "c"), (EventKind.SESSION_STARTED, "c"))],
        [("alice", b"follows the saved one", hello("alice", "a", seen=NOW + 1), None)],
    ])
    with allure.step("a stale item refuses its own group whole, and nothing else"):
        assert [result.ok for result in results] == [True, False, True, False, True]
        assert (results[1].conflict, results[1].current) == (1, bob)
        assert results[1].stored == {"dave": None, "bob": bob}
        assert store.fetch("dave") == (None, None)
    with allure.step("a group with a client of a refused group is refused too"):
        assert (results[3].conflict, results[3].current, results[3].stored) == (-1, bob,
                                                                               {"bob": bob})
    assert [result.revisions for result in results if result.ok] == [[2], [3], [2]]
    assert store.fetch("bob") == (presence.decode_record("bob", bob), bob)
    assert [entry_id for entry_id, *_ in store.read_changes("1-0", 0, 10)] == [
        "2-0", "3-0", "3-1"]


@allure.story("Compare and set")
def test_a_call_of_more_clients_than_one_redis_command_takes_is_compared_and_saved_whole(store):
    store.commit("bob", None, hello("bob"), (EventKind.CONNECTED, ""))
    _, bob = store.fetch("bob")
    many = [(f"c{number}", None, hello(f"c{number}"), (EventKind.CONNECTED, ""))
            for number in range(4_500)]
    results = store.commit_groups([many, [("bob", None, hello("bob", "b"),
                                           (EventKind.CONNECTED, "b"))]])
    with allure.step("4,500 clients (9,000 values to store, past what one Lua unpack takes) "
                     "saved with one revision each; the stale group refused"):
        assert results[0].ok and results[0].revisions == list(range(2, 4_502))
        assert (results[1].ok, results[1].current) == (False, bob)
    assert store.fetch("c4499")[0] == hello("c4499", revision=4_501)
    assert len(store.load()[0]) == 4_501


@allure.story("Replicas never lose an update")
def test_concurrent_writers_on_two_stores_never_lose_an_update(stores):
    replicas = [stores(), stores()]
    sessions = [f"terminal-{number}" for number in range(40)]
    start = threading.Barrier(8)

    def write(worker):
        start.wait()
        return [add_session(replicas[worker % 2], "alice", session_id)
                for session_id in sessions[worker::8]]

    with futures.ThreadPoolExecutor(8) as pool:
        revisions = [revision for done in pool.map(write, range(8)) for revision in done]
    record, _ = replicas[0].fetch("alice")
    assert sorted(session.session_id for session in record.sessions) == sorted(sessions)
    assert sorted(revisions) == list(range(1, 41)), "each revision given once, none skipped"
    assert record.revision == 40
    with allure.step("the stream holds every change once, in revision order"):
        changes = replicas[1].changes_since(0)
        assert [record.revision for _, record, _, _ in changes] == list(range(1, 41))
        assert sorted(session_id for *_, session_id in changes) == sorted(sessions)


@allure.story("One revision sequence")
def test_revisions_rise_across_stores_and_are_never_reused(stores, redis_url):
    first, second = stores(), stores()
    revisions = [store.commit(f"client-{index}", None, hello(f"client-{index}"),
                              (EventKind.CONNECTED, ""))[1]
                 for index, store in enumerate([first, second] * 5)]
    assert revisions == list(range(1, 11))
    first.close()
    with allure.step("a store opened later goes on from there"):
        assert stores().commit("late", None, hello("late"), (EventKind.CONNECTED, ""))[1] == 11


@allure.story("Change stream")
def test_renewals_are_stream_entries_under_the_current_revision(store):
    store.commit("alice", None, hello("alice"), (EventKind.CONNECTED, ""))
    for seen in (NOW + 1, NOW + 2):
        _, stored = store.fetch("alice")
        store.commit("alice", stored, hello("alice", revision=1, seen=seen), None)
    store.commit("bob", None, hello("bob"), (EventKind.CONNECTED, ""))
    entries = store.read_changes("0-0", 0, 10)
    assert [(entry_id, record.client_id, record.revision, record.last_seen, kind)
            for entry_id, record, kind, _ in entries] == [
        ("1-0", "alice", 1, NOW, EventKind.CONNECTED),
        ("1-1", "alice", 1, NOW + 1, None),
        ("1-2", "alice", 1, NOW + 2, None),
        ("2-0", "bob", 2, NOW, EventKind.CONNECTED),
    ]
    with allure.step("a watcher resuming from a revision gets only the changes"):
        assert [entry_id for entry_id, *_ in store.changes_since(0)] == ["1-0", "2-0"]


@allure.story("Change stream")
def test_read_changes_returns_the_entries_after_an_id_in_order(stores):
    writer, reader = stores(), stores()
    for index in range(5):
        writer.commit(f"c{index}", None, hello(f"c{index}", f"s{index}"),
                      (EventKind.CONNECTED, f"s{index}"))
    entries = reader.read_changes("2-0", 0, 10)
    assert [(entry_id, record.client_id, session_id) for entry_id, record, _, session_id
            in entries] == [("3-0", "c2", "s2"), ("4-0", "c3", "s3"), ("5-0", "c4", "s4")]
    assert [entry_id for entry_id, *_ in reader.read_changes("0-0", 0, 2)] == ["1-0", "2-0"]
    assert reader.read_changes("5-0", 0, 10) == []
    with (allure.step("a blocked read returns with the next write, made by another store"),
          futures.ThreadPoolExecutor(1) as pool):
        waiting = pool.submit(reader.read_changes, "5-0", 10, 10)
        writer.commit("c5", None, hello("c5"), (EventKind.CONNECTED, ""))
        assert [entry_id for entry_id, *_ in waiting.result(timeout=10)] == ["6-0"]


@allure.story("Change stream")
def test_a_commit_answers_the_entries_after_an_id_that_came_before_its_own(stores):
    """A replica follows the others' writes in the answers to its own commits: the entries
    after its position, as read_changes gives them, or None where they would leave a gap."""
    writer, replica = stores(history=10), stores()
    for index in range(3):
        writer.commit(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
    writer.commit("c2", writer.fetch("c2")[1], hello("c2", seen=NOW + 1, revision=3), None)

    def mine(name):
        return [(name, None, hello(name), (EventKind.CONNECTED, ""))]

    (result,), before = replica.commit_following([mine("m1")], "1-0", 10)
    assert result.ok and result.ids == ["4-0"]
    assert before == writer.read_changes("1-0", 0, 3)
    assert [(entry_id, record.client_id, kind) for entry_id, record, kind, _ in before] == [
        ("2-0", "c1", EventKind.CONNECTED), ("3-0", "c2", EventKind.CONNECTED),
        ("3-1", "c2", None)]
    with allure.step("as many entries as asked for may not reach the call's own: None"):
        assert replica.commit_following([mine("m2")], "3-1", 1)[1] is None
        before = replica.commit_following([mine("m3")], "4-0", 2)[1]
        assert [entry_id for entry_id, *_ in before] == ["5-0"]
    with allure.step("none asked for, or past the trimmed history: None"):
        assert replica.commit_following([mine("m4")], "", 10)[1] is None
        for first in range(0, 300, 100):
            writer.commit_many([(f"t{index}", None, hello(f"t{index}"), (EventKind.CONNECTED, ""))
                                for index in range(first, first + 100)])
        assert replica.commit_following([mine("m5")], "1-0", 1000)[1] is None


@allure.story("Change stream")
def test_past_the_trimmed_history_a_reader_is_told_to_load_again(stores):
    store = stores(history=10)
    for first in range(0, 300, 100):
        store.commit_many([(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
                           for index in range(first, first + 100)])
    assert store.changes_since(1) is None
    with pytest.raises(presence.ChangesTrimmed, match="no longer holds the changes after 1-0"):
        store.read_changes("1-0", 0, 10)
    with allure.step("the recent history is still there"):
        assert [record.revision for _, record, _, _ in store.changes_since(295)] \
            == [296, 297, 298, 299, 300]
        assert store.changes_since(300) == []


@allure.story("Leases")
def test_due_leases_are_the_sessions_whose_lease_ran_out(store):
    leased = Client("alice", NOW, NOW, 0, "hello",
                    (Session("a", NOW + 10), Session("b", NOW + 20), Session("c", 0.0)))
    store.commit("alice", None, leased, (EventKind.CONNECTED, "a"))
    store.commit("bob", None, hello("bob", "x", NOW + 5), (EventKind.CONNECTED, "x"))
    assert store.due_leases(NOW + 4, 10) == []
    assert store.due_leases(NOW + 15, 10) == [("bob", "x"), ("alice", "a")]
    assert store.due_leases(NOW + 15, 1) == [("bob", "x")]
    with allure.step("a renewal moves a lease, an ended session has none"):
        record, stored = store.fetch("alice")
        renewed = record._replace(sessions=(Session("a", NOW + 30), Session("c", 0.0)))
        store.commit("alice", stored, renewed, (EventKind.SESSION_ENDED, "b"))
        assert store.due_leases(NOW + 25, 10) == [("bob", "x")]
        assert store.due_leases(NOW + 30, 10) == [("bob", "x"), ("alice", "a")]


@allure.story("Leases")
def test_a_lease_due_on_two_stores_is_ended_by_one_of_them(stores):
    replicas = [stores(), stores()]
    replicas[0].commit("alice", None, hello("alice", "a", NOW + 10), (EventKind.CONNECTED, "a"))
    read = [replica.fetch("alice") for replica in replicas]  # both see the lease run out
    assert [replica.due_leases(NOW + 10, 10) for replica in replicas] == [[("alice", "a")]] * 2
    ended = [replica.commit("alice", stored, record._replace(sessions=(), reason="lease expired"),
                            (EventKind.DISCONNECTED, "a"))
             for replica, (record, stored) in zip(replicas, read, strict=True)]
    assert [saved for saved, _, _ in ended] == [True, False]
    with allure.step("the one refused reads again and finds nothing left to end"):
        record = presence.decode_record("alice", ended[1][2])
        assert record.sessions == () and record.revision == 2
        assert replicas[1].due_leases(NOW + 10, 10) == []
    assert [kind for _, _, kind, _ in replicas[1].read_changes("0-0", 0, 10)] \
        == [EventKind.CONNECTED, EventKind.DISCONNECTED]


@allure.story("Loading")
def test_load_returns_every_record_at_an_id_a_reader_resumes_from(stores):
    writer, loader = stores(), stores()
    for index in range(50):
        writer.commit(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
    records, at = loader.load()
    assert {record.client_id: record for record in records} \
        == {f"c{index}": writer.fetch(f"c{index}")[0] for index in range(50)}
    assert at == "50-0"

    with allure.step("loaded records share what a running server shares"):
        assert len({id(record.reason) for record in records}) == 1
        assert all(record.last_seen is record.changed_at for record in records)
        assert all(record.sessions is presence.DEFAULT_SESSIONS for record in records)


@allure.story("Loading")
def test_loading_while_another_store_writes_gives_records_at_the_id_it_returns(stores):
    writer, loader = stores(), stores()
    clients = 25_000  # more than one HSCAN slice, so writes land between the slices
    for first in range(0, clients, 1000):
        writer.commit_many([(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
                            for index in range(first, first + 1000)])
    stop = threading.Event()

    def keep_writing():
        count = 0
        while not stop.is_set():
            add_session(writer, f"c{count * 7919 % clients}", f"s{count}")
            count += 1
        return count

    with futures.ThreadPoolExecutor(1) as pool:
        writing = pool.submit(keep_writing)
        loads = [loader.load() for _ in range(3)]
        stop.set()
        assert writing.result(timeout=30) > 0
    final = {record.client_id: record for record in loader.load()[0]}
    for records, at in loads:
        with allure.step(f"the records loaded at {at}, with every change after it, are the last"):
            cache = {record.client_id: record for record in records}
            for _, record, _, _ in loader.read_changes(at, 0, 1_000_000):
                cache[record.client_id] = record
            assert cache == final


@allure.story("Redis goes away and comes back")
def test_a_stopped_redis_is_a_store_error_and_a_restarted_one_serves_again(store, redis_server):
    for index in range(20):
        store.commit(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
    redis_server.stop()
    with allure.step("every call fails with a sentence saying the shared store is away"):
        for call in (lambda: store.fetch("c1"), store.last_id, store.load,
                     lambda: store.commit("x", None, hello("x"), (EventKind.CONNECTED, "")),
                     lambda: store.read_changes("0-0", 1, 10)):
            with pytest.raises(StoreError, match=r"the shared store \(Redis at 127\.0\.0\.1:\d+\) "
                                                 "is unreachable"):
                call()
    redis_server.start()
    with allure.step("the same store works again, and nothing committed was lost"):
        records, at = store.load()
        assert sorted(record.client_id for record in records) == sorted(f"c{i}" for i in range(20))
        assert at == "20-0"
        assert store.commit("c20", None, hello("c20"), (EventKind.CONNECTED, ""))[:2] == (True, 21)


@allure.story("Redis goes away and comes back")
def test_redis_killed_keeps_every_acknowledged_commit(store, redis_server):
    for index in range(200):
        store.commit(f"c{index}", None, hello(f"c{index}"), (EventKind.CONNECTED, ""))
    redis_server.kill()
    redis_server.start()
    records, at = store.load()
    assert len(records) == 200 and at == "200-0"
    assert store.commit("c200", None, hello("c200"), (EventKind.CONNECTED, ""))[:2] == (True, 201)


@allure.story("Redis goes away and comes back")
def test_a_silent_network_times_out_and_a_cut_connection_is_made_again(redis_server, tcp_proxy):
    proxy = tcp_proxy(redis_server.port)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0?timeout=0.5")
    watcher = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
    try:
        store.commit("alice", None, hello("alice"), (EventKind.CONNECTED, ""))
        proxy.pause()
        watcher.sendall(b"PING\r\n")
        with pytest.raises(StoreError, match="did not answer in time .*Timeout"):
            store.fetch("alice")
        proxy.resume()
        with allure.step("healed: what waited goes through, and the store works again"):
            assert watcher.recv(64) == b"+PONG\r\n"
            assert store.fetch("alice")[0].revision == 1
        proxy.cut()
        with allure.step("cut: connections close, and the store opens a new one"):
            assert watcher.recv(64) == b""
            assert store.fetch("alice")[0].revision == 1
    finally:
        watcher.close()
        store.close()


@allure.story("Opening")
@pytest.mark.parametrize(("url", "sentence"), [
    ("redis://", "not a Redis store URL: 'redis://'; use redis://"),
    ("redis://127.0.0.1:port/0", "not a Redis store URL"),
    ("redis://127.0.0.1:6379/zero", "not a Redis store URL"),
    ("redis://127.0.0.1:6379/0?pool=3", "unknown option 'pool'"),
    ("redis://127.0.0.1:6379/0?ca=ca.pem", "the ca option is for rediss:// (TLS)"),
    ("redis://127.0.0.1:6379/0?timeout=-1", "timeout must be a positive number of seconds"),
])
def test_a_bad_url_is_refused_with_a_sentence(url, sentence):
    with pytest.raises(StoreError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        presence.open_store(url)


@allure.story("Opening")
def test_an_unreachable_redis_is_refused_with_a_sentence():
    address = free_address()
    with pytest.raises(StoreError, match=f"the shared store \\(Redis at {address}\\) is "
                                         "unreachable: .*refused"):
        presence.open_store(f"redis://{address}/0")


@allure.story("Opening")
def test_open_store_opens_redis_with_a_password_and_over_tls(tmp_path, certificates):
    tls_port = int(free_address().rpartition(":")[2])
    folder = tmp_path / "tls-redis"
    folder.mkdir()
    redis_server = RedisServer(folder, "--requirepass", "s3cret", "--tls-port", str(tls_port),
                       "--tls-cert-file", str(certificates / "server.pem"),
                       "--tls-key-file", str(certificates / "server.key"),
                       "--tls-ca-cert-file", str(certificates / "ca.pem"),
                       "--tls-auth-clients", "no")
    try:
        with (allure.step("a wrong password is refused"),
              pytest.raises(StoreError, match="Redis at 127.0.0.1")):
            presence.open_store(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
        store = presence.open_store(
            f"rediss://:s3cret@127.0.0.1:{tls_port}/1?ca={certificates / 'ca.pem'}")
        try:
            assert isinstance(store, RedisStore)
            assert store.commit("alice", None, hello("alice"), (EventKind.CONNECTED, ""))[0]
            assert store.fetch("alice")[0].revision == 1
        finally:
            store.close()
    finally:
        redis_server.stop()


@allure.story("Compare-and-set")
def test_a_renewal_after_a_change_of_the_same_client_in_one_call_keeps_that_changes_revision(
        redis_url):
    """The writer's own guess at the revision (999 here) is never what is stored."""
    store = RedisStore(redis_url)
    try:
        result = store.commit_many([
            ("alice", None, hello("alice", "tty", revision=999), (EventKind.CONNECTED, "tty")),
            ("alice", None, hello("alice", "tty", NOW + 60, revision=999), None)])
        assert result.ok and result.revisions == [1, 1]
        record, _ = store.fetch("alice")
        assert record.revision == 1 and record.sessions[0].expires_at == NOW + 60
        assert [(revision, kind) for _, record, kind, _ in store.read_changes("0-0", 0, 10)
                for revision in [record.revision]] == [(1, EventKind.CONNECTED), (1, None)]
    finally:
        store.close()


@allure.story("Redis going away")
def test_more_calls_at_once_than_connections_wait_for_one_rather_than_fail(store):
    """A replica's watchers each ask Redis before their snapshot: hundreds at once."""
    callers = presence.REDIS_CONNECTIONS + 40
    start = threading.Barrier(callers)

    def wait_for_a_change():
        start.wait(DEADLINE)
        return store.read_changes("0-0", 0.5, 10)  # each holds a connection while it waits

    with futures.ThreadPoolExecutor(callers) as pool:
        answers = [pool.submit(wait_for_a_change) for _ in range(callers)]
        assert [answer.result(timeout=DEADLINE) for answer in answers] == [[]] * callers

