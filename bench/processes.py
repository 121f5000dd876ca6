"""The processes a benchmark or a test starts: servers, and groups of load processes.

Neither is ever left behind: a server started with `detach` is ended by Linux when its parent
dies, and load processes are terminated when their group is closed.
"""

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
SERVER_PROGRAM = (str(ROOT / "server.py"),)
LISTENING = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
LOG_TIMEOUT = 15.0  # how long a caller waits for a log line (listening, say) unless told
PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen (a server did not start, a load died)."""


def die_with_parent():
    """Ask Linux to SIGTERM this process when its parent dies, so no process is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def raise_fd_limit():
    """Soft fd limit up to the hard one: thousands of channels need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ServerProcess:
    """A server (`python server.py` unless another program is given) in a subprocess on a free
    loopback port, its log read as it comes so the pipe never fills.

    prefix is a command to run it under (prlimit, say). keep bounds the log lines kept (None:
    all). grace is how long stop() lets SIGTERM work before SIGKILL (0: SIGKILL at once).
    detach puts it in a session of its own that a Ctrl-C in the terminal does not reach, and
    has Linux end it when its parent dies.
    """

    engine_pids = ()  # no store engine (as Redis) in processes of its own beside it

    def __init__(self, *args, env=None, prefix=(), program=SERVER_PROGRAM, name="server",
                 keep=None, grace=0.0, detach=False, timeout=LOG_TIMEOUT):
        self.name = name
        self.grace = grace
        self.args = [*prefix, sys.executable, *program, "--host", "127.0.0.1", "--port", "0",
                     *args]
        self.log = deque(maxlen=keep)
        self.listening_at = None
        self._eof = False
        self._lines = threading.Condition()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", env={**os.environ, **(env or {})},
            start_new_session=detach, preexec_fn=die_with_parent if detach else None,
        )
        self.pid = self.process.pid
        threading.Thread(target=self._read_log, name=f"log-{name}", daemon=True).start()
        try:
            match = self.wait_for_log(LISTENING, timeout)
        except BenchError:
            self.stop()
            raise
        self.address = f"{match.group(1)}:{match.group(2)}"

    @property
    def addresses(self):
        """Where the load goes: this one server."""
        return [self.address]

    @property
    def pids(self):
        """The processes whose CPU is the server's: this one."""
        return [self.pid]

    def _read_log(self):
        """Keep every line as it comes (noting when the server said it listens)."""
        for line in self.process.stderr:
            with self._lines:
                if self.listening_at is None and LISTENING.search(line):
                    self.listening_at = time.monotonic()
                self.log.append(line.rstrip("\n"))
                self._lines.notify_all()
        with self._lines:
            self._eof = True
            self._lines.notify_all()

    def wait_for_log(self, pattern, timeout=LOG_TIMEOUT):
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
                    raise BenchError(f"{self.name}: no log line matching {pattern.pattern!r}:\n"
                                     + "\n".join(self.log))
                self._lines.wait(min(remaining, 0.5))

    def check(self):
        """Fail loudly when the server died under load."""
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} server exited with {self.process.returncode}: "
                             + " | ".join(list(self.log)[-5:]))

    def kill(self):
        """kill -9: no chance to flush anything."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self, signum=signal.SIGTERM):
        """A polite stop; returns the exit code."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self):
        """End it if it still runs: SIGTERM with `grace` seconds to finish, then SIGKILL."""
        if self.process.poll() is not None:
            return
        if self.grace:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.grace)
                return
            logger.warning("%s server did not stop on SIGTERM; killing it", self.name)
        self.kill()



class LoadGroup:
    """Load processes, one per spec, each running its spec's job: started together, given one
    window, then collected."""

    def __init__(self, specs):
        context = multiprocessing.get_context("spawn")
        self.processes = []
        self.connections = []
        try:
            for index, spec in enumerate(specs):
                ours, theirs = context.Pipe()
                process = context.Process(target=_load_process, args=(theirs, spec),
                                          name=f"load-{index}", daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.connections.append(ours)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self):
        """The load processes' ids, to read their CPU time."""
        return [process.pid for process in self.processes]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def gather(self, kind, timeout, on_progress=None):
        """Wait until every process sent a message of `kind`; their payloads in order."""
        payloads = {}
        pending = {connection: index for index, connection in enumerate(self.connections)}
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load processes sent no {kind!r} within {timeout:.0f} s")
            for connection in multiprocessing.connection.wait(list(pending), min(remaining, 0.2)):
                index = pending[connection]
                message, payload = self._receive(connection, index)
                if message == "progress" and on_progress:
                    on_progress(payload)
                elif message == kind:
                    payloads[pending.pop(connection)] = payload
        return [payloads[index] for index in range(len(self.connections))]

    @staticmethod
    def _receive(connection, index):
        """One message of a load process; its death or failure as a BenchError."""
        try:
            message, payload = connection.recv()
        except EOFError:
            raise BenchError(f"load process {index} died") from None
        if message == "error":
            raise BenchError(f"load process {index} failed:\n{payload}")
        return message, payload

    def wait_ready(self, timeout=START_TIMEOUT, on_progress=None):
        """Wait until every process is connected and ready to go."""
        self.gather("ready", timeout, on_progress)

    def go(self, start_ns, end_ns):
        """Start the load now; count what completes between start_ns and end_ns (None: stop())."""
        self.tell((start_ns, end_ns))

    def tell(self, message):
        """Send every process the same message."""
        for connection in self.connections:
            connection.send(message)

    def stop(self):
        """Tell every process to stop its load."""
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.send("stop")

    def results(self, timeout, on_progress=None):
        """Every process's outcome, once each has finished."""
        return self.gather("done", timeout, on_progress)

    def close(self):
        """Terminate what still runs, then kill what ignores it."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()


def _load_process(connection, spec):
    """A load process: run the spec's job against the server and send its outcome back."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        result = spec.run(connection)
    except Exception:
        connection.send(("error", traceback.format_exc()))
    else:
        connection.send(("done", result))
    finally:
        connection.close()
