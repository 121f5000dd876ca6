"""Mode profile: where a server's CPU goes under the normal SendMessage load, sampled by py-spy
in one window per target; the functions that cost most, and the stacks for a flame graph."""

import collections
import itertools
import logging
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

import server as presence
from bench.harness import Mode, measured_window, positive_int
from bench.processes import BenchError, LoadGroup
from bench.throughput import load_specs
from generated import connection_pb2 as pb

logger = logging.getLogger("bench")

TARGETS = ("memory", "sqlite", "memory+lease", "redis", "redis-2")
TOP = 25
SAMPLE_RATE = 100


def add_flags(parser, quick, full):
    """--profile-targets, --profile-dir, --profile-rate, --profile-top."""
    group = parser.add_argument_group("profile mode")
    group.add_argument("--profile-targets", nargs="+", choices=TARGETS,
                       default=["memory", "sqlite"], metavar="TARGET",
                       help="servers to profile, one window each, under the first --load shape "
                       "(default: %(default)s)")
    group.add_argument("--profile-dir", type=Path, default=Path("profiles"),
                       help="folder for each target's collapsed stacks, TARGET.txt: one line a "
                       "stack and its samples, what flamegraph.pl or speedscope draw "
                       "(default: %(default)s)")
    group.add_argument("--profile-rate", type=positive_int, default=SAMPLE_RATE,
                       help="py-spy's samples a second (default: %(default)s)")
    group.add_argument("--profile-top", type=positive_int, default=TOP,
                       help="functions in each table (default: %(default)s)")


def py_spy():
    """The py-spy beside this Python (requirements.txt pins it), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("py-spy is not installed: pip install -r requirements.txt")
    return found


def record(pid, seconds, rate, output):
    """Sample the thread of pid holding the GIL, for seconds and without pausing it, into
    collapsed stacks: Python's own CPU (grpc's C threads run without the GIL and are not seen)."""
    command = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
               "--rate", str(rate), "--format", "raw", "--gil", "--nonblocking",
               "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"py-spy failed: {done.stderr.strip()[-500:]}")


def record_all(pids, seconds, rate, outputs):
    """record() each of pids at once (the replicas of one target), each into its output."""
    with ThreadPoolExecutor(len(pids)) as pool:
        list(pool.map(lambda pid, output: record(pid, seconds, rate, output), pids, outputs))


def read_stacks(path):
    """The collapsed stacks: (frames from the thread's root, samples) per line."""
    stacks, torn = [], 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
        elif line:
            torn += 1
    if torn:  # --nonblocking reads a frame as it changes now and then: a name torn in two
        logger.debug("%s: %d lines without a count left out", path, torn)
    return stacks


def frame_name(frame):
    """A frame as `function (file:line)` without the line, so one function is one row."""
    function, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{function} ({Path(file).name})" if file else function


def top_functions(stacks, count):
    """The functions by samples on the CPU in them (self) and under them (total)."""
    own, under = collections.Counter(), collections.Counter()
    for frames, samples in stacks:
        names = [frame_name(frame) for frame in frames if not frame.startswith("process ")
                 and not frame.startswith("thread ")]
        if names:
            own[names[-1]] += samples
        for name in set(names):
            under[name] += samples
    total = sum(samples for _, samples in stacks) or 1
    rows = [{"function": name, "self": own[name] / total, "total": under[name] / total}
            for name, _ in own.most_common(count)]
    by_total = [{"function": name, "self": own[name] / total, "total": share / total}
                for name, share in under.most_common(count)]
    return {"samples": total, "by_self": rows, "by_total": by_total}


def profile_target(run, name):
    """One window of the normal load against a fresh server of name, sampled; its top table."""
    args = run.args
    server = run.start_server(name)
    folder = args.profile_dir
    folder.mkdir(parents=True, exist_ok=True)
    count = len(server.pids)
    outputs = ([folder / f"{name}.txt"] if count == 1 else
               [folder / f"{name}-replica-{number}.txt" for number in range(1, count + 1)])
    shape = args.load[0]
    jobs = load_specs(run, server.addresses, shape=shape, processes=args.processes,
                      in_flight=args.in_flight, tag=f"profile-{shape}",
                      lease=60 if name == "memory+lease" else 0)
    with LoadGroup(jobs) as group:
        group.wait_ready()
        measured = measured_window(
            run, server, group, warmup=args.warmup, seconds=args.window,
            label=f"profile ({shape}): {name}",
            measure=lambda start_ns, end_ns: record_all(server.pids, (end_ns - start_ns) / 1e9,
                                                        args.profile_rate, outputs))
    calls = sum(len(outcome["latencies"]) for outcome in measured.outcomes)
    server.stop()
    logger.info("%s: stacks in %s", name, ", ".join(map(str, outputs)))
    stacks = [stack for output in outputs for stack in read_stacks(output)]
    return {"stacks": ", ".join(map(str, outputs)), "shape": shape, "calls": calls,
            **measured.cpu(calls), **top_functions(stacks, args.profile_top)}


def floor(call, number=20_000, repeat=7):
    """The least time one call of call() takes, µs: the best of repeat runs of number calls."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def hand_off_floor(number=5_000):
    """µs of a call handed to another thread and its answer handed back, as a pool does."""
    there, back = queue.SimpleQueue(), queue.SimpleQueue()

    def worker():
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    started = time.perf_counter()
    for item in range(number):
        there.put(item)
        back.get()
    elapsed = time.perf_counter() - started
    there.put(None)
    thread.join()
    return elapsed / number * 1e6


def part_floors():
    """What each part of one SendMessage costs at the least, alone in this process: the parse,
    the rules with the change log and the index (apply_one on memory://), the change log
    alone, the reply, a hand-off to a thread and back, and a one-record SQLite commit."""
    ids = [f"profile-{number}" for number in range(1_000)]
    raw = pb.MessageRequest(client_id=ids[0], message="hello").SerializeToString()
    request = pb.MessageRequest.FromString(raw)
    messages = itertools.cycle([presence.Message(client_id, status) for status in
                                (presence.Status.CONNECTED, presence.Status.DISCONNECTED)
                                for client_id in ids])
    registry = presence.Registry(presence.MemoryStore())
    record, change = registry.apply_one(next(messages))
    message = presence.Message(record.client_id, presence.Status.CONNECTED)
    log = presence.ChangeLog(0, 100_000)
    revisions = itertools.count(1)
    floors = {
        "parse (bytes to a checked Message)":
            floor(lambda: presence.parse_request(pb.MessageRequest.FromString(raw), 3600)),
        "  of it the rules on ids and messages": floor(lambda: presence.parse_request(request,
                                                                                      3600)),
        "rules, change log and index (apply_one, memory://)":
            floor(lambda: registry.apply_one(next(messages))),
        "  of it the change log (append, advance)":
            floor(lambda: (log.append((change,)), log.advance(next(revisions)))),
        "reply (encode_reply)": floor(lambda: presence.encode_reply(message, record, change)),
        "reply built as a protobuf message": floor(
            lambda: presence.message_response(message, record, change).SerializeToString()),
        "hand-off to a thread and back": hand_off_floor(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as folder:
        store = presence.SqliteStore(f"{folder}/floor.db")
        positions = itertools.count(1)
        floors["commit of one record (SQLite, sync=normal)"] = floor(
            lambda: store.wait(store.submit((record,), next(positions))), number=2_000)
        store.close()
    return floors


def run_profile(run):
    """Each --profile-targets server profiled in a window of its own, then the parts' floors."""
    figures = {name: profile_target(run, name) for name in run.args.profile_targets}
    run.show("measuring each part of a call alone")
    return {"targets": figures, "floors": part_floors()}


def render_profile(figures):
    """Per target, the functions by time on the CPU in them, then by time under them."""
    tables = []
    for name, measured in figures["targets"].items():
        for order, key in (("in the function itself", "by_self"), ("in it and below", "by_total")):
            table = Table(title=f"profile of {name} ({measured['shape']} load): py-spy samples "
                          f"{order}, of {measured['samples']:,} (server CPU "
                          f"{measured['cpu_us_per_call']:.1f} µs/call while sampled)",
                          caption=f"stacks: {measured['stacks']}")
            for header in ("function", "self %", "total %"):
                table.add_column(header, justify="left" if header == "function" else "right")
            for row in measured[key]:
                table.add_row(row["function"], f"{row['self'] * 100:.1f}",
                              f"{row['total'] * 100:.1f}")
            tables.append(table)
    floors = Table(title="each part of one SendMessage alone, at the least (µs, in this "
                   "process, one thread: what no load can make cheaper)")
    floors.add_column("part")
    floors.add_column("µs", justify="right")
    for part, micros in figures["floors"].items():
        floors.add_row(part, f"{micros:.2f}")
    tables.append(floors)
    return tables


MODE = Mode("profile", "the server sampled by py-spy under the normal load: the costliest "
            "functions and the stacks for a flame graph (memory:// and SQLite by default)",
            add_flags, run_profile, render_profile)
