"""Presence server: a threaded gRPC service that tracks which clients are connected.

Run `python server.py --help` for the flags. The rules live in `Registry`, which
keeps every client in memory behind one lock; a store (`memory://` or the
default `sqlite:///connections.db`) makes each change durable before it is
acknowledged. `ClientService` only translates between protobuf and the registry.
"""

import argparse
import base64
import binascii
import heapq
import itertools
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sortedcontainers import SortedList

from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClientService"].full_name
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_STORE = "sqlite:///connections.db"
DEFAULT_WORKERS = 16
DEFAULT_MAX_CONCURRENT_RPCS = 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_GRACE_SECONDS = 5.0
MAX_ID_LENGTH = 128
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


class Status(IntEnum):
    """A client's status; the values are the wire enum's."""

    CONNECTED = pb.STATUS_CONNECTED
    DISCONNECTED = pb.STATUS_DISCONNECTED


STATUS_WORDS = {Status.CONNECTED: "connected", Status.DISCONNECTED: "disconnected"}
MESSAGES = {"hello": Status.CONNECTED, "goodbye": Status.DISCONNECTED}


class Client(NamedTuple):
    """One client's record; immutable, so readers share it without copying."""

    client_id: str
    status: int
    changed_at: float
    last_seen: float
    revision: int


class Counts(NamedTuple):
    """How many clients are in each status, at a revision."""

    connected: int
    disconnected: int
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
    status = MESSAGES.get(message.strip().lower())
    if status is None:
        raise InvalidArgument(f"Invalid message type: {message}")
    return status


def encode_page_token(client_id):
    """Make the opaque token that resumes a listing after client_id."""
    return base64.urlsafe_b64encode(client_id.encode()).decode()


def decode_page_token(token):
    """Read back a token made by encode_page_token, or say it is not one."""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidArgument("page_token is not a token this server issued") from None


# --- the rules ----------------------------------------------------------------


class Registry:
    """Every client's status in memory, behind one briefly held lock.

    A change is applied in memory and handed to the store under the lock, so the
    store sees changes in revision order; the caller then waits, outside the
    lock, until the store says the change is durable.
    """

    def __init__(self, store, clock=time.time):
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._clients = {}
        self._ids = {Status.CONNECTED: SortedList(), Status.DISCONNECTED: SortedList()}
        self.revision = 0
        self._load(store.load())

    def _load(self, records):
        by_status = {status: [] for status in self._ids}
        for record in records:
            self._clients[record.client_id] = record
            by_status[record.status].append(record.client_id)
            self.revision = max(self.revision, record.revision)
        for status, ids in by_status.items():
            self._ids[status] = SortedList(ids)

    def apply(self, client_id, status):
        """Set a client's status; return its record and whether the status changed."""
        return self.apply_many([(client_id, status)])[0]

    def apply_many(self, changes):
        """Set several statuses in order, durable together; a (record, changed) for each."""
        now = self._clock()
        with self._lock:
            results = [self._apply_locked(client_id, status, now) for client_id, status in changes]
            ticket = self._store.submit_many([record for record, _ in results])
        self._store.wait(ticket)
        if logger.isEnabledFor(logging.DEBUG):
            for record, changed in results:
                if changed:
                    logger.debug("%s is %s (revision %d)", record.client_id,
                                 STATUS_WORDS[record.status], record.revision)
        return results

    def _apply_locked(self, client_id, status, now):
        old = self._clients.get(client_id)
        if old is not None and old.status == status:
            record = Client(client_id, status, old.changed_at, now, old.revision)
            self._clients[client_id] = record
            return record, False
        self.revision += 1
        record = Client(client_id, status, now, now, self.revision)
        if old is not None:
            self._ids[old.status].remove(client_id)
        self._ids[status].add(client_id)
        self._clients[client_id] = record
        return record, True

    def get(self, client_id):
        """The client's record, or None when it is unknown."""
        return self._clients.get(client_id)

    def statuses(self):
        """Every client's status word, for the original all-clients answer."""
        with self._lock:
            records = list(self._clients.values())
        return {record.client_id: STATUS_WORDS[record.status] for record in records}

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
        """Clients per status, without listing them."""
        with self._lock:
            return Counts(
                len(self._ids[Status.CONNECTED]), len(self._ids[Status.DISCONNECTED]), self.revision
            )


# --- stores -------------------------------------------------------------------


class MemoryStore:
    """No persistence: for tests and throwaway runs."""

    def load(self):
        return []

    def submit_many(self, records):
        return 0

    def wait(self, ticket):
        pass

    def close(self):
        pass


class SqliteStore:
    """Durable store: one writer thread commits queued changes together (group commit).

    `submit_many` queues records and returns a ticket; `wait` blocks until a commit
    covering that ticket has reached the disk. While one commit runs, the next
    batch gathers, so concurrent writers share commits instead of queueing.
    """

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS clients (
            client_id TEXT PRIMARY KEY,
            status INTEGER NOT NULL,
            changed_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            revision INTEGER NOT NULL
        ) WITHOUT ROWID
    """
    _UPSERT = "INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?)"

    def __init__(self, path):
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(self._SCHEMA)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open SQLite database {path}: {error}") from error
        self._mutex = threading.Lock()
        self._has_work = threading.Condition(self._mutex)
        self._committed_cond = threading.Condition(self._mutex)
        self._pending = []
        self._submitted = 0
        self._committed = 0
        self.commits = 0
        self._error = None
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer", daemon=True)
        self._writer.start()

    def load(self):
        rows = self._db.execute("SELECT * FROM clients").fetchall()
        logger.info("loaded %d clients from %s", len(rows), self.path)
        return [Client._make(row) for row in rows]

    def submit_many(self, records):
        with self._mutex:
            if self._error is not None:
                raise self._error
            self._pending.extend(records)
            self._submitted += 1
            self._has_work.notify()
            return self._submitted

    def wait(self, ticket):
        with self._mutex:
            while self._committed < ticket:
                if self._error is not None:
                    raise self._error
                self._committed_cond.wait()

    def _write_loop(self):
        while True:
            with self._mutex:
                while not self._pending and not self._closing:
                    self._has_work.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                last = self._submitted
            try:
                self._db.execute("BEGIN")
                self._db.executemany(self._UPSERT, batch)
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                logger.error("SQLite commit failed, refusing further writes: %s", error)
                with self._mutex:
                    self._error = StoreError(f"the store could not save the change: {error}")
                    self._committed_cond.notify_all()
                return
            with self._mutex:
                self._committed = last
                self.commits += 1
                self._committed_cond.notify_all()

    def close(self):
        """Commit what is queued, then close the database."""
        with self._mutex:
            self._closing = True
            self._has_work.notify()
        self._writer.join()
        self._db.close()
        logger.info("store %s flushed and closed", self.path)


def open_store(url):
    """Open the store a --store URL names."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteStore(url[len("sqlite:///"):])
    raise StoreError(f"unsupported store URL {url!r}: use sqlite:///PATH or memory://")


# --- the gRPC service ---------------------------------------------------------


def _set_timestamp(timestamp, seconds):
    whole = int(seconds)
    timestamp.seconds = whole
    timestamp.nanos = int((seconds - whole) * 1e9)


def client_to_pb(record):
    """The wire form of a client record."""
    message = pb.Client(client_id=record.client_id, status=record.status, revision=record.revision)
    _set_timestamp(message.changed_at, record.changed_at)
    _set_timestamp(message.last_seen, record.last_seen)
    return message


def _status_filter(value):
    if value == pb.STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_WORDS:
        raise InvalidArgument(f"status must be one of {sorted(pb.Status.keys())}, got {value}")
    return Status(value)


def _parse_request(request, index=None):
    """Validate one MessageRequest into (client_id, status); index names it within a batch."""
    try:
        status = parse_message(request.message)
        validate_client_id(request.client_id)
    except InvalidArgument as error:
        if index is None:
            raise
        raise InvalidArgument(f"requests[{index}]: {error}") from None
    return request.client_id, status


class ClientService(pb_grpc.ClientServiceServicer):
    """Translates between protobuf messages and the registry."""

    def __init__(self, registry):
        self._registry = registry

    def SendMessage(self, request, context):
        return self._send([request], context)[0]

    def SendMessages(self, request, context):
        if len(request.requests) > MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {MAX_BATCH} requests per call, got {len(request.requests)}")
        return pb.SendMessagesResponse(responses=self._send(request.requests, context, batch=True))

    def _send(self, requests, context, batch=False):
        try:
            changes = [_parse_request(request, index if batch else None)
                       for index, request in enumerate(requests)]
            results = self._registry.apply_many(changes)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StoreError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return [
            pb.MessageResponse(
                success=True,
                info=f"Client {record.client_id} marked as {STATUS_WORDS[record.status]}.",
                client=client_to_pb(record),
                changed=changed,
            )
            for record, changed in results
        ]

    def GetClientStatus(self, request, context):
        client_id = request.client_id
        if not client_id:
            return pb.ClientStatusResponse(statuses=self._registry.statuses())
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
            revision=counts.revision,
        )


# --- wiring -------------------------------------------------------------------


@dataclass
class PresenceServer:
    """A built, not yet started server: the gRPC server, the port it bound, its parts."""

    grpc_server: grpc.Server
    port: int
    registry: Registry
    health: health.HealthServicer

    def start(self):
        self.grpc_server.start()

    def stop(self, grace=None):
        """Refuse new calls, let in-flight ones finish within grace seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def create_server(
    address,
    store,
    *,
    workers=DEFAULT_WORKERS,
    max_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
    max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
    clock=time.time,
):
    """Build the server on address (port 0 picks a free one) over an opened store."""
    registry = Registry(store, clock)
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_ClientServiceServicer_to_server(ClientService(registry), grpc_server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    port = grpc_server.add_insecure_port(address)
    return PresenceServer(grpc_server, port, registry, health_servicer)


def format_address(host, port):
    """host:port, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def serve(args):
    """Run the server until SIGINT or SIGTERM, then stop gracefully."""
    store = open_store(args.store)
    try:
        server = create_server(
            format_address(args.host, args.port),
            store,
            workers=args.workers,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_request_bytes=args.max_request_bytes,
        )
    except Exception:
        store.close()
        raise
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stopping.set())
    server.start()
    logger.info("store %s, %d clients, revision %d", args.store, len(server.registry._clients),
                server.registry.revision)
    logger.info("listening on %s", format_address(args.host, server.port))
    stopping.wait()
    logger.info("stopping: finishing in-flight calls (up to %.1f s)", args.grace)
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
                        "relative to the working directory) or memory:// (lost on exit) "
                        "[PRESENCE_STORE]")
    parser.add_argument("--workers", type=_positive_int, default=_env("WORKERS", DEFAULT_WORKERS),
                        help="threads serving calls [PRESENCE_WORKERS]")
    parser.add_argument("--max-concurrent-rpcs", type=_positive_int,
                        default=_env("MAX_CONCURRENT_RPCS", DEFAULT_MAX_CONCURRENT_RPCS),
                        help="calls in progress at once; more are refused with "
                        "RESOURCE_EXHAUSTED [PRESENCE_MAX_CONCURRENT_RPCS]")
    parser.add_argument("--max-request-bytes", type=_positive_int,
                        default=_env("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
                        help="largest request accepted; larger ones are refused with "
                        "RESOURCE_EXHAUSTED [PRESENCE_MAX_REQUEST_BYTES]")
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
    except (StoreError, RuntimeError, OSError) as error:
        logger.error("cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
