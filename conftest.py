"""Shared fixtures: servers on port 0 (in-process and as real subprocesses), channels, stubs."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

import server as presence
from generated import connection_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent
DEADLINE = 15.0
LISTENING = re.compile(r"listening on (\S+):(\d+)")


def pytest_collection_modifyitems(items):
    """Give every test a hard limit, so a hang fails one test instead of the run."""
    for item in items:
        item.add_marker(pytest.mark.timeout(120))


def connect(address):
    """A channel to address, ready to use, or a failure after the deadline."""
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=DEADLINE)
    return channel


class ServerProcess:
    """The real `python server.py` in a subprocess, its log read as it comes."""

    def __init__(self, *args, env=None):
        self.args = [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0",
                     *args]
        self.log = []
        self._eof = False
        self._lines = threading.Condition()
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        match = self.wait_for_log(LISTENING)
        self.address = f"{match.group(1)}:{match.group(2)}"

    def _read_log(self):
        for line in self.process.stderr:
            with self._lines:
                self.log.append(line.rstrip("\n"))
                self._lines.notify_all()
        with self._lines:
            self._eof = True
            self._lines.notify_all()

    def wait_for_log(self, pattern, timeout=DEADLINE):
        """The first match of pattern in the log, waiting for it up to timeout."""
        pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for line in self.log:
                    if match := pattern.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(f"no log line matching {pattern.pattern!r}:\n"
                                         + "\n".join(self.log))
                self._lines.wait(min(remaining, 0.5))

    def kill(self):
        """kill -9: no chance to flush anything."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=DEADLINE)

    def terminate(self, signum=signal.SIGTERM):
        """A polite stop; returns the exit code."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=DEADLINE)

    def stop(self):
        if self.process.poll() is None:
            self.kill()


@pytest.fixture
def memory_server():
    """A started in-process server on a free port with the memory store."""
    server = presence.create_server("127.0.0.1:0", presence.MemoryStore())
    server.start()
    yield server
    server.stop(0)


@pytest.fixture
def address(memory_server):
    return f"127.0.0.1:{memory_server.port}"


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


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'connections.db'}"
