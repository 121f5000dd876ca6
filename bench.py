"""Benchmark: our server beside an empty-handler ceiling, for the figures of DESIGN section 7."""

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import Counter, deque
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from unittest import mock

import google.protobuf
import grpc
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import server as presence
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
SERVERS = ("ceiling", "memory", "sqlite")
# Throughput targets: the servers, memory+lease (a memory:// server whose every call names a
# session with a lease) and the floor (the least a correct plain call does, see FloorService).
TARGETS = ("ceiling", "floor", "memory", "memory+lease", "sqlite")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
SECOND_NS = 1_000_000_000
BIG_MESSAGE = 512 * 1024 * 1024
BATCH = presence.MAX_BATCH
MESSAGES = ("hello", "goodbye")
PRELOAD_PROCESSES = 2
PRELOAD_IN_FLIGHT = 2
PAGE_SIZE = 1000
PAGE_CALLS = 200
COUNT_CALLS = 200
PROBE_IN_FLIGHT = 4
PROBE_BASELINE_SECONDS = 1.0
CHANNELS_PER_PROCESS = 1000
NOISE_WARNING = 0.2
LEASE_SECONDS = 60
# memory+lease: each id goes through LEASE_PASSES calls, a hello starting its session, hellos
# renewing it, then a goodbye ending it; so 2 calls in LEASE_PASSES change something.
LEASE_PASSES = 8
LEASE_SESSION = "terminal-1"
WATCH_PROCESSES = 4
WATCH_IDS = 100
WATCH_IDLE_SECONDS = 2.0
WATCH_DRAIN_SECONDS = 15.0
SOAK_PROCESSES = 4
SOAK_WATCHERS = 100
SOAK_SLICE_SECONDS = 10
SOAK_LEASE_SECONDS = 10
SOAK_SESSIONS = 2
SOAK_PAGE_SIZE = 100
SOAK_REGISTER_IN_FLIGHT = 32
SOAK_REGISTER_TRIES = 5
RSS_SAMPLE_SECONDS = 1.0
# What each soak client does each second, by weight: its default session toggled (hello or
# goodbye, always a change), a named session started or renewed with a lease of
# SOAK_LEASE_SECONDS (1 in 4 a goodbye of that session; one left unrenewed expires), or a read.
SOAK_MIX = (("toggle", 25), ("session", 15), ("status", 25), ("list", 15), ("count", 20))
SOAK_OPS = tuple(name for name, _ in SOAK_MIX)
PRESETS = {
    "quick": {"rounds": 3, "window": 5.0, "targets": ["memory", "memory+lease", "sqlite"],
              "scale": [10_000], "connections": 500,
              "connections_seconds": 5.0, "watchers": 200, "soak_seconds": 60.0,
              "modes": ["throughput", "scale", "connections", "watch"]},
    "full": {"rounds": 7, "window": 10.0, "targets": ["floor", "memory", "memory+lease", "sqlite"],
             "scale": [100_000, 1_000_000], "connections": 4_000,
             "connections_seconds": 20.0, "watchers": 1_000, "soak_seconds": 60.0,
             "modes": ["throughput", "scale", "connections", "watch", "soak"]},
}


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen (a server did not start, a load died)."""


# --- small data types ---------------------------------------------------------


@dataclass(frozen=True)
class ClosedLoop:
    """One load process: in_flight callers, each sending its next SendMessage when one returns.

    It uses the ids `tag-first` .. `tag-(first+ids-1)`, or the preloaded ids of that range when
    width is set (scale_id), each flipped by every pass: even numbers goodbye first, odd hello,
    the opposite of how preload left them, so every call is a change. With a lease, every call
    names the session LEASE_SESSION instead: per id a hello with that lease starting it, hellos
    renewing it, a goodbye ending it (LEASE_PASSES calls in all).
    """

    address: str
    tag: str
    in_flight: int
    ids: int
    timeout: float
    first: int = 0
    width: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Connections:
    """One load process holding `clients` channels, each sending a hello once a second."""

    address: str
    tag: str
    clients: int
    timeout: float


@dataclass(frozen=True)
class Watchers:
    """One load process holding `watchers` Watch streams, each on a channel of its own.

    With keep set it sends back every event's revision and receive time; without, only counts.
    """

    address: str
    watchers: int
    keep: bool


@dataclass(frozen=True)
class SteadyChanges:
    """One load process making `rate` changes a second: hello and goodbye alternate over `ids`."""

    address: str
    rate: float
    ids: int
    timeout: float


@dataclass(frozen=True)
class Mix:
    """One load process holding `clients` channels, each making one call of SOAK_MIX a second."""

    address: str
    tag: str
    clients: int
    timeout: float
    seed: int


@dataclass(frozen=True)
class Preload:
    """One load process sending batches first, first+step, ... of the `clients` to preload."""

    address: str
    clients: int
    first: int
    step: int
    in_flight: int
    timeout: float


@dataclass(frozen=True)
class Goal:
    """One target of DESIGN section 7: a figure, its limit and which side of it is good."""

    key: str
    label: str
    limit: float
    at_most: bool = True
    unit: str = ""

    def met(self, value):
        """True or False, or None when the figure was not measured."""
        if value is None:
            return None
        return value <= self.limit if self.at_most else value >= self.limit

    def describe(self):
        """The target as DESIGN states it, e.g. '≤ 1.1×'."""
        return f"{'≤' if self.at_most else '≥'} {self.limit:g}{self.unit}"


@dataclass
class CpuSample:
    """CPU ticks used so far by the server, the load processes, bench.py and the whole machine."""

    server: int
    load: int
    own: int
    machine: int


@dataclass(frozen=True)
class Mode:
    """A pluggable part of the benchmark: `run` returns a dict of figures, `render` tables of it."""

    name: str
    help: str
    run: Callable
    render: Callable


THROUGHPUT_GOALS = {
    "memory": (Goal("cpu_ratio", "CPU", 1.10, unit="×"),
               Goal("throughput_ratio", "calls/s", 0.92, at_most=False, unit="×"),
               Goal("p99_ratio", "p99", 1.5, unit="×")),
    "sqlite": (Goal("cpu_ratio", "CPU", 1.40, unit="×"),
               Goal("throughput_ratio", "calls/s", 0.75, at_most=False, unit="×"),
               Goal("p99_ratio", "p99", 1.5, unit="×")),
}
SCALE_GOALS = (
    Goal("page_p99_ms", "page of 1,000 (p99)", 20, unit=" ms"),
    Goal("count_p99_ms", "count (p99)", 5, unit=" ms"),
    Goal("map_answered", "all-clients map answered", 1, at_most=False),
    Goal("others_p99_ms_during_map", "others' p99 during the map", 50, unit=" ms"),
    Goal("bytes_per_client", "memory per client", 250, unit=" B"),
)
# Memory per client is judged at a million only: at fewer, the server's fixed memory dominates.
PER_CLIENT_GOAL_FROM = 1_000_000
CONNECTIONS_GOALS = (
    Goal("error_count", "errors", 0),
    Goal("p99_ms", "p99", 50, unit=" ms"),
)
WATCH_GOALS = (
    Goal("missing", "events missing", 0),
    Goal("duplicates", "events repeated", 0),
    Goal("cut_off", "watchers cut off", 0),
    Goal("p99_ms", "delivery p99", 250, unit=" ms"),
)
SOAK_GOALS = (
    Goal("error_count", "errors", 0),
    Goal("p99_ms", "p99", 50, unit=" ms"),
    Goal("watch_missing", "watch events missing", 0),
    Goal("watch_duplicates", "watch events repeated", 0),
    Goal("watch_cut_off", "watchers cut off", 0),
)


# --- pure helpers -------------------------------------------------------------


def percentile(values, fraction):
    """Nearest-rank percentile of values (unsorted is fine); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def latency_figures(latencies_ns):
    """p50, p99 and max in milliseconds."""
    ordered = sorted(latencies_ns)
    return {
        "p50_ms": _ms(percentile(ordered, 0.50)),
        "p99_ms": _ms(percentile(ordered, 0.99)),
        "max_ms": _ms(ordered[-1] if ordered else None),
    }


def _ms(ns):
    return None if ns is None else ns / 1e6


def ratio(value, base):
    """value / base, or None when either is missing or base is zero."""
    if value is None or not base:
        return None
    return value / base


def median(values):
    """Median of the values that were measured; None when none were."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def rotate(items, by):
    """items turned left by `by`, so each round starts with another target."""
    by %= len(items)
    return list(items[by:]) + list(items[:by])


def scale_id(number, width):
    """The id of the number-th preloaded client; zero-padded so ids sort by number."""
    return f"user-{number:0{width}d}"


def scale_width(clients):
    """Digits in the largest preloaded number, so that every id has the same length."""
    return len(str(max(clients - 1, 1)))


def split(total, parts):
    """total as `parts` nearly equal counts."""
    return [total // parts + (1 if part < total % parts else 0) for part in range(parts)]


def process_ticks(pid):
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_ticks():
    """Busy clock ticks of all CPUs so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    return sum(values[:3]) + sum(values[5:8])


def rss_bytes(pid):
    """Resident memory of a process (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def thread_count(pid):
    """Threads of a process (Threads of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise BenchError(f"no Threads for process {pid}")


def slope(points):
    """Least-squares slope of (x, y) points; None for fewer than two distinct x."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def fd_count(pid):
    """Open file descriptors of a process: its sockets, mostly."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def source_version():
    """The commit of the code measured, and whether the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": sorted(line[3:] for line in dirty.splitlines())}


def server_digest():
    """A short digest of server.py as it is now: what a server started now runs."""
    return hashlib.sha256((ROOT / "server.py").read_bytes()).hexdigest()[:12]


def machine_info():
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "clock_ticks_per_s": CLOCK_TICK,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_at_start": os.getloadavg(),
    }


def _fmt(value, digits=1, thousands=False):
    if value is None:
        return "—"
    if thousands:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _fmt_ratio(value):
    return "—" if value is None else f"{value:.2f}×"


def _mark(goal, value):
    met = goal.met(value)
    return "[dim]?[/]" if met is None else "[green]✓[/]" if met else "[red]✗[/]"


def _fmt_errors(errors):
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def verdicts(goals, figures):
    """Each goal's target, value and whether it is met, for the JSON."""
    return {
        goal.key: {"target": goal.describe(), "value": figures.get(goal.key),
                   "met": goal.met(figures.get(goal.key))}
        for goal in goals
    }


# --- processes: never leave one behind ----------------------------------------


def _die_with_parent():
    """Ask Linux to SIGTERM this process when bench.py dies, so no process is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def raise_fd_limit():
    """Soft fd limit up to the hard one: thousands of channels need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ServerProcess:
    """One server under test in its own process; its log is drained so the pipe never fills."""

    def __init__(self, name, argv):
        self.name = name
        self.log = deque(maxlen=200)
        self._listening = threading.Event()
        self.address = None
        self.process = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.process.pid
        threading.Thread(target=self._drain, name=f"log-{name}", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{name} server did not start: " + " | ".join(list(self.log)[-5:]))
        logger.info("%s server: pid %d on %s", name, self.pid, self.address)

    def _drain(self):
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.address = f"{match.group(1)}:{match.group(2)}"
                self._listening.set()

    def check(self):
        """Fail loudly when the server died under load."""
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} server exited with {self.process.returncode}: "
                             + " | ".join(list(self.log)[-5:]))

    def stop(self):
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("%s server did not stop on SIGTERM; killing it", self.name)
                self.process.kill()
                self.process.wait()


class LoadGroup:
    """Load processes running one job: started together, given one window, then collected."""

    def __init__(self, job, specs):
        context = multiprocessing.get_context("spawn")
        self.processes = []
        self.connections = []
        try:
            for index, spec in enumerate(specs):
                ours, theirs = context.Pipe()
                process = context.Process(target=_worker_entry, args=(theirs, job, spec),
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
        return [process.pid for process in self.processes]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _gather(self, kind, timeout, on_progress=None):
        """Wait until every process sent a message of `kind`; return their payloads in order."""
        payloads = {}
        pending = {connection: index for index, connection in enumerate(self.connections)}
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load processes sent no {kind!r} within {timeout:.0f} s")
            for connection in multiprocessing.connection.wait(list(pending), min(remaining, 0.2)):
                try:
                    message, payload = connection.recv()
                except EOFError:
                    raise BenchError(f"load process {pending[connection]} died") from None
                if message == "progress":
                    if on_progress:
                        on_progress(payload)
                elif message == "error":
                    raise BenchError(f"load process {pending[connection]} failed:\n{payload}")
                elif message == kind:
                    payloads[pending.pop(connection)] = payload
        return [payloads[index] for index in range(len(self.connections))]

    def wait_ready(self, timeout=START_TIMEOUT, on_progress=None):
        self._gather("ready", timeout, on_progress)

    def go(self, start_ns, end_ns):
        """Start the load now; count what completes between start_ns and end_ns (None: stop())."""
        self.tell((start_ns, end_ns))

    def tell(self, message):
        """Send every process the same message."""
        for connection in self.connections:
            connection.send(message)

    def gather(self, kind, timeout, on_progress=None):
        """Every process's payload of its next message of `kind`."""
        return self._gather(kind, timeout, on_progress)

    def stop(self):
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.send("stop")

    def results(self, timeout, on_progress=None):
        return self._gather("done", timeout, on_progress)

    def close(self):
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


# --- the load processes -------------------------------------------------------


def _worker_entry(connection, job, spec):
    """A load process: run one job against the server and send its outcome to bench.py."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        result = asyncio.run(job(connection, spec))
    except Exception:
        connection.send(("error", traceback.format_exc()))
    else:
        connection.send(("done", result))
    finally:
        connection.close()


async def _ready_then_go(connection):
    """Say ready, then wait for the (start_ns, end_ns) of the window."""
    connection.send(("ready", None))
    return await asyncio.get_running_loop().run_in_executor(None, connection.recv)


def _stop_event(connection):
    """An event set when bench.py sends stop (or goes away)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def on_message():
        loop.remove_reader(connection.fileno())
        event.set()

    loop.add_reader(connection.fileno(), on_message)
    return event


async def timed_call(call):
    """Await a call: when it began and ended (monotonic ns), and its status code name or None."""
    began = time.monotonic_ns()
    try:
        await call
        code = None
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    return began, time.monotonic_ns(), code


async def closed_loop(connection, spec):
    """SendMessage from in_flight callers over one channel; hello and goodbye alternate per id."""
    numbers = range(spec.first, spec.first + spec.ids)
    names = [scale_id(number, spec.width) if spec.width else f"{spec.tag}-{number}"
             for number in numbers]
    if spec.lease:
        requests = [[pb.MessageRequest(client_id=name, message="hello", session_id=LEASE_SESSION,
                                       lease_seconds=spec.lease) for name in names]
                    ] * (LEASE_PASSES - 1) + [
                    [pb.MessageRequest(client_id=name, message="goodbye", session_id=LEASE_SESSION)
                     for name in names]]
    else:
        requests = [[pb.MessageRequest(client_id=name, message=MESSAGES[(number + flip) % 2])
                     for name, number in zip(names, numbers)] for flip in (1, 0)]
    async with grpc.aio.insecure_channel(spec.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
        send = pb_grpc.ClientServiceStub(channel).SendMessage
        start_ns, end_ns = await _ready_then_go(connection)
        end_ns = end_ns or math.inf
        stop = _stop_event(connection)
        starts, latencies, errors = array("q"), array("q"), Counter()
        counter = iter(range(sys.maxsize))

        async def caller():
            while not stop.is_set():
                number = next(counter)
                request = requests[(number // spec.ids) % len(requests)][number % spec.ids]
                if time.monotonic_ns() >= end_ns:
                    return
                began, ended, code = await timed_call(send(request, timeout=spec.timeout))
                if start_ns <= ended < end_ns:
                    if code:
                        errors[code] += 1
                    else:
                        starts.append(began)
                        latencies.append(ended - began)

        await asyncio.gather(*(caller() for _ in range(spec.in_flight)))
    return {"starts": starts, "latencies": latencies, "errors": dict(errors)}


async def connected_clients(connection, spec):
    """`clients` channels of their own, each saying hello once a second with its own id."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options)
                for _ in range(spec.clients)]
    try:
        async def ready(channel):
            await channel.channel_ready()
            connection.send(("progress", 1))

        await asyncio.wait_for(asyncio.gather(*(ready(channel) for channel in channels)),
                               START_TIMEOUT)
        start_ns, end_ns = await _ready_then_go(connection)
        go_ns = time.monotonic_ns()
        latencies, errors, made = array("q"), Counter(), [0]

        async def client(number, channel):
            send = pb_grpc.ClientServiceStub(channel).SendMessage
            request = pb.MessageRequest(client_id=f"{spec.tag}-{number}", message="hello")
            tick = go_ns + SECOND_NS * number // spec.clients
            while tick < end_ns:
                await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
                began, ended, code = await timed_call(send(request, timeout=spec.timeout))
                if start_ns <= began < end_ns:
                    made[0] += 1
                    if code:
                        errors[code] += 1
                    else:
                        latencies.append(ended - began)
                tick = max(tick + SECOND_NS, ended)

        await asyncio.gather(*(client(number, channel)
                               for number, channel in enumerate(channels)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return {"latencies": latencies, "errors": dict(errors), "made": made[0]}


async def watchers(connection, spec):
    """Watch streams on channels of their own: ready once each has its snapshot (or failed).

    Then told (final_revision, deadline_ns): once every stream has seen final_revision, or
    ended, or the deadline passed, send "reached" with the counts (and with spec.keep each
    stream's revisions and receive times), and close the streams when told to stop; so the
    process is still there to be measured until then.
    """
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options)
                for _ in range(spec.watchers)]
    count = len(channels)
    revisions = [array("q") for _ in range(count)]
    times = [array("q") for _ in range(count)]
    last = [0] * count
    received, duplicates, gaps = [0] * count, [0] * count, [0] * count
    reasons = Counter()
    ended, counted = [None] * count, [False] * count
    settled, reached = asyncio.Event(), asyncio.Event()
    state = {"settled": 0, "final": None, "reached": 0, "closing": False}

    def check_reached(index):
        if counted[index] or state["final"] is None:
            return
        if ended[index] or last[index] >= state["final"]:
            counted[index] = True
            state["reached"] += 1
            if state["reached"] == count:
                reached.set()

    async def watch(index, channel):
        settled_here = False
        try:
            call = pb_grpc.ClientServiceStub(channel).Watch(pb.WatchRequest())
            async for response in call:
                now = time.monotonic_ns()
                if not index:
                    reasons.update(event.reason for event in response.events)
                for event in response.events:
                    revision = event.revision
                    received[index] += 1
                    if revision <= last[index]:
                        duplicates[index] += 1
                        continue
                    gaps[index] += revision - last[index] - 1
                    last[index] = revision
                    if spec.keep:
                        revisions[index].append(revision)
                        times[index].append(now)
                if response.snapshot_complete and not settled_here:
                    last[index] = response.revision
                    settled_here = True
                    state["settled"] += 1
                    if state["settled"] == count:
                        settled.set()
                check_reached(index)
        except grpc.aio.AioRpcError as error:
            if not state["closing"]:
                ended[index] = error.code().name
        except asyncio.CancelledError:
            pass
        if not state["closing"] and ended[index] is None:
            ended[index] = "ENDED"
        if not settled_here:
            state["settled"] += 1
            if state["settled"] == count:
                settled.set()
        check_reached(index)

    tasks = [asyncio.create_task(watch(index, channel)) for index, channel in enumerate(channels)]
    try:
        await asyncio.wait_for(settled.wait(), START_TIMEOUT)
        final, deadline_ns = await _ready_then_go(connection)
        state["final"] = final
        for index in range(count):
            check_reached(index)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reached.wait(), max(0, deadline_ns - time.monotonic_ns()) / 1e9)
        stop = _stop_event(connection)
        state["closing"] = True
        connection.send(("reached", {
            "received": received, "duplicates": duplicates, "gaps": gaps, "last": last,
            "ended": ended, "reasons": dict(reasons),
            "revisions": revisions if spec.keep else None, "times": times if spec.keep else None,
        }))
        await stop.wait()
    finally:
        state["closing"] = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in channels))
    return {}


async def steady_changes(connection, spec):
    """SendMessages at a steady rate from start_ns to end_ns, each one a change.

    Each change goes out on its tick whether or not earlier ones were answered. Sends "made":
    per change acknowledged, its revision, when it was sent and when it was acknowledged; then
    waits to be stopped, so the process is still there to be measured until then.
    """
    requests = [[pb.MessageRequest(client_id=f"watch-{number}", message=message)
                 for number in range(spec.ids)] for message in MESSAGES]
    async with grpc.aio.insecure_channel(spec.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
        send = pb_grpc.ClientServiceStub(channel).SendMessage
        start_ns, end_ns = await _ready_then_go(connection)
        revisions, sent, acknowledged = array("q"), array("q"), array("q")
        errors, unchanged = Counter(), [0]

        async def change(request):
            began = time.monotonic_ns()
            try:
                reply = await send(request, timeout=spec.timeout)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                return
            ended = time.monotonic_ns()
            if not reply.changed:
                unchanged[0] += 1
                return
            revisions.append(reply.client.revision)
            sent.append(began)
            acknowledged.append(ended)

        tasks = []
        for number in itertools.count():
            tick = start_ns + number * SECOND_NS / spec.rate
            if tick >= end_ns:
                break
            await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
            request = requests[(number // spec.ids) % 2][number % spec.ids]
            tasks.append(asyncio.create_task(change(request)))
        await asyncio.gather(*tasks)
        stop = _stop_event(connection)
        connection.send(("made", {"revisions": revisions, "sent": sent,
                                  "acknowledged": acknowledged, "errors": dict(errors),
                                  "unchanged": unchanged[0], "made": len(tasks)}))
        await stop.wait()
    return {}


async def mixed_clients(connection, spec):
    """`clients` channels of their own, each making one SOAK_MIX call a second.

    Each client first registers its id (a goodbye), so the reads find every id: a setup step,
    at most SOAK_REGISTER_IN_FLIGHT at a time per process and retried, its failures counted
    apart. Calls begun between start_ns and end_ns are counted: their start, latency and kind,
    and errors by call and code.
    """
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options)
                for _ in range(spec.clients)]
    names = [f"{spec.tag}-{number}" for number in range(spec.clients)]
    weights = [weight for _, weight in SOAK_MIX]
    setup_errors, gate = Counter(), asyncio.Semaphore(SOAK_REGISTER_IN_FLIGHT)
    try:
        async def register(name, channel):
            await channel.channel_ready()
            async with gate:
                for attempt in range(SOAK_REGISTER_TRIES):
                    try:
                        await pb_grpc.ClientServiceStub(channel).SendMessage(
                            pb.MessageRequest(client_id=name, message="goodbye"),
                            timeout=START_TIMEOUT)
                        break
                    except grpc.aio.AioRpcError as error:
                        setup_errors[error.code().name] += 1
                        if attempt == SOAK_REGISTER_TRIES - 1:
                            raise
                        await asyncio.sleep(0.5)
            connection.send(("progress", 1))

        await asyncio.wait_for(asyncio.gather(*(register(name, channel)
                                                for name, channel in zip(names, channels))),
                               START_TIMEOUT)
        start_ns, end_ns = await _ready_then_go(connection)
        go_ns = time.monotonic_ns()
        starts, latencies, kinds = array("q"), array("q"), array("b")
        errors, error_starts = Counter(), array("q")

        async def client(number, channel):
            rng = random.Random(spec.seed * 1_000_003 + number)
            stub = pb_grpc.ClientServiceStub(channel)
            name, connected = names[number], False
            tick = go_ns + SECOND_NS * number // spec.clients
            while tick < end_ns:
                await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
                kind = rng.choices(range(len(SOAK_OPS)), weights)[0]
                op = SOAK_OPS[kind]
                if op == "toggle":
                    connected = not connected
                    call = stub.SendMessage(pb.MessageRequest(
                        client_id=name, message=MESSAGES[not connected]), timeout=spec.timeout)
                elif op == "session":
                    session = f"s{rng.randrange(SOAK_SESSIONS)}"
                    if rng.randrange(4):
                        request = pb.MessageRequest(client_id=name, message="hello",
                                                    session_id=session,
                                                    lease_seconds=SOAK_LEASE_SECONDS)
                    else:
                        request = pb.MessageRequest(client_id=name, message="goodbye",
                                                    session_id=session)
                    call = stub.SendMessage(request, timeout=spec.timeout)
                elif op == "status":
                    call = stub.GetClientStatus(pb.ClientStatusRequest(
                        client_id=rng.choice(names)), timeout=spec.timeout)
                elif op == "list":
                    call = stub.ListClients(pb.ListClientsRequest(
                        page_size=SOAK_PAGE_SIZE,
                        page_token=presence.encode_page_token(rng.choice(names))),
                        timeout=spec.timeout)
                else:
                    call = stub.CountClients(pb.CountClientsRequest(), timeout=spec.timeout)
                began, ended, code = await timed_call(call)
                if start_ns <= began < end_ns:
                    if code:
                        errors[f"{op} {code}"] += 1
                        error_starts.append(began)
                    else:
                        starts.append(began)
                        latencies.append(ended - began)
                        kinds.append(kind)
                tick = max(tick + SECOND_NS, ended)

        await asyncio.gather(*(client(number, channel)
                               for number, channel in enumerate(channels)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return {"starts": starts, "latencies": latencies, "kinds": kinds, "errors": dict(errors),
            "error_starts": error_starts, "setup_errors": dict(setup_errors)}


async def preload(connection, spec):
    """Register clients in batches of 1,000 with SendMessages; even ids hello, odd goodbye."""
    width = scale_width(spec.clients)
    batches = iter(range(spec.first, math.ceil(spec.clients / BATCH), spec.step))
    options = [("grpc.max_receive_message_length", BIG_MESSAGE)]
    async with grpc.aio.insecure_channel(spec.address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
        send = pb_grpc.ClientServiceStub(channel).SendMessages
        await _ready_then_go(connection)

        async def sender():
            for batch in batches:
                numbers = range(batch * BATCH, min((batch + 1) * BATCH, spec.clients))
                request = pb.SendMessagesRequest(requests=[
                    pb.MessageRequest(client_id=scale_id(number, width),
                                      message=MESSAGES[number % 2])
                    for number in numbers
                ])
                await send(request, timeout=spec.timeout)
                connection.send(("progress", len(numbers)))

        await asyncio.gather(*(sender() for _ in range(spec.in_flight)))
    return {}


# --- the ceiling: an empty-handler server in our process model ----------------


class CeilingService(pb_grpc.ClientServiceServicer):
    """Answers every SendMessage with one constant, prebuilt response."""

    def __init__(self):
        self._response = pb.MessageResponse(
            success=True, info="Client bench marked as connected.", changed=True,
            client=pb.Client(client_id="bench", status=pb.STATUS_CONNECTED, revision=1,
                             reason="hello"),
        )
        self._response.client.changed_at.GetCurrentTime()
        self._response.client.last_seen.GetCurrentTime()

    def SendMessage(self, request, context):
        return self._response


class FloorService(pb_grpc.ClientServiceServicer):
    """The least a correct plain Hello or Goodbye costs: how much of the gap to the ceiling is
    there before any rule of ours.

    The request is checked, the status kept in a dict under a lock with a revision, and the
    answer built with its Client record by server.py's own code. No sessions or leases (it
    refuses them), no change log, status index or store, and gRPC's own (de)serializers
    rather than server.py's guarded ones: what our server costs beyond the floor is theirs.
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._clients = {}
        self._revision = 0

    def SendMessage(self, request, context):
        try:
            message = presence.parse_request(request, presence.DEFAULT_MAX_LEASE)
        except presence.InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if message.session_id or message.lease:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "the floor answers plain hello and goodbye, without sessions or leases")
        now = self._clock()
        connected = message.status is presence.Status.CONNECTED
        with self._lock:
            old = self._clients.get(message.client_id)
            changed = old is None or bool(old.sessions) != connected
            if changed:
                self._revision += 1
                record = presence.Client(
                    message.client_id, now, now, self._revision,
                    presence.HELLO if connected else presence.GOODBYE,
                    presence.DEFAULT_SESSIONS if connected else ())
            else:
                record = old._replace(last_seen=now)
            self._clients[message.client_id] = record
        return presence.message_response(message, record, True if changed else None)


def server_model():
    """What server.create_server gives grpc.server (pool size, concurrency limit, options).

    Read off a throwaway server, so the ceiling follows any change to ours.
    """
    seen = {}
    real_server = grpc.server

    def spy(executor, **kwargs):
        seen.update(kwargs, max_workers=executor.max_workers)
        return real_server(executor, **kwargs)

    with mock.patch.object(grpc, "server", spy):
        built = presence.create_server("127.0.0.1:0", presence.open_store("memory://"))
    built.grpc_server.stop(None)
    return seen


def serve_ceiling(argv):
    """The hidden `_ceiling` subcommand: serve the ceiling (or the floor) until SIGTERM or
    SIGINT."""
    parser = argparse.ArgumentParser(prog="bench.py _ceiling")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--floor", action="store_true", help="serve FloorService instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Taken by sigwait below, never by a handler that could interrupt a lock holder.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    model = server_model()
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=model["max_workers"], thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=model.get("maximum_concurrent_rpcs"),
        options=model.get("options"),
    )
    service = FloorService() if args.floor else CeilingService()
    pb_grpc.add_ClientServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port(presence.format_address(args.host, args.port))
    grpc_server.start()
    logger.info("%s: %d workers, at most %s concurrent calls, options %s",
                type(service).__name__, model["max_workers"], model.get("maximum_concurrent_rpcs"),
                model.get("options"))
    logger.info("listening on %s", presence.format_address(args.host, port))
    signal.sigwait(STOP_SIGNALS)
    grpc_server.stop(1).wait()
    return 0


# --- what every mode shares ---------------------------------------------------


class Run:
    """The options, the console and progress, the temporary folder, the servers to stop."""

    def __init__(self, args, console, progress, stack):
        self.args = args
        self.console = console
        self.progress = progress
        self.stack = stack
        self.tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        self.phase = progress.add_task("starting", total=None)
        self._servers = 0
        # server.py's digest -> the servers started from it, in case it changes during the run
        self.server_sources = {}

    def start_server(self, target, flags=()):
        """A fresh server for target: the ceiling, the floor, memory:// (also memory+lease) or
        SQLite on a new file; flags are added to server.py's command line."""
        self._servers += 1
        if target in ("ceiling", "floor"):
            argv = [sys.executable, str(ROOT / "bench.py"), "_ceiling", "--port", "0",
                    *(["--floor"] if target == "floor" else [])]
        else:
            store = ("memory://" if target.startswith("memory")
                     else f"sqlite:///{self.tmpdir / f'bench-{self._servers}.db'}")
            argv = [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0",
                    "--store", store, "--log-level", "INFO", *flags]
        self.show(f"starting the {target} server")
        digest = server_digest()
        if self.server_sources and digest not in self.server_sources:
            logger.warning("server.py changed during this run (now %s): the modes measure "
                           "different versions", digest)
        server = ServerProcess(target, argv)
        self.server_sources.setdefault(digest, []).append(
            f"{target} at {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        self.stack.callback(server.stop)
        return server

    def show(self, description, total=None, completed=0):
        """Say what is happening now in the progress display (a bar when total is known)."""
        self.progress.remove_task(self.phase)
        self.phase = self.progress.add_task(description, total=total, completed=completed)

    def wait_until(self, deadline_ns, description):
        """Sleep until deadline_ns (monotonic), showing a bar for the time left."""
        left = max(0, deadline_ns - time.monotonic_ns()) / 1e9
        self.show(description, total=max(left, 0.001))
        while (remaining := deadline_ns - time.monotonic_ns()) > 0:
            time.sleep(min(remaining / 1e9, 0.1))
            self.progress.update(self.phase, completed=left - max(remaining, 0) / 1e9)

    def cpu(self, server, *groups):
        """A CpuSample now; the load is every process of the groups."""
        return CpuSample(
            server=process_ticks(server.pid),
            load=sum(process_ticks(pid) for group in groups for pid in group.pids),
            own=process_ticks(os.getpid()),
            machine=machine_ticks(),
        )


def cpu_figures(before, after, calls, seconds):
    """Server and client CPU per call (us) and the cores other processes used (noise)."""
    server = after.server - before.server
    load = after.load - before.load
    others = (after.machine - before.machine) - server - load - (after.own - before.own)
    per_call = 1e6 / CLOCK_TICK / calls if calls else None
    return {
        "server_cpu_s": server / CLOCK_TICK,
        "cpu_us_per_call": server * per_call if per_call else None,
        "client_cpu_us_per_call": load * per_call if per_call else None,
        "server_cores": server / CLOCK_TICK / seconds,
        "load_cores": load / CLOCK_TICK / seconds,
        "noise_cores": max(others, 0) / CLOCK_TICK / seconds,
    }


def measure_load(run, server, *, processes, in_flight, warmup, window, tag, label, preloaded=0,
                 lease=0):
    """The normal load against server: warm-up, then one window; its figures.

    With preloaded=N the load flips the first of the N preloaded clients instead of new ones;
    with a lease every call names a session with that lease (ClosedLoop).
    """
    args = run.args
    if preloaded:
        ids = min(args.ids, preloaded // processes)
        width = scale_width(preloaded)
        specs = [ClosedLoop(server.address, tag, in_flight, ids, args.call_timeout,
                            first=index * ids, width=width) for index in range(processes)]
    else:
        specs = [ClosedLoop(server.address, f"{tag}-p{index}", in_flight, args.ids,
                            args.call_timeout, lease=lease) for index in range(processes)]
    run.show(f"{label}: starting {processes} load process(es)")
    with LoadGroup(closed_loop, specs) as group:
        group.wait_ready()
        start_ns = time.monotonic_ns() + int(warmup * SECOND_NS)
        end_ns = start_ns + int(window * SECOND_NS)
        group.go(start_ns, end_ns)
        run.wait_until(start_ns, f"{label}: warm-up")
        before = run.cpu(server, group)
        logger.debug("%s: window of %g s starts (server pid %d)", label, window, server.pid)
        run.wait_until(end_ns, f"{label}: measuring")
        after = run.cpu(server, group)
        logger.debug("%s: window ends", label)
        run.show(f"{label}: collecting")
        outcomes = group.results(args.call_timeout + 60)
    server.check()
    latencies = [value for outcome in outcomes for value in outcome["latencies"]]
    errors = Counter()
    for outcome in outcomes:
        errors.update(outcome["errors"])
    calls = len(latencies) + sum(errors.values())
    figures = {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / window,
        **latency_figures(latencies),
        "errors": dict(errors),
        **cpu_figures(before, after, calls, window),
    }
    if figures["noise_cores"] > NOISE_WARNING:
        logger.warning("%s: other processes used %.2f cores meanwhile; these figures are noisy",
                       label, figures["noise_cores"])
    return figures


# --- mode: throughput ---------------------------------------------------------


RATIOS = {"throughput_ratio": "calls_per_s", "p99_ratio": "p99_ms", "cpu_ratio": "cpu_us_per_call",
          "p50_ratio": "p50_ms"}
# memory+lease beside plain memory: what leases and sessions cost on the write path.
LEASE_RATIOS = {"throughput_vs_memory": "calls_per_s", "p99_vs_memory": "p99_ms",
                "cpu_vs_memory": "cpu_us_per_call"}


def run_throughput(run):
    """SendMessage against the ceiling and the --targets (the floor, memory://, memory+lease,
    SQLite), rounds in rotating order. memory+lease keeps its ids from round to round, so its
    sessions are renewed rather than left to expire between rounds."""
    args = run.args
    names = ["ceiling"] + [name for name in args.targets if name != "ceiling"]
    servers = {name: run.start_server(name) for name in names}
    rounds = []
    for number in range(args.rounds):
        order = rotate(names, number)
        figures = {}
        for name in order:
            lease = LEASE_SECONDS if name == "memory+lease" else 0
            figures[name] = measure_load(
                run, servers[name], processes=args.processes, in_flight=args.in_flight,
                warmup=args.warmup, window=args.window, tag="lease" if lease else f"r{number}",
                label=f"throughput round {number + 1}/{args.rounds}: {name}", lease=lease)
            time.sleep(0.2)
        for name in names:
            for key, figure in RATIOS.items():
                figures[name][key] = ratio(figures[name][figure], figures["ceiling"][figure])
        if "memory+lease" in figures and "memory" in figures:
            for key, figure in LEASE_RATIOS.items():
                figures["memory+lease"][key] = ratio(figures["memory+lease"][figure],
                                                     figures["memory"][figure])
        rounds.append({"round": number + 1, "order": order,
                       "targets": {name: figures[name] for name in names}})
    for server in servers.values():
        server.stop()
    medians = {}
    for name in names:
        per_round = [entry["targets"][name] for entry in rounds]
        keys = [key for key, value in per_round[0].items() if not isinstance(value, dict)]
        medians[name] = {key: median(figures[key] for figures in per_round) for key in keys}
        errors = Counter()
        for figures in per_round:
            errors.update(figures["errors"])
        medians[name]["errors"] = dict(errors)
    return {
        "load": {"processes": args.processes, "in_flight": args.in_flight, "warmup_s": args.warmup,
                 "window_s": args.window, "rounds": args.rounds, "ids_per_process": args.ids,
                 "lease_seconds": LEASE_SECONDS, "lease_passes": LEASE_PASSES},
        "rounds": rounds,
        "median": medians,
        "verdicts": {name: verdicts(goals, medians[name])
                     for name, goals in THROUGHPUT_GOALS.items() if name in medians},
    }


def render_throughput(figures):
    """The comparison table (medians, ratios to the ceiling) and the per-round table."""
    load, medians = figures["load"], figures["median"]
    noise = [entry["targets"][name]["noise_cores"] for entry in figures["rounds"]
             for name in entry["targets"]]
    caption = (f"other processes on the machine used {statistics.mean(noise):.2f} cores on "
               f"average during the windows (max {max(noise):.2f})")
    if "memory+lease" in medians:
        caption += (f"\nmemory+lease: every call names a session with a "
                    f"{load.get('lease_seconds', LEASE_SECONDS)} s lease; per id "
                    f"{load.get('lease_passes', LEASE_PASSES)} calls: a hello starting it, "
                    f"{load.get('lease_passes', LEASE_PASSES) - 2} renewing it, a goodbye "
                    f"(2 in {load.get('lease_passes', LEASE_PASSES)} calls are changes; "
                    f"plain memory: every call)")
    table = Table(
        title=f"SendMessage throughput: {load['processes']} load process(es) × "
              f"{load['in_flight']} in flight, median of {load['rounds']} rounds of "
              f"{load['window_s']:g} s (×: ratio to the ceiling of the same round)",
        caption=caption,
    )
    for header in ("target", "calls/s", "×", "p50 ms", "p99 ms", "×", "max ms",
                   "server CPU µs/call", "×", "errors", "DESIGN §7"):
        table.add_column(header, justify="left" if header in ("target", "DESIGN §7") else "right")
    for name, row in medians.items():
        goals = THROUGHPUT_GOALS.get(name, ())
        design = "\n".join(f"{goal.label} {goal.describe()} {_mark(goal, row.get(goal.key))}"
                           for goal in goals) or "baseline"
        if name == "floor":
            design = "no target; the least a correct plain call does"
        if name == "memory+lease":
            design = (f"no target; vs memory: CPU {_fmt_ratio(row.get('cpu_vs_memory'))}, "
                      f"calls/s {_fmt_ratio(row.get('throughput_vs_memory'))}, "
                      f"p99 {_fmt_ratio(row.get('p99_vs_memory'))}")
        table.add_row(
            name, _fmt(row["calls_per_s"], thousands=True), _fmt_ratio(row["throughput_ratio"]),
            _fmt(row["p50_ms"], 2), _fmt(row["p99_ms"], 2), _fmt_ratio(row["p99_ratio"]),
            _fmt(row["max_ms"], 1), _fmt(row["cpu_us_per_call"], 1), _fmt_ratio(row["cpu_ratio"]),
            _fmt_errors(row["errors"]), design,
        )
    rounds = Table(title="per round: calls/s | p99 ms | server CPU µs/call (client CPU µs/call)")
    rounds.add_column("round")
    rounds.add_column("order")
    for name in medians:
        rounds.add_column(name, justify="right")
    rounds.add_column("noise cores", justify="right")
    for entry in figures["rounds"]:
        rows = [entry["targets"][name] for name in medians]
        rounds.add_row(str(entry["round"]), " → ".join(entry["order"]), *(
            f"{_fmt(row['calls_per_s'], thousands=True)} | {_fmt(row['p99_ms'], 2)} | "
            f"{_fmt(row['cpu_us_per_call'], 1)} ({_fmt(row['client_cpu_us_per_call'], 0)})"
            for row in rows), _fmt(max(row["noise_cores"] for row in rows), 2))
    return [table, rounds]


# --- mode: scale --------------------------------------------------------------


def run_scale(run):
    """For each --scale N: a fresh memory:// server preloaded with N clients, then measured."""
    return {"runs": [measure_scale(run, clients) for clients in run.args.scale]}


def _timed(call, arguments):
    """Call once per argument; the latencies in ns."""
    latencies = []
    for argument in arguments:
        began = time.monotonic_ns()
        call(argument)
        latencies.append(time.monotonic_ns() - began)
    return latencies


def measure_scale(run, clients):
    """Preload `clients`, then page, count, write and ask for the all-clients map."""
    args = run.args
    label = f"scale {clients:,}"
    server = run.start_server("memory")
    figures = {"clients": clients}
    options = [("grpc.max_receive_message_length", BIG_MESSAGE)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        stub.CountClients(pb.CountClientsRequest(), timeout=args.call_timeout)
        time.sleep(0.5)
        rss_before = rss_bytes(server.pid)

        run.show(f"{label}: preloading", total=clients)
        began = time.monotonic()
        specs = [Preload(server.address, clients, first, PRELOAD_PROCESSES, PRELOAD_IN_FLIGHT, 120)
                 for first in range(PRELOAD_PROCESSES)]
        with LoadGroup(preload, specs) as group:
            group.wait_ready()
            group.go(None, None)
            group.results(START_TIMEOUT + clients / 1000,
                          on_progress=lambda sent: run.progress.advance(run.phase, sent))
        figures["preload_s"] = time.monotonic() - began
        figures["preload_per_s"] = clients / figures["preload_s"]
        server.check()
        time.sleep(0.5)
        rss_after = rss_bytes(server.pid)
        figures.update(rss_before_mib=rss_before / 2**20, rss_after_mib=rss_after / 2**20,
                       bytes_per_client=(rss_after - rss_before) / clients)
        counts = stub.CountClients(pb.CountClientsRequest(), timeout=args.call_timeout)
        figures["registered"] = counts.total
        if counts.total != clients:
            logger.warning("%s: the server counts %d clients, not %d", label, counts.total, clients)

        run.show(f"{label}: {PAGE_CALLS} pages of {PAGE_SIZE:,}")
        width = scale_width(clients)
        rng = random.Random(clients)
        tokens = [""] + [presence.encode_page_token(scale_id(rng.randrange(clients), width))
                         for _ in range(PAGE_CALLS - 1)]
        pages = _timed(lambda token: stub.ListClients(
            pb.ListClientsRequest(page_size=PAGE_SIZE, page_token=token),
            timeout=args.call_timeout), tokens)
        figures.update(page_median_ms=_ms(percentile(pages, 0.5)),
                       page_p99_ms=_ms(percentile(pages, 0.99)))

        run.show(f"{label}: {COUNT_CALLS} counts")
        counts = _timed(lambda _: stub.CountClients(pb.CountClientsRequest(),
                                                    timeout=args.call_timeout), range(COUNT_CALLS))
        figures.update(count_median_ms=_ms(percentile(counts, 0.5)),
                       count_p99_ms=_ms(percentile(counts, 0.99)))

        figures["writes"] = measure_load(
            run, server, processes=args.processes, in_flight=args.in_flight, warmup=args.warmup,
            window=args.window, tag="scale", label=f"{label}: SendMessage load",
            preloaded=clients)
        figures.update(measure_map(run, server, stub, label))
    server.stop()
    figures["verdicts"] = verdicts(scale_goals(clients), figures)
    return figures


def scale_goals(clients):
    """The scale goals that apply with this many clients."""
    return tuple(goal for goal in SCALE_GOALS
                 if goal.key != "bytes_per_client" or clients >= PER_CLIENT_GOAL_FROM)


def measure_map(run, server, stub, label):
    """The old all-clients map while another process keeps calling SendMessage."""
    args = run.args
    probe = ClosedLoop(server.address, "probe", PROBE_IN_FLIGHT, args.ids, args.call_timeout)
    run.show(f"{label}: all-clients map, probe starting")
    with LoadGroup(closed_loop, [probe]) as group:
        group.wait_ready()
        go_ns = time.monotonic_ns()
        group.go(go_ns, None)
        run.wait_until(go_ns + int(PROBE_BASELINE_SECONDS * SECOND_NS),
                       f"{label}: all-clients map, probe baseline")
        run.show(f"{label}: all-clients map, waiting for the answer")
        ticks = process_ticks(server.pid)
        began = time.monotonic_ns()
        try:
            answer = stub.GetClientStatus(pb.ClientStatusRequest(client_id=""), timeout=600)
            entries, error = len(answer.statuses), None
            del answer
        except grpc.RpcError as failure:
            entries, error = 0, f"{failure.code().name}: {failure.details()}"
        ended = time.monotonic_ns()
        ticks = process_ticks(server.pid) - ticks
        time.sleep(0.3)
        group.stop()
        outcome = group.results(args.call_timeout + 60)[0]
    server.check()
    during = [latency for start, latency in zip(outcome["starts"], outcome["latencies"])
              if start < ended and start + latency > began]
    before = [latency for start, latency in zip(outcome["starts"], outcome["latencies"])
              if start + latency <= began]
    if error:
        logger.warning("%s: the all-clients map failed: %s", label, error)
    return {
        "map_answered": 0 if error else 1,
        "map_error": error,
        "map_entries": entries,
        "map_s": (ended - began) / 1e9,
        "map_server_cpu_s": ticks / CLOCK_TICK,
        "others_calls_during_map": len(during),
        "others_p99_ms_during_map": _ms(percentile(during, 0.99)),
        "others_max_ms_during_map": _ms(max(during, default=None)),
        "others_p99_ms_before_map": _ms(percentile(before, 0.99)),
        "others_errors": outcome["errors"],
    }


def render_scale(figures):
    """One column per registry size, DESIGN's target (set for one million) beside each figure."""
    runs = figures["runs"]
    table = Table(title="Scale: a memory:// server preloaded with N clients "
                        "(DESIGN §7 sets these targets at one million)")
    table.add_column("figure")
    for entry in runs:
        table.add_column(f"N = {entry['clients']:,}", justify="right")
    table.add_column("DESIGN §7")
    goals = {goal.key: goal for goal in SCALE_GOALS}

    def row(name, cell, goal_key=None):
        goal = goals.get(goal_key)
        cells = [cell(entry) + (f" {_mark(goal, entry.get(goal_key))}"
                                if goal in scale_goals(entry["clients"]) else "")
                 for entry in runs]
        description = goal.describe() if goal else ""
        if goal_key == "bytes_per_client":
            description += f" at {PER_CLIENT_GOAL_FROM:,}"
        table.add_row(name, *cells, description)

    row("preload (clients/s)", lambda e: _fmt(e["preload_per_s"], thousands=True))
    row("server RSS before → after (MiB)",
        lambda e: f"{e['rss_before_mib']:.0f} → {e['rss_after_mib']:.0f}")
    row("memory per client (bytes)", lambda e: _fmt(e["bytes_per_client"], 0), "bytes_per_client")
    row(f"ListClients page of {PAGE_SIZE:,}: median ms", lambda e: _fmt(e["page_median_ms"], 2))
    row(f"ListClients page of {PAGE_SIZE:,}: p99 ms", lambda e: _fmt(e["page_p99_ms"], 2),
        "page_p99_ms")
    row("CountClients: median ms", lambda e: _fmt(e["count_median_ms"], 2))
    row("CountClients: p99 ms", lambda e: _fmt(e["count_p99_ms"], 2), "count_p99_ms")
    row("all-clients map: answered in s",
        lambda e: (f"{e['map_s']:.2f} ({e['map_entries']:,})" if e["map_answered"]
                   else e["map_error"].split(":")[0]), "map_answered")
    row("all-clients map: server CPU s", lambda e: _fmt(e["map_server_cpu_s"], 2))
    row("SendMessage p99 ms before the map", lambda e: _fmt(e["others_p99_ms_before_map"], 2))
    row("SendMessage p99 ms during the map",
        lambda e: f"{_fmt(e['others_p99_ms_during_map'], 1)} "
                  f"(max {_fmt(e['others_max_ms_during_map'], 0)}, "
                  f"{e['others_calls_during_map']} calls)", "others_p99_ms_during_map")
    row("SendMessage calls/s at that size", lambda e: _fmt(e["writes"]["calls_per_s"],
                                                          thousands=True))
    row("SendMessage p99 ms at that size", lambda e: _fmt(e["writes"]["p99_ms"], 2))
    row("SendMessage server CPU µs/call", lambda e: _fmt(e["writes"]["cpu_us_per_call"], 1))
    row("  other processes' cores meanwhile (noise)",
        lambda e: _fmt(e["writes"]["noise_cores"], 2))
    row("errors", lambda e: _fmt_errors({**e["writes"]["errors"], **e["others_errors"]}))
    return [table]


# --- mode: connections --------------------------------------------------------


def run_connections(run):
    """N clients on channels of their own, one SendMessage a second each."""
    args = run.args
    clients = args.connections
    processes = args.connection_processes or max(1, math.ceil(clients / CHANNELS_PER_PROCESS))
    server = run.start_server(args.connections_target)
    specs = [Connections(server.address, f"conn-p{index}", count, args.call_timeout)
             for index, count in enumerate(split(clients, processes))]
    label = f"{clients:,} connected clients"
    run.show(f"{label}: connecting", total=clients)
    began = time.monotonic()
    with LoadGroup(connected_clients, specs) as group:
        group.wait_ready(START_TIMEOUT + 30,
                         on_progress=lambda count: run.progress.advance(run.phase, count))
        connect_s = time.monotonic() - began
        start_ns = time.monotonic_ns() + int(args.warmup * SECOND_NS)
        end_ns = start_ns + int(args.connections_seconds * SECOND_NS)
        group.go(start_ns, end_ns)
        run.wait_until(start_ns, f"{label}: warm-up")
        before = run.cpu(server, group)
        fds = fd_count(server.pid)
        logger.debug("%s: window of %g s starts (server pid %d)", label, args.connections_seconds,
                     server.pid)
        run.wait_until(end_ns, f"{label}: measuring")
        after = run.cpu(server, group)
        run.show(f"{label}: collecting")
        outcomes = group.results(args.call_timeout + 60)
    server.check()
    server.stop()
    latencies = [value for outcome in outcomes for value in outcome["latencies"]]
    errors = Counter()
    for outcome in outcomes:
        errors.update(outcome["errors"])
    made = sum(outcome["made"] for outcome in outcomes)
    figures = {
        "clients": clients, "processes": processes, "seconds": args.connections_seconds,
        "target": args.connections_target,
        "connect_s": connect_s, "server_fds": fds,
        "calls": made, "calls_due": int(clients * args.connections_seconds),
        "errors": dict(errors), "error_count": sum(errors.values()),
        **latency_figures(latencies),
        **cpu_figures(before, after, made, args.connections_seconds),
    }
    figures["verdicts"] = verdicts(CONNECTIONS_GOALS, figures)
    return figures


def render_connections(figures):
    """The connected-clients figures beside DESIGN's targets."""
    goals = {goal.key: goal for goal in CONNECTIONS_GOALS}
    table = Table(title=f"{figures['clients']:,} connected clients (own channel each, "
                        f"{figures['processes']} load process(es)), one SendMessage a second, "
                        f"{figures['seconds']:g} s, against {figures['target']}")
    for header in ("figure", "value", "DESIGN §7"):
        table.add_column(header, justify="right" if header == "value" else "left")
    table.add_row("connected in", f"{figures['connect_s']:.1f} s", "")
    table.add_row("server fds during the window", f"{figures['server_fds']:,}", "")
    table.add_row("calls made / due", f"{figures['calls']:,} / {figures['calls_due']:,}", "")
    table.add_row("errors", f"{_fmt_errors(figures['errors'])} "
                            f"{_mark(goals['error_count'], figures['error_count'])}",
                  "zero errors")
    table.add_row("p50 ms", _fmt(figures["p50_ms"], 2), "")
    table.add_row("p99 ms", f"{_fmt(figures['p99_ms'], 2)} {_mark(goals['p99_ms'], figures['p99_ms'])}",
                  goals["p99_ms"].describe())
    table.add_row("max ms", _fmt(figures["max_ms"], 1), "")
    table.add_row("server CPU µs/call", _fmt(figures["cpu_us_per_call"], 1), "")
    table.add_row("server cores busy", _fmt(figures["server_cores"], 2), "")
    table.add_row("load processes' cores busy", _fmt(figures["load_cores"], 2), "")
    table.add_row("other processes' cores (noise)", _fmt(figures["noise_cores"], 2), "")
    return [table]


# --- mode: watch ---------------------------------------------------------------


def run_watch(run):
    """N watchers in a few load processes, changes at a steady rate; when each event arrived.

    Every watcher has a channel (a connection) of its own, as separate clients would. The
    delivery latency of an event is its receive time minus the time its change was sent: all
    processes read CLOCK_MONOTONIC, which Linux keeps system-wide. Every revision the server
    makes meanwhile (CountClients before and after) is expected by every watcher, acknowledged
    or not; the latency is known for those acknowledged (the reply names the revision).
    """
    args = run.args
    count = args.watchers
    flags = (["--max-watchers", str(count)] if count > presence.DEFAULT_MAX_WATCHERS else [])
    server = run.start_server(args.watch_target, flags)
    processes = min(args.watch_processes, count)
    label = f"watch: {count:,} watchers"
    run.show(f"{label}: opening the streams")
    began = time.monotonic()
    watcher_specs = [Watchers(server.address, share, keep=True)
                     for share in split(count, processes)]
    writer_spec = SteadyChanges(server.address, args.watch_rate, WATCH_IDS, args.call_timeout)
    with grpc.insecure_channel(server.address) as channel, \
            LoadGroup(watchers, watcher_specs) as group, \
            LoadGroup(steady_changes, [writer_spec]) as writer:
        count_clients = pb_grpc.ClientServiceStub(channel).CountClients
        group.wait_ready(START_TIMEOUT + 30)
        snapshots_s = time.monotonic() - began
        writer.wait_ready()
        threads = thread_count(server.pid)
        idle_before = run.cpu(server, group, writer)
        run.wait_until(time.monotonic_ns() + int(WATCH_IDLE_SECONDS * SECOND_NS),
                       f"{label}: idle")
        idle = cpu_figures(idle_before, run.cpu(server, group, writer), 0, WATCH_IDLE_SECONDS)
        base = count_clients(pb.CountClientsRequest(), timeout=args.call_timeout).revision
        before = run.cpu(server, group, writer)
        start_ns = time.monotonic_ns()
        end_ns = start_ns + int(args.watch_seconds * SECOND_NS)
        writer.go(start_ns, end_ns)
        run.wait_until(end_ns, f"{label}: {args.watch_rate:g} changes/s")
        run.show(f"{label}: the writer's last acknowledgements")
        made = writer.gather("made", args.call_timeout + 60)[0]
        final = count_clients(pb.CountClientsRequest(), timeout=args.call_timeout).revision
        group.tell((final, time.monotonic_ns() + int(WATCH_DRAIN_SECONDS * SECOND_NS)))
        run.show(f"{label}: waiting for every watcher to reach revision {final:,}")
        outcomes = group.gather("reached", WATCH_DRAIN_SECONDS + 60)
        after = run.cpu(server, group, writer)
        seconds = (time.monotonic_ns() - start_ns) / 1e9
        group.stop()
        writer.stop()
        group.results(60)
        writer.results(60)
    server.check()
    server.stop()
    figures = {"watchers": count, "processes": processes, "snapshots_s": snapshots_s,
               "server_threads": threads, "idle_server_cores": idle["server_cores"],
               "delivered_s": seconds, "first_revision": base + 1, "last_revision": final}
    figures.update(watch_figures(made, outcomes, range(base + 1, final + 1),
                                 cpu_figures(before, after, final - base, seconds)))
    figures.update(target=args.watch_target, rate=args.watch_rate, seconds=args.watch_seconds,
                   ids=WATCH_IDS)
    figures["verdicts"] = verdicts(WATCH_GOALS, figures)
    return figures


def watch_figures(made, outcomes, expected, cpu):
    """Compare what every watcher received with the revisions expected."""
    sent = dict(zip(made["revisions"], made["sent"]))
    changes = len(expected)
    latencies, received, missing, duplicates, gaps = [], 0, 0, 0, 0
    ended = Counter()
    for outcome in outcomes:
        duplicates += sum(outcome["duplicates"])
        gaps += sum(outcome["gaps"])
        ended.update(code for code in outcome["ended"] if code)
        for revisions, times in zip(outcome["revisions"], outcome["times"]):
            seen = set()
            for revision, arrived in zip(revisions, times):
                if revision in expected and revision not in seen:
                    seen.add(revision)
                    began = sent.get(revision)
                    if began is not None:
                        latencies.append(arrived - began)
            received += len(seen)
            missing += changes - len(seen)
    writes = [acknowledged - began
              for began, acknowledged in zip(made["sent"], made["acknowledged"])]
    watchers_count = sum(len(outcome["last"]) for outcome in outcomes)
    return {
        "changes": changes, "calls": made["made"], "acknowledged": len(sent),
        "unchanged": made["unchanged"],
        "write_errors": made["errors"], "write_p99_ms": _ms(percentile(writes, 0.99)),
        "events_expected": changes * watchers_count, "events_received": received,
        "missing": missing, "duplicates": duplicates, "gaps": gaps,
        "ended": dict(ended), "cut_off": ended.get("RESOURCE_EXHAUSTED", 0),
        "latencies_measured": len(latencies),
        **latency_figures(latencies),
        **cpu,
        "cpu_us_per_event": (cpu["server_cpu_s"] * 1e6 / received) if received else None,
    }


def render_watch(figures):
    """The fan-out figures beside DESIGN's target."""
    goals = {goal.key: goal for goal in WATCH_GOALS}

    def checked(key, text):
        return f"{text} {_mark(goals[key], figures[key])}"

    table = Table(title=f"Watch: {figures['watchers']:,} watchers ({figures['processes']} load "
                        f"processes, a channel each) on {figures['target']}, "
                        f"{figures['rate']:g} changes/s for {figures['seconds']:g} s "
                        f"(hello/goodbye over {figures['ids']} ids, one writer process)")
    for header in ("figure", "value", "DESIGN §7"):
        table.add_column(header, justify="right" if header == "value" else "left")
    table.add_row("every watcher had its snapshot after", f"{figures['snapshots_s']:.1f} s", "")
    table.add_row("server threads", f"{figures['server_threads']:,}", "")
    table.add_row("server cores, watchers idle", _fmt(figures["idle_server_cores"], 2), "")
    unchanged = f", {figures['unchanged']:,} unchanged" if figures["unchanged"] else ""
    table.add_row("changes made (calls, acknowledged)",
                  f"{figures['changes']:,} ({figures['calls']:,}, {figures['acknowledged']:,}"
                  f"{unchanged})", "")
    table.add_row("write errors", _fmt_errors(figures["write_errors"]), "")
    table.add_row("write p99 ms (until acknowledged)", _fmt(figures["write_p99_ms"], 2), "")
    table.add_row("events expected (changes × watchers)", f"{figures['events_expected']:,}", "")
    table.add_row("events received", f"{figures['events_received']:,}", "")
    table.add_row("missing", checked("missing", f"{figures['missing']:,}"),
                  "every change reaches all")
    table.add_row("repeated", checked("duplicates", f"{figures['duplicates']:,}"), "none")
    table.add_row("streams cut off (RESOURCE_EXHAUSTED)",
                  checked("cut_off", f"{figures['cut_off']:,}"), "none")
    others = {code: n for code, n in figures["ended"].items() if code != "RESOURCE_EXHAUSTED"}
    if others:
        table.add_row("streams ended otherwise", _fmt_errors(others), "")
    table.add_row("delivery p50 ms (receive − send; acknowledged changes)",
                  _fmt(figures["p50_ms"], 1), "")
    table.add_row("delivery p99 ms", checked("p99_ms", _fmt(figures["p99_ms"], 1)),
                  goals["p99_ms"].describe())
    table.add_row("delivery max ms", _fmt(figures["max_ms"], 1), "")
    table.add_row("all delivered after", f"{figures['delivered_s']:.1f} s", "")
    table.add_row("server CPU µs per change (per event)",
                  f"{_fmt(figures['cpu_us_per_call'], 0)} ({_fmt(figures['cpu_us_per_event'], 1)})",
                  "")
    table.add_row("server cores busy", _fmt(figures["server_cores"], 2), "")
    table.add_row("load processes' cores busy", _fmt(figures["load_cores"], 2), "")
    table.add_row("other processes' cores (noise)", _fmt(figures["noise_cores"], 2), "")
    return [table]


# --- mode: soak ----------------------------------------------------------------


def run_soak(run):
    """Thousands of clients on channels of their own, one SOAK_MIX call a second each, and
    SOAK_WATCHERS watchers, for minutes: errors, memory and whether latency drifts."""
    args = run.args
    clients, seconds = args.soak_clients, args.soak_seconds
    processes = min(SOAK_PROCESSES, clients)
    server = run.start_server(args.soak_target)
    label = f"soak: {clients:,} clients"
    run.show(f"{label}: {args.soak_watchers} watchers")
    watch_specs = ([Watchers(server.address, args.soak_watchers, keep=False)]
                   if args.soak_watchers > 0 else [])
    with grpc.insecure_channel(server.address) as channel, \
            LoadGroup(watchers, watch_specs) as watch:
        stub = pb_grpc.ClientServiceStub(channel)
        watch.wait_ready()
        specs = [Mix(server.address, f"soak-p{index}", share, args.call_timeout, index)
                 for index, share in enumerate(split(clients, processes))]
        run.show(f"{label}: connecting and registering", total=clients)
        began = time.monotonic()
        with LoadGroup(mixed_clients, specs) as group:
            group.wait_ready(START_TIMEOUT + 30,
                             on_progress=lambda count: run.progress.advance(run.phase, count))
            connect_s = time.monotonic() - began
            start_ns = time.monotonic_ns() + int(args.warmup * SECOND_NS)
            end_ns = start_ns + int(seconds * SECOND_NS)
            group.go(start_ns, end_ns)
            run.wait_until(start_ns, f"{label}: warm-up")
            revision_start = stub.CountClients(pb.CountClientsRequest(),
                                               timeout=args.call_timeout).revision
            before = run.cpu(server, group, watch)
            threads_start, fds_start = thread_count(server.pid), fd_count(server.pid)
            rss = sample_rss(run, server, start_ns, end_ns, f"{label}: soaking")
            after = run.cpu(server, group, watch)
            threads_end, fds_end = thread_count(server.pid), fd_count(server.pid)
            revision_end = stub.CountClients(pb.CountClientsRequest(),
                                             timeout=args.call_timeout).revision
            run.show(f"{label}: collecting")
            outcomes = group.results(args.call_timeout + 60)
        final = stub.CountClients(pb.CountClientsRequest(), timeout=args.call_timeout).revision
        watch.tell((final, time.monotonic_ns() + int(WATCH_DRAIN_SECONDS * SECOND_NS)))
        run.show(f"{label}: waiting for the watchers to reach revision {final:,}")
        seen = watch.gather("reached", WATCH_DRAIN_SECONDS + 60)
        watch.stop()
        watch.results(60)
    server.check()
    server.stop()
    calls = sum(len(outcome["latencies"]) for outcome in outcomes)
    errors, setup_errors = Counter(), Counter()
    for outcome in outcomes:
        errors.update(outcome["errors"])
        setup_errors.update(outcome["setup_errors"])
    figures = {
        "clients": clients, "processes": processes, "seconds": seconds,
        "target": args.soak_target, "watchers": args.soak_watchers, "connect_s": connect_s,
        "mix": dict(SOAK_MIX), "lease_seconds": SOAK_LEASE_SECONDS,
        "calls": calls + sum(errors.values()), "calls_due": int(clients * seconds),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "setup_errors": dict(setup_errors),
        **latency_figures([value for outcome in outcomes for value in outcome["latencies"]]),
        **soak_slices(outcomes, start_ns, seconds, rss),
        **cpu_figures(before, after, calls + sum(errors.values()), seconds),
        "changes": revision_end - revision_start,
        "server_threads": [threads_start, threads_end], "server_fds": [fds_start, fds_end],
        **soak_watchers(seen, final),
    }
    figures["verdicts"] = verdicts(SOAK_GOALS, figures)
    return figures


def sample_rss(run, server, start_ns, end_ns, description):
    """The server's RSS every RSS_SAMPLE_SECONDS until end_ns: (seconds since start_ns, bytes)."""
    samples = []
    run.show(description, total=(end_ns - start_ns) / 1e9)
    next_ns = start_ns
    while True:
        now = time.monotonic_ns()
        if now >= next_ns:
            samples.append(((now - start_ns) / 1e9, rss_bytes(server.pid)))
            next_ns += int(RSS_SAMPLE_SECONDS * SECOND_NS)
            server.check()
        if now >= end_ns:
            return samples
        run.progress.update(run.phase, completed=(now - start_ns) / 1e9)
        time.sleep(max(0, min(next_ns, end_ns) - now) / 1e9)


def soak_slices(outcomes, start_ns, seconds, rss):
    """Latency by call and by SOAK_SLICE_SECONDS slice; the server's memory over the soak."""
    slices = max(1, math.ceil(seconds / SOAK_SLICE_SECONDS))
    by_slice = [[] for _ in range(slices)]
    errors_by_slice = [0] * slices
    by_kind = [[] for _ in SOAK_OPS]
    width = SOAK_SLICE_SECONDS * SECOND_NS
    for outcome in outcomes:
        for began, latency, kind in zip(outcome["starts"], outcome["latencies"],
                                        outcome["kinds"]):
            by_slice[min(slices - 1, (began - start_ns) // width)].append(latency)
            by_kind[kind].append(latency)
        for began in outcome["error_starts"]:
            errors_by_slice[min(slices - 1, (began - start_ns) // width)] += 1
    p99s = [_ms(percentile(values, 0.99)) for values in by_slice]
    growth = slope(rss)
    return {
        "slices": [{"from_s": index * SOAK_SLICE_SECONDS, "calls": len(values),
                    "errors": errors_by_slice[index], "p99_ms": p99s[index],
                    "max_ms": _ms(max(values, default=None)),
                    "rss_mib": next((size / 2**20 for at, size in reversed(rss)
                                     if at <= (index + 1) * SOAK_SLICE_SECONDS), None)}
                   for index, values in enumerate(by_slice)],
        "p99_ms_by_call": {op: _ms(percentile(values, 0.99))
                           for op, values in zip(SOAK_OPS, by_kind)},
        "calls_by_kind": {op: len(values) for op, values in zip(SOAK_OPS, by_kind)},
        "drift": ratio(p99s[-1], p99s[0]),
        "rss_start_mib": rss[0][1] / 2**20, "rss_end_mib": rss[-1][1] / 2**20,
        "rss_peak_mib": max(size for _, size in rss) / 2**20,
        "rss_mib_per_minute": None if growth is None else growth * 60 / 2**20,
        "rss_samples": [(round(at, 1), size) for at, size in rss],
    }


def soak_watchers(outcomes, final):
    """What the soak's watchers received against the last revision: missing, repeated, cut off.

    A stream carries every revision in order, so a revision skipped is an event missing."""
    if not outcomes:
        return {"watch_final_revision": final, "watch_events": None, "watch_missing": None,
                "watch_duplicates": None, "watch_ended": {}, "watch_cut_off": None,
                "watch_reasons": {}}
    seen = outcomes[0]
    behind = sum(max(0, final - last) for last in seen["last"])
    ended = Counter(code for code in seen["ended"] if code)
    return {
        "watch_final_revision": final, "watch_events": sum(seen["received"]),
        "watch_missing": sum(seen["gaps"]) + behind,
        "watch_duplicates": sum(seen["duplicates"]), "watch_ended": dict(ended),
        "watch_cut_off": ended.get("RESOURCE_EXHAUSTED", 0), "watch_reasons": seen["reasons"],
    }


def render_soak(figures):
    """The soak's figures beside DESIGN's connected-clients and watch targets."""
    goals = {goal.key: goal for goal in SOAK_GOALS}

    def checked(key, text):
        return f"{text} {_mark(goals[key], figures[key])}"

    mix = ", ".join(f"{op} {weight}%" for op, weight in figures["mix"].items())
    table = Table(title=f"Soak: {figures['clients']:,} clients (own channel each, "
                        f"{figures['processes']} load processes), one call a second each "
                        f"({mix}), and {figures['watchers']} watchers, {figures['seconds']:g} s "
                        f"on {figures['target']}")
    for header in ("figure", "value", "DESIGN §7"):
        table.add_column(header, justify="right" if header == "value" else "left")
    retried = (f" (retried: {_fmt_errors(figures['setup_errors'])})"
               if figures.get("setup_errors") else "")
    table.add_row("connected and registered in", f"{figures['connect_s']:.1f} s{retried}", "")
    table.add_row("calls made / due", f"{figures['calls']:,} / {figures['calls_due']:,}", "")
    table.add_row("changes (revisions) in the window", f"{figures['changes']:,}", "")
    table.add_row("errors", checked("error_count", _fmt_errors(figures["errors"])),
                  "zero errors (at 4,000)")
    table.add_row("p50 ms", _fmt(figures["p50_ms"], 2), "")
    table.add_row("p99 ms", checked("p99_ms", _fmt(figures["p99_ms"], 2)),
                  f"{goals['p99_ms'].describe()} (at 4,000)")
    table.add_row("max ms", _fmt(figures["max_ms"], 1), "")
    table.add_row("p99 ms by call", ", ".join(
        f"{op} {_fmt(value, 1)}" for op, value in figures["p99_ms_by_call"].items()), "")
    table.add_row(f"p99 ms per {SOAK_SLICE_SECONDS} s slice",
                  " | ".join(_fmt(entry["p99_ms"], 1) for entry in figures["slices"]), "")
    table.add_row("drift: last slice p99 / first", _fmt_ratio(figures["drift"]), "no target")
    table.add_row("server RSS start → end (peak) MiB",
                  f"{figures['rss_start_mib']:.0f} → {figures['rss_end_mib']:.0f} "
                  f"({figures['rss_peak_mib']:.0f})", "")
    table.add_row("server RSS growth MiB/minute", _fmt(figures["rss_mib_per_minute"], 1),
                  "no target")
    table.add_row("server threads start → end",
                  " → ".join(f"{n:,}" for n in figures["server_threads"]), "")
    table.add_row("server fds start → end", " → ".join(f"{n:,}" for n in figures["server_fds"]),
                  "")
    table.add_row("server CPU µs/call", _fmt(figures["cpu_us_per_call"], 1), "")
    table.add_row("server cores busy", _fmt(figures["server_cores"], 2), "")
    table.add_row("load processes' cores busy", _fmt(figures["load_cores"], 2), "")
    table.add_row("other processes' cores (noise)", _fmt(figures["noise_cores"], 2), "")
    if figures["watch_events"] is None:
        return [table]
    table.add_row("watch: events received (changes seen by one: reasons)",
                  f"{figures['watch_events']:,} ("
                  + ", ".join(f"{reason} {n:,}"
                              for reason, n in sorted(figures["watch_reasons"].items())) + ")",
                  "")
    table.add_row("watch: events missing",
                  checked("watch_missing", f"{figures['watch_missing']:,}"),
                  "every change reaches all")
    table.add_row("watch: events repeated",
                  checked("watch_duplicates", f"{figures['watch_duplicates']:,}"), "none")
    table.add_row("watch: streams cut off",
                  checked("watch_cut_off", f"{figures['watch_cut_off']:,}"), "none")
    others = {code: n for code, n in figures["watch_ended"].items()
              if code != "RESOURCE_EXHAUSTED"}
    if others:
        table.add_row("watch: streams ended otherwise", _fmt_errors(others), "")
    return [table]


MODES = {mode.name: mode for mode in (
    Mode("throughput", "SendMessage against the ceiling, memory://, memory+lease and SQLite, "
         "and the floor in --full or with --targets floor",
         run_throughput, render_throughput),
    Mode("scale", "registries of N clients: page, count, all-clients map, memory, writes",
         run_scale, render_scale),
    Mode("connections", "N connected clients calling once a second",
         run_connections, render_connections),
    Mode("watch", "N watchers, changes at a steady rate: every event, its delivery latency",
         run_watch, render_watch),
    Mode("soak", "thousands of clients making mixed calls, and watchers, for minutes "
         "(--full only)", run_soak, render_soak),
)}


# --- command line -------------------------------------------------------------


def _positive_int(text):
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser():
    """The command line; options left unset take the quick or --full preset."""
    quick, full = PRESETS["quick"], PRESETS["full"]
    parser = argparse.ArgumentParser(
        description="Benchmark the presence server beside an empty-handler gRPC server (the "
        "ceiling) in the same process model, and check the figures of DESIGN section 7. "
        "Everything measured runs in processes of its own on loopback ports picked at run time "
        "and is stopped afterwards.",
        epilog="Modes: " + "; ".join(f"{name}: {mode.help}" for name, mode in MODES.items())
        + ". Examples: `python bench.py` (quick, under 3 minutes), `python bench.py --full` "
        "(under 15 minutes), `python bench.py --only scale --scale 1000000`, "
        "`python bench.py --only watch --watchers 1000`, "
        "`python bench.py --only soak --soak-seconds 600`, "
        "`make bench ARGS=--full`. Results go to the terminal and, with every per-round figure, "
        "to the --output JSON file.",
    )
    parser.add_argument("--full", action="store_true",
                        help=f"the full run: {full['rounds']} rounds of {full['window']:g} s with the "
                        "floor beside the ceiling, scale "
                        f"at {', '.join(f'{n:,}' for n in full['scale'])}, "
                        f"{full['connections']:,} connections for "
                        f"{full['connections_seconds']:g} s, {full['watchers']:,} watchers, "
                        f"a {full['soak_seconds']:g} s soak")
    parser.add_argument("--only", nargs="+", choices=list(MODES), metavar="MODE",
                        help=f"run only these modes ({', '.join(MODES)}); default: "
                        f"{', '.join(quick['modes'])}, and with --full also "
                        f"{', '.join(set(full['modes']) - set(quick['modes']))}")
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"),
                        help="JSON file for every figure (default: %(default)s)")
    load = parser.add_argument_group("the SendMessage load")
    load.add_argument("--processes", type=_positive_int, default=1,
                      help="load processes (default: %(default)s)")
    load.add_argument("--in-flight", type=_positive_int, default=32,
                      help="calls each load process keeps in flight (default: %(default)s)")
    load.add_argument("--ids", type=_positive_int, default=10_000,
                      help="client ids per load process; hello and goodbye alternate per id, so "
                      "every call is a change (default: %(default)s)")
    load.add_argument("--warmup", type=_positive_float, default=2.0,
                      help="seconds of load before each window (default: %(default)s)")
    load.add_argument("--window", type=_positive_float,
                      help=f"seconds measured (quick: {quick['window']:g}, --full: {full['window']:g})")
    load.add_argument("--call-timeout", type=_positive_float, default=5.0,
                      help="deadline of every call, seconds (default: %(default)s)")
    throughput = parser.add_argument_group("throughput mode")
    throughput.add_argument("--rounds", type=_positive_int,
                            help="rounds, the order of the targets rotated each round "
                            f"(quick: {quick['rounds']}, --full: {full['rounds']})")
    throughput.add_argument("--targets", nargs="+", choices=TARGETS, metavar="TARGET",
                            help="servers to compare (ceiling; floor: the least a correct "
                            "plain hello or goodbye does, a dict under a lock and the reply "
                            "with its record; memory; memory+lease: every call with a session and a "
                            f"{LEASE_SECONDS} s lease; sqlite); the ceiling always runs "
                            f"(quick: {' '.join(quick['targets'])}, --full: "
                            f"{' '.join(full['targets'])})")
    scale = parser.add_argument_group("scale mode")
    scale.add_argument("--scale", type=_positive_int, nargs="+", metavar="N",
                       help="registry sizes to preload and measure (quick: "
                       f"{quick['scale'][0]:,}, --full: {' '.join(str(n) for n in full['scale'])})")
    connections = parser.add_argument_group("connections mode")
    connections.add_argument("--connections", type=_positive_int, metavar="N",
                             help="connected clients, each on a channel of its own (quick: "
                             f"{quick['connections']}, --full: {full['connections']})")
    connections.add_argument("--connections-seconds", type=_positive_float, metavar="S",
                             help="seconds measured (quick: "
                             f"{quick['connections_seconds']:g}, --full: "
                             f"{full['connections_seconds']:g})")
    connections.add_argument("--connections-target", choices=SERVERS, default="memory",
                             help="server they call (default: %(default)s; the ceiling shows "
                             "what gRPC itself manages on this machine)")
    connections.add_argument("--connection-processes", type=_positive_int, metavar="P",
                             help=f"load processes holding them (default: one per "
                             f"{CHANNELS_PER_PROCESS:,} clients)")
    watch = parser.add_argument_group("watch mode")
    watch.add_argument("--watchers", type=_positive_int, metavar="N",
                       help=f"Watch streams, each on a channel of its own (quick: "
                       f"{quick['watchers']:,}, --full: {full['watchers']:,}); past the server's "
                       f"default --max-watchers ({presence.DEFAULT_MAX_WATCHERS:,}) it is raised")
    watch.add_argument("--watch-rate", type=_positive_float, default=50.0, metavar="R",
                       help="changes a second (default: %(default)s)")
    watch.add_argument("--watch-seconds", type=_positive_float, default=10.0, metavar="S",
                       help="seconds of changes (default: %(default)s)")
    watch.add_argument("--watch-target", choices=SERVERS[1:], default="memory",
                       help="server watched (default: %(default)s)")
    watch.add_argument("--watch-processes", type=_positive_int, default=WATCH_PROCESSES,
                       metavar="P", help="load processes holding the watchers "
                       "(default: %(default)s)")
    soak = parser.add_argument_group("soak mode")
    soak.add_argument("--soak-seconds", type=_positive_float, metavar="S",
                      help=f"seconds measured (default: {full['soak_seconds']:g})")
    soak.add_argument("--soak-clients", type=_positive_int, default=2_000, metavar="N",
                      help="clients, each on a channel of its own, in "
                      f"{SOAK_PROCESSES} load processes (default: %(default)s, what the ceiling "
                      "serves on 2 cores; 4,000 is past it)")
    soak.add_argument("--soak-target", choices=SERVERS[1:], default="memory",
                      help="server soaked (default: %(default)s)")
    soak.add_argument("--soak-watchers", type=int, default=SOAK_WATCHERS, metavar="N",
                      help="watchers meanwhile, in a load process of their own; 0 for none "
                      "(default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="bench.py's own log (default: %(default)s)")
    return parser


def parse_args(argv):
    """Parsed options with the preset filled in where none was given."""
    args = build_parser().parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    for key, value in preset.items():
        if key != "modes" and getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.only = args.only or list(preset["modes"])
    return args


def write_results(path, results):
    """Write the JSON results (again after every mode, so a later failure keeps them)."""
    path.write_text(json.dumps(results, indent=2, default=list) + "\n")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run the chosen modes, print their tables, write the JSON; 0 when every mode ran."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ceiling"]:
        return serve_ceiling(argv[1:])
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    logging.basicConfig(level=args.log_level, format="%(message)s", datefmt="%X",
                        handlers=[RichHandler(console=console, show_path=False)])
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    raise_fd_limit()
    results = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": source_version(),
        "options": {key: value if not isinstance(value, Path) else str(value)
                    for key, value in vars(args).items()},
    }
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(), console=console,
                        refresh_per_second=4)
    status = 0
    run = None
    try:
        with contextlib.ExitStack() as stack, progress:
            run = Run(args, console, progress, stack)
            overall = progress.add_task("modes", total=len(args.only))
            for mode in (MODES[name] for name in args.only):
                progress.update(overall, description=f"mode: {mode.name}")
                with contextlib.ExitStack() as mode_stack:
                    run.stack = mode_stack
                    results[mode.name] = mode.run(run)
                for table in mode.render(results[mode.name]):
                    console.print(table)
                write_results(args.output, results)
                progress.advance(overall)
    except KeyboardInterrupt:
        logger.warning("interrupted: every server and load process stopped")
        status = 130
    except BenchError as error:
        logger.error("%s", error)
        status = 1
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    if run is not None:
        results["source"]["server_py"] = run.server_sources
        if len(run.server_sources) > 1:
            logger.warning("server.py changed during this run: %s", run.server_sources)
    write_results(args.output, results)
    console.print(f"results: {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
