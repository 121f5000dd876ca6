"""Presence server: a threaded gRPC service that tracks which clients are connected.

Run `python server.py --help` for the flags. The rules live in `Registry`, which
keeps every client in memory behind one lock; a store (`memory://` or the
default `sqlite:///connections.db`) makes each change durable before it is
acknowledged, and a `ChangeLog` hands durable changes to watchers in revision
order. `ClientService` only translates between protobuf and the registry.
"""

import argparse
import base64
import binascii
import collections
import contextlib
import functools
import heapq
import hmac
import itertools
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from concurrent import futures
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError
from grpc import _common as grpc_common  # grpcio's private parts: see CallGate
from grpc import _server as grpc_internals
from grpc._cython import cygrpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sortedcontainers import SortedList

from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ClientService"]
SERVICE_NAME = SERVICE.full_name
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
DEFAULT_MAX_WATCHERS = 1000
DEFAULT_WATCH_BUFFER = 10_000
DEFAULT_WATCH_HISTORY = 100_000
MAX_ID_LENGTH = 128
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000
# Error details travel in gRPC metadata (16 KB at most); longer echoes are cut.
MAX_ECHO = 200
SNAPSHOT_CHUNK = 1000
STATUS_MAP_CHUNK = 10_000
EVENTS_PER_MESSAGE = 500
WATCH_POLL_SECONDS = 1.0
# Calls whose request is late are ended in rounds at least this far apart, so the timer
# wakes at most ten times a second however many calls come.
REQUEST_TIMER_STEP = 0.1
# After each pass over its watchers a sender waits a moment before the next, longer the
# more watchers there are (80 ms at a thousand), so a busy registry reaches them all as a
# few messages of many events each, while a lone watcher sees changes at once.
WATCH_COALESCE_PER_WATCHER = 0.00008
WATCH_COALESCE_MAX = 0.2
WATCH_SENDERS = 4
# A sender that spends this long on one watcher (its connection is slow to take the
# messages) gives its other watchers to a new sender.
WATCH_STUCK_SECONDS = 0.5
REAPER_MAX_SLEEP = 1.0
UNDECODABLE_REPORT_SECONDS = 60.0
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
WRITE_METHODS = frozenset({"SendMessage", "SendMessages"})
# Load balancers and generic tools must reach these without a token.
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)


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


class Session(NamedTuple):
    """One live session; expires_at is 0.0 when it has no lease."""

    session_id: str
    expires_at: float


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


class Message(NamedTuple):
    """A validated Hello or Goodbye."""

    client_id: str
    status: Status
    session_id: str = ""
    lease: int = 0


class Counts(NamedTuple):
    """How many clients are in each status, at a revision."""

    connected: int
    disconnected: int
    live_sessions: int
    revision: int


class InvalidArgument(ValueError):
    """A request broke a rule; the message says which."""


class StoreError(RuntimeError):
    """The store could not make a change durable."""


# --- validation ---------------------------------------------------------------


def validate_client_id(client_id, field="client_id", allow_empty=False):
    """Check DESIGN's id rule: 1 to 128 characters, no control characters."""
    if not client_id:
        if allow_empty:
            return
        raise InvalidArgument(f"{field} must not be empty")
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
    """Read back a token made by encode_page_token, or say it is not one."""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidArgument("page_token is not a token this server issued") from None


# --- sessions -----------------------------------------------------------------


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


# --- the rules ----------------------------------------------------------------


class ChangeLog:
    """The recent changes in revision order, shared by every watcher.

    Each watcher keeps only a cursor (the last revision it sent), so publishing
    costs the same for one watcher or a thousand. Changes become visible once
    the store says they are durable (`advance`); the oldest are dropped past
    `capacity`, and a watcher asking for those is told so (`read` gives None).
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
        """Hold new changes, not yet visible; called in revision order."""
        with self._lock:
            self._changes.extend(changes)
            excess = len(self._changes) - self._capacity
            if excess > self._capacity // 16:  # trimmed in steps: each moves the whole list
                del self._changes[:excess]
                self._first += excess

    def advance(self, revision):
        """Make every change up to revision visible: the store has it."""
        if revision <= self.durable:  # only ever grows, so a stale read just takes the lock
            return
        with self._lock:
            if revision > self.durable:
                self.durable = revision
                if self._waiting:
                    self.changed.notify_all()

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

    def discard_after(self, revision):
        """Forget held changes after revision: the store never saved them."""
        with self._lock:
            del self._changes[max(revision + 1 - self._first, 0):]

    def pause(self, seconds):
        """Wait a moment, less if the log closes meanwhile."""
        self._closing.wait(seconds)

    def close(self):
        """Wake every watcher so it can end its stream."""
        with self.changed:
            self.closed = True
            self._closing.set()
            self.changed.notify_all()


class Registry:
    """Every client's status and sessions in memory, behind one briefly held lock.

    A change is applied in memory, given the next revision, and handed to the
    store under the lock, so the store and the change log see changes in
    revision order; the caller then waits, outside the lock, until the store
    says the change is durable. Looking up one record needs no lock: records
    are immutable and a dict lookup is atomic. Leases sit in a heap ordered by
    expiry, so finding the due ones never scans the clients.
    """

    def __init__(self, store, clock=time.time, history=DEFAULT_WATCH_HISTORY):
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._clients = {}
        self._ids = {Status.CONNECTED: SortedList(), Status.DISCONNECTED: SortedList()}
        # One heap entry per leased session, at or before its expiry: a renewal only moves
        # the session's expiry, and an entry that comes due early is pushed back then.
        self._leases = []
        self._lease_entries = {}  # (client id, session id) -> the time of its heap entry
        self._live_sessions = 0
        self.revision = 0
        self._load(store.load())
        self.log = ChangeLog(self.revision, history)
        # (revision, client id, record before) of each change the store has yet to confirm,
        # to undo them if it fails; a store that cannot fail needs none.
        self._journal = collections.deque() if store.can_fail else None
        store.attach(self._durable)

    def _load(self, records):
        by_status = {status: [] for status in self._ids}
        for record in records:
            self._clients[record.client_id] = record
            by_status[record.status].append(record.client_id)
            self.revision = max(self.revision, record.revision)
            self._live_sessions += len(record.sessions)
            for session in record.sessions:
                if session.expires_at:
                    self._add_lease_locked(session.expires_at, record.client_id,
                                           session.session_id)
        for status, ids in by_status.items():
            self._ids[status] = SortedList(ids)

    # -- changes

    def apply(self, client_id, status, session_id="", lease=0):
        """Apply one Hello or Goodbye; return the record after it and whether it changed."""
        record, change = self.apply_one(Message(client_id, status, session_id, lease))
        return record, change is not None

    def apply_one(self, message):
        """Apply one message and wait until it is durable: (record, change or None)."""
        now = self._clock()
        with self._lock:
            record, change = self._apply_locked(message, now)
            ticket = self._submit_locked((record,), (change,) if change else ())
        self._wait_durable(ticket)
        if change and logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", describe_change(change))
        return record, change

    def apply_many(self, messages):
        """Apply messages in order, durable together; a (record, change or None) for each."""
        now = self._clock()
        with self._lock:
            results = [self._apply_locked(message, now) for message in messages]
            ticket = self._submit_results_locked(results)
        self._wait_durable(ticket)
        if logger.isEnabledFor(logging.DEBUG):
            for _, change in results:
                if change:
                    logger.debug("%s", describe_change(change))
        return results

    def expire_due(self):
        """End every session whose lease has run out; return the changes made."""
        now = self._clock()
        with self._lock:
            results = []
            while self._leases and self._leases[0][0] <= now:
                _, client_id, session_id = heapq.heappop(self._leases)
                del self._lease_entries[client_id, session_id]
                record = self._clients.get(client_id)
                session = record and find_session(record.sessions, session_id)
                if not session or not session.expires_at:
                    continue  # ended, or no longer leased
                if session.expires_at > now:  # renewed since the entry was made
                    self._add_lease_locked(session.expires_at, client_id, session_id)
                    continue
                results.append(self._end_locked(record, session_id, False, now, LEASE_EXPIRED))
            if not results:
                return []
            ticket = self._submit_results_locked(results)
        self._wait_durable(ticket)
        changes = [change for _, change in results if change]
        for change in changes[:10]:
            logger.info("%s", describe_change(change))
        if len(changes) > 10:
            logger.info("%d more leases expired", len(changes) - 10)
        return changes

    def seconds_to_next_expiry(self):
        """How long until the earliest lease may run out (it may have been renewed)."""
        with self._lock:
            return self._leases[0][0] - self._clock() if self._leases else float("inf")

    def _submit_results_locked(self, results):
        return self._submit_locked([record for record, _ in results],
                                   [change for _, change in results if change])

    def _submit_locked(self, records, changes):
        """Hand records to the store and changes to the log, in revision order."""
        if changes:
            self.log.append(changes)
        try:
            return self._store.submit_many(records, self.revision)
        except StoreError:
            self._roll_back_locked()
            raise

    def _wait_durable(self, ticket):
        try:
            self._store.wait(ticket)
        except StoreError:
            with self._lock:
                self._roll_back_locked()
            raise

    def _durable(self, revision):
        """The store has every change up to revision: show them to watchers, forget their undo."""
        self.log.advance(revision)
        if self._journal is not None:
            with self._lock:
                while self._journal and self._journal[0][0] <= revision:
                    self._journal.popleft()

    def _roll_back_locked(self):
        """The store failed: undo what it never confirmed, so readers see only durable state."""
        if not self._journal:
            return
        for _, client_id, old in reversed(self._journal):
            current = self._clients[client_id]
            self._live_sessions -= len(current.sessions) - (len(old.sessions) if old else 0)
            if old is None or old.status != current.status:
                self._ids[current.status].remove(client_id)
                if old is not None:
                    self._ids[old.status].add(client_id)
            if old is None:
                del self._clients[client_id]
            else:
                self._clients[client_id] = old
        logger.error("undid %d changes the store did not save; back at revision %d",
                     len(self._journal), self.log.durable)
        self._journal.clear()
        self.revision = self.log.durable
        self.log.discard_after(self.revision)

    def _apply_locked(self, message, now):
        old = self._clients.get(message.client_id)
        if message.status is Status.CONNECTED:
            return self._hello_locked(old, message, now)
        if old is None:
            return self._record_locked(None, message.client_id, (), EventKind.DISCONNECTED,
                                       message.session_id, GOODBYE, now)
        return self._end_locked(old, message.session_id, not message.session_id, now, GOODBYE)

    def _add_lease_locked(self, expires_at, client_id, session_id):
        """Give a leased session its heap entry, unless it has one already (due no later)."""
        if (client_id, session_id) not in self._lease_entries:
            self._lease_entries[client_id, session_id] = expires_at
            heapq.heappush(self._leases, (expires_at, client_id, session_id))

    def _hello_locked(self, old, message, now):
        expires_at = now + message.lease if message.lease else 0.0
        if expires_at:
            self._add_lease_locked(expires_at, message.client_id, message.session_id)
        sessions = old.sessions if old else ()
        new_sessions = put_session(sessions, Session(message.session_id, expires_at))
        if find_session(sessions, message.session_id):
            return self._unchanged_locked(old, new_sessions, now), None
        kind = EventKind.SESSION_STARTED if sessions else EventKind.CONNECTED
        return self._record_locked(old, message.client_id, new_sessions, kind,
                                   message.session_id, HELLO, now)

    def _end_locked(self, old, session_id, every_session, now, reason):
        new_sessions = () if every_session else drop_session(old.sessions, session_id)
        seen = now if reason != LEASE_EXPIRED else old.last_seen
        if len(new_sessions) == len(old.sessions):
            return self._unchanged_locked(old, new_sessions, seen), None
        kind = EventKind.SESSION_ENDED if new_sessions else EventKind.DISCONNECTED
        return self._record_locked(old, old.client_id, new_sessions, kind, session_id, reason, now,
                                   seen)

    def _unchanged_locked(self, old, sessions, seen):
        record = Client(old.client_id, old.changed_at, seen, old.revision, old.reason, sessions)
        self._install_locked(old, record)
        return record

    def _record_locked(self, old, client_id, sessions, kind, session_id, reason, now, seen=None):
        self.revision += 1
        status = Status.CONNECTED if sessions else Status.DISCONNECTED
        old_status = old and old.status
        if old_status != status:
            changed_at = now
            if old_status:
                self._ids[old_status].remove(client_id)
            self._ids[status].add(client_id)
        else:
            changed_at = old.changed_at
        self._live_sessions += len(sessions) - (len(old.sessions) if old else 0)
        record = Client(client_id, changed_at, now if seen is None else seen, self.revision, reason,
                        sessions)
        self._install_locked(old, record)
        return record, Change(kind, record, session_id)

    def _install_locked(self, old, record):
        self._clients[record.client_id] = record
        if self._journal is not None:
            self._journal.append((self.revision, record.client_id, old))

    # -- reads

    def get(self, client_id):
        """The client's record, or None when it is unknown."""
        return self._clients.get(client_id)

    def snapshot(self):
        """Every record and the revision they are at, for a watcher's first answer."""
        with self._lock:
            return list(self._clients.values()), self.revision

    def page(self, limit, after="", status=None, prefix=""):
        """Up to limit records ordered by id, after `after`; also whether more follow."""
        with self._lock:
            lists = [self._ids[status]] if status else list(self._ids.values())
            ids = heapq.merge(*(self._ids_from(ids, after, prefix) for ids in lists))
            wanted = itertools.takewhile(lambda client_id: client_id.startswith(prefix), ids)
            page = [self._clients[client_id] for client_id in itertools.islice(wanted, limit + 1)]
            revision = self.revision
        return page[:limit], len(page) > limit, revision

    @staticmethod
    def _ids_from(ids, after, prefix):
        start = max(ids.bisect_right(after) if after else 0, ids.bisect_left(prefix))
        return ids.islice(start)

    def counts(self):
        """Clients per status and live sessions, without listing them."""
        with self._lock:
            return Counts(len(self._ids[Status.CONNECTED]), len(self._ids[Status.DISCONNECTED]),
                          self._live_sessions, self.revision)


def describe_change(change):
    """One log line's worth of a change."""
    record = change.record
    session = f" session {change.session_id!r}" if change.session_id else ""
    return (f"{record.client_id}{session}: {change.kind.name.lower()} ({change.reason}); "
            f"{STATUS_WORDS[record.status]} with {len(record.sessions)} sessions, "
            f"revision {change.revision}")


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


# --- stores -------------------------------------------------------------------


class MemoryStore:
    """No persistence: for tests and throwaway runs."""

    can_fail = False

    def attach(self, on_durable):
        self._on_durable = on_durable

    def load(self):
        return []

    def submit_many(self, records, revision):
        return revision

    def wait(self, revision):
        """Publish at once, but outside the registry's lock: waking watchers takes a while."""
        self._on_durable(revision)

    def close(self):
        pass


def encode_sessions(sessions):
    """Sessions as the JSON text of the sessions column; the two commonest without json."""
    if sessions is DEFAULT_SESSIONS:
        return '[["", 0.0]]'
    if not sessions:  # every disconnected client
        return "[]"
    return json.dumps(sessions)


def decode_sessions(text):
    """The sessions column back into sessions, sharing the common default."""
    sessions = tuple(Session(*session) for session in json.loads(text))
    return DEFAULT_SESSIONS if sessions == DEFAULT_SESSIONS else sessions


@functools.lru_cache(maxsize=None)
def _upsert_statement(rows):
    """INSERT OR REPLACE of this many client rows, one statement."""
    return "INSERT OR REPLACE INTO clients VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)


class _Batch:
    """Changes to commit together; `done` once a commit saved them or failed (`error`)."""

    __slots__ = ("records", "revision", "done", "error")

    def __init__(self):
        self.records = []
        self.revision = 0
        self.done = False
        self.error = None


class SqliteStore:
    """Durable store: each writer commits in its own thread, and writers that meet share one.

    `submit_many` adds records to the batch now gathering and returns it; `wait`
    takes the commit lock and, unless the holder before it already saved that
    batch, commits everything gathered so far (group commit). A lone writer thus
    commits with no hand-off to another thread (a hand-off costs more here than
    the commit), and writers arriving while a commit runs share the next one.
    After each commit the registry's change log is told how far is durable.
    """

    can_fail = True
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
        self._mutex = threading.Lock()  # guards _pending and _error
        self._commit_lock = threading.Lock()  # one commit at a time, in revision order
        self._pending = _Batch()
        self.commits = 0
        self._error = None
        self._on_durable = None
        self.commit_timer = None

    def _check_schema(self):
        columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(clients)"))
        if columns != self._COLUMNS:
            raise StoreError(f"{self.path} holds a clients table this server does not know "
                             f"(columns {', '.join(columns)})")
        self._db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")

    def attach(self, on_durable):
        """on_durable(revision) is called after each commit."""
        self._on_durable = on_durable

    def load(self):
        try:
            rows = self._db.execute("SELECT * FROM clients").fetchall()
            records = [Client(row[0], *row[2:6], decode_sessions(row[6])) for row in rows]
        except (sqlite3.Error, ValueError, TypeError) as error:
            raise StoreError(f"cannot read {self.path}: {error}") from error
        logger.info("loaded %d clients from %s", len(records), self.path)
        return records

    def submit_many(self, records, revision):
        with self._mutex:
            if self._error is not None:
                raise self._error
            batch = self._pending
            batch.records.extend(records)
            batch.revision = revision
            return batch

    def wait(self, batch):
        """Return once batch is saved: by this thread, or by the one that held the lock before."""
        with self._commit_lock:
            if not batch.done:
                self._commit_pending()
        if batch.error is not None:
            raise batch.error

    def _commit_pending(self):
        """Save the batch gathering now; called holding the commit lock."""
        with self._mutex:
            batch, self._pending = self._pending, _Batch()
            error = self._error
        if error is None and batch.records:
            started = time.perf_counter()
            try:
                self._save(batch.records)
            except sqlite3.Error as failure:
                error = self._fail(failure)
            else:
                if self.commit_timer:
                    self.commit_timer.observe(time.perf_counter() - started)
                self._on_durable(batch.revision)
                self.commits += 1
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

    def _fail(self, failure):
        """Refuse this batch and every later write: memory is ahead of disk."""
        logger.error("SQLite commit failed, refusing further writes: %s", failure)
        with self._mutex:
            self._error = StoreError(f"the store could not save the change: {failure}")
            return self._error

    def close(self):
        """Commit what is gathered, refuse later writes, then close the database."""
        with self._commit_lock:
            if self._pending.records:
                self._commit_pending()
            with self._mutex:
                self._error = self._error or StoreError("the store is closed")
            self._db.close()
        if self._on_durable:  # attached: it served, so say it stopped cleanly
            logger.info("store %s flushed and closed", self.path)


def open_store(url):
    """Open the store a --store URL names: memory://, or sqlite:///PATH[?sync=normal|full]."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        path, _, query = url[len("sqlite:///"):].partition("?")
        options = urllib.parse.parse_qs(query)
        unknown = set(options) - {"sync"}
        if unknown:
            raise StoreError(f"unknown option {sorted(unknown)[0]!r} in {url!r}: only sync")
        return SqliteStore(path, *options.get("sync", [])[-1:])
    raise StoreError(f"unsupported store URL {url!r}: use sqlite:///PATH or memory://")


# --- the gRPC service ---------------------------------------------------------


def _set_timestamp(timestamp, seconds):
    whole = int(seconds)
    timestamp.seconds = whole
    timestamp.nanos = int((seconds - whole) * 1e9)


def client_to_pb(record):
    """The wire form of a client record."""
    message = pb.Client()
    fill_client(message, record)
    return message


# The default session as a Client's wire bytes: merging them costs less than sessions.add().
DEFAULT_SESSIONS_WIRE = pb.Client(sessions=[pb.Session()]).SerializeToString()


def fill_client(message, record):
    """Set a Client message from a record, field by field: the cheapest way with upb."""
    client_id, changed_at, last_seen, revision, reason, sessions = record
    message.client_id = client_id
    message.status = Status.CONNECTED if sessions else Status.DISCONNECTED
    message.revision = revision
    message.reason = reason
    _set_timestamp(message.changed_at, changed_at)
    _set_timestamp(message.last_seen, last_seen)
    if sessions is DEFAULT_SESSIONS:
        message.MergeFromString(DEFAULT_SESSIONS_WIRE)
        return
    for session in sessions:
        added = message.sessions.add(session_id=session.session_id)
        if session.expires_at:
            _set_timestamp(added.expires_at, session.expires_at)


def change_to_pb(change):
    """The wire form of a change."""
    return pb.Event(revision=change.revision, kind=change.kind, client=client_to_pb(change.record),
                    session_id=change.session_id, reason=change.reason)


def change_wire(change):
    """The change as a serialized one-event WatchResponse, made once for every watcher.

    Such messages concatenate into one WatchResponse with all their events and the
    last revision (a repeated field appends, a scalar's last value wins).
    """
    if change.wire is None:
        change.wire = pb.WatchResponse(events=[change_to_pb(change)],
                                       revision=change.revision).SerializeToString()
    return change.wire


def _status_filter(value):
    if value == pb.STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_WORDS:
        raise InvalidArgument(f"status must be one of {sorted(pb.Status.keys())}, got {value}")
    return Status(value)


def parse_request(request, max_lease, index=None):
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


def reply_info(message, record):
    """The info text: the original one, or what happened to a named session."""
    if not record.sessions:
        return f"Client {record.client_id} marked as disconnected."
    if message.status is Status.DISCONNECTED:
        return (f"Client {record.client_id} session {message.session_id} ended; still connected "
                f"with {len(record.sessions)} sessions.")
    return f"Client {record.client_id} marked as connected."


def serialize_statuses(records):
    """The all-clients answer, serialized chunk by chunk.

    Serialized messages concatenate into their merge, so chunks give the same
    bytes as one big message while letting other threads run between them: one
    call at a million clients never stalls the rest of the server.
    """
    return b"".join(
        pb.ClientStatusResponse(statuses={
            record.client_id: STATUS_WORDS[record.status]
            for record in records[start:start + STATUS_MAP_CHUNK]}).SerializeToString()
        for start in range(0, len(records), STATUS_MAP_CHUNK))


def serialize_response(response):
    """Serialize a response, passing through one already serialized in parts."""
    return response if type(response) is bytes else response.SerializeToString()


class Malformed(NamedTuple):
    """A request whose bytes did not parse; its handler refuses it with INVALID_ARGUMENT."""

    type_name: str
    error: str


def parse_request_bytes(message_class):
    """A deserializer that hands a Malformed on instead of failing the call as INTERNAL."""
    def parse(data):
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


def method_handlers(service):
    """The service's handlers, as the generated code makes them but with serialize_response."""
    handlers = {}
    for method in SERVICE.methods:
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(
            refuse_malformed(getattr(service, method.name)),
            request_deserializer=parse_request_bytes(getattr(pb, method.input_type.name)),
            response_serializer=serialize_response,
        )
    return handlers


def message_response(message, record, change):
    """The answer to one Hello or Goodbye."""
    response = pb.MessageResponse(success=True, info=reply_info(message, record),
                                  changed=change is not None)
    fill_client(response.client, record)
    return response


class ClientService(pb_grpc.ClientServiceServicer):
    """Translates between protobuf messages and the registry."""

    def __init__(self, registry, max_lease=DEFAULT_MAX_LEASE, max_watchers=DEFAULT_MAX_WATCHERS,
                 watch_buffer=DEFAULT_WATCH_BUFFER):
        self._registry = registry
        self._max_lease = max_lease
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self._max_watchers = max_watchers
        self._watchers_lock = threading.Lock()
        self.watchers = 0
        self._fanout = Fanout(registry.log, watch_buffer)

    def SendMessage(self, request, context):
        try:
            message = parse_request(request, self._max_lease)
            record, change = self._registry.apply_one(message)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StoreError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return message_response(message, record, change)

    def SendMessages(self, request, context):
        if len(request.requests) > MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {MAX_BATCH} requests per call, got {len(request.requests)}")
        return pb.SendMessagesResponse(responses=self._send(request.requests, context, batch=True))

    def _send(self, requests, context, batch=False):
        try:
            messages = [parse_request(request, self._max_lease, index if batch else None)
                        for index, request in enumerate(requests)]
            results = self._registry.apply_many(messages)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StoreError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return [message_response(message, record, change)
                for message, (record, change) in zip(messages, results)]

    def GetClientStatus(self, request, context):
        client_id = request.client_id
        if not client_id:
            return serialize_statuses(self._registry.snapshot()[0])
        try:
            validate_client_id(client_id)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        record = self._registry.get(client_id)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Client {client_id} not found")
        return pb.ClientStatusResponse(
            statuses={client_id: STATUS_WORDS[record.status]}, clients=[client_to_pb(record)]
        )

    def ListClients(self, request, context):
        try:
            if request.page_size < 0:
                raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
            validate_client_id(request.id_prefix, "id_prefix", allow_empty=True)
            status = _status_filter(request.status)
            after = decode_page_token(request.page_token) if request.page_token else ""
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        records, more, revision = self._registry.page(limit, after, status, request.id_prefix)
        return pb.ListClientsResponse(
            clients=[client_to_pb(record) for record in records],
            next_page_token=encode_page_token(records[-1].client_id) if more else "",
            revision=revision,
        )

    def CountClients(self, request, context):
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
        log = self._registry.log
        resync = bool(since) and (since > self._registry.revision or log.read(since) is None)
        if resync or not since:
            since = self._send_snapshot(context, send, resync)
        watcher.since = since
        self._fanout.add(watcher)

    Watch.experimental_non_blocking = True  # gRPC passes `send`; the stream outlives the call

    def _watch_ended(self, watcher):
        self._fanout.remove(watcher)
        with self._watchers_lock:
            self.watchers -= 1
        self._watch_slots.release()

    def _send_snapshot(self, context, send, resync):
        """Send every client as of one revision, in chunks; return that revision."""
        records, revision = self._registry.snapshot()
        chunks = [records[start:start + SNAPSHOT_CHUNK]
                  for start in range(0, len(records), SNAPSHOT_CHUNK)] or [[]]
        for number, chunk in enumerate(chunks):
            if not context.is_active():
                break
            send(pb.WatchResponse(snapshot=[client_to_pb(record) for record in chunk],
                                  snapshot_complete=number == len(chunks) - 1,
                                  resync=resync and number == 0, revision=revision))
        return revision


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
        for start in range(0, len(changes), EVENTS_PER_MESSAGE):
            chunk = changes[start:start + EVENTS_PER_MESSAGE]
            watcher.send(b"".join(change_wire(change) for change in chunk))
            watcher.since = chunk[-1].revision
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


# --- security, limits and metrics -----------------------------------------------


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


refuse_unauthenticated.refusal = REFUSAL


class TokenCheck(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>`: writes always, reads unless public.

    The comparison is constant-time, and the token is never logged.
    """

    def __init__(self, token, public_reads=False):
        self._expected = f"Bearer {token}".encode()
        self._public_reads = public_reads

    def intercept_service(self, continuation, details):
        service, _, method = details.method.lstrip("/").rpartition("/")
        needs_token = service == SERVICE_NAME and (method in WRITE_METHODS
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
    """A pool of threads, and how many calls may hold one or wait for one at once."""

    def __init__(self, name, threads, limit):
        self._pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._limit = limit
        self._running = 0
        self._lock = threading.Lock()

    def start(self, state, call, run):
        """Run a call on the pool if the limit allows, else refuse it with RESOURCE_EXHAUSTED."""
        with self._lock:
            full = self._running >= self._limit
            if not full:
                self._running += 1
        if full:
            end_call(state, call, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     f"too many calls at once (limit {self._limit}); try again later")
            return
        self._pool.submit(run).add_done_callback(self._release)

    def submit(self, fn, *args, **kwargs):
        """Run fn on the pool, outside the limit."""
        return self._pool.submit(fn, *args, **kwargs)

    def _release(self, unused_future):
        """Free the slot of a call that has ended."""
        with self._lock:
            self._running -= 1

    def shutdown(self, wait, cancel_futures):
        """Let the threads end once the server has stopped."""
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


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
    limit a call gets RESOURCE_EXHAUSTED.

    It drives grpcio's private server internals (grpc._server) of the pinned version;
    tests/test_hostile_peers.py fails when they change, and a call of a shape it does not
    know runs as a plain pool would run it.
    """

    def __init__(self, threads, max_concurrent, request_timeout, stream_threads):
        self.max_workers = threads  # the calls' threads, as a ThreadPoolExecutor would say
        self._calls = _Lane("rpc", threads, max_concurrent)
        self._streams = _Lane("rpc-stream", stream_threads, stream_threads)
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

        def run(request_thunk):
            return functools.partial(fn, task, event, state, behavior, request_thunk,
                                     deserializer, serializer)

        if take_request.__name__ == "unary_request":
            self._await_request(event, state, deserializer, run)
        else:
            self._streams.start(state, event.call, run(take_request))
        return _DONE

    def _await_request(self, event, state, deserializer, run):
        """Ask gRPC for the request; start the call when it comes, or end it at its deadline."""
        awaited = _Awaited(time.monotonic() + self._request_timeout, state, event.call)
        receive = grpc_internals._receive_message(state, event.call, deserializer)

        def arrived(receive_event):
            outcome = receive(receive_event)  # gRPC's own: keeps the request, or notes the end
            try:
                self._request_arrived(awaited, run)
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

    def _request_arrived(self, awaited, run):
        """Start a call whose request came; one that ended without a request is refused."""
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
        self._calls.start(state, call, run(
            lambda: request if grpc_internals._is_rpc_state_active(state) else None))

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
        self._calls.shutdown(wait, cancel_futures)
        self._streams.shutdown(wait, cancel_futures)


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


# --- wiring -------------------------------------------------------------------


@dataclass
class PresenceServer:
    """A built, not yet started server: the gRPC server, the port it bound, its parts."""

    grpc_server: grpc.Server
    port: int
    registry: Registry
    health: health.HealthServicer
    reaper: LeaseReaper
    gate: CallGate
    metrics: Metrics | None = None

    def start(self):
        self.reaper.start()
        self.grpc_server.start()

    def stop(self, grace=None):
        """Refuse new calls, end watches, let in-flight calls finish within grace seconds."""
        self.health.enter_graceful_shutdown()
        self.registry.log.close()
        self.grpc_server.stop(grace).wait()
        self.gate.shutdown(wait=False)
        self.reaper.stop()
        if self.metrics:
            self.metrics.close()


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
    max_watchers=DEFAULT_MAX_WATCHERS,
    watch_buffer=DEFAULT_WATCH_BUFFER,
    watch_history=DEFAULT_WATCH_HISTORY,
    security=Security(),
    metrics_port=None,
    clock=time.time,
):
    """Build the server on address (port 0 picks a free one) over an opened store.

    Leases that ran out while the server was down expire here, before it serves.
    A call holds a pool thread, and counts against the concurrency limit, only once its
    request is in (CallGate); a watcher only while its snapshot is sent, and the pool and
    the limit make room for that many beside the calls.
    Metrics (on metrics_port of the same host) and the token check are interceptors,
    installed only when asked for, so calls without them pay nothing.
    """
    credentials = security.credentials()
    UndecodableMetadataLog.install()
    host = address.rpartition(":")[0].strip("[]")
    metrics = Metrics(host, metrics_port) if metrics_port is not None else None
    interceptors = [metrics] if metrics else []
    if security.token:  # outermost, so its refusal reaches the gate unwrapped
        interceptors.insert(0, TokenCheck(security.token, security.public_reads))
    registry = Registry(store, clock, watch_history)
    expired = registry.expire_due()
    if expired:
        logger.info("%d sessions' leases ran out while the server was down", len(expired))
    gate = CallGate(workers + max_watchers, max_concurrent_rpcs + max_watchers, request_timeout,
                    stream_threads=workers)
    grpc_server = grpc.server(
        gate,  # it limits the calls in progress itself, counting only those with a request
        options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0),
                 ("grpc.max_concurrent_streams", max_streams_per_connection)],
        interceptors=interceptors,
    )
    service = ClientService(registry, max_lease, max_watchers, watch_buffer)
    if metrics:
        metrics.watch(registry, service)
        store.commit_timer = metrics.commit
    handlers = method_handlers(service)
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    grpc_server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for service_name in ("", SERVICE_NAME):
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    if credentials:
        port = grpc_server.add_secure_port(address, credentials)
    else:
        port = grpc_server.add_insecure_port(address)
    return PresenceServer(grpc_server, port, registry, health_servicer, LeaseReaper(registry),
                          gate, metrics)


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


def serve(args):
    """Run the server until SIGINT or SIGTERM, then stop gracefully.

    The stop signals are blocked before any thread starts and taken with sigwait,
    so no handler ever runs inside a lock the main thread holds.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
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
            max_watchers=args.max_watchers,
            watch_buffer=args.watch_buffer,
            watch_history=args.watch_history,
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
    logger.info("stopped")


# --- command line -------------------------------------------------------------


def _env(name, default):
    return os.environ.get(f"PRESENCE_{name}", default)


def _port(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535, got {port}")
    return port


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser():
    """The command line; every flag has a PRESENCE_* environment twin."""
    parser = argparse.ArgumentParser(
        description="Presence server: tracks which clients are connected, over gRPC.",
        epilog="Every flag can also be set by the environment variable named in brackets; "
        "a flag on the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=_env("HOST", DEFAULT_HOST),
                        help="interface to listen on; 0.0.0.0 or :: for every interface "
                        "[PRESENCE_HOST]")
    parser.add_argument("--port", type=_port, default=_env("PORT", DEFAULT_PORT),
                        help="TCP port; 0 takes a free one, logged as 'listening on HOST:PORT' "
                        "[PRESENCE_PORT]")
    parser.add_argument("--store", default=_env("STORE", DEFAULT_STORE),
                        help="where statuses live: sqlite:///PATH (durable; a relative PATH is "
                        "relative to the working directory; add ?sync=full to also survive a "
                        "power loss, at a cost in speed) or memory:// (lost on exit) "
                        "[PRESENCE_STORE]")
    parser.add_argument("--workers", type=_positive_int, default=_env("WORKERS", DEFAULT_WORKERS),
                        help="threads serving calls [PRESENCE_WORKERS]")
    parser.add_argument("--max-concurrent-rpcs", type=_positive_int,
                        default=_env("MAX_CONCURRENT_RPCS", DEFAULT_MAX_CONCURRENT_RPCS),
                        help="calls served at once (their request in), plus room for "
                        "--max-watchers watches sending their snapshot; more are refused with "
                        "RESOURCE_EXHAUSTED [PRESENCE_MAX_CONCURRENT_RPCS]")
    parser.add_argument("--max-request-bytes", type=_positive_int,
                        default=_env("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
                        help="largest request accepted; larger ones are refused with "
                        "RESOURCE_EXHAUSTED [PRESENCE_MAX_REQUEST_BYTES]")
    parser.add_argument("--request-timeout", type=_positive_float,
                        default=_env("REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT),
                        help="seconds a call may take to deliver its request once its headers "
                        "came; a later one ends with DEADLINE_EXCEEDED, and until then it "
                        "holds no thread [PRESENCE_REQUEST_TIMEOUT]")
    parser.add_argument("--max-streams-per-connection", type=_positive_int,
                        default=_env("MAX_STREAMS_PER_CONNECTION",
                                     DEFAULT_MAX_STREAMS_PER_CONNECTION),
                        help="calls one connection may have open at once (HTTP/2 "
                        "SETTINGS_MAX_CONCURRENT_STREAMS); a client waits for a free one "
                        "[PRESENCE_MAX_STREAMS_PER_CONNECTION]")
    parser.add_argument("--max-lease", type=_positive_int,
                        default=_env("MAX_LEASE", DEFAULT_MAX_LEASE),
                        help="longest lease a Hello may ask for, in seconds; longer ones are "
                        "refused with INVALID_ARGUMENT [PRESENCE_MAX_LEASE]")
    parser.add_argument("--max-watchers", type=_positive_int,
                        default=_env("MAX_WATCHERS", DEFAULT_MAX_WATCHERS),
                        help="watch streams open at once; more are refused with "
                        "RESOURCE_EXHAUSTED [PRESENCE_MAX_WATCHERS]")
    parser.add_argument("--watch-buffer", type=_positive_int,
                        default=_env("WATCH_BUFFER", DEFAULT_WATCH_BUFFER),
                        help="changes a watcher may fall behind before it is cut off with "
                        "RESOURCE_EXHAUSTED [PRESENCE_WATCH_BUFFER]")
    parser.add_argument("--watch-history", type=_positive_int,
                        default=_env("WATCH_HISTORY", DEFAULT_WATCH_HISTORY),
                        help="recent changes kept in memory for watchers that resume from a "
                        "revision [PRESENCE_WATCH_HISTORY]")
    parser.add_argument("--tls-cert", metavar="FILE", default=_env("TLS_CERT", ""),
                        help="serve TLS with this certificate chain (PEM); needs --tls-key "
                        "[PRESENCE_TLS_CERT]")
    parser.add_argument("--tls-key", metavar="FILE", default=_env("TLS_KEY", ""),
                        help="the private key of --tls-cert (PEM) [PRESENCE_TLS_KEY]")
    parser.add_argument("--tls-client-ca", metavar="FILE", default=_env("TLS_CLIENT_CA", ""),
                        help="mutual TLS: require client certificates signed by this CA (PEM) "
                        "[PRESENCE_TLS_CLIENT_CA]")
    parser.add_argument("--token", default=_env("TOKEN", ""),
                        help="access token: calls must send 'authorization: Bearer TOKEN' or get "
                        "UNAUTHENTICATED; health and reflection stay open [PRESENCE_TOKEN]")
    parser.add_argument("--token-file", metavar="FILE", default=_env("TOKEN_FILE", ""),
                        help="read the access token from this file instead (keeps it out of "
                        "the process list) [PRESENCE_TOKEN_FILE]")
    parser.add_argument("--public-reads", action="store_true",
                        default=_env("PUBLIC_READS", "") not in ("", "0", "false"),
                        help="with a token, let status, listing, counts and watch through "
                        "without it; writes still need it [PRESENCE_PUBLIC_READS=1]")
    parser.add_argument("--metrics-port", type=_port, default=_env("METRICS_PORT", None),
                        help="serve Prometheus metrics on this port of --host (0 takes a free "
                        "one, logged); off when not given [PRESENCE_METRICS_PORT]")
    parser.add_argument("--grace", type=float, default=_env("GRACE", DEFAULT_GRACE_SECONDS),
                        help="seconds in-flight calls get to finish on SIGINT/SIGTERM "
                        "[PRESENCE_GRACE]")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                        help="DEBUG also logs every status change [PRESENCE_LOG_LEVEL]")
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
