"""Mode connections: N clients on channels of their own, one SendMessage a second each."""

import math
import time
from collections import Counter

from bench.figures import (
    Goal,
    cores_rows,
    figure_table,
    fmt,
    latency_figures,
    outcome_rows,
    split,
    verdicts,
)
from bench.harness import Mode, measured_window, positive_float, positive_int
from bench.jobs import Connections
from bench.machine import fd_count
from bench.processes import START_TIMEOUT, LoadGroup

CHANNELS_PER_PROCESS = 1000
SERVERS = ("ceiling", "memory", "sqlite")
GOALS = (
    Goal("error_count", "errors", 0),
    Goal("p99_ms", "p99", 50, unit=" ms"),
)


def add_flags(parser, quick, full):
    """--connections, --connections-seconds, --connections-target, --connection-processes."""
    group = parser.add_argument_group("connections mode")
    group.add_argument("--connections", type=positive_int, metavar="N",
                       help="connected clients, each on a channel of its own (quick: "
                       f"{quick['connections']}, --full: {full['connections']})")
    group.add_argument("--connections-seconds", type=positive_float, metavar="S",
                       help="seconds measured (quick: "
                       f"{quick['connections_seconds']:g}, --full: "
                       f"{full['connections_seconds']:g})")
    group.add_argument("--connections-target", choices=SERVERS, default="memory",
                       help="server they call (default: %(default)s; the ceiling shows "
                       "what gRPC itself manages on this machine)")
    group.add_argument("--connection-processes", type=positive_int, metavar="P",
                       help=f"load processes holding them (default: one per "
                       f"{CHANNELS_PER_PROCESS:,} clients)")


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
    with LoadGroup(specs) as group:
        group.wait_ready(START_TIMEOUT + 30, on_progress=run.advance)
        connect_s = time.monotonic() - began
        window = measured_window(run, server, group, warmup=args.warmup,
                                 seconds=args.connections_seconds, label=label,
                                 at_start=lambda: fd_count(server.pid))
    server.stop()
    latencies = [value for outcome in window.outcomes for value in outcome["latencies"]]
    errors = Counter()
    for outcome in window.outcomes:
        errors.update(outcome["errors"])
    made = sum(outcome["made"] for outcome in window.outcomes)
    figures = {
        "clients": clients, "processes": processes, "seconds": args.connections_seconds,
        "target": args.connections_target,
        "connect_s": connect_s, "server_fds": window.at_start,
        "calls": made, "calls_due": int(clients * args.connections_seconds),
        "errors": dict(errors), "error_count": sum(errors.values()),
        **latency_figures(latencies),
        **window.cpu(made),
    }
    figures["verdicts"] = verdicts(GOALS, figures)
    return figures


def render_connections(figures):
    """The connected-clients figures beside their goals."""
    goals = {goal.key: goal for goal in GOALS}
    table = figure_table(f"{figures['clients']:,} connected clients (own channel each, "
                        f"{figures['processes']} load process(es)), one SendMessage a second, "
                        f"{figures['seconds']:g} s, against {figures['target']}")
    table.add_row("connected in", f"{figures['connect_s']:.1f} s", "")
    table.add_row("server fds during the window", f"{figures['server_fds']:,}", "")
    table.add_row("calls made / due", f"{figures['calls']:,} / {figures['calls_due']:,}", "")
    outcome_rows(table, goals, figures)
    table.add_row("server CPU µs/call", fmt(figures["cpu_us_per_call"], 1), "")
    cores_rows(table, figures)
    return [table]


MODE = Mode("connections", "N connected clients calling once a second", add_flags,
            run_connections, render_connections)
