"""The Watchers load job: Watch streams on channels of their own, each stream's events tallied."""

import asyncio
import contextlib
import time
from array import array
from collections import Counter
from dataclasses import dataclass

import grpc

from bench.jobs import Job, own_channels, ready_then_go, stop_event
from bench.processes import START_TIMEOUT
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc


class StreamTally:
    """What one Watch stream received: events, repeats, gaps, how it ended, and with keep every
    revision and when it arrived."""

    def __init__(self, keep):
        self.keep = keep
        self.revisions, self.times = array("q"), array("q")
        self.last = self.received = self.duplicates = self.gaps = 0
        self.ended = None
        self.settled = self.reached = False

    def receive(self, events, now):
        """Count a message's events: a revision not above the last is a repeat, one skipped is
        a gap."""
        for event in events:
            self.received += 1
            if event.revision <= self.last:
                self.duplicates += 1
                continue
            self.gaps += event.revision - self.last - 1
            self.last = event.revision
            if self.keep:
                self.revisions.append(event.revision)
                self.times.append(now)

    def done(self, final):
        """True once the stream has seen final or ended (never before final is known)."""
        return final is not None and (self.ended is not None or self.last >= final)


class WatchTally:
    """Every stream's tally, and two events: all have their snapshots, all reached the final
    revision. Reasons are counted on the first stream only (they are the same on every one)."""

    def __init__(self, count, keep):
        self.streams = [StreamTally(keep) for _ in range(count)]
        self.reasons = Counter()
        self.final = None
        self.closing = False
        self.all_settled, self.all_reached = asyncio.Event(), asyncio.Event()
        self._settled = self._reached = 0

    def receive(self, index, response):
        """One message of stream index: its events, and its snapshot's end."""
        stream = self.streams[index]
        if not index:
            self.reasons.update(event.reason for event in response.events)
        stream.receive(response.events, time.monotonic_ns())
        if response.snapshot_complete and not stream.settled:
            stream.last = response.revision
            self.settle(index)
        self.check(index)

    def settle(self, index):
        """Stream index has its snapshot, or will never have one."""
        if not self.streams[index].settled:
            self.streams[index].settled = True
            self._settled += 1
            if self._settled == len(self.streams):
                self.all_settled.set()

    def end(self, index, code):
        """Stream index ended with code (unless bench is closing the streams itself)."""
        stream = self.streams[index]
        if not self.closing and stream.ended is None:
            stream.ended = code
        self.settle(index)
        self.check(index)

    def reach(self, final):
        """From now on, wait for every stream to see final."""
        self.final = final
        for index in range(len(self.streams)):
            self.check(index)

    def check(self, index):
        """Count stream index as done once it is."""
        stream = self.streams[index]
        if not stream.reached and stream.done(self.final):
            stream.reached = True
            self._reached += 1
            if self._reached == len(self.streams):
                self.all_reached.set()

    def report(self):
        """Per stream counts (and with keep revisions and times), for bench."""
        keep = self.streams and self.streams[0].keep
        return {
            "received": [s.received for s in self.streams],
            "duplicates": [s.duplicates for s in self.streams],
            "gaps": [s.gaps for s in self.streams], "last": [s.last for s in self.streams],
            "ended": [s.ended for s in self.streams], "reasons": dict(self.reasons),
            "revisions": [s.revisions for s in self.streams] if keep else None,
            "times": [s.times for s in self.streams] if keep else None,
        }


@dataclass(frozen=True)
class Watchers(Job):
    """One load process holding `watchers` Watch streams, each on a channel of its own.

    Ready once each has its snapshot (or failed). Then told (final_revision, deadline_ns): once
    every stream has seen final_revision, or ended, or the deadline passed, it sends "reached"
    with the counts (and with keep each stream's revisions and receive times), and closes the
    streams when told to stop; so the process is still there to be measured until then.
    """

    address: str
    watchers: int
    keep: bool

    async def main(self, connection):
        """Open every stream, wait for the snapshots, then for the final revision."""
        channels = own_channels(self.address, self.watchers)
        tally = WatchTally(len(channels), self.keep)
        tasks = [asyncio.create_task(self.watch(index, channel, tally))
                 for index, channel in enumerate(channels)]
        try:
            await asyncio.wait_for(tally.all_settled.wait(), START_TIMEOUT)
            final, deadline_ns = await ready_then_go(connection)
            tally.reach(final)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(tally.all_reached.wait(),
                                       max(0, deadline_ns - time.monotonic_ns()) / 1e9)
            stop = stop_event(connection)
            tally.closing = True
            connection.send(("reached", tally.report()))
            await stop.wait()
        finally:
            tally.closing = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(channel.close() for channel in channels))
        return {}

    @staticmethod
    async def watch(index, channel, tally):
        """One stream from its snapshot to its end."""
        code = "ENDED"
        try:
            async for response in pb_grpc.ClientServiceStub(channel).Watch(pb.WatchRequest()):
                tally.receive(index, response)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        except asyncio.CancelledError:
            pass
        tally.end(index, code)
