"""A client process that holds one Attach stream, for the tests that kill it or cut it off.

    python tests/attach_holder.py ADDRESS CLIENT_ID [SESSION_ID]

It prints one line per message the server sends ("ATTACHED revision 3", "SERVER_STOPPING
reattach 10") and, when the stream ends, "ended CODE" with the details; then it exits.
"""

import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generated import connection_pb2 as pb
from generated import connection_pb2_grpc as pb_grpc


def hold(address, client_id, session_id=""):
    """Attach and report every message until the stream ends."""
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.ClientServiceStub(channel).Attach(
            pb.AttachRequest(client_id=client_id, session_id=session_id), wait_for_ready=True)
        try:
            for response in stream:
                notice = pb.AttachResponse.Notice.Name(response.notice)
                print(notice, f"revision {response.client.revision}" if response.client.client_id
                      else f"reattach {response.reattach_seconds}", flush=True)
        except grpc.RpcError as error:
            print("ended", error.code().name, error.details(), flush=True)
        else:
            print("ended OK", flush=True)


if __name__ == "__main__":
    hold(*sys.argv[1:])
