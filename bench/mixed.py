"""The Mix load job of the soak: clients on channels of their own, each making one call of
SOAK_MIX a second."""

import asyncio
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass

import grpc

import server as presence
from bench.figures import SECOND_NS
from bench.jobs import MESSAGES, Job, own_channels, ready_then_go, timed_call
from bench.processes import START_TIMEOUT
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

SOAK_LEASE_SECONDS = 10
SOAK_SESSIONS = 2
SOAK_PAGE_SIZE = 100
SOAK_REGISTER_IN_FLIGHT = 32
SOAK_REGISTER_TRIES = 5
# What each soak client does each second, by weight: its default session toggled (hello or
# goodbye, always a change), a named session started or renewed with a lease of
# SOAK_LEASE_SECONDS (1 in 4 a goodbye of that session; one left unrenewed expires), or a read.
SOAK_MIX = (("toggle", 25), ("session", 15), ("status", 25), ("list", 15), ("count", 20))
SOAK_OPS = tuple(name for name, _ in SOAK_MIX)


class MixClient:
    """One soak client: its id, its random choices, and whether its default session is on."""

    def __init__(self, name, names, stub, seed, timeout):
        self.name, self.names, self.stub, self.timeout = name, names, stub, timeout
        self.rng = random.Random(seed)
        self.connected = False

    def call(self, op):
        """The next call of kind op, not yet awaited."""
        rng, stub, timeout = self.rng, self.stub, self.timeout
        if op == "toggle":
            self.connected = not self.connected
            return stub.SendMessage(pb.MessageRequest(
                client_id=self.name, message=MESSAGES[not self.connected]), timeout=timeout)
        if op == "session":
            session = f"s{rng.randrange(SOAK_SESSIONS)}"
            if rng.randrange(4):
                request = pb.MessageRequest(client_id=self.name, message="hello",
                                            session_id=session, lease_seconds=SOAK_LEASE_SECONDS)
            else:
                request = pb.MessageRequest(client_id=self.name, message="goodbye",
                                            session_id=session)
            return stub.SendMessage(request, timeout=timeout)
        if op == "status":
            return stub.GetClientStatus(pb.ClientStatusRequest(
                client_id=rng.choice(self.names)), timeout=timeout)
        if op == "list":
            return stub.ListClients(pb.ListClientsRequest(
                page_size=SOAK_PAGE_SIZE,
                page_token=presence.encode_page_token(rng.choice(self.names))), timeout=timeout)
        return stub.CountClients(pb.CountClientsRequest(), timeout=timeout)


@dataclass(frozen=True)
class Mix(Job):
    """One load process holding `clients` channels, each making one SOAK_MIX call a second.

    Each client first registers its id (a goodbye), so the reads find every id: a setup step,
    at most SOAK_REGISTER_IN_FLIGHT at a time per process and retried, its failures counted
    apart. Calls begun between start_ns and end_ns are counted: their start, latency and kind,
    and errors by call and code.
    """

    address: str
    tag: str
    clients: int
    timeout: float
    seed: int

    async def main(self, connection):
        """Register every client, then each calls once a second until the window ends."""
        channels = own_channels(self.address, self.clients)
        names = [f"{self.tag}-{number}" for number in range(self.clients)]
        setup_errors, gate = Counter(), asyncio.Semaphore(SOAK_REGISTER_IN_FLIGHT)
        try:
            await asyncio.wait_for(asyncio.gather(*(
                register(name, channel, gate, setup_errors, connection)
                for name, channel in zip(names, channels, strict=True))), START_TIMEOUT)
            start_ns, end_ns = await ready_then_go(connection)
            go_ns = time.monotonic_ns()
            outcome = {"starts": array("q"), "latencies": array("q"), "kinds": array("b"),
                       "errors": Counter(), "error_starts": array("q")}
            await asyncio.gather(*(
                self.client(number, MixClient(
                    names[number], names, pb_grpc.ClientServiceStub(channel),
                    self.seed * 1_000_003 + number, self.timeout),
                    go_ns, (start_ns, end_ns), outcome)
                for number, channel in enumerate(channels)))
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))
        return {**outcome, "errors": dict(outcome["errors"]), "setup_errors": dict(setup_errors)}

    async def client(self, number, client, go_ns, window, outcome):
        """One client's calls, one a second, those begun in the window counted."""
        weights = [weight for _, weight in SOAK_MIX]
        start_ns, end_ns = window
        tick = go_ns + SECOND_NS * number // self.clients
        while tick < end_ns:
            await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
            kind = client.rng.choices(range(len(SOAK_OPS)), weights)[0]
            began, ended, code = await timed_call(client.call(SOAK_OPS[kind]))
            if start_ns <= began < end_ns:
                if code:
                    outcome["errors"][f"{SOAK_OPS[kind]} {code}"] += 1
                    outcome["error_starts"].append(began)
                else:
                    outcome["starts"].append(began)
                    outcome["latencies"].append(ended - began)
                    outcome["kinds"].append(kind)
            tick = max(tick + SECOND_NS, ended)


async def register(name, channel, gate, setup_errors, connection):
    """Register one client's id (a goodbye), retried; tell bench one more is registered."""
    await channel.channel_ready()
    async with gate:
        for attempt in range(SOAK_REGISTER_TRIES):
            try:
                await pb_grpc.ClientServiceStub(channel).SendMessage(
                    pb.MessageRequest(client_id=name, message="goodbye"), timeout=START_TIMEOUT)
                break
            except grpc.aio.AioRpcError as error:
                setup_errors[error.code().name] += 1
                if attempt == SOAK_REGISTER_TRIES - 1:
                    raise
                await asyncio.sleep(0.5)
    connection.send(("progress", 1))
