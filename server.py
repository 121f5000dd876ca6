"""Presence server: a threaded gRPC service that tracks which clients are connected.

Run `python server.py --help` for the flags; README.txt says what they do. The
file reads top to bottom, each part whole in one section:

  data          a client's record (Client, Session), a change, a message
  rules         what an id, a message and a page token must be; sessions
  the registry  every client in memory behind one lock (Registry): a change is
                worked out, handed to the store, and shown to readers only
                once the store has it; leases expire (LeaseReaper); on redis://
                each replica's registry is a cache of the shared one (SharedRegistry)
  watch         the change log and its fan-out: durable changes in revision
                order (ChangeLog), sent to every watcher by a few threads
                (Fanout, Sender, Watcher)
  attached presence
                Attach streams that each hold a session live (Attachments,
                AttachedStream); their ends applied in batches (Detacher)
  stores        the Store protocol: memory://, sqlite:/// (group commit), and
                redis:// shared by several replicas (RedisStore)
  wire format   records and changes as protobuf, answers cut to fit a
                default client, guarded request parsing
  handlers      ClientService and NotificationService (an older contract):
                thin translators between protobuf and the registry
  security      TLS, the access token, metrics (gRPC interceptors)
  wiring        create_server builds it all; serve runs it until a signal
  command line  FLAGS, one table of flags and their environment twins; main
"""

import argparse
import base64
import binascii
import collections
import contextlib
import errno
import functools
import gc
import heapq
import hmac
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import resource
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtobufMessage
from grpc import _common as grpc_common  # grpcio's private parts: see CallGate
from grpc import _server as grpc_internals
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # not in grpc-stubs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from sortedcontainers import SortedList

from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc
from generated import notifications_pb2 as notifications_pb

__version__ = "1.1.0"
logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ClientService"]
SERVICE_NAME = SERVICE.full_name
NOTIFICATION_SERVICE = notifications_pb.DESCRIPTOR.services_by_name["NotificationService"]
NOTIFICATION_SERVICE_NAME = NOTIFICATION_SERVICE.full_name
REFLECTION_V1_NAME = "grpc.reflection.v1.ServerReflection"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_STORE = "sqlite:///connections.db"
DEFAULT_WORKERS = 16
DEFAULT_MAX_CONCURRENT_RPCS = 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_GRACE_SECONDS = 5.0
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_MAX_STREAMS_PER_CONNECTION = 100
DEFAULT_MAX_LEASE = 3600
DEFAULT_MAX_SESSIONS = 64
MAX_SESSIONS_LIMIT = 1024  # 1,024 sessions of 128 four-byte characters: a record of ~560 kB
DEFAULT_MAX_WATCHERS = 1000
DEFAULT_WATCH_BUFFER = 10_000
DEFAULT_WATCH_HISTORY = 100_000
DEFAULT_MAX_ATTACHED = 50_000
DEFAULT_REATTACH_GRACE = 10.0
DEFAULT_KEEPALIVE_INTERVAL = 30.0  # pings cost CPU: 10,000 clients at 10 s took 8% of a core
DEFAULT_KEEPALIVE_TIMEOUT = 10.0  # 5 s closed live clients of a saturated machine
# Clients may send their own keepalive pings as often as this without being told to go away.
MIN_CLIENT_PING_SECONDS = 1.0
# While writers meet (this commit or the last one serves more than one), the committer first
# waits this long for more to join: a commit's fixed cost (SQLite's statement, WAL write and
# file checks; a replica's script call and round trip; waking the writers) then serves more of
# them. Under 32 calls in flight: SQLite ~2 to ~6 records a commit, a replica ~11 to ~26 writes
# a script call. A writer that met none in this commit or the last never waits.
COMMIT_GATHER_SECONDS = 0.0005


# --- data: a client's record, a change, a message --------------------------------------------


class Status(IntEnum):
    """A client's status; the values are the wire enum's."""

    CONNECTED = pb.STATUS_CONNECTED
    DISCONNECTED = pb.STATUS_DISCONNECTED


class EventKind(IntEnum):
    """What a change did to a client's sessions; the values are the wire enum's."""

    CONNECTED = pb.EVENT_CONNECTED
    DISCONNECTED = pb.EVENT_DISCONNECTED
    SESSION_STARTED = pb.EVENT_SESSION_STARTED
    SESSION_ENDED = pb.EVENT_SESSION_ENDED


STATUS_WORDS = {Status.CONNECTED: "connected", Status.DISCONNECTED: "disconnected"}

MESSAGES = {"hello": Status.CONNECTED, "goodbye": Status.DISCONNECTED}
HELLO, GOODBYE, LEASE_EXPIRED = "hello", "goodbye", "lease expired"
ATTACH, CONNECTION_CLOSED = "attach", "connection closed"


class Session(NamedTuple):
    """One live session; expires_at is 0.0 when it has no lease.

    holder is empty for a session a Hello keeps; for one an Attach stream holds, it names
    that stream: the id of the server process serving it, "/", the stream's number there.
    """

    session_id: str
    expires_at: float
    holder: str = ""


DEFAULT_SESSION = Session("", 0.0)

# Shared by every client connected the original way, so they cost no memory for it.
DEFAULT_SESSIONS = (DEFAULT_SESSION,)


class Client(NamedTuple):
    """One client's record; immutable, so readers share it without copying.

    Kept small, since a registry may hold millions: the status is not stored but
    follows from the sessions (connected while any is live).
    """

    client_id: str
    changed_at: float
    last_seen: float
    revision: int
    reason: str
    sessions: tuple

    @property
    def status(self):
        return Status.CONNECTED if self.sessions else Status.DISCONNECTED


class Change:
    """One change as watchers see it: what happened, and the record after it.

    Its revision and reason are the record's. `wire` caches it serialized as a
    one-event WatchResponse, made by the first watcher that sends it and shared
    by all the others.
    """

    __slots__ = ("kind", "record", "session_id", "wire")

    def __init__(self, kind, record, session_id):
        self.kind = kind
        self.record = record
        self.session_id = session_id
        self.wire = None

    @property
    def revision(self):
        return self.record.revision

    @property
    def reason(self):
        return self.record.reason


# A record after a message, and the change the message made (None: it changed nothing).
Applied = tuple[Client, Change | None]


class Message(NamedTuple):
    """A validated Hello or Goodbye, or what an Attach stream does to its session.

    With a holder (the stream's id, as in Session) a hello attaches the session, taking it
    over from whatever held it, and a goodbye lets go of it, only while that stream still
    holds it: the session ends ("connection closed"), or, given a lease, stays live that many
    seconds for the client to attach again.
    """

    client_id: str
    status: Status
    session_id: str = ""
    lease: int | float = 0
    holder: str = ""


class Counts(NamedTuple):
    """How many clients are in each status, at a revision."""

    connected: int
    disconnected: int
    live_sessions: int
    revision: int


class InvalidArgument(ValueError):
    """A request broke a rule; the message says which."""


class LimitExceeded(ValueError):
    """A request asked for more than a limit allows; the message says which."""


class StoreError(RuntimeError):
    """The store could not make a change durable."""


class Unavailable(RuntimeError):
    """The server cannot take this call now (it is stopping); the message says why."""


class Refusal(Exception):
    """A call refused once its handler has returned (see CallGate): its code and details."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


# --- rules: ids, messages, page tokens, sessions ---------------------------------------------


MAX_ID_LENGTH = 128

# Error details travel in gRPC metadata (16 KB at most); longer echoes are cut.
MAX_ECHO = 200

_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")

# Bidirectional overrides and isolates reorder what a terminal shows: one id could pose as another.
_BIDI_CONTROL = re.compile("[\u202a-\u202e\u2066-\u2069]")


def validate_client_id(client_id, field="client_id", allow_empty=False):
    """Check the id rule (README, Rules): 1 to 128 characters, not only white space, no control
    characters, no bidirectional overrides or isolates."""
    if not client_id:
        if allow_empty:
            return
        raise InvalidArgument(f"{field} must not be empty")
    if len(client_id) <= MAX_ID_LENGTH and client_id.isascii() and client_id.isprintable() \
            and not client_id.isspace():
        return  # the common id, passed without the searches below: printable ASCII holds none
    if len(client_id) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{field} must be at most {MAX_ID_LENGTH} characters, got {len(client_id)}"
        )
    control = _CONTROL_CHARACTER.search(client_id)
    if control:
        raise InvalidArgument(
            f"{field} must not contain control characters, "
            f"found U+{ord(control.group()):04X} at position {control.start()}"
        )
    bidi = _BIDI_CONTROL.search(client_id)
    if bidi:
        raise InvalidArgument(
            f"{field} must not contain bidirectional override or isolate characters, "
            f"found U+{ord(bidi.group()):04X} at position {bidi.start()}"
        )
    if client_id.isspace() and not allow_empty:
        raise InvalidArgument(f"{field} must not be only white space")


def parse_message(message):
    """Map a message to the status it asks for, as the original service did."""
    status = MESSAGES.get(message) or MESSAGES.get(message.strip().lower())
    if status is None:
        raise InvalidArgument(f"Invalid message type: {echo(message)}")
    return status


def echo(text):
    """Text to quote back in an error, cut short enough for gRPC's metadata limit."""
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}… ({len(text)} characters)"


def encode_page_token(client_id):
    """Make the opaque token that resumes a listing after client_id."""
    return base64.urlsafe_b64encode(client_id.encode()).decode()


def decode_page_token(token):
    """Read back a token made by encode_page_token, or say it is not one: only the exact
    text this server issues is accepted, not whatever base64 would also read."""
    try:
        client_id = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        client_id = None
    if client_id is None or not client_id or encode_page_token(client_id) != token:
        raise InvalidArgument("page_token is not a token this server issued")
    return client_id


def find_session(sessions, session_id):
    """The live session with this id, or None."""
    for session in sessions:
        if session.session_id == session_id:
            return session
    return None


def put_session(sessions, session):
    """Sessions with `session` added or renewed, ordered by id."""
    if session == DEFAULT_SESSION and sessions in ((), DEFAULT_SESSIONS):
        return DEFAULT_SESSIONS
    kept = [other for other in sessions if other.session_id != session.session_id]
    kept.append(session)
    kept.sort()
    return tuple(kept)


def drop_session(sessions, session_id):
    """Sessions without the one with this id."""
    return tuple(session for session in sessions if session.session_id != session_id)


# --- the registry: every client in memory, changes made durable, leases ----------------------


class Registry:
    """Every client's record in memory, behind one briefly held lock; readers see only what
    the store has confirmed.

    A writer works out its change from the latest records (`_pending`, the changes handed to
    the store and not yet confirmed, over `_clients`, the confirmed ones), gives it the next
    revision and hands it to the store, all under the lock, so the store sees changes in
    revision order. Outside the lock it waits until the store says how far it has made
    changes durable, then publishes every change up to there: into `_clients`, the status
    index, the counts and the change log, the only state readers see. A change the store
    refuses is dropped with everything after it, so memory stays exactly as the store has
    it. Looking up one record needs no lock: records are immutable and a dict lookup is
    atomic. Leases sit in a heap ordered by expiry, so finding the due ones never scans.
    """

    unsure_refusals = False  # a change the store refused (StoreError) was not saved

    def __init__(self, store: "Store", clock: Callable[[], float] = time.time,
                 history: int = DEFAULT_WATCH_HISTORY, max_sessions: int = DEFAULT_MAX_SESSIONS):
        self._store = store
        self._clock = clock
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}  # client id -> its durable record: readers see it
        self._pending: dict[str, Client] = {}  # client id -> its latest, yet to be confirmed
        # (position, records, changes) of each hand-over the store has yet to confirm, in order
        self._unpublished: collections.deque[tuple[int, Sequence[Client], Sequence[Change]]] = (
            collections.deque())
        self._handed_over = 0  # the position of the last hand-over to the store
        self._published = 0  # the position of the last hand-over readers can see
        self._ids = {Status.CONNECTED: SortedList(), Status.DISCONNECTED: SortedList()}
        # One heap entry per leased session, at or before its expiry: a renewal only moves
        # the session's expiry, and an entry that comes due early is pushed back then.
        self._leases: list[tuple[float, str, str]] = []
        # (client id, session id) -> the time of its heap entry
        self._lease_entries: dict[tuple[str, str], float] = {}
        self._live_sessions = 0
        self._held_at_load: list[tuple[str, Session]] = []  # (client id, attached session)
        self.revision = 0  # the last revision given to a change, durable or not
        self.durable_revision = 0  # the last revision readers can see
        self._load_from(store)
        self.durable_revision = self.revision
        self.log = ChangeLog(self.revision, history)

    def _load_from(self, store):
        self._load(store.load())

    def close(self) -> None:
        """Stop what the registry runs besides the calls (nothing, for a local store)."""

    def _load(self, records):
        """Take the store's records at start: a million of them in about half a second, the
        work done by C loops (dict, zip, map) rather than a Python loop per record."""
        records = records if isinstance(records, list) else list(records)
        ids = [record[0] for record in records]
        self._clients = dict(zip(ids, records, strict=True))
        self.revision = max(map(operator.itemgetter(3), records), default=0)
        self._live_sessions = sum(map(len, map(operator.itemgetter(5), records)))
        self._ids = {
            Status.CONNECTED: SortedList(record[0] for record in records if record[5]),
            Status.DISCONNECTED: SortedList(record[0] for record in records if not record[5])}
        self._held_at_load = []
        for record in records:
            sessions = record[5]
            if sessions and sessions is not DEFAULT_SESSIONS:
                self._add_leases_locked(record)
                self._held_at_load += [(record[0], session) for session in sessions
                                       if session.holder]

    # -- changes

    def apply_one(self, message: Message) -> tuple[Client, Change | None]:
        """Apply one message and wait until it is durable: (record, change or None)."""
        record, change, ticket = self.begin_one(message)
        return self.finish_one(ticket, record, change)

    def begin_one(self, message: Message) -> tuple[Client | None, Change | None, Any]:
        """The first half of apply_one, which never waits: the message decided and handed to
        the store; (record, change or None, the ticket for finish_one)."""
        now = self._clock()
        with self._lock:
            record, change = self._decide_locked(message, now)
            ticket = self._hand_over_locked((record,), (change,) if change else ())
        return record, change, ticket

    def finish_one(self, ticket: Any, record: Client | None,
                   change: Change | None) -> tuple[Client, Change | None]:
        """The second half of apply_one: wait until the change is durable, and publish it;
        begin_one's record and change."""
        self._await(ticket)
        if change:
            log_changes((change,))
        return record, change  # type: ignore[return-value]  # begin_one's here is never None

    def apply_many(self, messages: Sequence[Message],
                   check: Callable[[list[Applied]], object] | None = None) -> list[Applied]:
        """Apply messages in order, durable together; a (record, change or None) for each.

        Nothing is applied when one of them breaks a limit, or when check(results) raises."""
        now = self._clock()
        with self._lock:
            revision = self.revision
            try:
                results = self._decide_all_locked(messages, now)
                if check is not None:
                    check(results)
            except BaseException:
                self.revision = revision  # nothing was handed over: the revisions are free
                raise
            ticket = self._hand_over_results_locked(results)
        self._await(ticket)
        log_changes(change for _, change in results)
        return results

    def _decide_all_locked(self, messages, now, overlay=None):
        """Each message's outcome, later ones seeing what earlier ones did (and overlay)."""
        overlay, results = dict(overlay or {}), []
        for index, message in enumerate(messages):
            record, change = self._decide_locked(message, now, overlay, index)
            overlay[record.client_id] = record
            results.append((record, change))
        return results

    def expire_due(self) -> list[Change]:
        """End every session whose lease has run out; return the changes made."""
        now = self._clock()
        with self._lock:
            results: list[Applied] = []
            overlay: dict[str, Client] = {}
            while self._leases and self._leases[0][0] <= now:
                due, client_id, session_id = heapq.heappop(self._leases)
                if self._lease_entries.get((client_id, session_id)) != due:
                    continue  # an entry replaced by an earlier one for a shorter lease
                del self._lease_entries[client_id, session_id]
                record = overlay.get(client_id) or self._latest_locked(client_id)
                session = record and find_session(record.sessions, session_id)
                if not session or not session.expires_at:
                    continue  # ended, or no longer leased
                if session.expires_at > now:  # renewed since the entry was made
                    self._add_lease_locked(session.expires_at, client_id, session_id)
                    continue
                result = self._end_locked(record, session_id, False, now, LEASE_EXPIRED)
                overlay[client_id] = result[0]
                results.append(result)
            if not results:
                return []
            ticket = self._hand_over_results_locked(results)
        self._await(ticket)
        changes = [change for _, change in results if change]
        log_expired(changes)
        return changes

    def hold_streams_as(self, server_id: str, on_lapse: Callable[[], None]) -> None:
        """Attach streams are served here as server_id. One server alone needs nothing more:
        its streams live and die with it."""

    def lease_orphans(self, seconds: float) -> int:
        """Sessions attached when the store was loaded were held by streams of a server that
        is gone (it did not stop cleanly): each becomes a lease of seconds, as if that server
        had let go of it, and ends unless attached again. Returns how many."""
        held, self._held_at_load = self._held_at_load, []
        messages = [Message(client_id, Status.DISCONNECTED, session.session_id, seconds,
                            session.holder) for client_id, session in held]
        self.apply_in_batches(messages)
        return len(messages)

    def apply_in_batches(self, messages: Sequence[Message]) -> list[Change]:
        """Apply messages MAX_BATCH at a time, each batch durable together; the changes."""
        return [change for start in range(0, len(messages), MAX_BATCH)
                for _, change in self.apply_many(messages[start:start + MAX_BATCH]) if change]

    def seconds_to_next_expiry(self) -> float:
        """How long until the earliest lease may run out (it may have been renewed)."""
        with self._lock:
            return self._leases[0][0] - self._clock() if self._leases else float("inf")

    # -- handing changes to the store and publishing what it confirms

    def _hand_over_results_locked(self, results):
        return self._hand_over_locked([record for record, _ in results],
                                      [change for _, change in results if change])

    def _hand_over_locked(self, records, changes):
        """Give records to the store in revision order; a ticket to await, None if published.

        A store that is durable as soon as it has the records (memory://) is published at
        once, under this same lock; the others are published by `_await`."""
        self._handed_over += 1
        position = self._handed_over
        if self._store.immediate:
            self._install_locked(position, records, changes)
            return None
        try:
            ticket = self._store.submit(records, position)
        except StoreError:
            self._roll_back_locked()
            raise
        for record in records:
            self._pending[record.client_id] = record
        self._unpublished.append((position, records, changes))
        return ticket

    def _await(self, ticket):
        """Wait until the store has the ticket's records, then publish all it has confirmed."""
        if ticket is not None:
            try:
                durable = self._store.wait(ticket)
            except StoreError:
                with self._lock:
                    self._roll_back_locked()
                raise
            if durable > self._published:  # else a writer of the same commit published it
                with self._lock:
                    self._publish_locked(durable)
        self.log.advance(self.durable_revision)  # wakes watchers: outside the registry lock

    def _publish_locked(self, durable):
        """Show readers every hand-over up to position durable, in order."""
        while self._unpublished and self._unpublished[0][0] <= durable:
            position, records, changes = self._unpublished.popleft()
            self._install_locked(position, records, changes)
            for record in records:
                if self._pending.get(record.client_id) is record:
                    del self._pending[record.client_id]

    def _install_locked(self, position, records, changes):
        """Make durable records what readers see: the records, the index, the counts, the log."""
        clients, ids = self._clients, self._ids
        connected, disconnected = ids[Status.CONNECTED], ids[Status.DISCONNECTED]
        for record in records:
            client_id, sessions = record.client_id, record.sessions
            old = clients.get(client_id)
            clients[client_id] = record
            if old is None:
                (connected if sessions else disconnected).add(client_id)
                self._live_sessions += len(sessions)
                continue
            if old.sessions is not sessions:
                self._live_sessions += len(sessions) - len(old.sessions)
                if bool(old.sessions) != bool(sessions):  # the status changed
                    (disconnected if sessions else connected).remove(client_id)
                    (connected if sessions else disconnected).add(client_id)
        if changes:
            self.log.append(changes)
            self.durable_revision = changes[-1].revision
        self._published = position

    def _roll_back_locked(self):
        """The store refused: publish what it did confirm and drop the rest, so memory is
        exactly as the store has it."""
        self._publish_locked(self._store.durable)
        if not self._unpublished and self.revision == self.durable_revision:
            return
        dropped = self._unpublished
        self._unpublished = collections.deque()
        self._pending.clear()
        self.revision = self.durable_revision
        for client_id in {record.client_id for _, records, _ in dropped for record in records}:
            record = self._clients.get(client_id)
            if record is not None:  # an expiry dropped with the rest must come due again
                self._add_leases_locked(record)
        logger.error("dropped %d changes the store did not save; back at revision %d",
                     sum(len(records) for _, records, _ in dropped), self.durable_revision)

    # -- the rules: what a message does to a record

    def _latest_locked(self, client_id):
        """The newest record of a client, confirmed or not; None when it is unknown."""
        return self._pending.get(client_id) or self._clients.get(client_id)

    def _decide_locked(self, message, now, overlay=None, index=None):
        """The record after message and the change it makes (None when it changes nothing)."""
        client_id = message.client_id
        old = (overlay and overlay.get(client_id)) or self._latest_locked(client_id)
        if message.status is Status.CONNECTED:
            return self._hello_locked(old, message, now, index)
        if old is None:
            return self._record_locked(None, client_id, (), EventKind.DISCONNECTED,
                                       message.session_id,
                                       CONNECTION_CLOSED if message.holder else GOODBYE, now)
        if message.holder:
            return self._let_go_locked(old, message, now)
        return self._end_locked(old, message.session_id, not message.session_id, now, GOODBYE)

    def _hello_locked(self, old, message, now, index):
        """A Hello starts or renews its session; an attach starts it or takes it over (from a
        Hello, a lease or another stream) as the same session: only a new one is a change."""
        sessions = old.sessions if old else ()
        known = find_session(sessions, message.session_id)
        if not known and len(sessions) >= self._max_sessions:
            where = f"requests[{index}]: " if index is not None else ""
            raise LimitExceeded(
                f"{where}client {echo(message.client_id)} already has {len(sessions)} sessions, "
                f"the most a client may have (--max-sessions); end one first")
        if known and known.holder and not message.holder:
            session = known  # a Hello for an attached session: its stream still holds it
        else:
            expires_at = now + message.lease if message.lease else 0.0
            if expires_at:
                self._add_lease_locked(expires_at, message.client_id, message.session_id)
            session = Session(message.session_id, expires_at, message.holder)
        new_sessions = put_session(sessions, session)
        if known:
            return self._unchanged(old, new_sessions, now), None
        kind = EventKind.SESSION_STARTED if sessions else EventKind.CONNECTED
        return self._record_locked(old, message.client_id, new_sessions, kind,
                                   message.session_id, ATTACH if message.holder else HELLO, now)

    def _let_go_locked(self, old, message, now):
        """An Attach stream lets go of its session: ended, or kept as a lease of message.lease
        seconds (not a change); nothing when another stream took it over or it ended."""
        held = find_session(old.sessions, message.session_id)
        if not held or held.holder != message.holder:
            return old, None
        if not message.lease:
            return self._end_locked(old, message.session_id, False, now, CONNECTION_CLOSED)
        expires_at = now + message.lease
        self._add_lease_locked(expires_at, old.client_id, message.session_id)
        return self._unchanged(old, put_session(old.sessions, Session(held.session_id,
                                                                      expires_at)), now), None

    def _end_locked(self, old, session_id, every_session, now, reason):
        new_sessions = () if every_session else drop_session(old.sessions, session_id)
        seen = now if reason != LEASE_EXPIRED else old.last_seen
        if len(new_sessions) == len(old.sessions):
            return self._unchanged(old, new_sessions, seen), None
        kind = EventKind.SESSION_ENDED if new_sessions else EventKind.DISCONNECTED
        return self._record_locked(old, old.client_id, new_sessions, kind, session_id, reason, now,
                                   seen)

    @staticmethod
    def _unchanged(old, sessions, seen):
        """The same record with renewed sessions and last_seen: no revision of its own."""
        return Client(old.client_id, old.changed_at, seen, old.revision, old.reason, sessions)

    def _record_locked(self, old, client_id, sessions, kind, session_id, reason, now, seen=None):
        self.revision += 1
        status = Status.CONNECTED if sessions else Status.DISCONNECTED
        changed_at = now if old is None or old.status != status else old.changed_at
        record = Client(client_id, changed_at, now if seen is None else seen, self.revision, reason,
                        sessions)
        return record, Change(kind, record, session_id)

    def _add_leases_locked(self, record):
        for session in record.sessions:
            if session.expires_at:
                self._add_lease_locked(session.expires_at, record.client_id, session.session_id)

    def _add_lease_locked(self, expires_at, client_id, session_id):
        """Give a leased session a heap entry due no later than its expiry: a new one unless
        it has one already that is (a renewal only moves the expiry later)."""
        entry = self._lease_entries.get((client_id, session_id))
        if entry is None or expires_at < entry:
            self._lease_entries[client_id, session_id] = expires_at
            heapq.heappush(self._leases, (expires_at, client_id, session_id))

    # -- reads: only what the store has confirmed

    def get(self, client_id: str) -> Client | None:
        """The client's durable record, or None when it is unknown."""
        return self._clients.get(client_id)

    def get_cached(self, client_id: str) -> Client | None:
        """The client's record as this server last saw it, without asking a shared store."""
        return self._clients.get(client_id)

    def snapshot(self) -> tuple[list[Client], int]:
        """Every durable record and the revision they are at, for a watcher's first answer."""
        with self._lock:
            return list(self._clients.values()), self.durable_revision

    def page(self, limit: int, after: str = "", status: Status | None = None,
             prefix: str = "") -> tuple[list[Client], bool, int]:
        """Up to limit records ordered by id, after `after`; also whether more follow."""
        with self._lock:
            lists = [self._ids[status]] if status else list(self._ids.values())
            ids = heapq.merge(*(self._ids_from(ids, after, prefix) for ids in lists))
            wanted = itertools.takewhile(lambda client_id: client_id.startswith(prefix), ids)
            page = [self._clients[client_id] for client_id in itertools.islice(wanted, limit + 1)]
            revision = self.durable_revision
        return page[:limit], len(page) > limit, revision

    @staticmethod
    def _ids_from(ids, after, prefix):
        start = max(ids.bisect_right(after) if after else 0, ids.bisect_left(prefix))
        return ids.islice(start)

    def counts(self) -> Counts:
        """Clients per status and live sessions, without listing them."""
        with self._lock:
            return Counts(len(self._ids[Status.CONNECTED]), len(self._ids[Status.DISCONNECTED]),
                          self._live_sessions, self.durable_revision)


# A replica on a shared store: how long the follower waits on the stream per read, how many
# entries it (or a commit call's answer) takes at once, how long it rests after a commit call
# brought the others' writes (the next is likely to bring more; the longest the others' writes
# then wait for this replica's watchers), how long a read waits for the cache to catch up, how
# often a write is worked out again after another replica changed the same client first.
SHARED_FOLLOW_BLOCK = 1.0
SHARED_FOLLOW_BATCH = 1000
SHARED_FOLLOW_REST = 0.02
SHARED_CATCH_UP_SECONDS = 5.0
SHARED_RETRY_SECONDS = 0.5
SHARED_MAX_CONFLICTS = 20
SHARED_EXPIRY_BATCH = 1000
# A replica says in Redis that it lives, for all its Attach streams at once, every
# REPLICA_RENEW_SECONDS, for REPLICA_LIVENESS_SECONDS; a replica that stops saying so has the
# sessions its streams held ended by the others.
REPLICA_RENEW_SECONDS = 1.0
REPLICA_LIVENESS_SECONDS = 5.0


class _Write:
    """One writer's messages on a replica, waiting to be committed with the others' in one
    call to the shared store, and what became of them."""

    __slots__ = ("messages", "check", "now", "bases", "results", "result", "error", "done")

    def __init__(self, messages, check, now):
        self.messages = messages
        self.check = check
        self.now = now
        self.bases = None  # client id -> (record, stored bytes) the store last answered, if any
        self.results = []  # (record, change or None) of each message, as last worked out
        self.result = None  # the last commit's CommitResult
        self.error = None  # what refused the write, if something did
        self.done = False


class SharedRegistry(Registry):
    """A replica's registry over a store that several servers share (redis://): a cache.

    Writes go to the store, which compares the record each was worked out from with the
    stored one and takes the next revision of the one sequence of every replica; a refusal
    means another replica changed the client meanwhile, so the change is worked out again
    from the stored record. Records reach the cache only from the store's stream of writes,
    in its order: in the answer to each commit call, which brings every entry since the
    cache's position (the others' writes, then the call's own), and by a follower thread that
    reads the stream while this replica makes no commit calls; a writer returns once its own
    write is in the cache. A read first asks the store how far it is (one round trip)
    and waits until the cache has caught up: a read on any replica sees every write
    acknowledged anywhere before it began, and a replica that cannot reach the store
    refuses (StoreError) rather than answer from a stale cache. Leases live in the store,
    so each expires once, whichever replicas are alive.
    """

    _store: "RedisStore"  # type: ignore[assignment]  # the shared store's API, not Store's
    unsure_refusals = True  # a call the network cut short may have been saved all the same
    gather_seconds = COMMIT_GATHER_SECONDS
    follow_rest_seconds = SHARED_FOLLOW_REST

    def __init__(self, store: "RedisStore", clock: Callable[[], float] = time.time,
                 history: int = DEFAULT_WATCH_HISTORY, max_sessions: int = DEFAULT_MAX_SESSIONS):
        self._applied = (0, 0)  # the stream position the cache has reached
        self._unreachable = None  # why the follower cannot reach the store, or None
        self._failures = 0  # the follower's failed reads so far
        self._retry = threading.Event()  # set to have the follower try again at once
        self._wanted = threading.Event()  # set to have a resting follower read at once
        self._followed_at = 0.0  # when a commit call last brought the cache up to date
        self._queue_lock = threading.Lock()  # guards _queued
        self._queued: list[_Write] = []  # writes waiting for the next commit call
        self._last_writes = 0  # how many the last commit call took
        self._gathering: list[_Write] | None = None  # the queue a writer waits to fill more
        self._taken = threading.Condition(self._queue_lock)  # notified when a call takes the queue
        self._commit_lock = threading.Lock()  # held by the writer making the commit call
        # client id -> (stream position, record) this replica saved and the cache lacks yet
        self._saved: dict[str, tuple[tuple[int, int], Client]] = {}
        super().__init__(store, clock, history, max_sessions)  # type: ignore[arg-type]
        self._caught_up = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server_id = ""  # this replica's, once it serves Attach streams
        self._follower = threading.Thread(target=self._follow, name="store-follower", daemon=True)
        self._follower.start()

    def _load_from(self, store):
        records, at = store.load()
        self._load(records)
        self._applied = stream_id(at)

    def close(self):
        """Let the follower go: it ends at its next read, which the store's close cuts short.
        Its liveness runs out by itself: any session a stream of it still holds in the store
        (a let-go the store refused) is then ended by the other replicas."""
        self._stopping.set()
        self._retry.set()
        self._wanted.set()

    # -- liveness: this replica's streams hold their sessions only while it says it lives

    def hold_streams_as(self, server_id: str, on_lapse: Callable[[], None]) -> None:
        """Say in the store every REPLICA_RENEW_SECONDS that this replica lives, so the others
        leave the sessions its streams hold alone. on_lapse() ends its streams when it cannot
        say so in time (before the others would end their sessions), or learns that its
        liveness ran out all the same (a renewal late, the set changed under it)."""
        self._server_id = server_id
        self._store.renew_replica(server_id, REPLICA_LIVENESS_SECONDS)  # before any stream
        threading.Thread(target=self._keep_alive, args=(on_lapse,), name="replica-liveness",
                         daemon=True).start()

    def _keep_alive(self, on_lapse):
        """Renew this replica's liveness until it stops; call on_lapse once per lapse."""
        said, lapsed = time.monotonic(), False
        while not self._stopping.wait(REPLICA_RENEW_SECONDS):
            try:
                live = self._store.renew_replica(self._server_id, REPLICA_LIVENESS_SECONDS)
            except StoreError as error:
                live = time.monotonic() - said < REPLICA_LIVENESS_SECONDS - REPLICA_RENEW_SECONDS
                logger.debug("cannot say this replica lives: %s", error)
            except Exception:  # the thread must go on: without it the others end every session
                logger.exception("cannot say this replica lives")
                continue
            else:
                said = time.monotonic()
            if not live and not lapsed:
                logger.warning("this replica cannot say in time that it lives, so the others "
                               "end the sessions its streams hold: ending those streams, for "
                               "their clients to attach again")
                on_lapse()
            lapsed = not live

    def _end_lapsed_replicas(self):
        """End the sessions held by streams of replicas that stopped saying they live (they
        died, or lost Redis for longer than their liveness); the changes. Every live replica
        may do it at once: an end applies only while that stream still holds the session, so
        each session ends once, with one event."""
        changes = []
        for server_id in self._store.lapsed_replicas():
            if server_id == self._server_id:
                continue  # this replica lives; on_lapse deals with a renewal that was late
            self._catch_up()  # every session that replica's streams attached is in the cache
            held = self._held_by(f"{server_id}/")
            changes += self.apply_in_batches(held)
            self._store.forget_replica(server_id)
            logger.info("replica %s stopped saying it lives: %d sessions its streams held "
                        "ended", server_id, len(held))
        return changes

    def _held_by(self, prefix):
        """A let-go message for each session held by a stream whose holder starts so."""
        with self._lock:
            return [Message(record.client_id, Status.DISCONNECTED, session.session_id, 0,
                            session.holder)
                    for record in self._clients.values() for session in record.sessions
                    if session.holder.startswith(prefix)]

    # -- the follower: the store's stream into the cache, in order

    def _follow(self):
        """Read the stream into the cache, resting while this replica's own commit calls bring
        it (a commit answers the entries since the cache's position) unless a reader wants it."""
        while not self._stopping.is_set():
            rest = self._followed_at + self.follow_rest_seconds - time.monotonic()
            if rest > 0 and self._unreachable is None and not self._wanted.is_set():
                self._wanted.wait(rest)
                continue
            self._wanted.clear()
            at = id_at(self._applied)
            try:
                entries = self._store.read_changes(at, SHARED_FOLLOW_BLOCK, SHARED_FOLLOW_BATCH)
            except ChangesTrimmed as error:
                if id_at(self._applied) != at:
                    continue  # a commit call's answer brought the cache on meanwhile
                logger.warning("%s: loading every record again", error)
                self._reload()
                continue
            except StoreError as error:
                if self._stopping.is_set():
                    return
                self._lost(error)
                self._retry.wait(SHARED_RETRY_SECONDS)
                self._retry.clear()
                continue
            if self._unreachable is not None:
                logger.info("the shared store is reachable again; catching up")
                self._unreachable = None
            if entries:
                self._apply_entries(entries)

    def _reload(self):
        """The stream no longer holds what the cache lacks: take every record afresh, and cut
        off the watchers, which then resume from a snapshot."""
        try:
            records, at = self._store.load()
        except StoreError as error:
            self._lost(error)
            self._retry.wait(SHARED_RETRY_SECONDS)
            return
        with self._lock:
            if stream_id(at) < self._applied:
                return  # commit calls' answers brought the cache further meanwhile
            self._clients, self._saved = {}, {}
            self._load(records)
            self._applied = stream_id(at)
            self.durable_revision = self.revision
            self.log.restart(self.revision)
            self._caught_up.notify_all()

    def _lost(self, error):
        if self._unreachable is None:
            logger.error("%s; refusing calls until it is back", error)
        with self._caught_up:
            self._unreachable = str(error)
            self._failures += 1
            self._caught_up.notify_all()

    def _apply_entries(self, entries):
        """Install the stream's entries ((id, record, kind, session id)) in order; the changes
        among them go to the log."""
        with self._lock:
            self._apply_entries_locked(entries)
        self.log.advance(self.durable_revision)

    def _apply_entries_locked(self, entries):
        """Install the entries that run on from the cache's position, leaving out those it
        already has (a commit call and the follower may both bring them); whether they ran
        on."""
        entries = [(position, *entry[1:]) for entry in entries
                   if (position := stream_id(entry[0])) > self._applied]
        if not entries:
            return True
        if not follows(self._applied, entries[0][0]):
            return False
        changes = []
        for position, record, kind, session_id in entries:
            self._install_locked(self._published, (record,), ())
            if kind is not None:
                changes.append(Change(kind, record, session_id))
            saved = self._saved.get(record.client_id) if self._saved else None
            if saved is not None and saved[0] <= position:
                del self._saved[record.client_id]
        self._applied = entries[-1][0]
        if changes:
            self.log.append(changes)
            self.revision = self.durable_revision = changes[-1].revision
        self._caught_up.notify_all()
        return True

    def _wait_applied(self, position):
        """Wait until the cache has reached position of the stream, or refuse: when the
        follower fails to read the store again meanwhile, or when it takes too long."""
        deadline = time.monotonic() + SHARED_CATCH_UP_SECONDS
        with self._caught_up:
            failures = self._failures
            if self._unreachable is not None:
                self._retry.set()  # the store answered the caller just now: try again at once
            while self._applied < position:
                self._wanted.set()  # a resting follower reads at once, again if one read fell short
                if self._failures > failures:
                    raise StoreError(self._unreachable)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError("this replica could not catch up with the shared store in "
                                     f"{SHARED_CATCH_UP_SECONDS:.0f} s")
                self._caught_up.wait(remaining)

    def _catch_up(self):
        """Before a read: have every write acknowledged so far in the cache."""
        seen = self._applied  # before asking: the store held it then, so must hold it now
        newest = stream_id(self._store.last_id())
        if newest < seen:
            raise self._lost_changes(newest, seen)
        self._wait_applied(newest)

    @staticmethod
    def _lost_changes(newest, seen):
        """The refusal once the store's stream is found to end (or go on) at or before what
        this replica had seen: it lost writes, and would give their revisions out again."""
        logger.error("the shared store's changes go on from %s, not after this replica's %s: "
                     "it lost writes; refusing", id_at(newest), id_at(seen))
        return StoreError("the shared store has lost changes this replica had seen (was Redis "
                          "restored or run without appendonly?); restart the replicas")

    # -- writes: compare-and-set in the store, several writers in one call, retried from the
    # stored record

    def apply_one(self, message: Message) -> tuple[Client, Change | None]:
        (record, change), = self.apply_many((message,))
        return record, change

    def begin_one(self, message: Message) -> tuple[Client | None, Change | None, Any]:
        """The first half of apply_one, which never waits: the message queued for the next
        commit call, worked out then; (None, None, the ticket for finish_one)."""
        write = _Write((message,), None, self._clock())
        self._queue(write)
        return None, None, write

    def finish_one(self, ticket: Any, record: Client | None,
                   change: Change | None) -> tuple[Client, Change | None]:
        """The second half of apply_one: the write committed (by this thread, or with another
        writer's), its record and change as saved."""
        (record, change), = self._finish(ticket)
        return record, change

    def apply_many(self, messages: Sequence[Message],
                   check: Callable[[list[Applied]], object] | None = None) -> list[Applied]:
        if not messages:
            return []
        write = _Write(messages, check, self._clock())
        self._queue(write)
        return self._finish(write)

    def _finish(self, write: _Write) -> list[Applied]:
        """Have a queued write committed, worked out again from the stored records while
        another replica changed its clients first; its results once the cache has them."""
        conflicts = 0
        while True:
            self._commit_together(write)
            if write.result.ok:
                break
            conflicts += 1
            if conflicts == SHARED_MAX_CONFLICTS:
                raise StoreError("too many concurrent changes to the same clients on other "
                                 "replicas; try again")
            write.bases = {client_id: (decode_record(client_id, stored) if stored else None,
                                       stored) for client_id, stored in write.result.stored.items()}
            self._queue(write)
        result = write.result
        try:
            self._wait_applied(stream_id(result.ids[-1]))
        except StoreError as error:  # saved all the same: say so, do not refuse
            logger.warning("a change saved in the shared store is not in this replica's cache "
                           "yet: %s", error)
        final: list[Applied] = []
        for (record, change), revision in zip(write.results, result.revisions, strict=True):
            saved = record._replace(revision=revision)
            final.append((saved, change and Change(change.kind, saved, change.session_id)))
        log_changes(change for _, change in final)
        return final

    def _queue(self, write):
        """Put write among those the next commit call takes."""
        write.done, write.error = False, None
        with self._queue_lock:
            self._queued.append(write)

    def _commit_together(self, write):
        """Have queued write committed with every other write waiting meanwhile, in one store
        call: by this thread, or by the one that held the commit lock before it took write
        along."""
        meeting = max(len(self._queued), self._last_writes) > 1  # a stale length will do
        if meeting and self.gather_seconds and not write.done:
            self._gather(write)
        with self._commit_lock:
            if not write.done:
                self._commit_queued()
        if write.error is not None:
            raise write.error

    def _gather(self, write):
        """Writers meet: the first of the queued ones to come sleeps gather_seconds, so that more
        join the call it makes then; the others wait until a call takes them rather than sleep
        too (at most as long: the one that sleeps may find its write taken by an earlier call)."""
        with self._taken:
            queued = self._queued
            if write not in queued:
                return  # a call has taken it already
            if self._gathering is queued:
                self._taken.wait_for(lambda: self._queued is not queued, self.gather_seconds)
                return
            self._gathering = queued
        time.sleep(self.gather_seconds)

    def _commit_queued(self):
        """Work out every queued write, each following from those before it in the call, and
        commit them in one call; called holding the commit lock."""
        with self._queue_lock:
            writes, self._queued = self._queued, []
            self._taken.notify_all()
        self._last_writes = len(writes)
        writes.sort(key=lambda write: write.bases is None)  # retries first: their bases are fresh
        groups, taken = [], []
        with self._lock:
            called: dict[str, Client] = {}  # client id -> its record after the call so far
            for write in writes:
                try:
                    groups.append(self._decide_write_locked(write, called))
                    taken.append(write)
                except Exception as error:  # a limit or the check: this writer's alone
                    write.error, write.done = error, True
        if not groups:  # every write refused by a limit or its check
            return
        since = self._applied
        try:
            results, before = self._store.commit_following(groups, id_at(since),
                                                           SHARED_FOLLOW_BATCH)
            first = next((stream_id(result.ids[0]) for result in results if result.ok), None)
            if first is not None and first <= since:  # a revision this replica saw, again
                raise self._lost_changes(first, since)
        except Exception as error:  # each writer hears of it: none is left to wait or retry
            failure = error if isinstance(error, StoreError) else StoreError(
                f"the shared store could not save the change: {error}")
            for write in taken:
                write.error, write.done = failure, True
            return
        with self._lock:
            try:
                followed = before is not None and self._apply_entries_locked(
                    before + list(self._entries_saved(taken, results)))
            except Exception:  # saved all the same: the writers hear so, the follower reads it
                logger.exception("cannot install what a commit call answered")
                followed = False
            for write, result in zip(taken, results, strict=True):
                write.result, write.done = result, True
                if result.ok:
                    self._remember_saved_locked(write.results, result)
        if followed:  # else the writers have the follower read what the answer lacked
            self._followed_at = time.monotonic()
            self.log.advance(self.durable_revision)

    @staticmethod
    def _entries_saved(writes, results):
        """The stream entries a commit call added for writes, in order, as the follower would
        read them: (id, record, kind or None, session id)."""
        for write, result in zip(writes, results, strict=True):
            if result.ok:
                for (record, change), revision, entry_id in zip(
                        write.results, result.revisions, result.ids, strict=True):
                    yield (entry_id, record._replace(revision=revision),
                           change and change.kind, change.session_id if change else "")

    def _decide_write_locked(self, write, called):
        """Write's outcome and its commit items, from the records after the writes before it in
        this call, else from what its writer last learnt of the store, else from the cache."""
        overlay, expected = {}, {}
        for message in write.messages:
            client_id = message.client_id
            if client_id in overlay or client_id in expected:
                continue
            if client_id in called:
                overlay[client_id] = called[client_id]
                continue
            record, stored = (write.bases[client_id] if write.bases and client_id in write.bases
                              else self._base_locked(client_id))
            expected[client_id] = stored
            if record is not None:
                overlay[client_id] = record
        results = self._decide_all_locked(write.messages, write.now, overlay)
        if write.check is not None:
            write.check(results)
        write.results = results
        items = []
        for record, change in results:
            client_id = record.client_id
            items.append((client_id, expected.pop(client_id, None), record,
                          (change.kind, change.session_id) if change else None))
            called[client_id] = record
        return items

    def _base_locked(self, client_id):
        """The newest record of a client this replica knows and its stored bytes: one it saved
        itself that the cache lacks yet, else the cache's."""
        saved = self._saved.get(client_id)
        if saved is not None:
            if saved[0] > self._applied:
                return saved[1], encode_record(saved[1])
            del self._saved[client_id]
        record = self._clients.get(client_id)
        return record, encode_record(record) if record is not None else None

    def _remember_saved_locked(self, results, result):
        """Keep the records a call saved until the cache has them, so the next call works out
        changes from them rather than from the cache they have not reached."""
        for (record, _), revision, entry_id in zip(results, result.revisions, result.ids,
                                                   strict=True):
            position = stream_id(entry_id)
            if position > self._applied:
                self._saved[record.client_id] = (position, record._replace(revision=revision))

    def expire_due(self) -> list[Change]:
        """End the sessions whose lease ran out, as the store's lease set says: each once."""
        now = self._clock()
        changes = []
        for client_id, session_id in self._store.due_leases(now, SHARED_EXPIRY_BATCH):
            record, stored = self._store.fetch(client_id)
            session = record and find_session(record.sessions, session_id)
            if not session or not session.expires_at or session.expires_at > now:
                continue  # ended or renewed meanwhile: its lease entry moved with it
            with self._lock:
                ended, change = self._end_locked(record, session_id, False, now, LEASE_EXPIRED)
            done, revision, _ = self._store.commit(client_id, stored, ended,
                                                   (change.kind, change.session_id))
            if done:  # else another replica changed it first: the next pass looks again
                changes.append(Change(change.kind, ended._replace(revision=revision),
                                      session_id))
        log_expired(changes)
        return changes + self._end_lapsed_replicas()

    def seconds_to_next_expiry(self) -> float:
        return REAPER_MAX_SLEEP  # the lease set is in the store: look again each second

    def lease_orphans(self, seconds: float) -> int:
        """Leaves attached sessions alone: another replica may hold their streams."""
        self._held_at_load = []
        return 0

    def _add_lease_locked(self, expires_at, client_id, session_id):
        """Leases live in the store's lease set; the local heap stays empty."""

    # -- reads: only once the cache has every write acknowledged before them

    def get(self, client_id: str) -> Client | None:
        self._catch_up()
        return super().get(client_id)

    def snapshot(self) -> tuple[list[Client], int]:
        self._catch_up()
        return super().snapshot()

    def page(self, limit: int, after: str = "", status: Status | None = None,
             prefix: str = "") -> tuple[list[Client], bool, int]:
        self._catch_up()
        return super().page(limit, after, status, prefix)

    def counts(self) -> Counts:
        self._catch_up()
        return super().counts()


def describe_change(change):
    """One log line's worth of a change."""
    record = change.record
    session = f" session {change.session_id!r}" if change.session_id else ""
    return (f"{record.client_id}{session}: {change.kind.name.lower()} ({change.reason}); "
            f"{STATUS_WORDS[record.status]} with {len(record.sessions)} sessions, "
            f"revision {change.revision}")


def log_changes(changes):
    """Each change (None for a message that changed nothing) at DEBUG; checked first, so the
    hot path pays nothing for it at the default level."""
    if logger.isEnabledFor(logging.DEBUG):
        for change in changes:
            if change:
                logger.debug("%s", describe_change(change))


def log_expired(changes):
    """Expired leases at INFO: the first ten, then how many more."""
    for change in changes[:10]:
        logger.info("%s", describe_change(change))
    if len(changes) > 10:
        logger.info("%d more leases expired", len(changes) - 10)


REAPER_MAX_SLEEP = 1.0


class LeaseReaper:
    """A thread that ends sessions whose lease ran out, waking when the next one is due."""

    def __init__(self, registry):
        self._registry = registry
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        while not self._stopping.wait(self._sleep()):
            try:
                self._registry.expire_due()
            except StoreError as error:
                logger.error("cannot expire leases: %s", error)

    def _sleep(self):
        return min(max(self._registry.seconds_to_next_expiry(), 0.01), REAPER_MAX_SLEEP)


# --- watch: the change log and its fan-out ---------------------------------------------------


class ChangeLog:
    """The recent changes in revision order, shared by every watcher.

    Each watcher keeps only a cursor (the last revision it sent), so publishing
    costs the same for one watcher or a thousand. Only durable changes are
    appended, under the registry's lock; they become visible when the registry
    advances the log after letting go of that lock (waking watchers takes a
    while). The oldest are dropped past `capacity`, and a watcher asking for
    those is told so (`read` gives None).
    """

    def __init__(self, revision, capacity):
        self._lock = threading.RLock()  # taken directly where nobody is notified: cheaper
        # Notified when changes become visible or the log closes; the fanout waits on it.
        self.changed = threading.Condition(self._lock)
        self._waiting = 0  # threads in wait(): with none, advancing notifies nobody
        self._changes = []
        self._first = revision + 1
        self.durable = revision
        self._capacity = capacity
        self._closing = threading.Event()
        self.closed = False

    def append(self, changes):
        """Hold new durable changes, visible once advanced to; called in revision order."""
        with self._lock:
            self._changes.extend(changes)
            excess = len(self._changes) - self._capacity
            if excess > self._capacity // 16:  # trimmed in steps: each moves the whole list
                del self._changes[:excess]
                self._first += excess

    def advance(self, revision):
        """Make every change up to revision visible to watchers."""
        if revision <= self.durable:  # only ever grows, so a stale read just takes the lock
            return
        with self._lock:
            if revision > self.durable:
                self.durable = revision
                if self._waiting:
                    self.changed.notify_all()

    def restart(self, revision):
        """Hold nothing before revision (the registry loaded every record afresh): watchers
        behind it are told to start again from a snapshot."""
        with self.changed:
            self._changes = []
            self._first = revision + 1
            self.durable = max(self.durable, revision)
            self.changed.notify_all()

    def holds(self, revision):
        """Whether the changes right after revision are still held (a watcher can resume)."""
        with self._lock:
            return revision + 1 >= self._first

    def read(self, after):
        """The visible changes after revision `after`; None when the changes right after
        `after` are no longer held."""
        with self._lock:
            if after + 1 < self._first:
                return None
            return self._changes[after + 1 - self._first:self.durable + 1 - self._first]

    def wait(self, timeout):
        """Wait, holding `changed`, until changes become visible, the log closes or timeout."""
        self._waiting += 1
        try:
            self.changed.wait(timeout)
        finally:
            self._waiting -= 1

    def pause(self, seconds):
        """Wait a moment, less if the log closes meanwhile."""
        self._closing.wait(seconds)

    def close(self):
        """Wake every watcher so it can end its stream."""
        with self.changed:
            self.closed = True
            self._closing.set()
            self.changed.notify_all()


WATCH_POLL_SECONDS = 1.0

# After each pass over its watchers a sender waits a moment before the next, longer the
# more watchers there are (80 ms from 500 on), so a busy registry reaches them all as a few
# messages of many events each, while a lone watcher sees changes at once. The pause stops
# growing at 500: replicas that share a thousand watchers send as few messages as one
# server with all of them (two replicas of 500 at 40 ms each sent about twice as many: on
# bench's two cores their delivery p99 was 1.4-2.8 s, against 0.6-0.8 s at 80 ms).
WATCH_COALESCE_PER_WATCHER = 0.00016

WATCH_COALESCE_MAX = 0.08
WATCH_SENDERS = 4

# A sender that spends this long on one watcher (its connection is slow to take the
# messages) gives its other watchers to a new sender.
WATCH_STUCK_SECONDS = 0.5


class Watcher:
    """One Watch stream handed to the fanout: how to send to it and the last revision sent."""

    __slots__ = ("context", "send", "since", "sender", "ended")

    def __init__(self, context, send):
        self.context = context
        self.send = send
        self.since = 0
        self.sender = None  # the Sender that owns it
        self.ended = False

    def end(self, code=None, details=""):
        """End the stream: cleanly, or with a status code and its details."""
        self.ended = True
        if code is not None:
            self.context.set_code(code)
            self.context.set_details(details)
        self.send(None)


class Sender:
    """One fanout thread's share of the watchers, and the one it is sending to now."""

    __slots__ = ("watchers", "current", "busy_since", "retired")

    def __init__(self, watchers=()):
        self.watchers = set(watchers)
        self.current = None
        self.busy_since = 0.0
        self.retired = False  # stuck on `current`; its other watchers went to a new sender


class Fanout:
    """Sends the change log to every watcher from a few threads rather than one per watcher.

    A thread per watcher woke a thousand threads for each change, all fighting over the
    GIL; a few senders each walking their share deliver the same events for less CPU and
    far less delay to everyone else (README.txt, Performance). A send waits until the
    watcher's connection takes the message, so a sender stuck on a watcher that stopped
    reading gives its other watchers to a new sender; once that connection moves again,
    the watcher is cut off if it fell too far behind, or goes back to an active sender.
    """

    def __init__(self, log, buffer, senders=WATCH_SENDERS):
        self._log = log
        self._lock = log.changed  # one lock, so senders can wait on it for changes
        self._buffer = buffer
        self._size = senders
        self._senders = []  # the active ones; retired senders leave this list
        self._supervisor = None

    def add(self, watcher):
        """Start sending changes after watcher.since to watcher."""
        with self._lock:
            if not (watcher.ended or self._log.closed):
                self._assign_locked(watcher)
                self._lock.notify_all()
                return
        if not watcher.ended:
            watcher.end()  # the server is stopping

    def remove(self, watcher):
        """Forget a watcher whose stream ended, however it ended."""
        with self._lock:
            if watcher.sender is not None:
                watcher.sender.watchers.discard(watcher)
            watcher.ended = True

    def _assign_locked(self, watcher):
        """Give the watcher to a new sender while there are fewer than the size, else to
        the active sender with the fewest."""
        if len(self._senders) < self._size:
            self._start_locked([watcher])
        else:
            sender = min(self._senders, key=lambda sender: len(sender.watchers))
            sender.watchers.add(watcher)
            watcher.sender = sender

    def _start_locked(self, watchers):
        sender = Sender(watchers)
        for watcher in watchers:
            watcher.sender = sender
        self._senders.append(sender)
        threading.Thread(target=self._run, args=(sender,), name="watch-sender",
                         daemon=True).start()
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="watch-supervisor",
                                                daemon=True)
            self._supervisor.start()

    def _run(self, sender):
        """One sender's life: whenever its watchers are behind, send each what it lacks;
        when retired or the log closes, leave, handing back any watcher still on."""
        log = self._log
        try:
            while True:
                with self._lock:
                    while not (log.closed or sender.retired or self._behind_locked(sender)):
                        log.wait(WATCH_POLL_SECONDS)
                    watchers = list(sender.watchers)
                    closing = log.closed
                for watcher in watchers:
                    if self._claim(sender, watcher):
                        self._serve_safely(watcher, closing)
                        sender.current = None
                if sender.retired or closing:
                    return
                log.pause(self._coalesce_seconds())
        finally:
            self._leave(sender)

    def _coalesce_seconds(self):
        watchers = sum(len(sender.watchers) for sender in self._senders)
        return min(WATCH_COALESCE_PER_WATCHER * watchers, WATCH_COALESCE_MAX)

    def _behind_locked(self, sender):
        durable = self._log.durable
        return any(watcher.since < durable for watcher in sender.watchers)

    def _claim(self, sender, watcher):
        """Whether the sender still owns the watcher; if so it is the one being sent to."""
        with self._lock:
            if watcher.sender is not sender or watcher.ended:
                return False
            sender.current = watcher
            sender.busy_since = time.monotonic()
            return True

    def _serve_safely(self, watcher, closing):
        """Serve the watcher; a failure ends its stream, never the sender."""
        try:
            self._serve(watcher, closing)
        except Exception:
            logger.exception("sending changes to a watcher failed; ending its stream")
            with contextlib.suppress(Exception):
                watcher.end(grpc.StatusCode.INTERNAL, "the server failed to send a change")

    def _serve(self, watcher, closing):
        """Send the watcher what it lacks; cut it off if it cannot keep up; end it at close."""
        log = self._log
        changes = log.read(watcher.since) if watcher.since < log.durable else []
        if changes is None:
            return self._cut_off(watcher, "fell behind the changes this server keeps")
        for message, last in messages_of(changes):
            watcher.send(message)
            watcher.since = last
            if watcher.ended:
                return
        if log.durable - watcher.since > self._buffer:
            self._cut_off(watcher, f"fell more than {self._buffer} changes behind")
        elif closing:
            watcher.end()

    @staticmethod
    def _cut_off(watcher, why):
        watcher.end(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"watcher {why}; watch again with since_revision={watcher.since}")

    def _supervise(self):
        """Retire senders stuck on one watcher, so the others keep receiving; until the log
        has closed and every sender has ended its watchers."""
        while True:
            time.sleep(WATCH_STUCK_SECONDS / 2)
            now = time.monotonic()
            with self._lock:
                if self._log.closed and not self._senders:
                    return
                for sender in list(self._senders):
                    current = sender.current  # the sender clears it without the lock
                    if current is not None and now - sender.busy_since > WATCH_STUCK_SECONDS:
                        self._retire_locked(sender, current)

    def _retire_locked(self, sender, current):
        sender.retired = True
        self._senders.remove(sender)
        others = sender.watchers - {current}
        sender.watchers = {current}
        logger.info("sending to one watcher took over %.1f s; %d other watchers move to a new "
                    "sender", WATCH_STUCK_SECONDS, len(others))
        if others:
            self._start_locked(list(others))

    def _leave(self, sender):
        """A sender ends: its watchers still on are added again (ended, if the log closed)."""
        with self._lock:
            if sender in self._senders:
                self._senders.remove(sender)
            watchers = [watcher for watcher in sender.watchers if not watcher.ended]
            sender.watchers = set()
        for watcher in watchers:
            self.add(watcher)


# --- attached presence: streams that hold sessions live -------------------------------------


class AttachedStream:
    """One Attach stream: the session it holds, its holder id, and how to send to it."""

    __slots__ = ("client_id", "session_id", "holder", "context", "send", "attached", "ended",
                 "closed", "let_go", "settled_at")

    def __init__(self, client_id, session_id, holder, context, send):
        self.client_id = client_id
        self.session_id = session_id
        self.holder = holder
        self.context = context
        self.send = send
        self.attached = False  # its attach has been applied
        self.ended = False  # the call is over, however it ended
        self.closed = False  # the server has ended it (at most once)
        self.let_go = False  # its end ends nothing: it was taken over, or the server let go
        self.settled_at = 0.0  # when it became its session's holder here (monotonic)

    @property
    def key(self):
        """The session it holds, as the attachments file it."""
        return self.client_id, self.session_id

    def message(self, status, lease=0):
        """What this stream does to its session: attach it (CONNECTED) or let go of it."""
        return Message(self.client_id, status, self.session_id, lease, self.holder)

    def close(self, code=None, details=""):
        """End the stream from the server's side: cleanly, or with a code and its details."""
        if code is not None:
            self.context.set_code(code)
            self.context.set_details(details)
        self.send(None)


DETACH_BATCH = 500
ATTACH_SWEEP_SECONDS = 1.0  # how often streams are checked against the records
DETACH_RETRY_SECONDS = 1.0
DETACH_GATHER_SECONDS = 0.02  # how long the first end waits for the others of a disconnect


class Detacher:
    """A thread that ends the sessions of streams that ended, many in one apply_many.

    gRPC says a stream ended on its own serving thread, which must not wait for the store;
    the ends queue here instead. The first end after a quiet spell waits a moment for the
    rest of its disconnect (gRPC reports a closed connection's streams one by one), and
    whatever queued while a commit ran goes in the next, so a mass disconnect of thousands
    costs a few commits. A store that refuses is tried again each second; ends still refused
    when the server stops stay attached in the store, and become leases when a server loads
    it again.
    """

    gather_seconds = DETACH_GATHER_SECONDS

    def __init__(self, registry: Registry, name: str = "detacher") -> None:
        self._registry = registry
        self._queued: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message):
        """Queue a stream's goodbye (or attach); cheap enough for gRPC's serving thread."""
        with self._ready:
            self._queued.append(message)
            self._ready.notify()

    def close(self):
        """Apply what has queued, then end the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def _run(self):
        """Apply what queued, a batch at a time, until closed."""
        failing = False
        while batch := self._take(failing):
            try:
                self._registry.apply_many(batch)
                failing = False
            except Exception as error:  # the store, or a bug: the thread must go on either way
                if not failing:
                    logger.error("cannot end %d sessions whose streams ended (trying again each "
                                 "second): %s", len(batch), error,
                                 exc_info=not isinstance(error, StoreError))
                failing = True
                with self._ready:
                    self._queued.extendleft(reversed(batch))

    def _take(self, failing):
        """The next batch; empty once closing with nothing (or nothing the store takes) left."""
        with self._ready:
            if failing and not self._closing:
                self._ready.wait(DETACH_RETRY_SECONDS)
            if not self._queued:
                while not self._queued and not self._closing:
                    self._ready.wait()
                self._gather()
            if self._closing and failing:
                logger.error("%d sessions whose streams ended stay attached in the store; the "
                             "next server to load it makes them leases", len(self._queued))
                return []
            count = min(len(self._queued), DETACH_BATCH)
            return [self._queued.popleft() for _ in range(count)]

    def _gather(self):
        """Wait while more ends keep coming, each within gather_seconds of the last (called
        holding the lock), for at most ten times that or a full batch."""
        deadline = time.monotonic() + 10 * self.gather_seconds
        while self.gather_seconds and not self._closing and len(self._queued) < DETACH_BATCH:
            queued = len(self._queued)
            wait = min(self.gather_seconds, deadline - time.monotonic())
            if wait <= 0 or not self._ready.wait_for(
                    lambda queued=queued: self._closing or len(self._queued) > queued, wait):
                return


class Attacher(Detacher):
    """A thread that applies the attaches of new streams, many in one apply_many, then has
    each stream told. An Attach call thus returns at once: a burst of clients attaching (all
    of them again after a restart, say) holds no pool thread each and shares commits."""

    gather_seconds = 0.0  # a client waits for its ATTACHED; a burst shares commits anyway

    def __init__(self, registry: Registry, settle: Callable[["AttachedStream", object], None]):
        self._settle = settle  # settle(stream, its record, or the error that refused it)
        super().__init__(registry, name="attacher")

    def _run(self):
        while streams := self._take(False):
            streams = [stream for stream in streams if not stream.ended]  # gone meanwhile
            try:
                outcomes = self._apply(streams)
            except Exception as error:  # a bug: refuse these, and go on with the next ones
                logger.exception("cannot attach %d streams", len(streams))
                outcomes = [Unavailable(f"could not attach: {error}")] * len(streams)
            for stream, outcome in zip(streams, outcomes, strict=True):
                self._settle(stream, outcome)

    def _apply(self, streams):
        """Each stream's record after its attach, or the error that refused it. A batch a
        limit refuses (one client's session cap) is applied again one by one, so that one
        stream's refusal is its own; one the store refuses is refused whole, at once."""
        messages = [stream.message(Status.CONNECTED) for stream in streams]
        try:
            return [record for record, _ in self._registry.apply_many(messages)]
        except (StoreError, Unavailable) as error:
            return [error] * len(messages)
        except REFUSED as error:
            if len(messages) == 1:
                return [error]
        outcomes: list[object] = []
        for message in messages:
            try:
                outcomes.append(self._registry.apply_one(message)[0])
            except REFUSED as error:
                outcomes.append(error)
        return outcomes


class Attachments:
    """The Attach streams this server serves, and which of them holds each session.

    An attach goes through the registry like a Hello: a change when the session is new, a
    renewal when it was live (a Hello's, a lease's, or another stream's, which then ends
    with ABORTED). The session's holder in the record names the stream, so when a stream
    ends, however it ends, it lets go of its session through the registry only while it
    still holds it there: a stream taken over, here or on another replica, never ends its
    successor's session. No thread waits on a stream: the Attacher applies its attach and
    tells it, gRPC calls back when it ends, and the Detacher applies the end.
    """

    def __init__(self, registry: Registry, limit: int = DEFAULT_MAX_ATTACHED,
                 reattach_seconds: float = DEFAULT_REATTACH_GRACE) -> None:
        self._registry = registry
        self._limit = limit
        self.reattach_seconds = reattach_seconds
        self._server_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], AttachedStream] = {}  # session -> its stream
        self._open = 0  # streams counted against the limit, attached or on their way
        self._stopping = False
        self._detacher = Detacher(registry)
        self._attacher = Attacher(registry, self._attached)
        registry.hold_streams_as(self._server_id, self.lapsed)
        self._closing = threading.Event()
        threading.Thread(target=self._sweep_loop, name="attach-sweeper", daemon=True).start()

    @property
    def attached(self) -> int:
        """How many sessions streams hold here."""
        return len(self._held)

    def attach(self, client_id: str, session_id: str, context, send) -> None:
        """Have a new stream's session attached: the attacher applies it and tells the stream
        ATTACHED, or ends it with the refusal (the session cap, the store). LimitExceeded
        past the stream limit and Unavailable while the server stops refuse it at once."""
        stream = self._open_stream(client_id, session_id, context, send)
        if not context.add_callback(functools.partial(self._ended, stream)):
            self._ended(stream)
            return
        self._attacher.put(stream)

    def _attached(self, stream, outcome):
        """The attacher's outcome for a stream: ATTACHED with its record when it holds the
        session now, or the refusal as the stream's status. A store that may have saved a
        refused attach all the same has the stream let go of the session as if it held it."""
        if isinstance(outcome, Exception):
            stream.closed = True
            if isinstance(outcome, StoreError) and self._registry.unsure_refusals:
                self._detacher.put(stream.message(Status.DISCONNECTED))  # saved, maybe
            stream.close(refusal_code(outcome), str(outcome))
        elif self._settle(stream):
            stream.send(attach_response(pb.AttachResponse.ATTACHED, outcome))

    def _open_stream(self, client_id, session_id, context, send):
        """A new stream with a holder id of its own, counted against the limit; or a refusal."""
        with self._lock:
            if self._stopping:
                raise Unavailable("the server is stopping: attach again to another replica, or "
                                  "to this one once it is back")
            if self._open >= self._limit:
                raise LimitExceeded(f"too many attached streams (limit {self._limit}, "
                                    "--max-attached); try again later")
            self._open += 1
        holder = f"{self._server_id}/{next(self._numbers)}"
        return AttachedStream(client_id, session_id, holder, context, send)

    def _settle(self, stream):
        """Now that its attach is applied, make the stream the session's holder here, ending
        the one it took over; unless it ended meanwhile, a later attach overtook it, or the
        server stops. Whether it holds the session."""
        with self._lock:
            stream.attached = True
            if stream.ended:
                self._detacher.put(stream.message(Status.DISCONNECTED))
                return False
            stopping = self._stopping
            if stopping:
                stream.let_go = stream.closed = True
                taken_over = None
            elif self._overtaken(stream):
                taken_over = stream
            else:
                taken_over = self._held.get(stream.key)
                self._held[stream.key] = stream
                stream.settled_at = time.monotonic()
            if taken_over is not None:
                taken_over.let_go = True
                if taken_over.closed:  # the server is ending it already
                    taken_over = None
                else:
                    taken_over.closed = True
        if stopping:
            self._let_go([stream])
            return False
        if taken_over is not None:
            taken_over.close(grpc.StatusCode.ABORTED,
                             f"session {echo(stream.session_id)!r} of client "
                             f"{echo(stream.client_id)} was attached by another stream; this one "
                             "no longer holds it")
        return taken_over is not stream

    def _overtaken(self, stream):
        """Whether another stream of this server attached the session after this one did (both
        attaches applied, that one settled first), as the record this server last saw says."""
        record = self._registry.get_cached(stream.client_id)
        session = record and find_session(record.sessions, stream.session_id)
        holder = session.holder if session else ""
        return holder != stream.holder and holder.startswith(f"{self._server_id}/")

    def _ended(self, stream):
        """gRPC's callback at a stream's end: let go of its session unless it was let go of."""
        with self._lock:
            stream.ended = True
            self._open -= 1
            if self._held.get(stream.key) is stream:
                del self._held[stream.key]
            detach = stream.attached and not stream.let_go
        if detach:
            self._detacher.put(stream.message(Status.DISCONNECTED))

    def stop(self):
        """The server stops: each session held here becomes a lease of reattach_seconds (kept
        in the store, not a change), and its stream is told SERVER_STOPPING and ended cleanly,
        so a client that attaches again in time (to another replica, or here once it is back)
        shows no disconnect at all."""
        with self._lock:
            self._stopping = True
            streams = [stream for stream in self._held.values() if not stream.closed]
            self._held.clear()
            for stream in streams:
                stream.let_go = stream.closed = True
        self._let_go(streams)
        if streams:
            logger.info("%d attached sessions are leases of %g s now, for their clients to "
                        "attach again", len(streams), self.reattach_seconds)

    def _let_go(self, streams):
        """Keep the streams' sessions as leases, tell each stream, and end it."""
        messages = [stream.message(Status.DISCONNECTED, self.reattach_seconds)
                    for stream in streams]
        try:
            self._registry.apply_in_batches(messages)
        except StoreError as error:
            logger.error("cannot keep attached sessions as leases: %s", error)
        notice = attach_response(pb.AttachResponse.SERVER_STOPPING,
                                 reattach_seconds=self.reattach_seconds)
        for stream in streams:
            stream.send(notice)
            stream.close()

    def _sweep_loop(self):
        while not self._closing.wait(ATTACH_SWEEP_SECONDS):
            try:
                self.sweep()
            except Exception:  # the thread must go on
                logger.exception("cannot check which attach streams still hold their sessions")

    def sweep(self):
        """End, ABORTED, every stream whose session the records say it no longer holds: taken
        over by a stream of another replica, or ended by a Goodbye (here or anywhere). Its end
        lets go only of what it still holds, which is nothing then."""
        settled_before = time.monotonic() - ATTACH_SWEEP_SECONDS  # the cache has those
        with self._lock:
            held = [stream for stream in self._held.values()
                    if not stream.closed and stream.settled_at < settled_before]
        gone = []
        for stream in held:
            record = self._registry.get_cached(stream.client_id)
            session = record and find_session(record.sessions, stream.session_id)
            if not session or session.holder != stream.holder:
                gone.append((stream, bool(session)))
        with self._lock:
            gone = [(stream, taken) for stream, taken in gone if not stream.closed]
            for stream, _ in gone:
                stream.closed = True
        for stream, taken in gone:
            what = f"session {echo(stream.session_id)!r} of client {echo(stream.client_id)}"
            stream.close(grpc.StatusCode.ABORTED,
                         f"{what} was attached by another stream; this one no longer holds it"
                         if taken else f"{what} was ended (a Goodbye); this stream no longer "
                         "holds it")

    def lapsed(self):
        """This replica cannot say in time that it lives, so the other replicas end the
        sessions its streams hold: end every stream (its session too, if it still holds it),
        for its client to attach again, to a replica that can vouch for it."""
        with self._lock:
            streams = [stream for stream in self._held.values() if not stream.closed]
            for stream in streams:
                stream.closed = True
        for stream in streams:
            stream.close(grpc.StatusCode.UNAVAILABLE,
                         "this replica lost the shared store, so it cannot vouch for its "
                         "sessions; attach again")

    def close(self):
        """Once the server has stopped: apply the attaches and ends still queued."""
        self._closing.set()
        self._attacher.close()
        self._detacher.close()


# --- stores: memory and SQLite behind one protocol -------------------------------------------


class Store(Protocol):
    """What the registry needs of a store: its records at start, and each change made durable.

    The registry hands over records under its lock, in revision order, each hand-over with
    the next position (1, 2, 3, ...); `wait` returns once a hand-over is durable, with the
    position of the last durable one, which may be later (writers share commits). Durability
    flows one way: the store never calls back into the registry.
    """

    immediate: bool  # durable once handed over (nothing to wait for)
    durable: int  # the position of the last durable hand-over

    def load(self) -> Iterable["Client"]:
        """Every record saved, at start."""

    def submit(self, records: Sequence["Client"], position: int) -> Any:
        """Take records to save; a ticket for wait. StoreError if it can no longer save."""

    def wait(self, ticket: Any) -> int:
        """Return once the ticket's records are durable: the last durable position."""

    def close(self) -> None:
        """Save what was handed over, then refuse more."""


class MemoryStore:
    """No persistence: for tests and throwaway runs."""

    immediate = True
    durable = 0

    def load(self) -> list[Client]:
        return []

    def submit(self, records: Sequence[Client], position: int) -> int:
        return position

    def wait(self, ticket: int) -> int:
        return ticket

    def close(self) -> None:
        pass


DEFAULT_SESSIONS_TEXT = '[["", 0.0]]'


def encode_sessions(sessions):
    """Sessions as the JSON text of the sessions column; the two commonest without json. A
    session no stream holds is [id, expiry], as before there were streams; a held one adds
    its holder."""
    if sessions is DEFAULT_SESSIONS:
        return DEFAULT_SESSIONS_TEXT
    if not sessions:  # every disconnected client
        return "[]"
    return json.dumps([session if session.holder else session[:2] for session in sessions])


def decode_sessions(text):
    """The sessions column back into sessions; the two commonest without json, shared."""
    if text == "[]":
        return ()
    if text == DEFAULT_SESSIONS_TEXT:
        return DEFAULT_SESSIONS
    sessions = tuple(Session(*session) for session in json.loads(text))
    return DEFAULT_SESSIONS if sessions == DEFAULT_SESSIONS else sessions


@functools.cache
def _upsert_statement(rows):
    """INSERT OR REPLACE of this many client rows, one statement."""
    return "INSERT OR REPLACE INTO clients VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)


class _Batch:
    """Hand-overs to commit together; `done` once a commit saved them or failed (`error`)."""

    __slots__ = ("records", "writers", "position", "gathering", "done", "error")

    def __init__(self):
        self.records = []
        self.writers = 0  # hand-overs in it
        self.position = 0
        self.gathering = False  # whether a writer waits for more to join it
        self.done = False
        self.error = None


class SqliteStore:
    """Durable store: each writer commits in its own thread, and writers that meet share one.

    `submit` adds records to the batch now gathering and returns it; `wait` takes the
    commit lock and, unless the holder before it already saved that batch, commits
    everything gathered so far (group commit), after a short wait for more while writers
    meet (gather_seconds). A lone writer thus commits at once, with no hand-off to another
    thread (a hand-off costs more here than the commit), and writers arriving while a
    commit runs share the next one. After every commit the database file and its
    WAL must still be the files it opened: one removed or replaced under the server would
    take every later commit with it, so the store refuses them instead.
    """

    immediate = False
    gather_seconds = COMMIT_GATHER_SECONDS
    SCHEMA_VERSION = 1
    _COLUMNS = ("client_id", "status", "changed_at", "last_seen", "revision", "reason", "sessions")
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS clients (
            client_id TEXT PRIMARY KEY,
            status INTEGER NOT NULL,
            changed_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            revision INTEGER NOT NULL,
            reason TEXT NOT NULL,
            sessions TEXT NOT NULL
        ) WITHOUT ROWID
    """
    _ROWS_PER_STATEMENT = 64
    _ROWS_PER_FETCH = 10_000
    # The commonest values come back as small numbers (no new object per row), and a
    # last_seen equal to changed_at as NULL, so records can share them.
    _LOAD = f"""
        SELECT client_id, changed_at,
               CASE WHEN last_seen = changed_at THEN NULL ELSE last_seen END, revision,
               CASE reason WHEN '{HELLO}' THEN 0 WHEN '{GOODBYE}' THEN 1
                           WHEN '{LEASE_EXPIRED}' THEN 2 WHEN '{ATTACH}' THEN 3
                           WHEN '{CONNECTION_CLOSED}' THEN 4 ELSE reason END,
               CASE sessions WHEN '[]' THEN 0 WHEN '{DEFAULT_SESSIONS_TEXT}' THEN 1
                             ELSE sessions END
        FROM clients
    """

    SYNC_LEVELS = ("normal", "full")

    def __init__(self, path, sync="normal"):
        """sync=normal: a commit is in the OS before the reply, safe from kill -9 and crashes of
        the server; sync=full also waits for the disk (fsync), safe from power loss, slower."""
        self.path = path
        if sync not in self.SYNC_LEVELS:
            raise StoreError(f"sync must be one of {', '.join(self.SYNC_LEVELS)}, got {sync!r}")
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            self._db.execute(self._SCHEMA)
            self._check_schema()
        except sqlite3.Error as error:
            raise StoreError(f"cannot open SQLite database {path}: {error}") from error
        self._files = {name: self._identity(name) for name in (path, f"{path}-wal")}
        self._mutex = threading.Lock()  # guards _pending and _error
        self._taken = threading.Condition(self._mutex)  # notified when a commit takes the batch
        self._commit_lock = threading.Lock()  # one commit at a time, in revision order
        self._pending = _Batch()
        self.durable = 0
        self.commits = 0
        self._last_writers = 0  # hand-overs the last commit saved
        self._error = None
        self.commit_timer = None

    def _check_schema(self):
        """Refuse a database of another schema rather than misread it."""
        columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(clients)"))
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if columns != self._COLUMNS or version not in (0, self.SCHEMA_VERSION):
            raise StoreError(f"{self.path} holds a clients table this server does not know "
                             f"(columns {', '.join(columns)}; schema version {version})")
        if version != self.SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")

    @staticmethod
    def _identity(name):
        """The file's device and inode, or None when there is no such file."""
        try:
            status = os.stat(name)
        except FileNotFoundError:
            return None
        except OSError as error:  # the folder made unreadable, say: the files cannot be vouched for
            return f"made unreadable ({error.strerror})"
        return status.st_dev, status.st_ino

    def load(self):
        """Every saved record, read in slices so that loading holds little beyond the records.

        Records share what a running server shares: the reason texts, the common sessions,
        and one time object when changed_at equals last_seen (a million clients' worth)."""
        records = []
        reasons = (HELLO, GOODBYE, LEASE_EXPIRED, ATTACH, CONNECTION_CLOSED)
        sessions_of = ((), DEFAULT_SESSIONS)
        try:
            cursor = self._db.execute(self._LOAD)
            while rows := cursor.fetchmany(self._ROWS_PER_FETCH):
                records += [Client(client_id, changed_at,
                                   changed_at if last_seen is None else last_seen, revision,
                                   reasons[reason] if type(reason) is int else reason,
                                   sessions_of[sessions] if type(sessions) is int
                                   else decode_sessions(sessions))
                            for client_id, changed_at, last_seen, revision, reason, sessions
                            in rows]
        except (sqlite3.Error, ValueError, TypeError) as error:
            raise StoreError(f"cannot read {self.path}: {error}") from error
        logger.info("loaded %d clients from %s", len(records), self.path)
        return records

    def submit(self, records, position):
        with self._mutex:
            if self._error is not None:
                raise self._error
            batch = self._pending
            batch.records.extend(records)
            batch.writers += 1
            batch.position = position
            return batch

    def wait(self, batch):
        """Return once batch is saved, by this thread or by the one that held the lock before:
        the last durable position."""
        if not batch.done and self.gather_seconds and max(batch.writers, self._last_writers) > 1:
            self._gather(batch)
        if not batch.done:  # else saved by a commit since (done is set last, error before it)
            with self._commit_lock:  # held by a later commit, maybe: this one need not wait
                if not batch.done:
                    self._commit_pending()
        if batch.error is not None:
            raise batch.error
        return self.durable

    def _gather(self, batch):
        """Writers meet: the first to wait for batch sleeps gather_seconds, so that more join it
        before it commits; the others wait until it takes the batch rather than sleep too."""
        with self._taken:
            if batch.gathering:
                self._taken.wait_for(lambda: self._pending is not batch)
                return
            batch.gathering = True
        time.sleep(self.gather_seconds)

    def _commit_pending(self):
        """Save the batch gathering now; called holding the commit lock."""
        with self._mutex:
            batch, self._pending = self._pending, _Batch()
            self._taken.notify_all()
            error = self._error
        if error is None and batch.records:
            started = time.perf_counter()
            try:
                self._save(batch.records)
                self._check_files()
            except StoreError as failure:
                error = self._fail(str(failure))
            except Exception as failure:  # sqlite3.Error above all: never leave a batch undone
                error = self._fail(f"the store could not save the change: {failure}")
            else:
                if self.commit_timer:
                    self.commit_timer.observe(time.perf_counter() - started)
                self.durable = batch.position
                self.commits += 1
                self._last_writers = batch.writers
        batch.error = error
        batch.done = True

    def _save(self, records):
        """Write records in as few statements as possible: sqlite3 lets go of the GIL for each
        step, and on a busy server getting it back can take a while."""
        rows = [(record.client_id, record.status, *record[1:5], encode_sessions(record.sessions))
                for record in records]
        size = self._ROWS_PER_STATEMENT
        if len(rows) <= size:  # one statement is a transaction of its own
            self._upsert(rows)
            return
        self._db.execute("BEGIN")
        try:
            for start in range(0, len(rows), size):
                self._upsert(rows[start:start + size])
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _upsert(self, rows):
        self._db.execute(_upsert_statement(len(rows)), list(itertools.chain.from_iterable(rows)))

    def _check_files(self):
        """The commit reached the files this store opened, not ones removed or replaced."""
        for name, identity in self._files.items():
            now = self._identity(name)
            if now != identity:
                what = ("removed" if now is None else now if isinstance(now, str)
                        else "replaced")
                raise StoreError(f"the store could not save the change: {name} was {what} "
                                 "while the server ran, so nothing written since is durable; "
                                 "restart the server")

    def _fail(self, reason):
        """Refuse this batch and every later write: memory is ahead of disk."""
        logger.error("SQLite commit failed, refusing further writes: %s", reason)
        with self._mutex:
            self._error = StoreError(reason)
            return self._error

    def close(self):
        """Commit what is gathered, refuse later writes, then close the database."""
        with self._commit_lock:
            if self._pending.records:
                self._commit_pending()
            with self._mutex:
                self._error = self._error or StoreError("the store is closed")
            self._db.close()


# The redis:// store: records in a hash, the revision a counter, every write an entry of one
# stream whose ids are revisions, leases in a sorted set scored by expiry. A replica keeps its
# own cache of the records, fed by the stream; this class only talks to Redis.

REDIS_TIMEOUT = 5.0  # seconds a call may wait for Redis before the store says it is unreachable
REDIS_MAX_BLOCK = 10.0  # the longest read_changes waits for a new entry
REDIS_SLICE = 10_000  # records per HSCAN and entries per XRANGE
REDIS_CONNECTIONS = 64  # a store's connections to Redis at most, for calls and for blocking reads
REDIS_OPTIONS = ("ca", "timeout")
REDIS_URL_FORMS = ("redis://[:PASSWORD@]HOST:PORT/DB or "
                   "rediss://[:PASSWORD@]HOST:PORT/DB?ca=CA_FILE")
_LEASE_SEPARATOR = "\0"  # ids never hold control characters

# Commit the writes of several writers in one call: each writer's items (a group) are saved
# together or not at all, and only if each client's stored record is still the one its writer
# read; a group refused leaves the others alone. A client met again later in the call follows
# from its earlier item, so only its first item is compared, and a group with a client of a
# refused group is refused too (it followed from what was not saved). Every item saved is
# appended to the stream: a change as <its new revision>-0, a renewal (no revision of its own)
# as <the current revision>-<n>.
# KEYS: the records hash, the revision counter, the change stream, the lease set.
# ARGV: the history to keep; the stream id its caller has read up to ('' when it follows no
# stream) and how many entries after it to answer at most; then per group its number of items
# and per item: client id, the record its writer read ('' when none), the record after its
# revision, the event kind ('' for a renewal), the session id, the revision a renewal keeps,
# how many lease members to remove and those members, how many leases to set and a score and
# member for each. Two passes: compare, then save.
# Answers {the revision of each item (0 when refused), the stream id of each item saved, the
# stored record of each item refused (after the call), per group the position in it of the
# item whose stored record had changed (0 when it followed a refused group or was saved), the
# entries after the caller's stream id that came before this call's}: a replica follows the
# others' writes in the answer to its own, without a read of the stream per commit.
# Redis's own time goes mostly to each command a script calls, so per item it calls only XADD:
# the stored records come in one HMGET, the saved ones go in one HSET (1,000 values a call at
# most, what unpack takes), the revision is read and set once, the stream trimmed once.
# A replica's liveness, scored by Redis's own clock: renew (1 if it was still live), the
# lapsed ones, and taking one off the set only while it is still lapsed.
_REDIS_NOW = "local t = redis.call('TIME') local now = t[1] + t[2] / 1e6 "
_LIVENESS_SCRIPTS = (
    _REDIS_NOW + """
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if old and tonumber(old) >= now then return 1 end
return 0""",
    _REDIS_NOW + "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)",
    _REDIS_NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < now then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0""",
)

_COMMIT_SCRIPT = """
local history, count, at = ARGV[1], #ARGV, 4
local function skip(from)
  local leases_at = from + 7 + tonumber(ARGV[from + 6])
  return leases_at + 1 + 2 * tonumber(ARGV[leases_at])
end
local function in_chunks(command, key, values, step)
  local replies = {}
  for first = 1, #values, step do
    local last = math.min(first + step - 1, #values)
    local reply = redis.call(command, key, unpack(values, first, last))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do replies[#replies + 1] = value end
    end
  end
  return replies
end
local names, seen = {}, {}
while at <= count do
  local size = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, size do
    if not seen[ARGV[at]] then
      seen[ARGV[at]] = true
      names[#names + 1] = ARGV[at]
    end
    at = skip(at)
  end
end
local stored = {}
for position, current in ipairs(in_chunks('HMGET', KEYS[1], names, 1000)) do
  stored[names[position]] = current or ''
end
local compared, refused, groups, conflicts = {}, {}, {}, {}
at = 4
while at <= count do
  local size, clients, conflict = tonumber(ARGV[at]), {}, nil
  local group = {at + 1, size}
  at = at + 1
  for position = 1, size do
    local client = ARGV[at]
    clients[position] = client
    if not compared[client] then
      compared[client] = true
      if conflict == nil and stored[client] ~= ARGV[at + 1] then conflict = position end
    elseif refused[client] and conflict == nil then
      conflict = 0
    end
    at = skip(at)
  end
  if conflict ~= nil then
    for _, client in ipairs(clients) do refused[client] = true end
  end
  group[3] = conflict
  groups[#groups + 1] = group
  conflicts[#groups] = conflict or 0
end
local before = {}
if ARGV[2] ~= '' then
  before = redis.call('XRANGE', KEYS[3], '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
end
local newest = tonumber(redis.call('GET', KEYS[2]) or '0')
local last = newest
local revisions, ids, currents, latest, saved, index = {}, {}, {}, {}, {}, 1
for _, group in ipairs(groups) do
  at = group[1]
  for _ = 1, group[2] do
    local client, tail, kind, revision = ARGV[at], ARGV[at + 2], ARGV[at + 3], ARGV[at + 5]
    local removed = tonumber(ARGV[at + 6])
    local leases_at = at + 7 + removed
    local leased = tonumber(ARGV[leases_at])
    if group[3] ~= nil then
      revisions[index], ids[index], currents[index] = 0, false, client
    else
      if kind ~= '' then
        newest = newest + 1
        revision = string.format('%d', newest)
        latest[client] = revision
      elseif latest[client] then
        revision = latest[client]  -- a renewal after a change of this call keeps that revision
      end
      local record = revision .. tail
      if kind ~= '' then
        ids[index] = redis.call('XADD', KEYS[3], revision .. '-0',
                                'c', client, 'r', record, 'k', kind, 's', ARGV[at + 4])
      else
        ids[index] = redis.call('XADD', KEYS[3], string.format('%d', newest) .. '-*',
                                'c', client, 'r', record)
      end
      saved[#saved + 1], saved[#saved + 2] = client, record
      if removed > 0 then redis.call('ZREM', KEYS[4], unpack(ARGV, at + 7, at + 6 + removed)) end
      if leased > 0 then
        redis.call('ZADD', KEYS[4], unpack(ARGV, leases_at + 1, leases_at + 2 * leased))
      end
      revisions[index], currents[index] = tonumber(revision), false
    end
    at, index = leases_at + 1 + 2 * leased, index + 1
  end
end
if #saved > 0 then
  in_chunks('HSET', KEYS[1], saved, 1000)
  redis.call('XTRIM', KEYS[3], 'MAXLEN', '~', history)
end
if newest ~= last then redis.call('SET', KEYS[2], string.format('%d', newest)) end
for position, client in ipairs(currents) do
  if client then currents[position] = redis.call('HGET', KEYS[1], client) or false end
end
return {revisions, ids, currents, conflicts, before}
"""


class ChangesTrimmed(StoreError):
    """The stream no longer holds every entry after the id asked for: load again."""


# (client id, the stored bytes its writer read or None, the record after, (kind, session id)
# of its change or None for a renewal)
CommitItem = tuple[str, bytes | None, Client, tuple[EventKind, str] | None]


class CommitResult(NamedTuple):
    """What became of one group of items in a commit call: saved with its revisions, or
    refused, and why."""

    ok: bool
    revisions: list  # one per item when ok: the change's new revision, or a renewal's own
    conflict: int  # when refused, the index of the item whose stored record had changed (-1:
    # none had; it followed from a refused group of the same call)
    current: bytes | None  # when refused, that item's (or the first item's) client's stored
    # record (None: there is none)
    ids: list  # one per item when ok: its entry's id in the stream
    stored: dict  # when refused, each of its clients' stored record after the call (or None)


def encode_record_tail(record: Client) -> bytes:
    """A record as Redis stores it, less the revision in front that the commit script adds."""
    return (f"\t{record.changed_at!r}\t{record.last_seen!r}\t{record.reason}\t"
            f"{encode_sessions(record.sessions)}").encode()


def encode_record(record: Client) -> bytes:
    """A record exactly as Redis stores it, so a replica can compare from its cache without
    fetching."""
    return str(record.revision).encode() + encode_record_tail(record)


def decode_record(client_id: str, value: bytes) -> Client:
    """A record back from Redis's bytes."""
    revision, changed_at, last_seen, reason, sessions = value.decode().split("\t", 4)
    return Client(client_id, float(changed_at), float(last_seen), int(revision), reason,
                  decode_sessions(sessions))


def decode_records(values: dict[bytes, bytes]) -> dict[str, Client]:
    """Records back from Redis's bytes by client id, sharing what a running server shares (the
    reason texts, the common sessions, one time object when changed_at equals last_seen)."""
    reasons = {HELLO: HELLO, GOODBYE: GOODBYE, LEASE_EXPIRED: LEASE_EXPIRED}
    records = {}
    for key, value in values.items():
        revision, changed_at, last_seen, reason, sessions = value.decode().split("\t", 4)
        changed, client_id = float(changed_at), key.decode()
        records[client_id] = Client(client_id, changed,
                                    changed if last_seen == changed_at else float(last_seen),
                                    int(revision), reasons.setdefault(reason, reason),
                                    decode_sessions(sessions))
    return records


def lease_member(client_id: str, session_id: str) -> str:
    """A leased session's member in the lease set."""
    return f"{client_id}{_LEASE_SEPARATOR}{session_id}"


def lease_changes(old: Client | None, new: Client) -> tuple[list, list]:
    """The lease members to remove, and the score and member of each lease to set, when a
    client's record goes from old to new."""
    before = {session.session_id: session.expires_at
              for session in (old.sessions if old else ()) if session.expires_at}
    after = {session.session_id: session.expires_at
             for session in new.sessions if session.expires_at}
    removed = [lease_member(new.client_id, session_id)
               for session_id in before if session_id not in after]
    leases = [value for session_id, expires_at in after.items()
              if before.get(session_id) != expires_at
              for value in (repr(expires_at), lease_member(new.client_id, session_id))]
    return removed, leases


def stream_id(text: str | bytes) -> tuple[int, int]:
    """A stream entry id as (revision, renewals since it)."""
    revision, _, renewal = (text.decode() if isinstance(text, bytes) else text).partition("-")
    return int(revision), int(renewal or 0)


def id_at(position: tuple[int, int]) -> str:
    """A stream position back as the entry id Redis knows it by."""
    return f"{position[0]}-{position[1]}"


def follows(previous: tuple[int, int], entry: tuple[int, int]) -> bool:
    """Whether entry comes right after previous: ids run without gaps, a renewal being the
    next n of its revision and a change the next revision."""
    return entry == (previous[0], previous[1] + 1) or entry == (previous[0] + 1, 0)


def redis_client():
    """redis-py, imported only by a server that uses Redis: the import takes 0.1 s of every
    start."""
    import redis
    import redis.backoff
    import redis.retry
    return redis


def redis_options(url: str) -> dict:
    """redis-py's connection options (a connection pool's) for a redis:// or rediss:// URL;
    StoreError for a bad one."""
    redis = redis_client()
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        port = None
    database = parts.path.strip("/") or "0"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or port is None \
            or not database.isdigit():
        raise StoreError(f"not a Redis store URL: {url!r}; use {REDIS_URL_FORMS}")
    options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(options) - set(REDIS_OPTIONS)
    if unknown:
        raise StoreError(f"unknown option {sorted(unknown)[0]!r} in {url!r}: "
                         f"only {' and '.join(REDIS_OPTIONS)}")
    if "ca" in options and parts.scheme != "rediss":
        raise StoreError(f"the ca option is for rediss:// (TLS), not {url!r}")
    timeout = options.get("timeout", [REDIS_TIMEOUT])[-1]
    try:
        timeout = float(timeout)
    except ValueError:
        timeout = 0
    if not timeout > 0:
        raise StoreError(f"timeout must be a positive number of seconds in {url!r}")
    settings = {
        "host": parts.hostname, "port": port, "db": int(database),
        "username": urllib.parse.unquote(parts.username) if parts.username else None,
        "password": urllib.parse.unquote(parts.password) if parts.password else None,
        "socket_timeout": timeout, "socket_connect_timeout": timeout,
        # One immediate retry on a fresh connection: a pooled one may be dead after Redis
        # restarted. Never more, so a Redis that is away is reported at once.
        "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 1, (redis.ConnectionError,)),
    }
    if parts.scheme == "rediss":
        settings.update(connection_class=redis.SSLConnection,
                        ssl_ca_certs=options.get("ca", [None])[-1])
    return settings


class RedisStore:
    """The records, the revision sequence, the change stream and the leases of every replica,
    in one Redis.

    Every write goes through one Lua script that compares the record its writer read with the
    stored one (bytes, so a renewal in between is noticed too) and, when they match, stores the
    new record, takes the next revision, appends the entry to the stream and moves the client's
    leases, all in one step. The stream's ids are the revisions (`<revision>-0`), and a renewal,
    which has no revision of its own, is appended as `<current revision>-<n>`: ids run without
    gaps, so a reader can tell when the history it needs was trimmed. Any failure to reach Redis
    is a StoreError; redis-py reconnects by itself when Redis is back.
    """

    shared = True  # several servers share it: each keeps a cache (SharedRegistry)

    def __init__(self, url: str, history: int = DEFAULT_WATCH_HISTORY, prefix: str = "presence"):
        options = redis_options(url)
        self.where = f"{options['host']}:{options['port']}"
        self._history = history
        self._clients, self._revision, self._changes, self._leases, self._replicas = (
            f"{prefix}:{name}" for name in ("clients", "revision", "changes", "leases",
                                            "replicas"))
        self._closed = False
        self.commits = 0  # commit script calls made (counted without a lock: a figure only)
        self._redis = self._connect(options)
        # Blocking reads wait longer than any other call, on connections of their own.
        reader_timeout = options["socket_timeout"] + REDIS_MAX_BLOCK
        self._reader = self._connect({**options, "socket_timeout": reader_timeout})
        self._liveness_script, self._lapsed_script, self._forget_script = (
            self._redis.register_script(script) for script in _LIVENESS_SCRIPTS)
        with self._talking():
            version = self._redis.info("server")["redis_version"]
            self._committer = self._connect_committer(options)
        self._commit_script = self._committer.register_script(_COMMIT_SCRIPT)
        if tuple(int(part) for part in str(version).split(".")[:2]) < (7, 0):
            self.close()
            raise StoreError(f"the shared store (Redis at {self.where}) runs Redis {version}; "
                             "this server needs Redis 7.0 or later")

    @staticmethod
    def _connect(options):
        """A client on a pool of at most REDIS_CONNECTIONS connections where a call waits for a
        free one (up to its timeout): redis-py's own pool refuses the 101st call at once ("Too
        many connections"), which a replica opening hundreds of watch streams reached."""
        redis = redis_client()
        return redis.Redis(connection_pool=redis.BlockingConnectionPool(
            max_connections=REDIS_CONNECTIONS, timeout=options["socket_timeout"], **options))

    @staticmethod
    def _connect_committer(options):
        """A client on one connection of its own, open from now on, for the commit calls: a
        replica's writers commit one call at a time, so they need no pool, and the connection
        is a new one only after the last broke."""
        redis = redis_client()
        return redis.Redis(connection_pool=redis.ConnectionPool(max_connections=1, **options),
                           single_connection_client=True)

    @contextlib.contextmanager
    def _talking(self):
        """Turn every failure to reach Redis or to read what it holds into a StoreError."""
        if self._closed:
            raise StoreError("the store is closed")
        redis = redis_client()
        try:
            yield
        except redis.TimeoutError as error:
            raise StoreError(f"the shared store (Redis at {self.where}) did not answer in "
                             f"time ({error}); a change sent meanwhile may still be saved, and "
                             "sending it again is safe") from error
        except redis.ConnectionError as error:
            raise StoreError(f"the shared store (Redis at {self.where}) is unreachable: "
                             f"{error}") from error
        except redis.RedisError as error:
            raise StoreError(f"the shared store (Redis at {self.where}) failed: {error}") from error
        except (ValueError, UnicodeError) as error:
            raise StoreError(f"the shared store (Redis at {self.where}) holds data this server "
                             f"cannot read: {error}") from error

    def load(self) -> tuple[list[Client], str]:
        """Every record, and the stream id they are at, so a reader resumes there without a gap.

        Each slice of the hash is decoded as it comes, so loading holds little beyond the
        records (a million clients' bytes at once took 150 MiB the server kept)."""
        with self._talking():
            start = self._last_id()
            records: dict[str, Client] = {}
            cursor = None
            while cursor != 0:
                cursor, values = self._redis.hscan(self._clients, cursor or 0, count=REDIS_SLICE)
                records.update(decode_records(values))
            end = self._last_id()
            if end != start:  # writes went on while we read: bring every record to `end`
                entries = self._range(f"({start}", end)
                self._check_follows(start, entries)
                for _, fields in entries:
                    client_id = fields[b"c"].decode()
                    records[client_id] = decode_record(client_id, fields[b"r"])
        logger.info("loaded %d clients from Redis at %s", len(records), self.where)
        return list(records.values()), end

    def fetch(self, client_id: str) -> tuple[Client | None, bytes | None]:
        """The client's stored record and its bytes, which a commit compares against."""
        with self._talking():
            value = self._redis.hget(self._clients, client_id)
            return (decode_record(client_id, value) if value is not None else None), value

    def commit(self, client_id: str, expected: bytes | None, record: Client,
               change: tuple[EventKind, str] | None) -> tuple[bool, int, bytes | None]:
        """Save record if the stored one is still `expected`: (True, its revision, None), or
        (False, 0, the stored bytes) for the caller to work the change out again."""
        result = self.commit_many([(client_id, expected, record, change)])
        if result.ok:
            return True, result.revisions[0], None
        return False, 0, result.current

    def commit_many(self, items: Sequence[CommitItem]) -> CommitResult:
        """Save several (client id, expected, record, change) in one step, all or none; a later
        item of the same client follows from its earlier one (its expected is not compared)."""
        if not items:
            return CommitResult(True, [], -1, None, [], {})
        return self.commit_groups([items])[0]

    def commit_groups(self, groups: Sequence[Sequence[CommitItem]]) -> list[CommitResult]:
        """Save the groups of several writers in one round trip, each group as commit_many
        would; a group refused refuses the later groups that share a client with it."""
        return self.commit_following(groups)[0] if groups else []

    def commit_following(self, groups: Sequence[Sequence[CommitItem]], since: str = "",
                         count: int = 0) -> tuple[list[CommitResult], list | None]:
        """commit_groups, and in the same round trip up to count stream entries after since
        that came before this call's (as read_changes gives them), or None when they do not
        run on from since (the stream was trimmed) or count of them did not reach this call's."""
        revisions, ids, currents, conflicts, before = self._run_commit(groups, since, count)
        results, start = [], 0
        for group, conflict in zip(groups, conflicts, strict=True):
            end = start + len(group)
            if ids[start] is not None:
                results.append(CommitResult(True, revisions[start:end], -1, None,
                                            [entry_id.decode() for entry_id in ids[start:end]],
                                            {}))
            else:
                stored = {item[0]: current for item, current in zip(group, currents[start:end],
                                                                     strict=True)}
                results.append(CommitResult(False, [], conflict - 1,
                                            stored[group[max(conflict - 1, 0)][0]], [], stored))
            start = end
        return results, self._entries_before(since, count, before)

    def _entries_before(self, since, count, entries):
        """The entries a commit call answered after since, decoded; None when they leave a gap
        after since or before the call's own, or cannot be read (the call saved all the same:
        the follower reads them, and says what is wrong)."""
        if not since or len(entries) >= count:
            return None
        try:
            self._check_follows(since, entries)
            return [self._decode_entry((position, dict(zip(fields[::2], fields[1::2],
                                                           strict=True))))
                    for position, fields in entries]
        except ChangesTrimmed:
            return None
        except (ValueError, UnicodeError, KeyError) as error:
            logger.warning("cannot read the entries a commit call answered (%s); the follower "
                           "reads them", error)
            return None

    def _run_commit(self, groups, since="", count=0):
        """Call the commit script on groups of items, asking for the entries after since."""
        arguments: list = [self._history, since, count]
        previous: dict[str, Client] = {}
        for items in groups:
            arguments.append(len(items))
            for client_id, expected, record, change in items:
                if client_id in previous:
                    old = previous[client_id]
                else:
                    old = decode_record(client_id, expected) if expected is not None else None
                removed, leases = lease_changes(old, record)
                kind, session_id = (int(change[0]), change[1]) if change else ("", "")
                arguments += [client_id, expected or b"", encode_record_tail(record), kind,
                              session_id, record.revision, len(removed), *removed,
                              len(leases) // 2, *leases]
                previous[client_id] = record
        self.commits += 1
        with self._talking():
            return self._commit_script(
                keys=[self._clients, self._revision, self._changes, self._leases],
                args=arguments)

    def read_changes(self, after_id: str, block_seconds: float,
                     count: int) -> list[tuple[str, Client, EventKind | None, str]]:
        """Up to count stream entries after after_id, waiting up to block_seconds for one:
        (id, record, kind, session id), kind None for a renewal."""
        block = min(block_seconds, REDIS_MAX_BLOCK)
        with self._talking():
            reply = self._reader.xread({self._changes: after_id}, count=count,
                                       block=max(1, int(block * 1000)) if block > 0 else None)
            entries = reply[0][1] if reply else []
            self._check_follows(after_id, entries)
            return [self._decode_entry(entry) for entry in entries]

    def last_id(self) -> str:
        """The id of the newest stream entry: a reader that has it has every write before."""
        with self._talking():
            return self._last_id()

    def due_leases(self, now: float, limit: int) -> list[tuple[str, str]]:
        """Up to limit (client id, session id) whose lease ran out by now, earliest first."""
        with self._talking():
            members = self._redis.zrangebyscore(self._leases, "-inf", now, start=0, num=limit)
            return [tuple(member.decode().split(_LEASE_SEPARATOR, 1)) for member in members]

    def renew_replica(self, server_id: str, seconds: float) -> bool:
        """Say that the replica server_id lives, and its attached streams with it, for seconds
        more by Redis's own clock (so replicas' clocks need not agree); whether it was still
        live until now (False: its liveness ran out, or others took it off the set)."""
        with self._talking():
            return bool(self._liveness_script(keys=[self._replicas], args=[server_id, seconds]))

    def lapsed_replicas(self) -> list[str]:
        """The replicas whose liveness ran out, by Redis's clock: they died, or lost Redis for
        longer than their liveness."""
        with self._talking():
            return [member.decode() for member in self._lapsed_script(keys=[self._replicas])]

    def forget_replica(self, server_id: str) -> None:
        """Take a lapsed replica off the liveness set once its sessions were ended; one that
        renewed meanwhile stays."""
        with self._talking():
            self._forget_script(keys=[self._replicas], args=[server_id])

    def changes_since(self, revision: int) -> list[tuple[str, Client, EventKind, str]] | None:
        """Every change after revision in order, renewals left out, for a watcher that resumes;
        None when the history no longer holds them all."""
        with self._talking():
            entries = self._range(f"{revision + 1}-0", "+")
            if entries and stream_id(entries[0][0]) != (revision + 1, 0):
                return None
            try:
                self._check_follows(f"{revision + 1}-0", entries[1:])
            except ChangesTrimmed:
                return None
            changes = [self._decode_entry(entry) for entry in entries]
        return [change for change in changes if change[2] is not None]

    def close(self) -> None:
        """Let go of every connection; later calls are refused."""
        self._closed = True
        for client in (self._redis, self._reader, self._committer):
            client.close()
            client.connection_pool.disconnect()  # close() hands a pool's connections back only

    def _last_id(self):
        newest = self._redis.xrevrange(self._changes, count=1)
        return newest[0][0].decode() if newest else "0-0"

    def _range(self, start, end):
        """Every entry from start (an XRANGE bound, '(' in front when exclusive) to end."""
        entries = []
        while True:
            chunk = self._redis.xrange(self._changes, start, end, count=REDIS_SLICE)
            entries += chunk
            if len(chunk) < REDIS_SLICE:
                return entries
            start = f"({chunk[-1][0].decode()}"

    def _check_follows(self, after_id, entries):
        """Refuse entries that do not run on from after_id without a gap: the stream was trimmed."""
        previous = stream_id(after_id)
        for entry_id, _ in entries:
            current = stream_id(entry_id)
            if not follows(previous, current):
                raise ChangesTrimmed(f"the shared store (Redis at {self.where}) no longer holds "
                                     f"the changes after {after_id}: load again")
            previous = current

    @staticmethod
    def _decode_entry(entry):
        entry_id, fields = entry
        kind = fields.get(b"k")
        return (entry_id.decode(), decode_record(fields[b"c"].decode(), fields[b"r"]),
                EventKind(int(kind)) if kind is not None else None,
                fields.get(b"s", b"").decode())


def open_store(url: str) -> "Store | RedisStore":
    """Open the store a --store URL names: memory://, sqlite:///PATH[?sync=normal|full], or a
    shared Redis (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS)."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        path, _, query = url[len("sqlite:///"):].partition("?")
        options = urllib.parse.parse_qs(query)
        unknown = set(options) - {"sync"}
        if unknown:
            raise StoreError(f"unknown option {sorted(unknown)[0]!r} in {url!r}: only sync")
        return SqliteStore(path, *options.get("sync", [])[-1:])
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url)
    raise StoreError(f"unsupported store URL {url!r}: use sqlite:///PATH, memory:// or "
                     f"{REDIS_URL_FORMS}")


# --- wire format: records and changes as protobuf, answers that fit, guarded parsing ---------


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000

# A default gRPC client takes messages up to 4 MiB: every answer but the old all-clients map
# is cut to fit, with room to spare, whatever ids and sessions the limits allow.
MAX_ANSWER_BYTES = 4 * 1024 * 1024 - 256 * 1024

SNAPSHOT_CHUNK = 1000
STATUS_MAP_CHUNK = 1_000
EVENTS_PER_MESSAGE = 500


def _set_timestamp(timestamp, seconds):
    whole = int(seconds)
    timestamp.seconds = whole
    timestamp.nanos = int((seconds - whole) * 1e9)


def client_to_pb(record: Client) -> pb.Client:
    """The wire form of a client record."""
    message = pb.Client()
    fill_client(message, record)
    return message


# The default session as a Client's wire bytes: merging them costs less than sessions.add().
DEFAULT_SESSIONS_WIRE = pb.Client(sessions=[pb.Session(kind=pb.SESSION_KIND_MESSAGE)]
                                  ).SerializeToString()


def fill_client(message: pb.Client, record: Client) -> None:
    """Set a Client message from a record, field by field: the cheapest way with upb."""
    client_id, changed_at, last_seen, revision, reason, sessions = record
    message.client_id = client_id
    # Our Status holds the wire enum's values.
    message.status = Status.CONNECTED if sessions else Status.DISCONNECTED  # type: ignore[assignment]
    message.revision = revision
    message.reason = reason
    _set_timestamp(message.changed_at, changed_at)
    _set_timestamp(message.last_seen, last_seen)
    if sessions is DEFAULT_SESSIONS:
        message.MergeFromString(DEFAULT_SESSIONS_WIRE)
        return
    for session in sessions:
        added = message.sessions.add(session_id=session.session_id, kind=(
            pb.SESSION_KIND_ATTACHED if session.holder else pb.SESSION_KIND_MESSAGE))
        if session.expires_at:
            _set_timestamp(added.expires_at, session.expires_at)


def change_to_pb(change: Change) -> pb.Event:
    """The wire form of a change."""
    return pb.Event(revision=change.revision, kind=change.kind, client=client_to_pb(change.record),
                    session_id=change.session_id, reason=change.reason)


def change_wire(change: Change) -> bytes:
    """The change as a serialized one-event WatchResponse, made once for every watcher.

    Such messages concatenate into one WatchResponse with all their events and the
    last revision (a repeated field appends, a scalar's last value wins).
    """
    if change.wire is None:
        change.wire = pb.WatchResponse(events=[change_to_pb(change)],
                                       revision=change.revision).SerializeToString()
    return change.wire


def messages_of(changes: Iterable[Change]) -> Iterator[tuple[bytes, int]]:
    """The changes as WatchResponse bytes of at most EVENTS_PER_MESSAGE events that fit one
    answer each, with the revision each message reaches."""
    parts: list[bytes] = []
    size = last = 0
    for change in changes:
        wire = change_wire(change)
        if parts and (len(parts) == EVENTS_PER_MESSAGE or size + len(wire) > MAX_ANSWER_BYTES):
            yield b"".join(parts), last
            parts, size = [], 0
        parts.append(wire)
        size += len(wire)
        last = change.revision
    if parts:
        yield b"".join(parts), last


def client_wire_bound(record: Client) -> int:
    """At most how many bytes a record takes on the wire: 4 bytes a character at most, and
    a generous allowance for the tags, lengths and timestamps."""
    size = 64 + 4 * (len(record.client_id) + len(record.reason))
    if record.sessions and record.sessions is not DEFAULT_SESSIONS:
        size += sum(32 + 4 * len(session.session_id) for session in record.sessions)
    return size


def reply_wire_bound(record: Client) -> int:
    """At most how many bytes one SendMessage answer with this record takes: the record, and
    an info text that may name the client and a session."""
    return client_wire_bound(record) + 128 + 4 * (len(record.client_id) + MAX_ID_LENGTH)


def fitting(records: Sequence[Client], budget: int = MAX_ANSWER_BYTES,
            bound: Callable[[Client], int] = client_wire_bound) -> int:
    """How many of records, from the first, fit in one answer of budget bytes (at least one)."""
    used = 0
    for count, record in enumerate(records):
        used += bound(record)
        if used > budget:
            return max(count, 1)
    return len(records)


def split_to_fit(records: Sequence[Client], count: int) -> Iterator[Sequence[Client]]:
    """records in slices of at most count records that each fit in one answer."""
    start = 0
    while start < len(records):
        size = fitting(records[start:start + count])
        yield records[start:start + size]
        start += size


def serialize_statuses(records: Sequence[Client]) -> bytes:
    """The all-clients answer, serialized chunk by chunk.

    Serialized messages concatenate into their merge, so chunks give the same bytes as one
    big message while the thread gives up the GIL after each (a sleep(0)): the calls that
    come meanwhile wait for one chunk, not for the interpreter's 5 ms switch interval several
    times over, and one call at a million clients never stalls the rest of the server.
    """
    chunks = []
    for start in range(0, len(records), STATUS_MAP_CHUNK):
        chunks.append(pb.ClientStatusResponse(statuses={
            record.client_id: STATUS_WORDS[record.status]
            for record in records[start:start + STATUS_MAP_CHUNK]}).SerializeToString())
        time.sleep(0)
    return b"".join(chunks)


def serialize_response(response: bytes | ProtobufMessage) -> bytes:
    """Serialize a response, passing through one already serialized in parts."""
    # type() is, not isinstance: the cheaper test, which mypy cannot narrow the other way.
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


class Malformed(NamedTuple):
    """A request whose bytes did not parse; its handler refuses it with INVALID_ARGUMENT."""

    type_name: str
    error: str


def parse_request_bytes(
        message_class: type[ProtobufMessage]) -> Callable[[bytes], ProtobufMessage | Malformed]:
    """A deserializer that hands a Malformed on instead of failing the call as INTERNAL."""
    def parse(data: bytes) -> ProtobufMessage | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Malformed(message_class.__name__, str(error))
    return parse


def refuse_malformed(behavior):
    """The behavior, preceded by a refusal of requests that did not parse."""
    def guarded(request, context, *send):
        if type(request) is Malformed:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is not a valid {request.type_name}: {request.error}")
        return behavior(request, context, *send)
    return same_kind(guarded, behavior)


def same_kind(wrapper, behavior):
    """Mark wrapper non-blocking when behavior is, so gRPC hands it a send function too."""
    wrapper.experimental_non_blocking = getattr(behavior, "experimental_non_blocking", False)
    return wrapper


def any_request(request) -> bool:
    """The test of a method that never waits, whatever its request asks."""
    return True


def one_client(request) -> bool:
    """GetClientStatus waits for nothing unless it asks for the map of every client, which
    at 100,000 takes long enough to stall every call behind it on gRPC's thread."""
    return bool(getattr(request, "client_id", ""))  # a Malformed request has none


# The calls that never wait when the store is durable at once (memory://), by name, each
# with the test of its request.
INLINE_METHODS = {"SendMessage": any_request, "GetClientStatus": one_client,
                  "CountClients": any_request}
# On a store that commits (SQLite, Redis), the calls split in two: their first half, to the
# commit, never waits; the rest runs once a commit has saved it. The method's halves, by name.
DEFERRED_METHODS = {"SendMessage": "begin_send_message"}


def method_handlers(service, descriptor=SERVICE, inline=None, deferred=()):
    """The service's handlers, as the generated code makes them but with serialize_response.

    The methods named in inline never wait (on memory://: no commit, a lock held briefly)
    when their request passes its test, so CallGate runs them on gRPC's own thread rather
    than handing each to a pool thread.
    Those named in deferred carry their first half (DEFERRED_METHODS), which CallGate runs
    there too, the rest on the finisher threads, which wait for the commits."""
    handlers = {}
    for method in descriptor.methods:
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        behavior = refuse_malformed(getattr(service, method.name))
        behavior.inline = (inline or {}).get(method.name)
        if method.name in deferred:
            behavior.deferred = refuse_malformed(getattr(service, DEFERRED_METHODS[method.name]))
        handlers[method.name] = make(
            behavior,
            request_deserializer=parse_request_bytes(
                message_factory.GetMessageClass(method.input_type)),
            response_serializer=serialize_response,
        )
    return handlers


def _status_filter(value):
    if value == pb.STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_WORDS:
        raise InvalidArgument(f"status must be one of {sorted(pb.Status.keys())}, got {value}")
    return Status(value)


def parse_request(request: pb.MessageRequest, max_lease: int,
                  index: int | None = None) -> Message:
    """Validate one MessageRequest into a Message; index names it within a batch."""
    client_id, session_id, lease = request.client_id, request.session_id, request.lease_seconds
    try:
        status = parse_message(request.message)
        validate_client_id(client_id)
        if session_id:
            validate_client_id(session_id, "session_id")
        if lease:
            if lease > max_lease:
                raise InvalidArgument(f"lease_seconds must be at most {max_lease}, got {lease}")
            if status is not Status.CONNECTED:
                raise InvalidArgument("lease_seconds is only for hello")
    except InvalidArgument as error:
        if index is None:
            raise
        raise InvalidArgument(f"requests[{index}]: {error}") from None
    return Message(client_id, status, session_id, lease)


def reply_info(message: Message, record: Client) -> str:
    """The info text: the original one, or what happened to a named session."""
    if not record.sessions:
        return f"Client {record.client_id} marked as disconnected."
    if message.status is Status.DISCONNECTED:
        return (f"Client {record.client_id} session {message.session_id} ended; still connected "
                f"with {len(record.sessions)} sessions.")
    return f"Client {record.client_id} marked as connected."


def parse_attach(request: pb.AttachRequest) -> tuple[str, str]:
    """Validate an AttachRequest: its client id and session id, by the id rules."""
    validate_client_id(request.client_id)
    if request.session_id:
        validate_client_id(request.session_id, "session_id")
    return request.client_id, request.session_id


def attach_response(notice: "pb.AttachResponse.Notice", record: Client | None = None,
                    reattach_seconds: float = 0) -> bytes:
    """An Attach stream's message, serialized (the stop notice is made once for every stream)."""
    response = pb.AttachResponse(notice=notice, reattach_seconds=math.ceil(reattach_seconds))
    if record is not None:
        fill_client(response.client, record)
    return response.SerializeToString()


def message_response(message: Message, record: Client,
                     change: Change | None) -> pb.MessageResponse:
    """The answer to one Hello or Goodbye."""
    response = pb.MessageResponse(success=True, info=reply_info(message, record),
                                  changed=change is not None)
    fill_client(response.client, record)
    return response


# The answer to one SendMessage written as bytes, field by field in field-number order as
# protobuf writes them: what varies from call to call (the ids, times, revision and texts)
# filled into the fixed tags. It costs a third of building the message; records with
# sessions of their own (not the default one) go through message_response instead.
_SMALL_VARINTS = [bytes((number,)) for number in range(128)]


def _varint(number: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if number < 128:
        return _SMALL_VARINTS[number]
    out = bytearray()
    while number >= 128:
        out.append(number & 127 | 128)
        number >>= 7
    out.append(number)
    return bytes(out)


def _timestamp_bytes(seconds: float) -> bytes:
    """A Timestamp's bytes with their length in front, as _set_timestamp sets it."""
    whole = int(seconds)
    nanos = int((seconds - whole) * 1e9)
    body = (b"\x08" + _varint(whole) if whole else b"") + (b"\x10" + _varint(nanos) if nanos
                                                            else b"")
    return _SMALL_VARINTS[len(body)] + body


def _text_field(tag: bytes, text: str) -> bytes:
    """A string field: its tag, its length, its UTF-8 (nothing for an empty one)."""
    if not text:
        return b""
    data = text.encode()
    return tag + _varint(len(data)) + data


def encode_reply(message: Message, record: Client, change: Change | None) -> bytes:
    """message_response(message, record, change), serialized, in the same bytes."""
    client_id, changed_at, last_seen, revision, reason, sessions = record
    if (sessions and sessions is not DEFAULT_SESSIONS) or changed_at < 0 or last_seen < 0:
        return message_response(message, record, change).SerializeToString()
    changed = _timestamp_bytes(changed_at)
    seen = changed if last_seen == changed_at else _timestamp_bytes(last_seen)
    client = b"".join((
        _text_field(b"\x0a", client_id),
        b"\x10\x01" if sessions else b"\x10\x02",
        b"\x1a", changed, b"\x22", seen,
        b"\x28" + _varint(revision) if revision else b"",
        DEFAULT_SESSIONS_WIRE if sessions else b"",
        _text_field(b"\x3a", reason)))
    return b"".join((b"\x08\x01", _text_field(b"\x12", reply_info(message, record)),
                     b"\x1a", _varint(len(client)), client, b"\x20\x01" if change else b""))


# --- handlers: protobuf in, the registry, protobuf out ---------------------------------------


REFUSALS = ((InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
            (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (StoreError, grpc.StatusCode.UNAVAILABLE),
            (Unavailable, grpc.StatusCode.UNAVAILABLE))
REFUSED = tuple(kind for kind, _ in REFUSALS)


def refuse(context, error):
    """Answer one of our own exceptions with its status code and its sentence."""
    context.abort(refusal_code(error), str(error))


@contextlib.contextmanager
def refusals(context):
    """Answer our own exceptions with their status code and their sentence."""
    try:
        yield
    except REFUSED as error:
        refuse(context, error)


def refusal_code(error):
    """The status code that answers one of our own exceptions."""
    return next(code for kind, code in REFUSALS if isinstance(error, kind))


def answer_fits(results):
    """Refuse a batch whose answer a default gRPC client could not take, before it applies."""
    fit = fitting([record for record, _ in results], bound=reply_wire_bound)
    if fit < len(results):
        raise LimitExceeded(
            f"the answer to these {len(results)} messages would pass the "
            f"{MAX_ANSWER_BYTES // 1024} KiB a default gRPC client accepts (their clients have "
            f"many or long sessions); nothing was applied: send at most {fit} of them per call")


class ClientService(pb_grpc.ClientServiceServicer):
    """Translates between protobuf messages and the registry."""

    def __init__(self, registry, max_lease=DEFAULT_MAX_LEASE, max_watchers=DEFAULT_MAX_WATCHERS,
                 watch_buffer=DEFAULT_WATCH_BUFFER, attachments=None):
        self._registry = registry
        self.attachments = attachments or Attachments(registry)
        self._max_lease = max_lease
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self._max_watchers = max_watchers
        self._watchers_lock = threading.Lock()
        self.watchers = 0
        self._fanout = Fanout(registry.log, watch_buffer)

    def SendMessage(self, request, context):
        # The busiest call: a plain try rather than refusals(), which costs a generator.
        try:
            message = parse_request(request, self._max_lease)
            record, change = self._registry.apply_one(message)
        except REFUSED as error:
            refuse(context, error)
        return encode_reply(message, record, change)

    def begin_send_message(self, request, context):
        """SendMessage up to the commit, which never waits; the rest to run once it is made
        (on a store that commits: CallGate answers the call then, see DEFERRED_METHODS)."""
        try:
            message = parse_request(request, self._max_lease)
            record, change, ticket = self._registry.begin_one(message)
        except REFUSED as error:
            refuse(context, error)
        return functools.partial(self._finish_send_message, message, record, change, ticket)

    def _finish_send_message(self, message, record, change, ticket):
        """Wait until the change is durable, then the reply; a Refusal if the store failed
        (or, on a replica, which works the change out at its commit, if the message did)."""
        try:
            record, change = self._registry.finish_one(ticket, record, change)
        except REFUSED as error:
            raise Refusal(refusal_code(error), str(error)) from None
        return encode_reply(message, record, change)

    def SendMessages(self, request, context):
        with refusals(context):
            if len(request.requests) > MAX_BATCH:
                raise InvalidArgument(f"at most {MAX_BATCH} requests per call, "
                                      f"got {len(request.requests)}")
            messages = [parse_request(request, self._max_lease, index)
                        for index, request in enumerate(request.requests)]
            results = self._registry.apply_many(messages, check=answer_fits)
        return pb.SendMessagesResponse(responses=[
            message_response(message, record, change)
            for message, (record, change) in zip(messages, results, strict=True)])

    def GetClientStatus(self, request, context):
        client_id = request.client_id
        if not client_id:
            with refusals(context):
                return serialize_statuses(self._registry.snapshot()[0])
        with refusals(context):
            validate_client_id(client_id)
            record = self._registry.get(client_id)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Client {client_id} not found")
        return pb.ClientStatusResponse(
            statuses={client_id: STATUS_WORDS[record.status]}, clients=[client_to_pb(record)]
        )

    def ListClients(self, request, context):
        with refusals(context):
            if request.page_size < 0:
                raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
            validate_client_id(request.id_prefix, "id_prefix", allow_empty=True)
            status = _status_filter(request.status)
            after = decode_page_token(request.page_token) if request.page_token else ""
            limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            records, more, revision = self._registry.page(limit, after, status, request.id_prefix)
        fit = fitting(records)
        if fit < len(records):  # the rest would pass a default client's message limit
            records, more = records[:fit], True
        return pb.ListClientsResponse(
            clients=[client_to_pb(record) for record in records],
            next_page_token=encode_page_token(records[-1].client_id) if more else "",
            revision=revision,
        )

    def CountClients(self, request, context):
        with refusals(context):
            counts = self._registry.counts()
        return pb.CountClientsResponse(
            connected=counts.connected,
            disconnected=counts.disconnected,
            total=counts.connected + counts.disconnected,
            live_sessions=counts.live_sessions,
            revision=counts.revision,
        )

    def Watch(self, request, context, send):
        """Send the snapshot (unless resuming), then hand the stream to the fanout and return."""
        if request.since_revision < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"since_revision must not be negative, got {request.since_revision}")
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many watchers (limit {self._max_watchers}); try again later")
        watcher = Watcher(context, send)
        with self._watchers_lock:
            self.watchers += 1
        if not context.add_callback(lambda: self._watch_ended(watcher)):
            self._watch_ended(watcher)
            return
        since = request.since_revision
        resync = bool(since) and (since > self._registry.durable_revision
                                  or not self._registry.log.holds(since))
        if resync or not since:
            since = self._send_snapshot(context, send, resync)
        watcher.since = since
        self._fanout.add(watcher)

    # gRPC passes `send`; the stream outlives the call (an attribute grpcio reads off the function)
    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]

    def _watch_ended(self, watcher):
        self._fanout.remove(watcher)
        with self._watchers_lock:
            self.watchers -= 1
        self._watch_slots.release()

    def Attach(self, request, context, send):
        """Hand the stream to the attachments, which say ATTACHED once its session is: no
        thread waits for that, or on the stream after it."""
        with refusals(context):
            client_id, session_id = parse_attach(request)
            self.attachments.attach(client_id, session_id, context, send)

    Attach.experimental_non_blocking = True  # type: ignore[attr-defined]

    def _send_snapshot(self, context, send, resync):
        """Send every client as of one revision, in chunks; return that revision."""
        with refusals(context):
            records, revision = self._registry.snapshot()
        chunks = list(split_to_fit(records, SNAPSHOT_CHUNK)) or [[]]
        for number, chunk in enumerate(chunks):
            if not context.is_active():
                break
            send(pb.WatchResponse(snapshot=[client_to_pb(record) for record in chunk],
                                  snapshot_complete=number == len(chunks) - 1,
                                  resync=resync and number == 0, revision=revision))
        return revision


class NotificationService:
    """The second earlier contract, user_notifications.NotificationService, on our registry.

    Requests follow our rules (the id rules, the message words, INVALID_ARGUMENT); answers
    are the ones its clients expect: "Success", and "unknown" (still OK) for an id never seen.
    The all-clients map has the same bytes as ours, so it is serialized by the same code.
    """

    def __init__(self, registry):
        self._registry = registry

    def SendMessage(self, request, context):
        with refusals(context):
            status = parse_message(request.message)
            validate_client_id(request.client_id)
            self._registry.apply_one(Message(request.client_id, status))
        return notifications_pb.MessageResponse(status="Success")

    def GetClientStatus(self, request, context):
        client_id = request.client_id
        if not client_id:
            return self.GetAllClientStatuses(request, context)
        with refusals(context):
            validate_client_id(client_id)
            record = self._registry.get(client_id)
        return notifications_pb.ClientStatusResponse(
            statuses={client_id: STATUS_WORDS[record.status] if record else "unknown"})

    def GetAllClientStatuses(self, request, context):
        with refusals(context):
            return serialize_statuses(self._registry.snapshot()[0])


# --- security and metrics: interceptors installed only when asked for ------------------------


WRITE_METHODS = frozenset({"SendMessage", "SendMessages", "Attach"})

# With a token set, writes to these always need it, and reads unless --public-reads.
GUARDED_SERVICES = frozenset({SERVICE_NAME, NOTIFICATION_SERVICE_NAME})


@dataclass(frozen=True)
class Security:
    """TLS files and the access token; the defaults serve plaintext to anyone."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    token: str = ""
    public_reads: bool = False

    def credentials(self):
        """Server credentials for TLS (mutual when a client CA is given), or None for plaintext."""
        if not self.tls_cert and not self.tls_key:
            if self.tls_client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        try:
            key, cert = read_bytes(self.tls_key), read_bytes(self.tls_cert)
            client_ca = read_bytes(self.tls_client_ca) if self.tls_client_ca else None
        except OSError as error:
            raise ValueError(f"cannot read a TLS file: {error}") from error
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def _method_kind(handler):
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler, handler.unary_unary
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler, handler.unary_stream
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler, handler.stream_unary
    return grpc.stream_stream_rpc_method_handler, handler.stream_stream


def replace_behavior(handler, wrap):
    """The same handler with its behavior function wrapped."""
    make, behavior = _method_kind(handler)
    return make(wrap(behavior), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


REFUSAL = (grpc.StatusCode.UNAUTHENTICATED,
           "missing or wrong access token: send the metadata 'authorization: Bearer <token>'")


def refuse_unauthenticated(request, context):
    """The behavior of a call without the token; CallGate answers it before any body."""
    context.abort(*REFUSAL)


refuse_unauthenticated.refusal = REFUSAL  # type: ignore[attr-defined]  # what CallGate reads


class TokenCheck(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>`: writes always, reads unless public.

    The comparison is constant-time, and the token is never logged.
    """

    def __init__(self, token, public_reads=False):
        self._expected = f"Bearer {token}".encode()
        self._public_reads = public_reads

    def intercept_service(self, continuation, details):
        service, _, method = details.method.lstrip("/").rpartition("/")
        needs_token = service in GUARDED_SERVICES and (method in WRITE_METHODS
                                                       or not self._public_reads)
        handler = continuation(details)
        if handler is None or not needs_token or self._authorized(details.invocation_metadata):
            return handler
        return replace_behavior(handler, lambda behavior: refuse_unauthenticated)

    def _authorized(self, metadata):
        for key, value in metadata or ():
            if key == "authorization":
                return hmac.compare_digest(value.encode(), self._expected)
        return False



# Calls whose request is late are ended in rounds at least this far apart, so the timer
# wakes at most ten times a second however many calls come.
REQUEST_TIMER_STEP = 0.1
UNDECODABLE_REPORT_SECONDS = 60.0


class _Awaited:
    """A call whose request has not arrived yet, and when it must have; it lets go of the
    call once the request is in."""

    __slots__ = ("arrived", "call", "deadline", "state")

    def __init__(self, deadline, state, call):
        self.deadline = deadline
        self.state = state
        self.call = call
        self.arrived = False


class _Lane:
    """Threads that run calls, and how many calls may hold one or wait for one at once.

    A call costs one lock taken at its start and one at its end and a queue put that wakes
    one idle thread (a ThreadPoolExecutor adds a Future, a semaphore and a callback per call);
    a thread is started only when none is idle, up to `threads`."""

    def __init__(self, name, threads, limit):
        self._name = name
        self._most = threads
        self._limit = limit
        self._work = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 0  # calls started and not yet ended
        self._reserved = 0  # of them, those that run elsewhere (reserve)
        self._idle = 0  # threads waiting for work that no queued call has claimed
        self._threads = []

    def start(self, state, call, run):
        """Run a call on the lane if the limit allows, else refuse it with RESOURCE_EXHAUSTED."""
        with self._lock:
            full = self._running >= self._limit
            if not full:
                self._running += 1
                self._claim_locked()
        if full:
            self._refuse(state, call)
            return
        self._work.put(run)

    def reserve(self, state, call):
        """Count a call that runs elsewhere but waits (a deferred one) against the limit;
        False, the call refused with RESOURCE_EXHAUSTED, when the limit is reached."""
        with self._lock:
            full = self._running >= self._limit
            if not full:
                self._running += 1
                self._reserved += 1
        if full:
            self._refuse(state, call)
        return not full

    def release(self):
        """Free the slot of a reserved call that has ended."""
        with self._lock:
            self._running -= 1
            self._reserved -= 1

    def idle(self):
        """Whether no call runs on the lane's threads (read without the lock: a stale answer
        only sends one call the other way)."""
        return self._running == self._reserved

    def _refuse(self, state, call):
        end_call(state, call, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 f"too many calls at once (limit {self._limit}); try again later")

    def submit(self, fn, *args, **kwargs):
        """Run fn on the lane, outside the limit; a Future of its outcome."""
        future = futures.Future()
        self.later(functools.partial(_run_into, future, fn, args, kwargs))
        return future

    def later(self, run):
        """Run run() on the lane, outside the limit: work that must not be refused."""
        with self._lock:
            self._running += 1
            self._claim_locked()
        self._work.put(run)

    def _claim_locked(self):
        """Count one idle thread as taken by the call about to be queued, or start one."""
        if self._idle:
            self._idle -= 1
        elif len(self._threads) < self._most:
            thread = threading.Thread(target=self._serve, daemon=True,
                                      name=f"{self._name}_{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _serve(self):
        """Run queued calls until shut down, freeing each one's slot once it ends."""
        work, lock = self._work, self._lock
        while (run := work.get()) is not None:
            try:
                run()
            except Exception:  # grpc's call runners catch their own; this keeps the thread
                logger.exception("a call failed outside gRPC's handling")
            with lock:
                self._running -= 1
                self._idle += 1

    def shutdown(self, wait):
        """Let the threads end once the server has stopped (queued calls run first)."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()


def _run_into(future, fn, args, kwargs):
    """Run fn(*args, **kwargs) with its outcome in future, as an executor does."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as error:
        future.set_exception(error)


# Two rather than one: under 32 calls in flight, SQLite's calls/s went from 0.58-0.68x to
# 0.79-0.95x the ceiling's and a replica's from 0.42-0.47x to 0.50-0.56x; four were no better.
FINISHER_THREADS = 2


class CallGate(futures.Executor):
    """The executor gRPC hands calls to: a call gets a thread only once its request is in.

    grpcio gives every call to its executor as soon as the headers arrive, and the thread
    would then wait, with no time limit, for a request body that may never come. Here a
    unary request is awaited on gRPC's own completion queue instead, holding no thread and
    no slot, for at most request_timeout seconds (then DEADLINE_EXCEEDED); a refusal (a
    behavior with a `refusal`) is answered at once, before any body. Calls whose request
    is in run on `threads` threads, at most max_concurrent at once. Calls that stream their
    requests (reflection's) hold a thread while they wait for each one, so they run apart,
    at most stream_threads at once, and can never take the others' threads. Beyond either
    limit a call gets RESOURCE_EXHAUSTED. While no call runs on the pool, calls marked
    inline (they never wait) run on gRPC's own thread, holding no slot; so does the first
    half of a deferred call (up to the commit), whose rest one of FINISHER_THREADS threads,
    taking them in order, runs once a commit saves it: such a call holds a slot but no
    thread meanwhile.

    It drives grpcio's private server internals (grpc._server) of the pinned version;
    tests/test_hostile_peers.py fails when they change, and a call of a shape it does not
    know runs as a plain pool would run it.
    """

    def __init__(self, threads, max_concurrent, request_timeout, stream_threads):
        self.max_workers = threads  # the calls' threads, as a ThreadPoolExecutor would say
        self._calls = _Lane("rpc", threads, max_concurrent)
        self._streams = _Lane("rpc-stream", stream_threads, stream_threads)
        # Threads that finish the deferred calls, taking them in order: while one waits for a
        # commit, another answers the calls an earlier commit saved, and the next commit starts
        # without waiting for those answers to go out.
        self._finisher = _Lane("rpc-finish", FINISHER_THREADS, FINISHER_THREADS)
        self._request_timeout = request_timeout
        self._lock = threading.Lock()
        self._awaiting = threading.Condition(self._lock)
        self._awaited = collections.deque()  # in deadline order: every call waits as long
        self._stopped = False
        threading.Thread(target=self._end_late_requests, name="request-timer",
                         daemon=True).start()

    def submit(self, fn, *args, **kwargs):
        """Take one call from gRPC; the future it gets back is only used to count calls."""
        if len(args) != 7 or args[0] not in (grpc_internals._unary_response_in_pool,
                                             grpc_internals._stream_response_in_pool):
            return self._calls.submit(fn, *args, **kwargs)
        task, event, state, behavior, take_request, deserializer, serializer = args
        refusal = getattr(behavior, "refusal", None)
        if refusal:
            end_call(state, event.call, *refusal)
            return _DONE

        deferred = getattr(behavior, "deferred", None)

        def run(request_thunk, here=False):
            if here and deferred is not None:  # the first half here, the rest to the finisher
                return functools.partial(fn, self._begin_deferred, event, state, deferred,
                                         request_thunk, deserializer, serializer)
            return functools.partial(fn, task, event, state, behavior, request_thunk,
                                     deserializer, serializer)

        if take_request.__name__ == "unary_request":
            inline = getattr(behavior, "inline", None)
            self._await_request(event, state, deserializer, run,
                                inline=any_request if deferred is not None else inline)
        else:
            self._streams.start(state, event.call, run(take_request))
        return _DONE

    def _await_request(self, event, state, deserializer, run, inline=None):
        """Ask gRPC for the request; start the call when it comes, or end it at its deadline."""
        awaited = _Awaited(time.monotonic() + self._request_timeout, state, event.call)
        receive = grpc_internals._receive_message(state, event.call, deserializer)

        def arrived(receive_event):
            outcome = receive(receive_event)  # gRPC's own: keeps the request, or notes the end
            try:
                self._request_arrived(awaited, run, inline)
            except Exception:  # raised here, it would end gRPC's serving thread
                logger.exception("could not start a call")
                end_call(state, event.call, grpc.StatusCode.INTERNAL, "could not start the call")
            return outcome

        with state.condition:
            if not grpc_internals._is_rpc_state_active(state):
                return
            event.call.start_server_batch((cygrpc.ReceiveMessageOperation(0),), arrived)
            state.due.add(grpc_internals._RECEIVE_MESSAGE_TOKEN)
        with self._lock:
            self._awaited.append(awaited)
            if len(self._awaited) == 1:
                self._awaiting.notify()

    def _request_arrived(self, awaited, run, inline):
        """Start a call whose request came; one that ended without a request is refused.

        An inline call (one that never waits: see method_handlers) runs here, on gRPC's own
        thread, with no hand-off to another thread and back, while no call runs on the pool:
        one there (a page, the all-clients map, a snapshot) may hold the registry's lock or
        the GIL for a while, and gRPC's thread must not wait for it, so then it goes there
        too."""
        state, call = awaited.state, awaited.call
        with state.condition:
            awaited.arrived = True
            awaited.state = awaited.call = None  # the timer must not keep the call alive
            request, state.request = state.request, None
            if not grpc_internals._is_rpc_state_active(state):
                return
            if request is None:
                _end_locked(state, call, grpc.StatusCode.UNIMPLEMENTED,
                            "a unary call needs exactly one request message")
                return
        here = inline is not None and inline(request) and self._calls.idle()
        call_run = run(lambda: request if grpc_internals._is_rpc_state_active(state) else None,
                       here)
        if here:
            call_run()
        else:
            self._calls.start(state, call, call_run)

    def _begin_deferred(self, event, state, begin, request_thunk, deserializer, serializer):
        """Run a deferred call's first half as gRPC runs a behavior; its rest to the finisher."""
        request = request_thunk()
        if request is None or not self._calls.reserve(state, event.call):  # it will wait
            return
        finish, proceed = grpc_internals._call_behavior(event, state, begin, request,
                                                        deserializer)
        if not proceed:
            self._calls.release()
            return
        self._finisher.later(functools.partial(self._finish_deferred, event, state, finish,
                                               serializer))

    def _finish_deferred(self, event, state, finish, serializer):
        """The rest of a deferred call, then its slot freed."""
        try:
            _finish_deferred(event, state, finish, serializer)
        finally:
            self._calls.release()

    def _end_late_requests(self):
        """End every call whose request has not come by its deadline."""
        while (late := self._take_late()) is not None:
            for awaited in late:
                if not awaited.arrived:  # only ever set, so a stale read just takes the lock
                    self._end_if_waiting(awaited)

    def _take_late(self):
        """Wait until some deadlines have passed and take those calls; None once shut down."""
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                if self._awaited and self._awaited[0].deadline <= now:
                    late = []
                    while self._awaited and self._awaited[0].deadline <= now:
                        late.append(self._awaited.popleft())
                    return late
                self._awaiting.wait(max(self._awaited[0].deadline - now, REQUEST_TIMER_STEP)
                                    if self._awaited else None)
            return None

    def _end_if_waiting(self, awaited):
        """End a call with DEADLINE_EXCEEDED unless its request came meanwhile."""
        state, call = awaited.state, awaited.call
        if state is None:  # it arrived meanwhile
            return
        with state.condition:
            if not awaited.arrived:
                _end_locked(state, call, grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the request did not arrive within {self._request_timeout:g} s")

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop the timer and the threads once the server has stopped."""
        with self._lock:
            self._stopped = True
            self._awaiting.notify()
        self._calls.shutdown(wait)
        self._streams.shutdown(wait)
        self._finisher.shutdown(wait)


def _finish_deferred(event, state, finish, serializer):
    """The rest of a deferred call: its reply once finish() gives it, or its Refusal."""
    try:
        reply = finish()
    except Refusal as refusal:
        end_call(state, event.call, refusal.code, refusal.details)
        return
    except Exception:
        logger.exception("a call failed after its handler returned")
        end_call(state, event.call, grpc.StatusCode.INTERNAL, "the call failed")
        return
    serialized = grpc_internals._serialize_response(event, state, reply, serializer)
    if serialized is not None:
        grpc_internals._status(event, state, serialized)


def end_call(state, call, code, details):
    """End a call with code and details, unless it has ended already."""
    with state.condition:
        _end_locked(state, call, code, details)


def _end_locked(state, call, code, details):
    """End a call whose condition the caller holds, unless it has ended already."""
    if grpc_internals._is_rpc_state_active(state):
        grpc_internals._abort(state, call, grpc_common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[code],
                              details.encode())


_DONE: futures.Future = futures.Future()  # given to gRPC, which only counts calls by it
_DONE.set_result(None)


class UndecodableMetadataLog(logging.Filter):
    """Keeps metadata values out of grpcio's log, and a peer from filling it with tracebacks.

    grpcio logs each metadata value that is not UTF-8 whole (an access token too) at ERROR
    with a traceback. Here those records become one WARNING line with a count and no value,
    at most once per interval; every other record passes unchanged.
    """

    LOGGER = "grpc._cython.cygrpc"
    MESSAGE = "Invalid encoding on %s"

    def __init__(self, interval=UNDECODABLE_REPORT_SECONDS, clock=time.monotonic):
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._dropped = 0
        self._next_report = float("-inf")

    def filter(self, record):
        """Pass every record but grpcio's undecodable values, which become a counted line."""
        if record.msg != self.MESSAGE:
            return True
        with self._lock:
            self._dropped += 1
            now = self._clock()
            if now < self._next_report:
                return False
            count, self._dropped, self._next_report = self._dropped, 0, now + self._interval
        record.msg = ("%d metadata values were not UTF-8 (their values are not logged; "
                      "the next count comes %g s later at the soonest)")
        record.args = (count, self._interval)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        return True

    @classmethod
    def install(cls):
        """Put the filter on grpcio's logger, once per process."""
        grpc_logger = logging.getLogger(cls.LOGGER)
        if not any(isinstance(each, cls) for each in grpc_logger.filters):
            grpc_logger.addFilter(cls())


class Metrics(grpc.ServerInterceptor):
    """Prometheus metrics on their own HTTP port: RPCs by method and code, latency, the
    registry's counts, watchers and store commit time. The counts are read when scraped,
    so they cost the calls nothing."""

    def __init__(self, host, port):
        import prometheus_client  # only a server asked for metrics needs it
        from prometheus_client.core import GaugeMetricFamily

        self._gauge = GaugeMetricFamily
        self.registry = prometheus_client.CollectorRegistry()
        self.rpcs = prometheus_client.Counter(
            "presence_rpcs", "Calls answered, by method and status code", ["method", "code"],
            registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "presence_rpc_seconds", "Time to answer a call (a Watch: its whole life)", ["method"],
            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 10),
            registry=self.registry)
        self.commit = prometheus_client.Histogram(
            "presence_store_commit_seconds", "Time to commit one batch of changes",
            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1), registry=self.registry)
        self._sources = None
        self.registry.register(self)
        self._http, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port

    def watch(self, registry, service):
        """Read the registry's counts and the service's watchers at every scrape."""
        self._sources = (registry, service)

    def collect(self):
        if self._sources is None:
            return
        registry, service = self._sources
        counts = registry.counts()
        for name, help_text, value in (
                ("presence_connected_users", "Clients with at least one live session",
                 counts.connected),
                ("presence_disconnected_users", "Known clients with no live session",
                 counts.disconnected),
                ("presence_live_sessions", "Live sessions of every client", counts.live_sessions),
                ("presence_watchers", "Watch streams open", service.watchers),
                ("presence_attached_sessions", "Sessions held by Attach streams on this server",
                 service.attachments.attached),
                ("presence_revision", "The server-wide revision", counts.revision)):
            yield self._gauge(name, help_text, value=value)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.stream_stream or handler.stream_unary:
            return handler
        method = details.method.rpartition("/")[2]
        if handler.unary_stream:
            return replace_behavior(handler,
                                    lambda behavior: self._observe_stream(method, behavior))
        return replace_behavior(handler, lambda behavior: self._observe(method, behavior))

    def _observe(self, method, behavior):
        def observed(request, context):
            with self._counting(method, context):
                return behavior(request, context)
        return observed

    def _observe_stream(self, method, behavior):
        """Count a stream when it ends: a non-blocking one (Watch) outlives its behavior."""
        def observed(request, context, *send):
            start = time.perf_counter()
            context.add_callback(lambda: self._record(method, context.code(), start))
            try:
                return behavior(request, context, *send)
            except Exception:
                if context.code() is None:  # the client gets UNKNOWN; count it so
                    context.set_code(grpc.StatusCode.UNKNOWN)
                raise
        return same_kind(observed, behavior)

    @contextlib.contextmanager
    def _counting(self, method, context):
        """Count one call by its status code and time it, however it ends."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._record(method, code, start)

    def _record(self, method, code, start):
        """Count one call ended with code (None: OK) and started at start."""
        self.rpcs.labels(method, (code or grpc.StatusCode.OK).name).inc()
        self.latency.labels(method).observe(time.perf_counter() - start)

    def close(self):
        self._http.shutdown()


# --- wiring: build the server, run it until a signal -----------------------------------------


class HealthService(health.HealthServicer):
    """Standard health checking whose Watch streams end once they are told NOT_SERVING.

    grpcio's servicer keeps them open, so without this one open health watcher made
    every stop wait the whole grace period and end in UNAVAILABLE.
    """

    def __init__(self):
        super().__init__()
        self._sends_lock = threading.Lock()
        self._sends = set()  # the send functions of open Watch streams
        self._closing = False

    def Watch(self, request, context, send):
        """Send the status now and at every change, as grpcio's does; end at shutdown."""
        with self._sends_lock:
            super().Watch(request, context, send)
            if self._closing:
                send(None)
                return
            self._sends.add(send)
        if not context.add_callback(lambda: self._forget(send)):
            self._forget(send)

    def _forget(self, send):
        with self._sends_lock:
            self._sends.discard(send)

    def enter_graceful_shutdown(self):
        """Tell every watcher NOT_SERVING, then end its stream cleanly."""
        super().enter_graceful_shutdown()
        with self._sends_lock:
            self._closing = True
            sends, self._sends = self._sends, set()
        for send in sends:
            send(None)


@functools.cache
def add_reflection_v1_descriptor():
    """Put grpc.reflection.v1's file in the descriptor pool: v1alpha's, renamed.

    grpcio-reflection ships only v1alpha; the two have the same messages on the wire, and
    tools that speak only v1 need its descriptor to describe the reflection service itself.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1_NAME)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(proto)
        text = text_format.MessageToString(proto).replace("v1alpha", "v1")
        pool.AddSerializedFile(
            text_format.Parse(text, descriptor_pb2.FileDescriptorProto()).SerializeToString())


def add_reflection(grpc_server, service_names):
    """Serve reflection under grpc.reflection.v1 and v1alpha, by one servicer."""
    add_reflection_v1_descriptor()
    names = (*service_names, REFLECTION_V1_NAME, reflection.SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    grpc_server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, handlers)
        for name in (REFLECTION_V1_NAME, reflection.SERVICE_NAME)))


def add_service(grpc_server, descriptor, servicer, inline=None, deferred=()):
    """Serve servicer's methods as the service descriptor names them (inline and deferred:
    see method_handlers)."""
    handlers = method_handlers(servicer, descriptor, inline, deferred)
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    grpc_server.add_registered_method_handlers(descriptor.full_name, handlers)


@dataclass
class PresenceServer:
    """A built, not yet started server: the gRPC server, the port it bound, its parts."""

    grpc_server: grpc.Server
    port: int
    registry: Registry
    health: HealthService
    reaper: LeaseReaper
    gate: "CallGate"
    attachments: Attachments
    metrics: Metrics | None = None

    def start(self):
        self.reaper.start()
        self.grpc_server.start()

    def stop(self, grace=None):
        """Refuse new calls, end watches, let attached clients know (their sessions stay live
        a while as leases), let in-flight calls finish within grace seconds."""
        self.health.enter_graceful_shutdown()
        self.attachments.stop()
        self.registry.log.close()
        self.grpc_server.stop(grace).wait()
        self.attachments.close()
        self.gate.shutdown(wait=False)
        self.reaper.stop()
        self.registry.close()
        if self.metrics:
            self.metrics.close()


@contextlib.contextmanager
def loading():
    """Load without the cyclic garbage collector, then keep it off what was loaded.

    A million records are a million new objects: the collector would pass over them again
    and again while they load (half the time of a restart), and at every later full pass."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()


BIND_PROBLEMS = {
    errno.EADDRINUSE: "port {port} on {host} is already in use; stop what listens there, or "
                      "choose another port with --port (0 takes a free one)",
    errno.EACCES: "port {port} needs privileges this process lacks (ports below 1024 do); "
                  "choose another with --port",
    errno.EADDRNOTAVAIL: "{host} is not an address of this machine; choose one with --host "
                         "(0.0.0.0 or :: for every interface)",
}


def check_can_listen(address):
    """Fail at once, in words that name the flag to change, when address cannot be listened on
    (a port in use, say): before the store loads, and before gRPC says it with a C-core line."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if port == "0":
        return
    try:
        places = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"--host {host} does not resolve: {error.strerror}") from None
    problems = []
    for family, kind, protocol, _, where in places:  # gRPC listens if any of them binds
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
                return
            except OSError as error:
                problems.append(error)
    problem = problems[0]
    words = BIND_PROBLEMS.get(problem.errno, "cannot listen on {host}:{port}: {why}; check "
                              "--host and --port")
    raise OSError(words.format(host=host, port=port, why=problem.strerror))


def registry_class(store):
    """The registry a store needs: a cache of it when several servers share it (Redis)."""
    return SharedRegistry if getattr(store, "shared", False) else Registry


def create_server(
    address,
    store,
    *,
    workers=DEFAULT_WORKERS,
    max_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
    max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
    request_timeout=DEFAULT_REQUEST_TIMEOUT,
    max_streams_per_connection=DEFAULT_MAX_STREAMS_PER_CONNECTION,
    max_lease=DEFAULT_MAX_LEASE,
    max_sessions=DEFAULT_MAX_SESSIONS,
    max_watchers=DEFAULT_MAX_WATCHERS,
    watch_buffer=DEFAULT_WATCH_BUFFER,
    watch_history=DEFAULT_WATCH_HISTORY,
    max_attached=DEFAULT_MAX_ATTACHED,
    reattach_grace=DEFAULT_REATTACH_GRACE,
    keepalive_interval=DEFAULT_KEEPALIVE_INTERVAL,
    keepalive_timeout=DEFAULT_KEEPALIVE_TIMEOUT,
    security=Security(),
    metrics_port=None,
    clock=time.time,
):
    """Build the server on address (port 0 picks a free one) over an opened store.

    Leases that ran out while the server was down expire here, before it serves, and
    sessions still attached to a server that did not stop cleanly become leases of
    reattach_grace seconds (on a local store: on a shared one, other replicas may hold them).
    HTTP/2 keepalive pings every connection keepalive_interval seconds after it was last
    heard from and closes it when the answer takes keepalive_timeout, ending its streams.
    A call holds a pool thread, and counts against the concurrency limit, only once its
    request is in (CallGate); a watcher only while its snapshot is sent, and the pool and
    the limit make room for that many beside the calls.
    Metrics (on metrics_port of the same host) and the token check are interceptors,
    installed only when asked for, so calls without them pay nothing.
    """
    check_can_listen(address)
    credentials = security.credentials()
    UndecodableMetadataLog.install()
    host = address.rpartition(":")[0].strip("[]")
    metrics = Metrics(host, metrics_port) if metrics_port is not None else None
    interceptors = [metrics] if metrics else []
    if security.token:  # outermost, so its refusal reaches the gate unwrapped
        interceptors.insert(0, TokenCheck(security.token, security.public_reads))
    with loading():
        registry = registry_class(store)(store, clock, watch_history, max_sessions)
    expired = registry.expire_due()
    if expired:
        logger.info("%d sessions' leases ran out while the server was down", len(expired))
    orphans = registry.lease_orphans(reattach_grace)
    if orphans:
        logger.info("%d sessions were attached to a server that did not stop cleanly; each is a "
                    "lease of %g s now, for its client to attach again", orphans, reattach_grace)
    gate = CallGate(workers + max_watchers, max_concurrent_rpcs + max_watchers, request_timeout,
                    stream_threads=workers)
    grpc_server = grpc.server(
        gate,  # it limits the calls in progress itself, counting only those with a request
        options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0),
                 ("grpc.max_concurrent_streams", max_streams_per_connection),
                 *pending_call_options(max_concurrent_rpcs + max_watchers + max_attached),
                 *keepalive_options(keepalive_interval, keepalive_timeout)],
        interceptors=interceptors,
    )
    attachments = Attachments(registry, max_attached, reattach_grace)
    service = ClientService(registry, max_lease, max_watchers, watch_buffer, attachments)
    if metrics:
        metrics.watch(registry, service)
        store.commit_timer = metrics.commit
    immediate = getattr(store, "immediate", False)
    add_service(grpc_server, SERVICE, service, INLINE_METHODS if immediate else None,
                () if immediate else DEFERRED_METHODS)
    add_service(grpc_server, NOTIFICATION_SERVICE, NotificationService(registry))
    health_servicer = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for service_name in ("", SERVICE_NAME, NOTIFICATION_SERVICE_NAME):
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    add_reflection(grpc_server, (SERVICE_NAME, NOTIFICATION_SERVICE_NAME, health.SERVICE_NAME))
    if credentials:
        port = grpc_server.add_secure_port(address, credentials)
    else:
        port = grpc_server.add_insecure_port(address)
    return PresenceServer(grpc_server, port, registry, health_servicer, LeaseReaper(registry),
                          gate, attachments, metrics)


def pending_call_options(calls):
    """gRPC's options for the calls that arrived but are not handed to us yet: as many as we
    may take at once. Its default keeps 1,000 and cancels some past that, so clients that all
    attach or watch again at once after a restart would be refused CANCELLED."""
    return [("grpc.server.max_pending_requests", calls),
            ("grpc.server.max_pending_requests_hard_limit", calls)]


def keepalive_options(interval, timeout):
    """gRPC's options for HTTP/2 keepalive: ping each connection interval seconds after it was
    last heard from and close it when the answer takes timeout seconds; let clients send
    pings of their own as often as MIN_CLIENT_PING_SECONDS, calls open or not.

    grpcio 1.85 waits for a ping's answer for the ping timeout, a minute unless set, whatever
    the keepalive timeout says: both are set."""
    return [("grpc.keepalive_time_ms", round(interval * 1000)),
            ("grpc.keepalive_timeout_ms", round(timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", round(timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms",
             round(MIN_CLIENT_PING_SECONDS * 1000))]


def format_address(host, port):
    """host:port, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def security_from(args):
    """The Security the flags ask for; the token from --token or --token-file, never logged."""
    if args.token and args.token_file:
        raise ValueError("give the token by --token or by --token-file, not both")
    token = args.token
    if args.token_file:
        try:
            token = read_bytes(args.token_file).decode().strip()
        except (OSError, UnicodeError) as error:
            raise ValueError(f"cannot read the token file: {error}") from error
        if not token:
            raise ValueError(f"the token file {args.token_file} is empty")
    return Security(args.tls_cert, args.tls_key, args.tls_client_ca, token, args.public_reads)


def describe_security(security, metrics):
    """One log line on how the server is protected (never the token itself)."""
    tls = ("TLS with client certificates" if security.tls_client_ca else
           "TLS" if security.tls_cert else "plaintext (no TLS)")
    token = ("no access token" if not security.token else
             "token required for writes" if security.public_reads else
             "token required for every call")
    where = f", metrics on http://{metrics}/metrics" if metrics else ""
    return f"{tls}, {token}{where}"


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def raise_open_files_limit():
    """Let the process open as many files as the system allows it: each attached client on
    a connection of its own is a socket, and the usual soft limit is 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(args):
    """Run the server until SIGINT or SIGTERM, then stop gracefully.

    The stop signals are blocked before any thread starts and taken with sigwait,
    so no handler ever runs inside a lock the main thread holds.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    raise_open_files_limit()
    security = security_from(args)
    store = open_store(args.store)
    try:
        server = create_server(
            format_address(args.host, args.port),
            store,
            workers=args.workers,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_request_bytes=args.max_request_bytes,
            request_timeout=args.request_timeout,
            max_streams_per_connection=args.max_streams_per_connection,
            max_lease=args.max_lease,
            max_sessions=args.max_sessions,
            max_watchers=args.max_watchers,
            watch_buffer=args.watch_buffer,
            watch_history=args.watch_history,
            max_attached=args.max_attached,
            reattach_grace=args.reattach_grace,
            keepalive_interval=args.keepalive_interval,
            keepalive_timeout=args.keepalive_timeout,
            security=security,
            metrics_port=args.metrics_port,
        )
    except Exception:
        store.close()
        raise
    server.start()
    counts = server.registry.counts()
    logger.info("store %s: %d clients (%d connected), revision %d", args.store,
                counts.connected + counts.disconnected, counts.connected, counts.revision)
    metrics = server.metrics and format_address(args.host, server.metrics.port)
    logger.info("%s", describe_security(security, metrics))
    logger.info("listening on %s", format_address(args.host, server.port))
    received = signal.sigwait(STOP_SIGNALS)
    logger.info("%s: stopping, in-flight calls get up to %.1f s", signal.Signals(received).name,
                args.grace)
    server.stop(args.grace)
    store.close()
    logger.info("store %s flushed and closed", args.store)
    logger.info("stopped")


# --- command line: one table of flags and their environment twins ----------------------------


def _port(text):
    """A TCP port; anything else is a usage error that says what a port is."""
    if not text.strip().isdecimal() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535 (0 takes a "
                                         f"free one), got {text!r}")
    return int(text)


def _positive_int(text):
    """A count of 1 or more; anything else is a usage error that says so."""
    if not text.strip().isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, got {text!r}")
    return int(text)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming the flag and what is wrong (exit 2); --help has the rest."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def _session_cap(text):
    value = _positive_int(text)
    if value > MAX_SESSIONS_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SESSIONS_LIMIT}, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


class Flag(NamedTuple):
    """One flag of the command line; its environment twin is PRESENCE_ and its name in capitals.

    A switch is on when given, or when its twin is set to anything but "", 0 or false."""

    name: str
    default: object
    help: str
    type: Callable[[str], object] = str
    metavar: str | None = None
    choices: Sequence[str] | None = None
    switch: bool = False

    @property
    def env(self):
        return "PRESENCE_" + self.name.removeprefix("--").upper().replace("-", "_")


FLAGS = (
    Flag("--host", DEFAULT_HOST, "interface to listen on; 0.0.0.0 or :: for every interface"),
    Flag("--port", DEFAULT_PORT, "TCP port; 0 takes a free one, logged as "
         "'listening on HOST:PORT'", _port),
    Flag("--store", DEFAULT_STORE, "where statuses live: sqlite:///PATH (durable; a relative PATH "
         "is relative to the working directory; add ?sync=full to also survive a power loss, at "
         "a cost in speed), memory:// (lost on exit), or redis://[:PASSWORD@]HOST:PORT/DB "
         "(rediss:// for TLS) for several replicas on one Redis"),
    Flag("--workers", DEFAULT_WORKERS, "threads serving calls", _positive_int),
    Flag("--max-concurrent-rpcs", DEFAULT_MAX_CONCURRENT_RPCS, "calls served at once (their "
         "request in), plus room for --max-watchers watches sending their snapshot; more are "
         "refused with RESOURCE_EXHAUSTED", _positive_int),
    Flag("--max-request-bytes", DEFAULT_MAX_REQUEST_BYTES, "largest request accepted; larger "
         "ones are refused with RESOURCE_EXHAUSTED", _positive_int),
    Flag("--request-timeout", DEFAULT_REQUEST_TIMEOUT, "seconds a call may take to deliver its "
         "request once its headers came; a later one ends with DEADLINE_EXCEEDED, and until "
         "then it holds no thread", _positive_float),
    Flag("--max-streams-per-connection", DEFAULT_MAX_STREAMS_PER_CONNECTION, "calls one "
         "connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a client "
         "waits for a free one", _positive_int),
    Flag("--max-lease", DEFAULT_MAX_LEASE, "longest lease a Hello may ask for, in seconds; longer "
         "ones are refused with INVALID_ARGUMENT", _positive_int),
    Flag("--max-sessions", DEFAULT_MAX_SESSIONS, "live sessions one client may have at once "
         f"(at most {MAX_SESSIONS_LIMIT}, so one client's record always fits an answer); a Hello "
         "for one more is refused with RESOURCE_EXHAUSTED", _session_cap),
    Flag("--max-watchers", DEFAULT_MAX_WATCHERS, "watch streams open at once; more are refused "
         "with RESOURCE_EXHAUSTED", _positive_int),
    Flag("--watch-buffer", DEFAULT_WATCH_BUFFER, "changes a watcher may fall behind before it is "
         "cut off with RESOURCE_EXHAUSTED", _positive_int),
    Flag("--watch-history", DEFAULT_WATCH_HISTORY, "recent changes kept in memory for watchers "
         "that resume from a revision", _positive_int),
    Flag("--max-attached", DEFAULT_MAX_ATTACHED, "Attach streams open at once; more are refused "
         "with RESOURCE_EXHAUSTED", _positive_int),
    Flag("--reattach-grace", DEFAULT_REATTACH_GRACE, "seconds an attached session stays live as "
         "a lease when its server stops (or is found after a crash), for its client to attach "
         "again without showing a disconnect", _positive_float),
    Flag("--keepalive-interval", DEFAULT_KEEPALIVE_INTERVAL, "seconds after a connection was "
         "last heard from that the server pings it (HTTP/2 keepalive)", _positive_float),
    Flag("--keepalive-timeout", DEFAULT_KEEPALIVE_TIMEOUT, "seconds a keepalive ping may go "
         "unanswered before the connection is closed and its attached sessions end; a vanished "
         "client is offline within interval + timeout", _positive_float),
    Flag("--tls-cert", "", "serve TLS with this certificate chain (PEM); needs --tls-key",
         metavar="FILE"),
    Flag("--tls-key", "", "the private key of --tls-cert (PEM)", metavar="FILE"),
    Flag("--tls-client-ca", "", "mutual TLS: require client certificates signed by this CA "
         "(PEM)", metavar="FILE"),
    Flag("--token", "", "access token: calls must send 'authorization: Bearer TOKEN' or get "
         "UNAUTHENTICATED; health and reflection stay open"),
    Flag("--token-file", "", "read the access token from this file instead (keeps it out of the "
         "process list)", metavar="FILE"),
    Flag("--public-reads", False, "with a token, let status, listing, counts and watch through "
         "without it; writes still need it", switch=True),
    Flag("--metrics-port", None, "serve Prometheus metrics on this port of --host (0 takes a "
         "free one, logged); off when not given", _port),
    Flag("--grace", DEFAULT_GRACE_SECONDS, "seconds in-flight calls get to finish on "
         "SIGINT/SIGTERM", float),
    Flag("--log-level", "INFO", "DEBUG also logs every status change", str.upper,
         choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)


def build_parser(environ=os.environ):
    """The command line, from FLAGS; each flag's default comes from its twin when that is set."""
    parser = OneLineParser(
        description="Presence server: tracks which clients are connected, over gRPC.",
        epilog="Every flag can also be set by the environment variable named in brackets; "
        "a flag on the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for flag in FLAGS:
        help_text = f"{flag.help} [{flag.env}{'=1' if flag.switch else ''}]"
        if flag.switch:
            on = environ.get(flag.env, "").lower() not in ("", "0", "false")
            parser.add_argument(flag.name, action="store_true", default=on, help=help_text)
            continue
        parser.add_argument(flag.name, default=environ.get(flag.env, flag.default),
                            type=flag.type, metavar=flag.metavar, choices=flag.choices,
                            help=help_text)
    return parser


def main(argv=None):
    """Parse the command line and serve; 0 after a clean stop, 1 when it cannot start."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    try:
        serve(args)
    except (StoreError, RuntimeError, OSError, ValueError) as error:
        logger.error("cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
