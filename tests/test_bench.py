"""bench.py end to end at a tiny size: every mode runs, stops what it started, and writes
figures that add up. Speed itself is never asserted here (DESIGN section 7: the benchmark
measures it, as ratios, on its own).
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import allure
import grpc
import pytest

import bench
import server as presence
from conftest import DEADLINE, ROOT
from generated import connection_pb2 as pb

SMOKE = ["--only", "throughput", "scale", "connections", "watch", "soak",
         "--targets", "floor", "memory", "sqlite", "--rounds", "1", "--window", "0.5",
         "--warmup", "0.2", "--scale", "2000", "--connections", "20",
         "--connections-seconds", "1", "--watchers", "5", "--watch-seconds", "1",
         "--soak-seconds", "2", "--soak-clients", "20", "--soak-watchers", "2"]


def processes_marked(mark):
    """The live processes whose environment holds mark: bench.py's descendants, whatever
    session they run in (a process inherits its parent's environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def processes_ended(mark):
    """Wait, up to DEADLINE, for the marked processes to end; those still alive.

    multiprocessing's resource tracker ends a moment after bench.py, once it sees its pipe close.
    A pidfd turns readable when its process ends, so each is waited for, not polled.
    """
    deadline = time.monotonic() + DEADLINE
    for pid in processes_marked(mark):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # ended meanwhile
            continue
        try:
            select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))
        finally:
            os.close(pidfd)
    return processes_marked(mark)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One tiny run of every mode: (exit code, terminal output, JSON results, processes it
    started that are still alive afterwards).

    A run that wrote no JSON gives {} here, so the first test fails with bench's output.
    """
    output = tmp_path_factory.mktemp("bench") / "results.json"
    token = uuid.uuid4().hex
    bench_process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench.py"), *SMOKE, "--output", str(output)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PRESENCE_BENCH_SMOKE": token})
    try:
        text, _ = bench_process.communicate(timeout=110)
    finally:
        bench_process.kill()
        bench_process.wait()
    left = processes_ended(f"PRESENCE_BENCH_SMOKE={token}".encode())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    results = json.loads(output.read_text()) if output.exists() else {}
    return bench_process.returncode, text, results, left


@allure.feature("Benchmark")
@allure.story("Every mode runs")
def test_every_mode_runs_stops_what_it_started_and_writes_its_figures(smoke):
    returncode, output, results, left = smoke
    assert returncode == 0, output[-3000:]
    assert left == [], "bench.py left processes running"
    for mode in ("throughput", "scale", "connections", "watch", "soak"):
        assert mode in results, f"no {mode} figures in {sorted(results)}"
    assert "SendMessage throughput" in output
    assert "other processes on the machine used" in output


@allure.feature("Benchmark")
@allure.story("Throughput")
def test_throughput_compares_every_target_with_the_ceiling(smoke):
    medians = smoke[2]["throughput"]["median"]
    assert list(medians) == ["ceiling", "floor", "memory", "sqlite"]
    for name, figures in medians.items():
        assert figures["calls"] > 0, name
        assert figures["errors"] == {}, (name, figures["errors"])
        assert figures["cpu_us_per_call"] > 0, name
    assert medians["ceiling"]["cpu_ratio"] == 1.0
    assert medians["memory"]["cpu_ratio"] == pytest.approx(
        medians["memory"]["cpu_us_per_call"] / medians["ceiling"]["cpu_us_per_call"])
    assert set(smoke[2]["throughput"]["verdicts"]) == {"memory", "sqlite"}


@allure.feature("Benchmark")
@allure.story("Scale, connections, watch, soak")
def test_the_other_modes_lose_nothing(smoke):
    results = smoke[2]
    (scale,) = results["scale"]["runs"]
    assert scale["registered"] == 2000
    assert scale["map_answered"] == 1 and scale["others_errors"] == {}
    assert results["connections"]["calls"] > 0
    assert results["connections"]["errors"] == {}
    watch = results["watch"]
    assert watch["events_received"] == watch["events_expected"] == 5 * watch["changes"] > 0
    assert (watch["missing"], watch["duplicates"], watch["cut_off"]) == (0, 0, 0)
    soak = results["soak"]
    assert soak["calls"] > 0 and soak["errors"] == {}
    assert (soak["watch_missing"], soak["watch_duplicates"]) == (0, 0)


class Aborted(Exception):
    """What context.abort raises here, as gRPC's own context does."""


class Context:
    """The one part of a gRPC servicer context SendMessage uses."""

    def abort(self, code, details):
        raise Aborted(code, details)


def answers(service, request):
    """The serialized reply, or the (code, details) it was refused with."""
    try:
        reply = service.SendMessage(request, Context())
    except Aborted as refusal:
        return refusal.args
    return reply.SerializeToString()


@allure.feature("Benchmark")
@allure.story("Throughput")
def test_the_floor_answers_plain_calls_as_our_server_does(clock):
    """The floor is only a floor if it does what we do: the same bytes for every plain call,
    the same refusals."""
    floor = bench.FloorService(clock)
    ours = presence.ClientService(presence.Registry(presence.MemoryStore(), clock))
    calls = [("alice", "hello"), ("alice", "hello"), ("alice", "goodbye"), ("alice", " Hello "),
             ("bob", "goodbye"), ("bob", "goodbye"), ("bob", "bye"), ("", "hello"),
             ("x" * 129, "hello")]
    for client_id, text in calls:
        clock.advance(1.5)
        request = pb.MessageRequest(client_id=client_id, message=text)
        assert answers(floor, request) == answers(ours, request), (client_id, text)
    session = pb.MessageRequest(client_id="carol", message="hello", session_id="laptop")
    assert answers(floor, session)[0] == grpc.StatusCode.UNIMPLEMENTED
