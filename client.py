"""Presence client: a menu REPL, piped scripts and one-shot commands for the presence service."""

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# gRPC's C core prints its own log lines (a failed TLS handshake, say) to stderr, read
# when grpc is imported; the client says what went wrong in one line of its own instead.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402 (after the verbosity above)
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SERVER_ERROR = 1  # the server answered with an error status
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_UNREACHABLE = 3  # UNAVAILABLE or no answer before the deadline
EXIT_UNAUTHENTICATED = 4  # the server wants an access token this client did not give
EXIT_INTERRUPTED = 130  # Ctrl-C during a one-shot command, as shells report SIGINT

DEFAULT_SERVER = "localhost:50051"
DEFAULT_TIMEOUT = 5.0
DEFAULT_HISTORY = "~/.presence_history"
PAGE_SIZE = 1000  # the server's largest page
MAX_ROWS = 200  # a table longer than this helps nobody; --json gets every client
QUICK_TIMEOUT = 1.0  # completion and toolbar calls must never keep the user waiting
IDS_TTL = 5.0  # seconds a page of ids for completion stays fresh
COUNT_INTERVAL = 3.0  # seconds between toolbar refreshes of the online count
DEFAULT_LEASE = 15  # seconds; --as renews at a third of it, so a crash shows within this
WATCH_REFRESH = 4  # live table redraws per second at most
MIN_COUNT_SPACING = 0.2  # the toolbar recounts at most this often when the stream is busy
PROMPT = "presence> "
MESSAGES = ("hello", "goodbye")
RETRY_HINT = " — retrying on the next command"
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
STATUS_WORDS = {pb.STATUS_CONNECTED: "connected", pb.STATUS_DISCONNECTED: "disconnected"}
WORD_STATUSES = {word: status for status, word in STATUS_WORDS.items()}
STATUS_STYLES = {pb.STATUS_CONNECTED: "bold green", pb.STATUS_DISCONNECTED: "dim red"}
EVENT_WORDS = {pb.EVENT_CONNECTED: "connected", pb.EVENT_DISCONNECTED: "disconnected",
               pb.EVENT_SESSION_STARTED: "session_started", pb.EVENT_SESSION_ENDED: "session_ended"}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClientService"].full_name
# gRPC retries UNAVAILABLE itself, with backoff, within each call's deadline.
SERVICE_CONFIG = {"methodConfig": [{
    "name": [{"service": SERVICE_NAME}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]}
CHANNEL_OPTIONS = (
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # The old all-clients map of a large registry is far past gRPC's 4 MB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    # A server that comes back is found within seconds, not gRPC's default two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


# --- the menu as data -----------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One argument of a command; its name also picks the completion source ("id", "message")."""

    name: str
    prompt: str
    help: str
    optional: bool = False

    @property
    def usage(self):
        return f"[{self.name.upper()}]" if self.optional else self.name.upper()


@dataclass(frozen=True)
class Command:
    """A menu entry, run by the dispatcher's `do_<name>`; one_shot ones are also subcommands."""

    name: str
    summary: str
    number: str = ""
    aliases: tuple = ()
    params: tuple = ()
    one_shot: bool = False

    @property
    def words(self):
        return (self.name, *self.aliases)

    @property
    def usage(self):
        return " ".join((self.name, *(param.usage for param in self.params)))


@dataclass(frozen=True)
class Answer:
    """What a command produced: a renderable for people and a dict for --json."""

    renderable: RenderableType
    data: dict | None = None


@dataclass(frozen=True)
class Listing:
    """The first clients in id order beside the server's counts of them all."""

    clients: list
    counts: pb.CountClientsResponse


CLIENT_ID = Param("id", "client id: ", "the client's id")
CLIENT_ID_OR_ALL = Param("id", "client id (empty = every client): ",
                         "one client's id; leave it out for every client", optional=True)
MESSAGE = Param("message", "message (hello/goodbye): ",
                "hello (connected) or goodbye (disconnected), any case")
COMMANDS = (
    Command("send", "send hello or goodbye for a client", "1", params=(CLIENT_ID, MESSAGE),
            one_shot=True),
    Command("status", "show one client, or every client when the id is empty", "2",
            params=(CLIENT_ID_OR_ALL,), one_shot=True),
    Command("exit", "leave (also quit, Ctrl-D)", "3", aliases=("quit",)),
    Command("watch", "watch every client live until Ctrl-C", "4", one_shot=True),
    Command("help", "show this menu (also ?)", aliases=("?",)),
)
MENU_WORDS = tuple(word for command in COMMANDS for word in command.words if word.isalpha())


# --- pure helpers: lookup, rendering, JSON --------------------------------------------


def find_command(word):
    """The command a menu number or word names, or None."""
    word = word.lower()
    return next((command for command in COMMANDS
                 if word == command.number or word in command.words), None)


def timestamp_seconds(timestamp):
    """Seconds since the epoch, or None when the field was never set."""
    if not timestamp.seconds and not timestamp.nanos:
        return None
    return timestamp.seconds + timestamp.nanos / 1e9


def relative_time(then, now):
    """How long before now `then` was, in words read at a glance; None is "—"."""
    if then is None:
        return "—"
    seconds = now - then
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def status_text(status):
    """A status word in its colour: connected green, disconnected dim red."""
    return Text(STATUS_WORDS.get(status, "unknown"), style=STATUS_STYLES.get(status, "yellow"))


def render_menu(address):
    """The menu: numbers and words, what each does, how to give arguments."""
    table = Table.grid(padding=(0, 2))
    for command in COMMANDS:
        table.add_row(Text(command.number, style="bold cyan"), Text(command.usage, style="bold"),
                      command.summary)
    return Group(Text(f"Presence client — server {address}", style="bold"), table,
                 Text("A word takes its arguments inline: send alice hello. Tab completes.",
                      style="dim"))


def render_clients(clients, now):
    """Client records as a table: id, coloured status, relative times, revision."""
    table = Table(box=box.ROUNDED, header_style="bold")
    for column in ("client", "status", "sessions", "changed", "last seen"):
        table.add_column(column)
    table.add_column("revision", justify="right")
    for client in clients:
        table.add_row(Text(client.client_id), status_text(client.status),
                      sessions_text(client.sessions),
                      relative_time(timestamp_seconds(client.changed_at), now),
                      relative_time(timestamp_seconds(client.last_seen), now),
                      str(client.revision) if client.revision else "—")
    return table


def sessions_text(sessions):
    """Live sessions by name ("default" for the unnamed one), "—" for none."""
    return ", ".join(session.session_id or "default" for session in sessions) or "—"


def render_watch(clients, revision, now, max_rows=MAX_ROWS):
    """The watched registry: the most recently changed clients first, then the counts."""
    recent = sorted(clients.values(), key=lambda client: client.revision, reverse=True)
    connected = sum(client.status == pb.STATUS_CONNECTED for client in clients.values())
    parts = [render_clients(recent[:max_rows], now) if recent else
             Text("no clients yet", style="dim")]
    if len(recent) > max_rows:
        parts.append(Text(f"showing the {max_rows:,} most recently changed of {len(recent):,}",
                          style="yellow"))
    parts.append(Text.assemble((f"{connected:,} connected", "green"), " · ",
                               (f"{len(clients) - connected:,} disconnected", "red"), " · ",
                               (f"revision {revision} · live, Ctrl-C to stop", "dim")))
    return Group(*parts)


def render_send(response, now):
    """The server's own words, the record after the message, and whether anything changed."""
    parts = [Text(response.info, style="bold")]
    if response.HasField("client"):
        parts.append(render_clients([response.client], now))
        if not response.changed:
            word = STATUS_WORDS.get(response.client.status, "unknown")
            parts.append(Text(f"no change: {response.client.client_id} was already {word}; "
                              "last seen refreshed", style="dim"))
    return Group(*parts)


def render_counts(counts):
    """One line of counts: connected, disconnected, total, revision."""
    return Text.assemble((f"{counts.connected:,} connected", "green"), " · ",
                         (f"{counts.disconnected:,} disconnected", "red"), " · ",
                         f"{counts.total:,} total", " · ", (f"revision {counts.revision}", "dim"))


def render_listing(listing, now, max_rows=MAX_ROWS):
    """At most max_rows clients, a note when the table is cut, then the counts."""
    shown = listing.clients[:max_rows]
    parts = [render_clients(shown, now) if shown else Text("no clients yet", style="dim")]
    if len(shown) < listing.counts.total:
        parts.append(Text(f"showing {len(shown):,} of {listing.counts.total:,} (CountClients)",
                          style="yellow"))
    parts.append(render_counts(listing.counts))
    return Group(*parts)


def render_toolbar(address, reachable, counts, user=None):
    """The bottom toolbar as prompt_toolkit formatted text."""
    state = {True: ("fg:ansigreen", "● reachable"), False: ("fg:ansired", "● unreachable"),
             None: ("fg:ansiyellow", "● connecting")}[reachable]
    online = f"{counts.connected:,} online of {counts.total:,}" if counts else "online: —"
    me = [("bold", f"  as {user}")] if user else []
    return [("", f" {address}  "), state, *me,
            ("", f"  {online}   Tab completes · Ctrl-D exits")]


def timestamp_json(timestamp):
    """RFC 3339 in UTC, or None when the field was never set."""
    return None if timestamp_seconds(timestamp) is None else timestamp.ToJsonString()


def client_json(client):
    """A client record as the stable JSON object documented in --help."""
    return {"client_id": client.client_id, "status": STATUS_WORDS.get(client.status, "unknown"),
            "changed_at": timestamp_json(client.changed_at),
            "last_seen": timestamp_json(client.last_seen), "revision": client.revision,
            "sessions": [{"session_id": session.session_id,
                          "expires_at": timestamp_json(session.expires_at)}
                         for session in client.sessions],
            "reason": client.reason}


def watch_json(message):
    """One JSON object per snapshot entry or change in a watch message, in order."""
    for client in message.snapshot:
        yield {"kind": "snapshot", "revision": message.revision, "resync": message.resync,
               "client": client_json(client)}
    for event in message.events:
        yield {"kind": EVENT_WORDS.get(event.kind, "unknown"), "revision": event.revision,
               "session_id": event.session_id, "reason": event.reason,
               "client": client_json(event.client)}


def send_json(response):
    return {"info": response.info, "changed": response.changed,
            "client": client_json(response.client) if response.HasField("client") else None}


def listing_json(listing):
    counts = listing.counts
    return {"clients": [client_json(client) for client in listing.clients],
            "connected": counts.connected, "disconnected": counts.disconnected,
            "total": counts.total, "revision": counts.revision}


def describe_error(error, address, timeout):
    """One line for a failed call and the exit code it deserves."""
    code, details = error.code(), error.details() or ""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return ("the server refused the call: it needs the right access token "
                "(--token, --token-file or PRESENCE_TOKEN)", EXIT_UNAUTHENTICATED)
    if code not in UNREACHABLE:
        return f"{details} ({code.name})", EXIT_SERVER_ERROR
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = f"no answer within {timeout:g} s"
    elif "refused" in details.lower():
        reason = "connection refused"
    else:
        reason = details.splitlines()[0] if details else "unavailable"
    return f"server {address} is unreachable: {reason}", EXIT_UNREACHABLE


# --- the gRPC side --------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """TLS toward the server: the CA to trust (none: the system's), a client certificate."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def credentials(self):
        def read(path):
            return Path(path).read_bytes() if path else None
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


class PresenceClient:
    """The service's calls with our deadline and token, over one channel that retries
    UNAVAILABLE itself; TLS when asked for."""

    def __init__(self, address, timeout=DEFAULT_TIMEOUT, credentials=None, token=""):
        self.address = address
        self.timeout = timeout
        self.channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
                        if credentials else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.ClientServiceStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.channel.close()

    def send(self, client_id, message, session_id="", lease=0, timeout=None):
        request = pb.MessageRequest(client_id=client_id, message=message, session_id=session_id,
                                    lease_seconds=lease)
        return self._stub.SendMessage(request, timeout=timeout or self.timeout,
                                      metadata=self._metadata)

    def watch(self, since_revision=0):
        """The Watch stream: no deadline, it runs until cancelled."""
        return self._stub.Watch(pb.WatchRequest(since_revision=since_revision),
                                metadata=self._metadata)

    def status(self, client_id):
        """One client's records; built from the old string map if the server sends no records."""
        response = self._stub.GetClientStatus(pb.ClientStatusRequest(client_id=client_id),
                                              timeout=self.timeout, metadata=self._metadata)
        return list(response.clients) or [
            pb.Client(client_id=name, status=WORD_STATUSES.get(word, pb.STATUS_UNSPECIFIED))
            for name, word in response.statuses.items()]

    def clients(self, limit=None, prefix="", timeout=None):
        """Clients in id order, page after page, up to limit; also whether that was all of them."""
        found, token = [], ""
        while True:
            request = pb.ListClientsRequest(page_size=PAGE_SIZE, page_token=token, id_prefix=prefix)
            page = self._stub.ListClients(request, timeout=timeout or self.timeout,
                                          metadata=self._metadata)
            found.extend(page.clients)
            token = page.next_page_token
            if not token or (limit is not None and len(found) >= limit):
                return found[:limit], not token and (limit is None or len(found) <= limit)

    def count(self, timeout=None):
        return self._stub.CountClients(pb.CountClientsRequest(), timeout=timeout or self.timeout,
                                       metadata=self._metadata)

    def listing(self, limit=None):
        """The first `limit` clients (all when None) and the counts of every client."""
        clients, _ = self.clients(limit)
        return Listing(clients, self.count())


class IdCache:
    """Client ids for completion, a page per prefix kept briefly; never raises, never waits long."""

    def __init__(self, client, ttl=IDS_TTL, clock=time.monotonic):
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._pages = {}  # prefix -> (fetched at, ids, whether that was every id with the prefix)

    def matching(self, prefix):
        now = self._clock()
        with self._lock:
            cached = self._cached(prefix, now)
        if cached is None:
            cached = self._fetch(prefix, now)
        return [client_id for client_id in cached if client_id.startswith(prefix)]

    def _cached(self, prefix, now):
        for known, (fetched, ids, complete) in self._pages.items():
            covers = known == prefix or complete and prefix.startswith(known)
            if covers and now - fetched < self._ttl:
                return ids
        return None

    def _fetch(self, prefix, now):
        try:
            clients, complete = self._client.clients(PAGE_SIZE, prefix, timeout=QUICK_TIMEOUT)
            ids = [client.client_id for client in clients]
        except grpc.RpcError as error:  # a failure is remembered too, so typing stays quick
            logger.debug("no ids for completion: %s", error.code().name)
            ids, complete = [], False
        with self._lock:
            self._pages = {known: page for known, page in self._pages.items()
                           if now - page[0] < self._ttl}
            self._pages[prefix] = (now, ids, complete)
        return ids


class ServerMonitor:
    """The toolbar's facts: reachability from the channel, the online count from daemon threads.

    One thread counts (CountClients); another follows the Watch stream from the counted
    revision and asks for a recount whenever changes arrive, so the count moves with them.
    """

    def __init__(self, client, interval=COUNT_INTERVAL, user=None):
        self._client = client
        self._interval = interval
        self._user = user
        self.reachable = None
        self.counts = None
        self._watch_call = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        client.channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._threads = [threading.Thread(target=loop, name=name, daemon=True) for loop, name in
                         ((self._count_loop, "toolbar-count"), (self._watch_loop, "toolbar-watch"))]
        for thread in self._threads:
            thread.start()

    def _on_connectivity(self, state):
        logger.debug("channel to %s is %s", self._client.address, state.name)
        if state is grpc.ChannelConnectivity.READY:
            self.reachable = True
        elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self.reachable = False

    def _count_loop(self):
        while not self._stopped.is_set():
            self._wake.clear()  # a refresh asked for during the count below is not lost
            try:
                self.counts = self._client.count(QUICK_TIMEOUT)
            except grpc.RpcError as error:
                logger.debug("toolbar count failed: %s", error.code().name)
                self.counts = None
            self._stopped.wait(MIN_COUNT_SPACING)
            self._wake.wait(self._interval)

    def _watch_loop(self):
        while not self._stopped.is_set():
            counts = self.counts
            try:
                self._watch_call = self._client.watch(counts.revision if counts else 0)
                for message in self._watch_call:
                    if message.events:
                        self.refresh()
            except grpc.RpcError as error:
                logger.debug("toolbar watch ended: %s", error.code().name)
            self._stopped.wait(self._interval)

    def refresh(self):
        """Count again now (after a command) instead of at the next interval."""
        self._wake.set()

    def close(self):
        """Stop counting and watching before the channel closes, so no call races the close."""
        self._stopped.set()
        self._wake.set()
        if self._watch_call is not None:
            self._watch_call.cancel()
        for thread in self._threads:
            thread.join(QUICK_TIMEOUT * 2)
        self._client.channel.unsubscribe(self._on_connectivity)

    def toolbar(self):
        return render_toolbar(self._client.address, self.reachable, self.counts, self._user)


class PresenceKeeper:
    """Keeps one user connected while the client runs: its own session, a lease renewed in the
    background, and a Goodbye for that session on the way out. Killed outright, the user goes
    offline when the lease runs out."""

    def __init__(self, client, user, lease=DEFAULT_LEASE):
        self._client = client
        self.user = user
        self.lease = lease
        self.session_id = f"{socket.gethostname()}:{os.getpid()}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="presence", daemon=True)

    def start(self):
        """Say hello now (so a bad name fails at once), then keep renewing."""
        self._hello()
        self._thread.start()
        return self

    def _hello(self):
        self._client.send(self.user, "hello", self.session_id, self.lease)

    def _renew_loop(self):
        while not self._stopped.wait(self.lease / 3):
            try:
                self._hello()
            except grpc.RpcError as error:  # the server may be back by the next renewal
                logger.info("could not renew %s's lease: %s", self.user, error.code().name)

    def close(self):
        """Stop renewing and end this session, briefly: an exit must not hang on a dead server."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._client.send(self.user, "goodbye", self.session_id, timeout=QUICK_TIMEOUT)
        except grpc.RpcError as error:
            logger.info("could not say goodbye for %s: %s", self.user, error.code().name)


# --- completion -----------------------------------------------------------------------


def _completions(candidates, word):
    for candidate in candidates:
        if candidate.startswith(word):
            yield Completion(candidate, start_position=-len(word))


class MenuCompleter(Completer):
    """A menu line: the first word from the menu, each argument from its param's source."""

    def __init__(self, sources):
        self._sources = sources  # param name -> function(prefix) -> candidates

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        words = text.split()
        if not text or text[-1].isspace():
            words.append("")  # the cursor starts a new word
        *done, word = words
        if not done:
            yield from _completions(MENU_WORDS, word)
            return
        command = find_command(done[0])
        if command is not None and len(done) <= len(command.params):
            source = self._sources[command.params[len(done) - 1].name]
            yield from _completions(source(word), word)


class AnswerCompleter(Completer):
    """A sub-prompt's whole answer from one source (ids or messages)."""

    def __init__(self, source):
        self._source = source

    def get_completions(self, document, complete_event):
        word = document.text_before_cursor
        yield from _completions(self._source(word), word)


# --- the dispatcher -------------------------------------------------------------------


class Dispatcher:
    """Runs commands for the REPL, piped input and one-shot use alike, like cmd.Cmd.onecmd.

    `read(prompt, kind)` asks for a missing argument (kind is a param name, or "command" for a
    menu line) and raises EOFError at the end of input; one-shot use passes none.
    """

    def __init__(self, client, out, err, *, json_output=False, read=None, clock=time.time):
        self.client = client
        self.out = out
        self.err = err
        self.json_output = json_output
        self.read = read
        self.clock = clock
        self.stopped = False

    def onecmd(self, line):
        """Run one menu line: a number or word, any arguments inline; missing ones are asked for.

        A number asks for every missing argument; a word only for the required ones, so
        `status` alone lists every client while `2` asks which.
        """
        try:
            words = shlex.split(line)
        except ValueError as error:
            return self.fail(f"cannot read that line: {error}", EXIT_USAGE)
        if not words:
            return EXIT_OK
        command = find_command(words[0])
        if command is None:
            return self.fail(f"unknown command {words[0]!r} — type help for the menu", EXIT_USAGE)
        args = words[1:]
        if len(args) > len(command.params):
            return self.fail(f"too many arguments — usage: {command.usage}", EXIT_USAGE)
        by_number = words[0] == command.number
        for param in command.params[len(args):]:
            asked = by_number or not param.optional
            args.append(self.read(param.prompt, param.name).strip() if asked else "")
        return self.run(command, args)

    def run(self, command, args):
        """Run a command with all its arguments; a failure is one line on stderr and a code."""
        try:
            answer = getattr(self, f"do_{command.name}")(*args)
        except grpc.RpcError as error:
            message, code = describe_error(error, self.client.address, self.client.timeout)
            if code == EXIT_UNREACHABLE and self.read:
                message += RETRY_HINT
            return self.fail(message, code)
        except Exception as error:  # one bad command must never end the session
            logger.debug("%s failed", command.name, exc_info=True)
            return self.fail(f"{command.name} failed: {error}", EXIT_SERVER_ERROR)
        if answer is not None:
            self.show(answer)
        return EXIT_OK

    def show(self, answer):
        if self.json_output and answer.data is not None:
            self.out.out(json.dumps(answer.data, ensure_ascii=False), highlight=False)
        else:
            self.out.print(answer.renderable)

    def fail(self, message, code):
        self.err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
        return code

    def do_send(self, client_id, message):
        response = self.client.send(client_id, message)
        return Answer(render_send(response, self.clock()), send_json(response))

    def do_status(self, client_id):
        if client_id:
            clients = self.client.status(client_id)
            return Answer(render_clients(clients, self.clock()),
                          {"client": client_json(clients[0])})
        listing = self.client.listing(None if self.json_output else MAX_ROWS)
        return Answer(render_listing(listing, self.clock()), listing_json(listing))

    def do_watch(self):
        """Follow the Watch stream until Ctrl-C or the server ends it."""
        call = self.client.watch()
        try:
            if self.json_output:
                self._print_watch_json(call)
            else:
                self._show_watch_live(call)
        except KeyboardInterrupt:
            pass
        finally:
            call.cancel()
        return Answer(Text("watch stopped", style="dim"))

    def _print_watch_json(self, call):
        for message in call:
            for change in watch_json(message):
                self.out.out(json.dumps(change, ensure_ascii=False), highlight=False)
            self.out.file.flush()

    def _show_watch_live(self, call):
        clients, revision = {}, 0
        with Live(render_watch(clients, revision, self.clock()), console=self.out,
                  refresh_per_second=WATCH_REFRESH, auto_refresh=False) as live:
            for message in call:
                if message.resync:
                    clients.clear()
                clients.update((client.client_id, client) for client in message.snapshot)
                clients.update((event.client.client_id, event.client) for event in message.events)
                revision = message.revision
                live.update(render_watch(clients, revision, self.clock()), refresh=True)

    def do_help(self):
        return Answer(render_menu(self.client.address))

    def do_exit(self):
        self.stopped = True


# --- reading lines: a terminal or a pipe ------------------------------------------------


def run_loop(dispatcher):
    """Show the menu, then run lines until exit or the end of input: Ctrl-C only clears a line."""
    dispatcher.onecmd("help")
    while not dispatcher.stopped:
        try:
            dispatcher.onecmd(dispatcher.read(PROMPT, "command"))
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
    return EXIT_OK


class PipeReader:
    """Plain prompts on a pipe, each answer echoed so the transcript reads like a session."""

    def __init__(self, stream, console):
        self._stream = stream
        self._console = console

    def __call__(self, prompt, kind):
        self._console.print(Text(prompt), end="")
        line = self._stream.readline()
        if not line:
            self._console.print()
            raise EOFError
        line = line.rstrip("\r\n")
        self._console.print(Text(line), soft_wrap=True)
        return line


class TerminalReader:
    """prompt_toolkit prompts: completion per kind, history, the toolbar with its monitor."""

    def __init__(self, client, history, *, user=None, input=None, output=None):
        self.monitor = ServerMonitor(client, user=user)
        ids = IdCache(client)
        sources = {"id": ids.matching, "message": lambda word: MESSAGES}
        self._completers = {"command": MenuCompleter(sources),
                            **{kind: AnswerCompleter(source) for kind, source in sources.items()}}
        self._session = PromptSession(history=history, bottom_toolbar=self.monitor.toolbar,
                                      complete_in_thread=True, complete_while_typing=False,
                                      refresh_interval=1.0,
                                      input=input, output=output)

    def __call__(self, prompt, kind):
        if kind == "command":
            self.monitor.refresh()
        return self._session.prompt(prompt, completer=self._completers[kind])

    def close(self):
        self.monitor.close()


def open_history(path):
    """The history file, or history in memory (with a warning) when it cannot be written."""
    path = Path(path).expanduser()
    try:
        path.touch()
    except OSError as error:
        logger.warning("history not saved: %s", error)
        return InMemoryHistory()
    return FileHistory(str(path))


# --- the command line -----------------------------------------------------------------


EPILOG = """\
examples:
  python client.py                                    the menu, with completion and history
  python client.py --server db1:50051 status          every client, as a table
  python client.py send alice hello                   mark alice connected
  python client.py --json status alice                one client as JSON
  python client.py --json watch                       every change as it happens, a line each
  python client.py --as alice                         the menu, alice connected while it runs
  printf '1\\nalice\\nhello\\n2\\nalice\\n3\\n' | python client.py   script the menu

the menu (a terminal or piped input): 1/send, 2/status, 3/exit (or quit), 4/watch,
help (or ?). watch shows a live table until Ctrl-C.
A word takes its arguments inline: send alice hello, status alice, status (every client).

--json prints one object per answer, on one line:
  send ID MESSAGE  {"info": str, "changed": bool, "client": CLIENT}
  status ID        {"client": CLIENT}
  status           {"clients": [CLIENT, ...], "connected": int, "disconnected": int,
                    "total": int, "revision": int}
  CLIENT           {"client_id": str, "status": "connected" | "disconnected" | "unknown",
                    "changed_at": RFC 3339 UTC or null, "last_seen": RFC 3339 UTC or null,
                    "revision": int, "sessions": [{"session_id": str,
                    "expires_at": RFC 3339 UTC or null}, ...], "reason": str}
  watch            one object per line, flushed, until Ctrl-C: first the snapshot,
                   {"kind": "snapshot", "revision": int, "resync": bool, "client": CLIENT}
                   for each client, then each change as it happens,
                   {"kind": "connected" | "disconnected" | "session_started" |
                    "session_ended", "revision": int, "session_id": str, "reason": str,
                    "client": CLIENT}

exit codes: 0 ok; 1 the server answered with an error (NOT_FOUND, INVALID_ARGUMENT, ...);
2 usage error; 3 server unreachable (UNAVAILABLE, or no answer within --timeout);
4 the server wants an access token (UNAUTHENTICATED).
Errors are one line on stderr, e.g. "error: Client zed not found (NOT_FOUND)".

environment: PRESENCE_SERVER, PRESENCE_TIMEOUT, PRESENCE_HISTORY, PRESENCE_AS and
PRESENCE_LEASE stand in for --server, --timeout, --history, --as and --lease; a flag on
the command line wins.
"""


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _whole_seconds(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, 1 or more, "
                                         f"got {text!r}")
    return int(text)


def build_parser():
    """Options first, then an optional one-shot command built from COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="client.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Client for the presence service: a menu REPL in a terminal, the same\n"
                    "menu over piped input, or one command and exit.")
    parser.add_argument("--server", metavar="HOST:PORT",
                        default=os.environ.get("PRESENCE_SERVER", DEFAULT_SERVER),
                        help="the server to talk to (default: %(default)s) [PRESENCE_SERVER]")
    parser.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                        default=os.environ.get("PRESENCE_TIMEOUT", DEFAULT_TIMEOUT),
                        help="deadline of each call, retries included (default: %(default)s) "
                             "[PRESENCE_TIMEOUT]")
    parser.add_argument("--json", action="store_true",
                        help="print answers as JSON, shapes below")
    parser.add_argument("--history", metavar="FILE",
                        default=os.environ.get("PRESENCE_HISTORY", DEFAULT_HISTORY),
                        help="the REPL's history file (default: %(default)s) [PRESENCE_HISTORY]")
    parser.add_argument("--tls", action="store_true",
                        default=os.environ.get("PRESENCE_TLS", "") not in ("", "0", "false"),
                        help="talk TLS, trusting the system's certificate authorities "
                             "[PRESENCE_TLS=1]")
    parser.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("PRESENCE_TLS_CA", ""),
                        help="talk TLS, trusting this CA (PEM) for the server's certificate "
                             "[PRESENCE_TLS_CA]")
    parser.add_argument("--tls-cert", metavar="FILE",
                        default=os.environ.get("PRESENCE_CLIENT_CERT", ""),
                        help="this client's certificate (PEM), for servers that require one "
                             "[PRESENCE_CLIENT_CERT]")
    parser.add_argument("--tls-key", metavar="FILE",
                        default=os.environ.get("PRESENCE_CLIENT_KEY", ""),
                        help="the private key of --tls-cert [PRESENCE_CLIENT_KEY]")
    parser.add_argument("--token", default=os.environ.get("PRESENCE_TOKEN", ""),
                        help="the access token the server wants [PRESENCE_TOKEN]")
    parser.add_argument("--token-file", metavar="FILE",
                        default=os.environ.get("PRESENCE_TOKEN_FILE", ""),
                        help="read the access token from this file [PRESENCE_TOKEN_FILE]")
    parser.add_argument("--as", dest="user", metavar="NAME",
                        default=os.environ.get("PRESENCE_AS") or None,
                        help="keep NAME connected while the menu runs: its own session with a "
                             "lease, renewed in the background, ended on exit [PRESENCE_AS]")
    parser.add_argument("--lease", metavar="SECONDS", type=_whole_seconds,
                        default=os.environ.get("PRESENCE_LEASE", DEFAULT_LEASE),
                        help="the lease --as asks for: killed outright, NAME shows connected for "
                             "at most this long (default: %(default)s) [PRESENCE_LEASE]")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="diagnostics on stderr (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="one-shot commands (without one, the menu opens)")
    for command in COMMANDS:
        if command.one_shot:
            sub = commands.add_parser(command.name, help=command.summary,
                                      description=command.summary)
            for param in command.params:
                extra = {"nargs": "?", "default": ""} if param.optional else {}
                sub.add_argument(param.name, metavar=param.name.upper(), help=param.help, **extra)
    return parser


def run_terminal(client, out, err, args):
    """The REPL in a terminal; the toolbar's threads stop before the channel closes."""
    reader = TerminalReader(client, open_history(args.history), user=args.user)
    try:
        return run_loop(Dispatcher(client, out, err, json_output=args.json, read=reader))
    finally:
        reader.close()


def _leave(signum, frame):
    """End the menu as exit does, so --as says goodbye before the process goes."""
    raise SystemExit(EXIT_OK)


def run_menu(client, out, err, args):
    """The menu in a terminal or over piped input, as args.user while it runs if asked."""
    keeper = args.user and PresenceKeeper(client, args.user, args.lease)
    if keeper:
        for signum in (signal.SIGHUP, signal.SIGTERM):  # a closed terminal, a polite kill
            signal.signal(signum, _leave)
    try:
        if keeper:
            keeper.start()
        if sys.stdin.isatty() and sys.stdout.isatty():
            return run_terminal(client, out, err, args)
        reader = PipeReader(sys.stdin, out)
        return run_loop(Dispatcher(client, out, err, json_output=args.json, read=reader))
    except grpc.RpcError as error:  # only keeper.start() lets one out
        message, code = describe_error(error, client.address, client.timeout)
        err.print(Text(f"error: cannot connect as {args.user}: {message}", style="red"),
                  soft_wrap=True)
        return code
    finally:
        if keeper:
            keeper.close()


def connection_security(args, parser):
    """TLS credentials (or None) and the token the flags ask for; a bad one is a usage error."""
    if args.token and args.token_file:
        parser.error("give the token by --token or by --token-file, not both")
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else args.token
        credentials = None
        if args.tls or args.tls_ca or args.tls_cert:
            credentials = Tls(args.tls_ca, args.tls_cert, args.tls_key).credentials()
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return credentials, token


def main(argv=None):
    """Run a one-shot command, the menu over piped input, or the REPL; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.user and args.command:
            parser.error("--as keeps NAME connected while the menu runs; "
                         "it does not go with a one-shot command")
        credentials, token = connection_security(args, parser)
    except SystemExit as exit:  # argparse has printed the usage and why
        return exit.code
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    with PresenceClient(args.server, args.timeout, credentials, token) as client:
        try:
            if args.command:
                command = find_command(args.command)
                dispatcher = Dispatcher(client, out, err, json_output=args.json)
                return dispatcher.run(command, [getattr(args, p.name) for p in command.params])
            return run_menu(client, out, err, args)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `watch | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
