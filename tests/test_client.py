"""The client, client.py: renderers, completion and the dispatcher on a real server, then the
REPL in a real pseudo-terminal, piped scripts and one-shot commands as real processes."""

import ctypes
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent import futures

import allure
import grpc
import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.cells import cell_len
from rich.console import Console

import client
import server as presence_service
from conftest import (
    ANSI,
    CLIENT,
    DEADLINE,
    PROMPT,
    ROOT,
    Lines,
    Watch,
    complete,
    connect,
    free_address,
    goodbye,
    hello,
    run_client,
    tls_flags,
)
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

pytestmark = [allure.feature("Client")]

NOW = 1_800_000_000.0


def rendered(renderable, width=120):
    """What a renderable looks like as plain text, 120 columns wide unless told."""
    console = Console(file=io.StringIO(), width=width)
    console.print(renderable)
    return console.file.getvalue()


def record(client_id, status=pb.STATUS_CONNECTED, changed_ago=120, seen_ago=3, revision=7):
    message = pb.Client(client_id=client_id, status=status, revision=revision)
    message.changed_at.FromNanoseconds(int((NOW - changed_ago) * 1e9))
    message.last_seen.FromNanoseconds(int((NOW - seen_ago) * 1e9))
    return message


def counts(connected, disconnected, revision=9):
    return pb.CountClientsResponse(connected=connected, disconnected=disconnected,
                                   total=connected + disconnected, revision=revision)


class Script:
    """Answers prompts from a list, the way a user or a pipe would; EOFError when it runs out."""

    def __init__(self, *lines):
        self.lines = list(lines)
        self.prompts = []

    def __call__(self, prompt, kind):
        self.prompts.append((prompt, kind))
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line


@pytest.fixture
def consoles():
    out = Console(file=io.StringIO(), width=120)
    err = Console(file=io.StringIO(), width=120)
    return out, err


@pytest.fixture
def presence(address):
    with client.PresenceClient(address, timeout=5) as presence:
        yield presence


@pytest.fixture
def server_without_attach():
    """Our service as a server from before Attach was: every method but Attach, which gRPC
    itself answers UNIMPLEMENTED, as any older server does. On its own port; stopped after."""
    registry = presence_service.Registry(presence_service.MemoryStore())
    reaper = presence_service.LeaseReaper(registry)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = presence_service.method_handlers(presence_service.ClientService(registry))
    del handlers["Attach"]
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(presence_service.SERVICE_NAME, handlers),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    reaper.start()
    yield f"127.0.0.1:{port}"
    grpc_server.stop(0)
    reaper.stop()
    registry.close()


def make_dispatcher(presence, consoles, *lines, json_output=False):
    out, err = consoles
    read = Script(*lines)
    return client.Dispatcher(presence, out, err, json_output=json_output, read=read,
                             clock=lambda: NOW)


def text_of(console):
    return console.file.getvalue()


# --- relative time and renderers --------------------------------------------------------


def completions(completer, text):
    return [completion.text for completion in
            completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]

def next_event(watch):
    (event,) = watch.events(1)
    return event

def could_be(shown, client_id):
    """Whether a table cell could show client_id: whole, or cut where "…" stands."""
    pieces = shown.split("…")
    if len(pieces) == 1:
        return shown == client_id
    at = 0
    for number, piece in enumerate(pieces):
        found = client_id.find(piece, at) if number else (0 if client_id.startswith(piece) else -1)
        if found < 0:
            return False
        at = found + len(piece)
    return pieces[-1] == "" or client_id.endswith(pieces[-1])

def id_cells(text, ids):
    """The id cell of each client row of a rendered table (the first word of the row)."""
    words = ("connected", "disconnected", "on", "off")
    rows = [line for line in text.splitlines()
            if set(line.replace("│", " ").split()[1:2]) & set(words)]
    return [row.replace("│", " ").split()[0] for row in rows], rows

def assert_fits(text, ids, width):
    """Every client on one line within width, each id whole or cut so it names only itself."""
    shown, rows = id_cells(text, ids)
    assert len(rows) == len(ids), text
    assert all(cell_len(row) <= width for row in rows), text
    for cell in shown:
        assert [client_id for client_id in ids if could_be(cell, client_id)] != [], cell
        assert sum(could_be(cell, client_id) for client_id in ids) == 1, f"{cell} is ambiguous"
    assert "connec…" not in text and "disconn…" not in text

def register(stub, count, prefix="user", start=0):
    """count clients prefix00000... in one call per thousand, the odd ones disconnected."""
    for first in range(start, start + count, 1000):
        stub.SendMessages(pb.SendMessagesRequest(requests=[
            pb.MessageRequest(client_id=f"{prefix}{index:05}",
                              message="goodbye" if index % 2 else "hello")
            for index in range(first, min(first + 1000, start + count))]))

def shell(command, **kwargs):
    """Run a shell pipeline in the repository; its result."""
    return subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE, **kwargs)

def settings(tmp_path, argv=(), environ=None, config=None):
    """What parse_settings makes of argv and environ with HOME at tmp_path, whose config file
    holds config (TOML text) when given."""
    if config is not None:
        folder = tmp_path / ".config" / "presence"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(config)
    return client.parse_settings(list(argv), environ or {})[1]

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path

@pytest.fixture
def server_50_seconds_behind(make_server):
    """An in-process server whose clock runs 50 s behind, so its clients changed 50 s ago."""
    return f"127.0.0.1:{make_server(clock=lambda: time.time() - 50).port}"

def toolbar_says(child, texts):
    """Which of texts the toolbar shows next, telling the terminal's cursor position to the
    prompt whenever it asks (it draws its toolbar only once it knows)."""
    while True:
        found = child.expect_exact(["\x1b[6n", *texts])
        if found == 0:
            child.send("\x1b[12;1R")
        else:
            return found - 1

def open_watchers(replica):
    """How many Watch streams a replica has open, from its Prometheus metrics."""
    url = replica.wait_for_log(r"metrics on (http://\S+/metrics)").group(1)
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    return int(float(re.search(r"^presence_watchers (\S+)$", text, re.M).group(1)))

def the_one_watched(replicas):
    """The replica that holds the one Watch stream, once it is open."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        watched = [replica for replica in replicas if open_watchers(replica)]
        if watched:
            return watched[0]
    raise AssertionError("no replica holds the watch stream")


@allure.story("Rendering")
@pytest.mark.parametrize("ago, words", [
    (None, "—"),
    (-30, "just now"),
    (0, "just now"),
    (4.9, "just now"),
    (5, "5 s ago"),
    (42, "42 s ago"),
    (59.9, "59 s ago"),
    (60, "1 min ago"),
    (150, "2 min ago"),
    (3599, "59 min ago"),
    (3600, "1 h ago"),
    (3 * 3600 + 59, "3 h ago"),
    (86399, "23 h ago"),
    (86400, "1 d ago"),
    (5 * 86400 + 7, "5 d ago"),
])
def test_relative_time_reads_at_a_glance(ago, words):
    then = None if ago is None else NOW - ago
    assert client.relative_time(then, NOW) == words


@allure.story("Rendering")
def test_client_table_shows_id_status_relative_times_and_revision():
    text = rendered(client.render_clients([record("alice", changed_ago=120, seen_ago=42)], NOW))
    row = next(line for line in text.splitlines() if "alice" in line)
    for cell in ("connected", "2 min ago", "42 s ago", "7"):
        assert cell in row
    assert "revision" in text and "last seen" in text


@allure.story("Rendering")
@pytest.mark.parametrize("status, word, colour", [
    (pb.STATUS_CONNECTED, "connected", "green"),
    (pb.STATUS_DISCONNECTED, "disconnected", "red"),
    (pb.STATUS_UNSPECIFIED, "unknown", "yellow"),
])
def test_status_word_is_coloured_by_status(status, word, colour):
    text = client.status_text(status)
    assert text.plain == word
    assert colour in str(text.style)


@allure.story("Rendering")
def test_client_ids_are_shown_literally_not_as_markup():
    text = rendered(client.render_clients([record("[bold]mallory[/bold]")], NOW))
    assert "[bold]mallory[/bold]" in text


@allure.story("Rendering")
def test_send_answer_shows_server_info_and_the_record():
    response = pb.MessageResponse(success=True, info="Client alice marked as connected.",
                                  client=record("alice", changed_ago=0, seen_ago=0), changed=True)
    text = rendered(client.render_send(response, NOW))
    assert "Client alice marked as connected." in text
    assert "just now" in text
    assert "no change" not in text


@allure.story("Rendering")
def test_send_answer_notes_when_nothing_changed():
    response = pb.MessageResponse(success=True, info="Client bob marked as disconnected.",
                                  client=record("bob", pb.STATUS_DISCONNECTED), changed=False)
    text = rendered(client.render_send(response, NOW))
    assert text.startswith("no change: bob was already disconnected; last seen refreshed\n")
    assert "marked as" not in text, "one answer, not the server's words and their contradiction"


@allure.story("Rendering")
def test_send_answer_from_an_old_server_is_just_its_info():
    response = pb.MessageResponse(success=True, info="Client carol marked as connected.")
    text = rendered(client.render_send(response, NOW))
    assert text.strip() == "Client carol marked as connected."


@allure.story("Rendering")
def test_listing_shows_every_client_and_the_counts_when_short():
    page = client.Page([record("alice"), record("bob", pb.STATUS_DISCONNECTED)], 1, 2, False,
                       counts(1, 1))
    text = rendered(client.render_page(page, NOW))
    assert "alice" in text and "bob" in text
    assert "1 connected · 1 disconnected · 2 total" in text
    assert "showing" not in text


@allure.story("Rendering")
def test_a_page_says_which_clients_it_shows_of_how_many_without_rpc_names():
    clients = [record(f"user{index:04}") for index in range(200, 400)]
    page = client.Page(clients, 201, 2500, True, counts(2000, 500))
    text = rendered(client.render_page(page, NOW, hint="; more shows the next page"))
    assert "user0200" in text and "user0399" in text
    assert "showing 201–400 of 2,500; more shows the next page" in text
    assert "2,000 connected · 500 disconnected · 2,500 total" in text
    assert "Clients" not in text, "no RPC names (CountClients, ListClients)"


@allure.story("Big registries")
def test_a_page_under_a_prefix_says_more_follow_without_a_total():
    page = client.Page([record("user10"), record("user11")], 1, None, True, counts(9, 0),
                       client.Query(prefix="user1"))
    text = rendered(client.render_page(page, NOW, hint="; more shows the next page"))
    assert "showing 1–2; more shows the next page" in text


@allure.story("Rendering")
def test_empty_registry_says_so():
    text = rendered(client.render_page(client.Page([], 1, 0, False, counts(0, 0)), NOW))
    assert "no clients yet" in text and "0 total" in text
    filtered = client.Page([], 1, 0, False, counts(0, 0), client.Query(pb.STATUS_CONNECTED))
    assert "no clients match" in rendered(client.render_page(filtered, NOW))


@allure.story("Rendering")
def test_menu_lists_numbers_words_and_usage():
    text = rendered(client.render_menu("localhost:50051"))
    assert "server localhost:50051" in text
    for line in ("1  send ID MESSAGE", "2  status [ID]", "3  exit", "help"):
        assert line in text


@allure.story("Rendering")
@pytest.mark.parametrize("reachable, answer, shown", [
    (True, counts(3, 4), "● reachable  3 online of 7"),
    (False, None, "● unreachable  online: —"),
    (None, None, "● connecting"),
    ((3, 3), counts(3, 4), "● 3 of 3 replicas reachable  3 online of 7"),
    ((2, 3), counts(3, 4), "● 2 of 3 replicas reachable  3 online of 7"),
])
def test_toolbar_text_names_address_reachability_and_online_count(reachable, answer, shown):
    text = "".join(fragment for _, fragment in
                   client.render_toolbar("db1:50051", reachable, answer))
    assert "db1:50051" in text and shown in text


@allure.story("Rendering")
def test_json_client_has_stable_fields_and_null_for_unset_times():
    full = client.client_json(record("alice", revision=3))
    assert set(full) == {"client_id", "status", "changed_at", "last_seen", "revision",
                         "sessions", "reason"}
    assert full["status"] == "connected" and full["revision"] == 3
    assert full["changed_at"].endswith("Z")
    bare = client.client_json(pb.Client(client_id="old", status=pb.STATUS_DISCONNECTED))
    assert bare == {"client_id": "old", "status": "disconnected", "changed_at": None,
                    "last_seen": None, "revision": 0, "sessions": [], "reason": ""}


# --- completion --------------------------------------------------------------------------


SOURCES = {"id": lambda prefix: ["alice", "albert", "bob"],
           "message": lambda prefix: client.MESSAGES}


@allure.story("Completion")
@pytest.mark.parametrize("text, expected", [
    ("", ["send", "status", "exit", "quit", "watch", "list", "more", "help"]),
    ("s", ["send", "status"]),
    ("sta", ["status"]),
    ("STA", []),
    ("send ", ["alice", "albert", "bob"]),
    ("send al", ["alice", "albert"]),
    ("send alice ", ["hello", "goodbye"]),
    ("send alice g", ["goodbye"]),
    ("send alice hello ", []),
    ("status ", ["alice", "albert", "bob"]),
    ("status b", ["bob"]),
    ("status bob ", []),
    ("1 al", ["alice", "albert"]),
    ("exit ", []),
    ("bogus ", []),
])
def test_menu_line_completes_words_then_ids_then_messages(text, expected):
    assert completions(client.MenuCompleter(SOURCES), text) == expected


@allure.story("Completion")
def test_sub_prompts_complete_from_their_own_source():
    assert completions(client.AnswerCompleter(SOURCES["id"]), "al") == ["alice", "albert"]
    assert completions(client.AnswerCompleter(SOURCES["message"]), "h") == ["hello"]


@allure.story("Completion")
def test_ids_for_completion_come_from_the_server(stub, presence):
    for client_id in ("alice", "albert", "bob"):
        stub.SendMessage(pb.MessageRequest(client_id=client_id, message="hello"))
    ids = client.IdCache(presence)
    assert ids.matching("al") == ["albert", "alice"]
    assert ids.matching("") == ["albert", "alice", "bob"]


@allure.story("Completion")
def test_listing_stops_at_the_limit_and_says_whether_it_saw_everyone(stub, presence):
    for client_id in ("alice", "albert", "bob"):
        stub.SendMessage(pb.MessageRequest(client_id=client_id, message="hello"))
    clients, token = presence.page(rows=2)
    assert [client.client_id for client in clients] == ["albert", "alice"] and token
    clients, token = presence.page(client.Query(prefix="b"))
    assert [client.client_id for client in clients] == ["bob"] and not token


@allure.story("Completion")
def test_ids_are_cached_briefly_and_refetched_when_stale(stub, presence):
    clock = [0.0]
    ids = client.IdCache(presence, ttl=5, clock=lambda: clock[0])
    stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"))
    assert ids.matching("") == ["alice"]
    stub.SendMessage(pb.MessageRequest(client_id="bob", message="hello"))
    assert ids.matching("b") == [], "a complete cached page answers narrower prefixes"
    clock[0] = 6.0
    assert ids.matching("b") == ["bob"]


@allure.story("Completion")
def test_completion_never_raises_when_the_server_is_down():
    with client.PresenceClient(free_address()) as down:
        assert client.IdCache(down).matching("a") == []


# --- the dispatcher against a real server ----------------------------------------------------


@allure.story("REPL")
def test_inline_send_marks_the_client_and_shows_the_answer(presence, consoles, stub):
    dispatcher = make_dispatcher(presence, consoles)
    assert dispatcher.onecmd("send alice hello") == client.EXIT_OK
    assert "Client alice marked as connected." in text_of(consoles[0])
    answer = stub.GetClientStatus(pb.ClientStatusRequest(client_id="alice"))
    assert answer.statuses["alice"] == "connected"
    assert dispatcher.read.prompts == [], "inline arguments need no prompt"


@allure.story("REPL")
def test_menu_number_prompts_for_id_then_message(presence, consoles):
    dispatcher = make_dispatcher(presence, consoles, "  bob ", "Goodbye")
    assert dispatcher.onecmd("1") == client.EXIT_OK
    assert [kind for _, kind in dispatcher.read.prompts] == ["id", "message"]
    assert "Client bob marked as disconnected." in text_of(consoles[0])


@allure.story("REPL")
def test_send_with_only_an_id_prompts_for_the_message(presence, consoles):
    dispatcher = make_dispatcher(presence, consoles, "hello")
    assert dispatcher.onecmd("send carol") == client.EXIT_OK
    assert [kind for _, kind in dispatcher.read.prompts] == ["message"]


@allure.story("REPL")
def test_status_word_alone_lists_everyone_without_prompting(presence, consoles, stub):
    stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"))
    stub.SendMessage(pb.MessageRequest(client_id="bob", message="goodbye"))
    dispatcher = make_dispatcher(presence, consoles)
    assert dispatcher.onecmd("status") == client.EXIT_OK
    text = text_of(consoles[0])
    assert "alice" in text and "bob" in text
    assert "1 connected · 1 disconnected · 2 total" in text
    assert dispatcher.read.prompts == []


@allure.story("REPL")
def test_status_number_with_empty_id_lists_everyone(presence, consoles, stub):
    stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"))
    dispatcher = make_dispatcher(presence, consoles, "")
    assert dispatcher.onecmd("2") == client.EXIT_OK
    assert "1 connected · 0 disconnected · 1 total" in text_of(consoles[0])


@allure.story("REPL")
def test_status_of_one_client_shows_its_record(presence, consoles, stub):
    stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"))
    dispatcher = make_dispatcher(presence, consoles)
    assert dispatcher.onecmd("STATUS alice") == client.EXIT_OK
    row = next(line for line in text_of(consoles[0]).splitlines() if "alice" in line)
    assert "connected" in row


@allure.story("REPL")
@pytest.mark.parametrize("line, code, message", [
    ("dance", client.EXIT_USAGE, "error: unknown command 'dance' — type help for the menu"),
    ("send a b c", client.EXIT_USAGE, "error: too many arguments — usage: send ID MESSAGE"),
    ('send "alice', client.EXIT_USAGE, "error: cannot read that line: the quote at column 6 "
                                        "is not closed before a space or the end of the line"),
    ("status zed", client.EXIT_SERVER_ERROR, "error: Client zed not found (NOT_FOUND)"),
    ("send alice hi", client.EXIT_SERVER_ERROR,
     "error: Invalid message type: hi (INVALID_ARGUMENT)"),
])
def test_a_bad_line_is_one_error_line_and_a_code(presence, consoles, line, code, message):
    dispatcher = make_dispatcher(presence, consoles)
    assert dispatcher.onecmd(line) == code
    assert text_of(consoles[1]) == message + "\n"
    assert text_of(consoles[0]) == ""


@allure.story("Unreachable server")
def test_unreachable_server_is_one_line_with_a_retry_hint(consoles):
    address = free_address()
    with client.PresenceClient(address, timeout=5) as down:
        dispatcher = make_dispatcher(down, consoles)
        assert dispatcher.onecmd("status") == client.EXIT_UNREACHABLE
    assert text_of(consoles[1]) == (f"error: server {address} is unreachable: connection refused"
                                    " — retrying on the next command\n")


@allure.story("REPL")
def test_an_unexpected_failure_is_one_line_and_the_session_goes_on(address, consoles):
    closed = client.PresenceClient(address)
    closed.close()
    dispatcher = make_dispatcher(closed, consoles)
    assert dispatcher.onecmd("status alice") == client.EXIT_SERVER_ERROR
    assert text_of(consoles[1]).startswith("error: status failed: ")
    assert dispatcher.onecmd("help") == client.EXIT_OK
    assert not dispatcher.stopped


@allure.story("Pipes")
def test_json_status_follows_every_page_while_the_table_is_cut(presence, consoles, stub):
    with allure.step("register 1,500 clients: more than one page of 1,000"):
        for start in (0, 1000):
            requests = [pb.MessageRequest(client_id=f"user{index:05}", message="hello")
                        for index in range(start, min(start + 1000, 1500))]
            stub.SendMessages(pb.SendMessagesRequest(requests=requests))
    with allure.step("--json gets every client and the counts"):
        dispatcher = make_dispatcher(presence, consoles, json_output=True)
        assert dispatcher.onecmd("status") == client.EXIT_OK
        answer = json.loads(text_of(consoles[0]))
        assert len(answer["clients"]) == 1500
        assert answer["clients"][-1]["client_id"] == "user01499"
        assert (answer["connected"], answer["disconnected"], answer["total"]) == (1500, 0, 1500)
    with allure.step("the table shows 200 rows and says how many there are"):
        out = Console(file=io.StringIO(), width=120)
        client.Dispatcher(presence, out, consoles[1]).onecmd("status")
        assert "showing 1–200 of 1,500; --json lists every one" in text_of(out)


@allure.story("REPL")
def test_loop_survives_ctrl_c_and_ends_at_exit(presence, consoles):
    dispatcher = make_dispatcher(presence, consoles, KeyboardInterrupt(), "send alice hello",
                                 "quit", "send bob hello")
    assert client.run_repl(dispatcher) == client.EXIT_OK
    assert dispatcher.stopped
    assert "Client alice marked as connected." in text_of(consoles[0])
    assert "bob" not in text_of(consoles[0]), "nothing runs after exit"


@allure.story("Pipes")
def test_piped_lines_print_only_answers_and_end_at_end_of_input(presence, consoles):
    out, err = consoles
    reader = client.PipeReader(io.StringIO("1\nalice\nHello\n2\nalice\n"))
    dispatcher = client.Dispatcher(presence, out, err, read=reader)
    assert client.run_script(dispatcher) == client.EXIT_OK
    text = text_of(out)
    assert "presence>" not in text and "client id" not in text and "Presence client" not in text
    assert text.startswith("Client alice marked as connected.")
    assert text.count("│ alice ") == 2, "the send answer and the status answer"
    assert text_of(err) == ""


# --- prompt_toolkit without a terminal ----------------------------------------------------


@allure.story("REPL")
def test_prompt_toolkit_session_runs_the_menu(presence, consoles, stub):
    out, err = consoles
    with create_pipe_input() as pipe:
        reader = client.TerminalReader(presence, InMemoryHistory(), input=pipe,
                                       output=DummyOutput())
        try:
            pipe.send_text("1\ralice\rhello\rstatus alice\rexit\r")
            dispatcher = client.Dispatcher(presence, out, err, read=reader)
            assert client.run_repl(dispatcher) == client.EXIT_OK
        finally:
            reader.close()
    assert dispatcher.stopped
    assert "Client alice marked as connected." in text_of(out)
    answer = stub.GetClientStatus(pb.ClientStatusRequest(client_id="alice"))
    assert answer.statuses["alice"] == "connected"


@allure.story("REPL")
def test_history_goes_to_a_file_or_memory_when_it_cannot(tmp_path):
    assert isinstance(client.open_history(tmp_path / "history"), FileHistory)
    assert (tmp_path / "history").exists()
    assert isinstance(client.open_history(tmp_path / "missing" / "history"), InMemoryHistory)


# --- main(): arguments and exit codes ------------------------------------------------------


@allure.story("One-shot commands")
def test_one_shot_send_prints_the_answer_and_exits_zero(address, capsys):
    assert client.main(["--server", address, "send", "alice", "hello"]) == client.EXIT_OK
    assert "Client alice marked as connected." in capsys.readouterr().out


@allure.story("One-shot commands")
def test_one_shot_json_status_is_one_object(address, capsys, stub):
    stub.SendMessage(pb.MessageRequest(client_id="alice", message="hello"))
    assert client.main(["--server", address, "--json", "status", "alice"]) == client.EXIT_OK
    answer = json.loads(capsys.readouterr().out)
    assert answer["client"]["client_id"] == "alice"
    assert answer["client"]["status"] == "connected"


@allure.story("One-shot commands")
def test_server_address_comes_from_the_environment(address, capsys, monkeypatch):
    monkeypatch.setenv("PRESENCE_SERVER", address)
    assert client.main(["--json", "send", "bob", "goodbye"]) == client.EXIT_OK
    assert json.loads(capsys.readouterr().out)["client"]["status"] == "disconnected"


@allure.story("One-shot commands")
@pytest.mark.parametrize("argv, code, stderr", [
    (["status", "zed"], client.EXIT_SERVER_ERROR, "error: Client zed not found (NOT_FOUND)\n"),
    (["send", "alice", "hi"], client.EXIT_SERVER_ERROR,
     "error: Invalid message type: hi (INVALID_ARGUMENT)\n"),
    (["send", ""], client.EXIT_USAGE, None),
    (["send", "alice"], client.EXIT_USAGE, None),
    (["dance"], client.EXIT_USAGE, None),
    (["--timeout", "0", "status"], client.EXIT_USAGE, None),
    (["--timeout", "soon", "status"], client.EXIT_USAGE, None),
])
def test_exit_codes_say_what_went_wrong(address, capsys, argv, code, stderr):
    assert client.main(["--server", address, *argv]) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if stderr is None:
        assert captured.err.startswith("usage: client.py")
    else:
        assert captured.err == stderr


@allure.story("One-shot commands")
def test_help_explains_commands_json_exit_codes_and_examples(capsys):
    assert client.main(["--help"]) == client.EXIT_OK
    text = capsys.readouterr().out
    for part in ("examples:", "send ID MESSAGE", '"client_id"', "exit codes:", "PRESENCE_SERVER",
                 "PRESENCE_TIMEOUT", "PRESENCE_HISTORY", "--log-level"):
        assert part in text


@allure.story("Pipes")
def test_main_reads_the_menu_from_piped_stdin(address, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("send alice hello\nstatus\n"))
    assert client.main(["--server", address]) == client.EXIT_OK
    out = capsys.readouterr().out
    assert "Client alice marked as connected." in out
    assert "1 connected · 0 disconnected · 1 total" in out


# --- watch and sessions ------------------------------------------------------------------


@allure.story("Rendering")
def test_watch_table_puts_the_latest_changes_first_and_says_when_it_is_cut():
    clients = {f"c{n}": record(f"c{n}", revision=n,
                               status=pb.STATUS_CONNECTED if n % 2 else pb.STATUS_DISCONNECTED)
               for n in range(1, 6)}
    text = rendered(client.render_watch(clients, 5, NOW, height=10))
    rows = [line.split("│")[1].strip() for line in text.splitlines()
            if re.match(r"│ c\d", line)]
    assert rows == ["c5", "c4", "c3"]
    assert "showing the 3 most recently changed of 5" in text
    assert "3 connected · 2 disconnected · revision 5" in text


@allure.story("Rendering")
@pytest.mark.parametrize(("sessions", "shown"), [
    ([], "—"), ([""], "default"), (["laptop", "phone"], "laptop, phone")])
def test_sessions_column_names_each_live_session(sessions, shown):
    message = pb.Client(sessions=[pb.Session(session_id=name) for name in sessions])
    assert client.sessions_text(message.sessions) == shown


@allure.story("One-shot commands")
def test_watch_json_gives_a_line_per_snapshot_entry_then_per_event():
    snapshot = pb.WatchResponse(snapshot=[record("a"), record("b")], snapshot_complete=True,
                                revision=9, resync=True)
    events = pb.WatchResponse(revision=11, events=[
        pb.Event(revision=10, kind=pb.EVENT_SESSION_STARTED, client=record("a"),
                 session_id="tty2", reason="hello"),
        pb.Event(revision=11, kind=pb.EVENT_DISCONNECTED, client=record("b"),
                 reason="lease expired")])
    lines = list(client.watch_json(snapshot)) + list(client.watch_json(events))
    assert [(line["kind"], line["revision"], line["client"]["client_id"]) for line in lines] == [
        ("snapshot", 9, "a"), ("snapshot", 9, "b"), ("session_started", 10, "a"),
        ("disconnected", 11, "b")]
    assert lines[0]["resync"] is True
    assert (lines[2]["session_id"], lines[3]["reason"]) == ("tty2", "lease expired")


@allure.story("One-shot commands")
def test_as_goes_with_no_one_shot_command_but_attach(capsys):
    assert client.main(["--as", "alice", "status"]) == client.EXIT_USAGE
    assert "--as keeps NAME connected while the menu runs" in capsys.readouterr().err


# --- the client as people run it: helpers -----------------------------------------------


# --- the client: the REPL in a pseudo-terminal ------------------------------------------


@allure.story("REPL")
def test_repl_shows_menu_keeps_history_and_ctrl_d_exits_zero(repl, address, tmp_path):
    child = repl(address)
    with allure.step("the menu is shown at start"):
        child.expect_exact("send ID MESSAGE")
        child.expect_exact("status [ID]")
        child.expect_exact(PROMPT)
    with allure.step("help shows it again"):
        child.send("help\r")
        child.expect_exact("show this menu")
        child.expect_exact(PROMPT)
    with allure.step("Ctrl-D exits cleanly"):
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    assert "help" in (tmp_path / ".presence_history").read_text()


@allure.story("Completion")
def test_tab_completes_the_command_word(repl, address, stub):
    hello(stub, "alice")
    child = repl(address)
    child.expect_exact(PROMPT)
    complete(child, "sta", "status")
    child.send("\r")
    assert child.expect_exact(["1 total", "unknown command"]) == 0


@allure.story("Completion")
def test_tab_completes_a_client_id_from_the_server_and_shows_its_table(repl, address, stub):
    hello(stub, "alice-wonderland")
    child = repl(address)
    child.expect_exact(PROMPT)
    complete(child, "status alice-w", "status alice-wonderland")
    child.send("\r")
    index = child.expect([rf"│ alice-wonderland\s+│ {ANSI}connected", "not found"])
    assert index == 0, "the completed id was sent and its status rendered"


@allure.story("Completion")
def test_sub_prompts_complete_ids_and_messages(repl, address, stub):
    hello(stub, "bob-the-builder")
    child = repl(address)
    child.expect_exact(PROMPT)
    child.send("1\r")
    child.expect_exact("client id:")
    complete(child, "bob-t", "bob-the-builder")
    child.send("\r")
    child.expect_exact("message (hello/goodbye):")
    complete(child, "go", "goodbye")
    child.send("\r")
    child.expect_exact("Client bob-the-builder marked as disconnected.")


@allure.story("REPL")
def test_ctrl_c_clears_the_line_and_the_repl_continues(repl, address, stub):
    child = repl(address)
    child.expect_exact(PROMPT)
    child.send("send junk")
    child.expect_exact("junk")
    child.sendcontrol("c")
    child.expect_exact(PROMPT)
    child.send("send alice hello\r")
    child.expect_exact("Client alice marked as connected.")
    assert "message (hello/goodbye)" not in child.logfile_read.getvalue(), "the line was dropped"
    assert stub.GetClientStatus(pb.ClientStatusRequest()).statuses == {"alice": "connected"}


@allure.story("REPL")
def test_toolbar_shows_address_reachability_and_online_count(repl, address, stub):
    hello(stub, "alice")
    child = repl(address, answer_cpr=True)
    child.expect_exact("\x1b[6n")  # the toolbar is drawn once the terminal says where the cursor is
    child.send("\x1b[12;1R")
    child.expect(rf"{re.escape(address)}\s+{ANSI}● reachable{ANSI}\s+1 online of 1")


@allure.story("Unreachable server")
def test_server_going_down_is_one_line_and_the_repl_recovers(repl, server_processes):
    server = server_processes("--store", "memory://")
    child = repl(server.address)
    with allure.step("a command works while the server is up"):
        child.expect_exact(PROMPT)
        child.send("send alice hello\r")
        child.expect_exact("Client alice marked as connected.")
    with allure.step("the server dies: one line, no traceback, the REPL still answers"):
        server.kill()
        child.send("status\r")
        child.expect_exact(f"error: server {server.address} is unreachable: ")
        child.expect_exact("retrying on the next command")
        child.send("help\r")
        child.expect_exact("show this menu")
    with allure.step("a server comes back on the same port: the next command gets through"):
        port = server.address.rsplit(":", 1)[1]
        server_processes("--port", port, "--store", "memory://")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            child.send("send bob hello\r")
            if child.expect_exact(["Client bob marked as connected.", "unreachable"]) == 0:
                break
        else:
            pytest.fail("the REPL never reached the restarted server")
    assert "Traceback" not in child.logfile_read.getvalue()


# --- pipes ------------------------------------------------------------------------------------


@allure.story("Pipes")
def test_piped_session_prints_both_answers_and_exits_zero(address):
    command = (f"printf '1\\nalice\\nHello\\n2\\nalice\\n3\\n' | "
               f"{shlex.quote(sys.executable)} client.py --server {address}")
    result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    assert "Client alice marked as connected." in result.stdout
    assert len(re.findall(r"│ alice\s+│ connected", result.stdout)) == 2, result.stdout
    assert result.stderr == ""
    for chrome in ("Presence client", "presence>", "client id", "message (hello"):
        assert chrome not in result.stdout, "no banner, menu or prompts on a pipe"


@allure.story("Pipes")
def test_piped_errors_are_one_line_each_and_the_script_goes_on(address):
    result = run_client("--server", address, stdin="status zed\nsend bob hello\nstatus\n")
    assert result.returncode == 1, "the script went on, and its exit code says one command failed"
    assert result.stderr == "error: Client zed not found (NOT_FOUND)\n"
    assert "Client bob marked as connected." in result.stdout
    assert "1 connected · 0 disconnected · 1 total" in result.stdout


@allure.story("Pipes")
def test_several_clients_at_once_end_in_the_right_states(address, stub):
    with allure.step("4 client processes flip their own ids at the same time"):
        processes = []
        for index in range(4):
            final = "hello" if index % 2 == 0 else "goodbye"
            flips = f"send c{index} hello\nsend c{index} goodbye\n" * 10
            script = flips + f"send c{index} {final}\n"
            process = subprocess.Popen([sys.executable, CLIENT, "--server", address], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            processes.append((process, script))
        for process, script in processes:
            _, errors = process.communicate(script, timeout=DEADLINE)
            assert process.returncode == 0 and errors == ""
    with allure.step("the server holds each client's last word"):
        statuses = stub.GetClientStatus(pb.ClientStatusRequest()).statuses
        assert statuses == {"c0": "connected", "c1": "disconnected",
                            "c2": "connected", "c3": "disconnected"}
        changes = 2 * 21 + 2 * 20  # a final goodbye after a goodbye changes nothing
        assert stub.CountClients(pb.CountClientsRequest()).revision == changes


# --- one-shot commands ---------------------------------------------------------------------------


@allure.story("One-shot commands")
def test_one_shot_send_and_status_print_tables(address):
    sent = run_client("--server", address, "send", "alice", "hello")
    assert sent.returncode == 0 and "Client alice marked as connected." in sent.stdout
    one = run_client("--server", address, "status", "alice")
    assert one.returncode == 0 and re.search(r"│ alice\s+│ connected", one.stdout)
    every = run_client("--server", address, "status")
    assert every.returncode == 0 and "1 connected · 0 disconnected · 1 total" in every.stdout


@allure.story("One-shot commands")
def test_one_shot_json_answers_are_single_objects(address):
    with allure.step("send"):
        sent = run_client("--server", address, "--json", "send", "alice", "hello")
        sent = json.loads(sent.stdout)
        assert sent["info"] == "Client alice marked as connected."
        assert sent["changed"] is True
        assert sent["client"]["status"] == "connected" and sent["client"]["revision"] == 1
    with allure.step("status of one client"):
        one = json.loads(run_client("--server", address, "--json", "status", "alice").stdout)
        assert one["client"]["client_id"] == "alice"
        assert one["client"]["last_seen"].endswith("Z")
    with allure.step("status of every client, with the counts"):
        run_client("--server", address, "send", "bob", "goodbye")
        every = json.loads(run_client("--server", address, "--json", "status").stdout)
        assert [client["client_id"] for client in every["clients"]] == ["alice", "bob"]
        assert (every["connected"], every["disconnected"], every["total"]) == (1, 1, 2)


@allure.story("One-shot commands")
@pytest.mark.parametrize("args, code, stderr", [
    (["status", "zed"], 1, r"error: Client zed not found \(NOT_FOUND\)\n"),
    (["send", "alice", "hi"], 1, r"error: Invalid message type: hi \(INVALID_ARGUMENT\)\n"),
    (["send", "x" * 129, "hello"], 1,
     r"error: client_id must be at most 128 .*\(INVALID_ARGUMENT\)\n"),
    (["send", "alice"], 2,
     r"usage: client\.py send .*\n.*error: the following arguments are required: MESSAGE\n"),
    (["watch-everything"], 2,
     r"usage: client\.py (.|\n)*error: argument COMMAND: invalid choice: 'watch-everything'.*\n"),
])
def test_one_shot_errors_are_one_stderr_line_and_nothing_on_stdout(address, args, code,
                                                                   stderr):
    result = run_client("--server", address, *args)
    assert result.returncode == code
    assert re.fullmatch(stderr, result.stderr), result.stderr
    assert result.stdout == ""


@allure.story("Unreachable server")
def test_unreachable_server_exits_three_with_one_line(capsys):
    address = free_address()
    with allure.step("main() in this process: status"):
        code = client.main(["--server", address, "--timeout", "2", "status"])
        assert code == client.EXIT_UNREACHABLE
        expected = f"error: server {address} is unreachable: connection refused\n"
        assert capsys.readouterr().err == expected
    with allure.step("client.py as a process: send"):
        result = run_client("--server", address, "--timeout", "3", "send", "alice", "hello")
        assert result.returncode == 3
        assert result.stderr == expected


# --- the client: presence and the live watch -----------------------------------------------


@allure.story("--as keeps a user connected")
def test_client_as_user_falls_back_to_a_lease_that_runs_out_after_kill_9_on_a_server_without_attach(
        server_without_attach):
    address = server_without_attach
    stub = pb_grpc.ClientServiceStub(connect(address))
    watch = Watch(stub)
    watch.snapshot()
    with allure.step("client.py --as erin --lease 1 runs: erin is connected with its session"):
        client = subprocess.Popen([sys.executable, CLIENT, "--server", address, "--as", "erin",
                                   "--lease", "1"], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        event = next_event(watch)
        assert (event.client.client_id, event.kind) == ("erin", pb.EVENT_CONNECTED)
        assert event.session_id.endswith(f":{client.pid}")
    with allure.step("kill -9: no goodbye, but the lease runs out"):
        client.kill()
        client.wait(DEADLINE)
        event = next_event(watch)
        assert (event.client.client_id, event.kind, event.reason) == (
            "erin", pb.EVENT_DISCONNECTED, "lease expired")
    watch.call.cancel()


@allure.story("--as keeps a user connected")
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM],
                         ids=["terminal-closed", "terminated"])
def test_client_as_user_on_a_lease_says_goodbye_when_its_terminal_closes_or_it_is_terminated(
        server_without_attach, signum):
    stub = pb_grpc.ClientServiceStub(connect(server_without_attach))
    address = server_without_attach
    watch = Watch(stub)
    watch.snapshot()
    client = subprocess.Popen([sys.executable, CLIENT, "--server", address, "--as", "ivan"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    assert next_event(watch).kind == pb.EVENT_CONNECTED
    client.send_signal(signum)
    assert client.wait(DEADLINE) == 0
    event = next_event(watch)
    assert (event.client.client_id, event.kind, event.reason) == (
        "ivan", pb.EVENT_DISCONNECTED, "goodbye")
    assert "Traceback" not in client.stderr.read()
    watch.call.cancel()


def wait_until_main_thread_waits_in_the_kernel(pid):
    """Wait until a process's main thread blocks in a system call other than a lock's (a
    read, a select): it runs no Python code, so only a signal it receives itself wakes it."""
    deadline = time.monotonic() + DEADLINE
    while True:
        with open(f"/proc/{pid}/wchan") as wchan:
            where = wchan.read()
        if where not in ("", "0") and "futex" not in where:
            return where
        assert time.monotonic() < deadline, f"the main thread of {pid} never waited"


def signal_another_thread(pid, signum):
    """Send signum to a thread of pid other than its main one (tgkill), as the kernel may
    when the signal is sent to the whole process."""
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the process has a single thread"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, others[0], signum) == 0, os.strerror(ctypes.get_errno())


@allure.story("--as keeps a user connected")
def test_client_as_user_says_goodbye_when_another_of_its_threads_takes_the_sigterm(
        server_without_attach):
    stub = pb_grpc.ClientServiceStub(connect(server_without_attach))
    watch = Watch(stub)
    watch.snapshot()
    client = subprocess.Popen([sys.executable, CLIENT, "--server", server_without_attach,
                               "--as", "ivan"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert next_event(watch).kind == pb.EVENT_CONNECTED
    with allure.step("the menu waits for piped input; a gRPC thread takes the SIGTERM"):
        wait_until_main_thread_waits_in_the_kernel(client.pid)
        signal_another_thread(client.pid, signal.SIGTERM)
    with allure.step("the client still says goodbye and exits 0, input or not"):
        assert client.wait(DEADLINE) == 0
        event = next_event(watch)
        assert (event.client.client_id, event.kind, event.reason) == (
            "ivan", pb.EVENT_DISCONNECTED, "goodbye")
    watch.call.cancel()


@allure.story("--as keeps a user connected")
def test_client_as_user_attaches_its_own_session_and_ends_it_on_exit(repl, address, stub):
    hello(stub, "frank", "desk")
    watch = Watch(stub)
    watch.snapshot()
    with allure.step("the REPL as frank: a session of its own, attached, and the toolbar says so"):
        child = repl(address, "--as", "frank", answer_cpr=True)
        started = next_event(watch)
        assert (started.kind, started.client.status, started.reason) == (
            pb.EVENT_SESSION_STARTED, pb.STATUS_CONNECTED, "attach")
        assert started.session_id != "desk"
        kinds = {s.session_id: s.kind for s in started.client.sessions}
        assert kinds == {"desk": pb.SESSION_KIND_MESSAGE,
                         started.session_id: pb.SESSION_KIND_ATTACHED}
        child.expect_exact("\x1b[6n")  # the toolbar is drawn once the cursor is known
        child.send("\x1b[12;1R")
        child.expect(rf"as frank{ANSI} \(attached\)")
    with allure.step("Ctrl-D: the stream ends, and with it only that session"):
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        event = next_event(watch)
        assert (event.kind, event.reason, event.session_id) == (
            pb.EVENT_SESSION_ENDED, "connection closed", started.session_id)
        assert [s.session_id for s in event.client.sessions] == ["desk"], \
            "only its own session ended"
    watch.call.cancel()


@allure.story("--as keeps a user connected")
def test_client_as_user_is_offline_the_moment_it_is_killed(address, stub):
    watch = Watch(stub)
    watch.snapshot()
    with allure.step("client.py --as erin runs over piped input: erin is attached"):
        user = subprocess.Popen([sys.executable, CLIENT, "--server", address, "--as", "erin"],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        event = next_event(watch)
        assert (event.client.client_id, event.kind, event.reason) == (
            "erin", pb.EVENT_CONNECTED, "attach")
    with allure.step("kill -9: no goodbye, no lease to wait for; the stream's end ends it"):
        user.kill()
        user.wait(DEADLINE)
        event = next_event(watch)
        assert (event.client.client_id, event.kind, event.reason) == (
            "erin", pb.EVENT_DISCONNECTED, "connection closed")
    watch.call.cancel()


@allure.story("--as keeps a user connected")
def test_client_as_user_on_a_server_without_attach_says_lease_in_the_toolbar(
        repl, server_without_attach):
    child = repl(server_without_attach, "--as", "gale", answer_cpr=True)
    child.expect_exact("\x1b[6n")  # the toolbar is drawn once the cursor is known
    child.send("\x1b[12;1R")
    child.expect(rf"as gale{ANSI} \(lease\)")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


@allure.story("One-shot commands")
def test_one_shot_attach_holds_the_user_online_until_it_is_terminated(address, stub):
    watch = Watch(stub)
    watch.snapshot()
    holder = subprocess.Popen(
        [sys.executable, CLIENT, "--server", address, "--json", "--as", "build-bot", "attach"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(holder.stdout)
    with allure.step("a JSON line says it is attached; the user is online"):
        notice = json.loads(lines.next())
        assert (notice["kind"], notice["user"], notice["state"]) == (
            "notice", "build-bot", "attached")
        event = next_event(watch)
        assert (event.client.client_id, event.kind) == ("build-bot", pb.EVENT_CONNECTED)
    with allure.step("SIGTERM (a service stopped): exit 0, and the user is offline"):
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(DEADLINE) == client.EXIT_OK
        event = next_event(watch)
        assert (event.client.client_id, event.kind, event.reason) == (
            "build-bot", pb.EVENT_DISCONNECTED, "connection closed")
    assert "Traceback" not in holder.stderr.read()
    watch.call.cancel()


@allure.story("One-shot commands")
def test_one_shot_attach_needs_a_user(capsys):
    assert client.main(["attach"]) == client.EXIT_USAGE
    assert "attach holds a user online: say which with --as NAME" in capsys.readouterr().err


@allure.story("--as keeps a user connected")
def test_attached_user_shows_no_disconnect_across_a_server_restart(server_processes, sqlite_url):
    server = server_processes("--store", sqlite_url)
    holder = subprocess.Popen(
        [sys.executable, CLIENT, "--server", server.address, "--json", "--as", "rita", "attach"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(holder.stdout)
    assert json.loads(lines.next())["state"] == "attached"
    with connect(server.address) as channel:
        before = pb_grpc.ClientServiceStub(channel).CountClients(pb.CountClientsRequest())
    with allure.step("the server stops politely: the holder is told, and waits for it"):
        assert server.terminate() == 0
        assert "is stopping; attaching again within" in json.loads(lines.next())["text"]
    with allure.step("it comes back on the same port: the holder attaches again by itself"):
        port = server.address.rsplit(":", 1)[1]
        again = server_processes("--port", port, "--store", sqlite_url)
        notice = json.loads(lines.next())
        while notice["state"] != "attached":
            notice = json.loads(lines.next())
    with allure.step("and rita never went offline: no change at all happened meanwhile"):
        with connect(again.address) as channel:
            stub = pb_grpc.ClientServiceStub(channel)
            after = stub.CountClients(pb.CountClientsRequest())
            (rita,) = stub.GetClientStatus(pb.ClientStatusRequest(client_id="rita")).clients
        assert (after.revision, after.connected) == (before.revision, 1)
        assert [s.kind for s in rita.sessions] == [pb.SESSION_KIND_ATTACHED]
    holder.terminate()
    holder.wait(DEADLINE)


@allure.story("Watch")
def test_watch_menu_entry_shows_a_live_table_and_ctrl_c_returns_to_the_prompt(repl, address, stub):
    hello(stub, "gina")
    child = repl(address)
    child.expect_exact(PROMPT)
    with allure.step("4 opens the live table"):
        child.send("4\r")
        child.expect(rf"│ gina\s+│ {ANSI}connected")
        child.expect_exact("live, Ctrl-C to stop")
    with allure.step("a change made elsewhere appears in place"):
        goodbye(stub, "gina")
        child.expect(rf"│ gina\s+│ {ANSI}disconnected")
    with allure.step("Ctrl-C stops watching; the prompt comes back and works"):
        child.sendcontrol("c")
        child.expect_exact("watch stopped")
        child.expect_exact(PROMPT)
        child.send("status gina\r")
        child.expect(rf"│ gina\s+│ {ANSI}disconnected")
    assert "Traceback" not in child.logfile_read.getvalue()


@allure.story("Watch")
def test_json_watch_prints_each_change_as_one_flushed_line_until_interrupted(address, stub):
    hello(stub, "henry")
    watcher = subprocess.Popen([sys.executable, CLIENT, "--server", address, "--json", "watch"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(watcher.stdout)
    with allure.step("the snapshot first, a line per client"):
        first = json.loads(lines.next())
        assert (first["kind"], first["client"]["client_id"], first["revision"]) == (
            "snapshot", "henry", 1)
    with allure.step("then each change, as it happens"):
        hello(stub, "henry", "phone", lease=60)
        goodbye(stub, "henry")
        started, ended = json.loads(lines.next()), json.loads(lines.next())
        assert (started["kind"], started["session_id"], started["revision"]) == (
            "session_started", "phone", 2)
        assert started["client"]["sessions"][1]["expires_at"].endswith("Z")
        assert (ended["kind"], ended["reason"], ended["client"]["status"]) == (
            "disconnected", "goodbye", "disconnected")
    with allure.step("Ctrl-C ends it with exit 130, and stdout holds nothing but JSON lines"):
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(DEADLINE) == client.EXIT_INTERRUPTED
        while (line := lines.next()) is not None:
            json.loads(line)
        assert "Traceback" not in watcher.stderr.read()


@allure.story("--as keeps a user connected")
def test_client_as_a_name_the_server_refuses_is_one_line_and_exit_1(address):
    result = run_client("--server", address, "--as", "tab\there", stdin="")
    assert result.returncode == 1
    assert re.fullmatch(r"error: cannot connect as tab\s+here: client_id must not contain "
                        r"control characters, found U\+0009 at position 3 "
                        r"\(INVALID_ARGUMENT\)\n", result.stderr), result.stderr


# --- narrow terminals and long ids -------------------------------------------------------------

LONG_IDS = ["user15", "user150", "user1500", "bob",
            "x" * 120 + "user15", "x" * 120 + "user16",
            "a" * 60 + "1" + "b" * 60, "a" * 60 + "2" + "b" * 60]
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


@allure.story("Narrow terminals")
@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_tables_fit_the_width_one_line_per_client_and_no_two_ids_look_alike(width):
    clients = [record(client_id, pb.STATUS_CONNECTED if index % 2 else pb.STATUS_DISCONNECTED)
               for index, client_id in enumerate(LONG_IDS)]
    text = rendered(client.render_clients(clients, NOW, width), width)
    assert_fits(text, LONG_IDS, width)
    if width >= 200:
        assert all(client_id in text for client_id in LONG_IDS), "wide enough: every id whole"


@allure.story("Narrow terminals")
@pytest.mark.parametrize("width, kept, gone", [
    (120, ["sessions", "changed", "last seen", "revision", "╭", "laptop"], []),
    (60, ["changed", "last seen", "revision", "2 min ago", "╭"], ["sessions"]),
    (45, ["changed", "seen", "rev", "2m", "connected"], ["sessions", "╭", "last seen"]),
    (35, ["seen", "rev", "connected"], ["changed", "╭"]),
    (25, ["client", " on "], ["rev", "connected"]),
])
def test_columns_drop_and_shorten_in_order_as_the_terminal_narrows(width, kept, gone):
    clients = [record("alice"), record("bob", pb.STATUS_CONNECTED)]
    clients[0].sessions.add(session_id="laptop")
    text = rendered(client.render_clients(clients, NOW, width), width)
    for part in kept:
        assert part in text, text
    for part in gone:
        assert part not in text, text


@allure.story("Narrow terminals")
def test_one_client_whose_id_is_too_wide_is_a_card_with_the_whole_id():
    long_id = "x" * 120 + "user15"
    text = rendered(client.render_client(record(long_id), NOW, 80), 80)
    assert long_id in text.replace("\n", "").replace(" ", ""), "the id can be read in full"
    assert "connected" in text and "revision" in text and "2 min ago" in text


@allure.story("Narrow terminals")
@pytest.mark.parametrize("width, shown, absent", [
    (200, "● reachable  as alice  3 online of 7   Tab completes", "…"),
    (60, "● reachable  as alice  3 online of 7", "Tab completes"),
    (50, "● up  as alice  3/7 online", "reachable"),
    (40, " db1.example.org:50051  ● up  3/7 online", "alice"),
    (26, " …:50051  ● up  3/7 online", "db1.example.org"),
    (18, " ● up  3/7 online", "50051"),
])
def test_toolbar_shortens_to_the_width(width, shown, absent):
    fragments = client.render_toolbar("db1.example.org:50051", True, counts(3, 4), "alice", width)
    text = "".join(fragment for _, fragment in fragments)
    assert shown in text and cell_len(text) <= width
    assert absent not in text


@allure.story("Narrow terminals")
def test_a_narrow_toolbar_counts_the_replicas_in_short():
    fragments = client.render_toolbar("a:1,b:2,c:3", (2, 3), counts(3, 4), None, 40)
    text = "".join(fragment for _, fragment in fragments)
    assert "● 2/3 up  3/7 online" in text and cell_len(text) <= 40


@allure.story("Narrow terminals")
@pytest.mark.parametrize("columns", [60, 80, 200])
def test_status_in_a_terminal_fits_its_width(repl, address, stub, columns):
    for index, client_id in enumerate(LONG_IDS):
        (hello if index % 2 else goodbye)(stub, client_id)
    child = repl(address, dimensions=(40, columns))
    child.expect_exact(PROMPT)
    child.send("status\r")
    child.expect(rf"\d connected{ANSI} · {ANSI}\d disconnected{ANSI} · 8 total")
    assert_fits(ESCAPES.sub("", child.before), LONG_IDS, columns)


@allure.story("Narrow terminals")
def test_toolbar_in_a_60_column_terminal_shows_its_short_form(repl, address, stub):
    hello(stub, "alice")
    child = repl(address, dimensions=(24, 60), answer_cpr=True)
    child.expect_exact("\x1b[6n")
    child.send("\x1b[12;1R")
    child.expect(rf"{re.escape(address)}\s+{ANSI}● reachable{ANSI}\s+1 online of 1")
    assert "Tab completes" not in child.before + child.after


# --- big registries: filters, pages, the pager ------------------------------------------------


@allure.story("Big registries")
def test_more_walks_the_pages_and_says_where_it_stands(presence, consoles, stub):
    register(stub, 450)
    dispatcher = make_dispatcher(presence, consoles)
    out = consoles[0]
    with allure.step("status: the first 200 and how many there are"):
        assert dispatcher.onecmd("status") == client.EXIT_OK
        assert "user00000" in text_of(out) and "user00199" in text_of(out)
        assert "user00200" not in text_of(out)
        assert "showing 1–200 of 450; more shows the next page" in text_of(out)
    for first, last, notice in ((200, 399, "showing 201–400 of 450; more"),
                                (400, 449, "showing 401–450 of 450\n")):
        with allure.step(f"more: {first + 1} to {last + 1}"):
            out.file.truncate(0)
            out.file.seek(0)
            assert dispatcher.onecmd("more") == client.EXIT_OK
            text = text_of(out)
            assert f"user{first:05}" in text and f"user{last:05}" in text
            assert f"user{first - 1:05}" not in text and notice in text
    with allure.step("past the end, more says so"):
        assert dispatcher.onecmd("more") == client.EXIT_USAGE
        assert "nothing more to show" in text_of(consoles[1])


@allure.story("Big registries")
@pytest.mark.parametrize("line, expected", [
    ("list online user0000", ["user00000", "user00002", "user00004", "user00006", "user00008"]),
    ("list offline user0000", ["user00001", "user00003", "user00005", "user00007", "user00009"]),
    ("list user0001", [f"user{index:05}" for index in range(10, 20)]),
    ("status user0001*", [f"user{index:05}" for index in range(10, 20)]),
    ("list all user0002", [f"user{index:05}" for index in range(20, 30)]),
    ("5\nonline\nuser0000", ["user00000", "user00002", "user00004", "user00006", "user00008"]),
])
def test_lists_filter_by_status_and_id_prefix(presence, consoles, stub, line, expected):
    register(stub, 40)
    first, *answers = line.split("\n")
    dispatcher = make_dispatcher(presence, consoles, *answers, json_output=True)
    assert dispatcher.onecmd(first) == client.EXIT_OK
    answer = json.loads(text_of(consoles[0]))
    assert [entry["client_id"] for entry in answer["clients"]] == expected


@allure.story("Big registries")
def test_a_prefix_list_pages_without_knowing_the_total_and_counts_the_rest(presence, consoles,
                                                                           stub):
    register(stub, 30)
    dispatcher = client.Dispatcher(presence, *consoles, read=Script(), clock=lambda: NOW,
                                   page_rows=8)
    dispatcher.onecmd("list online user0000")
    assert "showing 1–5 of 5" not in text_of(consoles[0]), "one page holds all 5: no notice"
    dispatcher.onecmd("list user0")
    assert "showing 1–8; more shows the next page" in text_of(consoles[0])
    dispatcher.onecmd("list online")
    assert "showing 1–8 of 15; more shows the next page" in text_of(consoles[0])
    assert dispatcher.onecmd("list sideways user") == client.EXIT_USAGE
    assert "'sideways' is not online, offline or all" in text_of(consoles[1])


@allure.story("Big registries")
def test_a_listing_taller_than_the_terminal_opens_less(repl, address, stub):
    register(stub, 60)
    child = repl(address, dimensions=(24, 100), env={"PAGER": "", "LESS": ""})
    child.expect_exact(PROMPT)
    child.send("status\r")
    child.expect_exact("user00000")
    with allure.step("less shows the first screen and waits"):
        child.expect_exact(":")
        assert "user00059" not in ESCAPES.sub("", child.before)
    with allure.step("G goes to the end, where the counts are; q returns to the prompt"):
        child.send("G")
        child.expect_exact("user00059")
        child.expect(rf"30 connected{ANSI} · {ANSI}30 disconnected{ANSI} · 60 total")
        child.send("q")
        child.expect_exact(PROMPT)
        child.send("status user00001\r")
        child.expect(rf"│ user00001\s+│ {ANSI}disconnected")


# --- scripts through real pipes ------------------------------------------------------------------


PYTHON_CLIENT = f"{shlex.quote(sys.executable)} client.py"


@allure.story("Pipes")
def test_piped_json_script_prints_only_json_lines_that_jq_reads(address, stub):
    hello(stub, "alice")
    script = "send bob hello\\nstatus alice\\nhelp\\nlist online\\n5\\n\\n\\nstatus zed\\n"
    result = shell(f"printf '{script}' | {PYTHON_CLIENT} --server {address} --json "
                   f"| jq -c .client.client_id")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ['"bob"', '"alice"', "null", "null", "null", ""]
    assert result.stderr == "error: Client zed not found (NOT_FOUND)\n"


@allure.story("Pipes")
@pytest.mark.parametrize("flags, env, code, bob", [
    ([], {}, client.EXIT_USAGE, "connected"),
    (["--stop-on-error"], {}, client.EXIT_SERVER_ERROR, None),
    ([], {"PRESENCE_STOP_ON_ERROR": "1"}, client.EXIT_SERVER_ERROR, None),
], ids=["go-on-report-the-worst", "stop-at-the-first", "stop-by-environment"])
def test_a_piped_scripts_exit_code_says_whether_a_command_failed(address, stub, flags, env,
                                                                 code, bob):
    script = "status zed\nsend alice hello\ndance\nsend bob hello\n"
    result = subprocess.run([sys.executable, CLIENT, "--server", address, *flags], cwd=ROOT,
                            input=script, capture_output=True, text=True, timeout=DEADLINE,
                            env={**os.environ, **env})
    assert result.returncode == code
    statuses = stub.GetClientStatus(pb.ClientStatusRequest()).statuses
    assert statuses.get("bob") == bob
    assert result.stderr.startswith("error: Client zed not found (NOT_FOUND)\n")


@allure.story("Pipes")
def test_a_script_that_ends_inside_a_command_fails_as_a_usage_error(address):
    result = run_client("--server", address, stdin="send alice\n")
    assert result.returncode == client.EXIT_USAGE
    assert result.stderr == "error: the input ended before send's MESSAGE\n"


@allure.story("Pipes")
def test_json_watch_into_head_exits_quietly_with_zero(address, stub):
    hello(stub, "henry")
    watcher = subprocess.Popen([sys.executable, CLIENT, "--server", address, "--json", "watch"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=watcher.stdout, stdout=subprocess.PIPE)
    watcher.stdout.close()  # head holds the only reading end
    first, _ = head.communicate(timeout=DEADLINE)
    assert json.loads(first)["client"]["client_id"] == "henry"
    with allure.step("the next change finds the reader gone: the watch ends, exit 0"):
        hello(stub, "ingrid")
        assert watcher.wait(DEADLINE) == 0
        assert watcher.stderr.read() == b""


@allure.story("Pipes")
def test_a_table_whose_reader_is_gone_ends_quietly_with_zero(address, stub):
    hello(stub, "alice")
    reading, writing = os.pipe()
    os.close(reading)
    try:
        result = subprocess.run([sys.executable, CLIENT, "--server", address, "status"], cwd=ROOT,
                                stdout=writing, stderr=subprocess.PIPE, timeout=DEADLINE)
    finally:
        os.close(writing)
    assert (result.returncode, result.stderr) == (0, b"")


# --- settings: flags, environment twins, the config file, the version ---------------------------


@allure.story("Settings")
@pytest.mark.parametrize("flag, env, file, expected", [
    (None, None, None, "localhost:50051"),
    (None, None, "file:1", "file:1"),
    (None, "env:1", "file:1", "env:1"),
    ("flag:1", "env:1", "file:1", "flag:1"),
    ("flag:1", None, "file:1", "flag:1"),
    (None, "", "file:1", "file:1"),
], ids=["default", "file", "env-over-file", "flag-over-all", "flag-over-file", "empty-env"])
def test_settings_come_from_flag_then_environment_then_file_then_default(home, flag, env, file,
                                                                         expected):
    argv = ["--server", flag] if flag else []
    environ = {} if env is None else {"PRESENCE_SERVER": env}
    config = f'server = "{file}"\n' if file else None
    assert settings(home, argv, environ, config).server == expected


@allure.story("Settings")
def test_the_config_file_sets_server_token_file_tls_files_user_and_lease(home):
    args = settings(home, config='server = "db1:50051"\ntoken-file = "token"\n'
                                 'tls-ca = "/etc/ca.pem"\ntls-cert = "me.pem"\n'
                                 'tls-key = "~/me.key"\nas = "alice"\nlease = 30\n'
                                 'timeout = 2.5\ntls = true\nstop-on-error = true\n')
    folder = home / ".config" / "presence"
    assert (args.server, args.user, args.lease, args.timeout) == ("db1:50051", "alice", 30, 2.5)
    assert args.token_file == str(folder / "token"), "relative to the config file's folder"
    assert (args.tls_ca, args.tls_cert) == ("/etc/ca.pem", str(folder / "me.pem"))
    assert args.tls_key == str(home / "me.key")
    assert args.tls and args.stop_on_error


@allure.story("Settings")
def test_config_named_by_flag_or_environment(home):
    named = home / "elsewhere.toml"
    named.write_text('server = "named:1"\n')
    assert settings(home, ["--config", str(named)]).server == "named:1"
    assert settings(home, environ={"PRESENCE_CONFIG": str(named)}).server == "named:1"


@allure.story("Settings")
@pytest.mark.parametrize("argv, environ, config, message", [
    ([], {}, 'sever = "x"\n', "unknown setting 'sever'"),
    ([], {}, "lease = 0\n", "config.toml: lease: must be a whole number of seconds"),
    ([], {}, 'tls = "yes"\n', "config.toml: tls: must be true or false"),
    ([], {}, "server = [\n", "config.toml: "),
    ([], {"PRESENCE_TIMEOUT": "soon"}, None, "PRESENCE_TIMEOUT: must be a number of seconds"),
    ([], {"PRESENCE_TLS": "maybe"}, None, "PRESENCE_TLS: must be 1 or 0"),
    (["--config", "/nonexistent/presence.toml"], {}, None,
     "config file /nonexistent/presence.toml not found"),
], ids=["unknown-key", "bad-lease", "bad-switch", "bad-toml", "bad-env", "bad-env-switch",
        "missing-named-file"])
def test_a_bad_setting_is_one_usage_line_naming_where_it_came_from(home, capsys, monkeypatch,
                                                                   argv, environ, config,
                                                                   message):
    if config is not None:
        (home / ".config" / "presence").mkdir(parents=True)
        (home / ".config" / "presence" / "config.toml").write_text(config)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert client.main(argv + ["status"]) == client.EXIT_USAGE
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("client.py: error: ") and message in error


@allure.story("Settings")
def test_a_config_file_is_enough_to_reach_the_server(address, tmp_path):
    (tmp_path / ".config" / "presence").mkdir(parents=True)
    (tmp_path / ".config" / "presence" / "config.toml").write_text(f'server = "{address}"\n')
    result = subprocess.run([sys.executable, CLIENT, "--json", "send", "ada", "hello"], cwd=ROOT,
                            capture_output=True, text=True, timeout=DEADLINE,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["client"]["client_id"] == "ada"


@allure.story("Settings")
def test_version_names_the_program_and_its_version(capsys):
    assert client.main(["--version"]) == client.EXIT_OK
    assert capsys.readouterr().out == f"client.py {client.__version__}\n"
    assert client.__version__ == "1.1.0"


@allure.story("Settings")
def test_help_names_the_environment_twin_and_config_key_of_every_flag(capsys):
    parser = client.build_parser()
    flags = [action for action in parser._actions
             if action.option_strings and action.dest not in ("help", "version")]
    assert client.main(["--help"]) == client.EXIT_OK
    text = capsys.readouterr().out
    twins = re.findall(r"\[(PRESENCE_\w+)\]", text)
    assert len(twins) == len(flags) == len(client.OPTIONS) == 15
    for option in client.OPTIONS:
        assert re.search(rf"^  {option.env}\s+{option.flag}$", text, re.MULTILINE), option.env
        if option.in_file:
            assert re.search(rf"\b{option.key}\b", text.split("its keys")[1]), option.key


# --- the live watch ------------------------------------------------------------------------------


@allure.story("Watch")
def test_watch_view_fits_the_height_with_its_notice_counts_note_and_toolbar_on_screen():
    clients = {f"c{n:02}": record(f"c{n:02}", revision=n) for n in range(1, 41)}
    note = client.Text("the server went away; resuming from revision 40")
    toolbar = client.toolbar_text(client.render_toolbar("db1:50051", True, counts(40, 0)))
    text = rendered(client.render_watch(clients, 40, NOW, 80, 20, note, toolbar), 80)
    lines = text.splitlines()
    assert len(lines) < 20, "the whole view fits above the cursor's line"
    assert "showing the 11 most recently changed of 40" in text
    assert lines[-1].startswith(" db1:50051  ● reachable  40 online of 40")
    assert lines[-2] == "the server went away; resuming from revision 40"


@allure.story("Watch")
def test_watch_times_tick_while_nothing_changes_and_the_toolbar_stays(repl,
                                                                      server_50_seconds_behind):
    with connect(server_50_seconds_behind) as channel:
        hello(pb_grpc.ClientServiceStub(channel), "gina")
    child = repl(server_50_seconds_behind)
    child.expect_exact(PROMPT)
    child.send("watch\r")
    child.expect(rf"│ gina\s+│ {ANSI}connected{ANSI}\s+│ default\s+│ 5\d s ago")
    with allure.step("no change arrives, yet the minute turns"):
        child.expect(rf"│ gina\s+│ {ANSI}connected{ANSI}\s+│ default\s+│ 1 min ago")
    with allure.step("the toolbar is drawn under the live table"):
        child.expect(r"● reachable\S*\s+1 online of 1")
    child.sendcontrol("c")
    child.expect_exact("watch stopped")


@allure.story("Watch")
def test_keys_typed_during_watch_neither_show_nor_reach_the_next_prompt(repl, address, stub):
    hello(stub, "gina")
    child = repl(address)
    child.expect_exact(PROMPT)
    child.send("4\r")
    child.expect(rf"│ gina\s+│ {ANSI}connected")
    child.expect_exact("live, Ctrl-C to stop")
    start = len(child.logfile_read.getvalue())
    child.send("qqq zzz")
    goodbye(stub, "gina")
    child.expect(rf"│ gina\s+│ {ANSI}disconnected")
    child.sendcontrol("c")
    child.expect_exact("watch stopped")
    child.expect_exact(PROMPT)
    child.send("status gina\r")
    child.expect(rf"│ gina\s+│ {ANSI}disconnected")
    transcript = child.logfile_read.getvalue()[start:]
    assert "zzz" not in transcript, "typed keys were not echoed into the view"
    assert "unknown command" not in transcript, "nor left over for the prompt"


@allure.story("Watch")
def test_watch_says_why_the_server_ended_it_and_resumes_by_itself(repl, server_processes,
                                                                  sqlite_url):
    server = server_processes("--store", sqlite_url)
    with connect(server.address) as channel:
        hello(pb_grpc.ClientServiceStub(channel), "gina")
    child = repl(server.address)
    child.expect_exact(PROMPT)
    child.send("watch\r")
    child.expect(rf"│ gina\s+│ {ANSI}connected")
    with allure.step("the server stops: the view says so and what it resumes from"):
        assert server.terminate() == 0
        child.expect("the server closed the stream .*; resuming from revision 1")
    with allure.step("a server comes back on the same port: changes show again"):
        port = server.address.rsplit(":", 1)[1]
        again = server_processes("--port", port, "--store", sqlite_url)
        with connect(again.address) as channel:
            goodbye(pb_grpc.ClientServiceStub(channel), "gina")
        child.expect(rf"│ gina\s+│ {ANSI}disconnected")
    child.sendcontrol("c")
    child.expect_exact("watch stopped")
    assert "Traceback" not in child.logfile_read.getvalue()


@allure.story("Watch")
def test_json_watch_resumes_after_the_server_cuts_it_and_says_why_on_stderr(server_processes,
                                                                           sqlite_url):
    server = server_processes("--store", sqlite_url)
    with connect(server.address) as channel:
        hello(pb_grpc.ClientServiceStub(channel), "henry")
    watcher = subprocess.Popen([sys.executable, CLIENT, "--server", server.address, "--json",
                                "watch"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines, errors = Lines(watcher.stdout), Lines(watcher.stderr)
    assert json.loads(lines.next())["kind"] == "snapshot"
    assert server.terminate() == 0
    assert errors.next() == ("watch: the server closed the stream (it may be stopping or "
                             "restarting); resuming from revision 1\n")
    port = server.address.rsplit(":", 1)[1]
    again = server_processes("--port", port, "--store", sqlite_url)
    with connect(again.address) as channel:
        goodbye(pb_grpc.ClientServiceStub(channel), "henry")
    change = json.loads(lines.next())
    assert (change["kind"], change["revision"]) in {("disconnected", 2), ("snapshot", 2)}
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(DEADLINE) == client.EXIT_INTERRUPTED


# --- history and keys ---------------------------------------------------------------------------


@allure.story("History and keys")
def test_only_commands_go_into_the_command_history(presence, consoles, tmp_path):
    history = FileHistory(str(tmp_path / "history"))
    with create_pipe_input() as pipe:
        reader = client.TerminalReader(presence, history, input=pipe, output=DummyOutput())
        try:
            pipe.send_text("1\ralice\rhello\rsend bob\rgoodbye\rexit\r")
            client.run_repl(client.Dispatcher(presence, *consoles, read=reader))
        finally:
            reader.close()
    assert list(FileHistory(str(tmp_path / "history")).load_history_strings()) == [
        "exit", "send bob", "1"]
    assert list(reader.sessions["id"].history.get_strings()) == ["alice"]
    assert list(reader.sessions["message"].history.get_strings()) == ["hello", "goodbye"]


@allure.story("History and keys")
def test_ctrl_d_at_an_argument_prompt_cancels_the_command_not_the_client(presence, consoles,
                                                                         stub):
    with create_pipe_input() as pipe:
        reader = client.TerminalReader(presence, InMemoryHistory(), input=pipe,
                                       output=DummyOutput())
        try:
            pipe.send_text("1\r\x04send alice\r\x04send bob hello\rexit\r")
            dispatcher = client.Dispatcher(presence, *consoles, read=reader)
            assert client.run_repl(dispatcher) == client.EXIT_OK
        finally:
            reader.close()
    assert text_of(consoles[0]).count("send cancelled") == 2
    assert "Client bob marked as connected." in text_of(consoles[0])
    assert dispatcher.stopped, "exit, not Ctrl-D, ended it"
    assert stub.GetClientStatus(pb.ClientStatusRequest()).statuses == {"bob": "connected"}


@allure.story("History and keys")
def test_ctrl_d_at_an_argument_prompt_in_a_terminal_returns_to_the_menu(repl, address):
    child = repl(address)
    child.expect_exact(PROMPT)
    child.send("send\r")
    child.expect_exact("client id:")
    child.sendcontrol("d")
    child.expect_exact("send cancelled")
    child.expect_exact(PROMPT)
    child.send("send alice hello\r")
    child.expect_exact("Client alice marked as connected.")
    assert child.isalive()


@allure.story("History and keys")
def test_history_suggests_the_rest_of_a_command_as_fish_does(repl, address, tmp_path):
    (tmp_path / ".presence_history").write_text("\n# earlier\n+send alice hello\n")
    child = repl(address)
    child.expect_exact(PROMPT)
    child.send("se")
    child.expect_exact("nd alice hello")  # the suggestion, drawn after the cursor
    child.send("\x1b[C\r")  # right arrow takes it
    child.expect_exact("Client alice marked as connected.")


@allure.story("Completion")
def test_id_completion_follows_the_watch_stream(repl, address, stub):
    hello(stub, "alice")
    child = repl(address, "--log-level", "DEBUG")
    child.expect_exact(PROMPT)
    with allure.step("every id is cached now; a new one arrives by the watch stream"):
        complete(child, "status ", "status alice")
        child.sendcontrol("c")
        hello(stub, "bob")
        child.expect_exact("completion knows bob from the watch stream")
    with allure.step("it completes at once, before the cached page goes stale"):
        complete(child, "status b", "status bob")


@allure.story("Settings")
def test_readme_names_every_flag_its_twin_and_its_config_key():
    readme = (ROOT / "README.txt").read_text()
    section = readme[readme.index("The client\n-------"):readme.index("Performance\n-------")]
    rows = section[section.index("\n  --server"):].split("\n\n")[0]
    entries = {entry.split()[0]: entry.split() for entry in rows.split("\n  --") if entry}
    for option in client.OPTIONS:
        entry = entries.get(option.key) or entries.get(option.flag)
        assert entry, f"README's client section has no row for {option.flag}"
        assert entry[-2].startswith(option.env), (option.flag, entry[-2])
        assert entry[-1] == (option.key if option.in_file else "(none)"), (option.flag, entry[-1])


# --- errors that say what to do -------------------------------------------------------------


@allure.story("Errors that say what to do")
def test_a_tls_mismatch_is_one_line_naming_the_cause_and_the_flag(server_processes, certificates,
                                                                  address):
    tls_server = server_processes("--store", "memory://", *tls_flags(
        certificates, ("--tls-cert", "server.pem"), ("--tls-key", "server.key")))
    tls_server.wait_for_log("TLS, no access token")
    trusted = tls_flags(certificates, ("--tls-ca", "ca.pem"))
    cases = [
        ("a plaintext client, a TLS server", tls_server.address, [],
         "it closed the connection, as a TLS server does to a plaintext client; add --tls-ca "
         "FILE (or --tls to trust the system's CAs)"),
        ("a TLS client, a plaintext server", address, trusted,
         "it does not speak TLS; drop --tls and --tls-ca (or start the server with --tls-cert "
         "and --tls-key)"),
        ("a TLS client that does not trust the server's CA", tls_server.address, ["--tls"],
         "its TLS certificate is not signed by a CA this client trusts; name that CA with "
         "--tls-ca FILE"),
    ]
    for case, server, flags, reason in cases:
        with allure.step(case):
            result = run_client("--server", server, "--timeout", "3", *flags, "status")
            assert result.returncode == client.EXIT_UNREACHABLE
            assert result.stderr == f"error: server {server} is unreachable: {reason}\n"


@allure.story("Errors that say what to do")
def test_a_tls_server_that_wants_more_says_so_in_one_line(server_processes, certificates):
    serving = tls_flags(certificates, ("--tls-cert", "server.pem"), ("--tls-key", "server.key"))
    trusted = tls_flags(certificates, ("--tls-ca", "ca.pem"))
    with allure.step("a server that requires a client certificate, a client without one"):
        mutual = server_processes("--store", "memory://", *serving,
                                  *tls_flags(certificates, ("--tls-client-ca", "ca.pem")))
        result = run_client("--server", mutual.address, "--timeout", "3", *trusted, "status")
        assert result.stderr == (
            f"error: server {mutual.address} is unreachable: it closed the connection during "
            "the TLS handshake, as a server that requires a client certificate does; give one "
            "with --tls-cert FILE and --tls-key FILE\n")
    with allure.step("a certificate for localhost and 127.0.0.1, reached as 127.0.0.2"):
        every = server_processes("--store", "memory://", *serving, "--host", "0.0.0.0")
        elsewhere = "127.0.0.2:" + every.address.rpartition(":")[2]
        result = run_client("--server", elsewhere, "--timeout", "3", *trusted, "status")
        assert result.stderr == (
            f"error: server {elsewhere} is unreachable: its TLS certificate is not for this "
            "host name; give --server a name the certificate lists\n")
        assert result.returncode == client.EXIT_UNREACHABLE


@allure.story("Errors that say what to do")
def test_a_name_that_does_not_resolve_is_one_line_naming_it_once():
    result = run_client("--server", "nosuch.invalid:50051", "--timeout", "3", "status")
    assert result.returncode == client.EXIT_UNREACHABLE
    assert result.stderr == ("error: server nosuch.invalid:50051 is unreachable: the name "
                             "nosuch.invalid does not resolve; check the host in --server "
                             "HOST:PORT\n")


# --- small things that read as unfinished -----------------------------------------------------


@allure.story("Pipes")
def test_a_repeated_goodbye_says_only_that_nothing_changed(address):
    result = run_client("--server", address,
                        stdin="send bob hello\nsend bob goodbye\nsend bob goodbye\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Client bob marked as disconnected.") == 1, result.stdout
    assert result.stdout.count("no change: bob was already disconnected") == 1, result.stdout


@allure.story("REPL")
def test_an_empty_id_at_send_is_refused_before_the_message_is_asked_for(repl, address):
    refusal = "error: send needs the client's id, and it was empty — usage: send ID MESSAGE"
    with allure.step("in a terminal: 1, then Enter at the id prompt"):
        child = repl(address)
        child.expect_exact(PROMPT)
        child.send("1\r")
        child.expect_exact("client id:")
        child.send("\r")
        child.expect_exact(refusal)
        child.expect_exact(PROMPT)
        assert "message (hello/goodbye)" not in child.logfile_read.getvalue()
    with allure.step("through a pipe: send, then an empty line"):
        result = run_client("--server", address, stdin="send\n\n")
        assert (result.returncode, result.stderr) == (client.EXIT_USAGE, refusal + "\n")


@allure.story("Pipes")
def test_an_apostrophe_in_an_id_needs_no_quoting(address):
    script = "send o'brien hello\nstatus o'brien\nstatus \"o'brien\"\nsend \"d'arcy jr\" hello\n"
    result = run_client("--server", address, "--json", stdin=script)
    assert result.returncode == 0, result.stderr
    ids = [json.loads(line)["client"]["client_id"] for line in result.stdout.splitlines()]
    assert ids == ["o'brien", "o'brien", "o'brien", "d'arcy jr"]


@allure.story("Pipes")
def test_piped_answers_have_no_trailing_spaces(address):
    result = run_client("--server", address, stdin="help\nsend alice hello\nlist\n")
    assert result.returncode == 0, result.stderr
    assert "send ID MESSAGE" in result.stdout
    padded = [line for line in result.stdout.splitlines() if line.endswith(" ")]
    assert padded == [], "rich pads the menu's grid to its width"


# --- several replicas ------------------------------------------------------------------------


@allure.story("Replicas")
@pytest.mark.parametrize("value", ["a:1,,b:2", "a:1,", ","])
def test_an_empty_address_among_the_replicas_is_a_usage_error(capsys, value):
    assert client.main(["--server", value, "status"]) == client.EXIT_USAGE
    assert "--server: must be HOST:PORT or HOST:PORT,HOST:PORT" in capsys.readouterr().err


@allure.story("Replicas")
def test_replicas_come_from_the_flag_the_environment_or_the_config_file(home):
    assert settings(home, ["--server", "a:1, b:2"]).server == "a:1,b:2"
    assert settings(home, environ={"PRESENCE_SERVER": "a:1,b:2,c:3"}).server == "a:1,b:2,c:3"
    assert settings(home, config='server = "a:1 ,b:2"').server == "a:1,b:2"


@allure.story("Replicas")
def test_calls_spread_over_the_replicas_and_skip_one_that_is_down(server_processes):
    # Two servers with stores of their own show where each call went; the second is named by
    # host name, the way a user writes it.
    first, second = (server_processes("--store", "memory://") for _ in range(2))
    down = free_address()
    servers = f"{first.address},localhost:{second.address.rpartition(':')[2]},{down}"
    script = "".join(f"send user{n} hello\n" for n in range(6))
    result = run_client("--server", servers, "--json", stdin=script)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6
    held = []
    for server in (first, second):
        with connect(server.address) as channel:
            held.append(pb_grpc.ClientServiceStub(channel).CountClients(
                pb.CountClientsRequest(), timeout=DEADLINE).total)
    assert sum(held) == 6 and min(held) >= 1, f"every call went to one replica: {held}"


@allure.story("Replicas")
def test_a_one_shot_call_gets_through_wherever_the_dead_replica_is_listed(server_processes):
    address, down = server_processes("--store", "memory://").address, free_address()
    for servers in (f"{down},{address}", f"{address},{down}"):
        result = run_client("--server", servers, "send", "alice", "hello")
        assert (result.returncode, result.stderr) == (0, ""), servers
        watcher = subprocess.Popen([sys.executable, CLIENT, "--server", servers, "--json",
                                    "watch"], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert json.loads(Lines(watcher.stdout).next())["kind"] == "snapshot", servers
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(DEADLINE) == client.EXIT_INTERRUPTED


@allure.story("Replicas")
def test_every_replica_down_is_one_line_naming_them_all():
    servers = f"{free_address()},{free_address()}"
    result = run_client("--server", servers, "status")
    assert result.returncode == client.EXIT_UNREACHABLE
    assert result.stderr == f"error: servers {servers} are unreachable: connection refused\n"


@allure.story("Replicas")
def test_a_killed_replica_leaves_the_repl_and_a_json_watch_going_on_the_others(
        repl, server_processes, redis_url):
    replicas = [server_processes("--store", redis_url, "--metrics-port", "0") for _ in range(3)]
    servers = ",".join(replica.address for replica in replicas)
    with connect(replicas[0].address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        for n in range(3):
            hello(stub, f"before{n}")
    with allure.step("a --json watch on three replicas: the snapshot, from one of them"):
        watcher = subprocess.Popen([sys.executable, CLIENT, "--server", servers, "--json",
                                    "watch"], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        lines, errors = Lines(watcher.stdout), Lines(watcher.stderr)
        snapshot = [json.loads(lines.next()) for _ in range(3)]
        assert {entry["kind"] for entry in snapshot} == {"snapshot"}
        assert {entry["revision"] for entry in snapshot} == {3}
        watched = the_one_watched(replicas)
    with allure.step("a REPL on the same three: its toolbar counts them"):
        child = repl(servers, answer_cpr=True)
        assert toolbar_says(child, ["● 3 of 3 replicas reachable"]) == 0
    with allure.step("the watch's replica is killed (kill -9)"):
        watched.kill()
        assert re.fullmatch(r"watch: the server went away \(.*\); resuming from revision 3\n",
                            errors.next())
    with allure.step("the REPL answers every command until its toolbar says two are left"):
        sent, deadline = 0, time.monotonic() + DEADLINE
        while True:
            child.send(f"send after{sent} hello\r")
            child.expect_exact(f"Client after{sent} marked as connected.")
            sent += 1
            left = ["● 2 of 3 replicas reachable", "● 3 of 3 replicas reachable"]
            if toolbar_says(child, left) == 0:
                break
            assert time.monotonic() < deadline, "the toolbar never counted the killed replica"
    with allure.step("the watch goes on from another replica: the next revisions, each once"):
        changes = [json.loads(lines.next()) for _ in range(sent)]
        assert [(change["kind"], change["revision"], change["client"]["client_id"])
                for change in changes] == [("connected", 4 + n, f"after{n}")
                                           for n in range(sent)]
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(DEADLINE) == client.EXIT_INTERRUPTED
    child.send("exit\r")
    child.expect(pexpect.EOF)
    assert "Traceback" not in child.logfile_read.getvalue()


@allure.story("Replicas")
def test_an_attached_user_moves_to_another_replica_when_its_own_is_killed(server_processes,
                                                                          redis_url):
    replicas = [server_processes("--store", redis_url) for _ in range(2)]
    servers = ",".join(replica.address for replica in replicas)
    holder = subprocess.Popen(
        [sys.executable, CLIENT, "--server", servers, "--json", "--as", "mia", "attach"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(holder.stdout)
    with allure.step("mia attaches to one of two replicas"):
        first = json.loads(lines.next())
        assert first["state"] == "attached"
        (held_by,) = [replica for replica in replicas if replica.address == first["server"]]
        (other,) = [replica for replica in replicas if replica is not held_by]
        with connect(other.address) as channel:
            (before,) = pb_grpc.ClientServiceStub(channel).GetClientStatus(
                pb.ClientStatusRequest(client_id="mia")).clients
    with allure.step("its replica is killed (kill -9): mia attaches to the other by itself"):
        held_by.kill()
        notice = json.loads(lines.next())
        while notice["state"] != "attached":
            notice = json.loads(lines.next())
        assert notice["server"] == other.address
    with allure.step("and was never offline: the session moved without a change"):
        with connect(other.address) as channel:
            (after,) = pb_grpc.ClientServiceStub(channel).GetClientStatus(
                pb.ClientStatusRequest(client_id="mia")).clients
        assert (after.status, after.revision) == (pb.STATUS_CONNECTED, before.revision)
        assert [s.kind for s in after.sessions] == [pb.SESSION_KIND_ATTACHED]
    holder.terminate()
    assert holder.wait(DEADLINE) == client.EXIT_OK
    assert "Traceback" not in holder.stderr.read()
