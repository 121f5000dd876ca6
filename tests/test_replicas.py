"""Several replicas on one real Redis: one revision sequence, reads that see every earlier
write, no lost updates, watchers that see every replica, leases that expire once, and what a
replica does while it cannot reach Redis."""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import allure
import grpc
import pytest
import redis

import server as presence
from conftest import DEADLINE, Watch, connect, goodbye, hello
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc
from server import Message, Status

pytestmark = [allure.feature("Replicas")]

CALL_DEADLINE = 10.0


@pytest.fixture
def replica_processes(server_processes, redis_url):
    """Start `replica_processes(n)` real server.py processes on this test's Redis."""
    def start(count, url=redis_url):
        return [server_processes("--store", url) for _ in range(count)]
    return start


@pytest.fixture
def in_process_replicas(redis_url, clock):
    """Start `in_process_replicas(n)` servers in this process on this test's Redis, sharing
    the test's clock (so leases come due when the test says); all are stopped afterwards."""
    started = []

    def start(count, url=redis_url, **store_options):
        for _ in range(count):
            server = presence.create_server("127.0.0.1:0",
                                            presence.RedisStore(url, **store_options), clock=clock)
            server.start()
            started.append(server)
        return started[-count:]

    yield start
    for server in started:
        server.stop(0)
        server.registry._store.close()


def stubs_for(addresses):
    channels = [connect(address) for address in addresses]
    return channels, [pb_grpc.ClientServiceStub(channel) for channel in channels]


def refusal(call, request):
    """The error a call ends with; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=CALL_DEADLINE)
    return caught.value


@pytest.fixture
def registries(redis_url):
    """Open `registries(n)` replicas' registries on this test's Redis, without gRPC; each
    with a follower that rests 60 s once a commit call brought its cache up to date, so a
    read of the stream shows in Redis's command counts."""
    opened = []

    def open_some(count):
        for _ in range(count):
            registry = presence.SharedRegistry(presence.RedisStore(redis_url))
            registry.follow_rest_seconds = 60
            opened.append(registry)
        return opened[-count:]

    yield open_some
    for registry in opened:
        registry.close()
        registry._store.close()


def stream_reads(redis_url):
    """How many XREADs Redis has run: a follower's reads of the stream."""
    client = redis.Redis.from_url(redis_url)
    try:
        return client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    finally:
        client.close()


def wait_until_no_read_blocks(redis_url):
    """Wait until no follower waits in a blocking read of the stream: each rests."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + DEADLINE
    try:
        while client.info("clients")["blocked_clients"]:
            assert time.monotonic() < deadline, "a follower still reads the stream"
    finally:
        client.close()


@allure.story("Replicas follow each other")
def test_a_replica_that_keeps_writing_follows_the_others_in_its_commit_answers(registries,
                                                                            redis_url):
    """Each commit call answers the entries since the replica's position, so a replica that
    writes has the others' writes without a read of the stream per commit (the 0.27 reads
    a write two loaded replicas made)."""
    mine, other = registries(2)
    other.apply_one(Message("x", Status.CONNECTED))
    mine.apply_one(Message("m", Status.CONNECTED))
    wait_until_no_read_blocks(redis_url)  # from now on both followers rest
    reads = stream_reads(redis_url)
    for step in range(20):
        written, _ = other.apply_one(Message(f"o{step}", Status.CONNECTED))
        saved, _ = mine.apply_one(Message(f"m{step}", Status.CONNECTED))
        assert saved.revision == written.revision + 1
        changes = mine.log.read(written.revision - 1)
        assert [(change.record.client_id, change.revision) for change in changes] == [
            (f"o{step}", written.revision), (f"m{step}", saved.revision)]
    # A follower that looked before its replica's first commit answer may still start one read
    # after the count was taken (a loaded machine did); a read per round would make 20.
    assert stream_reads(redis_url) <= reads + 2, "a follower read the stream"


@allure.story("Replicas follow each other")
def test_a_read_on_a_resting_replica_sees_another_replicas_write_at_once(registries,
                                                                         redis_url):
    """A reader does not wait out a follower resting between commits: it has it read now."""
    mine, other = registries(2)
    other.apply_one(Message("x", Status.CONNECTED))
    mine.apply_one(Message("m", Status.CONNECTED))
    wait_until_no_read_blocks(redis_url)
    other.apply_one(Message("o", Status.CONNECTED))
    # without the follower reading now, the read gives up after SHARED_CATCH_UP_SECONDS
    assert mine.get("o").status == Status.CONNECTED


@allure.story("Replicas follow each other")
def test_a_commit_whose_answer_cannot_hold_all_it_missed_has_the_follower_read_it(registries,
                                                                                 redis_url):
    """More writes of the others than a commit answers (SHARED_FOLLOW_BATCH): the writer has
    its resting follower read them rather than wait out the catch-up time."""
    mine, other = registries(2)
    other.apply_one(Message("x", Status.CONNECTED))
    mine.apply_one(Message("m", Status.CONNECTED))
    wait_until_no_read_blocks(redis_url)
    other.apply_many([Message(f"o{n}", Status.CONNECTED)
                      for n in range(presence.SHARED_FOLLOW_BATCH)])
    saved, change = mine.apply_one(Message("m2", Status.CONNECTED))
    # without the follower reading now, the write returns after SHARED_CATCH_UP_SECONDS with
    # its change not in the log yet
    assert [(logged.kind, logged.record) for logged in mine.log.read(saved.revision - 1)] \
        == [(change.kind, saved)]
    assert mine.counts().connected == presence.SHARED_FOLLOW_BATCH + 3


@allure.story("One revision sequence")
def test_revisions_from_every_replica_form_one_strictly_increasing_sequence(replica_processes):
    replicas = replica_processes(3)
    channels, stubs = stubs_for([replica.address for replica in replicas])

    def write(index):
        """Alternate hello and goodbye on ids of our own and on ids every writer shares."""
        stub, seen = stubs[index % 3], []
        for n in range(40):
            client_id = f"shared{n % 5}" if n % 2 else f"own{index}-{n % 7}"
            reply = stub.SendMessage(pb.MessageRequest(
                client_id=client_id, message="hello" if (n // 2) % 2 else "goodbye"),
                timeout=CALL_DEADLINE)
            if reply.changed:
                seen.append(reply.client.revision)
        return seen

    with ThreadPoolExecutor(6) as pool:
        per_writer = list(pool.map(write, range(6)))
    for seen in per_writer:
        assert seen == sorted(seen) and len(set(seen)) == len(seen), "one writer's went back"
    every = [revision for seen in per_writer for revision in seen]
    assert len(set(every)) == len(every), "a revision was given to two changes"
    for stub in stubs:
        assert stub.CountClients(pb.CountClientsRequest(),
                                 timeout=CALL_DEADLINE).revision == max(every)
    for channel in channels:
        channel.close()


@allure.story("Reads see every earlier write")
def test_a_write_acknowledged_on_one_replica_is_seen_by_a_read_on_another(replica_processes):
    replicas = replica_processes(2)
    channels, (first, second) = stubs_for([replica.address for replica in replicas])

    def write_here_read_there(index):
        writer, reader = (first, second) if index % 2 else (second, first)
        for n in range(30):
            client_id = f"c{index}-{n}"
            reply = writer.SendMessage(pb.MessageRequest(client_id=client_id, message="hello"),
                                       timeout=CALL_DEADLINE)
            read = reader.GetClientStatus(pb.ClientStatusRequest(client_id=client_id),
                                          timeout=CALL_DEADLINE).clients[0]
            assert (read.status, read.revision) == (pb.STATUS_CONNECTED, reply.client.revision)
            page = reader.ListClients(pb.ListClientsRequest(id_prefix=client_id),
                                      timeout=CALL_DEADLINE)
            assert page.revision >= reply.client.revision
            assert [client.client_id for client in page.clients] == [client_id]
            count = reader.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
            assert count.revision >= reply.client.revision

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_here_read_there, range(4)))
    for channel in channels:
        channel.close()


@allure.story("No lost updates")
def test_writers_on_different_replicas_never_lose_each_others_sessions(replica_processes):
    replicas = replica_processes(2)
    channels, stubs = stubs_for([replica.address for replica in replicas])

    def add_sessions(index):
        for n in range(8):
            assert hello(stubs[index % 2], "shared", f"w{index}-s{n}").changed

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add_sessions, range(8)))
    for stub in stubs:
        record = stub.GetClientStatus(pb.ClientStatusRequest(client_id="shared"),
                                      timeout=CALL_DEADLINE).clients[0]
        assert len(record.sessions) == 64
        assert record.revision == 64
    for channel in channels:
        channel.close()


@allure.story("Writers share Redis round trips")
def test_concurrent_writers_on_one_replica_share_commit_calls_and_each_gets_its_own_answer(
        replica_processes, redis_server):
    """Redis's own count of script calls (INFO commandstats), not the server's."""
    replica, = replica_processes(1)
    channel = connect(replica.address)
    stub = pb_grpc.ClientServiceStub(channel)
    redis = presence.redis_client().Redis(port=redis_server.port)
    redis.config_resetstat()
    writers, sessions = 12, 5

    def write(index):
        """Hello on a client of its own and a new session on the client every writer shares."""
        answers = []
        for n in range(sessions):
            answers.append(hello(stub, f"own{index}-{n}"))
            answers.append(hello(stub, "shared", f"w{index}-s{n}"))
        return answers

    with ThreadPoolExecutor(writers) as pool:
        answers = [answer for each in pool.map(write, range(writers)) for answer in each]
    calls = redis.info("commandstats")["cmdstat_evalsha"]["calls"]
    with allure.step(f"{len(answers)} writes acknowledged in {calls} script calls"):
        assert calls < len(answers)
    with allure.step("each writer got its own change, with a revision of its own"):
        assert all(answer.changed for answer in answers)
        revisions = [answer.client.revision for answer in answers]
        assert sorted(revisions) == list(range(1, len(answers) + 1))
    shared = stub.GetClientStatus(pb.ClientStatusRequest(client_id="shared"),
                                  timeout=CALL_DEADLINE).clients[0]
    assert sorted(session.session_id for session in shared.sessions) == sorted(
        f"w{index}-s{n}" for index in range(writers) for n in range(sessions))
    redis.close()
    channel.close()


@allure.story("Watchers see every replica")
def test_a_watcher_gets_every_change_of_every_replica_once_and_resumes_on_another(
        replica_processes):
    replicas = replica_processes(2)
    channels, (first, second) = stubs_for([replica.address for replica in replicas])
    watch = Watch(first)
    assert watch.snapshot()[1] == 0
    with allure.step("100 changes, half on each replica"):
        for n in range(50):
            hello(first, f"a{n}")
            hello(second, f"b{n}")
    assert [event.revision for event in watch.events(100)] == list(range(1, 101))
    with allure.step("the watcher's replica is killed; it resumes on the other"):
        replicas[0].kill()
        for n in range(20):
            goodbye(second, f"a{n}")
        resumed = Watch(second, since_revision=100)
        events = resumed.events(20)
        assert [event.revision for event in events] == list(range(101, 121))
        assert {event.client.client_id for event in events} == {f"a{n}" for n in range(20)}
        hello(second, "after")
        assert [event.client.client_id for event in resumed.events(1)] == ["after"]
    for channel in channels:
        channel.close()


@allure.story("Leases expire once")
def test_a_lease_due_on_every_replica_expires_once_with_one_event(in_process_replicas, clock):
    replicas = in_process_replicas(3)
    channels, stubs = stubs_for([f"127.0.0.1:{replica.port}" for replica in replicas])
    leased = hello(stubs[0], "alice", "tty", lease=30).client
    watches = [Watch(stub, since_revision=leased.revision) for stub in stubs]
    clock.advance(31)
    start = threading.Barrier(len(replicas))

    def expire(replica):
        start.wait(DEADLINE)
        return replica.registry.expire_due()

    with ThreadPoolExecutor(len(replicas)) as pool:
        expired = [change for changes in pool.map(expire, replicas) for change in changes]
    assert [(change.record.client_id, change.reason) for change in expired] == [
        ("alice", "lease expired")]
    hello(stubs[1], "marker")  # the event after the expiry: no second expiry came between
    for watch in watches:
        events = watch.events(2)
        assert [(event.client.client_id, event.reason) for event in events] == [
            ("alice", "lease expired"), ("marker", "hello")]
    for channel in channels:
        channel.close()


@allure.story("Leases expire once")
def test_leases_that_ran_out_while_every_replica_was_down_expire_when_one_comes_back(
        in_process_replicas, clock):
    first, = in_process_replicas(1)
    with connect(f"127.0.0.1:{first.port}") as channel:
        hello(pb_grpc.ClientServiceStub(channel), "bob", "tty", lease=60)
    first.stop(0)
    clock.advance(61)
    back, = in_process_replicas(1)  # its start expires what ran out while none was up
    with connect(f"127.0.0.1:{back.port}") as channel:
        record = pb_grpc.ClientServiceStub(channel).GetClientStatus(
            pb.ClientStatusRequest(client_id="bob"), timeout=CALL_DEADLINE).clients[0]
    assert (record.status, record.reason) == (pb.STATUS_DISCONNECTED, "lease expired")


@allure.story("Redis stopped and back")
def test_replicas_refuse_while_redis_is_away_and_recover_by_themselves(replica_processes,
                                                                       redis_server):
    replica, = replica_processes(1)
    with connect(replica.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        hello(stub, "alice")
        watch = Watch(stub)
        assert watch.snapshot()[1] == 1
        with allure.step("Redis stops: writes and reads are UNAVAILABLE, with the reason"):
            redis_server.stop()
            for call, request in ((stub.SendMessage, pb.MessageRequest(client_id="bob",
                                                                        message="hello")),
                                  (stub.GetClientStatus, pb.ClientStatusRequest(client_id="alice")),
                                  (stub.CountClients, pb.CountClientsRequest())):
                error = refusal(call, request)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "shared store (Redis at" in error.details()
            replica.wait_for_log("refusing calls until it is back")
        with allure.step("Redis is back with what it saved: the replica serves again"):
            redis_server.start()
            replica.wait_for_log("the shared store is reachable again")
            assert hello(stub, "bob").client.revision == 2
            assert [event.client.client_id for event in watch.events(1)] == ["bob"]


@allure.story("A replica cut off from Redis")
def test_a_replica_cut_off_from_redis_refuses_while_the_others_go_on_and_catches_up(
        replica_processes, redis_server, tcp_proxy):
    proxy = tcp_proxy(redis_server.port)
    healthy, = replica_processes(1)
    cut_off, = replica_processes(1, url=f"redis://127.0.0.1:{proxy.port}/0?timeout=1")
    channels, (good, cut) = stubs_for([healthy.address, cut_off.address])
    hello(good, "before")
    assert cut.GetClientStatus(pb.ClientStatusRequest(client_id="before"),
                               timeout=CALL_DEADLINE).clients[0].revision == 1
    with allure.step("the network to Redis drops everything: that replica refuses"):
        proxy.pause()
        error = refusal(cut.SendMessage, pb.MessageRequest(client_id="x", message="hello"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "may still be saved" in error.details()
        error = refusal(cut.GetClientStatus, pb.ClientStatusRequest(client_id="before"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        for n in range(5):
            hello(good, f"during{n}")
    with allure.step("healed: it catches up with what the others did meanwhile"):
        proxy.resume()
        record = cut.GetClientStatus(pb.ClientStatusRequest(client_id="during4"),
                                     timeout=CALL_DEADLINE).clients[0]
        assert (record.status, record.revision) == (pb.STATUS_CONNECTED, 6)
        # The refused write's bytes may have waited in the network and reached Redis once it
        # healed (its answer said so); then it holds revision 7, and nothing else does.
        try:
            x = cut.GetClientStatus(pb.ClientStatusRequest(client_id="x"),
                                    timeout=CALL_DEADLINE).clients[0].revision
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            x = None
        assert x in (None, 7)
        assert hello(cut, "after").client.revision == (8 if x else 7)
    for channel in channels:
        channel.close()


@allure.story("A replica cut off from Redis")
def test_a_replica_that_missed_more_than_the_stream_holds_loads_afresh_and_resyncs_watchers(
        in_process_replicas, redis_server, tcp_proxy):
    proxy = tcp_proxy(redis_server.port)
    behind, = in_process_replicas(1, url=f"redis://127.0.0.1:{proxy.port}/0?timeout=1")
    writer, = in_process_replicas(1, history=10)  # trims the stream as it writes
    channels, (late, busy) = stubs_for([f"127.0.0.1:{behind.port}", f"127.0.0.1:{writer.port}"])
    hello(busy, "first")
    watch = Watch(late)
    assert watch.snapshot()[1] == 1
    proxy.pause()
    busy.SendMessages(pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=f"c{n}", message="hello") for n in range(500)]),
        timeout=CALL_DEADLINE)
    proxy.resume()
    with allure.step("the stream no longer holds what it missed: it loads every record"):
        record = late.GetClientStatus(pb.ClientStatusRequest(client_id="c499"),
                                      timeout=CALL_DEADLINE).clients[0]
        assert record.revision == 501
        assert late.CountClients(pb.CountClientsRequest(),
                                 timeout=CALL_DEADLINE).connected == 501
    with allure.step("its watcher is told to start again, and a resumed one gets a snapshot"):
        message = watch.next()
        while isinstance(message, pb.WatchResponse):
            message = watch.next()
        assert message.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        since = int(message.details().rpartition("since_revision=")[2])
        clients, revision, resync = Watch(late, since_revision=since).snapshot()
        assert (resync, revision, len(clients)) == (True, 501, 501)
    for channel in channels:
        channel.close()


@allure.story("Redis stopped and back")
def test_a_redis_that_lost_changes_a_replica_had_seen_is_refused(in_process_replicas,
                                                                redis_server):
    replica, = in_process_replicas(1)
    with connect(f"127.0.0.1:{replica.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        for n in range(3):
            hello(stub, f"c{n}")
        redis_server.stop()  # Redis comes back without what it had: run without appendonly
        for name in ("appendonlydir", "dump.rdb"):
            shutil.rmtree(redis_server.folder / name, ignore_errors=True)
        redis_server.start()
        other = presence.RedisStore(redis_server.url)
        other.commit("x", None, presence.Client("x", 1.0, 1.0, 0, "hello",
                                                presence.DEFAULT_SESSIONS),
                     (presence.EventKind.CONNECTED, ""))
        other.close()
        error = refusal(stub.GetClientStatus, pb.ClientStatusRequest(client_id="c0"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "lost changes this replica had seen" in error.details()
        with allure.step("a write too, rather than answer with a revision it gave out before"):
            error = refusal(stub.SendMessage, pb.MessageRequest(client_id="c9", message="hello"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "lost changes this replica had seen" in error.details()
