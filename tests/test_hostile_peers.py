"""Hostile peers: streams that never send their request, too many streams on one connection,
metadata that is not UTF-8 and frames grpcio itself refuses. Each runs against a real server
over a raw HTTP/2 connection (tests/raw_http2.py), since a gRPC client refuses to send them,
and checks that an authorised caller is still answered.
"""

import re

import allure
import grpc
import h2.errors
import h2.settings
import pytest
from grpc import _server as grpc_internals
from raw_http2 import RawConnection, grpc_frame, gzipped

import server as presence
from conftest import ROOT, connect
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

pytestmark = [allure.feature("Hostile peers")]

TOKEN = "s3cret-Tok3n"
BEARER = ("authorization", f"Bearer {TOKEN}".encode())
SEND = "/client_service.ClientService/SendMessage"
COUNT = "/client_service.ClientService/CountClients"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HELLO = pb.MessageRequest(client_id="alice", message="hello").SerializeToString()
CALL_DEADLINE = 5.0
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAUTHENTICATED = 4, 8, 12, 13, 16


def authorised_hello(address):
    """An ordinary client's call with the token; it must succeed within the call deadline."""
    with connect(address) as channel:
        reply = pb_grpc.ClientServiceStub(channel).SendMessage(
            pb.MessageRequest(client_id="alice", message="hello"), metadata=(BEARER,),
            timeout=CALL_DEADLINE)
    assert reply.success


def threads_of(process):
    """How many threads a process runs now."""
    with open(f"/proc/{process.pid}/status") as status:
        return int(re.search(r"^Threads:\s+(\d+)", status.read(), re.MULTILINE).group(1))


@pytest.fixture
def guarded_server():
    """An in-process server with the token and a short request timeout."""
    server = presence.create_server("127.0.0.1:0", presence.MemoryStore(), request_timeout=0.5,
                                    max_streams_per_connection=3,
                                    security=presence.Security(token=TOKEN))
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(0)


# --- requests that never arrive ----------------------------------------------------------


@allure.story("A request that does not arrive is ended")
@pytest.mark.parametrize("sent", [b"", grpc_frame(HELLO)[:8]], ids=["headers only",
                                                                     "part of the body"])
def test_a_request_that_does_not_arrive_within_the_timeout_ends_deadline_exceeded(
        guarded_server, sent):
    with RawConnection(guarded_server) as connection:
        stream = connection.open(SEND, [BEARER])
        if sent:
            connection.send(stream, sent, end=False)
        answer = connection.wait(stream)
    assert (answer.status, answer.message) == (
        DEADLINE_EXCEEDED, "the request did not arrive within 0.5 s")
    authorised_hello(guarded_server)


@allure.story("A request that does not arrive is ended")
def test_a_unary_call_ended_without_a_request_is_unimplemented(guarded_server):
    with RawConnection(guarded_server) as connection:
        stream = connection.open(SEND, [BEARER])
        connection.send(stream, b"")
        answer = connection.wait(stream)
    assert (answer.status, answer.message) == (
        UNIMPLEMENTED, "a unary call needs exactly one request message")


@allure.story("An unauthenticated call holds nothing")
def test_a_call_without_the_token_is_refused_before_its_body_arrives(server_processes):
    server = server_processes("--store", "memory://", "--token", TOKEN, "--request-timeout", "60")
    with RawConnection(server.address) as connection:
        answer = connection.wait(connection.open(SEND), timeout=CALL_DEADLINE)
    assert answer.status == UNAUTHENTICATED
    assert "authorization: Bearer <token>" in answer.message


@allure.story("No one can hold what others need")
@pytest.mark.parametrize("headers", [[], [BEARER]], ids=["without the token", "with the token"])
def test_header_only_streams_hold_no_thread_and_no_slot(server_processes, headers):
    server = server_processes("--store", "memory://", "--token", TOKEN, "--request-timeout", "60",
                              "--max-concurrent-rpcs", "20", "--max-watchers", "200")
    idle = threads_of(server.process)
    connections = [RawConnection(server.address) for _ in range(3)]
    try:
        with allure.step("297 streams on 3 connections send headers and never a body"):
            streams = [(connection, connection.open(SEND, headers))
                       for connection in connections for _ in range(99)]
        with allure.step("each connection still serves a call after its held streams"):
            for connection in connections:
                assert connection.call(SEND, HELLO, [BEARER]).status == 0
        with allure.step("the calls without the token were refused at once"):
            if not headers:
                assert {connection.wait(stream).status
                        for connection, stream in streams} == {UNAUTHENTICATED}
        with allure.step("an authorised caller is answered, and the attack holds no thread"):
            authorised_hello(server.address)
            assert threads_of(server.process) < idle + 20
    finally:
        for connection in connections:
            connection.close()


@allure.story("No one can hold what others need")
def test_reflection_streams_that_send_nothing_never_take_the_calls_threads(server_processes):
    server = server_processes("--store", "memory://", "--token", TOKEN, "--workers", "2",
                              "--max-watchers", "1")
    with RawConnection(server.address) as connection:
        with allure.step("reflection streams (open without the token) that send nothing"):
            held = [connection.open(REFLECTION) for _ in range(2)]
            extra = connection.wait(connection.open(REFLECTION))
        assert (extra.status, extra.message) == (
            RESOURCE_EXHAUSTED, "too many calls at once (limit 2); try again later")
        authorised_hello(server.address)
        assert not any(connection.answers[stream].ended for stream in held)


@allure.story("No one can hold what others need")
def test_one_connection_holds_at_most_max_streams_per_connection(guarded_server):
    limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    with RawConnection(guarded_server) as connection:
        assert connection.server_settings()[limit] == 3
        connection.ignore_stream_limit()
        held = [connection.open(SEND, [BEARER]) for _ in range(3)]
        extra = connection.wait(connection.open(SEND, [BEARER]))
        assert extra.reset == h2.errors.ErrorCodes.REFUSED_STREAM
        assert [connection.wait(stream).status for stream in held] == [DEADLINE_EXCEEDED] * 3
    authorised_hello(guarded_server)


@allure.story("The gate's grpcio internals")
def test_the_grpcio_internals_the_call_gate_drives_are_still_there():
    """CallGate drives grpc._server's private functions; another grpcio must be checked."""
    pinned = re.search(r"^grpcio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert grpc.__version__ == pinned.group(1), (
        f"grpcio {grpc.__version__} is not the pinned {pinned.group(1)}: check that CallGate "
        "still matches grpc/_server.py (_handle_unary_unary, _unary_request, _abort)")
    for name in ("_unary_response_in_pool", "_stream_response_in_pool", "_receive_message",
                 "_abort", "_is_rpc_state_active", "_RECEIVE_MESSAGE_TOKEN"):
        assert hasattr(grpc_internals, name), name
    assert grpc_internals._unary_request(None, None, None).__name__ == "unary_request"


# --- metadata that is not UTF-8 ----------------------------------------------------------


@allure.story("Tokens never reach a log")
def test_an_authorization_value_that_is_not_utf8_never_reaches_the_log(server_processes):
    server = server_processes("--store", "memory://", "--token", TOKEN, "--log-level", "DEBUG")
    with RawConnection(server.address) as connection:
        with allure.step("50 calls whose authorization value ends in a byte that is not UTF-8"):
            for _ in range(50):
                answer = connection.call(COUNT, b"", [("authorization",
                                                       f"Bearer {TOKEN}".encode() + b"\xff")])
                assert answer.status == UNAUTHENTICATED
        with allure.step("the server still serves its authorised callers"):
            authorised_hello(server.address)
    server.wait_for_log(r"1 metadata values were not UTF-8 \(their values are not logged")
    server.wait_for_log("alice: connected")
    log = "\n".join(server.log)
    assert TOKEN not in log
    assert "Traceback" not in log
    assert len([line for line in server.log if "not UTF-8" in line]) == 1


# --- frames grpcio answers before our code runs ------------------------------------------


MALFORMED = [
    ("a compressed flag with no encoding", {"body": HELLO, "compressed": True},
     "Compression bit set but no encoding configured"),
    ("a broken gzip body", {"body": b"not gzip at all", "compressed": True, "encoding": "gzip"},
     "Decompression failed"),
    ("an unknown grpc-encoding", {"body": HELLO, "compressed": True, "encoding": "snappy"},
     "Error parsing 'grpc-encoding' metadata"),
]


@allure.story("Malformed frames")
@pytest.mark.parametrize("what, frame, details", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_frame_is_answered_by_grpcio_and_the_server_keeps_serving(
        server_processes, what, frame, details):
    server = server_processes("--store", "memory://", "--token", TOKEN)
    with RawConnection(server.address) as connection:
        answer = connection.call(SEND, frame["body"], [BEARER], frame["compressed"],
                                 frame.get("encoding"))
        assert (answer.status, answer.message.startswith(details)) == (INTERNAL, True), (
            answer.status, answer.message)
        with allure.step("the same connection still serves a plain call"):
            assert connection.call(SEND, HELLO, [BEARER]).status == 0
    with allure.step("a new connection serves a gzip call and an ordinary client"):
        with RawConnection(server.address) as connection:
            assert connection.call(SEND, gzipped(HELLO), [BEARER], True, "gzip").status == 0
        authorised_hello(server.address)
