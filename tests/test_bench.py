"""The benchmark (python -m bench) end to end at a tiny size: every mode and load shape runs,
stops what it started, and writes figures that add up. Speed itself is never asserted here:
the benchmark measures it, as ratios, on its own.
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

import server as presence
from bench.baselines import FloorService
from bench.scale import MILLION, scale_goals
from bench.watchers import WatchTally
from conftest import DEADLINE, ROOT, ServerProcess, connect
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

pytestmark = [allure.feature("Benchmark")]

TARGETS = ["ceiling", "ceiling+protobuf", "floor", "asyncio-dict", "memory", "sqlite", "redis",
           "redis-2"]
SMOKE = ["--only", "throughput", "scale", "connections", "watch", "attached", "soak",
         "--targets", *TARGETS[1:], "--load", "asyncio", "threads", "--rounds", "1",
         "--window", "0.5",
         "--warmup", "0.2", "--scale", "2000", "--scale-redis", "--connections", "20",
         "--connections-seconds", "1", "--watchers", "5", "--watch-seconds", "1",
         "--watch-two-replicas",
         "--soak-seconds", "2", "--soak-clients", "20", "--soak-watchers", "2",
         "--attached", "30", "--attach-processes", "2", "--idle-seconds", "0.5"]


def processes_marked(mark):
    """The live processes whose environment holds mark: the benchmark's descendants, whatever
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

    multiprocessing's resource tracker ends a moment after the benchmark, once it sees its pipe
    close.
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
        [sys.executable, "-m", "bench", *SMOKE, "--output", str(output)],
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
    return presence.serialize_response(reply)

@pytest.fixture
def baseline():
    """Start one of the benchmark's baselines with `baseline(kind)`; all are stopped after."""
    started = []

    def start(kind):
        started.append(ServerProcess(program=("-m", "bench", "_baseline", kind), name=kind))
        return started[-1]

    yield start
    for process in started:
        process.stop()

def send(address, client_id, message):
    """One SendMessage to address: the reply, or the RpcError it was refused with."""
    with connect(address) as channel:
        try:
            return pb_grpc.ClientServiceStub(channel).SendMessage(
                pb.MessageRequest(client_id=client_id, message=message), timeout=DEADLINE)
        except grpc.RpcError as error:
            return error

def events(*revisions):
    """A Watch message carrying changes with these revisions."""
    return pb.WatchResponse(events=[pb.Event(revision=revision, reason="hello")
                                    for revision in revisions])


@allure.story("Every mode runs")
def test_every_mode_runs_stops_what_it_started_and_writes_its_figures(smoke):
    returncode, output, results, left = smoke
    assert returncode == 0, output[-3000:]
    assert left == [], "the benchmark left processes running"
    for mode in ("throughput", "scale", "connections", "watch", "attached", "soak"):
        assert mode in results, f"no {mode} figures in {sorted(results)}"
    assert "SendMessage throughput" in output
    assert "other processes on the machine used" in output


@allure.story("Every mode runs")
def test_help_lists_every_mode_and_both_load_shapes():
    result = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for mode in ("throughput:", "scale:", "connections:", "watch:", "attached:", "soak:"):
        assert mode in text
    assert "asyncio (grpc.aio" in text and "threads (threads" in text


@allure.story("Throughput")
@pytest.mark.parametrize("shape", ["asyncio", "threads"])
def test_throughput_compares_every_target_with_the_ceiling_of_the_same_round(smoke, shape):
    throughput = smoke[2]["throughput"]
    medians = throughput["shapes"][shape]["median"]
    assert list(medians) == TARGETS
    for name, figures in medians.items():
        assert figures["calls"] > 0, name
        assert figures["errors"] == {}, (name, figures["errors"])
        assert figures["cpu_us_per_call"] > 0, name
    for entry in throughput["shapes"][shape]["rounds"]:
        rows = entry["targets"]
        for name, figures in rows.items():
            assert figures["cpu_ratio"] == pytest.approx(
                figures["cpu_us_per_call"] / rows["ceiling"]["cpu_us_per_call"]), name
            assert figures["throughput_ratio"] == pytest.approx(
                figures["calls_per_s"] / rows["ceiling"]["calls_per_s"]), name
        assert rows["memory"]["cpu_vs_asyncio_dict"] == pytest.approx(
            rows["memory"]["cpu_us_per_call"] / rows["asyncio-dict"]["cpu_us_per_call"])
    assert medians["memory"]["cpu_ratio"] == pytest.approx(
        medians["memory"]["cpu_us_per_call"] / medians["ceiling"]["cpu_us_per_call"])
    assert set(throughput["verdicts"]) == {"memory", "sqlite", "redis", "redis-2"}


@allure.story("Throughput")
def test_the_goals_are_judged_under_the_first_load_shape_and_compared_with_the_other(smoke):
    throughput = smoke[2]["throughput"]
    shapes = throughput["shapes"]
    for name in ("memory", "sqlite"):
        verdict = throughput["verdicts"][name]
        assert verdict["cpu_ratio"]["value"] == shapes["asyncio"]["median"][name]["cpu_ratio"]
        assert verdict["cpu_ratio_shape_gap"]["value"] == pytest.approx(abs(
            shapes["threads"]["median"][name]["cpu_ratio"]
            - shapes["asyncio"]["median"][name]["cpu_ratio"]))
    assert throughput["verdicts"]["memory"]["cpu_vs_asyncio_dict"]["target"] == "< 1×"


@allure.story("Throughput")
@pytest.mark.parametrize("shape", ["asyncio", "threads"])
def test_redis_reports_its_own_cpu_per_write_and_two_replicas_share_the_load(smoke, shape):
    throughput = smoke[2]["throughput"]
    for entry in throughput["shapes"][shape]["rounds"]:
        rows = entry["targets"]
        for name in ("redis", "redis-2"):
            figures = rows[name]
            assert figures["redis_cpu_s"] > 0, name
            assert figures["redis_cpu_us_per_write"] == pytest.approx(
                figures["redis_cpu_s"] * 1e6 / figures["calls"]), name
            assert figures["writes_per_script_call"] > 0, name  # Redis counted the calls
            # a replica that writes follows the others in its commit answers: hardly a read
            assert figures["follower_reads_per_write"] < 0.05, name
        assert rows["redis"]["busiest_replica_share"] == 1
        assert 0.5 <= rows["redis-2"]["busiest_replica_share"] < 1, "both replicas served calls"
        assert rows["redis-2"]["cpu_vs_redis"] == pytest.approx(
            rows["redis-2"]["cpu_us_per_call"] / rows["redis"]["cpu_us_per_call"])
    medians, verdicts = throughput["shapes"]["asyncio"]["median"], throughput["verdicts"]
    assert verdicts["redis"]["redis_cpu_us_per_write"]["value"] == (
        medians["redis"]["redis_cpu_us_per_write"])
    assert verdicts["redis"]["redis_cpu_us_per_write"]["target"] == "≤ 50 µs"
    assert verdicts["redis-2"]["cpu_vs_redis"]["value"] == medians["redis-2"]["cpu_vs_redis"]
    assert "redis: Redis's own CPU" in " ".join(smoke[1].split())
    assert "writes per commit script call" in " ".join(smoke[1].split())


@allure.story("Scale, connections, watch, soak")
def test_watchers_spread_over_two_replicas_get_every_change_and_nothing_is_left_running(
        tmp_path):
    output = tmp_path / "results.json"
    token = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "watch", "--watch-target", "redis-2",
         "--watchers", "4", "--watch-processes", "2", "--watch-seconds", "1",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PRESENCE_BENCH_SMOKE": token})
    left = processes_ended(f"PRESENCE_BENCH_SMOKE={token}".encode())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stdout[-3000:]
    assert left == [], "the benchmark left processes running"
    watch = json.loads(output.read_text())["watch"]
    assert watch["target"] == "redis-2" and watch["watchers_per_replica"] == [2, 2]
    assert len(watch["p99_ms_per_replica"]) == 2 and None not in watch["p99_ms_per_replica"]
    assert watch["events_received"] == watch["events_expected"] == 4 * watch["changes"] > 0
    assert (watch["missing"], watch["duplicates"], watch["cut_off"]) == (0, 0, 0)


@allure.story("Scale, connections, watch, soak")
def test_the_other_modes_lose_nothing(smoke):
    results = smoke[2]
    (scale,) = results["scale"]["runs"]
    assert scale["registered"] == 2000
    assert scale["map_answered"] == 1 and scale["others_errors"] == {}
    assert scale["restart_registered"] == 2000 and scale["restart_writer_exit"] == 0
    assert 0 < scale["restart_listening_s"] <= scale["restart_serving_s"]
    assert scale["restart_rss_ratio"] == pytest.approx(
        scale["restart_rss_mib"] / scale["restart_writer_rss_mib"])
    assert "restart_serving_s" not in scale["verdicts"], "judged at a million clients only"
    assert scale["redis_registered"] == 2000 and scale["redis_serving_s"] > 0
    assert {"redis_page_p99_ms", "redis_count_p99_ms"} <= set(scale["verdicts"])
    assert results["connections"]["calls"] > 0
    assert results["connections"]["errors"] == {}
    watch = results["watch"]
    assert watch["events_received"] == watch["events_expected"] == 5 * watch["changes"] > 0
    assert (watch["missing"], watch["duplicates"], watch["cut_off"]) == (0, 0, 0)
    over_two = watch["two_replicas"]
    assert over_two["target"] == "redis-2" and over_two["watchers_per_replica"] == [3, 2]
    assert over_two["events_received"] == over_two["events_expected"] > 0
    attached = results["attached"]
    assert attached["attached"] == attached["counted"] == 30 and attached["errors"] == {}
    assert attached["detach_s"] is not None, "every attached client went offline"
    assert attached["p99_without_ms"] and attached["p99_beside_ms"]
    soak = results["soak"]
    assert soak["calls"] > 0 and soak["errors"] == {}
    assert (soak["watch_missing"], soak["watch_duplicates"]) == (0, 0)


@allure.story("Throughput")
def test_the_floor_answers_plain_calls_as_our_server_does(clock):
    """The floor is only a floor if it does what we do: the same bytes for every plain call,
    the same refusals."""
    floor = FloorService(clock)
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


@allure.story("Scale, connections, watch, soak")
def test_memory_per_client_and_the_restart_are_judged_at_a_million_only():
    million_only = {"bytes_per_client", "restart_serving_s", "restart_rss_ratio"}
    assert million_only <= {goal.key for goal in scale_goals(MILLION)}
    assert not million_only & {goal.key for goal in scale_goals(MILLION - 1)}


@allure.story("Throughput")
def test_both_ceilings_answer_the_same_constant_reply_the_size_of_ours(baseline):
    pure, parsed = baseline("ceiling"), baseline("ceiling+protobuf")
    for server in (pure, parsed):
        with allure.step(f"{server.name}: whatever is asked, one constant reply"):
            first, second = (send(server.address, client_id, message)
                             for client_id, message in (("alice", "hello"), ("bob", "unparsed")))
            assert first == second
            assert first.client.client_id == "bench" and first.client.changed_at.seconds
    with allure.step("the same reply from both but for the moment each was made"):
        replies = [send(server.address, "alice", "hello") for server in (pure, parsed)]
        for reply in replies:
            reply.client.ClearField("changed_at")
            reply.client.ClearField("last_seen")
        assert replies[0] == replies[1]


@allure.story("Throughput")
def test_asyncio_dict_answers_as_the_original_service_does(baseline):
    """The simplest earlier implementation: the original reply, and its refusal."""
    server = baseline("asyncio-dict")
    reply = send(server.address, "alice", " Hello ")
    assert (reply.success, reply.info) == (True, "Client alice marked as connected.")
    assert not reply.HasField("client"), "it keeps no record to answer with"
    assert send(server.address, "alice", "goodbye").info == "Client alice marked as disconnected."
    refusal = send(server.address, "alice", "bye")
    assert (refusal.code(), refusal.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                  "Invalid message type: bye")


@allure.story("Scale, connections, watch, soak")
def test_the_watch_tally_counts_repeats_gaps_and_who_reached_the_last_revision():
    tally = WatchTally(2, keep=True)
    with allure.step("both streams have their snapshot, at revision 10"):
        tally.receive(0, pb.WatchResponse(snapshot_complete=True, revision=10))
        assert not tally.all_settled.is_set()
        tally.receive(1, pb.WatchResponse(snapshot_complete=True, revision=10))
        assert tally.all_settled.is_set()
    with allure.step("stream 0 sees 11, 11 again and 13; stream 1 ends"):
        for message in (events(11), events(11, 13)):
            tally.receive(0, message)
        tally.end(1, "CANCELLED")
    tally.reach(13)
    assert tally.all_reached.is_set()
    report = tally.report()
    assert (report["received"], report["duplicates"], report["gaps"]) == ([3, 0], [1, 0], [1, 0])
    assert report["last"] == [13, 10] and report["ended"] == [None, "CANCELLED"]
    assert list(report["revisions"][0]) == [11, 13] and report["reasons"] == {"hello": 3}


@allure.story("Scale, connections, watch, soak")
def test_the_watch_tally_waits_for_every_stream_to_reach_the_last_revision():
    tally = WatchTally(2, keep=False)
    for index in range(2):
        tally.receive(index, pb.WatchResponse(snapshot_complete=True, revision=5))
    tally.reach(6)
    tally.receive(0, events(6))
    tally.receive(0, events(7))
    assert not tally.all_reached.is_set(), "a stream counts once, however much it receives"
    tally.receive(1, events(6))
    assert tally.all_reached.is_set()
    assert tally.report()["revisions"] is None


@allure.story("Profile")
def test_the_profile_names_our_functions_and_measures_each_part_alone(tmp_path):
    output, stacks = tmp_path / "results.json", tmp_path / "profiles"
    token = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "profile", "--profile-targets", "memory",
         "--window", "1", "--warmup", "0.3", "--profile-dir", str(stacks),
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PRESENCE_BENCH_SMOKE": token})
    left = processes_ended(f"PRESENCE_BENCH_SMOKE={token}".encode())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stdout[-3000:]
    assert left == [], "the benchmark left processes running"
    profile = json.loads(output.read_text())["profile"]
    memory = profile["targets"]["memory"]
    with allure.step("py-spy's stacks are written, and the table names the server's code"):
        assert (stacks / "memory.txt").read_text().strip()
        assert memory["calls"] > 0 and memory["samples"] > 0
        assert any("(server.py)" in row["function"] for row in memory["by_total"])
    with allure.step("every part of a call has its floor"):
        assert len(profile["floors"]) >= 7 and all(
            micros > 0 for micros in profile["floors"].values())
