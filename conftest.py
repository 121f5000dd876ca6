"""Shared fixtures: servers on port 0 (in-process and as real subprocesses), channels, stubs."""

import fcntl
import io
import os
import platform
import queue
import re
import selectors
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from importlib import metadata
from pathlib import Path

import allure
import grpc
import pexpect
import ptyprocess
import pytest

import server as presence
from bench.processes import LISTENING, ServerProcess  # noqa: F401 (tests import both from here)
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent
DEADLINE = 15.0
CLIENT = str(ROOT / "client.py")
PROMPT = "presence>"  # prompt_toolkit draws the trailing space as a cursor move
ANSI = r"(?:\x1b\[[0-9;]*m)*"


def pytest_collection_modifyitems(items):
    """Give every test a hard limit, so a hang fails one test instead of the run, and a title in
    words for the Allure report."""
    for item in items:
        item.add_marker(pytest.mark.timeout(120))
        if isinstance(item, pytest.Function) and \
                not hasattr(item.function, "__allure_display_name__"):
            item.function.__allure_display_name__ = report_title(item)


def report_title(item):
    """A test's name in words (test_goodbye_ends_it: "Goodbye ends it"), its case after it."""
    words = item.originalname.removeprefix("test_").replace("_", " ")
    title = words[:1].upper() + words[1:]
    return title + " [{param_id}]" if hasattr(item, "callspec") else title


@pytest.fixture(autouse=True)
def readable_parameters(request):
    """Bytes parameters shown in the Allure report by their value: Allure shows every bytes
    value as "<class 'bytes'>", and then takes the cases for retries of one test."""
    callspec = getattr(request.node, "callspec", None)
    for name, value in callspec.params.items() if callspec else ():
        if isinstance(value, (bytes, bytearray)):
            allure.dynamic.parameter(name, repr(bytes(value)))


TESTS_RUN = []  # node ids, for the Allure report's check that it shows every test that ran


def pytest_runtest_logfinish(nodeid, location):
    """One more test ran, whatever its outcome."""
    TESTS_RUN.append(nodeid)


def pytest_sessionfinish(session):
    """The Allure report's environment panel: the versions, the stores the tests use, and how
    many tests pytest ran (make report checks the report shows as many)."""
    folder = session.config.getoption("allure_report_dir", None)
    if not folder or session.config.option.collectonly:
        return
    packages = ("grpcio", "protobuf", "prompt_toolkit", "rich", "pytest", "allure-pytest")
    facts = {"python": platform.python_version(), "os": platform.platform(terse=True),
             **{package: metadata.version(package) for package in packages},
             "server": presence.__version__,
             "stores": "memory:// (most tests), sqlite:/// on temporary files (durability, "
                       "restart, the default store)",
             "tests.run": len(TESTS_RUN)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "environment.properties").write_text(
        "".join(f"{key} = {value}\n" for key, value in facts.items()))


def connect(address):
    """A channel to address, ready to use, or a failure after the deadline."""
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=DEADLINE)
    return channel


STORES = ("memory", "sqlite", "redis")


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory):
    """One redis-server for every test that runs on each store; each store has keys of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    yield server
    server.stop()


@pytest.fixture(params=STORES)
def new_store(request, tmp_path):
    """`new_store()` opens another empty store of the kind under test: the tests that use it
    run on memory://, on a SQLite file and on a real Redis, the same tests on each."""
    opened = []

    def open_one():
        if request.param == "memory":
            store = presence.MemoryStore()
        elif request.param == "sqlite":
            store = presence.SqliteStore(str(tmp_path / f"store{len(opened)}.db"))
        else:
            redis = request.getfixturevalue("shared_redis")
            store = presence.RedisStore(redis.url, prefix=f"{request.node.nodeid}:{len(opened)}")
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def make_server(new_store):
    """Start in-process servers with `make_server(store, **create_server options)` on free
    ports (a new store of the kind under test when none is given); all stopped afterwards."""
    started = []

    def make(store=None, **options):
        server = presence.create_server("127.0.0.1:0", store or new_store(), **options)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(0)


@pytest.fixture
def presence_server(make_server):
    """A started in-process server on a free port, on each store in turn."""
    return make_server()


@pytest.fixture
def address(presence_server):
    return f"127.0.0.1:{presence_server.port}"


@pytest.fixture
def channel(address):
    channel = connect(address)
    yield channel
    channel.close()


@pytest.fixture
def stub(channel):
    return pb_grpc.ClientServiceStub(channel)


@pytest.fixture
def server_processes():
    """Start real server processes with `server_processes(*flags)`; all are killed afterwards."""
    started = []

    def start(*args, env=None):
        started.append(ServerProcess(*args, env=env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A test CA and a server and a client certificate it signed, made with openssl now."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True,
                       timeout=DEADLINE)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=presence test CA")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return folder


def tls_flags(folder, *names):
    """Command-line flags naming files of the certificates fixture."""
    return [part for flag, name in names for part in (flag, str(folder / name))]


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'connections.db'}"


@pytest.fixture
def clock():
    return ManualClock()


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def hello(stub, client_id, session_id="", lease=0):
    """Say hello for client_id (a session and a lease when given); the server's answer."""
    return stub.SendMessage(pb.MessageRequest(client_id=client_id, message="hello",
                                              session_id=session_id, lease_seconds=lease))


def goodbye(stub, client_id, session_id=""):
    """Say goodbye for client_id (one session, or all when none is named); the answer."""
    return stub.SendMessage(pb.MessageRequest(client_id=client_id, message="goodbye",
                                              session_id=session_id))


class StreamReader:
    """A server stream read by a background thread, so the test waits with a deadline for
    each message, None at a clean end, or the RpcError it ended with."""

    kind = "stream"  # what the test waits for, in its failure message

    def __init__(self, call, read=True):
        self.call = call
        self._messages = queue.Queue()
        self._reading = threading.Event()
        if read:
            self._reading.set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        self._reading.wait()
        try:
            for message in self.call:
                self._messages.put(message)
        except grpc.RpcError as error:
            self._messages.put(error)
        else:
            self._messages.put(None)

    def resume_reading(self):
        self._reading.set()

    def next(self, within=DEADLINE):
        """The next message; None when the stream ended cleanly; an RpcError when it failed."""
        try:
            return self._messages.get(timeout=max(within, 0))
        except queue.Empty:
            raise AssertionError(f"no {self.kind} message within {within:.2f} s") from None


class Watch(StreamReader):
    """A Watch stream, read as it comes."""

    kind = "watch"

    def __init__(self, stub, since_revision=0, read=True):
        super().__init__(stub.Watch(pb.WatchRequest(since_revision=since_revision)), read)

    def snapshot(self):
        """Read a whole snapshot: the clients by id and the revision."""
        clients, first = {}, self.next()
        message = first
        while True:
            clients.update({client.client_id: client for client in message.snapshot})
            if message.snapshot_complete:
                return clients, message.revision, first.resync
            message = self.next()

    def events(self, count, within=DEADLINE):
        """The next count events, in the order they came, all within `within` seconds."""
        deadline = time.monotonic() + within
        events = []
        while len(events) < count:
            message = self.next(deadline - time.monotonic())
            assert isinstance(message, pb.WatchResponse), f"stream ended early: {message}"
            events += message.events
        assert len(events) == count
        return events


# --- the client as people run it ------------------------------------------------------


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
    pseudo-terminal as stdin, stdout and stderr, in a session of its own whose controlling
    terminal it is (`setsid --ctty`): Ctrl-C outside prompt_toolkit's raw mode is a SIGINT,
    as in any terminal.
    """

    def _spawnpty(self, args, env=None, cwd=None, dimensions=(24, 80), **ignored):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *dimensions, 0, 0))
        self.popen = subprocess.Popen(["setsid", "--ctty", *args], stdin=slave, stdout=slave,
                                      stderr=slave, cwd=cwd, env=env)
        os.close(slave)
        return ptyprocess.PtyProcess(self.popen.pid, master)


@pytest.fixture
def repl(tmp_path):
    """Start `client.py --server ADDRESS` in a pseudo-terminal (40 rows of 160 columns unless
    told), HOME a fresh folder; all are closed after."""
    children = []

    def spawn(address, *flags, answer_cpr=False, dimensions=(40, 160), env=None):
        env = {**os.environ, "TERM": "xterm-256color", "HOME": str(tmp_path), **(env or {})}
        if not answer_cpr:
            env["PROMPT_TOOLKIT_NO_CPR"] = "1"
        child = TerminalSpawn(sys.executable, [CLIENT, "--server", address, *flags], cwd=ROOT,
                              env=env, dimensions=dimensions, encoding="utf-8",
                              timeout=DEADLINE)
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


class Lines:
    """A text stream read line by line in a background thread, so a test waits with a deadline."""

    def __init__(self, stream):
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self):
        """The next line, or None at the end of the stream."""
        try:
            return self._lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError("no line within the deadline") from None


# --- a real Redis, and a TCP proxy that can fail the way networks do ----------------------

REDIS_READY = re.compile(r"Ready to accept connections")


class RedisServer:
    """A real redis-server on a free loopback port, its append-only file in a folder of its own,
    so a test can stop it and start it again with what it had saved."""

    def __init__(self, folder, *flags):
        """Start redis-server in folder, with flags beside the usual ones."""
        self.folder = folder
        self.flags = flags
        self.port = int(free_address().rpartition(":")[2])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self):
        """Start redis-server and return once it answers PING."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
             *self.flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log, seen = Lines(self.process.stdout), ""
        while not REDIS_READY.search(seen):
            line = log.next()
            if line is None:
                raise AssertionError(f"redis-server ended before it was ready:\n{seen}")
            seen += line
        self.ping()

    def ping(self):
        """Ask Redis for PONG over a plain socket (one that wants a password answers NOAUTH)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
            assert answer == b"+PONG\r\n" or answer.startswith(b"-NOAUTH"), answer

    def stop(self):
        """A clean shutdown: Redis writes out its append-only file and exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=DEADLINE)

    def kill(self):
        """kill -9: Redis keeps only what reached its append-only file."""
        self.process.kill()
        self.process.wait(timeout=DEADLINE)


@pytest.fixture
def redis_server(tmp_path):
    """A started redis-server of this test's own; stopped afterwards."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The URL a RedisStore opens to reach this test's Redis."""
    return redis_server.url


class TcpProxy:
    """Forwards a loopback port to a target, in one thread; the test can make it go silent
    without closing anything (`pause`, as a network that drops packets), let requests through
    but hold the answers (`hold_answers`, as a network that loses them), carry on (`resume`),
    or close every connection it holds (`cut`)."""

    def __init__(self, target_port):
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._peers = {}  # each forwarded socket -> the one on its other side
        self._commands = queue.Queue()
        self._paused = False
        self._holding = False  # the target's answers are not read meanwhile
        self._upstreams = set()  # the sockets to the target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pause(self):
        """Stop forwarding and accepting; connections stay open and hear nothing."""
        self._command("pause")

    def hold_answers(self):
        """Forward what clients send, but none of what the target answers."""
        self._command("hold")

    def resume(self):
        """Forward again, as a network that heals: what waited in the buffers goes through."""
        self._command("resume")

    def cut(self):
        """Close every forwarded connection (new ones are still forwarded)."""
        self._command("cut")

    def close(self):
        """Close every connection and the listening port, and end the thread."""
        self._command("close")
        self._thread.join(timeout=DEADLINE)
        for sock in (self._wake_read, self._wake_write):  # not by the thread: a paused one
            sock.close()  # may obey before the wake-up byte is even sent

    def _command(self, name):
        """Have the proxy's thread carry out a command, and wait until it has."""
        done = threading.Event()
        self._commands.put((name, done))
        self._wake_write.send(b"!")
        assert done.wait(DEADLINE), f"the proxy did not {name} in time"

    def _run(self):
        """Forward whatever either side sends, and obey commands between reads."""
        while True:
            if self._paused:  # hear nothing from either side until told otherwise
                if not self._obey(*self._commands.get()):
                    return
                continue
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_read:
                    self._wake_read.recv(4096)
                    while not self._commands.empty():
                        if not self._obey(*self._commands.get()):
                            return
                    break  # the sockets may have changed: select again
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._forward(key.fileobj)

    def _obey(self, name, done):
        """Carry out one command; False when the proxy is to end."""
        self._paused = {"pause": True, "resume": False}.get(name, self._paused)
        holding = {"hold": True, "resume": False}.get(name, self._holding)
        if holding != self._holding:
            for upstream in self._upstreams:
                if holding:
                    self._selector.unregister(upstream)
                else:
                    self._listen(upstream)
            self._holding = holding
        if name in ("cut", "close"):
            for sock in list(self._peers):
                self._drop(sock)
        if name == "close":
            self._listener.close()
            self._selector.close()
        done.set()
        return name != "close"

    def _accept(self):
        """Take a new connection and open its twin to the target (closed when that fails)."""
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self._target, timeout=DEADLINE)
        except OSError:
            client.close()
            return
        self._peers[client], self._peers[upstream] = upstream, client
        self._upstreams.add(upstream)
        self._listen(client)
        if not self._holding:
            self._listen(upstream)

    def _listen(self, sock):
        self._selector.register(sock, selectors.EVENT_READ)

    def _forward(self, sock):
        """Pass on what sock received; close both sides when it closed."""
        if sock not in self._peers:  # closed with its other side earlier in this round
            return
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock):
        """Close a forwarded connection, both sides, unless it is closed already."""
        if sock not in self._peers:
            return
        other = self._peers.pop(sock)
        del self._peers[other]
        for one in (sock, other):
            if one in self._selector.get_map():  # a held answer's socket is not
                self._selector.unregister(one)
            self._upstreams.discard(one)
            one.close()


@pytest.fixture
def tcp_proxy():
    """Start proxies with `tcp_proxy(target_port)`; all are closed afterwards."""
    started = []

    def start(target_port):
        started.append(TcpProxy(target_port))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()
