"""Redis and the replicas on it: a redis-server of the benchmark's own, and servers sharing it
that a mode measures as one server (calls spread over their addresses, CPU summed over their
processes, Redis's own CPU read beside theirs)."""

import re
import socket
import subprocess
import threading
from collections import deque

import redis

from bench.processes import LOG_TIMEOUT, STOP_TIMEOUT, BenchError, die_with_parent

REDIS_READY = re.compile(r"Ready to accept connections")
REDIS_LOG_LINES = 50


def free_port():
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server on a free loopback port with its append-only file (appendonly yes, as a
    deployment keeps it) in folder; ended by Linux if the benchmark dies."""

    def __init__(self, folder, timeout=LOG_TIMEOUT):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = deque(maxlen=REDIS_LOG_LINES)
        self._ready = threading.Event()
        self._seen_ready = False
        self.client = None
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(folder)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.process.pid
        threading.Thread(target=self._read_log, name="log-redis", daemon=True).start()
        self._ready.wait(timeout)
        if not self._seen_ready:
            self.stop()
            raise BenchError("redis-server did not get ready:\n" + "\n".join(self.log))
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def _read_log(self):
        """Keep Redis's last lines, noting when it is ready (or gone)."""
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))
            if REDIS_READY.search(line):
                self._seen_ready = True
                self._ready.set()
        self._ready.set()

    def cpu_seconds(self):
        """Redis's own CPU so far (INFO cpu, system + user): finer than /proc's clock ticks."""
        info = self.client.info("cpu")
        return info["used_cpu_sys"] + info["used_cpu_user"]

    def command_calls(self):
        """How many times Redis ran each command so far (INFO commandstats), by name."""
        return {name.removeprefix("cmdstat_"): stats["calls"]
                for name, stats in self.client.info("commandstats").items()}

    def reading(self):
        """Redis's CPU seconds and its command counts, read together at a window's edge."""
        return self.cpu_seconds(), self.command_calls()

    def check(self):
        """Fail loudly when Redis died under load."""
        if self.process.poll() is not None:
            raise BenchError(f"redis-server exited with {self.process.returncode}: "
                             + " | ".join(list(self.log)[-5:]))

    def stop(self):
        """A clean shutdown if it still runs, SIGKILL if that takes too long."""
        if self.client:
            self.client.close()
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Replicas:
    """Servers on one Redis, measured as one server."""

    def __init__(self, redis_process, servers):
        self.redis = redis_process
        self.servers = servers

    @property
    def addresses(self):
        """Every replica's address: the load is spread over them."""
        return [server.address for server in self.servers]

    @property
    def pids(self):
        """Every replica's process: the server CPU is theirs summed."""
        return [server.pid for server in self.servers]

    @property
    def engine_pids(self):
        """Redis's process: its CPU is neither the servers' nor noise."""
        return [self.redis.pid]

    def check(self):
        """Fail loudly when Redis or a replica died under load."""
        self.redis.check()
        for server in self.servers:
            server.check()

    def stop(self):
        """The replicas first, so none is left without its Redis, then Redis."""
        for server in self.servers:
            server.stop()
        self.redis.stop()
