"""The command line: the presets, the options every mode shares, and main, which runs the
chosen modes, prints their tables and writes every figure to JSON."""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

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

from bench import attached, connections, profile, scale, soak, throughput, watch
from bench.baselines import STOP_SIGNALS, serve_baseline
from bench.harness import Run, positive_float, positive_int
from bench.machine import machine_info, source_version
from bench.processes import BenchError, raise_fd_limit

logger = logging.getLogger("bench")

MODES = {mode.name: mode for mode in (throughput.MODE, scale.MODE, connections.MODE, watch.MODE,
                                      attached.MODE, soak.MODE, profile.MODE)}
PRESETS = {
    "quick": {"rounds": 3, "window": 5.0, "load": ["asyncio"],
              "targets": ["asyncio-dict", "memory", "memory+lease", "sqlite"],
              "scale": [10_000], "scale_redis": False, "connections": 500,
              "connections_seconds": 5.0, "watchers": 200, "watch_two_replicas": False,
              "attached": 1_000, "soak_seconds": 60.0,
              "modes": ["throughput", "scale", "connections", "watch", "attached"]},
    "full": {"rounds": 7, "window": 10.0, "load": ["asyncio", "threads"],
             "targets": ["ceiling+protobuf", "floor", "asyncio-dict", "memory", "memory+lease",
                         "sqlite", "redis", "redis-2"],
             "scale": [100_000, 1_000_000], "scale_redis": True, "connections": 4_000,
             "connections_seconds": 20.0, "watchers": 1_000, "watch_two_replicas": True,
             "attached": 10_000, "soak_seconds": 60.0,
             "modes": ["throughput", "scale", "connections", "watch", "attached", "soak"]},
}


def build_parser():
    """The command line; options left unset take the quick or --full preset."""
    quick, full = PRESETS["quick"], PRESETS["full"]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the presence server beside grpcio alone (the ceiling: raw "
        "bytes in, a constant reply out) and the other baselines, and check the figures we "
        "hold ourselves to. Everything measured runs in processes of its own on loopback ports "
        "picked at run time and is stopped afterwards.",
        epilog="Modes: " + "; ".join(f"{name}: {mode.help}" for name, mode in MODES.items())
        + ". Examples: `python -m bench` (quick, a few minutes), `python -m bench --full` "
        "(its throughput windows alone add up to about 20 minutes), "
        "`python -m bench --only scale --scale 1000000`, "
        "`python -m bench --only scale --scale 1000000 --scale-redis`, "
        "`python -m bench --only throughput --load threads`, "
        "`python -m bench --only watch --watchers 1000`, "
        "`python -m bench --only throughput --targets redis redis-2`, "
        "`python -m bench --only watch --watchers 1000 --watch-target redis-2`, "
        "`python -m bench --only attached --attached 10000`, "
        "`python -m bench --only soak --soak-seconds 600`, `make bench ARGS=--full`. Results "
        "go to the terminal and, with every per-round figure, to the --output JSON file.",
    )
    parser.add_argument("--full", action="store_true",
                        help=f"the full run: {full['rounds']} rounds of {full['window']:g} s with "
                        "every baseline and both load shapes, scale "
                        f"at {', '.join(f'{n:,}' for n in full['scale'])}, "
                        f"{full['connections']:,} connections for "
                        f"{full['connections_seconds']:g} s, {full['watchers']:,} watchers "
                        "(on memory://, then over two replicas on Redis), "
                        f"a {full['soak_seconds']:g} s soak")
    parser.add_argument("--only", nargs="+", choices=list(MODES), metavar="MODE",
                        help=f"run only these modes ({', '.join(MODES)}); default: "
                        f"{', '.join(quick['modes'])}, and with --full also "
                        f"{', '.join(set(full['modes']) - set(quick['modes']))}")
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"),
                        help="JSON file for every figure (default: %(default)s)")
    add_load_flags(parser, quick, full)
    for mode in MODES.values():
        mode.add_flags(parser, quick, full)
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the benchmark's own log (default: %(default)s)")
    return parser


def add_load_flags(parser, quick, full):
    """The options of the SendMessage load that throughput and scale share."""
    load = parser.add_argument_group("the SendMessage load")
    load.add_argument("--processes", type=positive_int, default=1,
                      help="load processes (default: %(default)s)")
    load.add_argument("--in-flight", type=positive_int, default=32,
                      help="calls each load process keeps in flight (default: %(default)s)")
    load.add_argument("--ids", type=positive_int, default=10_000,
                      help="client ids per load process; hello and goodbye alternate per id, so "
                      "every call is a change (default: %(default)s)")
    load.add_argument("--warmup", type=positive_float, default=2.0,
                      help="seconds of load before each window (default: %(default)s)")
    load.add_argument("--window", type=positive_float,
                      help=f"seconds measured (quick: {quick['window']:g}, --full: "
                      f"{full['window']:g})")
    load.add_argument("--call-timeout", type=positive_float, default=5.0,
                      help="deadline of every call, seconds (default: %(default)s)")


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
    """SIGTERM stops the benchmark as Ctrl-C does, stopping everything it started."""
    raise KeyboardInterrupt


def run_modes(args, console, results):
    """Each chosen mode in turn: its figures into results, its tables printed; the Run."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(), console=console,
                        refresh_per_second=4)
    with contextlib.ExitStack() as stack, progress:
        run = Run(args, console, progress, stack)
        results["source"]["server_py"] = run.server_sources
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


def main(argv=None):
    """Run the chosen modes, print their tables, write the JSON; 0 when every mode ran."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_baseline"]:
        return serve_baseline(argv[1:])
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    logging.basicConfig(level=args.log_level, format="%(message)s", datefmt="%X",
                        handlers=[RichHandler(console=console, show_path=False)])
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    raise_fd_limit()
    results = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": {**source_version(), "server_py": {}},
        "options": {key: value if not isinstance(value, Path) else str(value)
                    for key, value in vars(args).items()},
    }
    status = 0
    try:
        run_modes(args, console, results)
    except KeyboardInterrupt:
        logger.warning("interrupted: every server and load process stopped")
        status = 130
    except BenchError as error:
        logger.error("%s", error)
        status = 1
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    if len(results["source"]["server_py"]) > 1:
        logger.warning("server.py changed during this run: %s", results["source"]["server_py"])
    write_results(args.output, results)
    console.print(f"results: {args.output}")
    return status
