"""Mode scale: registries of N clients. A memory:// server preloaded with N clients is paged,
counted, written to and asked for the all-clients map; then a server on an SQLite file that
holds N clients is restarted, and timed until it serves again; with --scale-redis, a replica
started on a Redis that holds N clients is timed until it serves, then paged and counted."""

import logging
import random
import time

import grpc
from rich.table import Table

import server as presence
from bench.figures import SECOND_NS, Goal, fmt, fmt_errors, mark, ms, percentile, ratio, verdicts
from bench.harness import Mode, positive_int
from bench.jobs import BIG_MESSAGE, ClosedLoop, Preload, scale_id, scale_width
from bench.machine import CLOCK_TICK, process_ticks, rss_bytes
from bench.processes import START_TIMEOUT, LoadGroup
from bench.throughput import measure_load
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger("bench")

PRELOAD_PROCESSES = 2
PRELOAD_IN_FLIGHT = 2
PAGE_SIZE = 1000
PAGE_CALLS = 200
COUNT_CALLS = 200
PROBE_IN_FLIGHT = 4
PROBE_BASELINE_SECONDS = 1.0
SETTLE_SECONDS = 0.5
GOALS = (
    Goal("page_p99_ms", "page of 1,000 (p99)", 20, unit=" ms"),
    Goal("count_p99_ms", "count (p99)", 5, unit=" ms"),
    Goal("map_answered", "all-clients map answered", 1, at_most=False),
    Goal("others_p99_ms_during_map", "others' p99 during the map", 50, unit=" ms"),
    Goal("bytes_per_client", "memory per client", 250, unit=" B"),
    Goal("restart_serving_s", "SQLite restart: serving after", 3, unit=" s"),
    Goal("restart_rss_ratio", "SQLite restart: RSS / the writer's", 1.1, unit="×"),
    Goal("redis_page_p99_ms", "replica on Redis: page of 1,000 (p99)", 20, unit=" ms"),
    Goal("redis_count_p99_ms", "replica on Redis: count (p99)", 5, unit=" ms"),
)
REDIS_GOALS = {"redis_page_p99_ms", "redis_count_p99_ms"}
REDIS_FILL_SLICE = 10_000  # records per HSET when filling Redis
# Judged at a million clients only: at fewer, the server's fixed memory and start dominate.
AT_A_MILLION = {"bytes_per_client", "restart_serving_s", "restart_rss_ratio"}
MILLION = 1_000_000


def add_flags(parser, quick, full):
    """--scale and --scale-redis."""
    group = parser.add_argument_group("scale mode")
    group.add_argument("--scale", type=positive_int, nargs="+", metavar="N",
                       help="registry sizes to preload and measure (quick: "
                       f"{quick['scale'][0]:,}, --full: {' '.join(str(n) for n in full['scale'])})")
    group.add_argument("--scale-redis", action="store_true", default=None,
                       help="also fill a Redis with N clients (written straight into it), start "
                       "a replica on it, and page and count there (quick: "
                       f"{'on' if quick['scale_redis'] else 'off'}, --full: "
                       f"{'on' if full['scale_redis'] else 'off'})")


def scale_goals(clients, redis=False):
    """The scale goals that apply with this many clients (and a replica on Redis or not)."""
    return tuple(goal for goal in GOALS
                 if (goal.key not in AT_A_MILLION or clients >= MILLION)
                 and (goal.key not in REDIS_GOALS or redis))


def run_scale(run):
    """For each --scale N: a memory:// server preloaded with N clients, then an SQLite restart."""
    return {"runs": [measure_scale(run, clients) for clients in run.args.scale]}


def measure_scale(run, clients):
    """Preload `clients`, then page, count, write, ask for the all-clients map, restart."""
    args = run.args
    label = f"scale {clients:,}"
    server = run.start_server("memory")
    figures = {"clients": clients}
    options = [("grpc.max_receive_message_length", BIG_MESSAGE)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        stub.CountClients(pb.CountClientsRequest(), timeout=args.call_timeout)
        time.sleep(SETTLE_SECONDS)
        rss_before = rss_bytes(server.pid)
        figures.update(preload(run, server, clients, label))
        rss_after = rss_bytes(server.pid)
        figures.update(rss_before_mib=rss_before / 2**20, rss_after_mib=rss_after / 2**20,
                       bytes_per_client=(rss_after - rss_before) / clients)
        figures["registered"] = registered(stub, clients, label, args.call_timeout)
        figures.update(measure_reads(run, stub, clients, label))
        figures["writes"] = measure_load(run, server, tag="scale", preloaded=clients,
                                         label=f"{label}: SendMessage load")
        figures.update(measure_map(run, server, stub, label))
    server.stop()
    figures.update(measure_restart(run, clients, label))
    if run.args.scale_redis:
        figures.update(measure_replica(run, clients, label))
    figures["verdicts"] = verdicts(scale_goals(clients, run.args.scale_redis), figures)
    return figures


def preload(run, server, clients, label):
    """Register clients through the server's SendMessages; how long it took."""
    run.show(f"{label}: preloading {server.name}", total=clients)
    began = time.monotonic()
    specs = [Preload(server.address, clients, first, PRELOAD_PROCESSES, PRELOAD_IN_FLIGHT, 120)
             for first in range(PRELOAD_PROCESSES)]
    with LoadGroup(specs) as group:
        group.wait_ready()
        group.go(None, None)
        group.results(START_TIMEOUT + clients / 1000, on_progress=run.advance)
    seconds = time.monotonic() - began
    server.check()
    time.sleep(SETTLE_SECONDS)
    return {"preload_s": seconds, "preload_per_s": clients / seconds}


def registered(stub, clients, label, timeout):
    """How many clients the server counts (a warning when not all that were sent)."""
    total = stub.CountClients(pb.CountClientsRequest(), timeout=timeout).total
    if total != clients:
        logger.warning("%s: the server counts %d clients, not %d", label, total, clients)
    return total


def timed(call, arguments):
    """Call once per argument; the latencies in ns."""
    latencies = []
    for argument in arguments:
        began = time.monotonic_ns()
        call(argument)
        latencies.append(time.monotonic_ns() - began)
    return latencies


def measure_reads(run, stub, clients, label):
    """Pages of 1,000 from random places, and counts: their median and p99."""
    timeout = run.args.call_timeout
    run.show(f"{label}: {PAGE_CALLS} pages of {PAGE_SIZE:,}")
    width, rng = scale_width(clients), random.Random(clients)
    tokens = [""] + [presence.encode_page_token(scale_id(rng.randrange(clients), width))
                     for _ in range(PAGE_CALLS - 1)]
    pages = timed(lambda token: stub.ListClients(
        pb.ListClientsRequest(page_size=PAGE_SIZE, page_token=token), timeout=timeout), tokens)
    run.show(f"{label}: {COUNT_CALLS} counts")
    counts = timed(lambda _: stub.CountClients(pb.CountClientsRequest(), timeout=timeout),
                   range(COUNT_CALLS))
    return {"page_median_ms": ms(percentile(pages, 0.5)),
            "page_p99_ms": ms(percentile(pages, 0.99)),
            "count_median_ms": ms(percentile(counts, 0.5)),
            "count_p99_ms": ms(percentile(counts, 0.99))}


def measure_map(run, server, stub, label):
    """The old all-clients map while another process keeps calling SendMessage."""
    args = run.args
    probe = ClosedLoop(server.address, "probe", PROBE_IN_FLIGHT, args.ids, args.call_timeout)
    run.show(f"{label}: all-clients map, probe starting")
    with LoadGroup([probe]) as group:
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
    if error:
        logger.warning("%s: the all-clients map failed: %s", label, error)
    return {"map_answered": 0 if error else 1, "map_error": error, "map_entries": entries,
            "map_s": (ended - began) / 1e9, "map_server_cpu_s": ticks / CLOCK_TICK,
            **others_meanwhile(outcome, began, ended)}


def others_meanwhile(outcome, began, ended):
    """The probe's calls during the map, and its p99 before it."""
    calls = list(zip(outcome["starts"], outcome["latencies"], strict=True))
    during = [latency for start, latency in calls if start < ended and start + latency > began]
    before = [latency for start, latency in calls if start + latency <= began]
    return {
        "others_calls_during_map": len(during),
        "others_p99_ms_during_map": ms(percentile(during, 0.99)),
        "others_max_ms_during_map": ms(max(during, default=None)),
        "others_p99_ms_before_map": ms(percentile(before, 0.99)),
        "others_errors": outcome["errors"],
    }


def measure_restart(run, clients, label):
    """An SQLite server preloaded with `clients` through its calls, stopped gracefully, and a
    new server started on the same file: its time until it logs `listening on` and until a
    first call answers (from its process start), its RSS beside the writer's."""
    store = run.new_database()
    writer = run.start_server("sqlite", store=store)
    figures = {f"restart_{key}": value
               for key, value in preload(run, writer, clients, f"{label}: SQLite").items()}
    writer_rss = rss_bytes(writer.pid)
    run.show(f"{label}: stopping the SQLite server")
    writer.stop()
    if writer.process.returncode:
        logger.warning("%s: the SQLite server exited with %d", label, writer.process.returncode)
    restarted = run.start_server("sqlite", store=store)
    with grpc.insecure_channel(restarted.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        stub.CountClients(pb.CountClientsRequest(), timeout=run.args.call_timeout,
                          wait_for_ready=True)
        serving_s = time.monotonic() - restarted.started
        figures["restart_registered"] = registered(stub, clients, f"{label} restarted",
                                                   run.args.call_timeout)
    time.sleep(SETTLE_SECONDS)
    restarted_rss = rss_bytes(restarted.pid)
    restarted.stop()
    return {**figures, "restart_writer_exit": writer.process.returncode,
            "restart_listening_s": restarted.listening_at - restarted.started,
            "restart_serving_s": serving_s, "restart_writer_rss_mib": writer_rss / 2**20,
            "restart_rss_mib": restarted_rss / 2**20,
            "restart_rss_ratio": ratio(restarted_rss, writer_rss)}


def fill_redis(redis_process, clients):
    """Write clients straight into Redis as the replicas keep them, in a few large HSETs (far
    faster than through a server): even ids connected, odd ones gone, revisions 1 to N."""
    now, width = time.time(), scale_width(clients)
    client = redis_process.client
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, clients, REDIS_FILL_SLICE):
            pipe.hset("presence:clients", mapping={
                scale_id(number, width): presence.encode_record(presence.Client(
                    scale_id(number, width), now, now, number + 1,
                    presence.GOODBYE if number % 2 else presence.HELLO,
                    () if number % 2 else presence.DEFAULT_SESSIONS))
                for number in range(start, min(start + REDIS_FILL_SLICE, clients))})
        pipe.set("presence:revision", clients)
        pipe.execute()


def measure_replica(run, clients, label):
    """A replica started on a Redis that holds `clients`: how long Redis took to fill, how long
    the replica took to serve (from its process start), its RSS, then pages and counts on it."""
    label = f"{label}: replica on Redis"
    run.show(f"{label}: filling Redis")
    filled = {}

    def fill(redis_process):
        began = time.monotonic()
        fill_redis(redis_process, clients)
        filled["redis_fill_s"] = time.monotonic() - began

    replicas = run.start_replicas("redis", fill=fill)
    (replica,) = replicas.servers
    with grpc.insecure_channel(replica.address) as channel:
        stub = pb_grpc.ClientServiceStub(channel)
        stub.CountClients(pb.CountClientsRequest(), timeout=run.args.call_timeout,
                          wait_for_ready=True)
        serving_s = time.monotonic() - replica.started
        figures = {**filled, "redis_registered": registered(stub, clients, label,
                                                            run.args.call_timeout),
                   "redis_serving_s": serving_s, "redis_rss_mib": rss_bytes(replica.pid) / 2**20}
        figures.update({f"redis_{key}": value
                        for key, value in measure_reads(run, stub, clients, label).items()})
    replicas.check()
    replicas.stop()
    return figures


def render_scale(figures):
    """One column per registry size, each goal (set for one million) beside its figure."""
    runs = figures["runs"]
    table = Table(title="Scale: a memory:// server preloaded with N clients, then an SQLite "
                        "server restarted on N, and with --scale-redis a replica started on a "
                        "Redis holding N (the targets are set at one million)")
    table.add_column("figure")
    for entry in runs:
        table.add_column(f"N = {entry['clients']:,}", justify="right")
    table.add_column("goal")
    goals = {goal.key: goal for goal in GOALS}

    def row(name, cell, goal_key=None):
        """A row: a cell per size (with its mark where the goal applies), the goal."""
        goal = goals.get(goal_key)
        cells = [cell(entry) + (f" {mark(goal, entry.get(goal_key))}"
                                if goal in scale_goals(entry["clients"],
                                                       "redis_registered" in entry) else "")
                 for entry in runs]
        description = goal.describe() if goal else ""
        if goal_key in AT_A_MILLION:
            description += f" at {MILLION:,}"
        table.add_row(name, *cells, description)

    memory_rows(row)
    restart_rows(row)
    if any("redis_registered" in entry for entry in runs):
        replica_rows(row)
    return [table]


def memory_rows(row):
    """The rows of the memory:// server."""
    row("preload (clients/s)", lambda e: fmt(e["preload_per_s"], thousands=True))
    row("server RSS before → after (MiB)",
        lambda e: f"{e['rss_before_mib']:.0f} → {e['rss_after_mib']:.0f}")
    row("memory per client (bytes)", lambda e: fmt(e["bytes_per_client"], 0), "bytes_per_client")
    row(f"ListClients page of {PAGE_SIZE:,}: median ms", lambda e: fmt(e["page_median_ms"], 2))
    row(f"ListClients page of {PAGE_SIZE:,}: p99 ms", lambda e: fmt(e["page_p99_ms"], 2),
        "page_p99_ms")
    row("CountClients: median ms", lambda e: fmt(e["count_median_ms"], 2))
    row("CountClients: p99 ms", lambda e: fmt(e["count_p99_ms"], 2), "count_p99_ms")
    row("all-clients map: answered in s",
        lambda e: (f"{e['map_s']:.2f} ({e['map_entries']:,})" if e["map_answered"]
                   else e["map_error"].split(":")[0]), "map_answered")
    row("all-clients map: server CPU s", lambda e: fmt(e["map_server_cpu_s"], 2))
    row("SendMessage p99 ms before the map", lambda e: fmt(e["others_p99_ms_before_map"], 2))
    row("SendMessage p99 ms during the map",
        lambda e: f"{fmt(e['others_p99_ms_during_map'], 1)} "
                  f"(max {fmt(e['others_max_ms_during_map'], 0)}, "
                  f"{e['others_calls_during_map']} calls)", "others_p99_ms_during_map")
    row("SendMessage calls/s at that size", lambda e: fmt(e["writes"]["calls_per_s"],
                                                         thousands=True))
    row("SendMessage p99 ms at that size", lambda e: fmt(e["writes"]["p99_ms"], 2))
    row("SendMessage server CPU µs/call", lambda e: fmt(e["writes"]["cpu_us_per_call"], 1))
    row("  other processes' cores meanwhile (noise)",
        lambda e: fmt(e["writes"]["noise_cores"], 2))
    row("errors", lambda e: fmt_errors({**e["writes"]["errors"], **e["others_errors"]}))


def restart_rows(row):
    """The rows of the SQLite restart."""
    row("SQLite: preload (clients/s)", lambda e: fmt(e["restart_preload_per_s"], thousands=True))
    row("SQLite restart: `listening on` after (s)", lambda e: fmt(e["restart_listening_s"], 2))
    row("SQLite restart: first call answered after (s)",
        lambda e: fmt(e["restart_serving_s"], 2), "restart_serving_s")
    row("SQLite restart: RSS, writer → restarted (MiB)",
        lambda e: f"{e['restart_writer_rss_mib']:.0f} → {e['restart_rss_mib']:.0f}")
    row("SQLite restart: RSS / the writer's", lambda e: fmt(e["restart_rss_ratio"], 2),
        "restart_rss_ratio")


def replica_rows(row):
    """The rows of the replica on a filled Redis."""
    row("Redis: filled in (s)", lambda e: fmt(e.get("redis_fill_s"), 2))
    row("replica on Redis: first call answered after (s)",
        lambda e: fmt(e.get("redis_serving_s"), 2))
    row("replica on Redis: RSS (MiB)", lambda e: fmt(e.get("redis_rss_mib"), 0))
    row(f"replica on Redis: page of {PAGE_SIZE:,}: median ms",
        lambda e: fmt(e.get("redis_page_median_ms"), 2))
    row(f"replica on Redis: page of {PAGE_SIZE:,}: p99 ms",
        lambda e: fmt(e.get("redis_page_p99_ms"), 2), "redis_page_p99_ms")
    row("replica on Redis: CountClients median ms",
        lambda e: fmt(e.get("redis_count_median_ms"), 2))
    row("replica on Redis: CountClients p99 ms", lambda e: fmt(e.get("redis_count_p99_ms"), 2),
        "redis_count_p99_ms")


MODE = Mode("scale", "registries of N clients: page, count, all-clients map, memory, writes, "
            "and an SQLite server restarted on N", add_flags, run_scale, render_scale)
