"""What every mode shares: the Run (options, progress, servers to stop), the Mode a module
declares, and the one measured window (go, warm up, CPU before, measure, CPU after, collect)."""

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.baselines import BASELINES
from bench.figures import SECOND_NS, cpu_figures
from bench.machine import CpuSample, cpu_sample, server_digest
from bench.processes import SERVER_PROGRAM, START_TIMEOUT, STOP_TIMEOUT, ServerProcess
from bench.replicas import RedisProcess, Replicas

logger = logging.getLogger("bench")

SERVER_LOG_LINES = 200


@dataclass(frozen=True)
class Mode:
    """One benchmark mode: its flags, a run that returns a dict of figures, and the tables of it.

    add_flags(parser, quick, full) adds the mode's own options (quick and full: the presets).
    """

    name: str
    help: str
    add_flags: Callable
    run: Callable
    render: Callable


@dataclass
class Window:
    """One measured window: its bounds, the CPU read at each end, what was measured meanwhile
    (or None), what was read at either end, and every load process's outcome."""

    start_ns: int
    end_ns: int
    before: CpuSample
    after: CpuSample
    during: object
    at_start: object
    at_end: object
    outcomes: list

    @property
    def seconds(self):
        """How long the window was."""
        return (self.end_ns - self.start_ns) / 1e9

    def cpu(self, calls):
        """CPU figures of the window for that many calls."""
        return cpu_figures(self.before, self.after, calls, self.seconds)


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

    def new_database(self):
        """The URL of a fresh SQLite file in the run's temporary folder."""
        self._servers += 1
        return f"sqlite:///{self.tmpdir / f'bench-{self._servers}.db'}"

    def start_server(self, target, flags=(), store=None):
        """A fresh server for target: a baseline, memory:// (also memory+lease), SQLite on a
        new file (or on store), or replicas on a new Redis (redis: one, redis-N: N); flags are
        added to server.py's command line."""
        if target in BASELINES:
            program, args = ("-m", "bench", "_baseline", target), ()
        elif target.startswith("redis"):
            return self.start_replicas(target, flags)
        else:
            store = store or ("memory://" if target.startswith("memory") else self.new_database())
            program, args = SERVER_PROGRAM, ("--store", store, "--log-level", "INFO")
        server = self.start_process(target, program, (*args, *flags))
        self.stack.callback(server.stop)
        return server

    def start_replicas(self, target, flags=(), fill=None):
        """A redis-server of its own in a new folder and target's replicas on it (redis-N: N);
        fill(redis) runs once Redis is up, before the replicas start (to preload it)."""
        count = int(target.partition("-")[2] or 1)
        self._servers += 1
        folder = self.tmpdir / f"redis-{self._servers}"
        folder.mkdir()
        self.show(f"starting redis-server for {target}")
        replicas = Replicas(RedisProcess(folder), [])
        self.stack.callback(replicas.stop)
        logger.info("%s: redis-server pid %d on port %d", target, replicas.redis.pid,
                    replicas.redis.port)
        if fill is not None:
            fill(replicas.redis)
        args = ("--store", replicas.redis.url, "--log-level", "INFO", *flags)
        for number in range(count):
            replicas.servers.append(
                self.start_process(f"{target} replica {number + 1}", SERVER_PROGRAM, args))
        return replicas

    def start_process(self, name, program, args):
        """One server process, noting which server.py it runs."""
        self.show(f"starting the {name} server")
        digest = server_digest()
        if self.server_sources and digest not in self.server_sources:
            logger.warning("server.py changed during this run (now %s): the modes measure "
                           "different versions", digest)
        server = ServerProcess(*args, program=program, name=name, keep=SERVER_LOG_LINES,
                               grace=STOP_TIMEOUT, detach=True, timeout=START_TIMEOUT)
        logger.info("%s server: pid %d on %s", name, server.pid, server.address)
        self.server_sources.setdefault(digest, []).append(
            f"{name} at {datetime.now(UTC).isoformat(timespec='seconds')}")
        return server

    def show(self, description, total=None, completed=0):
        """Say what is happening now in the progress display (a bar when total is known)."""
        self.progress.remove_task(self.phase)
        self.phase = self.progress.add_task(description, total=total, completed=completed)

    def advance(self, count):
        """Move the progress bar of the current phase on by count."""
        self.progress.advance(self.phase, count)

    def wait_until(self, deadline_ns, description):
        """Sleep until deadline_ns (monotonic), showing a bar for the time left."""
        left = max(0, deadline_ns - time.monotonic_ns()) / 1e9
        self.show(description, total=max(left, 0.001))
        while (remaining := deadline_ns - time.monotonic_ns()) > 0:
            time.sleep(min(remaining / 1e9, 0.1))
            self.progress.update(self.phase, completed=left - max(remaining, 0) / 1e9)

    def cpu(self, server, *groups):
        """A CpuSample now; the load is every process of the groups."""
        return cpu_sample(server.pids, [pid for group in groups for pid in group.pids],
                          server.engine_pids)


def positive_int(text):
    """An option's whole number, at least 1 (1_000 and 1,000 read as 1000)."""
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    """An option's number, above 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def nothing():
    """The default reading at either end of a window: none."""
    return None


def measured_window(run, server, group, *, warmup, seconds, label, others=(),
                    at_start=nothing, at_end=nothing, measure=None):
    """Go, warm up, read the CPU, measure, read it again, collect the group's outcomes.

    at_start and at_end are read just before the first and just after the second CPU reading;
    measure(start_ns, end_ns) waits out the window (default: just wait); others are load groups
    whose CPU counts as load too.
    """
    start_ns = time.monotonic_ns() + int(warmup * SECOND_NS)
    end_ns = start_ns + int(seconds * SECOND_NS)
    group.go(start_ns, end_ns)
    run.wait_until(start_ns, f"{label}: warm-up")
    first = at_start()
    before = run.cpu(server, group, *others)
    logger.debug("%s: window of %g s starts (server pids %s)", label, seconds, server.pids)
    during = (measure(start_ns, end_ns) if measure
              else run.wait_until(end_ns, f"{label}: measuring"))
    after = run.cpu(server, group, *others)
    last = at_end()
    logger.debug("%s: window ends", label)
    run.show(f"{label}: collecting")
    outcomes = group.results(run.args.call_timeout + 60)
    server.check()
    return Window(start_ns, end_ns, before, after, during, first, last, outcomes)
