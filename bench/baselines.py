"""The servers ours is measured beside, each served by bench's hidden `_baseline` command.

ceiling: what grpcio alone costs, a grpc.server on a pool of the server's default number of
workers whose handler takes the request as raw bytes and answers constant pre-encoded bytes.
ceiling+protobuf: the request parsed and a reply of our reply's size serialised, on our pool
and options. floor: the least a correct plain hello or goodbye does. asyncio-dict: what the
simplest earlier implementations of this service do, a grpc.aio server setting a dict entry.
"""

import argparse
import asyncio
import logging
import signal
import threading
import time
from concurrent import futures
from unittest import mock

import grpc

import server as presence
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc

logger = logging.getLogger("bench")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
BASELINES = ("ceiling", "ceiling+protobuf", "floor", "asyncio-dict")


def ceiling_response():
    """A reply the size of ours to a hello: its Client record with both timestamps set."""
    response = pb.MessageResponse(
        success=True, info="Client bench marked as connected.", changed=True,
        client=pb.Client(client_id="bench", status=pb.STATUS_CONNECTED, revision=1,
                         reason="hello"),
    )
    response.client.changed_at.GetCurrentTime()
    response.client.last_seen.GetCurrentTime()
    return response


class CeilingService(pb_grpc.ClientServiceServicer):
    """ceiling+protobuf: every SendMessage parsed, and answered with one constant response
    that grpc serialises each time."""

    def __init__(self):
        self._response = ceiling_response()

    def SendMessage(self, request, context):
        """The constant response, parsed request or not."""
        return self._response


def add_pure_ceiling(grpc_server):
    """The ceiling: SendMessage takes raw bytes (no deserializer) and answers constant bytes."""
    reply = ceiling_response().SerializeToString()
    handlers = {"SendMessage": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)}
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(presence.SERVICE_NAME, handlers),))
    grpc_server.add_registered_method_handlers(presence.SERVICE_NAME, handlers)


class FloorService(pb_grpc.ClientServiceServicer):
    """The least a correct plain Hello or Goodbye costs: how much of the gap to the ceiling is
    there before any rule of ours.

    The request is checked, the status kept in a dict under a lock with a revision, and the
    answer built with its Client record by server.py's own code. No sessions or leases (it
    refuses them), no change log, status index or store, and gRPC's own (de)serializers
    rather than server.py's guarded ones: what our server costs beyond the floor is theirs.
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._clients = {}
        self._revision = 0

    def SendMessage(self, request, context):
        """A plain hello or goodbye, answered as our server answers it."""
        try:
            message = presence.parse_request(request, presence.DEFAULT_MAX_LEASE)
        except presence.InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if message.session_id or message.lease:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "the floor answers plain hello and goodbye, without sessions or leases")
        now = self._clock()
        connected = message.status is presence.Status.CONNECTED
        with self._lock:
            old = self._clients.get(message.client_id)
            changed = old is None or bool(old.sessions) != connected
            if changed:
                self._revision += 1
                record = presence.Client(
                    message.client_id, now, now, self._revision,
                    presence.HELLO if connected else presence.GOODBYE,
                    presence.DEFAULT_SESSIONS if connected else ())
            else:
                record = old._replace(last_seen=now)
            self._clients[message.client_id] = record
        return presence.encode_reply(message, record, True if changed else None)


def add_floor(grpc_server, service):
    """The floor's SendMessage with gRPC's own request parsing; its reply is bytes already."""
    handlers = {"SendMessage": grpc.unary_unary_rpc_method_handler(
        service.SendMessage, request_deserializer=pb.MessageRequest.FromString,
        response_serializer=presence.serialize_response)}
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(presence.SERVICE_NAME, handlers),))


class AsyncioDictService(pb_grpc.ClientServiceServicer):
    """asyncio-dict: SendMessage sets a dict entry and answers the original reply (success and
    info), as the simplest earlier implementations of this service do; no revision, no record,
    nothing durable."""

    def __init__(self):
        self.clients = {}

    async def SendMessage(self, request, context):
        """The original reply, or the original refusal of another message."""
        text = request.message.strip().lower()
        if text not in ("hello", "goodbye"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Invalid message type: {request.message}")
        status = "connected" if text == "hello" else "disconnected"
        self.clients[request.client_id] = status
        return pb.MessageResponse(success=True,
                                  info=f"Client {request.client_id} marked as {status}.")


def server_model():
    """What server.create_server gives grpc.server (pool size, concurrency limit, options).

    Read off a throwaway server, so ceiling+protobuf and the floor follow any change to ours.
    """
    seen = {}
    real_server = grpc.server

    def spy(executor, **kwargs):
        """Note what grpc.server was given, then build it."""
        seen.update(kwargs, max_workers=executor.max_workers)
        return real_server(executor, **kwargs)

    with mock.patch.object(grpc, "server", spy):
        built = presence.create_server("127.0.0.1:0", presence.open_store("memory://"))
    built.grpc_server.stop(None)
    return seen


def threaded_server(kind):
    """The grpc.server of a threaded baseline: the ceiling on a plain pool of the default
    workers, the others on our pool, limit and options."""
    if kind == "ceiling":
        grpc_server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=presence.DEFAULT_WORKERS, thread_name_prefix="rpc"))
        add_pure_ceiling(grpc_server)
        logger.info("ceiling: %d workers, raw bytes in and out", presence.DEFAULT_WORKERS)
        return grpc_server
    model = server_model()
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=model["max_workers"], thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=model.get("maximum_concurrent_rpcs"),
        options=model.get("options"),
    )
    if kind == "floor":
        add_floor(grpc_server, FloorService())
    else:
        pb_grpc.add_ClientServiceServicer_to_server(CeilingService(), grpc_server)
    logger.info("%s: %d workers, at most %s concurrent calls, options %s", kind,
                model["max_workers"], model.get("maximum_concurrent_rpcs"), model.get("options"))
    return grpc_server


def serve_threaded(kind, host, port):
    """Serve a threaded baseline until SIGTERM or SIGINT."""
    # Taken by sigwait below, never by a handler that could interrupt a lock holder.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    grpc_server = threaded_server(kind)
    port = grpc_server.add_insecure_port(presence.format_address(host, port))
    grpc_server.start()
    logger.info("listening on %s", presence.format_address(host, port))
    signal.sigwait(STOP_SIGNALS)
    grpc_server.stop(1).wait()


async def serve_asyncio_dict(host, port):
    """Serve asyncio-dict until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    grpc_server = grpc.aio.server()
    pb_grpc.add_ClientServiceServicer_to_server(AsyncioDictService(), grpc_server)
    port = grpc_server.add_insecure_port(presence.format_address(host, port))
    await grpc_server.start()
    logger.info("asyncio-dict: grpc.aio, a dict")
    logger.info("listening on %s", presence.format_address(host, port))
    await stop.wait()
    await grpc_server.stop(1)


def serve_baseline(argv):
    """The hidden `_baseline KIND` command: serve one baseline until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench _baseline")
    parser.add_argument("kind", choices=BASELINES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.kind == "asyncio-dict":
        asyncio.run(serve_asyncio_dict(args.host, args.port))
    else:
        serve_threaded(args.kind, args.host, args.port)
    return 0
