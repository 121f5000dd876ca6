"""Older clients: the second earlier contract (user_notifications.NotificationService) served
beside ours on one registry, its token rules, and reflection under v1 as well as v1alpha.

Everything talks to a real server over real gRPC on loopback (`python server.py` as a
subprocess where the older client's own commands are replayed); nothing is mocked.
"""

import allure
import grpc
import pytest
from google.protobuf import descriptor_pb2, empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

import server as presence
from conftest import DEADLINE, Watch, connect
from generated import connection_pb2 as pb
from generated import notifications_pb2 as old_pb
from generated import notifications_pb2_grpc as old_pb_grpc

pytestmark = [allure.feature("Older clients")]

NOTIFICATIONS = "user_notifications.NotificationService"
TOKEN = (("authorization", "Bearer t0ken"),)


def rpc_error(call, *args, **kwargs):
    """The RpcError a call raises; fails the test when it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def send_message(stub, client_id, message):
    """The older client's send-message: SendMessage, then GetClientStatus of the same id."""
    reply = stub.SendMessage(old_pb.MessageRequest(client_id=client_id, message=message))
    return reply.status, dict(fetch_client_status(stub, client_id))


def fetch_client_status(stub, client_id):
    """The older client's fetch-client-status."""
    return stub.GetClientStatus(old_pb.ClientStatusRequest(client_id=client_id)).statuses


def fetch_all_statuses(stub):
    """The older client's fetch-all-statuses."""
    return dict(stub.GetAllClientStatuses(empty_pb2.Empty()).statuses)


@pytest.fixture
def old_stub(channel):
    return old_pb_grpc.NotificationServiceStub(channel)


def reflect(channel, version, request):
    """One reflection request under grpc.reflection.<version>, with v1alpha's messages."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    [reply] = call(iter([request]), timeout=DEADLINE)
    return reply


@allure.story("user_notifications.NotificationService")
def test_the_older_clients_commands_work_unchanged_against_the_server_process(server_processes):
    server = server_processes("--store", "memory://")
    with connect(server.address) as channel:
        stub = old_pb_grpc.NotificationServiceStub(channel)
        with allure.step("send-message: Success, then the status it reads back"):
            assert send_message(stub, "alice", "Hello") == ("Success", {"alice": "connected"})
            assert send_message(stub, "bob", "hello") == ("Success", {"bob": "connected"})
            assert send_message(stub, "bob", " GOODBYE ") == ("Success", {"bob": "disconnected"})
        with allure.step("fetch-client-status: known ids, and 'unknown' with OK for others"):
            assert fetch_client_status(stub, "alice") == {"alice": "connected"}
            assert fetch_client_status(stub, "nobody") == {"nobody": "unknown"}
        with allure.step("fetch-all-statuses, and GetClientStatus with an empty id"):
            everyone = {"alice": "connected", "bob": "disconnected"}
            assert fetch_all_statuses(stub) == everyone
            assert fetch_client_status(stub, "") == everyone
        with allure.step("a message that is neither hello nor goodbye"):
            error = rpc_error(stub.SendMessage, old_pb.MessageRequest(client_id="carol",
                                                                     message="howdy"))
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "Invalid message type: howdy")
        assert fetch_all_statuses(stub) == everyone


@allure.story("user_notifications.NotificationService")
@pytest.mark.parametrize(("method", "request_message", "reason"), [
    ("SendMessage", old_pb.MessageRequest(client_id="", message="hello"),
     "client_id must not be empty"),
    ("SendMessage", old_pb.MessageRequest(client_id="x" * 129, message="hello"),
     "at most 128 characters, got 129"),
    ("SendMessage", old_pb.MessageRequest(client_id="a\x00b", message="goodbye"),
     "U+0000 at position 1"),
    ("GetClientStatus", old_pb.ClientStatusRequest(client_id="y" * 200),
     "at most 128 characters, got 200"),
    ("GetClientStatus", old_pb.ClientStatusRequest(client_id="tab\there"), "U+0009"),
])
def test_the_older_contract_refuses_ids_by_our_rules(old_stub, method, request_message, reason):
    error = rpc_error(getattr(old_stub, method), request_message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    assert fetch_all_statuses(old_stub) == {}


@allure.story("One registry, two contracts")
def test_a_change_through_either_contract_shows_in_the_other(stub, old_stub):
    watch = Watch(stub)
    watch.snapshot()
    with allure.step("hello through the older contract: ours sees it, with a revision"):
        old_stub.SendMessage(old_pb.MessageRequest(client_id="dave", message="hello"))
        record = stub.GetClientStatus(pb.ClientStatusRequest(client_id="dave")).clients[0]
        assert (record.status, record.revision) == (pb.STATUS_CONNECTED, 1)
        [event] = watch.events(1)
        assert (event.client.client_id, event.revision) == ("dave", 1)
    with allure.step("a session through ours: the older contract sees the user connected"):
        stub.SendMessage(pb.MessageRequest(client_id="erin", message="hello", session_id="tty1"))
        assert fetch_client_status(old_stub, "erin") == {"erin": "connected"}
    with allure.step("goodbye through the older contract ends every session"):
        old_stub.SendMessage(old_pb.MessageRequest(client_id="erin", message="goodbye"))
        reply = stub.GetClientStatus(pb.ClientStatusRequest(client_id="erin"))
        assert reply.statuses == {"erin": "disconnected"}
        assert not reply.clients[0].sessions
    assert fetch_all_statuses(old_stub) == dict(
        stub.GetClientStatus(pb.ClientStatusRequest()).statuses)
    watch.call.cancel()


@allure.story("Access token")
@pytest.mark.parametrize("public_reads", [False, True])
def test_older_contract_writes_need_the_token_and_reads_follow_public_reads(public_reads):
    server = presence.create_server(
        "127.0.0.1:0", presence.MemoryStore(),
        security=presence.Security(token="t0ken", public_reads=public_reads))
    server.start()
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            stub = old_pb_grpc.NotificationServiceStub(channel)
            hello = old_pb.MessageRequest(client_id="eve", message="hello")
            assert rpc_error(stub.SendMessage, hello).code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.SendMessage(hello, metadata=TOKEN).status == "Success"
            reads = ((stub.GetClientStatus, old_pb.ClientStatusRequest(client_id="eve")),
                     (stub.GetAllClientStatuses, empty_pb2.Empty()))
            for call, request in reads:
                assert call(request, metadata=TOKEN).statuses == {"eve": "connected"}
                if public_reads:
                    assert call(request).statuses == {"eve": "connected"}
                else:
                    assert rpc_error(call, request).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


@allure.story("Reflection and health")
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_under_v1_and_v1alpha_lists_and_describes_every_service(channel, version):
    with allure.step(f"list the services through grpc.reflection.{version}"):
        reply = reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {service.name for service in reply.list_services_response.service}
        assert names == {"client_service.ClientService", NOTIFICATIONS, "grpc.health.v1.Health",
                         "grpc.reflection.v1.ServerReflection",
                         "grpc.reflection.v1alpha.ServerReflection"}
    for name in sorted(names):
        with allure.step(f"describe {name}"):
            reply = reflect(channel, version,
                            reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            files = [descriptor_pb2.FileDescriptorProto.FromString(data)
                     for data in reply.file_descriptor_response.file_descriptor_proto]
            package, _, service = name.rpartition(".")
            assert any(file.package == package and service in {s.name for s in file.service}
                       for file in files), reply


@allure.story("Reflection and health")
def test_health_reports_the_older_service_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=NOTIFICATIONS))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
