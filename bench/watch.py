"""Mode watch: N watchers in a few load processes, changes at a steady rate; when each event
arrived at each watcher."""

import time
from collections import Counter

import grpc

import server as presence
from bench.figures import (
    SECOND_NS,
    Goal,
    checked,
    cores_rows,
    cpu_figures,
    figure_table,
    fmt,
    fmt_errors,
    latency_figures,
    ms,
    percentile,
    split,
    verdicts,
)
from bench.harness import Mode, positive_float, positive_int
from bench.jobs import SteadyChanges
from bench.machine import thread_count
from bench.processes import START_TIMEOUT, LoadGroup
from bench.watchers import Watchers
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

WATCH_PROCESSES = 4
WATCH_IDS = 100
WATCH_IDLE_SECONDS = 2.0
WATCH_DRAIN_SECONDS = 15.0
TARGETS = ("memory", "sqlite", "redis", "redis-2")
GOALS = (
    Goal("missing", "events missing", 0),
    Goal("duplicates", "events repeated", 0),
    Goal("cut_off", "watchers cut off", 0),
    Goal("p99_ms", "delivery p99", 250, unit=" ms"),
)


def add_flags(parser, quick, full):
    """--watchers, --watch-rate, --watch-seconds, --watch-target, --watch-two-replicas,
    --watch-processes."""
    group = parser.add_argument_group("watch mode")
    group.add_argument("--watchers", type=positive_int, metavar="N",
                       help=f"Watch streams, each on a channel of its own (quick: "
                       f"{quick['watchers']:,}, --full: {full['watchers']:,}); past the server's "
                       f"default --max-watchers ({presence.DEFAULT_MAX_WATCHERS:,}) it is raised")
    group.add_argument("--watch-rate", type=positive_float, default=50.0, metavar="R",
                       help="changes a second (default: %(default)s)")
    group.add_argument("--watch-seconds", type=positive_float, default=10.0, metavar="S",
                       help="seconds of changes (default: %(default)s)")
    group.add_argument("--watch-target", choices=TARGETS, default="memory",
                       help="server watched: memory, sqlite, redis (one replica) or redis-2 "
                       "(two replicas on one Redis, the watchers spread over both, the writer "
                       "on the first) (default: %(default)s)")
    group.add_argument("--watch-two-replicas", action="store_true", default=None,
                       help="then the same watchers again over two replicas on one Redis "
                       f"(redis-2) (quick: {'on' if quick['watch_two_replicas'] else 'off'}, "
                       f"--full: {'on' if full['watch_two_replicas'] else 'off'})")
    group.add_argument("--watch-processes", type=positive_int, default=WATCH_PROCESSES,
                       metavar="P", help="load processes holding the watchers "
                       "(default: %(default)s)")


def run_watch(run):
    """The watchers on --watch-target, and with --watch-two-replicas again on redis-2."""
    figures = watch_target(run, run.args.watch_target)
    if run.args.watch_two_replicas and run.args.watch_target != "redis-2":
        figures["two_replicas"] = watch_target(run, "redis-2")
    return figures


def watch_target(run, target):
    """N watchers in a few load processes, changes at a steady rate; when each event arrived.

    Every watcher has a channel (a connection) of its own, as separate clients would. The
    delivery latency of an event is its receive time minus the time its change was sent: all
    processes read CLOCK_MONOTONIC, which Linux keeps system-wide. Every revision the server
    makes meanwhile (CountClients before and after) is expected by every watcher, acknowledged
    or not; the latency is known for those acknowledged (the reply names the revision). With
    replicas, the watcher processes take turns over them and the writer calls the first.
    """
    args = run.args
    count = args.watchers
    flags = (["--max-watchers", str(count)] if count > presence.DEFAULT_MAX_WATCHERS else [])
    server = run.start_server(target, flags)
    processes = min(args.watch_processes, count)
    label = f"watch: {count:,} watchers on {target}"
    run.show(f"{label}: opening the streams")
    began = time.monotonic()
    addresses = server.addresses
    watcher_specs = [Watchers(addresses[index % len(addresses)], share, keep=True)
                     for index, share in enumerate(split(count, processes))]
    per_replica = [sum(spec.watchers for spec in watcher_specs if spec.address == address)
                   for address in addresses]
    writer_spec = SteadyChanges(addresses[0], args.watch_rate, WATCH_IDS, args.call_timeout)
    with grpc.insecure_channel(addresses[0]) as channel, \
            LoadGroup(watcher_specs) as group, LoadGroup([writer_spec]) as writer:
        count_clients = pb_grpc.ClientServiceStub(channel).CountClients
        group.wait_ready(START_TIMEOUT + 30)
        snapshots_s = time.monotonic() - began
        writer.wait_ready()
        threads = sum(thread_count(pid) for pid in server.pids)
        idle = idle_figures(run, server, group, writer, label)
        base = count_clients(pb.CountClientsRequest(), timeout=args.call_timeout).revision
        made, final, outcomes, seconds, cpu = fan_out(run, server, group, writer,
                                                      count_clients, base, label)
    server.check()
    server.stop()
    figures = {"watchers": count, "processes": processes, "snapshots_s": snapshots_s,
               "server_threads": threads, "idle_server_cores": idle["server_cores"],
               "delivered_s": seconds, "first_revision": base + 1, "last_revision": final}
    expected = range(base + 1, final + 1)
    figures.update(watch_figures(made, outcomes, expected, cpu))
    figures["p99_ms_per_replica"] = [
        ms(percentile(delivery_latencies(made, [outcome for spec, outcome
                                                 in zip(watcher_specs, outcomes, strict=True)
                                                 if spec.address == address], expected), 0.99))
        for address in addresses]
    figures.update(target=target, rate=args.watch_rate, seconds=args.watch_seconds,
                   ids=WATCH_IDS, watchers_per_replica=per_replica)
    figures["verdicts"] = verdicts(GOALS, figures)
    return figures


def idle_figures(run, server, group, writer, label):
    """The CPU while every watcher is open and nothing changes."""
    before = run.cpu(server, group, writer)
    run.wait_until(time.monotonic_ns() + int(WATCH_IDLE_SECONDS * SECOND_NS), f"{label}: idle")
    return cpu_figures(before, run.cpu(server, group, writer), 0, WATCH_IDLE_SECONDS)


def fan_out(run, server, group, writer, count_clients, base, label):
    """Changes at the steady rate after revision base, then until every watcher reached the
    last revision: what the writer made, that revision, what the watchers saw, the seconds it
    took and the CPU figures per change."""
    args = run.args
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
    return made, final, outcomes, seconds, cpu_figures(before, after, final - base, seconds)


def delivery_latencies(made, outcomes, expected):
    """How long each acknowledged change took to reach each watcher of these outcomes."""
    sent = dict(zip(made["revisions"], made["sent"], strict=True))
    return [arrived - sent[revision]
            for outcome in outcomes
            for revisions, times in zip(outcome["revisions"], outcome["times"], strict=True)
            for revision, arrived in first_arrivals(revisions, times, expected).items()
            if revision in sent]


def watch_figures(made, outcomes, expected, cpu):
    """Compare what every watcher received with the revisions expected."""
    sent = dict(zip(made["revisions"], made["sent"], strict=True))
    changes = len(expected)
    received, missing, duplicates, gaps = 0, 0, 0, 0
    ended = Counter()
    for outcome in outcomes:
        duplicates += sum(outcome["duplicates"])
        gaps += sum(outcome["gaps"])
        ended.update(code for code in outcome["ended"] if code)
        for revisions, times in zip(outcome["revisions"], outcome["times"], strict=True):
            seen = len(first_arrivals(revisions, times, expected))
            received += seen
            missing += changes - seen
    latencies = delivery_latencies(made, outcomes, expected)
    writes = [acknowledged - began
              for began, acknowledged in zip(made["sent"], made["acknowledged"], strict=True)]
    watchers_count = sum(len(outcome["last"]) for outcome in outcomes)
    return {
        "changes": changes, "calls": made["made"], "acknowledged": len(sent),
        "unchanged": made["unchanged"],
        "write_errors": made["errors"], "write_p99_ms": ms(percentile(writes, 0.99)),
        "events_expected": changes * watchers_count, "events_received": received,
        "missing": missing, "duplicates": duplicates, "gaps": gaps,
        "ended": dict(ended), "cut_off": ended.get("RESOURCE_EXHAUSTED", 0),
        "latencies_measured": len(latencies),
        **latency_figures(latencies),
        **cpu,
        "cpu_us_per_event": (cpu["server_cpu_s"] * 1e6 / received) if received else None,
    }


def first_arrivals(revisions, times, expected):
    """Each expected revision one watcher received, and when it first arrived."""
    seen = {}
    for revision, arrived in zip(revisions, times, strict=True):
        if revision in expected and revision not in seen:
            seen[revision] = arrived
    return seen


def render_watch(figures):
    """The fan-out figures beside their goals, and over two replicas when measured."""
    return [*watch_table(figures),
            *(watch_table(figures["two_replicas"]) if "two_replicas" in figures else [])]


def watch_table(figures):
    """One target's fan-out figures beside their goals."""
    goals = {goal.key: goal for goal in GOALS}
    table = figure_table(f"Watch: {figures['watchers']:,} watchers ({figures['processes']} load "
                        f"processes, a channel each) on {figures['target']}, "
                        f"{figures['rate']:g} changes/s for {figures['seconds']:g} s "
                        f"(hello/goodbye over {figures['ids']} ids, one writer process)")
    add = table.add_row
    add("every watcher had its snapshot after", f"{figures['snapshots_s']:.1f} s", "")
    if len(figures["watchers_per_replica"]) > 1:
        add("watchers on each replica (the writer on the first)",
            " + ".join(f"{count:,}" for count in figures["watchers_per_replica"]), "")
        add("server threads (all replicas)", f"{figures['server_threads']:,}", "")
        add("delivery p99 ms on each replica",
            " + ".join(fmt(value, 1) for value in figures.get("p99_ms_per_replica", [])), "")
    else:
        add("server threads", f"{figures['server_threads']:,}", "")
    add("server cores, watchers idle", fmt(figures["idle_server_cores"], 2), "")
    unchanged = f", {figures['unchanged']:,} unchanged" if figures["unchanged"] else ""
    add("changes made (calls, acknowledged)",
        f"{figures['changes']:,} ({figures['calls']:,}, {figures['acknowledged']:,}{unchanged})",
        "")
    add("write errors", fmt_errors(figures["write_errors"]), "")
    add("write p99 ms (until acknowledged)", fmt(figures["write_p99_ms"], 2), "")
    add("events expected (changes × watchers)", f"{figures['events_expected']:,}", "")
    add("events received", f"{figures['events_received']:,}", "")
    add("missing", checked(goals, figures, "missing", f"{figures['missing']:,}"),
        "every change reaches all")
    add("repeated", checked(goals, figures, "duplicates", f"{figures['duplicates']:,}"), "none")
    add("streams cut off (RESOURCE_EXHAUSTED)",
        checked(goals, figures, "cut_off", f"{figures['cut_off']:,}"), "none")
    others = {code: n for code, n in figures["ended"].items() if code != "RESOURCE_EXHAUSTED"}
    if others:
        add("streams ended otherwise", fmt_errors(others), "")
    add("delivery p50 ms (receive − send; acknowledged changes)", fmt(figures["p50_ms"], 1), "")
    add("delivery p99 ms", checked(goals, figures, "p99_ms", fmt(figures["p99_ms"], 1)),
        goals["p99_ms"].describe())
    add("delivery max ms", fmt(figures["max_ms"], 1), "")
    add("all delivered after", f"{figures['delivered_s']:.1f} s", "")
    add("server CPU µs per change (per event)",
        f"{fmt(figures['cpu_us_per_call'], 0)} ({fmt(figures['cpu_us_per_event'], 1)})", "")
    cores_rows(table, figures)
    return [table]


MODE = Mode("watch", "N watchers, changes at a steady rate: every event, its delivery latency",
            add_flags, run_watch, render_watch)
