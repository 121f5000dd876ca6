"""A tiny gRPC-over-HTTP/2 client built on h2, for what a gRPC client refuses to send.

Tests use it to send header bytes that are not UTF-8, frames with a compressed flag or an
encoding the server does not expect, and streams that send headers and never a body.
"""

import gzip
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

DEADLINE = 15.0


def grpc_frame(body, compressed=False):
    """body as one gRPC length-prefixed message."""
    return struct.pack(">BI", 1 if compressed else 0, len(body)) + body


def gzipped(body):
    """body compressed as grpc-encoding gzip wants it."""
    return gzip.compress(body)


class Answer:
    """What the server said on one stream: its headers, its data and its trailers."""

    def __init__(self):
        self.headers = {}
        self.data = b""
        self.ended = False
        self.reset = None  # the RST_STREAM error code, when the server reset the stream

    @property
    def status(self):
        """The grpc-status as an int (None when the stream ended without one)."""
        value = self.headers.get(b"grpc-status")
        return None if value is None else int(value)

    @property
    def message(self):
        """The grpc-message, decoded."""
        return self.headers.get(b"grpc-message", b"").decode(errors="replace")


class RawConnection:
    """One plaintext HTTP/2 connection to a gRPC server, driven frame by frame."""

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        self.authority = address.encode()
        self._socket = socket.create_connection((host, int(port)), timeout=DEADLINE)
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self._h2.initiate_connection()
        self._flush()
        self.answers = {}
        self.settings = None  # the server's SETTINGS, once they came

    def _flush(self):
        """Send whatever h2 has queued."""
        data = self._h2.data_to_send()
        if data:
            self._socket.sendall(data)

    def open(self, method, headers=(), encoding=None):
        """Send a call's headers (and no body yet); its stream id."""
        stream = self._h2.get_next_available_stream_id()
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", method.encode()),
                  (b":authority", self.authority), (b"content-type", b"application/grpc"),
                  (b"te", b"trailers")]
        if encoding:
            fields.append((b"grpc-encoding", encoding.encode()))
        self._h2.send_headers(stream, fields + [(key.encode(), value) for key, value in headers])
        self._flush()
        self.answers[stream] = Answer()
        return stream

    def send(self, stream, data, end=True):
        """Send raw DATA on a stream, ending the request side when end."""
        self._h2.send_data(stream, data, end_stream=end)
        self._flush()

    def call(self, method, body, headers=(), compressed=False, encoding=None):
        """One whole unary call; the server's Answer."""
        stream = self.open(method, headers, encoding)
        self.send(stream, grpc_frame(body, compressed))
        return self.wait(stream)

    def wait(self, stream, timeout=DEADLINE):
        """Read until the stream ends or is reset; its Answer."""
        answer = self.answers[stream]
        deadline = time.monotonic() + timeout
        while not (answer.ended or answer.reset is not None):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"stream {stream} got no answer within {timeout} s")
            self._read(remaining)
        return answer

    def _read(self, timeout):
        """Take what the server sent within timeout and note its events."""
        self._socket.settimeout(timeout)
        try:
            data = self._socket.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in self._h2.receive_data(data):
            self._note(event)
        self._flush()

    def server_settings(self, timeout=DEADLINE):
        """The server's SETTINGS, by h2.settings.SettingCodes, waiting for them."""
        deadline = time.monotonic() + timeout
        while self.settings is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no SETTINGS from the server within {timeout} s")
            self._read(remaining)
        return self.settings

    def ignore_stream_limit(self):
        """Open streams past the server's SETTINGS_MAX_CONCURRENT_STREAMS, as a hostile peer."""
        limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        self._h2.remote_settings[limit] = 2**31 - 1
        self._h2.remote_settings.acknowledge()

    def _note(self, event):
        """Keep what one h2 event says about its stream (or the connection's settings)."""
        answer = self.answers.get(getattr(event, "stream_id", None))
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings = dict(self._h2.remote_settings)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            answer.headers.update(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            answer.data += event.data
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset) and answer is not None:
            answer.reset = event.error_code

    def close(self):
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
