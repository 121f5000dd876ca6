"""System tests: the real server over real gRPC on loopback, in-process and as a subprocess."""

import itertools
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import allure
import grpc
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import server as presence
from conftest import DEADLINE, ROOT, Watch, connect, goodbye, hello, run_client, tls_flags
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

ORIGINAL_PROTO = """
syntax = "proto3";
package client_service;
service ClientService {
  rpc SendMessage (MessageRequest) returns (MessageResponse);
  rpc GetClientStatus (ClientStatusRequest) returns (ClientStatusResponse);
}
message MessageRequest { string client_id = 1; string message = 2; }
message MessageResponse { bool success = 1; string info = 2; }
message ClientStatusRequest { string client_id = 1; }
message ClientStatusResponse { map<string, string> statuses = 1; }
"""


STEPS_PER_TEST = 40  # calls shown as steps; a test that makes thousands shows its first ones


class CallsAsSteps(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The calls a system test makes from its own thread, each a step of its Allure report:
    the method and its request on one line."""

    def __init__(self):
        self._shown = 0

    def _step(self, continuation, details, request):
        if threading.current_thread() is not threading.main_thread() or \
                self._shown >= STEPS_PER_TEST:
            return continuation(details, request)
        self._shown += 1
        fields = text_format.MessageToString(request, as_one_line=True)
        with allure.step(f"{details.method.rpartition('/')[2]}({fields[:120]})"):
            return continuation(details, request)

    intercept_unary_unary = intercept_unary_stream = _step


@pytest.fixture
def stub(channel):
    """The service's stub, its calls shown as the test's steps in the report."""
    return pb_grpc.ClientServiceStub(grpc.intercept_channel(channel, CallsAsSteps()))


def send(stub, client_id, message):
    return stub.SendMessage(pb.MessageRequest(client_id=client_id, message=message))


def rpc_error(call, *args):
    """The RpcError a call raises; fails the test when it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


def protoc(proto_path, out_dir, *proto_files, cwd=ROOT):
    """Run the bundled protoc the way `make proto` does."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_path}",
         f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
         *proto_files],
        check=True, cwd=cwd, timeout=DEADLINE * 4,
    )


@pytest.fixture
def clocked_server(make_server, clock):
    """A started server (on each store in turn) whose time the test moves."""
    return make_server(clock=clock)


@pytest.fixture
def clocked_stub(clocked_server):
    """A stub on a server (on each store in turn) whose time the test moves."""
    with connect(f"127.0.0.1:{clocked_server.port}") as channel:
        yield pb_grpc.ClientServiceStub(channel)


class AckedWriters:
    """Threads writing fresh ids until stopped, remembering every acknowledged change."""

    def __init__(self, address, prefix, threads=6):
        self.prefix = prefix
        self.acked = {}
        self.enough = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ClientServiceStub(self._channel)
        self._threads = [threading.Thread(target=self._write, args=(n,)) for n in range(threads)]

    def start(self, enough):
        self._wanted = enough
        for thread in self._threads:
            thread.start()
        return self

    def _write(self, worker):
        for n in itertools.count():
            if self._stop.is_set():
                return
            client_id = f"{self.prefix}-writer{worker}-{n}"
            try:
                reply = send(self._stub, client_id, "hello")
            except grpc.RpcError:
                return
            with self._lock:
                self.acked[client_id] = reply.client.revision
                if len(self.acked) >= self._wanted:
                    self.enough.set()

    def join(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE)
        self._channel.close()


def samples(flag):
    """Two texts the flag accepts, each with what it parses to."""
    if flag.choices:
        return [(choice.lower(), choice) for choice in flag.choices[:2]]
    texts = {float: ("2.5", "9.5"), str: ("some-text", "other-text")}.get(flag.type, ("7", "8"))
    return [(text, flag.type(text)) for text in texts]


def status_of(stub, client_id):
    return stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id)).clients[0]


# The largest records the limits allow: 128-character ids of 4-byte characters, each client
# with the 64 sessions of the default cap, session ids as long.
WIDE = "\U0001d54f"  # 𝕏, 4 bytes in UTF-8
BIG_IDS = [f"{n:03d}" + WIDE * 125 for n in range(130)]
BIG_SESSIONS = [f"{n:02d}" + WIDE * 126 for n in range(presence.DEFAULT_MAX_SESSIONS)]


def big_messages(client_ids, session_ids, message="hello"):
    return pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=client_id, message=message, session_id=session_id)
        for session_id in session_ids for client_id in client_ids])


@pytest.fixture(scope="module")
def big_registry():
    """A memory server holding 130 of the largest records the limits allow (4.5 MB of them)."""
    server = presence.create_server("127.0.0.1:0", presence.MemoryStore(),
                                    max_request_bytes=4 << 20)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
            ("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        for client_id in BIG_IDS:
            stub.SendMessages(big_messages([client_id], BIG_SESSIONS), timeout=DEADLINE)
    yield server
    server.stop(0)


@pytest.fixture
def default_stub(big_registry):
    """A stub on a channel with gRPC's default limits: it takes messages up to 4 MiB."""
    with connect(f"127.0.0.1:{big_registry.port}") as channel:
        yield pb_grpc.ClientServiceStub(channel)


def describe(events):
    return [(event.client.client_id, pb.EventKind.Name(event.kind), event.session_id,
             event.reason) for event in events]


def scrape(url):
    """The samples of a Prometheus endpoint, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


# --- the wire contract ----------------------------------------------------------------


@allure.feature("Wire contract")
@allure.story("Hello and Goodbye")
@pytest.mark.parametrize("message", ["hello", "HELLO", "Hello", "  hello\n", "\thElLo "])
def test_hello_in_any_case_and_padding_marks_client_connected(stub, message):
    response = send(stub, "alice", message)
    assert response.success
    assert response.info == "Client alice marked as connected."
    assert stub.GetClientStatus(pb.ClientStatusRequest(client_id="alice")).statuses == {
        "alice": "connected"}


@allure.feature("Wire contract")
@allure.story("Hello and Goodbye")
def test_goodbye_marks_client_disconnected_with_original_info(stub):
    send(stub, "bob", "hello")
    response = send(stub, "bob", " GoodBye ")
    assert (response.success, response.info) == (True, "Client bob marked as disconnected.")
    assert response.client.status == pb.STATUS_DISCONNECTED
    assert stub.GetClientStatus(pb.ClientStatusRequest(client_id="bob")).statuses["bob"] == (
        "disconnected")


@allure.feature("Wire contract")
@allure.story("Errors")
def test_unknown_message_is_invalid_argument_with_original_details(stub):
    error = rpc_error(send, stub, "alice", "hi there")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Invalid message type: hi there"


@allure.feature("Wire contract")
@allure.story("Errors")
def test_status_of_unknown_client_is_not_found_with_original_details(stub):
    error = rpc_error(stub.GetClientStatus, pb.ClientStatusRequest(client_id="zed"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Client zed not found"


@allure.feature("Wire contract")
@allure.story("All clients")
def test_empty_id_returns_every_known_client(stub):
    send(stub, "alice", "hello")
    send(stub, "bob", "goodbye")
    send(stub, "carol", "hello")
    statuses = stub.GetClientStatus(pb.ClientStatusRequest(client_id="")).statuses
    assert statuses == {"alice": "connected", "bob": "disconnected", "carol": "connected"}


ORIGINAL_PROGRAM = """
import sys, grpc, original_pb2 as pb, original_pb2_grpc as pb_grpc
stub = pb_grpc.ClientServiceStub(grpc.insecure_channel(sys.argv[1]))
reply = stub.SendMessage(pb.MessageRequest(client_id="dave", message="Hello"))
print(reply.success, reply.info)
stub.SendMessage(pb.MessageRequest(client_id="erin", message="goodbye"))
print(sorted(stub.GetClientStatus(pb.ClientStatusRequest(client_id="")).statuses.items()))
try:
    stub.SendMessage(pb.MessageRequest(client_id="x", message="yo"))
except grpc.RpcError as error:
    print(error.code().name, error.details())
"""


@allure.feature("Wire contract")
@allure.story("All clients")
def test_all_clients_map_spanning_many_serialization_chunks_is_complete(stub):
    count = presence.STATUS_MAP_CHUNK * 2 + 345
    for start in range(0, count, presence.MAX_BATCH):
        stub.SendMessages(pb.SendMessagesRequest(requests=[
            pb.MessageRequest(client_id=f"c{n}", message="hello" if n % 2 else "goodbye")
            for n in range(start, min(start + presence.MAX_BATCH, count))]))
    statuses = stub.GetClientStatus(pb.ClientStatusRequest()).statuses
    assert statuses == {f"c{n}": "connected" if n % 2 else "disconnected" for n in range(count)}


@allure.feature("Wire contract")
@allure.story("Compatibility with the original proto")
def test_program_built_on_the_original_proto_works_unchanged(tmp_path, address):
    with allure.step("generate Python code from the original service's proto"):
        (tmp_path / "original.proto").write_text(ORIGINAL_PROTO)
        protoc(".", ".", "original.proto", cwd=tmp_path)
        (tmp_path / "original_program.py").write_text(ORIGINAL_PROGRAM)
    with allure.step("run a program built on it against our server"):
        result = subprocess.run([sys.executable, "original_program.py", address], cwd=tmp_path,
                                capture_output=True, text=True, timeout=DEADLINE * 2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "True Client dave marked as connected.",
        "[('dave', 'connected'), ('erin', 'disconnected')]",
        "INVALID_ARGUMENT Invalid message type: yo",
    ]


@allure.feature("Wire contract")
@allure.story("Generated code")
def test_generated_code_matches_a_fresh_protoc_run(tmp_path):
    protos = sorted(path.name for path in ROOT.glob("*.proto"))
    assert protos == ["connection.proto", "notifications.proto"]
    protoc("generated=.", str(tmp_path), *protos)
    fresh = sorted(path.name for path in (tmp_path / "generated").glob("*.py*"))  # .py, .pyi
    assert fresh == sorted(path.name for path in (ROOT / "generated").glob("*_pb2*.py*"))
    for name in fresh:
        fresh_text = (tmp_path / "generated" / name).read_text()
        assert fresh_text == (ROOT / "generated" / name).read_text(), (
            f"generated/{name} differs from its .proto: run `make proto`")


# --- validation -----------------------------------------------------------------------

BAD_REQUESTS = [
    ("SendMessage", pb.MessageRequest(client_id="", message="hello"),
     "client_id must not be empty"),
    ("SendMessage", pb.MessageRequest(client_id="x" * 129, message="hello"),
     "at most 128 characters, got 129"),
    ("SendMessage", pb.MessageRequest(client_id="a\x00b", message="hello"), "U+0000 at position 1"),
    ("SendMessage", pb.MessageRequest(client_id="line\n", message="hello"), "U+000A at position 4"),
    ("SendMessage", pb.MessageRequest(client_id="\x7f", message="hello"), "U+007F"),
    ("SendMessage", pb.MessageRequest(client_id="c1\x85", message="hello"), "U+0085"),
    ("SendMessage", pb.MessageRequest(client_id="alice", message=""), "Invalid message type: "),
    ("SendMessage", pb.MessageRequest(client_id="alice", message="hello!"),
     "Invalid message type: hello!"),
    ("SendMessage", pb.MessageRequest(client_id="a", message="hello", lease_seconds=3601),
     "lease_seconds must be at most 3600, got 3601"),
    ("SendMessage", pb.MessageRequest(client_id="a", message="goodbye", lease_seconds=5),
     "lease_seconds is only for hello"),
    ("SendMessage", pb.MessageRequest(client_id="a", message="hello", session_id="s" * 129),
     "session_id must be at most 128 characters"),
    ("GetClientStatus", pb.ClientStatusRequest(client_id="y" * 200),
     "at most 128 characters, got 200"),
    ("GetClientStatus", pb.ClientStatusRequest(client_id="tab\there"), "U+0009"),
    ("ListClients", pb.ListClientsRequest(page_size=-1), "page_size must not be negative"),
    ("ListClients", pb.ListClientsRequest(page_token="not a token!"), "page_token"),
    ("ListClients", pb.ListClientsRequest(page_token="!!!"), "page_token is not a token"),
    ("ListClients", pb.ListClientsRequest(page_token="é字"), "page_token is not a token"),
    ("ListClients", pb.ListClientsRequest(page_token="YQ==YQ=="), "page_token is not a token"),
    ("SendMessage", pb.MessageRequest(client_id="   ", message="hello"),
     "client_id must not be only white space"),
    ("SendMessage", pb.MessageRequest(client_id="\u3000", message="hello"),
     "client_id must not be only white space"),
    ("SendMessage", pb.MessageRequest(client_id="admin\u202etxt.exe", message="hello"),
     "bidirectional override or isolate characters, found U+202E at position 5"),
    ("SendMessage", pb.MessageRequest(client_id="a", message="hello", session_id="\u2066x"),
     "session_id must not contain bidirectional"),
    ("GetClientStatus", pb.ClientStatusRequest(client_id="bob\u2069"), "U+2069 at position 3"),
    ("ListClients", pb.ListClientsRequest(status=7), "status must be one of"),
    ("ListClients", pb.ListClientsRequest(id_prefix="\x1b["), "id_prefix must not contain"),
    ("SendMessages", pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id="ok", message="hello"),
        pb.MessageRequest(client_id="bad", message="howdy")]),
     "requests[1]: Invalid message type: howdy"),
    ("SendMessages", pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=f"u{i}", message="hello") for i in range(1001)]),
     "at most 1000 requests per call, got 1001"),
]


@allure.feature("Validation")
@allure.story("Bad input is refused with a reason")
@pytest.mark.parametrize(("method", "request_message", "reason"), BAD_REQUESTS,
                         ids=[f"{method}-{reason[:30]}" for method, _, reason in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_with_the_broken_rule(stub, method, request_message, reason):
    with allure.step(f"{method} with a bad field"):
        error = rpc_error(getattr(stub, method), request_message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    with allure.step("the server still serves, and nothing was applied"):
        assert send(stub, "after", "hello").success
        assert stub.CountClients(pb.CountClientsRequest()).total == 1


@allure.feature("Validation")
@allure.story("Edge cases that are valid")
@pytest.mark.parametrize("client_id", ["x" * 128, "名前🙂", "a b", "ümlaut-ß", "-", "\u200b"])
def test_any_printable_unicode_id_up_to_128_characters_is_accepted(stub, client_id):
    assert send(stub, client_id, "hello").client.client_id == client_id
    status = stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id))
    assert status.statuses == {client_id: "connected"}


# --- revisions, timestamps, listing ------------------------------------------------------


@allure.feature("Semantics")
@allure.story("Revisions")
def test_every_change_gets_the_next_revision_and_repeats_get_none(clocked_stub):
    stub = clocked_stub
    revisions = [send(stub, client_id, message).client.revision for client_id, message in
                 [("a", "hello"), ("b", "hello"), ("a", "goodbye"), ("b", "goodbye")]]
    assert revisions == [1, 2, 3, 4]
    repeat = send(stub, "b", "goodbye")
    assert (repeat.changed, repeat.client.revision) == (False, 4)
    assert stub.CountClients(pb.CountClientsRequest()).revision == 4


@allure.feature("Semantics")
@allure.story("Timestamps")
def test_repeated_hello_refreshes_last_seen_but_not_changed_at(clocked_stub, clock):
    first = send(clocked_stub, "alice", "hello").client
    clock.advance(90.5)
    again = send(clocked_stub, "alice", "hello").client
    assert again.changed_at == first.changed_at
    assert again.last_seen.ToNanoseconds() - first.last_seen.ToNanoseconds() == 90_500_000_000
    assert first.changed_at.ToNanoseconds() == int(clock.now - 90.5) * 10**9
    clock.advance(10)
    gone = send(clocked_stub, "alice", "goodbye").client
    assert gone.changed_at.seconds == int(clock.now)
    assert gone.revision == first.revision + 1


@allure.feature("Listing")
@allure.story("Pages")
def test_pages_walk_every_client_once_in_id_order(stub):
    ids = [f"user-{i:03d}" for i in range(250)]
    stub.SendMessages(pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=client_id, message="hello" if i % 3 else "goodbye")
        for i, client_id in enumerate(ids)]))
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListClients(pb.ListClientsRequest(page_size=100, page_token=token))
        seen += [client.client_id for client in page.clients]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (ids, 3)


@allure.feature("Listing")
@allure.story("Filters")
def test_status_and_prefix_filters_combine(stub):
    stub.SendMessages(pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=client_id, message=message) for client_id, message in
        [("eu-1", "hello"), ("eu-2", "goodbye"), ("eu-3", "hello"), ("us-1", "hello"),
         ("e", "hello")]]))
    def ids(**query):
        return [c.client_id for c in stub.ListClients(pb.ListClientsRequest(**query)).clients]
    assert ids(id_prefix="eu-") == ["eu-1", "eu-2", "eu-3"]
    assert ids(id_prefix="eu-", status=pb.STATUS_CONNECTED) == ["eu-1", "eu-3"]
    assert ids(status=pb.STATUS_DISCONNECTED) == ["eu-2"]
    assert ids(status=pb.STATUS_CONNECTED) == ["e", "eu-1", "eu-3", "us-1"]
    assert ids(id_prefix="zz") == []
    assert ids(page_size=2000) == ["e", "eu-1", "eu-2", "eu-3", "us-1"]


@allure.feature("Listing")
@allure.story("Counts")
def test_count_follows_changes_without_listing(stub):
    for client_id in ("a", "b", "c"):
        send(stub, client_id, "hello")
    send(stub, "b", "goodbye")
    counts = stub.CountClients(pb.CountClientsRequest())
    assert (counts.connected, counts.disconnected, counts.total, counts.revision) == (2, 1, 3, 4)


# --- many clients at once -----------------------------------------------------------


@allure.feature("Concurrency")
@allure.story("Threads on one server")
def test_concurrent_writers_end_in_their_last_states_with_unique_revisions(stub):
    def writer(worker):
        revisions = []
        for round_ in range(25):
            for client_id in (f"w{worker}-a", f"w{worker}-b"):
                message = "hello" if round_ % 2 == 0 else "goodbye"
                revisions.append(send(stub, client_id, message).client.revision)
        assert not send(stub, f"w{worker}-a", "hello").changed
        send(stub, f"w{worker}-b", "goodbye")
        return revisions

    with futures.ThreadPoolExecutor(8) as pool:
        revisions = [rev for result in pool.map(writer, range(8)) for rev in result]
    assert len(set(revisions)) == len(revisions) == 8 * 50
    statuses = stub.GetClientStatus(pb.ClientStatusRequest()).statuses
    assert statuses == {**{f"w{w}-a": "connected" for w in range(8)},
                        **{f"w{w}-b": "disconnected" for w in range(8)}}
    assert stub.CountClients(pb.CountClientsRequest()).revision == 8 * 50 + 8


# --- durability -------------------------------------------------------------------------


@allure.feature("Durability")
@allure.story("kill -9 loses nothing acknowledged")
def test_kill_9_under_concurrent_writes_loses_no_acknowledged_change(server_processes, sqlite_url):
    last_revision = 0
    for attempt in range(3):
        with allure.step(f"round {attempt + 1}: write concurrently, kill -9 mid-stream"):
            server = server_processes("--store", sqlite_url)
            writers = AckedWriters(server.address, prefix=f"round{attempt}").start(enough=200)
            assert writers.enough.wait(DEADLINE), "writers made no progress"
            server.kill()
            writers.join()
        with allure.step("restart on the same file: every acknowledged change is there"):
            server = server_processes("--store", sqlite_url)
            with connect(server.address) as channel:
                stub = pb_grpc.ClientServiceStub(channel)
                statuses = stub.GetClientStatus(pb.ClientStatusRequest()).statuses
                missing = [cid for cid in writers.acked if statuses.get(cid) != "connected"]
                assert not missing, f"{len(missing)} acknowledged changes lost, e.g. {missing[:3]}"
                for client_id, revision in list(writers.acked.items())[:50]:
                    record = stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id))
                    assert record.clients[0].revision == revision
                revision = stub.CountClients(pb.CountClientsRequest()).revision
                assert revision >= max(writers.acked.values()) > last_revision
                last_revision = revision
            server.kill()


@allure.feature("Durability")
@allure.story("Graceful stop")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_zero_and_state_survives(server_processes, sqlite_url,
                                                                 signum):
    server = server_processes("--store", sqlite_url)
    with connect(server.address) as channel:
        send(pb_grpc.ClientServiceStub(channel), "alice", "hello")
    assert server.terminate(signum) == 0
    server.wait_for_log("stopped")
    again = server_processes("--store", sqlite_url)
    with connect(again.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        assert stub.GetClientStatus(pb.ClientStatusRequest()).statuses == {"alice": "connected"}


@allure.feature("Durability")
@allure.story("Graceful stop")
def test_signal_ends_health_watchers_with_not_serving_instead_of_waiting_out_the_grace(
        server_processes):
    server = server_processes("--store", "memory://", "--grace", "60")
    with connect(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
                   for service in ("", "client_service.ClientService")]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        with allure.step("each watcher is told NOT_SERVING, then its stream ends with OK"):
            for watch in watches:
                assert [reply.status for reply in watch] == [
                    health_pb2.HealthCheckResponse.NOT_SERVING]
                assert watch.code() == grpc.StatusCode.OK
        with allure.step("the server exits 0 long before its 60 s grace is over"):
            assert server.process.wait(timeout=DEADLINE) == 0


# --- operations -------------------------------------------------------------------------


@allure.feature("Operations")
@allure.story("Health and reflection")
def test_health_reports_serving_and_reflection_lists_the_services(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "client_service.ClientService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"client_service.ClientService", "grpc.health.v1.Health"} <= names


@allure.feature("Operations")
@allure.story("Limits")
def test_request_over_the_size_limit_is_resource_exhausted(stub):
    error = rpc_error(send, stub, "x" * (presence.DEFAULT_MAX_REQUEST_BYTES + 1), "hello")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert send(stub, "small", "hello").success


@allure.feature("Operations")
@allure.story("Limits")
def test_calls_past_the_concurrency_limit_are_resource_exhausted(make_server):
    limit = 3  # max_concurrent_rpcs=2 plus the room kept for max_watchers=1
    armed, release, entered = threading.Event(), threading.Event(), threading.Semaphore(0)

    def stalled_clock():
        """Once armed, hold each SendMessages that asks the time until the test releases it
        (a batch, which runs on the pool: a lone SendMessage would run on gRPC's thread)."""
        if armed.is_set():
            entered.release()
            release.wait(DEADLINE)
        return 1_800_000_000.0

    server = make_server(clock=stalled_clock, max_concurrent_rpcs=2, max_watchers=1)
    armed.set()  # not before: building the server asks the time too (for due leases)
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            stalled = [stub.SendMessages.future(pb.SendMessagesRequest(requests=[
                pb.MessageRequest(client_id=f"c{n}", message="hello")])) for n in range(limit)]
            for _ in stalled:
                assert entered.acquire(timeout=DEADLINE)
            error = rpc_error(stub.ListClients, pb.ListClientsRequest())
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            armed.clear()
            with allure.step("a SendMessage too, since the pool is busy: it would run there"):
                assert rpc_error(send, stub, "queued", "hello").code() == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED)
            release.set()
            assert all(call.result(timeout=DEADLINE).responses[0].success for call in stalled)
            assert stub.CountClients(pb.CountClientsRequest()).connected == limit
    finally:
        release.set()


@allure.feature("Operations")
@allure.story("Limits")
def test_a_send_message_runs_on_grpcs_own_thread_up_to_its_commit(make_server, new_store):
    threads = []

    def noting_clock():
        """The time, noting which thread asks for it."""
        threads.append(threading.current_thread().name)
        return 1_800_000_000.0

    server = make_server(new_store(), clock=noting_clock)
    threads.clear()  # building the server asks the time too
    with connect(f"127.0.0.1:{server.port}") as channel:
        assert send(pb_grpc.ClientServiceStub(channel), "alice", "hello").success
    assert threads and not any(name.startswith("rpc_") for name in threads), threads



def threads_in(function_name):
    """The names of the threads whose stack is in a function of that name just now."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    found = []
    for ident, frame in sys._current_frames().items():
        while frame is not None and frame.f_code.co_name != function_name:
            frame = frame.f_back
        if frame is not None:
            found.append(names.get(ident, str(ident)))
    return found


@allure.feature("Operations")
@allure.story("Limits")
def test_the_all_clients_map_never_runs_on_grpcs_own_thread():
    """A one-client GetClientStatus runs on gRPC's thread on memory://; the map of every
    client must not: at 100,000 clients it would stall every other call behind it."""
    server = presence.create_server("127.0.0.1:0", presence.MemoryStore())
    server.start()
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            assert send(stub, "alice", "hello").success
            with server.registry._lock:  # the map waits for it, on whichever thread runs it
                answer = stub.GetClientStatus.future(pb.ClientStatusRequest(client_id=""))
                deadline = time.monotonic() + DEADLINE
                while not (waiting := threads_in("snapshot")) and time.monotonic() < deadline:
                    pass  # the map is on its way to the lock
            assert answer.result(timeout=DEADLINE).statuses == {"alice": "connected"}
    finally:
        server.stop(0)
    assert waiting and all(name.startswith("rpc_") for name in waiting), waiting


class HeldFirstCommitStore(presence.SqliteStore):
    """The real SQLite store whose first commit waits for `released`, counting the threads
    waiting for a commit meanwhile."""

    def __init__(self, path):
        super().__init__(path)
        self.released = threading.Event()
        self.waiting = 0
        self._counting = threading.Lock()

    def wait(self, batch):
        with self._counting:
            self.waiting += 1
        try:
            return super().wait(batch)
        finally:
            with self._counting:
                self.waiting -= 1

    def _save(self, records):
        self.released.wait(DEADLINE)
        super()._save(records)


@allure.feature("Operations")
@allure.story("Limits")
def test_a_commit_held_open_does_not_hold_up_finishing_the_calls_after_it(tmp_path):
    """While one call waits for its commit, the next is already being finished (waiting for
    the commit after): answers and commits overlap rather than take turns on one thread."""
    store = HeldFirstCommitStore(str(tmp_path / "held.db"))
    server = presence.create_server("127.0.0.1:0", store)
    server.start()
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            first = stub.SendMessage.future(pb.MessageRequest(client_id="a", message="hello"))
            deadline = time.monotonic() + DEADLINE
            while store.waiting < 1 and time.monotonic() < deadline:
                pass  # the first call reaches its commit, which is held
            second = stub.SendMessage.future(pb.MessageRequest(client_id="b", message="hello"))
            while store.waiting < 2 and time.monotonic() < deadline:
                pass  # the second call is finished by another thread meanwhile
            overlapped = store.waiting
            store.released.set()
            assert all(call.result(timeout=DEADLINE).success for call in (first, second))
    finally:
        store.released.set()
        server.stop(0)
        store.close()
    assert overlapped == 2, f"{overlapped} thread(s) finishing calls while a commit was held"


@allure.feature("Operations")
@allure.story("Command line")
def test_help_explains_every_flag_and_its_environment_twin():
    result = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    readme = (ROOT / "README.txt").read_text()
    server_section = readme[readme.index("The server\n"):readme.index("Leases, sessions")]
    assert len(presence.FLAGS) >= 20
    for flag in presence.FLAGS:
        assert f"{flag.name} " in help_text and f"[{flag.env}" in help_text, flag.name
        assert flag.name in server_section and flag.env in server_section, (
            f"README's server section does not name {flag.name} and {flag.env}")


@allure.feature("Operations")
@allure.story("Command line")
@pytest.mark.parametrize("flag", presence.FLAGS, ids=[flag.name for flag in presence.FLAGS])
def test_each_environment_twin_sets_its_flag_and_the_flag_wins(flag):
    attribute = flag.name.removeprefix("--").replace("-", "_")
    if flag.switch:
        for text, on in (("1", True), ("0", False), ("false", False), ("yes", True)):
            assert getattr(presence.build_parser({flag.env: text}).parse_args([]),
                           attribute) is on
        assert getattr(presence.build_parser({}).parse_args([flag.name]), attribute) is True
        return
    (env_text, env_value), (flag_text, flag_value) = samples(flag)
    from_env = presence.build_parser({flag.env: env_text}).parse_args([])
    assert getattr(from_env, attribute) == env_value
    given = presence.build_parser({flag.env: env_text}).parse_args([flag.name, flag_text])
    assert getattr(given, attribute) == flag_value


@allure.feature("Operations")
@allure.story("Command line")
def test_environment_twins_configure_the_server(server_processes, tmp_path):
    db = tmp_path / "from-env.db"
    server = server_processes(env={"PRESENCE_STORE": f"sqlite:///{db}",
                                   "PRESENCE_LOG_LEVEL": "DEBUG"})
    with connect(server.address) as channel:
        send(pb_grpc.ClientServiceStub(channel), "envy", "hello")
    server.wait_for_log(r"envy: connected \(hello\).*revision 1")
    assert db.exists()


@allure.feature("Operations")
@allure.story("Clear errors at start")
@pytest.mark.parametrize(("flags", "expected", "code"), [
    (["--store", "postgres://db"], "unsupported store URL 'postgres://db'", 1),
    (["--store", "sqlite:////nonexistent-dir/sub/x.db"], "cannot open SQLite database", 1),
    # a bad flag: argparse's code, and the flag named
    (["--port", "70000"], "argument --port: must be a port number from 0 to 65535", 2),
    (["--port", "abc"], "argument --port: must be a port number from 0 to 65535 (0 takes a "
                        "free one), got 'abc'", 2),
    (["--workers", "0"], "argument --workers: must be a whole number, 1 or more, got '0'", 2),
], ids=["unknown store", "database it cannot open", "port out of range", "port not a number",
        "no workers"])
def test_bad_configuration_fails_at_start_with_one_clear_line(flags, expected, code):
    result = subprocess.run([sys.executable, "server.py", "--host", "127.0.0.1", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == code
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@allure.feature("Operations")
@allure.story("Clear errors at start")
def test_port_in_use_fails_at_start_with_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--store", "memory://"], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # no C-core line, no GRPC_VERBOSITY
    assert (f"cannot start: port {port} on 127.0.0.1 is already in use; stop what listens "
            "there, or choose another port with --port (0 takes a free one)") in result.stderr


# --- leases and sessions ----------------------------------------------------------------


@allure.feature("Leases")
@allure.story("Expiry on a moved clock")
def test_lease_keeps_client_connected_while_renewed_and_expires_after(clocked_server, clock):
    registry = clocked_server.registry
    with connect(f"127.0.0.1:{clocked_server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        first = hello(stub, "alice", lease=30).client
        assert first.sessions[0].expires_at.seconds == int(clock.now) + 30
        with allure.step("renewed before it runs out: still connected, no new revision"):
            clock.advance(29)
            assert registry.expire_due() == []
            renewed = hello(stub, "alice", lease=30).client
            assert (renewed.revision, renewed.status) == (first.revision, pb.STATUS_CONNECTED)
            clock.advance(29)
            assert registry.expire_due() == []
        with allure.step("not renewed: disconnected with reason 'lease expired', a new revision"):
            clock.advance(2)
            expired = registry.expire_due()
            assert [(c.record.client_id, c.reason, c.revision) for c in expired] == [
                ("alice", "lease expired", first.revision + 1)]
            record = status_of(stub, "alice")
            assert (record.status, record.reason, len(record.sessions)) == (
                pb.STATUS_DISCONNECTED, "lease expired", 0)
            assert record.last_seen == renewed.last_seen


@allure.feature("Leases")
@allure.story("Expiry on a moved clock")
def test_expiry_finds_due_leases_without_touching_the_rest(clock):
    registry = presence.Registry(presence.MemoryStore(), clock=clock)
    registry.apply_many([presence.Message(f"quiet{n}", presence.Status.CONNECTED)
                         for n in range(10_000)])
    registry.apply_one(presence.Message("short", presence.Status.CONNECTED, lease=5))
    registry.apply_one(presence.Message("long", presence.Status.CONNECTED, lease=500))
    assert registry.seconds_to_next_expiry() == 5
    clock.advance(6)
    assert [change.record.client_id for change in registry.expire_due()] == ["short"]
    assert registry.counts().connected == 10_001


@allure.feature("Sessions")
@allure.story("Several terminals, one user")
def test_user_stays_connected_while_any_session_is_live(stub):
    with allure.step("two sessions arrive"):
        assert hello(stub, "bob", "laptop").client.status == pb.STATUS_CONNECTED
        both = hello(stub, "bob", "phone").client
        assert [s.session_id for s in both.sessions] == ["laptop", "phone"]
        assert stub.CountClients(pb.CountClientsRequest()).live_sessions == 2
    with allure.step("one leaves: still connected"):
        reply = goodbye(stub, "bob", "laptop")
        assert reply.client.status == pb.STATUS_CONNECTED
        assert reply.info == "Client bob session laptop ended; still connected with 1 sessions."
        assert [s.session_id for s in reply.client.sessions] == ["phone"]
    with allure.step("the last leaves: disconnected, with the original info text"):
        reply = goodbye(stub, "bob", "phone")
        assert (reply.client.status, reply.info) == (pb.STATUS_DISCONNECTED,
                                                     "Client bob marked as disconnected.")


@allure.feature("Sessions")
@allure.story("Goodbye without a session")
def test_goodbye_without_session_ends_every_session(stub):
    for session in ("a", "b", "c"):
        hello(stub, "carol", session)
    reply = goodbye(stub, "carol")
    assert (reply.client.status, len(reply.client.sessions)) == (pb.STATUS_DISCONNECTED, 0)
    assert stub.CountClients(pb.CountClientsRequest()).live_sessions == 0


@allure.feature("Sessions")
@allure.story("Goodbye without a session")
def test_goodbye_for_a_session_that_is_not_live_changes_nothing(stub):
    revision = hello(stub, "dan", "one").client.revision
    reply = goodbye(stub, "dan", "other")
    assert (reply.changed, reply.client.revision, reply.client.status) == (
        False, revision, pb.STATUS_CONNECTED)


@allure.feature("Semantics")
@allure.story("Batches")
def test_an_empty_batch_is_answered_with_no_answers(stub):
    assert len(stub.SendMessages(pb.SendMessagesRequest(), timeout=DEADLINE).responses) == 0
    assert stub.CountClients(pb.CountClientsRequest()).revision == 0


@allure.feature("Semantics")
@allure.story("Batches")
def test_a_renewal_after_a_change_in_one_batch_reports_that_changes_revision(stub):
    replies = stub.SendMessages(pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id="carl", message="hello", session_id="tty"),
        pb.MessageRequest(client_id="carl", message="hello", session_id="tty",
                          lease_seconds=60)]), timeout=DEADLINE).responses
    assert [(reply.changed, reply.client.revision) for reply in replies] == [(True, 1),
                                                                              (False, 1)]
    assert status_of(stub, "carl").revision == 1
    assert replies[1].client.sessions[0].HasField("expires_at")


@allure.feature("Sessions")
@allure.story("Sessions per client are capped")
def test_sessions_past_the_cap_are_resource_exhausted_and_renewals_still_pass(make_server):
    server = make_server(max_sessions=3)
    with connect(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        for session in ("a", "b", "c"):
            hello(stub, "erin", session)
        with allure.step("a fourth session is refused, naming the limit"):
            error = rpc_error(stub.SendMessage, pb.MessageRequest(
                client_id="erin", message="hello", session_id="d"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 3 sessions" in error.details()
            assert "--max-sessions" in error.details()
        with allure.step("a live session still renews; a batch past the cap applies nothing"):
            assert hello(stub, "erin", "a", lease=30).changed is False
            revision = stub.CountClients(pb.CountClientsRequest()).revision
            error = rpc_error(stub.SendMessages, pb.SendMessagesRequest(requests=[
                pb.MessageRequest(client_id="frank", message="hello"),
                pb.MessageRequest(client_id="erin", message="hello", session_id="e")]))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "requests[1]" in error.details()
            assert stub.CountClients(pb.CountClientsRequest()).revision == revision
            assert rpc_error(stub.GetClientStatus, pb.ClientStatusRequest(
                client_id="frank")).code() == grpc.StatusCode.NOT_FOUND
        with allure.step("once one ends, another may start"):
            goodbye(stub, "erin", "b")
            assert hello(stub, "erin", "d").changed


@allure.feature("Limits")
@allure.story("Every answer fits a default client")
def test_pages_of_the_largest_records_are_cut_to_fit_and_still_walk_everything(default_stub):
    seen, token, pages = [], "", 0
    while True:
        page = default_stub.ListClients(pb.ListClientsRequest(page_size=1000, page_token=token),
                                        timeout=DEADLINE)
        assert page.ByteSize() <= 4 * 1024 * 1024
        seen += [client.client_id for client in page.clients]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(BIG_IDS) and pages > 1


@allure.feature("Limits")
@allure.story("Every answer fits a default client")
def test_a_snapshot_of_the_largest_records_comes_in_chunks_that_fit(default_stub):
    clients, revision, _ = Watch(default_stub).snapshot()
    assert sorted(clients) == sorted(BIG_IDS)
    assert all(len(client.sessions) >= presence.DEFAULT_MAX_SESSIONS - 2  # the watch test
               for client in clients.values())                          # ends two each
    assert revision == len(BIG_IDS) * presence.DEFAULT_MAX_SESSIONS


@allure.feature("Limits")
@allure.story("Every answer fits a default client")
def test_a_batch_whose_answer_would_not_fit_is_refused_before_it_applies(default_stub):
    before = default_stub.CountClients(pb.CountClientsRequest())
    renewals = pb.SendMessagesRequest(requests=[
        pb.MessageRequest(client_id=client_id, message="hello", session_id=BIG_SESSIONS[0],
                          lease_seconds=60) for client_id in BIG_IDS])
    error = rpc_error(default_stub.SendMessages, renewals)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "nothing was applied" in error.details()
    fit = int(re.search(r"send at most (\d+)", error.details()).group(1))
    assert 0 < fit < len(BIG_IDS)
    assert default_stub.CountClients(pb.CountClientsRequest()) == before
    record = status_of(default_stub, BIG_IDS[0])
    assert not record.sessions[0].HasField("expires_at"), "a refused batch renewed a lease"
    del renewals.requests[fit:]
    answer = default_stub.SendMessages(renewals, timeout=DEADLINE)
    assert len(answer.responses) == fit


@allure.feature("Limits")
@allure.story("Every answer fits a default client")
def test_a_watcher_behind_by_many_large_changes_gets_them_in_messages_that_fit(default_stub):
    watch = Watch(default_stub, since_revision=1, read=False)
    ending = [BIG_SESSIONS[-1], BIG_SESSIONS[-2]]
    halves = [BIG_IDS[:65], BIG_IDS[65:]]
    for session_id in ending:
        for client_ids in halves:  # each batch's answer fits; together they are 9 MB of events
            default_stub.SendMessages(big_messages(client_ids, [session_id], "goodbye"),
                                      timeout=DEADLINE)
    watch.resume_reading()
    changes = len(BIG_IDS) * presence.DEFAULT_MAX_SESSIONS + 2 * len(BIG_IDS)
    events = []
    while not events or events[-1].revision < changes:
        message = watch.next()
        assert isinstance(message, pb.WatchResponse), f"the stream failed: {message}"
        events += message.events
    assert [event.revision for event in events] == list(range(2, changes + 1))
    watch.call.cancel()


# --- the watch stream -------------------------------------------------------------------


@allure.feature("Watch")
@allure.story("Snapshot, then live changes")
def test_watch_sends_the_snapshot_then_every_change_in_revision_order(stub):
    hello(stub, "alice")
    goodbye(stub, "bob")
    watch = Watch(stub)
    with allure.step("the snapshot"):
        clients, revision, resync = watch.snapshot()
        assert {cid: c.status for cid, c in clients.items()} == {
            "alice": pb.STATUS_CONNECTED, "bob": pb.STATUS_DISCONNECTED}
        assert (revision, resync) == (2, False)
    with allure.step("then each change as it happens"):
        hello(stub, "bob", "s1")
        hello(stub, "bob", "s2")
        hello(stub, "bob", "s2")  # a renewal: no event
        goodbye(stub, "bob", "s1")
        goodbye(stub, "bob")
        events = watch.events(4)
        assert describe(events) == [
            ("bob", "EVENT_CONNECTED", "s1", "hello"),
            ("bob", "EVENT_SESSION_STARTED", "s2", "hello"),
            ("bob", "EVENT_SESSION_ENDED", "s1", "goodbye"),
            ("bob", "EVENT_DISCONNECTED", "", "goodbye"),
        ]
        assert [event.revision for event in events] == [3, 4, 5, 6]
    watch.call.cancel()


@allure.feature("Watch")
@allure.story("Resume from a revision")
def test_watch_resumed_from_a_revision_gets_exactly_the_changes_after_it(stub):
    for n in range(10):
        hello(stub, f"user{n}")
    watch = Watch(stub, since_revision=6)
    events = watch.events(4)
    assert [event.revision for event in events] == [7, 8, 9, 10]
    hello(stub, "late")
    assert [event.client.client_id for event in watch.events(1)] == ["late"]
    watch.call.cancel()


@allure.feature("Watch")
@allure.story("Resume from a revision no longer held")
@pytest.mark.parametrize("since", [1, 999], ids=["too-old", "from-the-future"])
def test_watch_resumed_from_an_unheld_revision_is_told_to_resync(make_server, since):
    server = make_server(watch_history=8)
    with connect(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        for n in range(40):
            hello(stub, f"user{n}")
        watch = Watch(stub, since_revision=since)
        clients, revision, resync = watch.snapshot()
        assert (resync, revision, len(clients)) == (True, 40, 40)
        hello(stub, "next")
        assert [event.revision for event in watch.events(1)] == [41]
        watch.call.cancel()


@allure.feature("Watch")
@allure.story("A slow watcher is cut off")
def test_slow_watcher_is_cut_off_while_others_get_everything(make_server):
    server = make_server(watch_buffer=1000)
    address = f"127.0.0.1:{server.port}"
    small_window = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    with connect(address) as channel, small_window:
        stub = pb_grpc.ClientServiceStub(channel)
        slow = Watch(pb_grpc.ClientServiceStub(small_window), read=False)
        # Two fast watchers per sender thread: senders get watchers evenly, so the slow
        # one shares its sender with a fast one.
        fast = [Watch(stub) for _ in range(2 * presence.WATCH_SENDERS)]
        assert [watch.snapshot()[1] for watch in fast] == [0] * len(fast)
        with allure.step("10,000 changes that the fast watchers keep up with"):
            for batch in range(10):
                stub.SendMessages(pb.SendMessagesRequest(requests=[
                    pb.MessageRequest(client_id=f"c{batch}-{n}", message="hello")
                    for n in range(1000)]))
                expected = list(range(batch * 1000 + 1, batch * 1000 + 1001))
                for watch in fast:
                    assert [event.revision for event in watch.events(1000)] == expected
        with allure.step("the slow watcher, which stopped reading, is cut off"):
            slow.resume_reading()
            received, message = 0, slow.next()
            while isinstance(message, pb.WatchResponse):
                received += len(message.events)
                message = slow.next()
            assert isinstance(message, grpc.RpcError)
            assert message.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "fell more than 1000 changes behind" in message.details()
            assert received < 10_000
        assert hello(stub, "still-serving").success
        hello(stub, "one-more")
        for watch in fast:
            assert [event.client.client_id for event in watch.events(2)] == [
                "still-serving", "one-more"]
            watch.call.cancel()


@allure.feature("Watch")
@allure.story("Limits")
def test_watchers_past_the_limit_are_resource_exhausted(make_server):
    server = make_server(max_watchers=2)
    with connect(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        watches = [Watch(stub), Watch(stub)]
        for watch in watches:
            watch.snapshot()
        refused = Watch(stub).next()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many watchers (limit 2)" in refused.details()
        watches[0].call.cancel()
        assert watches[0].next().code() == grpc.StatusCode.CANCELLED
        third = Watch(stub)
        for _ in range(50):  # the slot frees when the server sees the cancel
            message = third.next()
            if isinstance(message, pb.WatchResponse):
                break
            third = Watch(stub)
        assert isinstance(message, pb.WatchResponse)


@allure.feature("Watch")
@allure.story("Clean end on shutdown")
def test_watchers_end_cleanly_when_the_server_stops(presence_server, stub):
    watch = Watch(stub)
    watch.snapshot()
    presence_server.stop(grace=DEADLINE)
    assert watch.next() is None


@allure.feature("Leases")
@allure.story("Restart")
def test_leases_that_ran_out_while_down_expire_at_start_as_ordinary_changes(tmp_path, clock):
    path = str(tmp_path / "leases.db")
    with allure.step("before the restart: one leased session, one without a lease"):
        store = presence.SqliteStore(path)
        server = presence.create_server("127.0.0.1:0", store, clock=clock)
        server.registry.apply_many([
            presence.Message("leased", presence.Status.CONNECTED, "tty1", lease=60),
            presence.Message("leased", presence.Status.CONNECTED, "tty2", lease=600),
            presence.Message("forever", presence.Status.CONNECTED)])
        server.stop(0)
        store.close()
    with allure.step("down for 61 s, then restarted on the same file"):
        clock.advance(61)
        store = presence.SqliteStore(path)
        server = presence.create_server("127.0.0.1:0", store, clock=clock)
        server.start()
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            leased = status_of(stub, "leased")
            assert [s.session_id for s in leased.sessions] == ["tty2"]
            assert (leased.status, leased.revision) == (pb.STATUS_CONNECTED, 4)
            watch = Watch(stub, since_revision=3)
            assert describe(watch.events(1)) == [
                ("leased", "EVENT_SESSION_ENDED", "tty1", "lease expired")]
            clock.advance(600)
            server.registry.expire_due()
            assert status_of(stub, "leased").status == pb.STATUS_DISCONNECTED
            assert status_of(stub, "forever").status == pb.STATUS_CONNECTED
            watch.call.cancel()
    finally:
        server.stop(0)
        store.close()


# --- security: TLS and tokens -------------------------------------------------------------


@allure.feature("Security")
@allure.story("TLS")
def test_tls_server_answers_only_clients_that_trust_its_certificate(server_processes,
                                                                    certificates):
    server = server_processes("--store", "memory://", *tls_flags(
        certificates, ("--tls-cert", "server.pem"), ("--tls-key", "server.key")))
    server.wait_for_log("TLS, no access token")
    with allure.step("a client trusting the CA talks"):
        trusted = run_client("--server", server.address,
                             *tls_flags(certificates, ("--tls-ca", "ca.pem")),
                             "send", "alice", "hello")
        assert trusted.returncode == 0, trusted.stderr
    with allure.step("plaintext, or TLS trusting only the system's CAs, does not"):
        for flags in ([], ["--tls"]):
            refused = run_client("--server", server.address, "--timeout", "2", *flags,
                                 "status", "alice")
            assert refused.returncode == 3
            assert refused.stderr.startswith(f"error: server {server.address} is unreachable")
            assert refused.stderr.count("\n") == 1


@allure.feature("Security")
@allure.story("Mutual TLS")
def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(server_processes,
                                                                           certificates):
    server = server_processes("--store", "memory://", *tls_flags(
        certificates, ("--tls-cert", "server.pem"), ("--tls-key", "server.key"),
        ("--tls-client-ca", "ca.pem")))
    server.wait_for_log("TLS with client certificates")
    without = run_client("--server", server.address, "--timeout", "2",
                         *tls_flags(certificates, ("--tls-ca", "ca.pem")), "status")
    assert without.returncode == 3
    with_cert = run_client("--server", server.address, *tls_flags(
        certificates, ("--tls-ca", "ca.pem"), ("--tls-cert", "client.pem"),
        ("--tls-key", "client.key")), "send", "bob", "hello")
    assert with_cert.returncode == 0, with_cert.stderr


@allure.feature("Security")
@allure.story("Access token")
def test_tls_server_with_a_token_shows_each_client_exactly_what_it_may_do(server_processes,
                                                                         certificates, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-Tok3n\n")
    server = server_processes("--store", "memory://", "--token-file", str(token_file),
                              "--log-level", "DEBUG", *tls_flags(
                                  certificates, ("--tls-cert", "server.pem"),
                                  ("--tls-key", "server.key")))
    server.wait_for_log("TLS, token required for every call")
    tls = tls_flags(certificates, ("--tls-ca", "ca.pem"))
    with allure.step("with the right token: writes and reads"):
        for args in (["send", "alice", "hello"], ["status", "alice"], ["status"]):
            result = run_client("--server", server.address, *tls, "--token", "s3cret-Tok3n",
                                *args)
            assert result.returncode == 0, result.stderr
        from_file = run_client("--server", server.address, *tls, "--token-file",
                               str(token_file), "send", "bob", "hello")
        assert from_file.returncode == 0, from_file.stderr
    with allure.step("without it, or with a wrong one: refused in one clear line, exit 4"):
        for token in ([], ["--token", "guess"]):
            for args in (["send", "mallory", "hello"], ["status", "alice"]):
                result = run_client("--server", server.address, *tls, *token, *args)
                assert result.returncode == 4
                assert result.stderr == ("error: the server refused the call: it needs the right "
                                         "access token (--token, --token-file or "
                                         "PRESENCE_TOKEN)\n")
    with allure.step("health checks need no token; the token never reaches the log"):
        credentials = grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=DEADLINE)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate() == 0
        assert "mallory" not in "\n".join(server.log), "the refused write changed nothing"
        assert "s3cret" not in "\n".join(server.log)


@allure.feature("Security")
@allure.story("Access token")
def test_public_reads_let_reads_through_without_the_token_but_not_writes(make_server):
    server = make_server(security=presence.Security(token="t0ken", public_reads=True))
    with connect(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        write = rpc_error(send, stub, "eve", "hello")
        assert write.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in write.details()
        token = (("authorization", "Bearer t0ken"),)
        stub.SendMessage(pb.MessageRequest(client_id="eve", message="hello"), metadata=token)
        assert stub.CountClients(pb.CountClientsRequest()).connected == 1
        assert stub.GetClientStatus(pb.ClientStatusRequest()).statuses == {"eve": "connected"}
        watch = Watch(stub)
        assert list(watch.snapshot()[0]) == ["eve"]
        watch.call.cancel()


@allure.feature("Operations")
@allure.story("Limits")
def test_leases_longer_than_max_lease_are_refused(make_server, tmp_path):
    server = make_server(max_lease=60)
    with connect(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        error = rpc_error(hello, stub, "a", "s", 61)
        assert (error.code(), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds must be at most 60, got 61")
        assert hello(stub, "a", "s", 60).client.sessions[0].HasField("expires_at")


# --- metrics ------------------------------------------------------------------------------


@allure.feature("Operations")
@allure.story("Metrics")
def test_metrics_port_exposes_users_sessions_watchers_rpcs_latency_and_commit_time(
        server_processes, sqlite_url):
    server = server_processes("--store", sqlite_url, "--metrics-port", "0")
    url = server.wait_for_log(r"metrics on (http://\S+/metrics)").group(1)
    with connect(server.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        hello(stub, "alice", "tty1")
        hello(stub, "alice", "tty2")
        rpc_error(send, stub, "alice", "howdy")
        watch = Watch(stub)
        watch.snapshot()
        samples = scrape(url)
        watch.call.cancel()
    assert samples[("presence_connected_users", ())] == 1
    assert samples[("presence_live_sessions", ())] == 2
    assert samples[("presence_watchers", ())] == 1
    assert samples[("presence_rpcs_total", (("code", "OK"), ("method", "SendMessage")))] == 2
    assert samples[("presence_rpcs_total",
                    (("code", "INVALID_ARGUMENT"), ("method", "SendMessage")))] == 1
    assert samples[("presence_rpc_seconds_count", (("method", "SendMessage"),))] == 3
    assert samples[("presence_store_commit_seconds_count", ())] >= 1
