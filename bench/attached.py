"""Mode attached: N clients each holding an Attach stream on a channel of its own. What holding
them costs (RSS, threads, CPU while they idle), how fast they attach and are let go after a
mass disconnect, and what they do to other traffic's latency."""

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

import grpc

import server as presence
from bench.figures import (
    SECOND_NS,
    Goal,
    figure_table,
    fmt,
    fmt_errors,
    latency_figures,
    mark,
    ratio,
    split,
    verdicts,
)
from bench.harness import Mode, measured_window, positive_float, positive_int
from bench.jobs import ClosedLoop, Job, own_channels, ready_then_go, stop_event
from bench.machine import CLOCK_TICK, rss_bytes, thread_count
from bench.processes import START_TIMEOUT, LoadGroup
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

STREAMS_PER_PROCESS = 1000
# Every connection is pinged within the server's default keepalive interval and timeout.
IDLE_SECONDS = presence.DEFAULT_KEEPALIVE_INTERVAL + presence.DEFAULT_KEEPALIVE_TIMEOUT + 5
SERVERS = ("memory", "sqlite")
OTHER_TRAFFIC_IN_FLIGHT = 4  # a light load beside the held streams, whose latency is watched
POLL_SECONDS = 0.01
ATTACHER_PREFIX = "att-"
GOALS = (
    Goal("idle_core_percent", "server CPU while they idle", 5, unit="% of a core", strict=True),
    Goal("p99_ratio", "other traffic's p99 beside them", 1.5, unit="× without them"),
    Goal("threads_per_stream", "server threads added per held stream", 0.01,
         unit=" a stream"),
)


def add_flags(parser, quick, full):
    """--attached, --attached-target, --attach-processes, --idle-seconds."""
    group = parser.add_argument_group("attached mode")
    group.add_argument("--attached", type=positive_int, metavar="N",
                       help=f"clients holding an Attach stream each, on channels of their own "
                       f"(quick: {quick['attached']:,}, --full: {full['attached']:,})")
    group.add_argument("--attached-target", choices=SERVERS, default="sqlite",
                       help="server they attach to (default: %(default)s)")
    group.add_argument("--attach-processes", type=positive_int, metavar="P",
                       help=f"load processes holding them (default: one per "
                       f"{STREAMS_PER_PROCESS:,} streams)")
    group.add_argument("--idle-seconds", type=positive_float, default=IDLE_SECONDS, metavar="S",
                       help="seconds the server's CPU is read while they only hold; at least "
                       "the server's keepalive interval and timeout, so that every stream is "
                       "pinged in it (default: %(default)s)")


@dataclass(frozen=True)
class Attachers(Job):
    """One load process: `count` channels, each attaching client `tag-N`; they hold until
    bench says stop, then every channel closes at once (a mass disconnect)."""

    address: str
    tag: str
    count: int
    timeout: float

    async def main(self, connection):
        """Attach every client (progress as each is told it is attached), hold, let go."""
        channels = own_channels(self.address, self.count)
        calls, errors = [], Counter()
        began = time.monotonic()
        for outcome in await asyncio.gather(*(
                self.attach(number, channel, connection, calls)
                for number, channel in enumerate(channels))):
            if outcome:
                errors[outcome] += 1
        attach_s = time.monotonic() - began
        await ready_then_go(connection)
        await stop_event(connection).wait()
        await asyncio.gather(*(channel.close() for channel in channels))
        return {"attach_s": attach_s, "attached": len(calls), "errors": dict(errors)}

    async def attach(self, number, channel, connection, calls):
        """Open one Attach stream and read its first notice; the error code name or None."""
        stub = pb_grpc.ClientServiceStub(channel)
        call = stub.Attach(pb.AttachRequest(client_id=f"{self.tag}-{number}"))
        try:
            first = await asyncio.wait_for(call.read(), self.timeout + START_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        except TimeoutError:
            return "NO_ANSWER"
        if first is grpc.aio.EOF or first.notice != pb.AttachResponse.ATTACHED:
            return "NOT_ATTACHED"
        calls.append(call)
        connection.send(("progress", 1))
        return None


def other_traffic(run, server, label):
    """The latency of a light SendMessage load over a short window: its latency figures."""
    args = run.args
    spec = ClosedLoop(server.address, f"other-{label}", OTHER_TRAFFIC_IN_FLIGHT, 1_000,
                      args.call_timeout)
    with LoadGroup([spec]) as group:
        group.wait_ready()
        window = measured_window(run, server, group, warmup=1.0, seconds=args.idle_seconds,
                                 label=f"other traffic {label}")
    latencies = [value for outcome in window.outcomes for value in outcome["latencies"]]
    return latency_figures(latencies)


def connected_attachers(stub, limit=1000):
    """How many of the attaching clients (ids ATTACHER_PREFIX...) are connected, counting at
    most limit (the other traffic's clients are not theirs)."""
    found, token = 0, ""
    while found < limit:
        page = stub.ListClients(pb.ListClientsRequest(
            page_size=min(1000, limit - found), page_token=token, status=pb.STATUS_CONNECTED,
            id_prefix=ATTACHER_PREFIX), timeout=5)
        found += len(page.clients)
        token = page.next_page_token
        if not token:
            break
    return found


def seconds_until_all_offline(stub, timeout):
    """Seconds until no attaching client is connected any more (None: not within timeout)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not connected_attachers(stub, limit=1):
            return time.monotonic() - began
        time.sleep(POLL_SECONDS)
    return None


def stack_channel(run, address):
    """A channel to address, closed with the mode."""
    channel = grpc.insecure_channel(address)
    run.stack.callback(channel.close)
    return channel


def idle_cpu(run, server, group, seconds):
    """The server's CPU while the streams only hold, as a percentage of one core."""
    before = run.cpu(server, group)
    began = time.monotonic()
    run.wait_until(time.monotonic_ns() + int(seconds * SECOND_NS), "attached: idling")
    after = run.cpu(server, group)
    return 100.0 * (after.server - before.server) / CLOCK_TICK / (time.monotonic() - began)


def run_attached(run):
    """Other traffic alone, then N attached clients: attach, idle, other traffic beside them,
    a mass disconnect."""
    args = run.args
    clients = args.attached
    processes = args.attach_processes or max(1, math.ceil(clients / STREAMS_PER_PROCESS))
    server = run.start_server(args.attached_target,
                              flags=("--max-attached", str(max(clients, 1) * 2)))
    without = other_traffic(run, server, "without attached clients")
    rss_before, threads_before = rss_bytes(server.pid), thread_count(server.pid)
    specs = [Attachers(server.address, f"{ATTACHER_PREFIX}p{index}", count, args.call_timeout)
             for index, count in enumerate(split(clients, processes))]
    run.show(f"{clients:,} clients attaching", total=clients)
    with LoadGroup(specs) as group:
        group.wait_ready(START_TIMEOUT + clients / 100, on_progress=run.advance)
        channel = stack_channel(run, server.address)
        stub = pb_grpc.ClientServiceStub(channel)
        counted = connected_attachers(stub, limit=clients + 1)
        rss_held, threads_held = rss_bytes(server.pid), thread_count(server.pid)
        idle = idle_cpu(run, server, group, args.idle_seconds)
        still = connected_attachers(stub, limit=clients + 1)
        beside = other_traffic(run, server, "beside them")
        group.go(0, 0)
        group.stop()
        detach_s = seconds_until_all_offline(stub, START_TIMEOUT + clients / 100)
        outcomes = group.results(args.call_timeout + 60)
    errors = Counter()
    for outcome in outcomes:
        errors.update(outcome["errors"])
    attach_s = max(outcome["attach_s"] for outcome in outcomes)
    figures = {
        "clients": clients, "processes": processes, "target": args.attached_target,
        "attached": sum(outcome["attached"] for outcome in outcomes), "counted": counted,
        "still_connected_after_idle": still,
        "errors": dict(errors), "attach_s": attach_s,
        "attach_per_s": clients / attach_s if attach_s else None,
        "rss_per_attached": (rss_held - rss_before) / clients,
        "threads_before": threads_before, "threads_held": threads_held,
        "threads_per_stream": (threads_held - threads_before) / clients,
        "idle_core_percent": idle, "detach_s": detach_s,
        "p99_without_ms": without["p99_ms"], "p99_beside_ms": beside["p99_ms"],
        "p99_ratio": ratio(beside["p99_ms"], without["p99_ms"]),
    }
    figures["verdicts"] = verdicts(GOALS, figures)
    return figures


def render_attached(figures):
    """The attached-clients figures beside their goals."""
    goals = {goal.key: goal for goal in GOALS}
    table = figure_table(f"{figures['clients']:,} attached clients (own channel each, "
                         f"{figures['processes']} load process(es)), on {figures['target']}")
    table.add_row("attached / counted connected",
                  f"{figures['attached']:,} / {figures['counted']:,}", "all of them")
    table.add_row("still connected after they idled", f"{figures['still_connected_after_idle']:,}",
                  "all of them")
    table.add_row("errors", fmt_errors(figures["errors"]), "")
    table.add_row("attached in", f"{fmt(figures['attach_s'], 1)} s", "")
    table.add_row("attach rate", f"{fmt(figures['attach_per_s'], thousands=True)}/s", "")
    table.add_row("server RSS per attached client",
                  f"{fmt(figures['rss_per_attached'], thousands=True)} B", "reported")
    table.add_row("server threads before / holding them",
                  f"{figures['threads_before']} / {figures['threads_held']} "
                  f"{mark(goals['threads_per_stream'], figures['threads_per_stream'])}",
                  f"{goals['threads_per_stream'].describe()} (no thread each)")
    table.add_row("server CPU while they idle",
                  f"{fmt(figures['idle_core_percent'], 2)}% "
                  f"{mark(goals['idle_core_percent'], figures['idle_core_percent'])}",
                  goals["idle_core_percent"].describe())
    table.add_row("other traffic p99 without / beside them",
                  f"{fmt(figures['p99_without_ms'], 2)} / {fmt(figures['p99_beside_ms'], 2)} ms "
                  f"{mark(goals['p99_ratio'], figures['p99_ratio'])}",
                  goals["p99_ratio"].describe())
    table.add_row("all offline after a mass disconnect in",
                  f"{fmt(figures['detach_s'], 2)} s", "reported")
    return [table]


MODE = Mode("attached", "N clients each holding an Attach stream: their cost, attach rate, "
            "detach after a mass disconnect, other traffic's p99 beside them", add_flags,
            run_attached, render_attached)
