"""client.py as people run it: in a pseudo-terminal (pexpect), through pipes, one-shot."""

import fcntl
import io
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import allure
import pexpect
import ptyprocess
import pytest

from generated import connection_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CLIENT = str(ROOT / "client.py")
DEADLINE = 15
PROMPT = "presence>"  # prompt_toolkit draws the trailing space as a cursor move
ANSI = r"(?:\x1b\[[0-9;]*m)*"


def free_address():
    """An address nothing listens on: a port bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def run_client(*args, stdin=None):
    """Run client.py to the end; its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, CLIENT, *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=DEADLINE)


class TerminalSpawn(pexpect.spawn):
    """pexpect.spawn whose child starts through subprocess (vfork, exec), not Python's fork().

    pexpect forks this very process, and a Python-level fork() while gRPC threads are busy
    here (the in-process server, the stub's channel) can crash the child before it reaches
    exec. subprocess runs no Python in the child, so it is safe. The child gets the
    pseudo-terminal as stdin, stdout and stderr in a session of its own; prompt_toolkit reads
    Ctrl-C and Ctrl-D as keys in raw mode, so it needs no controlling terminal.
    """

    def _spawnpty(self, args, env=None, cwd=None, dimensions=(24, 80), **ignored):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *dimensions, 0, 0))
        self.popen = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                      env=env, start_new_session=True)
        os.close(slave)
        return ptyprocess.PtyProcess(self.popen.pid, master)


def hello(stub, client_id):
    stub.SendMessage(pb.MessageRequest(client_id=client_id, message="hello"))


@pytest.fixture
def repl(tmp_path):
    """Start `client.py --server ADDRESS` in a 40x160 pseudo-terminal; all are closed after."""
    children = []

    def spawn(address, answer_cpr=False):
        env = {**os.environ, "TERM": "xterm-256color", "HOME": str(tmp_path)}
        if not answer_cpr:
            env["PROMPT_TOOLKIT_NO_CPR"] = "1"
        child = TerminalSpawn(sys.executable, [CLIENT, "--server", address], cwd=ROOT, env=env,
                              dimensions=(40, 160), encoding="utf-8", timeout=DEADLINE)
        child.logfile_read = io.StringIO()  # the whole transcript, for "no traceback" checks
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close(force=True)


def complete(child, typed, completed):
    """Type `typed`, press Tab and wait until the rest of `completed` is drawn."""
    child.send(typed)
    child.expect_exact(typed.split()[-1])
    child.send("\t")
    child.expect_exact(completed[len(typed):])


# --- the REPL in a pseudo-terminal -----------------------------------------------------------


@allure.feature("Client")
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


@allure.feature("Client")
@allure.story("Completion")
def test_tab_completes_the_command_word(repl, address, stub):
    hello(stub, "alice")
    child = repl(address)
    child.expect_exact(PROMPT)
    complete(child, "sta", "status")
    child.send("\r")
    assert child.expect_exact(["1 total", "unknown command"]) == 0


@allure.feature("Client")
@allure.story("Completion")
def test_tab_completes_a_client_id_from_the_server_and_shows_its_table(repl, address, stub):
    hello(stub, "alice-wonderland")
    child = repl(address)
    child.expect_exact(PROMPT)
    complete(child, "status alice-w", "status alice-wonderland")
    child.send("\r")
    index = child.expect([rf"│ alice-wonderland\s+│ {ANSI}connected", "not found"])
    assert index == 0, "the completed id was sent and its status rendered"


@allure.feature("Client")
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


@allure.feature("Client")
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


@allure.feature("Client")
@allure.story("REPL")
def test_toolbar_shows_address_reachability_and_online_count(repl, address, stub):
    hello(stub, "alice")
    child = repl(address, answer_cpr=True)
    child.expect_exact("\x1b[6n")  # the toolbar is drawn once the terminal says where the cursor is
    child.send("\x1b[12;1R")
    child.expect(rf"{re.escape(address)}\s+{ANSI}● reachable{ANSI}\s+1 online of 1")


@allure.feature("Client")
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


@allure.feature("Client")
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


@allure.feature("Client")
@allure.story("Pipes")
def test_piped_errors_are_one_line_each_and_the_script_goes_on(address):
    result = run_client("--server", address, stdin="status zed\nsend bob hello\nstatus\n")
    assert result.returncode == 0, "the end of input ends the session cleanly"
    assert result.stderr == "error: Client zed not found (NOT_FOUND)\n"
    assert "Client bob marked as connected." in result.stdout
    assert "1 connected · 0 disconnected · 1 total" in result.stdout


@allure.feature("Client")
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


@allure.feature("Client")
@allure.story("One-shot commands")
def test_one_shot_send_and_status_print_tables(address):
    sent = run_client("--server", address, "send", "alice", "hello")
    assert sent.returncode == 0 and "Client alice marked as connected." in sent.stdout
    one = run_client("--server", address, "status", "alice")
    assert one.returncode == 0 and re.search(r"│ alice\s+│ connected", one.stdout)
    every = run_client("--server", address, "status")
    assert every.returncode == 0 and "1 connected · 0 disconnected · 1 total" in every.stdout


@allure.feature("Client")
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


@allure.feature("Client")
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
def test_exit_code_says_what_went_wrong(address, args, code, stderr):
    result = run_client("--server", address, *args)
    assert result.returncode == code
    assert re.fullmatch(stderr, result.stderr), result.stderr
    assert result.stdout == ""


@allure.feature("Client")
@allure.story("Unreachable server")
def test_unreachable_server_exits_three_with_one_line():
    address = free_address()
    result = run_client("--server", address, "--timeout", "3", "send", "alice", "hello")
    assert result.returncode == 3
    assert result.stderr == f"error: server {address} is unreachable: connection refused\n"
