"""Attached presence: a session live for exactly as long as its Attach stream, ended at once
when the stream ends (its client killed, its network silent), taken over by a newer stream,
kept as a short lease across a restart so that clients attaching again show no disconnect."""

import asyncio
import collections
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

import allure
import grpc
import pytest

import server as presence
from conftest import (
    DEADLINE,
    ROOT,
    Lines,
    ManualClock,
    StreamReader,
    Watch,
    connect,
    goodbye,
    hello,
)
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

pytestmark = [allure.feature("Attached presence")]

HOLDER = str(ROOT / "tests" / "attach_holder.py")
ATTACHED, SERVER_STOPPING = pb.AttachResponse.ATTACHED, pb.AttachResponse.SERVER_STOPPING
KILL_PROMISE = 1.0  # seconds from a client's kill -9 to a watcher seeing it offline
COMMIT_AND_DELIVERY = 0.5  # beyond the keepalive bound: the end's commit and its event


class Attached(StreamReader):
    """An Attach stream of this test process, read as it comes."""

    kind = "Attach"

    def __init__(self, stub, client_id, session_id="", metadata=None):
        super().__init__(stub.Attach(
            pb.AttachRequest(client_id=client_id, session_id=session_id), metadata=metadata,
            timeout=DEADLINE * 8))

    def attached(self):
        """The record of the first message, which must say ATTACHED."""
        first = self.next()
        assert isinstance(first, pb.AttachResponse), f"the stream ended: {first}"
        assert first.notice == ATTACHED
        return first.client

    def cancel(self):
        self.call.cancel()


class Holder:
    """tests/attach_holder.py, a client process holding one Attach stream."""

    def __init__(self, address, client_id, session_id=""):
        self.process = subprocess.Popen([sys.executable, HOLDER, address, client_id, session_id],
                                        cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.lines = Lines(self.process.stdout)

    def next(self):
        line = self.lines.next()
        return line.strip() if line is not None else None


@pytest.fixture
def holders():
    """Start `holders(address, client_id, session_id)` client processes, each back once it is
    attached; all killed afterwards."""
    started = []

    def start(address, client_id, session_id=""):
        holder = Holder(address, client_id, session_id)
        started.append(holder)
        assert holder.next().startswith("ATTACHED"), "the holder did not attach"
        return holder

    yield start
    for holder in started:
        holder.process.kill()
        holder.process.wait(DEADLINE)


@pytest.fixture
def memory_server():
    """Start in-process servers on memory:// with `memory_server(**create_server options)`,
    for what does not depend on the store; all stopped afterwards."""
    started = []

    def start(**options):
        server = presence.create_server("127.0.0.1:0", presence.MemoryStore(), **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


@pytest.fixture
def stub_for():
    """`stub_for(server)`: a stub on a channel of its own to an in-process server; every
    channel is closed afterwards."""
    channels = []

    def open_stub(server):
        channels.append(connect(f"127.0.0.1:{server.port}"))
        return pb_grpc.ClientServiceStub(channels[-1])

    yield open_stub
    for channel in channels:
        channel.close()


@pytest.fixture
def redis_replicas(shared_redis, request):
    """Start `redis_replicas(n, **create_server options)`: in-process replicas on the shared
    Redis, under keys of this test's own; all stopped afterwards."""
    started = []

    def start(count, **options):
        for _ in range(count):
            server = presence.create_server("127.0.0.1:0", presence.RedisStore(
                shared_redis.url, prefix=request.node.nodeid), **options)
            server.start()
            started.append(server)
        return started[-count:]

    yield start
    for server in started:
        server.stop(0)
        server.registry._store.close()


def describe(events):
    return [(event.client.client_id, pb.EventKind.Name(event.kind), event.session_id,
             event.reason) for event in events]


def kinds(record):
    return [(session.session_id, pb.SessionKind.Name(session.kind),
             session.HasField("expires_at")) for session in record.sessions]


def status_of(stub, client_id):
    return stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id)).clients[0]


def nothing_happened_to(watch, stub, client_id):
    """Make a marker change and check that it is the next event: nothing happened to client_id
    before it."""
    marker = hello(stub, f"marker-after-{client_id}").client.revision
    event, = watch.events(1)
    assert (event.client.client_id, event.revision) == (f"marker-after-{client_id}", marker)


def scrape(url):
    """The samples of a Prometheus endpoint, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def rpc_error(stream):
    """The RpcError an Attach stream ends with; fails when it attaches."""
    message = stream.next()
    assert isinstance(message, grpc.RpcError), f"expected a refusal, got {message}"
    return message


# --- a session held by a stream ---------------------------------------------------------


@allure.story("Live while the stream is")
def test_an_attached_session_lives_while_its_stream_does_and_ends_as_connection_closed(stub):
    watch = Watch(stub)
    watch.snapshot()
    with allure.step("a Hello session shows as a message session"):
        assert kinds(hello(stub, "alice", "desk").client) == [("desk", "SESSION_KIND_MESSAGE",
                                                               False)]
        watch.events(1)
    with allure.step("an attach starts a session of its own: an ordinary change, reason attach"):
        stream = Attached(stub, "alice", "laptop")
        record = stream.attached()
        assert record.reason == "attach"
        assert kinds(record) == [("desk", "SESSION_KIND_MESSAGE", False),
                                 ("laptop", "SESSION_KIND_ATTACHED", False)]
        assert describe(watch.events(1)) == [("alice", "EVENT_SESSION_STARTED", "laptop",
                                              "attach")]
    with allure.step("the stream ends: the session ends with it, reason connection closed"):
        stream.cancel()
        assert describe(watch.events(1)) == [("alice", "EVENT_SESSION_ENDED", "laptop",
                                              "connection closed")]
        assert kinds(status_of(stub, "alice")) == [("desk", "SESSION_KIND_MESSAGE", False)]


@allure.story("Live while the stream is")
def test_kill_9_of_an_attached_client_shows_it_offline_within_a_second(server_processes,
                                                                        sqlite_url, holders):
    server = server_processes("--store", sqlite_url)
    with connect(server.address) as channel:
        watch = Watch(pb_grpc.ClientServiceStub(channel))
        watch.snapshot()
        holder = holders(server.address, "alice", "laptop")
        assert describe(watch.events(1)) == [("alice", "EVENT_CONNECTED", "laptop", "attach")]
        with allure.step(f"kill -9 of the client: offline within {KILL_PROMISE:g} s"):
            holder.process.kill()
            killed = time.monotonic()
            events = watch.events(1, within=KILL_PROMISE - (time.monotonic() - killed))
            assert describe(events) == [("alice", "EVENT_DISCONNECTED", "laptop",
                                         "connection closed")]


@allure.story("Dead peers found by keepalive")
def test_clients_whose_network_goes_silent_are_offline_within_the_keepalive_bound(
        server_processes, tcp_proxy, holders):
    interval, timeout = 0.5, 1.0
    bound = interval + timeout + COMMIT_AND_DELIVERY
    server = server_processes("--store", "memory://", "--keepalive-interval", str(interval),
                              "--keepalive-timeout", str(timeout))
    port = int(server.address.rpartition(":")[2])
    proxies = {name: tcp_proxy(port) for name in ("alice", "bob")}
    with connect(server.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        watch = Watch(stub)
        watch.snapshot()
        for name, proxy in proxies.items():
            holders(f"127.0.0.1:{proxy.port}", name)
        watch.events(2)
        with allure.step(f"bob's packets go nowhere: offline within {bound:g} s"):
            proxies["bob"].pause()
            paused = time.monotonic()
            events = watch.events(1, within=bound - (time.monotonic() - paused))
            assert describe(events) == [("bob", "EVENT_DISCONNECTED", "", "connection closed")]
        with allure.step("alice, idle all that while and answering pings, is still online"):
            assert status_of(stub, "alice").status == pb.STATUS_CONNECTED
        with allure.step(f"then alice's go nowhere too: offline within {bound:g} s"):
            proxies["alice"].pause()
            paused = time.monotonic()
            events = watch.events(1, within=bound - (time.monotonic() - paused))
            assert describe(events) == [("alice", "EVENT_DISCONNECTED", "", "connection closed")]


@allure.story("Dead peers found by keepalive")
def test_clients_pinging_every_second_are_never_told_to_go_away(memory_server, stub_for):
    server = memory_server()
    pinging = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0), ("grpc.use_local_subchannel_pool", 1)]
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address, options=pinging) as holding, \
            grpc.insecure_channel(address, options=pinging) as idle:
        states = []
        idle.subscribe(states.append, try_to_connect=True)
        grpc.channel_ready_future(idle).result(timeout=DEADLINE)
        Attached(pb_grpc.ClientServiceStub(holding), "alice").attached()
        stub = stub_for(server)
        watch = Watch(stub)
        watch.snapshot()
        with allure.step("while a 6 s lease runs out, both channels ping every second"):
            hello(stub, "timer", lease=6)
            assert describe(watch.events(2)) == [
                ("timer", "EVENT_CONNECTED", "", "hello"),
                ("timer", "EVENT_DISCONNECTED", "", "lease expired")]
        with allure.step("alice's stream and the channel without calls were never cut"):
            assert status_of(stub, "alice").status == pb.STATUS_CONNECTED
            ready = grpc.ChannelConnectivity.READY
            assert states[states.index(ready):] == [ready]


@allure.story("Takeover")
def test_attaching_a_held_session_takes_it_over_and_is_no_change(stub):
    watch = Watch(stub)
    watch.snapshot()
    older = Attached(stub, "alice", "laptop")
    revision = older.attached().revision
    watch.events(1)
    with allure.step("a second stream attaches the same session: same revision, no event"):
        newer = Attached(stub, "alice", "laptop")
        assert newer.attached().revision == revision
        error = rpc_error(older)
        assert error.code() == grpc.StatusCode.ABORTED
        assert error.details() == ("session 'laptop' of client alice was attached by another "
                                   "stream; this one no longer holds it")
        nothing_happened_to(watch, stub, "alice")
    with allure.step("the session now ends with the newer stream"):
        newer.cancel()
        assert describe(watch.events(1)) == [("alice", "EVENT_DISCONNECTED", "laptop",
                                              "connection closed")]


@allure.story("Takeover")
def test_attaching_a_leased_hello_session_holds_it_without_a_change(make_server, clock,
                                                                    stub_for):
    server = make_server(clock=clock)
    stub = stub_for(server)
    revision = hello(stub, "alice", "tty", lease=30).client.revision
    watch = Watch(stub, since_revision=revision)
    with allure.step("attached: the same session and revision, no lease any more"):
        stream = Attached(stub, "alice", "tty")
        record = stream.attached()
        assert record.revision == revision
        assert kinds(record) == [("tty", "SESSION_KIND_ATTACHED", False)]
    with allure.step("its old lease runs out: nothing ends, the stream holds it"):
        clock.advance(31)
        assert server.registry.expire_due() == []
    with allure.step("a Hello for it renews nothing: the stream still holds it"):
        assert not hello(stub, "alice", "tty", lease=30).changed
        assert kinds(status_of(stub, "alice")) == [("tty", "SESSION_KIND_ATTACHED", False)]
    with allure.step("the stream ends: the first event since the Hello"):
        stream.cancel()
        assert describe(watch.events(1)) == [("alice", "EVENT_DISCONNECTED", "tty",
                                              "connection closed")]


@allure.story("Takeover")
def test_goodbye_ends_an_attached_session_and_its_stream_whose_end_then_changes_nothing(stub):
    watch = Watch(stub)
    watch.snapshot()
    stream = Attached(stub, "alice", "tty")
    stream.attached()
    watch.events(1)
    goodbye(stub, "alice", "tty")
    assert describe(watch.events(1)) == [("alice", "EVENT_DISCONNECTED", "tty", "goodbye")]
    with allure.step("the stream, which holds nothing now, is ended ABORTED"):
        ended = rpc_error(stream)
        assert ended.code() == grpc.StatusCode.ABORTED
        assert "was ended (a Goodbye)" in ended.details()
    nothing_happened_to(watch, stub, "alice")


@allure.story("Takeover")
def test_attaching_on_another_replica_takes_the_session_over_and_ends_the_older_stream(
        redis_replicas, stub_for):
    first, second = (stub_for(replica) for replica in redis_replicas(2))
    older = Attached(first, "alice", "laptop")
    revision = older.attached().revision
    newer = Attached(second, "alice", "laptop")
    assert newer.attached().revision == revision, "a takeover is no change"
    with allure.step("the older stream, on the other replica, ends ABORTED"):
        ended = rpc_error(older)
        assert ended.code() == grpc.StatusCode.ABORTED
        assert "attached by another stream" in ended.details()
    watch = Watch(second, since_revision=revision)
    nothing_happened_to(watch, second, "alice")
    assert kinds(status_of(second, "alice")) == [("laptop", "SESSION_KIND_ATTACHED", False)]
    newer.cancel()


# --- restarts: a stop, a crash ----------------------------------------------------------


@allure.story("Graceful stop")
def test_a_stopping_server_tells_attached_clients_and_keeps_their_sessions_as_leases(
        make_server, clock, stub_for):
    server = make_server(clock=clock, reattach_grace=7)
    stream = Attached(stub_for(server), "alice", "laptop")
    revision = stream.attached().revision
    server.stop(DEADLINE)
    with allure.step("the stream is told to attach again within 7 s, then ends with OK"):
        notice = stream.next()
        assert (notice.notice, notice.reattach_seconds) == (SERVER_STOPPING, 7)
        assert stream.next() is None
    with allure.step("its session is a lease of 7 s now, and that was no change"):
        record = server.registry.get_cached("alice")
        assert record.revision == revision
        assert record.sessions == (presence.Session("laptop", clock.now + 7),)


@allure.story("Graceful stop")
def test_a_graceful_restart_with_clients_attaching_again_shows_no_disconnect(
        server_processes, sqlite_url, holders):
    first = server_processes("--store", sqlite_url, "--reattach-grace", "30")
    holder = holders(first.address, "alice", "laptop")
    with connect(first.address) as channel:
        revision = status_of(pb_grpc.ClientServiceStub(channel), "alice").revision
    with allure.step("SIGTERM: the client is told to attach again within 30 s"):
        assert first.terminate() == 0
        assert holder.next() == "SERVER_STOPPING reattach 30"
        assert holder.next() == "ended OK"
    second = server_processes("--store", sqlite_url)
    with connect(second.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        with allure.step("restarted: alice is still online, on a lease, at the same revision"):
            record = status_of(stub, "alice")
            assert (record.status, record.revision) == (pb.STATUS_CONNECTED, revision)
            assert kinds(record) == [("laptop", "SESSION_KIND_MESSAGE", True)]
        with allure.step("the client attaches again: no event since before the restart"):
            holders(second.address, "alice", "laptop")
            nothing_happened_to(Watch(stub, since_revision=revision), stub, "alice")
            assert kinds(status_of(stub, "alice")) == [("laptop", "SESSION_KIND_ATTACHED",
                                                        False)]


@allure.story("Graceful stop")
def test_a_replica_stopping_hands_its_attached_clients_to_another_without_a_disconnect(
        redis_replicas, stub_for):
    replicas = redis_replicas(2)
    leaving, staying = (stub_for(replica) for replica in replicas)
    stream = Attached(leaving, "alice", "laptop")
    revision = stream.attached().revision
    replicas[0].stop(DEADLINE)
    assert stream.next().notice == SERVER_STOPPING
    again = Attached(staying, "alice", "laptop")
    assert again.attached().revision == revision
    nothing_happened_to(Watch(staying, since_revision=revision), staying, "alice")
    again.cancel()


@allure.story("Crash")
def test_a_replica_starting_on_redis_leaves_sessions_other_replicas_hold_attached(
        redis_replicas, stub_for):
    first = stub_for(*redis_replicas(1, reattach_grace=5))
    stream = Attached(first, "alice", "laptop")
    stream.attached()
    second = stub_for(*redis_replicas(1, reattach_grace=5))
    with allure.step("the new replica sees alice attached, not a lease of its grace"):
        assert kinds(status_of(second, "alice")) == [("laptop", "SESSION_KIND_ATTACHED", False)]
    watch = Watch(second, since_revision=status_of(second, "alice").revision)
    stream.cancel()
    assert describe(watch.events(1)) == [("alice", "EVENT_DISCONNECTED", "laptop",
                                          "connection closed")]


# a dead replica's sessions end once its liveness runs out and another replica's reaper looks
REPLICA_BOUND = (presence.REPLICA_LIVENESS_SECONDS + presence.REPLICA_RENEW_SECONDS
                 + presence.REAPER_MAX_SLEEP + COMMIT_AND_DELIVERY)


@allure.story("Replicas")
def test_sessions_held_by_a_replica_that_dies_end_within_its_liveness(server_processes,
                                                                       redis_url):
    dying, living = (server_processes("--store", redis_url) for _ in range(2))
    with connect(dying.address) as to_dying, connect(living.address) as to_living:
        watch = Watch(pb_grpc.ClientServiceStub(to_living))
        watch.snapshot()
        Attached(pb_grpc.ClientServiceStub(to_dying), "nadia", "phone").attached()
        assert describe(watch.events(1)) == [("nadia", "EVENT_CONNECTED", "phone", "attach")]
        with allure.step("kill -9 of the replica holding nadia's stream: the other ends her "
                         f"session within {REPLICA_BOUND:g} s"):
            dying.kill()
            assert describe(watch.events(1, within=REPLICA_BOUND)) == [
                ("nadia", "EVENT_DISCONNECTED", "phone", "connection closed")]


@allure.story("Replicas")
def test_sessions_held_by_a_replica_that_lives_never_end_past_its_liveness(redis_replicas,
                                                                           stub_for):
    holding, other = (stub_for(replica) for replica in redis_replicas(2))
    watch = Watch(other)
    watch.snapshot()
    stream = Attached(holding, "omar")
    stream.attached()
    lease = math.ceil(presence.REPLICA_LIVENESS_SECONDS * 2)
    hello(other, "timer", lease=lease)
    watch.events(2)
    with allure.step(f"a {lease} s lease runs out, so every reaper has looked for replicas "
                     "gone quiet for longer than their liveness: omar's replica was not"):
        assert describe(watch.events(1, within=lease + DEADLINE)) == [
            ("timer", "EVENT_DISCONNECTED", "", "lease expired")]
        nothing_happened_to(watch, other, "omar")
    assert kinds(status_of(other, "omar")) == [("", "SESSION_KIND_ATTACHED", False)]
    stream.cancel()


@allure.story("Replicas")
def test_a_replica_cut_off_from_redis_past_its_liveness_loses_its_sessions_and_streams(
        server_processes, redis_server, tcp_proxy):
    proxy = tcp_proxy(redis_server.port)
    living = server_processes("--store", redis_server.url)
    cut_off = server_processes("--store", f"redis://127.0.0.1:{proxy.port}/0?timeout=1")
    with connect(cut_off.address) as to_cut, connect(living.address) as to_living:
        watch = Watch(pb_grpc.ClientServiceStub(to_living))
        watch.snapshot()
        stream = Attached(pb_grpc.ClientServiceStub(to_cut), "pia")
        stream.attached()
        watch.events(1)
        with allure.step("its network to Redis drops everything: it cannot say it lives, so "
                         "it ends its stream, UNAVAILABLE, for pia to attach elsewhere, and "
                         "the other replica ends pia's session"):
            proxy.pause()
            ended = rpc_error(stream)
            assert ended.code() == grpc.StatusCode.UNAVAILABLE
            assert "lost the shared store" in ended.details()
            assert describe(watch.events(1, within=REPLICA_BOUND)) == [
                ("pia", "EVENT_DISCONNECTED", "", "connection closed")]
        with allure.step("healed: nothing more happens to pia"):
            proxy.resume()
            nothing_happened_to(watch, pb_grpc.ClientServiceStub(to_living), "pia")


@allure.story("Replicas")
def test_an_attach_whose_answer_from_redis_is_lost_lets_go_of_the_session_it_saved(
        server_processes, redis_server, tcp_proxy):
    proxy = tcp_proxy(redis_server.port)
    living = server_processes("--store", redis_server.url)
    losing = server_processes("--store", f"redis://127.0.0.1:{proxy.port}/0?timeout=1")
    with connect(losing.address) as to_losing, connect(living.address) as to_living:
        watch = Watch(pb_grpc.ClientServiceStub(to_living))
        watch.snapshot()
        hello(pb_grpc.ClientServiceStub(to_losing), "first")  # Redis holds the commit script
        watch.events(1)
        with allure.step("Redis saves quinn's attach, but its answer is lost: the stream is "
                         "refused, UNAVAILABLE, though the other replica shows quinn attached"):
            proxy.hold_answers()
            ended = rpc_error(Attached(pb_grpc.ClientServiceStub(to_losing), "quinn"))
            assert ended.code() == grpc.StatusCode.UNAVAILABLE
            assert "may still be saved" in ended.details()
            assert describe(watch.events(1)) == [("quinn", "EVENT_CONNECTED", "", "attach")]
        with allure.step("healed: that stream lets go of the session it never heard it held, "
                         "well before its replica's liveness could run out"):
            proxy.resume()
            assert describe(watch.events(1, within=presence.REPLICA_LIVENESS_SECONDS)) == [
                ("quinn", "EVENT_DISCONNECTED", "", "connection closed")]


@allure.story("Crash")
def test_sessions_attached_to_a_crashed_server_come_back_as_leases_of_the_grace(
        server_processes, tmp_path, holders, stub_for):
    path = tmp_path / "crashed.db"
    crashed = server_processes("--store", f"sqlite:///{path}")
    held = [holders(crashed.address, "alice", "laptop"), holders(crashed.address, "bob", "phone")]
    with allure.step("kill -9 of the server: its clients' streams break"):
        crashed.kill()
        for holder in held:
            assert holder.next().startswith("ended UNAVAILABLE")
    clock = ManualClock(time.time())
    store = presence.SqliteStore(str(path))
    server = presence.create_server("127.0.0.1:0", store, clock=clock, reattach_grace=10)
    server.start()
    try:
        stub = stub_for(server)
        with allure.step("restarted: both online, each on a lease of the 10 s grace"):
            for client_id, session_id in (("alice", "laptop"), ("bob", "phone")):
                assert server.registry.get_cached(client_id).sessions == (
                    presence.Session(session_id, clock.now + 10),)
            revision = stub.CountClients(pb.CountClientsRequest()).revision
        with allure.step("alice attaches again; bob does not, and his lease runs out"):
            Attached(stub, "alice", "laptop").attached()
            watch = Watch(stub, since_revision=revision)
            clock.advance(11)
            server.registry.expire_due()
            assert describe(watch.events(1)) == [("bob", "EVENT_DISCONNECTED", "phone",
                                                  "lease expired")]
            assert kinds(status_of(stub, "alice")) == [("laptop", "SESSION_KIND_ATTACHED",
                                                        False)]
    finally:
        server.stop(0)
        store.close()


@allure.story("Crash")
def test_records_without_holders_keep_their_old_encoding_and_held_ones_keep_their_holder(
        tmp_path):
    held = presence.Session("laptop", 0.0, "host:1:ab/3")
    leased = presence.Session("tty", 1_800_000_030.0)
    assert presence.encode_sessions((leased,)) == '[["tty", 1800000030.0]]'
    assert presence.decode_sessions(presence.encode_sessions((held, leased))) == (held, leased)
    record = presence.Client("alice", 1.0, 2.0, 3, "attach", (held,))
    assert presence.decode_record("alice", presence.encode_record(record)) == record
    with allure.step("a database written before sessions had holders loads as it was"):
        path = tmp_path / "old.db"
        store = presence.SqliteStore(str(path))
        store.close()
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO clients VALUES ('old', 1, 1.0, 2.0, 7, 'hello', ?)",
                       (json.dumps([["tty", 1_800_000_030.0]]),))
        store = presence.SqliteStore(str(path))
        assert store.load() == [presence.Client("old", 1.0, 2.0, 7, "hello", (leased,))]
        store.close()


# --- limits, validation, security ---------------------------------------------------------


@allure.story("No thread per stream")
def test_holding_attach_streams_costs_no_thread_each(server_processes):
    server = server_processes("--store", "memory://")
    # a connection each (channels alike would share one): 100 streams a connection at most
    channels = [grpc.insecure_channel(server.address,
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(3)]
    stubs = [pb_grpc.ClientServiceStub(channel) for channel in channels]

    def threads():
        return len(os.listdir(f"/proc/{server.pid}/task"))

    def attach(count, start):
        streams = []
        for n in range(start, start + count):
            streams.append(Attached(stubs[n % len(stubs)], f"user{n}"))
            streams[-1].attached()  # one at a time: a short call needs one pool thread
        return streams

    streams = attach(10, 0)
    before = threads()
    streams += attach(240, 10)
    with allure.step(f"{len(streams)} streams held: the server's threads stay about {before}"):
        assert threads() <= before + 2
    for channel in channels:
        channel.close()


async def attach_at_once(address, count):
    """count clients attaching at once, each on a connection of its own; the codes of those
    refused (an empty Counter when every one was attached)."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(count)]
    await asyncio.gather(*(channel.channel_ready() for channel in channels))
    refused = collections.Counter()

    async def attach(number, channel):
        call = pb_grpc.ClientServiceStub(channel).Attach(
            pb.AttachRequest(client_id=f"burst{number}"))
        try:
            first = await asyncio.wait_for(call.read(), DEADLINE * 4)
            assert first.notice == ATTACHED
        except grpc.aio.AioRpcError as error:
            refused[error.code().name] += 1

    try:
        await asyncio.gather(*(attach(number, channel) for number, channel in enumerate(channels)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return refused


@allure.story("No thread per stream")
def test_a_burst_of_clients_attaching_at_once_are_all_attached(server_processes):
    """After a restart every client attaches again at the same moment: gRPC must not drop
    the calls it has not handed to the server yet (its default keeps 1,000 waiting)."""
    server = server_processes("--store", "memory://")
    assert asyncio.run(attach_at_once(server.address, 2500)) == collections.Counter()


@allure.story("No thread per stream")
def test_a_mass_disconnect_ends_every_session_in_a_few_commits(tmp_path, stub_for):
    store = presence.SqliteStore(str(tmp_path / "mass.db"))
    server = presence.create_server("127.0.0.1:0", store)
    server.start()
    try:
        stub = stub_for(server)
        watch = Watch(stub)
        watch.snapshot()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            for n in range(90):
                Attached(pb_grpc.ClientServiceStub(channel), f"user{n}").attached()
            watch.events(90)
            commits = store.commits
        with allure.step("their connection closes: all 90 end, in far fewer commits"):
            ended = watch.events(90)
            assert {event.reason for event in ended} == {"connection closed"}
            assert stub.CountClients(pb.CountClientsRequest()).connected == 0
            assert store.commits - commits < 30, store.commits - commits
    finally:
        server.stop(0)
        store.close()


@allure.story("Limits")
def test_attach_streams_past_the_limit_are_resource_exhausted(memory_server, stub_for):
    server = memory_server(max_attached=2)
    stub = stub_for(server)
    watch = Watch(stub)
    watch.snapshot()
    streams = [Attached(stub, name) for name in ("alice", "bob")]
    for stream in streams:
        stream.attached()
    error = rpc_error(Attached(stub, "carol"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "too many attached streams (limit 2, --max-attached); try again later"
    with allure.step("one ends: a place is free again"):
        watch.events(2)
        streams[0].cancel()
        watch.events(1)
        Attached(stub, "carol").attached()


@allure.story("Limits")
def test_a_new_session_past_the_session_cap_is_refused_and_a_live_one_can_still_attach(
        memory_server, stub_for):
    stub = stub_for(memory_server(max_sessions=1))
    hello(stub, "alice", "desk")
    error = rpc_error(Attached(stub, "alice", "laptop"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 1 sessions" in error.details()
    assert kinds(Attached(stub, "alice", "desk").attached()) == [("desk", "SESSION_KIND_ATTACHED",
                                                                  False)]


@allure.story("Validation")
@pytest.mark.parametrize(("client_id", "session_id", "reason"), [
    ("", "", "client_id must not be empty"),
    ("   ", "", "client_id must not be only white space"),
    ("a" * 129, "", "client_id must be at most 128 characters, got 129"),
    ("bell\x07", "", "client_id must not contain control characters"),
    ("alice", "tty\u202e", "session_id must not contain bidirectional override"),
], ids=["empty id", "blank id", "long id", "control character", "bidi session"])
def test_bad_attach_requests_are_invalid_argument_with_the_broken_rule(
        memory_server, stub_for, client_id, session_id, reason):
    stub = stub_for(memory_server())
    error = rpc_error(Attached(stub, client_id, session_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()


@allure.story("Security")
def test_attach_over_tls_needs_the_token_even_with_public_reads_and_shows_in_metrics(
        memory_server, certificates):
    server = memory_server(metrics_port=0, security=presence.Security(
        tls_cert=str(certificates / "server.pem"), tls_key=str(certificates / "server.key"),
        token="t0ken", public_reads=True))
    credentials = grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        with allure.step("without the token: UNAUTHENTICATED (attaching is a write)"):
            assert rpc_error(Attached(stub, "eve")).code() == grpc.StatusCode.UNAUTHENTICATED
        with allure.step("with it: attached, and counted as an attached session"):
            stream = Attached(stub, "alice", metadata=(("authorization", "Bearer t0ken"),))
            assert stream.attached().status == pb.STATUS_CONNECTED
            url = f"http://127.0.0.1:{server.metrics.port}/metrics"
            assert scrape(url)[("presence_attached_sessions", ())] == 1
            stream.cancel()
