"""Presence client: a menu REPL, piped scripts and one-shot commands for the presence service."""

__version__ = "1.1.0"

import argparse
import bisect
import codecs
import json
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# gRPC's C core prints its own log lines (a failed TLS handshake, say) to stderr, read
# when grpc is imported; the client says what went wrong in one line of its own instead.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich import box
from rich.cells import cell_len, get_character_cell_size
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
DEFAULT_CONFIG = "~/.config/presence/config.toml"
DEFAULT_PAGER = "less -R"
PAGE_SIZE = 1000  # the server's largest page
PAGE_ROWS = 200  # clients per page of a table; `more` shows the next, --json gets every client
QUICK_TIMEOUT = 1.0  # completion and toolbar calls must never keep the user waiting
IDS_TTL = 5.0  # seconds a page of ids for completion stays fresh without the watch stream
COUNT_INTERVAL = 3.0  # seconds between toolbar refreshes of the online count
HEALTH_INTERVAL = 1.0  # seconds between the toolbar's health checks of each replica
DEFAULT_LEASE = 15  # seconds; --as renews at a third of it, so a crash shows within this
WATCH_REFRESH = 2  # live table redraws per second: relative times tick, changes show at once
RESUME_BACKOFF = (0.2, 2.0)  # seconds between attempts to resume a watch, first and longest
MIN_COUNT_SPACING = 0.2  # the toolbar recounts at most this often when the stream is busy
TABLE_WIDTH = 120  # the width renderers assume when not given the console's
MIN_ID_WIDTH = 10  # a cut id keeps at least this many cells
ENOUGH_ID_WIDTH = 32  # past this many cells an id is cut (uniquely) before more columns go
SESSIONS_WIDTH = 24  # the sessions column is cut past this; `status ID` shows them all
PROMPT = "presence> "
MESSAGES = ("hello", "goodbye")
STATES = {"": pb.STATUS_UNSPECIFIED, "all": pb.STATUS_UNSPECIFIED,
          "online": pb.STATUS_CONNECTED, "connected": pb.STATUS_CONNECTED,
          "offline": pb.STATUS_DISCONNECTED, "disconnected": pb.STATUS_DISCONNECTED}
RETRY_HINT = " — retrying on the next command"
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
STATUS_WORDS = {pb.STATUS_CONNECTED: "connected", pb.STATUS_DISCONNECTED: "disconnected"}
SHORT_STATUS_WORDS = {pb.STATUS_CONNECTED: "on", pb.STATUS_DISCONNECTED: "off"}
WORD_STATUSES = {word: status for status, word in STATUS_WORDS.items()}
STATUS_STYLES = {pb.STATUS_CONNECTED: "bold green", pb.STATUS_DISCONNECTED: "dim red"}
SESSION_KINDS = {pb.SESSION_KIND_MESSAGE: "message", pb.SESSION_KIND_ATTACHED: "attached"}
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
# An Attach stream pings its server while it is open (our servers allow one a second), so a
# server whose machine or network vanished is noticed within 30 s and the user re-attached.
ATTACH_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


# --- the menu as data -----------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One argument of a command; its name also picks the completion source and prompt history."""

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
class Query:
    """Which clients a listing wants: a status (unspecified: any) and an id prefix."""

    status: int = pb.STATUS_UNSPECIFIED
    prefix: str = ""

    @property
    def filtered(self):
        """Whether the query leaves some clients out, so an empty answer says so."""
        return bool(self.status or self.prefix)


@dataclass(frozen=True)
class Page:
    """A run of clients in id order: where it starts (from 1), how many match, if more follow."""

    clients: list
    first: int
    matching: int | None  # None: not known without listing them all (an id prefix)
    more: bool
    counts: pb.CountClientsResponse
    query: Query = Query()


class UsageError(Exception):
    """A command given the wrong arguments: one line and the usage exit code."""


class Cancelled(Exception):
    """The user gave up on a command at one of its argument prompts (Ctrl-D)."""


CLIENT_ID = Param("id", "client id: ", "the client's id")
CLIENT_ID_OR_ALL = Param("id", "client id (empty = every client, PREFIX* = ids starting so): ",
                         "one client's id; PREFIX* for the ids that start with PREFIX; "
                         "leave it out for every client", optional=True)
MESSAGE = Param("message", "message (hello/goodbye): ",
                "hello (connected) or goodbye (disconnected), any case")
STATE = Param("state", "online, offline or all (empty = all): ",
              "online, offline or all (the default)", optional=True)
PREFIX = Param("prefix", "id prefix (empty = every id): ", "only ids that start with this",
               optional=True)
COMMANDS = (
    Command("send", "send hello or goodbye for a client", "1", params=(CLIENT_ID, MESSAGE),
            one_shot=True),
    Command("status", "show one client, or every client when the id is empty", "2",
            params=(CLIENT_ID_OR_ALL,), one_shot=True),
    Command("exit", "leave (also quit, Ctrl-D)", "3", aliases=("quit",)),
    Command("watch", "watch every client live until Ctrl-C", "4", one_shot=True),
    Command("list", "list clients by status and id prefix, a page at a time", "5",
            params=(STATE, PREFIX), one_shot=True),
    Command("more", "the next page of the last list or status"),
    Command("help", "show this menu (also ?)", aliases=("?",)),
)
MENU_WORDS = tuple(word for command in COMMANDS for word in command.words if word.isalpha())


# --- pure helpers: lookup, rendering, JSON --------------------------------------------


# A word of a menu line: "quoted", 'quoted', or bare (which starts with no quote), then white
# space or the end of the line.
LINE_WORD = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^\s"']\S*))(?=\s|$)""")


def split_line(line):
    """A menu line's words, split at white space. A word that starts with a quote runs to the
    same quote before white space or the end ("bob smith"); a quote inside a word is just a
    character, so o'brien needs no quoting."""
    words, position, line = [], 0, line.strip()
    while position < len(line):
        match = LINE_WORD.match(line, position)
        if match is None:
            column = len(line) - len(line[position:].lstrip()) + 1
            raise ValueError(f"the quote at column {column} is not closed before a space or "
                             "the end of the line")
        words.append(next(word for word in match.groups() if word is not None))
        position = match.end()
    return words


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


def relative_time(then, now, short=False):
    """How long before now `then` was, read at a glance ("2m" when short); None is "—"."""
    if then is None:
        return "—"
    seconds = now - then
    if seconds < 5:
        return "now" if short else "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            amount = int(seconds // size)
            return f"{amount}{unit[0]}" if short else f"{amount} {unit} ago"


def status_text(status, short=False):
    """A status word in its colour: connected green, disconnected dim red; on/off when short."""
    words = SHORT_STATUS_WORDS if short else STATUS_WORDS
    return Text(words.get(status, "?" if short else "unknown"),
                style=STATUS_STYLES.get(status, "yellow"))


def sessions_text(sessions):
    """Live sessions by name ("default" for the unnamed one), an attached one marked so, "—"
    for none."""
    return ", ".join((session.session_id or "default")
                     + (" (attached)" if session.kind == pb.SESSION_KIND_ATTACHED else "")
                     for session in sessions) or "—"


def render_menu(address):
    """The menu: numbers and words, what each does, how to give arguments."""
    table = Table.grid(padding=(0, 2))
    for command in COMMANDS:
        table.add_row(Text(command.number, style="bold cyan"), Text(command.usage, style="bold"),
                      command.summary)
    return Group(Text(f"Presence client — server {address}", style="bold"), table,
                 Text("A word takes its arguments inline: send alice hello, status al*, "
                      "list online al. Tab completes.", style="dim"))


# --- tables that fit the terminal ------------------------------------------------------

COLUMNS = ("client", "status", "sessions", "changed", "last seen", "revision")
# How a table gives way to a narrow terminal, in this order: each step drops or shortens one
# thing, the least useful first; the id and the status stay, whole or uniquely cut.
NARROWING = ("sessions", "borders", "short times", "changed", "short status", "revision")
SHORT_HEADERS = {"last seen": "seen", "revision": "rev"}


def fit_start(text, cells):
    """The longest start of text that fits in cells."""
    used = 0
    for index, character in enumerate(text):
        used += get_character_cell_size(character)
        if used > cells:
            return text[:index]
    return text


def fit_end(text, cells):
    """The longest end of text that fits in cells."""
    return fit_start(text[::-1], cells)[::-1]


def shared_start(first, second):
    """How many leading characters two strings share."""
    return next((index for index, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
                min(len(first), len(second)))


def cut_id(client_id, differs_at, width):
    """client_id in width cells: its start and the character that tells it from its
    neighbours (at index differs_at) kept, "…" where characters were left out."""
    if cell_len(client_id[:differs_at + 1]) <= width - 1:
        return fit_start(client_id, width - 1) + "…"
    end = min(len(client_id), differs_at + 3)  # the differing character and a little after
    tail = "…" if end < len(client_id) else ""
    start = fit_start(client_id, max(1, (width - 2) // 3))
    return start + "…" + fit_end(client_id[:end], width - cell_len(start) - 1 - len(tail)) + tail


def abbreviate(ids, width):
    """Each id as shown in a column width cells wide: whole when it fits, else cut around what
    tells it from the others; an id whose cut would still look like another's stays whole."""
    ordered = sorted(set(ids))
    shown = {}
    for index, client_id in enumerate(ordered):
        if cell_len(client_id) <= width:
            shown[client_id] = client_id
            continue
        neighbours = ordered[max(0, index - 1):index] + ordered[index + 1:index + 2]
        differs_at = max((shared_start(client_id, other) for other in neighbours), default=0)
        shown[client_id] = cut_id(client_id, differs_at, width)
    uses = Counter(shown.values())
    return {client_id: text if uses[text] == 1 else client_id for client_id, text in shown.items()}


def row_cells(client, now, steps):
    """A client's cells other than its id, as the narrowing steps taken leave them."""
    short = "short times" in steps
    cells = {"status": status_text(client.status, short="short status" in steps),
             "sessions": Text(sessions_text(client.sessions), overflow="ellipsis"),
             "changed": relative_time(timestamp_seconds(client.changed_at), now, short),
             "last seen": relative_time(timestamp_seconds(client.last_seen), now, short),
             "revision": str(client.revision) if client.revision else "—"}
    return {name: cells[name] for name in COLUMNS[1:] if name not in steps}


def header(name, steps):
    """A column's header, shortened with the times so the header is no wider than its cells."""
    return SHORT_HEADERS.get(name, name) if "short times" in steps else name


def table_width(cells, steps, id_width):
    """Cells wide a table is with an id column id_width wide (rich's own arithmetic)."""
    widths = [id_width] + [
        min(SESSIONS_WIDTH, max([cell_len(header(name, steps))] +
                                [cell_len(str(row[name])) for row in cells]))
        for name in COLUMNS[1:] if name not in steps]
    gaps = 3 * (len(widths) - 1)
    return sum(widths) + gaps + (0 if "borders" in steps else 4)


def table_shape(clients, now, width):
    """The fewest narrowing steps after which the ids get enough room, and the id column's width."""
    natural = max([cell_len(client.client_id) for client in clients] + [len("client")])
    for taken in range(len(NARROWING) + 1):
        steps = frozenset(NARROWING[:taken])
        cells = [row_cells(client, now, steps) for client in clients]
        room = width - table_width(cells, steps, 0)
        if room >= min(natural, ENOUGH_ID_WIDTH):
            break
    return steps, max(MIN_ID_WIDTH, min(natural, room))


def render_clients(clients, now, width=TABLE_WIDTH):
    """Client records as a table one line per client, fitted to width: id, coloured status,
    sessions, relative times, revision; columns drop and shorten (NARROWING) when narrow."""
    steps, id_width = table_shape(clients, now, width)
    shown = abbreviate([client.client_id for client in clients], id_width)
    table = (Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
             if "borders" in steps else Table(box=box.ROUNDED, header_style="bold"))
    table.add_column("client", no_wrap=True)
    for name in COLUMNS[1:]:
        if name not in steps:
            table.add_column(header(name, steps), no_wrap=True, max_width=SESSIONS_WIDTH,
                             justify="right" if name == "revision" else "left")
    for client in clients:
        table.add_row(Text(shown[client.client_id]), *row_cells(client, now, steps).values())
    return table


def render_client(client, now, width=TABLE_WIDTH):
    """One client: its table row when its id fits the width whole, else a card in which the id
    wraps, so that it can always be read in full."""
    steps, id_width = table_shape([client], now, width)
    if cell_len(client.client_id) <= id_width:
        return render_clients([client], now, width)
    card = Table.grid(padding=(0, 1))
    card.add_column(style="bold", no_wrap=True)
    card.add_column(overflow="fold")
    card.add_row("client", Text(client.client_id, overflow="fold"))
    card.add_row("status", status_text(client.status))
    card.add_row("sessions", sessions_text(client.sessions))
    for name, stamp in (("changed", client.changed_at), ("last seen", client.last_seen)):
        card.add_row(name, relative_time(timestamp_seconds(stamp), now))
    card.add_row("revision", str(client.revision) if client.revision else "—")
    return card


def render_watch(clients, revision, now, width=TABLE_WIDTH, height=None, note=None,
                 toolbar=None):
    """The watched registry within width x height: the most recently changed clients first, as
    many as fit above the notice of how many are shown, the counts, a note and the toolbar."""
    recent = sorted(clients.values(), key=lambda client: client.revision, reverse=True)
    connected = sum(client.status == pb.STATUS_CONNECTED for client in clients.values())
    below = [line for line in (note, toolbar) if line is not None]
    # Four lines of table borders and header, the notice, the counts, the cursor's line.
    rows = len(recent) if height is None else max(1, height - 7 - len(below))
    parts = [render_clients(recent[:rows], now, width) if recent else
             Text("no clients yet", style="dim")]
    if len(recent) > rows:
        parts.append(Text(f"showing the {rows:,} most recently changed of {len(recent):,}",
                          style="yellow", no_wrap=True, overflow="ellipsis"))
    parts.append(Text.assemble((f"{connected:,} connected", "green"), " · ",
                               (f"{len(clients) - connected:,} disconnected", "red"), " · ",
                               (f"revision {revision} · live, Ctrl-C to stop", "dim"),
                               no_wrap=True, overflow="ellipsis"))
    return Group(*parts, *below)


def render_send(response, now, width=TABLE_WIDTH):
    """What the message did, then the record after it: the server's own words for a change;
    for a repeated hello or goodbye, that nothing changed (the server's words would say
    "marked as" again)."""
    if not response.HasField("client"):
        return Text(response.info, style="bold")
    headline = response.info
    if not response.changed:
        word = STATUS_WORDS.get(response.client.status, "unknown")
        headline = f"no change: {response.client.client_id} was already {word}; last seen refreshed"
    return Group(Text(headline, style="bold"), render_client(response.client, now, width))


def render_counts(counts):
    """One line of counts: connected, disconnected, total, revision."""
    return Text.assemble((f"{counts.connected:,} connected", "green"), " · ",
                         (f"{counts.disconnected:,} disconnected", "red"), " · ",
                         f"{counts.total:,} total", " · ", (f"revision {counts.revision}", "dim"))


def page_notice(page, hint):
    """Which clients a page shows of how many match ("showing 201–400 of 3,010"), then hint
    when more follow; None when the page is the whole list."""
    if page.first == 1 and not page.more:
        return None
    last = page.first + len(page.clients) - 1
    text = f"showing {page.first:,}–{last:,}"
    if page.matching is not None:
        text += f" of {page.matching:,}"
    return text + (hint if page.more else "")


def render_page(page, now, width=TABLE_WIDTH, hint=""):
    """A page of clients, a notice of where it stands when it is not the whole list, the counts."""
    empty = "no clients match" if page.query.filtered else "no clients yet"
    parts = [render_clients(page.clients, now, width) if page.clients else
             Text(empty, style="dim")]
    notice = page_notice(page, hint)
    if notice:
        parts.append(Text(notice, style="yellow"))
    parts.append(render_counts(page.counts))
    return Group(*parts)


def reach_words(reachable):
    """How reachable the server is, long and short, and its colour: reachable is True, False or
    None (not known yet) for one server, (up, of) for several replicas."""
    if isinstance(reachable, tuple):
        up, of = reachable
        colour = "fg:ansigreen" if up == of else "fg:ansired" if not up else "fg:ansiyellow"
        return f"● {up} of {of} replicas reachable", f"● {up}/{of} up", colour
    return ({True: "● reachable", False: "● unreachable", None: "● connecting"}[reachable],
            {True: "● up", False: "● down", None: "● …"}[reachable],
            {True: "fg:ansigreen", False: "fg:ansired", None: "fg:ansiyellow"}[reachable])


def toolbar_forms(address, reachable, counts, user, held=""):
    """The toolbar from its longest form to its shortest, as prompt_toolkit fragments; held
    says how --as keeps the user online ("attached", "lease", ...)."""
    long_state, short_state, colour = reach_words(reachable)
    long_online = f"{counts.connected:,} online of {counts.total:,}" if counts else "online: —"
    short_online = f"{counts.connected:,}/{counts.total:,} online" if counts else "—"
    me = [("bold", f"  as {user}")] if user else []
    how = [("", f" ({held})")] if user and held else []
    hints = [("", "   Tab completes · Ctrl-D exits")]
    where = ("", f" {address}  ")
    yield [where, (colour, long_state), *me, *how, ("", f"  {long_online}"), *hints]
    yield [where, (colour, long_state), *me, *how, ("", f"  {long_online}")]
    yield [where, (colour, short_state), *me, *how, ("", f"  {short_online}")]
    yield [where, (colour, short_state), *me, ("", f"  {short_online}")]
    yield [where, (colour, short_state), ("", f"  {short_online}")]


def render_toolbar(address, reachable, counts, user=None, width=None, held=""):
    """The bottom toolbar: the longest form that fits width (hints go first, then words, then
    the user); at the last, the address is cut from its start, so the port stays."""
    for form in toolbar_forms(address, reachable, counts, user, held):
        if width is None or sum(cell_len(text) for _, text in form) <= width:
            return form
    rest = sum(cell_len(text) for _, text in form[1:])
    if width - rest - 4 < len(address.rpartition(":")[2]) + 1:
        return [("", " "), *form[1:]]
    return [("", " …" + fit_end(address, width - rest - 4) + "  "), *form[1:]]


def toolbar_text(fragments):
    """The toolbar's fragments as a rich line, for views drawn while no prompt is shown."""
    styles = {"fg:ansigreen": "green", "fg:ansired": "red", "fg:ansiyellow": "yellow"}
    return Text.assemble(*((text, styles.get(style, style)) for style, text in fragments),
                         style="reverse", no_wrap=True, overflow="crop")


def timestamp_json(timestamp):
    """RFC 3339 in UTC, or None when the field was never set."""
    return None if timestamp_seconds(timestamp) is None else timestamp.ToJsonString()


def client_json(client):
    """A client record as the stable JSON object documented in --help."""
    return {"client_id": client.client_id, "status": STATUS_WORDS.get(client.status, "unknown"),
            "changed_at": timestamp_json(client.changed_at),
            "last_seen": timestamp_json(client.last_seen), "revision": client.revision,
            "sessions": [{"session_id": session.session_id,
                          "expires_at": timestamp_json(session.expires_at),
                          "kind": SESSION_KINDS.get(session.kind, "message")}
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


def listing_json(clients, counts, query=None):
    """Every client listed and the registry's counts; a filtered list also says its filter."""
    answer = {"clients": [client_json(client) for client in clients]}
    if query is not None:
        answer.update(status=STATUS_WORDS.get(query.status), prefix=query.prefix)
    answer.update(connected=counts.connected, disconnected=counts.disconnected,
                  total=counts.total, revision=counts.revision)
    return answer


def write_json_line(console, data):
    """One JSON line, flushed at once so a reader of a pipe sees each answer as it comes."""
    console.file.write(json.dumps(data, ensure_ascii=False) + "\n")
    console.file.flush()


def help_json():
    """The menu as data, so a --json script asking for help still reads only JSON."""
    return {"commands": [{"number": command.number, "usage": command.usage,
                          "summary": command.summary} for command in COMMANDS]}


# Why a server cannot be reached: the words of gRPC's details that tell it, whether the client
# talks TLS (None: either way), and the likely cause with the flag that fixes it.
UNREACHABLE_CAUSES = (
    (("wrong_version_number",), True,
     "it does not speak TLS; drop --tls and --tls-ca (or start the server with --tls-cert "
     "and --tls-key)"),
    (("certificate_verify_failed",), True,
     "its TLS certificate is not signed by a CA this client trusts; name that CA with "
     "--tls-ca FILE"),
    (("hostname verification",), True,
     "its TLS certificate is not for this host name; give --server a name the certificate "
     "lists"),
    (("socket closed",), False,
     "it closed the connection, as a TLS server does to a plaintext client; add --tls-ca "
     "FILE (or --tls to trust the system's CAs)"),
    (("socket closed",), True,
     "it closed the connection during the TLS handshake, as a server that requires a client "
     "certificate does; give one with --tls-cert FILE and --tls-key FILE"),
    (("domain name not found", "misformatted domain name", "hostname lookup error"), None,
     "the name {host} does not resolve; check the host in --server HOST:PORT"),
    (("refused",), None, "connection refused"),
)


def unreachable_reason(details, host, tls):
    """Why the server could not be reached, in words, from the details of UNAVAILABLE."""
    lowered = details.lower()
    for words, needs_tls, reason in UNREACHABLE_CAUSES:
        if any(word in lowered for word in words) and needs_tls in (None, tls):
            return reason.format(host=host)
    return details.splitlines()[0] if details else "unavailable"


def describe_error(error, client):
    """One line for a failed call and the exit code it deserves."""
    code, details = error.code(), error.details() or ""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return ("the server refused the call: it needs the right access token "
                "(--token, --token-file or PRESENCE_TOKEN)", EXIT_UNAUTHENTICATED)
    if code not in UNREACHABLE:
        return f"{details} ({code.name})", EXIT_SERVER_ERROR
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = f"no answer within {client.timeout:g} s"
    else:
        host = client.failed_at.rpartition(":")[0].strip("[]") or client.failed_at
        reason = unreachable_reason(details, host, client.tls)
    who = f"servers {client.address} are" if client.several else f"server {client.address} is"
    return f"{who} unreachable: {reason}", EXIT_UNREACHABLE


def stream_end_reason(error):
    """Why the server ended a watch stream, in words, from the status it ended it with."""
    details = (error.details() or "").splitlines()[0] if error.details() else ""
    if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the server cut the stream off: {details or 'too far behind'}"
    if error.code() is grpc.StatusCode.UNAVAILABLE:
        return f"the server went away ({details or 'unavailable'})"
    return f"the stream failed: {details} ({error.code().name})"


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


def open_channel(address, credentials, options):
    """A channel to address, TLS when credentials are given."""
    if credentials:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


class Replica:
    """One server address: its own channel (TLS checks this host's name), its stubs, and whether
    the channel is connected now, for a client that knows several replicas. The Attach stream
    gets a channel of its own that pings the server, so a server that vanished without a word
    is noticed and the user attached elsewhere; older servers, which may take pings amiss,
    never see one on the others."""

    def __init__(self, address, credentials=None, watched=False):
        self.address = address
        self._credentials = credentials
        self.channel = open_channel(address, credentials, CHANNEL_OPTIONS)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._attach_channel = None
        self.connected = False
        if watched:
            self.channel.subscribe(self._on_connectivity, try_to_connect=True)

    @property
    def attach_stub(self):
        """A stub on the pinging channel, opened when first wanted."""
        if self._attach_channel is None:
            self._attach_channel = open_channel(self.address, self._credentials,
                                                CHANNEL_OPTIONS + ATTACH_KEEPALIVE)
        return pb_grpc.ClientServiceStub(self._attach_channel)

    def _on_connectivity(self, state):
        """Note whether the channel is connected, so calls go to a replica that is up."""
        logger.debug("channel to replica %s is %s", self.address, state.name)
        self.connected = state is grpc.ChannelConnectivity.READY

    def close(self):
        """Stop watching the channel's state, then close it (and the Attach channel)."""
        self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()
        if self._attach_channel is not None:
            self._attach_channel.close()


class PresenceClient:
    """The service's calls with our deadline and token, over a channel per server address that
    retries UNAVAILABLE itself; TLS when asked for. Given several replicas (a:1,b:2), each call
    goes to the next connected one in turn (round robin), and one that answers UNAVAILABLE
    (a replica that died) is tried on the next within the same deadline."""

    def __init__(self, address, timeout=DEFAULT_TIMEOUT, credentials=None, token=""):
        self.address = address
        self.timeout = timeout
        self.tls = credentials is not None
        addresses = address.split(",")
        self.several = len(addresses) > 1
        self.replicas = [Replica(each, credentials, watched=self.several) for each in addresses]
        self.failed_at = addresses[0]  # the replica of the last UNAVAILABLE, for its host name
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._turn = 0
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Close every replica's channel."""
        for replica in self.replicas:
            replica.close()

    def in_turn(self):
        """Every replica, starting one further along at each call, the connected ones first."""
        with self._lock:
            self._turn = (self._turn + 1) % len(self.replicas)
            turn = self.replicas[self._turn:] + self.replicas[:self._turn]
        return sorted(turn, key=lambda replica: not replica.connected)

    def _call(self, method, request, timeout=None):
        """A unary call on the next replica; UNAVAILABLE from one goes on to the next, all
        within one deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        replicas = self.in_turn()
        for replica in replicas:
            try:
                return getattr(replica.stub, method)(
                    request, timeout=max(deadline - time.monotonic(), 0.01),
                    metadata=self._metadata)
            except grpc.RpcError as error:
                self.failed_at = replica.address
                if error.code() is not grpc.StatusCode.UNAVAILABLE or replica is replicas[-1]:
                    raise
                logger.info("replica %s is unavailable; trying the next", replica.address)

    def send(self, client_id, message, session_id="", lease=0, timeout=None):
        request = pb.MessageRequest(client_id=client_id, message=message, session_id=session_id,
                                    lease_seconds=lease)
        return self._call("SendMessage", request, timeout)

    def attach(self, client_id, session_id, avoid="", wait_for_ready=False):
        """An Attach stream on the next replica (one other than avoid, a replica that said it
        is stopping, when there is one), and that replica's address."""
        replicas = self.in_turn()
        replica = next((each for each in replicas if each.address != avoid), replicas[0])
        call = replica.attach_stub.Attach(
            pb.AttachRequest(client_id=client_id, session_id=session_id),
            metadata=self._metadata, wait_for_ready=wait_for_ready)
        return call, replica.address

    def watch(self, since_revision=0, wait_for_ready=False):
        """The Watch stream on the next replica: no deadline, it runs until cancelled."""
        return self.in_turn()[0].stub.Watch(pb.WatchRequest(since_revision=since_revision),
                                            metadata=self._metadata,
                                            wait_for_ready=wait_for_ready)

    def follow(self, on_break):
        """Watch messages for as long as they are read: a stream the server ends (a shutdown, a
        cut-off) or that breaks (its replica killed) is resumed from the last revision seen,
        after on_break(reason, revision) says why. One server is waited for until it is back;
        with several replicas, each attempt goes to the next connected one. A first call that
        fails raises, as any call does, once every replica has answered UNAVAILABLE."""
        revision, started, pause = 0, False, RESUME_BACKOFF[0]
        untried = len(self.replicas)
        while True:
            call = self.watch(revision, wait_for_ready=started and not self.several)
            try:
                for message in call:
                    started, pause = True, RESUME_BACKOFF[0]
                    if message.snapshot_complete or not message.snapshot:
                        revision = message.revision
                    yield message
                reason = "the server closed the stream (it may be stopping or restarting)"
            except grpc.RpcError as error:
                untried -= 1
                if not started:
                    if untried and error.code() is grpc.StatusCode.UNAVAILABLE:
                        continue
                    raise
                reason = stream_end_reason(error)
            finally:
                call.cancel()
            on_break(reason, revision)
            time.sleep(pause)  # a server that refuses at once is not asked again at once
            pause = min(pause * 2, RESUME_BACKOFF[1])

    def serving(self, timeout=QUICK_TIMEOUT):
        """How many replicas answer the standard health check as serving this service."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        up = 0
        for replica in self.replicas:
            try:
                reply = replica.health.Check(request, timeout=timeout, metadata=self._metadata)
                up += reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as error:
                logger.debug("replica %s is not serving: %s", replica.address, error.code().name)
        return up

    def status(self, client_id):
        """One client's records; built from the old string map if the server sends no records."""
        response = self._call("GetClientStatus", pb.ClientStatusRequest(client_id=client_id))
        return list(response.clients) or [
            pb.Client(client_id=name, status=WORD_STATUSES.get(word, pb.STATUS_UNSPECIFIED))
            for name, word in response.statuses.items()]

    def page(self, query=Query(), token="", rows=None, timeout=None):
        """Up to rows clients (every one when None) in id order from token on, and the token of
        what follows ("" at the end). A page may hold fewer clients than asked for even when
        more follow, so each page's token is followed until rows are found."""
        found = []
        while True:
            size = PAGE_SIZE if rows is None else min(PAGE_SIZE, rows - len(found))
            request = pb.ListClientsRequest(page_size=size, page_token=token,
                                            status=query.status, id_prefix=query.prefix)
            reply = self._call("ListClients", request, timeout)
            found.extend(reply.clients)
            token = reply.next_page_token
            if not token or (rows is not None and len(found) >= rows):
                return found, token

    def count(self, timeout=None):
        return self._call("CountClients", pb.CountClientsRequest(), timeout)

    def browse(self, query, token="", first=1, rows=PAGE_ROWS):
        """A page of rows clients from token on, with the counts that say how many match."""
        clients, token = self.page(query, token, rows)
        counts = self.count()
        if not token:
            matching = first - 1 + len(clients)
        elif query.prefix:
            matching = None
        else:
            matching = {pb.STATUS_CONNECTED: counts.connected,
                        pb.STATUS_DISCONNECTED: counts.disconnected}.get(query.status,
                                                                         counts.total)
        return Page(clients, first, matching, bool(token), counts, query), token


class IdCache:
    """Client ids for completion: a page per prefix, kept briefly and told of every new id the
    watch stream brings (learn); never raises, never waits long."""

    def __init__(self, client, ttl=IDS_TTL, clock=time.monotonic):
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._pages = {}  # prefix -> (fetched at, sorted ids, whether that was every id with it)

    def matching(self, prefix):
        now = self._clock()
        with self._lock:
            cached = self._cached(prefix, now)
        if cached is None:
            cached = self._fetch(prefix, now)
        return [client_id for client_id in cached if client_id.startswith(prefix)]

    def learn(self, client_id):
        """Put an id the watch stream just named into every cached page it belongs to."""
        with self._lock:
            for prefix, (_, ids, complete) in self._pages.items():
                fits = complete or (ids and client_id < ids[-1])
                if client_id.startswith(prefix) and fits:
                    index = bisect.bisect_left(ids, client_id)
                    if ids[index:index + 1] != [client_id]:
                        ids.insert(index, client_id)

    def _cached(self, prefix, now):
        for known, (fetched, ids, complete) in self._pages.items():
            covers = known == prefix or complete and prefix.startswith(known)
            if covers and now - fetched < self._ttl:
                return list(ids)
        return None

    def _fetch(self, prefix, now):
        try:
            clients, token = self._client.page(Query(prefix=prefix), rows=PAGE_SIZE,
                                               timeout=QUICK_TIMEOUT)
            ids, complete = [client.client_id for client in clients], not token
        except grpc.RpcError as error:  # a failure is remembered too, so typing stays quick
            logger.debug("no ids for completion: %s", error.code().name)
            ids, complete = [], False
        with self._lock:
            self._pages = {known: page for known, page in self._pages.items()
                           if now - page[0] < self._ttl}
            self._pages[prefix] = (now, ids, complete)
        return ids


class ServerMonitor:
    """The toolbar's facts: reachability, the online count from daemon threads.

    One thread counts (CountClients); another follows the Watch stream from the counted
    revision, tells the id cache of each client it names, and asks for a recount whenever
    changes arrive, so the count and the completions move with them. One server's reachability
    is its channel's state; with several replicas, a third thread health-checks each of them
    (which also reconnects one that is back) and counts those serving.
    """

    def __init__(self, client, interval=COUNT_INTERVAL, keeper=None, ids=None):
        self._client = client
        self._interval = interval
        self._keeper = keeper
        self._ids = ids
        self.reachable = None
        self.counts = None
        self._watch_call = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        loops = [(self._count_loop, "toolbar-count"), (self._watch_loop, "toolbar-watch")]
        if client.several:
            loops.append((self._health_loop, "toolbar-health"))
        else:
            client.replicas[0].channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._threads = [threading.Thread(target=loop, name=name, daemon=True)
                         for loop, name in loops]
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

    def _health_loop(self):
        """Count the replicas that pass a health check, every HEALTH_INTERVAL."""
        while not self._stopped.is_set():
            self.reachable = (self._client.serving(), len(self._client.replicas))
            self._stopped.wait(HEALTH_INTERVAL)

    def _watch_loop(self):
        while not self._stopped.is_set():
            counts = self.counts
            try:
                self._watch_call = self._client.watch(counts.revision if counts else 0)
                for message in self._watch_call:
                    self._learn(message)
            except grpc.RpcError as error:
                logger.debug("toolbar watch ended: %s", error.code().name)
            self._stopped.wait(self._interval)

    def _learn(self, message):
        """Tell the id cache of each client the stream names, then ask for a recount."""
        if self._ids is not None:
            for event in message.events:
                self._ids.learn(event.client.client_id)
                logger.debug("completion knows %s from the watch stream", event.client.client_id)
        if message.events:
            self.refresh()

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
        if not self._client.several:
            self._client.replicas[0].channel.unsubscribe(self._on_connectivity)

    def toolbar(self, width=None):
        """The toolbar's fragments, as wide as the running prompt's terminal unless told."""
        width = width or get_app().output.get_size().columns
        keeper = self._keeper
        return render_toolbar(self._client.address, self.reachable, self.counts,
                              keeper and keeper.user, width, keeper and keeper.state)


class NotAttached(grpc.RpcError):
    """An attach that failed on this side, told as a call's error: its first message did not
    come in time, or said its server is stopping."""

    def __init__(self, code, details):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


NO_ANSWER = (grpc.StatusCode.DEADLINE_EXCEEDED, "no answer from the server in time")
STOPPING = (grpc.StatusCode.UNAVAILABLE, "the server is stopping")


class PresenceKeeper:
    """Keeps one user connected while the client runs, in a session of its own.

    Attached, an Attach stream holds the session: the server ends it the moment the stream
    ends, however this process goes (exit, kill -9, a lost network); a stream that breaks or
    whose server says it is stopping is attached again, to another replica when there is one.
    Against a server without Attach: a lease renewed in the background and a Goodbye on the
    way out, so a killed client shows offline when the lease runs out. `state` says which,
    for the toolbar; `on_notice(text)` hears of every attach and break.
    """

    def __init__(self, client, user, lease=DEFAULT_LEASE, on_notice=None):
        self._client = client
        self.user = user
        self.lease = lease
        self.session_id = f"{socket.gethostname()}:{os.getpid()}"
        self.state = "connecting"  # attached, reattaching, lease, taken over
        self.address = None  # the replica holding the stream
        self._on_notice = on_notice or (lambda text: logger.info("%s", text))
        self._call = None
        self._stopped = threading.Event()
        self._thread = None

    def start(self):
        """Attach now (so a bad name fails at once), else fall back to a lease against a
        server without Attach; then keep the session live in the background."""
        try:
            self._attach()
            loop = self._hold_loop
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.state = "lease"  # before the hello, so a signal during it still says goodbye
            self._hello()
            self._on_notice(f"{self.user} is online with a {self.lease} s lease, renewed "
                            "(the server cannot attach)")
            loop = self._renew_loop
        self._thread = threading.Thread(target=loop, name="presence", daemon=True)
        self._thread.start()
        return self

    def _attach(self, avoid="", wait_for_ready=False):
        """Open an Attach stream and read its first notice; a stream that fails raises as a
        call does, one silent past the client's timeout or whose server is stopping raises
        NotAttached."""
        call, address = self._client.attach(self.user, self.session_id, avoid, wait_for_ready)
        self._call = call  # so close() ends it even while it waits for its first notice
        if self._stopped.is_set():  # close() came just before it was noted
            call.cancel()
        timer = threading.Timer(self._client.timeout, call.cancel)
        timer.daemon = True  # an exit (a signal) between here and its cancel must not wait for it
        timer.start()
        try:
            first = next(call)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.CANCELLED and not self._stopped.is_set():
                raise NotAttached(*NO_ANSWER) from None
            raise
        except StopIteration:
            raise NotAttached(*NO_ANSWER) from None
        finally:
            timer.cancel()
        if first.notice != pb.AttachResponse.ATTACHED:  # the server stops: try the next
            call.cancel()
            raise NotAttached(*STOPPING)
        self.address, self.state = address, "attached"
        self._on_notice(f"{self.user} attached to {address} (session {self.session_id})")
        return first

    def _hold_loop(self):
        """Hold the stream until it ends, then attach again (with backoff), until close()."""
        while not self._stopped.is_set():
            avoid = self._hold()
            if self._stopped.is_set() or self.state == "taken over":
                return
            self._reattach(avoid)

    def _hold(self):
        """Read the stream's notices until it ends; the address of its server, which stopped
        or broke, so that the next attach goes to another replica when there is one."""
        stopping = False
        try:
            for notice in self._call:
                if notice.notice == pb.AttachResponse.SERVER_STOPPING:
                    stopping, self.state = True, "reattaching"
                    self._on_notice(f"{self.address} is stopping; attaching again within "
                                    f"{notice.reattach_seconds} s")
            reason = "the server ended the stream"
        except grpc.RpcError as error:
            if self._stopped.is_set():
                return ""
            if error.code() is grpc.StatusCode.ABORTED:
                self.state = "taken over"
                self._on_notice(f"{self.user}'s session was taken over: {error.details()}")
                return ""
            reason = stream_end_reason(error)
        if not stopping:
            self.state = "reattaching"
            self._on_notice(f"lost the attach stream to {self.address} ({reason}); "
                            "attaching again")
        return self.address

    def _reattach(self, avoid):
        """Attach again until it works or close(); one server is waited for until it is back.
        A server that cannot attach any more (an older one put back) gets a lease instead."""
        pause = RESUME_BACKOFF[0]
        while not self._stopped.is_set():
            try:
                self._attach(avoid, wait_for_ready=not self._client.several)
                return
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._fall_back_to_lease()
                    return
                logger.info("could not attach %s again: %s", self.user, error.code().name)
            self._stopped.wait(pause)
            pause = min(pause * 2, RESUME_BACKOFF[1])

    def _fall_back_to_lease(self):
        """Keep the user online with a renewed lease, on this thread, until close()."""
        self.state = "lease"
        try:
            self._hello()
        except grpc.RpcError as error:
            logger.info("could not say hello for %s: %s", self.user, error.code().name)
        self._on_notice(f"{self.user} is online with a {self.lease} s lease, renewed (the "
                        "server cannot attach)")
        self._renew_loop()

    def _hello(self):
        self._client.send(self.user, "hello", self.session_id, self.lease)

    def _renew_loop(self):
        while not self._stopped.wait(self.lease / 3):
            try:
                self._hello()
            except grpc.RpcError as error:  # the server may be back by the next renewal
                logger.info("could not renew %s's lease: %s", self.user, error.code().name)

    def wait(self):
        """Block until close() (or a takeover); for a process that only holds the user."""
        while not self._stopped.wait(1.0) and self.state != "taken over":
            pass

    def close(self):
        """End the session: cancel the stream (the server ends the session at once), or, on a
        lease, stop renewing and say goodbye, briefly: an exit must not hang on a dead server."""
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(QUICK_TIMEOUT * 2)
        if self.state != "lease":
            return
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
    menu line) and raises EOFError at the end of input, Cancelled when the user gives up;
    one-shot use passes none. `pager(text)` shows an answer taller than the screen; `toolbar()`
    gives the toolbar's fragments for the live watch. `worst` is the highest exit code of any
    command that failed so far.
    """

    def __init__(self, client: "PresenceClient", out: Console, err: Console, *,
                 json_output: bool = False, read: Callable[[str, str], str] | None = None,
                 clock: Callable[[], float] = time.time,
                 pager: Callable[[str], object] | None = None,
                 toolbar: Callable[[], object] | None = None, page_rows: int = PAGE_ROWS):
        self.client = client
        self.out = out
        self.err = err
        self.json_output = json_output
        self.read = read
        self.clock = clock
        self.pager = pager
        self.toolbar = toolbar
        self.page_rows = page_rows
        self.stopped = False
        self.worst = EXIT_OK
        self._next_page: tuple[Query, str, int] | None = None  # the page `more` shows

    def onecmd(self, line: str) -> int:
        """Run one menu line: a number or word, any arguments inline; missing ones are asked for.

        A number asks for every missing argument; a word only for the required ones, so
        `status` alone lists every client while `2` asks which.
        """
        try:
            words = split_line(line)
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
        try:
            args += self._ask(command, args, by_number=words[0] == command.number)
        except Cancelled:
            self.out.print(Text(f"{command.name} cancelled", style="dim"))
            return EXIT_OK
        except UsageError as error:
            return self.fail(str(error), EXIT_USAGE)
        return self.run(command, args)

    def _ask(self, command, given, by_number):
        """The arguments not given inline: asked for (all by number, the required by word).
        An empty answer to a required one ends the command there, before the next is asked."""
        answers = []
        for param in command.params[len(given):]:
            if not (by_number or not param.optional):
                answers.append("")
                continue
            try:
                answers.append(self.read(param.prompt, param.name).strip())
            except EOFError:
                self.fail(f"the input ended before {command.name}'s {param.name.upper()}",
                          EXIT_USAGE)
                raise
            if not answers[-1] and not param.optional:
                raise UsageError(f"{command.name} needs {param.help}, and it was empty — "
                                 f"usage: {command.usage}")
        return answers

    def run(self, command: Command, args: list[str]) -> int:
        """Run a command with all its arguments; a failure is one line on stderr and a code."""
        try:
            answer = getattr(self, f"do_{command.name}")(*args)
        except grpc.RpcError as error:
            message, code = describe_error(error, self.client)
            if code == EXIT_UNREACHABLE and self.read:
                message += RETRY_HINT
            return self.fail(message, code)
        except UsageError as error:
            return self.fail(str(error), EXIT_USAGE)
        except BrokenPipeError:  # the reader of our output left: nothing more to say
            raise
        except Exception as error:  # one bad command must never end the session
            logger.debug("%s failed", command.name, exc_info=True)
            return self.fail(f"{command.name} failed: {error}", EXIT_SERVER_ERROR)
        if answer is not None:
            self.show(answer)
        return EXIT_OK

    def show(self, answer: Answer) -> None:
        """Print an answer: a JSON line with --json, else the renderable, through the pager when
        there is one and the answer is taller than the screen."""
        if self.json_output:
            if answer.data is not None:
                self.write_json(answer.data)
            return
        with self.out.capture() as capture:
            self.out.print(answer.renderable)
        text = re.sub(r" +$", "", capture.get(), flags=re.MULTILINE)  # rich pads to the width
        if self.pager is not None and text.count("\n") >= self.out.height:
            self.pager(text)
        else:
            self.out.file.write(text)
            self.out.file.flush()

    def write_json(self, data: object) -> None:
        write_json_line(self.out, data)

    def fail(self, message: str, code: int) -> int:
        self.err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
        self.worst = max(self.worst, code)
        return code

    def do_send(self, client_id: str, message: str) -> Answer:
        response = self.client.send(client_id, message)
        return Answer(render_send(response, self.clock(), self.out.width), send_json(response))

    def do_status(self, client_id: str) -> Answer:
        """One client by id; with PREFIX* or no id, a page of clients (all with --json)."""
        if client_id.endswith("*"):
            return self._browse(Query(prefix=client_id[:-1]))
        if client_id:
            clients = self.client.status(client_id)
            return Answer(Group(*(render_client(client, self.clock(), self.out.width)
                                  for client in clients)),
                          {"client": client_json(clients[0])})
        return self._browse(Query(), listed=False)

    def do_list(self, state: str, prefix: str) -> Answer:
        """Clients by status and prefix; a lone word that is no status is the prefix."""
        if state.lower() not in STATES:
            if prefix:
                raise UsageError(f"{state!r} is not online, offline or all — usage: "
                                 f"{find_command('list').usage}")
            state, prefix = "", state
        return self._browse(Query(STATES[state.lower()], prefix))

    def do_more(self) -> Answer:
        """The page after the last one shown by list or status."""
        if self._next_page is None:
            raise UsageError("nothing more to show — list or status shows the first page")
        query, token, first = self._next_page
        return self._show_page(query, token, first)

    def _browse(self, query, listed=True):
        """Every matching client with --json; else their first page, the rest left for more."""
        if self.json_output:
            clients, _ = self.client.page(query)
            return Answer(Text(""), listing_json(clients, self.client.count(),
                                                 query if listed else None))
        return self._show_page(query, "", 1)

    def _show_page(self, query, token, first):
        """A page from token on; what follows is kept for more."""
        page, token = self.client.browse(query, token, first, self.page_rows)
        self._next_page = (query, token, first + len(page.clients)) if token else None
        hint = ("; more shows the next page" if self.read else
                "; --json lists every one")
        return Answer(render_page(page, self.clock(), self.out.width, hint))

    def do_watch(self) -> None:
        """Follow the Watch stream until Ctrl-C, resuming it when the server ends it."""
        if self.json_output:
            self._print_watch_json()
        else:
            self._show_watch_live()

    def _print_watch_json(self):
        """Each snapshot entry and change as a JSON line; why a stream broke on stderr."""
        def on_break(reason, revision):
            self.err.print(Text(f"watch: {reason}; resuming from revision {revision}",
                                style="yellow"), soft_wrap=True)
        for message in self.client.follow(on_break):
            for change in watch_json(message):
                self.write_json(change)

    def _show_watch_live(self):
        """The live table, redrawn as changes come and as its times tick."""
        view = WatchView(self.out, self.clock, self.toolbar)
        try:
            with keys_held(sys.stdin), Live(get_renderable=view, console=self.out,
                                            refresh_per_second=WATCH_REFRESH) as live:
                for message in self.client.follow(view.broke):
                    view.apply(message)
                    live.refresh()
        except KeyboardInterrupt:
            self.out.print(Text("watch stopped", style="dim"))
            raise

    def do_help(self) -> Answer:
        return Answer(render_menu(self.client.address), help_json())

    def do_exit(self) -> None:
        self.stopped = True


class WatchView:
    """What the live watch shows: the clients as the stream tells of them, and why the stream
    broke while it is being resumed; called, it renders them for the console's size now."""

    def __init__(self, console, clock, toolbar=None):
        self._console = console
        self._clock = clock
        self._toolbar = toolbar
        self._lock = threading.Lock()  # the stream updates, the refresh thread renders
        self.clients = {}
        self.revision = 0
        self.note = None

    def apply(self, message):
        """Take in a watch message: a resync starts over, then its clients replace ours."""
        with self._lock:
            if message.resync:
                self.clients.clear()
            self.clients.update((client.client_id, client) for client in message.snapshot)
            self.clients.update((event.client.client_id, event.client)
                                for event in message.events)
            self.revision = message.revision
            self.note = None

    def broke(self, reason, revision):
        """Say, until the next message arrives, why the stream ended and where it resumes."""
        with self._lock:
            self.note = f"{reason}; resuming from revision {revision}"

    def __call__(self):
        width, height = self._console.size
        with self._lock:
            clients, revision, note = dict(self.clients), self.revision, self.note
        toolbar = self._toolbar and toolbar_text(self._toolbar(width))
        note = note and Text(note, style="yellow", no_wrap=True, overflow="ellipsis")
        return render_watch(clients, revision, self._clock(), width, height, note, toolbar)


# --- reading lines: a terminal or a pipe ------------------------------------------------


def run_repl(dispatcher):
    """Show the menu, then run lines until exit or Ctrl-D: Ctrl-C only clears a line."""
    dispatcher.onecmd("help")
    while not dispatcher.stopped:
        try:
            dispatcher.onecmd(dispatcher.read(PROMPT, "command"))
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
    return EXIT_OK


def run_script(dispatcher, stop_on_error=False):
    """Run piped lines until exit or the end of input; return the highest exit code of any
    failed command (0 when none failed), or with stop_on_error the first failure's own code."""
    while not dispatcher.stopped:
        try:
            code = dispatcher.onecmd(dispatcher.read(PROMPT, "command"))
        except EOFError:
            break
        if code and stop_on_error:
            return code
    return dispatcher.worst


class PipeReader:
    """Lines from a pipe, one per prompt; nothing is printed, so stdout carries only answers.

    A stream with a file descriptor is read from it directly, waiting in select() beside
    the signals' wakeup pipe: the kernel may hand a SIGTERM or SIGHUP to any thread (one of
    gRPC's, say), and then a plain blocking read went on waiting for input, the handler never
    ran, and the client neither said goodbye nor exited."""

    def __init__(self, stream):
        self._stream = stream
        try:
            self._fd = stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: a test's StringIO
            self._fd = None
        else:
            self._decoder = codecs.getincrementaldecoder(stream.encoding or "utf-8")(
                stream.errors or "strict")
            self._wake_read, self._wake_write = os.pipe()
            for end in (self._wake_read, self._wake_write):
                os.set_blocking(end, False)
        self._text = ""  # read and not yet answered
        self._ended = False

    def __call__(self, prompt, kind):
        if self._fd is None:
            line = self._stream.readline()
        else:
            while "\n" not in self._text and not self._ended:
                self._read_more()
            line, newline, self._text = self._text.partition("\n")
            line += newline
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def _read_more(self):
        """Wait for input or a signal (whose handler then runs, here in the main thread)."""
        previous = signal.set_wakeup_fd(self._wake_write)
        try:
            readable, _, _ = select.select([self._fd, self._wake_read], [], [])
        finally:
            signal.set_wakeup_fd(previous)
        if self._wake_read in readable:
            os.read(self._wake_read, 512)
        if self._fd in readable:
            data = os.read(self._fd, 65536)
            self._ended = not data
            self._text += self._decoder.decode(data, final=self._ended)


class TerminalReader:
    """prompt_toolkit prompts: a session per kind of prompt (the menu line, each argument), so
    each has its own history and completion; fish-style suggestions from that history; the
    toolbar with its monitor. Ctrl-D at an argument prompt cancels the command, not the REPL."""

    def __init__(self, client, history, *, keeper=None, input=None, output=None):
        self.ids = IdCache(client)
        self.monitor = ServerMonitor(client, keeper=keeper, ids=self.ids)
        sources = {"id": self.ids.matching, "message": lambda word: MESSAGES,
                   "state": lambda word: ("online", "offline", "all"), "prefix": self.ids.matching}
        common = dict(bottom_toolbar=self.monitor.toolbar, auto_suggest=AutoSuggestFromHistory(),
                      complete_in_thread=True, complete_while_typing=False, refresh_interval=1.0,
                      input=input, output=output)
        self.sessions = {"command": PromptSession(history=history,
                                                   completer=MenuCompleter(sources), **common)}
        for kind, source in sources.items():
            self.sessions[kind] = PromptSession(history=InMemoryHistory(),
                                                 completer=AnswerCompleter(source), **common)

    def __call__(self, prompt, kind):
        if kind == "command":
            self.monitor.refresh()
            return self.sessions[kind].prompt(prompt)
        try:
            return self.sessions[kind].prompt(prompt)
        except EOFError:
            raise Cancelled from None

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


def run_pager(text):
    """Show a tall answer through $PAGER (less -R when unset), as psql does; print it when the
    pager cannot be started."""
    try:
        subprocess.run(shlex.split(os.environ.get("PAGER") or DEFAULT_PAGER), input=text,
                       text=True, check=False)
    except OSError as error:
        logger.warning("no pager (%s): %s", os.environ.get("PAGER") or DEFAULT_PAGER, error)
        sys.stdout.write(text)


@contextmanager
def keys_held(stream):
    """While a live view runs, keys typed in the terminal are neither echoed into it nor left
    over for the next prompt; Ctrl-C still interrupts."""
    if not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class Output(Console):
    """A console whose reader may leave (`| head`): that ends the command quietly with exit 0,
    instead of rich's own exit 1."""

    def on_broken_pipe(self):
        """Leave as any broken pipe does, for main() to end quietly."""
        self.quiet = True
        raise BrokenPipeError


# --- the command line: one table of options, their environment twins and config keys ----


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


def _servers(text):
    """A --server value: one HOST:PORT, or several replicas' joined by commas (spaces dropped)."""
    addresses = [address.strip() for address in text.split(",")]
    if not all(addresses):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT or HOST:PORT,HOST:PORT,... with no "
                                         f"empty address, got {text!r}")
    return ",".join(addresses)


def _log_level(text):
    """A --log-level value in any case, checked here so a bad one is a usage error."""
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"must be DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return text.upper()


def _switch(text):
    """An environment twin of an on/off flag: 1/true/yes/on or 0/false/no/off."""
    words = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"must be 1 or 0 (true/false, yes/no), got {text!r}")
    return words[text.lower()]


@dataclass(frozen=True)
class Option:
    """A flag, its environment twin and (where it belongs there) its config-file key, in one
    place, so the parser, the help and the lookup of each setting can never disagree."""

    flag: str
    env: str
    help: str
    default: object = None
    type: object = str
    metavar: str | None = None
    switch: bool = False  # on when given, takes no value
    in_file: bool = False  # may be set in the config file, under the flag's name without --
    path: bool = False  # a file: in the config file, relative to the config file's folder
    dest: str = ""

    @property
    def name(self):
        """The attribute of the parsed arguments that holds the setting."""
        return self.dest or self.key.replace("-", "_")

    @property
    def key(self):
        """The setting's key in the config file: the flag without its dashes."""
        return self.flag.removeprefix("--")


OPTIONS = (
    Option("--server", "PRESENCE_SERVER", "the server to talk to, or several replicas of one "
           "service joined by commas: each call goes to the next connected replica in turn, "
           "one that is down is skipped, a watch resumes on another; the toolbar counts the "
           "replicas that answer", DEFAULT_SERVER, _servers, "HOST:PORT[,HOST:PORT...]",
           in_file=True),
    Option("--timeout", "PRESENCE_TIMEOUT", "deadline of each call, retries included",
           DEFAULT_TIMEOUT, _seconds, "SECONDS", in_file=True),
    Option("--json", "PRESENCE_JSON", "print answers as JSON, shapes below", False, switch=True),
    Option("--stop-on-error", "PRESENCE_STOP_ON_ERROR",
           "a piped script stops at its first failed command and exits with that command's "
           "code (without it, the script goes on and exits with the highest code of any "
           "failed command)", False, switch=True, in_file=True),
    Option("--history", "PRESENCE_HISTORY", "the REPL's command history file", DEFAULT_HISTORY,
           metavar="FILE", in_file=True, path=True),
    Option("--tls", "PRESENCE_TLS", "talk TLS, trusting the system's certificate authorities",
           False, switch=True, in_file=True),
    Option("--tls-ca", "PRESENCE_TLS_CA",
           "talk TLS, trusting this CA (PEM) for the server's certificate", "", metavar="FILE",
           in_file=True, path=True),
    Option("--tls-cert", "PRESENCE_CLIENT_CERT",
           "this client's certificate (PEM), for servers that require one", "",
           metavar="FILE", in_file=True, path=True),
    Option("--tls-key", "PRESENCE_CLIENT_KEY", "the private key of --tls-cert", "",
           metavar="FILE", in_file=True, path=True),
    Option("--token", "PRESENCE_TOKEN", "the access token the server wants", ""),
    Option("--token-file", "PRESENCE_TOKEN_FILE", "read the access token from this file", "",
           metavar="FILE", in_file=True, path=True),
    Option("--as", "PRESENCE_AS", "keep NAME connected while the menu (or attach) runs: its own "
           "session, held by an Attach stream, so NAME goes offline the moment this process "
           "ends, however it ends", None, metavar="NAME", in_file=True, dest="user"),
    Option("--lease", "PRESENCE_LEASE", "against a server that cannot attach, --as keeps a "
           "lease of this length renewed instead: killed outright, NAME shows connected for at "
           "most this long", DEFAULT_LEASE, _whole_seconds, "SECONDS", in_file=True),
    Option("--log-level", "PRESENCE_LOG_LEVEL", "diagnostics on stderr: DEBUG, INFO, WARNING "
           "or ERROR", "WARNING", _log_level, "LEVEL", in_file=True),
    Option("--config", "PRESENCE_CONFIG", "the config file (TOML, keys below); the default one "
           "may be missing, a named one must exist", DEFAULT_CONFIG, metavar="FILE"),
)

ATTACH_SUMMARY = ("hold --as NAME online until interrupted (for scripts and services): "
                  "offline the moment this process ends, however it ends")

EPILOG = """\
examples:
  python client.py                                    the menu, with completion and history
  python client.py --server db1:50051 status          every client, a page at a time
  python client.py --server db1:50051,db2:50051       the menu over two replicas
  python client.py send alice hello                   mark alice connected
  python client.py --json status alice                one client as JSON
  python client.py --json list online al              every connected client whose id starts al
  python client.py --json watch                       every change as it happens, a line each
  python client.py --as alice                         the menu, alice connected while it runs
  python client.py --as build-bot attach              build-bot connected until interrupted
  printf 'send alice hello\\nstatus alice\\n' | python client.py --json   a script

the menu (a terminal or piped input): 1/send, 2/status, 3/exit (or quit), 4/watch, 5/list,
more, help (or ?). A word takes its arguments inline: send alice hello, status alice,
status (every client), status al* (ids starting al), list online, list offline al.
A list shows %(rows)d clients at a time; more shows the next page. watch shows a live table
until Ctrl-C.

piped input: standard output carries only the answers (with --json only JSON lines), errors
go to standard error, one line each. The script goes on after a failed command and exits
with the highest exit code of any command that failed (0 when none did); with
--stop-on-error it stops at the first failure and exits with its code. Ctrl-C: 130.

--json prints one object per answer, on one line:
  send ID MESSAGE  {"info": str, "changed": bool, "client": CLIENT}
  status ID        {"client": CLIENT}
  status           {"clients": [CLIENT, ...], "connected": int, "disconnected": int,
                    "total": int, "revision": int}
  list, status P*  the same with "status": "connected" | "disconnected" | null and
                   "prefix": str: every matching client, all pages
  CLIENT           {"client_id": str, "status": "connected" | "disconnected" | "unknown",
                    "changed_at": RFC 3339 UTC or null, "last_seen": RFC 3339 UTC or null,
                    "revision": int, "sessions": [{"session_id": str,
                    "expires_at": RFC 3339 UTC or null, "kind": "message" | "attached"},
                    ...], "reason": str}
  watch            one object per line, flushed, until Ctrl-C (exit 130): first the snapshot,
                   {"kind": "snapshot", "revision": int, "resync": bool, "client": CLIENT}
                   for each client, then each change as it happens,
                   {"kind": "connected" | "disconnected" | "session_started" |
                    "session_ended", "revision": int, "session_id": str, "reason": str,
                    "client": CLIENT}; a stream the server ends is resumed from the last
                   revision (a line on stderr says why)
  --as NAME attach one line per attach, break and re-attach, until Ctrl-C (exit 130) or
                   SIGTERM (exit 0): {"kind": "notice", "user": str, "state": "attached" |
                   "reattaching" | "lease" | "taken over", "server": the replica attached to
                   (or last attached to) or null, "text": str}; without --json the same lines
                   go to stderr

exit codes: 0 ok; 1 the server answered with an error (NOT_FOUND, INVALID_ARGUMENT, ...);
2 usage error; 3 server unreachable (UNAVAILABLE, or no answer within --timeout);
4 the server wants an access token (UNAUTHENTICATED); 130 interrupted (Ctrl-C).
Errors are one line on stderr, e.g. "error: Client zed not found (NOT_FOUND)".

settings: a flag wins over its environment twin, the twin over the config file, the file
over the default. An empty environment variable counts as unset.
environment twins:
%(twins)s
config file: %(config)s (or --config FILE), TOML, e.g. server = "db1:50051";
its keys (file names in it are relative to its folder):
%(keys)s
"""


def epilog():
    """The help's closing text, its lists of twins and config keys drawn from OPTIONS."""
    twins = "\n".join(f"  {option.env:<24} {option.flag}" for option in OPTIONS)
    keys = textwrap.fill(", ".join(option.key for option in OPTIONS if option.in_file),
                         width=88, initial_indent="  ", subsequent_indent="  ")
    return EPILOG % {"rows": PAGE_ROWS, "twins": twins, "config": DEFAULT_CONFIG, "keys": keys}


def build_parser():
    """Options from OPTIONS (every default None, so what was given can be told apart), then an
    optional one-shot command built from COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="client.py", epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Client for the presence service: a menu REPL in a terminal, the same\n"
                    "menu over piped input, or one command and exit.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for option in OPTIONS:
        default = "" if option.switch or option.default in ("", None) else \
            f" (default: {option.default})"
        kind = ({"action": "store_true"} if option.switch else
                {"type": option.type, "metavar": option.metavar})
        parser.add_argument(option.flag, dest=option.name, default=None,
                            help=f"{option.help}{default} [{option.env}]", **kind)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="one-shot commands (without one, the menu opens)")
    for command in COMMANDS:
        if command.one_shot:
            sub = commands.add_parser(command.name, help=command.summary,
                                      description=command.summary)
            for param in command.params:
                extra = {"nargs": "?", "default": ""} if param.optional else {}
                sub.add_argument(param.name, metavar=param.name.upper(), help=param.help, **extra)
    commands.add_parser("attach", help=ATTACH_SUMMARY, description=ATTACH_SUMMARY)
    return parser


def read_config(path, required):
    """The settings in a TOML config file; a default file that is missing holds none."""
    path = Path(path).expanduser()
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ValueError(f"config file {path} not found") from None
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"config file {path}: {error}") from None
    known = [option.key for option in OPTIONS if option.in_file]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"config file {path}: unknown setting {unknown[0]!r} "
                         f"(known: {', '.join(known)})")
    return settings


def from_file(option, value, folder):
    """A config file's value for option, checked as its flag's value would be."""
    if option.switch:
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value
    if isinstance(value, (bool, dict, list)):
        raise argparse.ArgumentTypeError(f"must be a single value, got {value!r}")
    value = option.type(str(value))
    return str(folder / Path(value).expanduser()) if option.path and value else value


def resolve_settings(args, environ):
    """Fill each option the command line left out: from its environment twin, else the config
    file, else its default. A bad value is a ValueError naming where it came from."""
    config = args.config or environ.get("PRESENCE_CONFIG") or DEFAULT_CONFIG
    config_path = Path(config).expanduser()
    settings = read_config(config_path, required=config != DEFAULT_CONFIG)
    args.config = str(config_path)
    for option in OPTIONS:
        if getattr(args, option.name) is not None:
            continue
        try:
            if environ.get(option.env):
                source = option.env
                value = (_switch if option.switch else option.type)(environ[option.env])
            elif option.key in settings:
                source = f"{config_path}: {option.key}"
                value = from_file(option, settings[option.key], config_path.parent)
            else:
                value = option.default
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None
        setattr(args, option.name, value)
    return args


def parse_settings(argv=None, environ=os.environ):
    """The command line, completed from the environment and the config file; exits 2 (usage)
    with one line on a bad value wherever it came from."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_settings(args, environ)
    except ValueError as error:
        parser.error(str(error))
    if args.user and args.command not in (None, "attach"):
        parser.error("--as keeps NAME connected while the menu runs, or with attach; "
                     "it does not go with another one-shot command")
    if args.command == "attach" and not args.user:
        parser.error("attach holds a user online: say which with --as NAME")
    return parser, args


def run_terminal(client, out, err, args, keeper=None):
    """The REPL in a terminal; the toolbar's threads stop before the channel closes."""
    reader = TerminalReader(client, open_history(args.history), keeper=keeper)
    try:
        return run_repl(Dispatcher(client, out, err, json_output=args.json, read=reader,
                                   pager=run_pager, toolbar=reader.monitor.toolbar))
    finally:
        reader.close()


def _leave(signum, frame):
    """End the menu (or attach) as exit does, so --as ends its session before the process
    goes."""
    raise SystemExit(EXIT_OK)


def hold_attached(client, out, err, args):
    """The one-shot attach: hold args.user online until interrupted, each attach and break a
    line (on stdout with --json, as JSON; else on stderr)."""
    def notice(text):
        if args.json:
            write_json_line(out, {"kind": "notice", "user": args.user, "state": keeper.state,
                                  "server": keeper.address, "text": text})
        else:
            err.print(Text(text, style="dim"), soft_wrap=True)
    keeper = PresenceKeeper(client, args.user, args.lease, on_notice=notice)
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, _leave)
    try:
        keeper.start()
        keeper.wait()
        return EXIT_SERVER_ERROR if keeper.state == "taken over" else EXIT_OK
    except grpc.RpcError as error:
        message, code = describe_error(error, client)
        err.print(Text(f"error: cannot connect as {args.user}: {message}", style="red"),
                  soft_wrap=True)
        return code
    finally:
        keeper.close()


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
            return run_terminal(client, out, err, args, keeper)
        dispatcher = Dispatcher(client, out, err, json_output=args.json,
                                read=PipeReader(sys.stdin))
        return run_script(dispatcher, args.stop_on_error)
    except grpc.RpcError as error:  # only keeper.start() lets one out
        message, code = describe_error(error, client)
        err.print(Text(f"error: cannot connect as {args.user}: {message}", style="red"),
                  soft_wrap=True)
        return code
    finally:
        if keeper:
            keeper.close()


def connection_security(args, parser):
    """TLS credentials (or None) and the token the settings ask for; a bad one is a usage error."""
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
    try:
        parser, args = parse_settings(argv)
        credentials, token = connection_security(args, parser)
    except SystemExit as exit:  # argparse has printed the usage and why (or the version)
        return exit.code
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, err = Output(highlight=False), Output(stderr=True, highlight=False)
    with PresenceClient(args.server, args.timeout, credentials, token) as client:
        try:
            if args.command == "attach":
                return hold_attached(client, out, err, args)
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
