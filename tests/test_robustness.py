"""Robustness and faults: fuzzed and malformed requests to every RPC, junk connections on the
port, kill -9 at random moments, SIGTERM under load, a full disk and unusable databases.

Everything talks to a real server over real gRPC (in-process, or `python server.py` as a
subprocess); nothing is mocked and nothing sleeps: waits are for a log line, a reply, an event,
each with a deadline.
"""

import base64
import operator
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from typing import NamedTuple

import allure
import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument as HypothesisInvalidArgument

import server as presence
from conftest import DEADLINE, LISTENING, ROOT, ServerProcess, Watch, connect
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

pytestmark = [allure.feature("Robustness")]

SERVICE = "/client_service.ClientService/"
CALL_DEADLINE = 5.0  # per call: a hang fails as DEADLINE_EXCEEDED, which no property allows
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_REQUEST = presence.DEFAULT_MAX_REQUEST_BYTES
MAX_LEASE = presence.DEFAULT_MAX_LEASE
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # ids hold no control characters (Cc)
BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")  # nor bidirectional overrides or isolates
STOPPED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

FUZZ = settings(max_examples=150, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


def brief(value, limit=300):
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --- one in-process server for the fuzzing ------------------------------------------------


class FuzzTarget:
    """A started memory-store server, a stub on it, and the checks run after every example."""

    def __init__(self):
        self.server = presence.create_server("127.0.0.1:0", presence.MemoryStore())
        self.server.start()
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = connect(self.address)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.revision = 0
        self.pokes = 0

    def raw(self, method):
        """The method taking and giving bytes, so any bytes can be sent as its request."""
        if method == "Watch":
            return self.channel.unary_stream(SERVICE + method, request_serializer=None,
                                             response_deserializer=None)
        return self.channel.unary_unary(SERVICE + method, request_serializer=None,
                                        response_deserializer=None)

    def poke(self):
        """A change, so a watcher resuming at the current revision has something to get."""
        self.pokes += 1
        self.stub.SendMessage(pb.MessageRequest(client_id=f"poke-{self.pokes}", message="hello"),
                              timeout=CALL_DEADLINE)

    def still_serves(self):
        """A plain hello still works, and the counts are consistent and never go back."""
        reply = self.stub.SendMessage(pb.MessageRequest(client_id="canary", message="hello"),
                                      timeout=CALL_DEADLINE)
        assert reply.success and reply.client.status == pb.STATUS_CONNECTED
        counts = self.stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
        assert counts.total == counts.connected + counts.disconnected
        assert counts.connected >= 1 and counts.live_sessions >= counts.connected
        assert counts.revision >= self.revision, "the server-wide revision went backwards"
        self.revision = counts.revision

    def close(self):
        self.channel.close()
        self.server.stop(0)


@pytest.fixture(scope="module")
def target():
    target = FuzzTarget()
    yield target
    target.close()


def outcome(method, request):
    """The reply to one call with a deadline, or the RpcError it ended with."""
    try:
        return method(request, timeout=CALL_DEADLINE)
    except grpc.RpcError as error:
        return error


def first_watch_answer(target, start, request):
    """The first message of a Watch (or its error, or None if it ended empty); then cancel.

    A watcher resuming at the current revision has nothing to send until the next change,
    so when nothing comes quickly the test makes one.
    """
    call = start(request, timeout=CALL_DEADLINE)
    answers = queue.Queue()

    def read():
        try:
            answers.put(next(call))
        except StopIteration:
            answers.put(None)
        except grpc.RpcError as error:
            answers.put(error)

    threading.Thread(target=read, daemon=True).start()
    try:
        for _ in range(int(CALL_DEADLINE / 0.2)):
            try:
                return answers.get(timeout=0.2)
            except queue.Empty:
                target.poke()
        raise AssertionError(f"no answer to Watch({brief(request)}) within the deadline")
    finally:
        call.cancel()


def record(outcome_name):
    """Count an outcome in Hypothesis' statistics (--hypothesis-show-statistics)."""
    with suppress(HypothesisInvalidArgument):  # a plain test, not a Hypothesis one
        event(outcome_name)


def assert_documented(answer, request):
    """The property of every call: success, or a documented code with a reason."""
    record(answer.code().name if isinstance(answer, grpc.RpcError) else "OK")
    if isinstance(answer, grpc.RpcError):
        assert answer.code() in DOCUMENTED, (
            f"{answer.code().name} ({answer.details()!r}) for {brief(request)}")
        assert answer.details(), f"{answer.code().name} without details for {brief(request)}"


# --- what the README and the proto promise, request by request ------------------------------


def id_rule_broken(text, prefix=False):
    """The id rule (README, Rules): 1 to 128 characters of Unicode, not only white space (a
    prefix may be), no control characters, no bidirectional overrides or isolates."""
    return (not text or len(text) > presence.MAX_ID_LENGTH or bool(CONTROL.search(text))
            or bool(BIDI.search(text)) or (text.isspace() and not prefix))


def broken_rules(request):
    """The fields of one MessageRequest that break a rule, as words its refusal must name."""
    broken = []
    word = request.message.strip().lower()
    if word not in ("hello", "goodbye"):
        broken.append("Invalid message type")
    if id_rule_broken(request.client_id):
        broken.append("client_id")
    if request.session_id and id_rule_broken(request.session_id):
        broken.append("session_id")
    if request.lease_seconds > MAX_LEASE or (request.lease_seconds and word == "goodbye"):
        broken.append("lease_seconds")
    return broken


def assert_refused(answer, request, code, words):
    assert isinstance(answer, grpc.RpcError), (
        f"{brief(request)} should be refused with {code.name} naming one of {words}, "
        f"got {brief(answer)}")
    assert answer.code() == code, (
        f"{answer.code().name} ({brief(answer.details())}) for {brief(request)}, "
        f"expected {code.name}")
    assert any(word in answer.details() for word in words), (
        f"{brief(answer.details())} names none of {words} for {brief(request)}")


def assert_ok(answer, request):
    assert not isinstance(answer, grpc.RpcError), (
        f"{answer.code().name} ({brief(answer.details())}) for the valid {brief(request)}")


def check_send_message(request, answer):
    assert_documented(answer, request)
    if request.ByteSize() > MAX_REQUEST:
        assert_refused(answer, request, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"])
        return
    broken = broken_rules(request)
    if broken:
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT, broken)
        return
    assert_ok(answer, request)
    check_reply(request, answer)


def check_reply(request, reply):
    """A MessageResponse says what happened to the client it was about."""
    assert reply.success and reply.client.client_id == request.client_id, brief(reply)
    sessions = {session.session_id for session in reply.client.sessions}
    assert (reply.client.status == pb.STATUS_CONNECTED) == bool(sessions), brief(reply)
    if request.message.strip().lower() == "hello":
        assert request.session_id in sessions, brief(reply)
    elif request.session_id:
        assert request.session_id not in sessions, brief(reply)
    else:  # Goodbye naming no session ends every session
        assert not sessions and reply.client.status == pb.STATUS_DISCONNECTED, brief(reply)


def check_send_messages(request, answer):
    assert_documented(answer, request)
    if request.ByteSize() > MAX_REQUEST:
        assert_refused(answer, request, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"])
        return
    if len(request.requests) > presence.MAX_BATCH:
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT,
                       [f"at most {presence.MAX_BATCH} requests"])
        return
    bad = [index for index, one in enumerate(request.requests) if broken_rules(one)]
    if bad:
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT,
                       [f"requests[{index}]" for index in bad])
        return
    assert_ok(answer, request)
    assert len(answer.responses) == len(request.requests)
    for one, reply in zip(request.requests, answer.responses, strict=True):
        assert reply.success and reply.client.client_id == one.client_id


def check_get_client_status(request, answer):
    assert_documented(answer, request)
    client_id = request.client_id
    if request.ByteSize() > MAX_REQUEST:
        assert_refused(answer, request, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"])
    elif not client_id:
        assert_ok(answer, request)
        assert set(answer.statuses.values()) <= {"connected", "disconnected"}
    elif id_rule_broken(client_id):
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT, ["client_id"])
    elif isinstance(answer, grpc.RpcError):
        assert answer.code() == grpc.StatusCode.NOT_FOUND, brief(answer.details())
        assert answer.details() == f"Client {client_id} not found"
    else:
        assert list(answer.statuses) == [client_id]
        assert answer.statuses[client_id] in ("connected", "disconnected")
        assert [client.client_id for client in answer.clients] == [client_id]


def check_list_clients(request, answer):
    assert_documented(answer, request)
    if request.ByteSize() > MAX_REQUEST:
        assert_refused(answer, request, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"])
        return
    broken = []
    if request.page_size < 0:
        broken.append("page_size")
    if request.id_prefix and id_rule_broken(request.id_prefix, prefix=True):
        broken.append("id_prefix")
    if request.status not in (pb.STATUS_UNSPECIFIED, pb.STATUS_CONNECTED,
                              pb.STATUS_DISCONNECTED):
        broken.append("status")
    if broken:
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT,
                       broken + ["page_token"] if request.page_token else broken)
        return
    if request.page_token and not issued_token(request.page_token):
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
        return
    if isinstance(answer, grpc.RpcError):  # only a token this server never issued may fail
        assert request.page_token, brief(answer.details())
        assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
        return
    ids = [client.client_id for client in answer.clients]
    assert len(ids) <= min(request.page_size or presence.DEFAULT_PAGE_SIZE,
                           presence.MAX_PAGE_SIZE)
    assert ids == sorted(set(ids)), "a page is ordered by id, without repeats"
    assert all(client_id.startswith(request.id_prefix) for client_id in ids)
    if request.status:
        assert {client.status for client in answer.clients} <= {request.status}


def issued_token(token):
    """Whether token is exactly what the server issues for some id: base64url of its UTF-8."""
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, UnicodeError):
        return False
    return bool(text) and base64.urlsafe_b64encode(text.encode()).decode() == token


def check_watch(request, first):
    assert_documented(first, request)
    if request.since_revision < 0:
        assert_refused(first, request, grpc.StatusCode.INVALID_ARGUMENT, ["since_revision"])
        return
    assert isinstance(first, pb.WatchResponse), f"{brief(first)} for {brief(request)}"
    if request.since_revision == 0:
        assert not first.resync and not first.events
        assert first.snapshot_complete or first.snapshot
    elif first.events:
        revisions = [event.revision for event in first.events]
        first_missed = request.since_revision + 1  # exactly the changes it missed
        assert revisions == list(range(first_missed, first_missed + len(revisions)))
    else:
        assert first.resync, "a watcher resuming from a revision gets events or a resync"


# --- strategies ---------------------------------------------------------------------------

CHARACTERS = st.characters(codec="utf-8")  # every code point but the surrogates
ANY_TEXT = st.one_of(
    st.text(),  # any Unicode, control characters included, mostly short
    st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=140),
    st.builds(operator.mul, CHARACTERS, st.integers(100, 70_000)),  # very long
    st.sampled_from(["", " ", "\x00", "\t", "\x7f", "\x85", "\u200b", "\ufeff", "\U0010ffff",
                     "🙂", "a" * 128, "a" * 129, "é" * 128, "é" * 129, "%", "%00", "\\",
                     "\u3000 ", "\u202eevil", "a\u2066b", "\u2069"]),
)
KNOWN_IDS = st.sampled_from(["alice", "bob", "Ωmega", "日本", "a" * 128, "canary"])
CLIENT_IDS = st.one_of(KNOWN_IDS, ANY_TEXT)
WHITE = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000"), max_size=3)
WORDS = st.builds(lambda before, word, upper, after: before + (word.upper() if upper else word)
                  + after, WHITE, st.sampled_from(["hello", "goodbye"]), st.booleans(), WHITE)
MESSAGES = st.one_of(WORDS, ANY_TEXT)
UINT32 = st.one_of(st.just(0), st.integers(1, 60), st.integers(MAX_LEASE - 2, MAX_LEASE + 2),
                   st.integers(0, 2**32 - 1))
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)

VALID_REQUESTS = st.builds(
    pb.MessageRequest, client_id=KNOWN_IDS, message=WORDS,
    session_id=st.sampled_from(["", "tty1", "phone"]))
MESSAGE_REQUESTS = st.one_of(
    st.builds(pb.MessageRequest, client_id=CLIENT_IDS, message=MESSAGES,
              session_id=st.one_of(st.just(""), st.sampled_from(["tty1", "phone"]), ANY_TEXT),
              lease_seconds=UINT32),
    # mostly valid, so the accepting paths get their share of the examples
    st.builds(pb.MessageRequest,
              client_id=st.one_of(KNOWN_IDS, st.text(st.characters(
                  codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=128)),
              message=WORDS, session_id=st.sampled_from(["", "tty1", "phone", "Ω"]),
              lease_seconds=st.one_of(st.just(0), st.integers(0, MAX_LEASE))),
)


def repeated(parts, count):
    return (parts * (count // len(parts) + 1))[:count]


BATCHES = st.one_of(
    st.lists(MESSAGE_REQUESTS, max_size=8),
    st.lists(VALID_REQUESTS, max_size=8),
    st.lists(VALID_REQUESTS, max_size=3),
    # now and then a big one, around the limit of 1000, built by repeating a few requests
    st.builds(repeated, st.lists(st.one_of(VALID_REQUESTS, MESSAGE_REQUESTS), min_size=1,
                                 max_size=3), st.integers(990, 1100)),
).map(lambda requests: pb.SendMessagesRequest(requests=requests))
PAGE_TOKENS = st.one_of(  # random text, and tokens shaped like the server's (base64 of an id)
    st.just(""), ANY_TEXT,
    ANY_TEXT.map(lambda text: base64.urlsafe_b64encode(text.encode()).decode()))
LIST_REQUESTS = st.builds(
    pb.ListClientsRequest,
    page_size=st.one_of(st.integers(-2, 1002), INT32),
    page_token=PAGE_TOKENS,
    status=st.one_of(st.sampled_from([0, 1, 2, 3, -1]), INT32),
    id_prefix=st.one_of(st.just(""), st.sampled_from(["a", "al", "日"]), ANY_TEXT))
WATCH_REQUESTS = st.builds(pb.WatchRequest,
                           since_revision=st.one_of(st.integers(-2, 400), INT64))


# --- 1. fuzzed requests to every RPC ------------------------------------------------------


def raw_outcome(target, method, data):
    """Send data as the serialized request; the answer parsed, or the RpcError."""
    call = target.raw(method)
    answer = first_watch_answer(target, call, data) if method == "Watch" else outcome(call, data)
    if isinstance(answer, bytes):
        return RESPONSE_TYPES[method].FromString(answer)
    return answer

def check_raw(target, method, data):
    answer = raw_outcome(target, method, data)
    try:
        request = REQUEST_TYPES[method].FromString(data)
    except DecodeError:
        assert isinstance(answer, grpc.RpcError), f"{method}({data!r}) parsed nowhere but here"
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (
            f"{method}({data!r}): {answer.code().name} {answer.details()!r}")
        assert answer.details().startswith(
            f"the request is not a valid {REQUEST_TYPES[method].__name__}"), answer.details()
    else:
        if method == "CountClients":
            assert_ok(answer, data)
            assert answer.total == answer.connected + answer.disconnected
        else:
            CHECKS[method](request, answer)
    target.still_serves()

def mutate(data, position, cut, insert):
    """A valid request's bytes with a few bytes replaced and the tail maybe cut."""
    position %= len(data) + 1
    return (data[:position] + insert + data[position + len(insert):])[:len(data) + 4 - cut]

def raw_requests(method):
    valid = VALID_BYTES[method].map(lambda request: request.SerializeToString())
    return st.one_of(
        st.binary(max_size=200),
        valid,
        st.builds(mutate, valid.filter(bool), st.integers(0, 200), st.integers(0, 6),
                  st.binary(min_size=1, max_size=4)),
    )

class SteadyClient:
    """A normal client calling in a thread, each call with its own deadline, until stopped."""

    def __init__(self, address):
        self.latencies, self.failures = [], []
        self._channel = connect(address)
        self._stub = pb_grpc.ClientServiceStub(self._channel)
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            n += 1
            client_id = f"steady-{n}"
            started = time.monotonic()
            try:
                reply = self._stub.SendMessage(
                    pb.MessageRequest(client_id=client_id, message="hello"), timeout=CALL_DEADLINE)
                assert reply.success
                statuses = self._stub.GetClientStatus(
                    pb.ClientStatusRequest(client_id=client_id), timeout=CALL_DEADLINE).statuses
                assert statuses == {client_id: "connected"}
            except (grpc.RpcError, AssertionError) as error:
                self.failures.append(f"call {n}: {error!r}")
            with self._done:
                self.latencies.append(time.monotonic() - started)
                self._done.notify_all()

    def wait_for_calls(self, count):
        """Wait until count more calls have finished."""
        with self._done:
            wanted = len(self.latencies) + count
            assert self._done.wait_for(lambda: len(self.latencies) >= wanted, DEADLINE * 2), (
                f"only {len(self.latencies)} of {wanted} calls finished")

    def stop(self):
        self._stop.set()
        self._thread.join(DEADLINE)
        self._channel.close()

def open_junk(port, rng, count):
    """count raw sockets of each kind: garbage, half a preface, silence, stalled HTTP/2."""
    junk = {"garbage": [], "partial preface": [], "silent": [], "preface then stall": [],
            "half a frame": []}
    for _ in range(count):
        for kind, sockets in junk.items():
            sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            if kind == "garbage":
                garbage = rng.randbytes(rng.randint(1, 4096))
                sock.sendall(bytes([garbage[0] ^ 0x80]) + garbage[1:])  # never starts with "P"
            elif kind == "partial preface":
                sock.sendall(PREFACE[:rng.randint(1, len(PREFACE) - 1)])
            elif kind == "preface then stall":
                sock.sendall(PREFACE + EMPTY_SETTINGS)
            elif kind == "half a frame":
                sock.sendall(PREFACE + EMPTY_SETTINGS + HALF_A_FRAME)
            sockets.append(sock)
    return junk

def hung_up(sock):
    """Whether the server closes this connection within the deadline."""
    sock.settimeout(DEADLINE)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True

class Op(NamedTuple):
    """One Hello or Goodbye as a writer sends it."""

    client_id: str
    message: str
    session_id: str = ""
    lease: int = 0

    def request(self):
        return pb.MessageRequest(client_id=self.client_id, message=self.message,
                                 session_id=self.session_id, lease_seconds=self.lease)

class Known(NamedTuple):
    """What the server holds for a client: its live sessions (None: unknown) and revision."""

    sessions: frozenset | None
    revision: int

def after(sessions, op):
    """The live sessions after op (a Goodbye naming no session ends all of them)."""
    current = sessions or frozenset()
    if op.message == "hello":
        return current | {op.session_id}
    return current - {op.session_id} if op.session_id else frozenset()

def known_from(client):
    return Known(frozenset(session.session_id for session in client.sessions), client.revision)

def observe(stub, client_id):
    """What the server says about one client now."""
    try:
        reply = stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id),
                                     timeout=CALL_DEADLINE)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        return UNKNOWN
    client = reply.clients[0]
    known = known_from(client)
    assert (client.status == pb.STATUS_CONNECTED) == bool(known.sessions), brief(client)
    assert reply.statuses[client_id] == ("connected" if known.sessions else "disconnected")
    return known

class Tally:
    """Acknowledged changes across writers, so the test can wait for a number of them."""

    def __init__(self):
        self.count = 0
        self.revision = 0
        self._changed = threading.Condition()

    def add(self, count, revision):
        with self._changed:
            self.count += count
            self.revision = max(self.revision, revision)
            self._changed.notify_all()

    def wait_for(self, count):
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count, DEADLINE), (
                f"only {self.count} of {count} changes acknowledged within the deadline")

class Writer:
    """A thread writing Hellos and Goodbyes (default and named sessions, leases, now and then
    a batch) to its own clients until a call fails. It records the state every acknowledged
    reply left, and the single call in flight whose answer never came."""

    SESSIONS = ("", "tty1", "tty2", "phone")

    def __init__(self, stub, client_ids, state, rng, tally):
        self.state = {client_id: state.get(client_id, UNKNOWN) for client_id in client_ids}
        self.in_flight = []
        self.errors = []
        self.surprises = []
        self.stopping = threading.Event()  # set: end after the call in flight
        self._stub, self._ids, self._rng, self._tally = stub, client_ids, rng, tally
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def join(self):
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "a writer is stuck in a call"

    def _op(self):
        rng = self._rng
        client_id, session = rng.choice(self._ids), rng.choice(self.SESSIONS)
        roll = rng.random()
        if roll < 0.55:
            return Op(client_id, "hello", session, rng.choice([0, 0, 600, MAX_LEASE]))
        if roll < 0.8:
            return Op(client_id, "goodbye", session)
        return Op(client_id, "goodbye")

    def _run(self):
        while not self.stopping.is_set():
            ops = [self._op() for _ in range(self._rng.randint(2, 4))] if (
                self._rng.random() < 0.1) else [self._op()]
            self.in_flight = ops
            try:
                if len(ops) == 1:
                    replies = [self._stub.SendMessage(ops[0].request(), timeout=CALL_DEADLINE)]
                else:
                    replies = self._stub.SendMessages(pb.SendMessagesRequest(
                        requests=[op.request() for op in ops]), timeout=CALL_DEADLINE).responses
            except grpc.RpcError as error:
                self.errors.append(error)
                return
            for op, reply in zip(ops, replies, strict=True):
                known = known_from(reply.client)
                expected = after(self.state[op.client_id].sessions, op)
                if known.sessions != expected:
                    self.surprises.append(f"{op} left {set(known.sessions)}, not {set(expected)}")
                self.state[op.client_id] = known
            self.in_flight = []
            self._tally.add(len(ops), max(reply.client.revision for reply in replies))

    def check_survived(self, observed):
        """Every acknowledged change is there; the call in flight is there wholly or not at all."""
        lost = [f"{client_id}: acknowledged {self.state[client_id]}, found {observed[client_id]}"
                for client_id in self._ids
                if client_id not in {op.client_id for op in self.in_flight}
                and observed[client_id] != self.state[client_id]]
        assert not lost, f"{len(lost)} acknowledged changes lost: {lost[:3]}"
        if not self.in_flight:
            return "nothing in flight"
        before = {op.client_id: self.state[op.client_id] for op in self.in_flight}
        applied = {op.client_id: self.state[op.client_id].sessions for op in self.in_flight}
        for op in self.in_flight:
            applied[op.client_id] = after(applied[op.client_id], op)
        untouched = all(observed[client_id] == known for client_id, known in before.items())
        committed = all(observed[client_id].sessions == sessions
                        and observed[client_id].revision >= before[client_id].revision
                        for client_id, sessions in applied.items())
        assert untouched or committed, (
            f"the call in flight {self.in_flight} was half applied: before {before}, "
            f"after it {applied}, found { {cid: observed[cid] for cid in before} }")
        return ("in flight, committed" if committed and not untouched else
                "in flight, not committed" if untouched and not committed else
                "in flight, either way")

def start_writers(address, client_ids, state, rng, tally, count):
    """count writers on one channel, each with its own clients and its own random stream."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ClientServiceStub(channel)
    share = len(client_ids) // count
    writers = [Writer(stub, client_ids[n * share:(n + 1) * share], state,
                      random.Random(rng.random()), tally).start() for n in range(count)]
    return channel, writers

def observe_all(address, client_ids):
    """Every client's state and the server-wide revision, as the server reports them."""
    with connect(address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        observed = {client_id: observe(stub, client_id) for client_id in client_ids}
        revision = stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE).revision
    return observed, revision

def replay_seed(name):
    """A fresh seed, or the one given in the environment to replay a failure; attached."""
    seed = int(os.environ.get("ROBUSTNESS_SEED") or random.SystemRandom().randrange(2**32))
    allure.attach(f"{seed}\nreplay: ROBUSTNESS_SEED={seed} pytest -k {name}", "seed")
    print(f"seed {seed} (replay with ROBUSTNESS_SEED={seed})")
    return seed

def drain(watch):
    """Read a Watch to its end: the events it got, and None (clean end) or the RpcError."""
    events, messages = [], 0
    while True:
        message = watch.next()
        if not isinstance(message, pb.WatchResponse):
            return events, messages, message
        messages += 1
        events += message.events

@pytest.fixture
def limited_servers():
    """Start `server.py --store URL` under prlimit's file size limit; all are killed after."""
    started = []

    def start(fsize, store_url):
        started.append(ServerProcess("--store", store_url, prefix=["prlimit", f"--fsize={fsize}"]))
        return started[-1]

    yield start
    for server in started:
        server.kill()

def failed_start(store_url, *prefix, env=None):
    """Run a server that must not start; its finished process."""
    return subprocess.run(
        [*prefix, sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0",
         "--store", store_url], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE,
        env=env)

def assert_one_clear_line(result, *words):
    """Exit code 1 and one log line that says what is wrong; no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), (
        f"expected one line with {words}:\n{result.stderr}")
    assert result.returncode == 1

def write_until_refused(stub, prefix, limit=20_000):
    """Hello after hello until the server refuses one: the acknowledged ids and the refusal."""
    acked = []
    for n in range(limit):
        client_id = f"{prefix}{n}"
        try:
            reply = stub.SendMessage(pb.MessageRequest(client_id=client_id, message="hello"),
                                     timeout=CALL_DEADLINE)
        except grpc.RpcError as error:
            return acked, client_id, error
        acked.append((client_id, reply.client.revision))
    raise AssertionError(f"{limit} writes and none refused: the file size limit did nothing")

@pytest.fixture(scope="module")
def written_database(tmp_path_factory):
    """The bytes of a database a real server wrote 300 clients to, then closed cleanly."""
    path = tmp_path_factory.mktemp("written") / "connections.db"
    server = ServerProcess("--store", f"sqlite:///{path}")
    try:
        with connect(server.address) as channel:
            pb_grpc.ClientServiceStub(channel).SendMessages(pb.SendMessagesRequest(requests=[
                pb.MessageRequest(client_id=f"user{n}", message="hello") for n in range(300)]),
                timeout=CALL_DEADLINE)
        assert server.terminate() == 0
    finally:
        server.stop()
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    assert len(data) >= 3 * 4096, "expected a schema page and data pages"
    return data

def damage(path, written, how):
    rng = random.Random(how)
    if how == "a directory":
        path.mkdir()
    elif how == "random bytes":
        path.write_bytes(rng.randbytes(5000))
    elif how == "a line of text":
        path.write_bytes(b"this is not a database\n")
    elif how == "a SQLite header, then garbage":
        path.write_bytes(written[:100] + rng.randbytes(len(written) - 100))
    elif how == "an intact schema page, then garbage":
        path.write_bytes(written[:4096] + rng.randbytes(len(written) - 4096))

def everything_read(stub, watcher_snapshot):
    """What readers learn of alice by every read, with the revision each reports."""
    record = stub.GetClientStatus(pb.ClientStatusRequest(client_id="alice"),
                                  timeout=CALL_DEADLINE).clients[0]
    counts = stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
    page = stub.ListClients(pb.ListClientsRequest(), timeout=CALL_DEADLINE)
    clients, revision, _ = watcher_snapshot
    return {"status": (record.status, record.revision),
            "count": (counts.connected, counts.disconnected, counts.revision),
            "list": ([(c.client_id, c.status, c.revision) for c in page.clients], page.revision),
            "watch": ({cid: (c.status, c.revision) for cid, c in clients.items()}, revision)}


@allure.story("Fuzzed requests to every RPC")
@FUZZ
@given(request=MESSAGE_REQUESTS)
@example(request=pb.MessageRequest(client_id="alice", message=" HELLO\t", session_id="tty1",
                                   lease_seconds=MAX_LEASE))
@example(request=pb.MessageRequest(client_id="alice", message="goodbye", lease_seconds=1))
@example(request=pb.MessageRequest(client_id="x" * 70_000, message="hello"))
def test_send_message_answers_any_request_with_success_or_a_documented_refusal(target, request):
    check_send_message(request, outcome(target.stub.SendMessage, request))
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
@settings(FUZZ, max_examples=100)
@given(request=BATCHES)
@example(request=pb.SendMessagesRequest())
@example(request=pb.SendMessagesRequest(requests=[pb.MessageRequest(client_id=f"b{n}",
                                                                    message="hello")
                                                  for n in range(presence.MAX_BATCH + 1)]))
def test_send_messages_answers_any_batch_with_success_or_a_documented_refusal(target, request):
    check_send_messages(request, outcome(target.stub.SendMessages, request))
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
@FUZZ
@given(request=st.builds(pb.ClientStatusRequest, client_id=CLIENT_IDS))
@example(request=pb.ClientStatusRequest())
@example(request=pb.ClientStatusRequest(client_id="canary"))
def test_get_client_status_answers_any_id_with_success_or_a_documented_refusal(target, request):
    check_get_client_status(request, outcome(target.stub.GetClientStatus, request))
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
@FUZZ
@given(request=LIST_REQUESTS)
@example(request=pb.ListClientsRequest(page_size=-2**31, status=2**31 - 1))
@example(request=pb.ListClientsRequest(page_token="not base64!"))
@example(request=pb.ListClientsRequest(page_token="!!!"))
@example(request=pb.ListClientsRequest(page_token="é字"))
@example(request=pb.ListClientsRequest(page_token="YQ==YQ=="))
def test_list_clients_answers_any_page_request_with_success_or_a_documented_refusal(target,
                                                                                   request):
    check_list_clients(request, outcome(target.stub.ListClients, request))
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
@settings(FUZZ, max_examples=100)
@given(request=WATCH_REQUESTS)
@example(request=pb.WatchRequest(since_revision=-2**63))
@example(request=pb.WatchRequest(since_revision=2**63 - 1))
def test_watch_answers_any_start_with_a_first_message_or_a_documented_refusal(target, request):
    check_watch(request, first_watch_answer(target, target.stub.Watch, request))
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
@settings(FUZZ, max_examples=50)
@given(calls=st.lists(st.sampled_from(["SendMessage", "CountClients", "GetClientStatus"]),
                      min_size=1, max_size=5))
def test_count_clients_stays_consistent_with_the_all_clients_map_between_any_calls(target,
                                                                                   calls):
    for name in calls:
        counts = target.stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
        statuses = target.stub.GetClientStatus(pb.ClientStatusRequest(),
                                               timeout=CALL_DEADLINE).statuses
        assert counts.total == len(statuses)
        assert counts.connected == sum(word == "connected" for word in statuses.values())
        if name == "SendMessage":
            target.poke()
    target.still_serves()


@allure.story("Fuzzed requests to every RPC")
def test_a_refusal_of_a_long_message_text_stays_invalid_argument(target):
    """Other texts: INVALID_ARGUMENT `Invalid message type: <message>` (README, wire contract)."""
    request = pb.MessageRequest(client_id="alice", message="é" * 5000)
    assert request.ByteSize() < MAX_REQUEST
    answer = outcome(target.stub.SendMessage, request)
    target.still_serves()
    assert_refused(answer, request, grpc.StatusCode.INVALID_ARGUMENT, ["Invalid message type"])


# --- 2. raw bytes to every method ---------------------------------------------------------

REQUEST_TYPES = {
    "SendMessage": pb.MessageRequest, "SendMessages": pb.SendMessagesRequest,
    "GetClientStatus": pb.ClientStatusRequest, "ListClients": pb.ListClientsRequest,
    "CountClients": pb.CountClientsRequest, "Watch": pb.WatchRequest,
}
RESPONSE_TYPES = {
    "SendMessage": pb.MessageResponse, "SendMessages": pb.SendMessagesResponse,
    "GetClientStatus": pb.ClientStatusResponse, "ListClients": pb.ListClientsResponse,
    "CountClients": pb.CountClientsResponse, "Watch": pb.WatchResponse,
}
CHECKS = {
    "SendMessage": check_send_message, "SendMessages": check_send_messages,
    "GetClientStatus": check_get_client_status, "ListClients": check_list_clients,
    "Watch": check_watch,
}
MALFORMED = [
    pytest.param(b"\x08", id="truncated-varint"),
    pytest.param(b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", id="overlong-varint"),
    pytest.param(b"\n\x02\xff\xfe", id="invalid-utf8-in-field-1"),
    pytest.param(b"\x12\x03\xed\xa0\x80", id="utf8-surrogate-in-field-2"),
    pytest.param(b"\n\x05ab", id="length-past-the-end"),
    pytest.param(b"\n\xff\xff\xff\xff\x0f", id="huge-length"),
    pytest.param(b"\n", id="tag-without-length"),
    pytest.param(b"\x00", id="field-number-zero"),
    pytest.param(b"\x0f", id="wire-type-7"),
    pytest.param(b"\x0b", id="unterminated-group"),
    pytest.param(b"\x0c", id="end-group-without-start"),
    pytest.param(b"\n\x04\n\x02\xff\xfe", id="invalid-utf8-one-level-down"),
    pytest.param(b"\n\x10\n\x02ab", id="nested-length-past-the-end"),
    pytest.param(b"\xff" * 32, id="all-ones"),
]


VALID_BYTES = {
    "SendMessage": VALID_REQUESTS, "SendMessages": st.lists(VALID_REQUESTS, max_size=3).map(
        lambda requests: pb.SendMessagesRequest(requests=requests)),
    "GetClientStatus": st.builds(pb.ClientStatusRequest, client_id=KNOWN_IDS),
    "ListClients": st.builds(pb.ListClientsRequest, page_size=st.integers(0, 5),
                             id_prefix=st.sampled_from(["", "a"]),
                             status=st.sampled_from([0, 1, 2])),
    "CountClients": st.just(pb.CountClientsRequest()),
    "Watch": st.builds(pb.WatchRequest, since_revision=st.integers(0, 50)),
}


@allure.story("Raw bytes to every method")
@pytest.mark.parametrize("method", list(REQUEST_TYPES))
@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_request_bytes_are_invalid_argument_never_internal(target, method, data):
    check_raw(target, method, data)


@allure.story("Raw bytes to every method")
@pytest.mark.parametrize("method", list(REQUEST_TYPES))
def test_any_request_bytes_are_answered_ok_or_with_a_documented_refusal(target, method):
    @settings(FUZZ, max_examples=100)
    @given(data=raw_requests(method))
    def any_bytes(data):
        check_raw(target, method, data)

    any_bytes()


# --- 3. junk connections on the port ------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# a HEADERS frame on stream 1 announcing 1000 bytes, of which 10 ever come
HALF_A_FRAME = b"\x00\x03\xe8\x01\x04\x00\x00\x00\x01" + b"\x82" * 10


@allure.story("Junk connections on the port")
def test_garbage_and_half_open_connections_do_not_disturb_other_clients(presence_server, address):
    rng = random.Random(5)
    steady = SteadyClient(address)
    junk = {}
    try:
        steady.wait_for_calls(20)
        with allure.step("open 200 junk connections while the client keeps calling"):
            junk = open_junk(presence_server.port, rng, count=40)
            steady.wait_for_calls(300)
        with allure.step("the server hangs up on the garbage senders, the rest stay open"):
            kept = [hung_up(sock) for sock in junk["garbage"]]
            assert all(kept), f"{kept.count(False)} garbage connections were kept open"
            steady.wait_for_calls(100)
    finally:
        steady.stop()
        for sockets in junk.values():
            for sock in sockets:
                sock.close()
    latencies = sorted(steady.latencies)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    allure.attach(f"{len(latencies)} calls, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                  f"max {latencies[-1] * 1000:.1f} ms", "steady client latency")
    assert not steady.failures, f"{len(steady.failures)} failed calls: {steady.failures[:3]}"
    assert latencies[-1] < CALL_DEADLINE
    with allure.step("with the junk gone, a new client is served"), connect(address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        assert stub.SendMessage(pb.MessageRequest(client_id="after-junk", message="hello"),
                                timeout=CALL_DEADLINE).success


# --- writers that know what every acknowledged change left behind -------------------------


UNKNOWN = Known(None, 0)


# --- 4. kill -9 at random moments ---------------------------------------------------------


@allure.story("kill -9 at random moments")
def test_repeated_kill_9_at_random_moments_loses_no_acknowledged_change(server_processes,
                                                                        sqlite_url):
    seed = replay_seed("kill_9_at_random_moments")
    rng = random.Random(seed)
    client_ids = [f"user{n}" for n in range(48)]
    state, highest_revision, server_revision = {}, 0, 0
    server = server_processes("--store", sqlite_url)
    for cycle in range(1, 6):
        wanted = rng.randint(20, 400)
        with allure.step(f"cycle {cycle}: kill -9 after {wanted} acknowledged changes"):
            tally = Tally()
            channel, writers = start_writers(server.address, client_ids, state, rng, tally, 6)
            tally.wait_for(wanted)
            server.kill()
            for writer in writers:
                writer.join()
            channel.close()
            highest_revision = max(highest_revision, tally.revision)
            for writer in writers:
                assert not writer.surprises, writer.surprises[:3]
                codes = {error.code() for error in writer.errors}
                assert codes == {grpc.StatusCode.UNAVAILABLE}, (
                    f"seed {seed}: writers ended with {codes}, not the lost connection")
        with allure.step(f"cycle {cycle}: restart on the same file; every change is there"):
            server = server_processes("--store", sqlite_url)
            observed, revision = observe_all(server.address, client_ids)
            fates = [writer.check_survived(observed) for writer in writers]
            summary = (f"cycle {cycle}: killed after {tally.count} acknowledged changes "
                       f"(waited for {wanted}), revision {revision}; writers: "
                       + ", ".join(f"{fates.count(fate)} {fate}" for fate in sorted(set(fates))))
            allure.attach(summary, f"cycle {cycle}")
            print(summary)
            assert revision >= server_revision, (
                f"seed {seed}: the revision went back from {server_revision} to {revision}")
            assert revision >= highest_revision, (
                f"seed {seed}: revision {revision} is below the acknowledged {highest_revision}")
            assert revision >= max(known.revision for known in observed.values())
            state, server_revision = observed, revision


# --- 5. SIGTERM under load ----------------------------------------------------------------


@allure.story("SIGTERM under load")
def test_sigterm_under_load_finishes_calls_ends_watches_cleanly_and_keeps_every_change(
        server_processes, sqlite_url):
    seed = replay_seed("sigterm_under_load")
    rng = random.Random(seed)
    client_ids = [f"user{n}" for n in range(40)]
    server = server_processes("--store", sqlite_url)
    channel = connect(server.address)
    stub = pb_grpc.ClientServiceStub(channel)
    with allure.step("three watchers set up, then four writers"):
        watchers = [Watch(stub) for _ in range(3)]
        since = [watcher.snapshot()[1] for watcher in watchers]
        tally = Tally()
        writer_channel, writers = start_writers(server.address, client_ids, {}, rng, tally, 4)
        tally.wait_for(rng.randint(100, 300))
    with allure.step("SIGTERM while writing, with two more watchers just starting"):
        late = [Watch(stub) for _ in range(2)]
        acknowledged = tally.revision
        assert server.terminate(signal.SIGTERM) == 0
        server.wait_for_log(r"store .* flushed and closed")
        server.wait_for_log(r": stopped$")
        assert not [line for line in server.log if "Traceback" in line or " ERROR " in line]
    with allure.step("every write succeeded, or failed as the server went away"):
        for writer in writers:
            writer.join()
            assert not writer.surprises, writer.surprises[:3]
            codes = {error.code() for error in writer.errors}
            assert codes <= set(STOPPED), f"seed {seed}: writes failed with {writer.errors}"
        writer_channel.close()
    with allure.step("watchers that were set up ended cleanly, with no change skipped"):
        for watcher, start in zip(watchers, since, strict=True):
            events, _, end = drain(watcher)
            assert end is None, f"a set-up watcher ended with {end!r}"
            revisions = [event.revision for event in events]
            assert revisions == list(range(start + 1, start + 1 + len(revisions)))
            assert revisions[-1] >= acknowledged, "a change acknowledged before SIGTERM is missing"
        late_ends = []
        for watcher in late:
            _, messages, end = drain(watcher)
            assert end is None or (not messages and end.code() in STOPPED), (
                f"a late watcher ended with {end!r} after {messages} messages")
            late_ends.append(f"{messages} messages, then {end.code().name if end else 'OK'}")
    endings = sorted(f"{error.code().name} ({error.details()})"
                     for writer in writers for error in writer.errors)
    summary = (f"SIGTERM after {tally.count} acknowledged changes; writers ended with "
               f"{endings}; late watchers: {late_ends}")
    allure.attach(summary, "what the clients saw")
    print(summary)
    channel.close()
    with allure.step("after a restart every acknowledged change is there"):
        again = server_processes("--store", sqlite_url)
        observed, revision = observe_all(again.address, client_ids)
        for writer in writers:
            writer.check_survived(observed)
        assert revision >= tally.revision


# --- 6. a full disk and unusable databases ------------------------------------------------


FULL_DISK_LIMIT = 256 * 1024  # room for the schema and some dozens of commits in the WAL


@allure.story("Full disk and unusable database")
def test_full_disk_at_start_is_one_clear_line_and_exit_1(tmp_path):
    path = tmp_path / "fresh.db"
    # Not measured under make coverage: a process that may write no file cannot save its data.
    unmeasured = {name: value for name, value in os.environ.items()
                  if not name.startswith("COVERAGE_")}
    result = failed_start(f"sqlite:///{path}", "prlimit", "--fsize=0", env=unmeasured)
    assert_one_clear_line(result, "cannot start", "cannot open SQLite database", str(path))


@allure.story("Full disk and unusable database")
@pytest.mark.parametrize("how", [
    "a directory", "random bytes", "a line of text", "a SQLite header, then garbage",
    "an intact schema page, then garbage",
])
def test_unusable_database_file_is_one_clear_line_and_exit_1(tmp_path, written_database, how):
    path = tmp_path / "connections.db"
    damage(path, written_database, how)
    result = failed_start(f"sqlite:///{path}")
    assert_one_clear_line(result, "cannot start", str(path))


@allure.story("Full disk and unusable database")
def test_disk_full_mid_run_refuses_writes_clearly_keeps_reads_and_loses_nothing_acknowledged(
        limited_servers, server_processes, sqlite_url):
    with allure.step(f"start under a file size limit of {FULL_DISK_LIMIT} bytes"):
        server = limited_servers(FULL_DISK_LIMIT, sqlite_url)
        address = "{}:{}".format(*server.wait_for_log(LISTENING).groups())
    with connect(address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        with allure.step("write until the store cannot grow"):
            acked, refused_id, refusal = write_until_refused(stub, "c")
            assert len(acked) >= 10, "the server should start and take writes first"
            assert refusal.code() == grpc.StatusCode.UNAVAILABLE, refusal.details()
            assert "the store could not save the change" in refusal.details()
            server.wait_for_log("SQLite commit failed")
        with allure.step("the process lives on and answers reads"):
            assert server.process.poll() is None
            for client_id, revision in (acked[0], acked[-1]):
                reply = stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id),
                                             timeout=CALL_DEADLINE)
                assert reply.statuses == {client_id: "connected"}
                assert reply.clients[0].revision == revision
            counts = stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
            assert counts.connected >= len(acked)
            statuses = stub.GetClientStatus(pb.ClientStatusRequest(), timeout=CALL_DEADLINE)
            assert {client_id for client_id, _ in acked} <= set(statuses.statuses)
        with allure.step("further writes are refused as clearly, not hung"):
            again = outcome(stub.SendMessage, pb.MessageRequest(client_id="later",
                                                                message="hello"))
            assert isinstance(again, grpc.RpcError)
            assert again.code() == grpc.StatusCode.UNAVAILABLE
            assert "the store could not save the change" in again.details()
    server.kill()
    with allure.step("restarted without the limit, every acknowledged write is there"):
        restarted = server_processes("--store", sqlite_url)
        observed, revision = observe_all(restarted.address, [cid for cid, _ in acked])
        lost = [cid for cid, rev in acked if observed[cid] != Known(frozenset({""}), rev)]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
        assert revision >= acked[-1][1]


@allure.story("Full disk and unusable database")
def test_a_write_the_store_refused_is_not_visible_to_readers(limited_servers, sqlite_url):
    server = limited_servers(FULL_DISK_LIMIT, sqlite_url)
    address = "{}:{}".format(*server.wait_for_log(LISTENING).groups())
    with connect(address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        acked, refused_id, refusal = write_until_refused(stub, "c")
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        counts = stub.CountClients(pb.CountClientsRequest(), timeout=CALL_DEADLINE)
        assert counts.revision == acked[-1][1], "a refused write moved the revision"
        assert observe(stub, refused_id) == UNKNOWN, "a refused write is visible"


# --- 7. reads while a commit is held, then kill -9; the database removed under the server -----


HELD_COMMIT_SERVER = ROOT / "tests" / "held_commit_server.py"


@allure.story("Reads show only durable state")
def test_nothing_read_while_a_commit_is_held_is_contradicted_after_kill_9(sqlite_url,
                                                                        server_processes):
    held = ServerProcess("--store", sqlite_url, program=(str(HELD_COMMIT_SERVER),),
                         env={"HOLD_AFTER_COMMITS": "1"})
    try:
        with connect(held.address) as channel, ThreadPoolExecutor(1) as pool:
            stub = pb_grpc.ClientServiceStub(channel)
            stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"),
                             timeout=CALL_DEADLINE)
            watch = Watch(stub)
            first_snapshot = watch.snapshot()
            with allure.step("a goodbye whose commit is held open"):
                goodbye = pool.submit(stub.SendMessage, pb.MessageRequest(
                    client_id="alice", message="goodbye"), timeout=DEADLINE)
                held.wait_for_log("holding commit 2")
            with allure.step("every read while it is held"):
                before = everything_read(stub, Watch(stub).snapshot())
                assert before["status"] == (pb.STATUS_CONNECTED, 1)
            held.kill()
            with pytest.raises(grpc.RpcError):
                goodbye.result(timeout=DEADLINE)  # never acknowledged
    finally:
        held.stop()
    with allure.step("restarted: nothing read before is contradicted, no revision reused"):
        restarted = server_processes("--store", sqlite_url)
        with connect(restarted.address) as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            assert everything_read(stub, Watch(stub).snapshot()) == before
            resumed = Watch(stub, since_revision=first_snapshot[1])
            reply = stub.SendMessage(pb.MessageRequest(client_id="bob", message="hello"),
                                     timeout=CALL_DEADLINE)
            assert reply.client.revision == 2
            message = resumed.next()
            assert not message.resync and [(e.revision, e.client.client_id)
                                            for e in message.events] == [(2, "bob")]


@allure.story("The database removed under the server")
@pytest.mark.parametrize("suffix", ["", "-wal"])
def test_deleting_the_database_under_a_running_server_refuses_writes_and_says_why(
        server_processes, tmp_path, suffix):
    path = tmp_path / "connections.db"
    server = server_processes("--store", f"sqlite:///{path}")
    with connect(server.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"),
                         timeout=CALL_DEADLINE)
        (tmp_path / f"connections.db{suffix}").unlink()
        refusal = outcome(stub.SendMessage, pb.MessageRequest(client_id="bob", message="hello"))
        assert isinstance(refusal, grpc.RpcError)
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        assert f"connections.db{suffix} was removed while the server ran" in refusal.details()
        server.wait_for_log(r"ERROR .*connections\.db.* was removed")
        assert observe(stub, "bob") == UNKNOWN, "the refused write is visible"
        assert observe(stub, "alice").sessions == frozenset({""})
        again = outcome(stub.SendMessage, pb.MessageRequest(client_id="carol", message="hello"))
        assert isinstance(again, grpc.RpcError) and again.code() == grpc.StatusCode.UNAVAILABLE


# --- 8. replicas on one Redis: a replica or Redis killed at random moments -----------------


@allure.story("Replicas: kill -9 at random moments")
def test_replicas_lose_no_acknowledged_change_when_a_replica_or_redis_is_killed(
        server_processes, redis_server):
    seed = replay_seed("replicas_lose_no_acknowledged_change")
    rng = random.Random(seed)
    client_ids = [f"user{n}" for n in range(48)]
    replicas = [server_processes("--store", redis_server.url) for _ in range(2)]
    state, highest_revision, server_revision = {}, 0, 0
    victims = rng.sample(["replica 0", "replica 1", "Redis"], 3)
    victims.append(rng.choice(victims))
    for cycle, victim in enumerate(victims, 1):
        wanted = rng.randint(20, 300)
        with allure.step(f"cycle {cycle}: writers on both replicas; {victim} killed after "
                         f"{wanted} acknowledged changes"):
            tally = Tally()
            halves = (client_ids[:24], client_ids[24:])
            started = [start_writers(replica.address, ids, state, rng, tally, 3)
                       for replica, ids in zip(replicas, halves, strict=True)]
            tally.wait_for(wanted)
            if victim == "Redis":
                redis_server.kill()
            else:
                replicas[int(victim[-1])].kill()
            for channel, writers in started:
                for writer in writers:
                    writer.stopping.set()  # the writers on a replica that lives end here
                    writer.join()
                channel.close()
            writers = [writer for _, group in started for writer in group]
            highest_revision = max(highest_revision, tally.revision)
            for writer in writers:
                assert not writer.surprises, writer.surprises[:3]
        with allure.step(f"cycle {cycle}: {victim} back; every acknowledged change is there"):
            if victim == "Redis":
                redis_server.start()
            else:
                replicas[int(victim[-1])] = server_processes("--store", redis_server.url)
            for replica in replicas:
                observed, revision = observe_all(replica.address, client_ids)
                fates = [writer.check_survived(observed) for writer in writers]
                assert revision >= server_revision, (
                    f"seed {seed}: the revision went back from {server_revision} to {revision}")
                assert revision >= highest_revision, (
                    f"seed {seed}: revision {revision} is below the acknowledged "
                    f"{highest_revision}")
            summary = (f"cycle {cycle}: {victim} killed after {tally.count} acknowledged "
                       f"changes, revision {revision}; writers: "
                       + ", ".join(f"{fates.count(fate)} {fate}" for fate in sorted(set(fates))))
            allure.attach(summary, f"cycle {cycle}")
            print(summary)
            state, server_revision = observed, revision
