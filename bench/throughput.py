"""Mode throughput: SendMessage against the ceiling and the targets, in rounds of rotating
order, under one or both load shapes; every ratio is to the ceiling of the same round."""

import logging
import math
import statistics
import time
from collections import Counter

from rich.table import Table

from bench.figures import (
    Goal,
    fmt,
    fmt_errors,
    fmt_ratio,
    latency_figures,
    mark,
    median,
    ratio,
    rotate,
    verdicts,
)
from bench.harness import Mode, measured_window, nothing, positive_int
from bench.jobs import LEASE_PASSES, LOAD_SHAPES, scale_width
from bench.processes import LoadGroup
from bench.replicas import Replicas

logger = logging.getLogger("bench")

# The targets beside the ceiling: the floor (the least a correct plain call does, see
# FloorService), asyncio-dict (the simplest earlier implementation), ours with memory://, ours
# with memory:// and every call naming a session with a lease, ours with SQLite, ours as one
# replica on a Redis of its own, and as two replicas on one Redis with the load over both.
TARGETS = ("ceiling", "ceiling+protobuf", "floor", "asyncio-dict", "memory", "memory+lease",
           "sqlite", "redis", "redis-2")
LABELS = {"ceiling+protobuf": "ceiling + protobuf", "asyncio-dict": "asyncio dict"}
NOTES = {
    "ceiling": "baseline: grpcio alone",
    "ceiling+protobuf": "no target; what protobuf and our pool add to grpcio",
    "floor": "no target; the least a correct plain call does",
    "asyncio-dict": "no target; the simplest earlier implementation (grpc.aio, a dict)",
}
LEASE_SECONDS = 60
NOISE_WARNING = 0.2
RATIOS = {"throughput_ratio": "calls_per_s", "p99_ratio": "p99_ms", "cpu_ratio": "cpu_us_per_call",
          "p50_ratio": "p50_ms"}
# memory+lease beside plain memory: what leases and sessions cost on the write path.
LEASE_RATIOS = {"throughput_vs_memory": "calls_per_s", "p99_vs_memory": "p99_ms",
                "cpu_vs_memory": "cpu_us_per_call"}
# How far each ratio moves from one load shape to the other.
SHAPE_GAPS = {"cpu_ratio_shape_gap": "cpu_ratio", "throughput_ratio_shape_gap": "throughput_ratio",
              "p99_ratio_shape_gap": "p99_ratio"}
SHAPE_GAP_GOALS = (
    Goal("cpu_ratio_shape_gap", "CPU × moves under the other load by", 0.1, unit="×"),
    Goal("throughput_ratio_shape_gap", "calls/s × moves under the other load by", 0.1, unit="×"),
    Goal("p99_ratio_shape_gap", "p99 × moves under the other load by", 0.1, unit="×"),
)
# redis-2 beside redis: what a second replica on the same Redis costs each call.
REPLICA_RATIOS = {"cpu_vs_redis": "cpu_us_per_call", "throughput_vs_redis": "calls_per_s"}
GOALS = {
    "memory": (Goal("cpu_ratio", "CPU", 1.30, unit="×"),
               Goal("cpu_vs_asyncio_dict", "CPU vs asyncio dict", 1.0, unit="×", strict=True),
               Goal("throughput_ratio", "calls/s", 0.88, at_most=False, unit="×"),
               Goal("p99_ratio", "p99", 1.5, unit="×"), *SHAPE_GAP_GOALS),
    "sqlite": (Goal("cpu_ratio", "CPU", 1.60, unit="×"),
               Goal("throughput_ratio", "calls/s", 0.75, at_most=False, unit="×"),
               Goal("p99_ratio", "p99", 1.5, unit="×"), *SHAPE_GAP_GOALS),
    "redis": (Goal("cpu_ratio", "CPU", 1.8, unit="×"),
              Goal("throughput_ratio", "calls/s", 0.55, at_most=False, unit="×"),
              Goal("redis_cpu_us_per_write", "Redis's CPU per write", 50, unit=" µs")),
    "redis-2": (Goal("cpu_vs_redis", "CPU vs one replica", 1.0, unit="×"),),
}


def add_flags(parser, quick, full):
    """--rounds, --targets and --load."""
    group = parser.add_argument_group("throughput mode")
    group.add_argument("--rounds", type=positive_int, help="rounds, the order of the targets "
                       f"rotated each round (quick: {quick['rounds']}, --full: {full['rounds']})")
    group.add_argument("--targets", nargs="+", choices=TARGETS, metavar="TARGET",
                       help="servers to compare beside the ceiling (grpcio alone: raw bytes in, "
                       "a constant reply out), which always runs: ceiling+protobuf (the request "
                       "parsed, a reply of our size serialised, our pool); floor (the least a "
                       "correct plain hello or goodbye does); asyncio-dict (a grpc.aio server "
                       "setting a dict entry); memory; memory+lease (every call with a session "
                       f"and a {LEASE_SECONDS} s lease); sqlite; redis (one replica on a "
                       "redis-server of the benchmark's own); redis-2 (two replicas on one Redis, "
                       "the load spread over both) (quick: "
                       f"{' '.join(quick['targets'])}, --full: {' '.join(full['targets'])})")
    group.add_argument("--load", nargs="+", choices=list(LOAD_SHAPES), metavar="SHAPE",
                       help="load shapes, the first one judged: asyncio (grpc.aio coroutines on "
                       "one channel) and threads (threads making blocking calls on one channel) "
                       f"(quick: {' '.join(quick['load'])}, --full: {' '.join(full['load'])})")


def load_specs(run, addresses, *, shape, processes, in_flight, tag, preloaded=0, lease=0):
    """One spec per load process and address: with several addresses (replicas) each of the
    processes becomes one per address, its calls in flight shared among them. With
    preloaded=N the load flips the first of the N preloaded clients (on one server) instead of
    new ones; with a lease every call names a session with that lease."""
    args, job = run.args, LOAD_SHAPES[shape]
    if preloaded:
        (address,) = addresses
        ids = min(args.ids, preloaded // processes)
        return [job(address, tag, in_flight, ids, args.call_timeout, first=index * ids,
                    width=scale_width(preloaded)) for index in range(processes)]
    if len(addresses) == 1:
        return [job(addresses[0], f"{tag}-p{index}", in_flight, args.ids, args.call_timeout,
                    lease=lease) for index in range(processes)]
    share = math.ceil(in_flight / len(addresses))
    return [job(address, f"{tag}-p{index}-r{number}", share, args.ids, args.call_timeout,
                lease=lease)
            for index in range(processes) for number, address in enumerate(addresses)]


def measure_load(run, server, *, label, shape="asyncio", **specs):
    """The normal load against server: warm-up, then one window; its figures."""
    args = run.args
    window = args.window
    run.show(f"{label}: starting {args.processes} load process(es)")
    redis_reading = server.redis.reading if isinstance(server, Replicas) else nothing
    jobs = load_specs(run, server.addresses, shape=shape, processes=args.processes,
                      in_flight=args.in_flight, **specs)
    with LoadGroup(jobs) as group:
        group.wait_ready()
        measured = measured_window(run, server, group, warmup=args.warmup, seconds=window,
                                   label=label, at_start=redis_reading, at_end=redis_reading)
    latencies = [value for outcome in measured.outcomes for value in outcome["latencies"]]
    errors = Counter()
    for outcome in measured.outcomes:
        errors.update(outcome["errors"])
    figures = {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / window,
        **latency_figures(latencies),
        "errors": dict(errors),
        **measured.cpu(len(latencies) + sum(errors.values())),
    }
    if isinstance(server, Replicas):
        figures.update(redis_figures(measured, figures["calls"] + sum(errors.values()), jobs))
    if figures["noise_cores"] > NOISE_WARNING:
        logger.warning("%s: other processes used %.2f cores meanwhile; these figures are noisy",
                       label, figures["noise_cores"])
    return figures


def redis_figures(measured, calls, jobs):
    """Redis's own CPU in the window, per write (every call of the load is a change), how many
    writes shared each commit script call (EVALSHA) and how many entries each follower read
    (XREAD) took, and the busiest replica's share of the calls answered (1 for one replica;
    near 0.5 for two when the load is spread evenly)."""
    (cpu_before, commands_before), (cpu_after, commands_after) = measured.at_start, measured.at_end
    redis_cpu_s = cpu_after - cpu_before

    def ran(command):
        return commands_after.get(command, 0) - commands_before.get(command, 0)

    answered = Counter()
    for job, outcome in zip(jobs, measured.outcomes, strict=True):
        answered[job.address] += len(outcome["latencies"])
    total = sum(answered.values())
    return {"redis_cpu_s": redis_cpu_s,
            "redis_cpu_us_per_write": redis_cpu_s * 1e6 / calls if calls else None,
            "writes_per_script_call": calls / ran("evalsha") if ran("evalsha") else None,
            "follower_reads_per_write": ran("xread") / calls if calls else None,
            "busiest_replica_share": max(answered.values()) / total if total else None}


def one_round(run, servers, number, shape):
    """Every target once under one load shape, in this round's order; ratios to its ceiling."""
    args, names = run.args, list(servers)
    order = rotate(names, number)
    figures = {}
    for name in order:
        lease = LEASE_SECONDS if name == "memory+lease" else 0
        figures[name] = measure_load(
            run, servers[name], shape=shape, tag="lease" if lease else f"r{number}-{shape}",
            label=f"throughput round {number + 1}/{args.rounds} ({shape}): {name}", lease=lease)
        time.sleep(0.2)
    for name in names:
        for key, figure in RATIOS.items():
            figures[name][key] = ratio(figures[name][figure], figures["ceiling"][figure])
    if "memory" in figures and "asyncio-dict" in figures:
        figures["memory"]["cpu_vs_asyncio_dict"] = ratio(
            figures["memory"]["cpu_us_per_call"], figures["asyncio-dict"]["cpu_us_per_call"])
    if "memory+lease" in figures and "memory" in figures:
        for key, figure in LEASE_RATIOS.items():
            figures["memory+lease"][key] = ratio(figures["memory+lease"][figure],
                                                 figures["memory"][figure])
    if "redis-2" in figures and "redis" in figures:
        for key, figure in REPLICA_RATIOS.items():
            figures["redis-2"][key] = ratio(figures["redis-2"][figure], figures["redis"][figure])
    return {"round": number + 1, "order": order, "targets": {name: figures[name] for name in names}}


def medians_of(rounds, names):
    """Per target, the median of every figure over the rounds, and all their errors."""
    medians = {}
    for name in names:
        per_round = [entry["targets"][name] for entry in rounds]
        keys = [key for key, value in per_round[0].items() if not isinstance(value, dict)]
        medians[name] = {key: median(figures[key] for figures in per_round) for key in keys}
        errors = Counter()
        for figures in per_round:
            errors.update(figures["errors"])
        medians[name]["errors"] = dict(errors)
    return medians


def shape_gaps(shapes, name):
    """How far the target's ratios moved from the first load shape to the others (the largest);
    None where a ratio is missing."""
    if len(shapes) < 2:
        return {}
    first, *others = (measured["median"][name] for measured in shapes.values())
    gaps = {}
    for gap, key in SHAPE_GAPS.items():
        values = [other.get(key) for other in others]
        gaps[gap] = (None if first.get(key) is None or None in values
                     else max(abs(value - first[key]) for value in values))
    return gaps


def run_throughput(run):
    """SendMessage against the ceiling and the --targets, rounds in rotating order, under each
    --load shape. memory+lease keeps its ids from round to round, so its sessions are renewed
    rather than left to expire between rounds."""
    args = run.args
    names = ["ceiling"] + [name for name in args.targets if name != "ceiling"]
    servers = {name: run.start_server(name) for name in names}
    rounds = {shape: [] for shape in args.load}
    for number in range(args.rounds):
        for shape in args.load:
            rounds[shape].append(one_round(run, servers, number, shape))
    for server in servers.values():
        server.stop()
    shapes = {shape: {"rounds": rounds[shape], "median": medians_of(rounds[shape], names)}
              for shape in args.load}
    judged = shapes[args.load[0]]["median"]
    return {
        "load": {"processes": args.processes, "in_flight": args.in_flight, "warmup_s": args.warmup,
                 "window_s": args.window, "rounds": args.rounds, "ids_per_process": args.ids,
                 "shapes": list(args.load), "lease_seconds": LEASE_SECONDS,
                 "lease_passes": LEASE_PASSES},
        "shapes": shapes,
        "verdicts": {name: verdicts(goals, {**judged[name], **shape_gaps(shapes, name)})
                     for name, goals in GOALS.items() if name in judged},
    }


def render_throughput(figures):
    """Per load shape, the comparison table (medians, ratios to the ceiling) and the per-round
    table."""
    tables = []
    for shape, measured in figures["shapes"].items():
        tables += [comparison_table(figures, shape, measured), rounds_table(shape, measured)]
    return tables


def caption_of(load, measured):
    """What the noise was, and what memory+lease does."""
    noise = [entry["targets"][name]["noise_cores"] for entry in measured["rounds"]
             for name in entry["targets"]]
    caption = (f"other processes on the machine used {statistics.mean(noise):.2f} cores on "
               f"average during the windows (max {max(noise):.2f})")
    if "memory+lease" in measured["median"]:
        passes = load["lease_passes"]
        caption += (f"\nmemory+lease: every call names a session with a {load['lease_seconds']} s "
                    f"lease; per id {passes} calls: a hello starting it, {passes - 2} renewing "
                    f"it, a goodbye (2 in {passes} calls are changes; plain memory: every call)")
    for name in ("redis", "redis-2"):
        if name in measured["median"]:
            row = measured["median"][name]
            caption += (f"\n{name}: Redis's own CPU {fmt(row['redis_cpu_us_per_write'], 1)} µs "
                        "per write (INFO cpu, system + user), "
                        f"{fmt(row.get('writes_per_script_call'), 1)} writes per commit "
                        f"script call, {fmt(row.get('follower_reads_per_write'), 2)} follower "
                        "reads per write (INFO commandstats), server CPU summed over the "
                        f"replicas, the busiest replica's share of the calls "
                        f"{fmt(row['busiest_replica_share'], 2)}")
    return caption


def goal_cell(name, row, verdict):
    """The goals of a target and whether each is met; a note for targets without goals."""
    if name == "memory+lease":
        return (f"no target; vs memory: CPU {fmt_ratio(row.get('cpu_vs_memory'))}, "
                f"calls/s {fmt_ratio(row.get('throughput_vs_memory'))}, "
                f"p99 {fmt_ratio(row.get('p99_vs_memory'))}")
    if name not in GOALS:
        return NOTES.get(name, "")
    return "\n".join(f"{goal.label} {goal.describe()} {mark(goal, verdict[goal.key]['value'])}"
                     for goal in GOALS[name])


def comparison_table(figures, shape, measured):
    """The medians of one load shape and their ratios to the ceiling."""
    load, judged = figures["load"], shape == load_shapes(figures)[0]
    table = Table(
        title=f"SendMessage throughput, {shape} load: {load['processes']} load process(es) × "
              f"{load['in_flight']} in flight, median of {load['rounds']} rounds of "
              f"{load['window_s']:g} s (×: ratio to the ceiling of the same round)",
        caption=caption_of(load, measured))
    for header in ("target", "calls/s", "×", "p50 ms", "p99 ms", "×", "max ms",
                   "server CPU µs/call", "×", "errors", "goal"):
        table.add_column(header, justify="left" if header in ("target", "goal") else "right")
    for name, row in measured["median"].items():
        verdict = figures["verdicts"].get(name)
        goals = (goal_cell(name, row, verdict) if judged or name not in GOALS
                 else f"judged under the {load_shapes(figures)[0]} load")
        table.add_row(
            LABELS.get(name, name), fmt(row["calls_per_s"], thousands=True),
            fmt_ratio(row["throughput_ratio"]), fmt(row["p50_ms"], 2), fmt(row["p99_ms"], 2),
            fmt_ratio(row["p99_ratio"]), fmt(row["max_ms"], 1), fmt(row["cpu_us_per_call"], 1),
            fmt_ratio(row["cpu_ratio"]), fmt_errors(row["errors"]), goals)
    return table


def load_shapes(figures):
    """The load shapes measured, the judged one first."""
    return figures["load"].get("shapes", list(figures["shapes"]))


def rounds_table(shape, measured):
    """Every round of one load shape, target by target."""
    names = list(measured["median"])
    rounds = Table(title=f"per round ({shape} load): calls/s | p99 ms | server CPU µs/call "
                         "(client CPU µs/call)")
    rounds.add_column("round")
    rounds.add_column("order")
    for name in names:
        rounds.add_column(LABELS.get(name, name), justify="right")
    rounds.add_column("noise cores", justify="right")
    for entry in measured["rounds"]:
        rows = [entry["targets"][name] for name in names]
        rounds.add_row(str(entry["round"]), " → ".join(entry["order"]), *(
            f"{fmt(row['calls_per_s'], thousands=True)} | {fmt(row['p99_ms'], 2)} | "
            f"{fmt(row['cpu_us_per_call'], 1)} ({fmt(row['client_cpu_us_per_call'], 0)})"
            for row in rows), fmt(max(row["noise_cores"] for row in rows), 2))
    return rounds


MODE = Mode("throughput", "SendMessage against the ceiling (grpcio alone), asyncio dict, "
            "memory://, memory+lease and SQLite under the asyncio load; --full adds ceiling + "
            "protobuf, the floor, Redis (one replica, and two on one Redis) and the threaded "
            "load",
            add_flags, run_throughput, render_throughput)
