"""Mode soak: thousands of clients on channels of their own, one mixed call a second each, and
watchers, for minutes: errors, memory, and whether latency drifts."""

import math
import time
from collections import Counter

import grpc

from bench.figures import (
    SECOND_NS,
    Goal,
    checked,
    cores_rows,
    figure_table,
    fmt,
    fmt_errors,
    fmt_ratio,
    latency_figures,
    ms,
    outcome_rows,
    percentile,
    ratio,
    slope,
    split,
    verdicts,
)
from bench.harness import Mode, measured_window, positive_float, positive_int
from bench.machine import fd_count, rss_bytes, thread_count
from bench.mixed import SOAK_LEASE_SECONDS, SOAK_MIX, SOAK_OPS, Mix
from bench.processes import START_TIMEOUT, LoadGroup
from bench.watch import WATCH_DRAIN_SECONDS
from bench.watchers import Watchers
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

SOAK_PROCESSES = 4
SOAK_TARGETS = ("memory", "sqlite")  # one server each: the soak reads one process's memory
SOAK_WATCHERS = 100
SOAK_SLICE_SECONDS = 10
RSS_SAMPLE_SECONDS = 1.0
GOALS = (
    Goal("error_count", "errors", 0),
    Goal("p99_ms", "p99", 50, unit=" ms"),
    Goal("watch_missing", "watch events missing", 0),
    Goal("watch_duplicates", "watch events repeated", 0),
    Goal("watch_cut_off", "watchers cut off", 0),
)


def add_flags(parser, quick, full):
    """--soak-seconds, --soak-clients, --soak-target, --soak-watchers."""
    group = parser.add_argument_group("soak mode")
    group.add_argument("--soak-seconds", type=positive_float, metavar="S",
                       help=f"seconds measured (default: {full['soak_seconds']:g})")
    group.add_argument("--soak-clients", type=positive_int, default=2_000, metavar="N",
                       help="clients, each on a channel of its own, in "
                       f"{SOAK_PROCESSES} load processes (default: %(default)s, what the ceiling "
                       "serves on 2 cores; 4,000 is past it)")
    group.add_argument("--soak-target", choices=SOAK_TARGETS, default="memory",
                       help="server soaked (default: %(default)s)")
    group.add_argument("--soak-watchers", type=int, default=SOAK_WATCHERS, metavar="N",
                       help="watchers meanwhile, in a load process of their own; 0 for none "
                       "(default: %(default)s)")


def run_soak(run):
    """Thousands of clients on channels of their own, one SOAK_MIX call a second each, and
    --soak-watchers watchers, for minutes: errors, memory and whether latency drifts."""
    args = run.args
    clients, seconds = args.soak_clients, args.soak_seconds
    processes = min(SOAK_PROCESSES, clients)
    server = run.start_server(args.soak_target)
    label = f"soak: {clients:,} clients"
    run.show(f"{label}: {args.soak_watchers} watchers")
    watch_specs = ([Watchers(server.address, args.soak_watchers, keep=False)]
                   if args.soak_watchers > 0 else [])
    with grpc.insecure_channel(server.address) as channel, LoadGroup(watch_specs) as watch:
        stub = pb_grpc.ClientServiceStub(channel)
        watch.wait_ready()
        specs = [Mix(server.address, f"soak-p{index}", share, args.call_timeout, index)
                 for index, share in enumerate(split(clients, processes))]
        run.show(f"{label}: connecting and registering", total=clients)
        began = time.monotonic()
        with LoadGroup(specs) as group:
            group.wait_ready(START_TIMEOUT + 30, on_progress=run.advance)
            connect_s = time.monotonic() - began
            window = soak_window(run, server, group, watch, stub, label)
        seen = drain_watchers(run, watch, stub, label)
    server.check()
    server.stop()
    figures = {"clients": clients, "processes": processes, "seconds": seconds,
               "target": args.soak_target, "watchers": args.soak_watchers, "connect_s": connect_s,
               "mix": dict(SOAK_MIX), "lease_seconds": SOAK_LEASE_SECONDS,
               **soak_figures(window, clients), **soak_watchers(*seen)}
    figures["verdicts"] = verdicts(GOALS, figures)
    return figures


def soak_window(run, server, group, watch, stub, label):
    """The measured window of the soak, the server's RSS sampled meanwhile and its revision,
    threads and fds read at either end."""
    args = run.args

    def readings():
        """The revision, threads and fds at one end of the window."""
        revision = stub.CountClients(pb.CountClientsRequest(), timeout=args.call_timeout).revision
        return revision, thread_count(server.pid), fd_count(server.pid)

    return measured_window(
        run, server, group, warmup=args.warmup, seconds=args.soak_seconds, label=label,
        others=(watch,), at_start=readings, at_end=readings,
        measure=lambda start_ns, end_ns: sample_rss(run, server, start_ns, end_ns,
                                                    f"{label}: soaking"))


def drain_watchers(run, watch, stub, label):
    """Wait for the watchers to reach the last revision; what they saw, and that revision."""
    final = stub.CountClients(pb.CountClientsRequest(), timeout=run.args.call_timeout).revision
    watch.tell((final, time.monotonic_ns() + int(WATCH_DRAIN_SECONDS * SECOND_NS)))
    run.show(f"{label}: waiting for the watchers to reach revision {final:,}")
    seen = watch.gather("reached", WATCH_DRAIN_SECONDS + 60)
    watch.stop()
    watch.results(60)
    return seen, final


def soak_figures(window, clients):
    """The clients' calls, errors, latencies and slices, and the server's CPU and resources."""
    outcomes, seconds = window.outcomes, window.seconds
    calls = sum(len(outcome["latencies"]) for outcome in outcomes)
    errors, setup_errors = Counter(), Counter()
    for outcome in outcomes:
        errors.update(outcome["errors"])
        setup_errors.update(outcome["setup_errors"])
    (revision_start, threads_start, fds_start), (revision_end, threads_end, fds_end) = (
        window.at_start, window.at_end)
    return {
        "calls": calls + sum(errors.values()), "calls_due": int(clients * seconds),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "setup_errors": dict(setup_errors),
        **latency_figures([value for outcome in outcomes for value in outcome["latencies"]]),
        **soak_slices(outcomes, window.start_ns, seconds, window.during),
        **window.cpu(calls + sum(errors.values())),
        "changes": revision_end - revision_start,
        "server_threads": [threads_start, threads_end], "server_fds": [fds_start, fds_end],
    }


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
                                        outcome["kinds"], strict=True):
            by_slice[min(slices - 1, (began - start_ns) // width)].append(latency)
            by_kind[kind].append(latency)
        for began in outcome["error_starts"]:
            errors_by_slice[min(slices - 1, (began - start_ns) // width)] += 1
    p99s = [ms(percentile(values, 0.99)) for values in by_slice]
    growth = slope(rss)
    return {
        "slices": [{"from_s": index * SOAK_SLICE_SECONDS, "calls": len(values),
                    "errors": errors_by_slice[index], "p99_ms": p99s[index],
                    "max_ms": ms(max(values, default=None)),
                    "rss_mib": next((size / 2**20 for at, size in reversed(rss)
                                     if at <= (index + 1) * SOAK_SLICE_SECONDS), None)}
                   for index, values in enumerate(by_slice)],
        "p99_ms_by_call": {op: ms(percentile(values, 0.99))
                           for op, values in zip(SOAK_OPS, by_kind, strict=True)},
        "calls_by_kind": {op: len(values) for op, values in zip(SOAK_OPS, by_kind, strict=True)},
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
    """The soak's figures beside their goals (those of connections and watch)."""
    goals = {goal.key: goal for goal in GOALS}
    mix = ", ".join(f"{op} {weight}%" for op, weight in figures["mix"].items())
    table = figure_table(f"Soak: {figures['clients']:,} clients (own channel each, "
                        f"{figures['processes']} load processes), one call a second each "
                        f"({mix}), and {figures['watchers']} watchers, {figures['seconds']:g} s "
                        f"on {figures['target']}")
    retried = (f" (retried: {fmt_errors(figures['setup_errors'])})"
               if figures.get("setup_errors") else "")
    table.add_row("connected and registered in", f"{figures['connect_s']:.1f} s{retried}", "")
    table.add_row("calls made / due", f"{figures['calls']:,} / {figures['calls_due']:,}", "")
    table.add_row("changes (revisions) in the window", f"{figures['changes']:,}", "")
    outcome_rows(table, goals, figures, " (at 4,000)")
    table.add_row("p99 ms by call", ", ".join(
        f"{op} {fmt(value, 1)}" for op, value in figures["p99_ms_by_call"].items()), "")
    table.add_row(f"p99 ms per {SOAK_SLICE_SECONDS} s slice",
                  " | ".join(fmt(entry["p99_ms"], 1) for entry in figures["slices"]), "")
    table.add_row("drift: last slice p99 / first", fmt_ratio(figures["drift"]), "no target")
    table.add_row("server RSS start → end (peak) MiB",
                  f"{figures['rss_start_mib']:.0f} → {figures['rss_end_mib']:.0f} "
                  f"({figures['rss_peak_mib']:.0f})", "")
    table.add_row("server RSS growth MiB/minute", fmt(figures["rss_mib_per_minute"], 1),
                  "no target")
    table.add_row("server threads start → end",
                  " → ".join(f"{n:,}" for n in figures["server_threads"]), "")
    table.add_row("server fds start → end", " → ".join(f"{n:,}" for n in figures["server_fds"]),
                  "")
    table.add_row("server CPU µs/call", fmt(figures["cpu_us_per_call"], 1), "")
    cores_rows(table, figures)
    if figures["watch_events"] is not None:
        watch_rows(table, goals, figures)
    return [table]


def watch_rows(table, goals, figures):
    """The rows of the soak's watchers."""
    table.add_row("watch: events received (changes seen by one: reasons)",
                  f"{figures['watch_events']:,} ("
                  + ", ".join(f"{reason} {n:,}"
                              for reason, n in sorted(figures["watch_reasons"].items())) + ")",
                  "")
    table.add_row("watch: events missing",
                  checked(goals, figures, "watch_missing", f"{figures['watch_missing']:,}"),
                  "every change reaches all")
    table.add_row("watch: events repeated",
                  checked(goals, figures, "watch_duplicates", f"{figures['watch_duplicates']:,}"),
                  "none")
    table.add_row("watch: streams cut off",
                  checked(goals, figures, "watch_cut_off", f"{figures['watch_cut_off']:,}"),
                  "none")
    others = {code: n for code, n in figures["watch_ended"].items()
              if code != "RESOURCE_EXHAUSTED"}
    if others:
        table.add_row("watch: streams ended otherwise", fmt_errors(others), "")


MODE = Mode("soak", "thousands of clients making mixed calls, and watchers, for minutes "
            "(--full only)", add_flags, run_soak, render_soak)
