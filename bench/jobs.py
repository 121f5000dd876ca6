"""The load jobs: each spec is a small frozen dataclass that carries its own run, so a spec and
its job cannot mismatch. A LoadGroup runs one spec per load process; the spec's run talks to
bench over a pipe: "ready", then the (start_ns, end_ns) of the window, then its outcome.
"""

import asyncio
import contextlib
import itertools
import math
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass

import grpc

import server as presence
from bench.figures import SECOND_NS
from bench.processes import START_TIMEOUT
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

MESSAGES = ("hello", "goodbye")
BATCH = presence.MAX_BATCH
BIG_MESSAGE = 512 * 1024 * 1024
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# With a lease each id goes through LEASE_PASSES calls, a hello starting its session, hellos
# renewing it, then a goodbye ending it; so 2 calls in LEASE_PASSES change something.
LEASE_PASSES = 8
LEASE_SESSION = "terminal-1"


def scale_id(number, width):
    """The id of the number-th preloaded client; zero-padded so ids sort by number."""
    return f"user-{number:0{width}d}"


def scale_width(clients):
    """Digits in the largest preloaded number, so that every id has the same length."""
    return len(str(max(clients - 1, 1)))


def own_channels(address, count):
    """count grpc.aio channels to address, each with a connection of its own."""
    return [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(count)]


class Job:
    """What every spec shares: an asyncio main run to its end in the load process."""

    def run(self, connection):
        """The job's outcome, sent back to bench by the load process."""
        return asyncio.run(self.main(connection))

    async def main(self, connection):
        """The job itself: connect, say ready, load the server in the window, the outcome."""
        raise NotImplementedError


async def ready_then_go(connection):
    """Say ready, then wait for the (start_ns, end_ns) of the window."""
    connection.send(("ready", None))
    return await asyncio.get_running_loop().run_in_executor(None, connection.recv)


def stop_event(connection):
    """An event set when bench sends stop (or goes away)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def on_message():
        """The first message (or the pipe's end) sets the event."""
        loop.remove_reader(connection.fileno())
        event.set()

    loop.add_reader(connection.fileno(), on_message)
    return event


async def timed_call(call):
    """Await a call: when it began and ended (monotonic ns), and its status code name or None."""
    began = time.monotonic_ns()
    try:
        await call
        code = None
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    return began, time.monotonic_ns(), code


class Tally:
    """Calls that ended (by_start: began) inside the window: their starts and latencies, and
    errors by code."""

    def __init__(self, start_ns, end_ns, by_start=False):
        self.start_ns, self.end_ns, self.by_start = start_ns, end_ns, by_start
        self.starts, self.latencies, self.errors = array("q"), array("q"), Counter()

    def add(self, began, ended, code):
        """Count one call if it belongs to the window."""
        if self.start_ns <= (began if self.by_start else ended) < self.end_ns:
            if code:
                self.errors[code] += 1
            else:
                self.starts.append(began)
                self.latencies.append(ended - began)

    def outcome(self):
        """What the load process sends back."""
        return {"starts": self.starts, "latencies": self.latencies, "errors": dict(self.errors)}


@dataclass(frozen=True)
class ClosedLoop(Job):
    """One load process: in_flight callers on one grpc.aio channel, each sending its next
    SendMessage when one returns.

    It uses the ids `tag-first` .. `tag-(first+ids-1)`, or the preloaded ids of that range when
    width is set (scale_id), each flipped by every pass: even numbers goodbye first, odd hello,
    the opposite of how preload left them, so every call is a change. With a lease, every call
    names the session LEASE_SESSION instead: per id a hello with that lease starting it, hellos
    renewing it, a goodbye ending it (LEASE_PASSES calls in all).
    """

    address: str
    tag: str
    in_flight: int
    ids: int
    timeout: float
    first: int = 0
    width: int = 0
    lease: int = 0

    def passes(self):
        """The requests of each pass over the ids, in the order they are sent."""
        numbers = range(self.first, self.first + self.ids)
        names = [scale_id(number, self.width) if self.width else f"{self.tag}-{number}"
                 for number in numbers]
        if not self.lease:
            return [[pb.MessageRequest(client_id=name, message=MESSAGES[(number + flip) % 2])
                     for name, number in zip(names, numbers, strict=True)] for flip in (1, 0)]
        renew = [pb.MessageRequest(client_id=name, message="hello", session_id=LEASE_SESSION,
                                   lease_seconds=self.lease) for name in names]
        end = [pb.MessageRequest(client_id=name, message="goodbye", session_id=LEASE_SESSION)
               for name in names]
        return [renew] * (LEASE_PASSES - 1) + [end]

    def requests(self):
        """A function giving the next request, whichever caller (task or thread) asks."""
        passes, counter = self.passes(), itertools.count()

        def next_request():
            """The request of the next call made."""
            number = next(counter)
            return passes[(number // self.ids) % len(passes)][number % self.ids]

        return next_request

    async def main(self, connection):
        """in_flight callers on one channel until the window ends; what they counted."""
        requests = self.requests()
        async with grpc.aio.insecure_channel(self.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
            send = pb_grpc.ClientServiceStub(channel).SendMessage
            start_ns, end_ns = await ready_then_go(connection)
            tally = Tally(start_ns, end_ns or math.inf)
            stop = stop_event(connection)

            async def caller():
                """One of in_flight callers: a call, its answer, the next call."""
                while not stop.is_set():
                    request = requests()
                    if time.monotonic_ns() >= tally.end_ns:
                        return
                    tally.add(*await timed_call(send(request, timeout=self.timeout)))

            await asyncio.gather(*(caller() for _ in range(self.in_flight)))
        return tally.outcome()


@dataclass(frozen=True)
class ThreadedLoop(ClosedLoop):
    """The same calls as ClosedLoop, from in_flight threads making blocking calls on one
    channel: the other load shape, as a threaded client program makes them."""

    def run(self, connection):
        """Blocking calls from threads, so no event loop here."""
        requests = self.requests()
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT)
            send = pb_grpc.ClientServiceStub(channel).SendMessage
            connection.send(("ready", None))
            start_ns, end_ns = connection.recv()
            tally = Tally(start_ns, end_ns or math.inf)
            stop = threading.Event()
            threading.Thread(target=set_on_message, args=(connection, stop), daemon=True).start()
            callers = [threading.Thread(target=self._caller, args=(send, requests, tally, stop))
                       for _ in range(self.in_flight)]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join()
        return tally.outcome()

    def _caller(self, send, requests, tally, stop):
        """One thread: a call, its answer, the next call, until the window or a stop ends."""
        while not stop.is_set():
            request = requests()
            if time.monotonic_ns() >= tally.end_ns:
                return
            began = time.monotonic_ns()
            try:
                send(request, timeout=self.timeout)
                code = None
            except grpc.RpcError as error:
                code = error.code().name
            tally.add(began, time.monotonic_ns(), code)


def set_on_message(connection, event):
    """Set event once bench sends a message (stop) or goes away."""
    with contextlib.suppress(OSError):
        connection.poll(None)
    event.set()


LOAD_SHAPES = {"asyncio": ClosedLoop, "threads": ThreadedLoop}


@dataclass(frozen=True)
class Connections(Job):
    """One load process holding `clients` channels, each sending a hello once a second."""

    address: str
    tag: str
    clients: int
    timeout: float

    async def main(self, connection):
        """Connect every channel, then each client calls once a second until the window ends."""
        channels = own_channels(self.address, self.clients)
        try:
            await asyncio.wait_for(asyncio.gather(*(
                ready(channel, connection) for channel in channels)), START_TIMEOUT)
            start_ns, end_ns = await ready_then_go(connection)
            go_ns = time.monotonic_ns()
            tally = Tally(start_ns, end_ns, by_start=True)
            await asyncio.gather(*(self.client(number, channel, go_ns, tally)
                                   for number, channel in enumerate(channels)))
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))
        made = len(tally.latencies) + sum(tally.errors.values())
        return {"latencies": tally.latencies, "errors": dict(tally.errors), "made": made}

    async def client(self, number, channel, go_ns, tally):
        """One client: a hello on its own channel once a second, counted if begun in the window."""
        send = pb_grpc.ClientServiceStub(channel).SendMessage
        request = pb.MessageRequest(client_id=f"{self.tag}-{number}", message="hello")
        tick = go_ns + SECOND_NS * number // self.clients
        while tick < tally.end_ns:
            await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
            began, ended, code = await timed_call(send(request, timeout=self.timeout))
            tally.add(began, ended, code)
            tick = max(tick + SECOND_NS, ended)


async def ready(channel, connection):
    """Wait until channel is connected and tell bench one more is."""
    await channel.channel_ready()
    connection.send(("progress", 1))


@dataclass(frozen=True)
class SteadyChanges(Job):
    """One load process making `rate` changes a second: hello and goodbye alternate over `ids`.

    Each change goes out on its tick whether or not earlier ones were answered. Sends "made":
    per change acknowledged, its revision, when it was sent and when it was acknowledged; then
    waits to be stopped, so the process is still there to be measured until then.
    """

    address: str
    rate: float
    ids: int
    timeout: float

    async def main(self, connection):
        """Changes on their ticks until end_ns; what was made, sent once they are all answered."""
        requests = [[pb.MessageRequest(client_id=f"watch-{number}", message=message)
                     for number in range(self.ids)] for message in MESSAGES]
        async with grpc.aio.insecure_channel(self.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
            send = pb_grpc.ClientServiceStub(channel).SendMessage
            start_ns, end_ns = await ready_then_go(connection)
            made = {"revisions": array("q"), "sent": array("q"), "acknowledged": array("q"),
                    "errors": Counter(), "unchanged": 0}
            tasks = []
            for number in itertools.count():
                tick = start_ns + number * SECOND_NS / self.rate
                if tick >= end_ns:
                    break
                await asyncio.sleep(max(0, tick - time.monotonic_ns()) / 1e9)
                request = requests[(number // self.ids) % 2][number % self.ids]
                tasks.append(asyncio.create_task(self.change(send, request, made)))
            await asyncio.gather(*tasks)
            stop = stop_event(connection)
            connection.send(("made", {**made, "errors": dict(made["errors"]),
                                      "made": len(tasks)}))
            await stop.wait()
        return {}

    async def change(self, send, request, made):
        """One change: when it was sent and acknowledged, and the revision it made."""
        began = time.monotonic_ns()
        try:
            reply = await send(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            made["errors"][error.code().name] += 1
            return
        ended = time.monotonic_ns()
        if not reply.changed:
            made["unchanged"] += 1
            return
        made["revisions"].append(reply.client.revision)
        made["sent"].append(began)
        made["acknowledged"].append(ended)


@dataclass(frozen=True)
class Preload(Job):
    """One load process sending batches first, first+step, ... of the `clients` to preload:
    batches of 1,000 SendMessages, even ids hello, odd goodbye."""

    address: str
    clients: int
    first: int
    step: int
    in_flight: int
    timeout: float

    async def main(self, connection):
        """Every batch sent, in_flight at a time; the server's answers are not kept."""
        width = scale_width(self.clients)
        batches = iter(range(self.first, math.ceil(self.clients / BATCH), self.step))
        options = [("grpc.max_receive_message_length", BIG_MESSAGE)]
        async with grpc.aio.insecure_channel(self.address, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
            send = pb_grpc.ClientServiceStub(channel).SendMessages
            await ready_then_go(connection)

            async def sender():
                """One of in_flight senders: the next batch, until none is left."""
                for batch in batches:
                    numbers = range(batch * BATCH, min((batch + 1) * BATCH, self.clients))
                    await send(pb.SendMessagesRequest(requests=[
                        pb.MessageRequest(client_id=scale_id(number, width),
                                          message=MESSAGES[number % 2]) for number in numbers
                    ]), timeout=self.timeout)
                    connection.send(("progress", len(numbers)))

            await asyncio.gather(*(sender() for _ in range(self.in_flight)))
        return {}
