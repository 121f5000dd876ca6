import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_CONNECTED: _ClassVar[Status]
    STATUS_DISCONNECTED: _ClassVar[Status]

class SessionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_KIND_UNSPECIFIED: _ClassVar[SessionKind]
    SESSION_KIND_MESSAGE: _ClassVar[SessionKind]
    SESSION_KIND_ATTACHED: _ClassVar[SessionKind]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_CONNECTED: _ClassVar[EventKind]
    EVENT_DISCONNECTED: _ClassVar[EventKind]
    EVENT_SESSION_STARTED: _ClassVar[EventKind]
    EVENT_SESSION_ENDED: _ClassVar[EventKind]
STATUS_UNSPECIFIED: Status
STATUS_CONNECTED: Status
STATUS_DISCONNECTED: Status
SESSION_KIND_UNSPECIFIED: SessionKind
SESSION_KIND_MESSAGE: SessionKind
SESSION_KIND_ATTACHED: SessionKind
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_CONNECTED: EventKind
EVENT_DISCONNECTED: EventKind
EVENT_SESSION_STARTED: EventKind
EVENT_SESSION_ENDED: EventKind

class Session(_message.Message):
    __slots__ = ("session_id", "expires_at", "kind")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expires_at: _timestamp_pb2.Timestamp
    kind: SessionKind
    def __init__(self, session_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[SessionKind, str]] = ...) -> None: ...

class Client(_message.Message):
    __slots__ = ("client_id", "status", "changed_at", "last_seen", "revision", "sessions", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    status: Status
    changed_at: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    revision: int
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class MessageRequest(_message.Message):
    __slots__ = ("client_id", "message", "session_id", "lease_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message: str
    session_id: str
    lease_seconds: int
    def __init__(self, client_id: _Optional[str] = ..., message: _Optional[str] = ..., session_id: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class MessageResponse(_message.Message):
    __slots__ = ("success", "info", "client", "changed")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    success: bool
    info: str
    client: Client
    changed: bool
    def __init__(self, success: _Optional[bool] = ..., info: _Optional[str] = ..., client: _Optional[_Union[Client, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class SendMessagesRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[MessageRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[MessageRequest, _Mapping]]] = ...) -> None: ...

class SendMessagesResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[MessageResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[MessageResponse, _Mapping]]] = ...) -> None: ...

class ClientStatusRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ClientStatusResponse(_message.Message):
    __slots__ = ("statuses", "clients")
    class StatusesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.ScalarMap[str, str]
    clients: _containers.RepeatedCompositeFieldContainer[Client]
    def __init__(self, statuses: _Optional[_Mapping[str, str]] = ..., clients: _Optional[_Iterable[_Union[Client, _Mapping]]] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status", "id_prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: Status
    id_prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., id_prefix: _Optional[str] = ...) -> None: ...

class ListClientsResponse(_message.Message):
    __slots__ = ("clients", "next_page_token", "revision")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[Client]
    next_page_token: str
    revision: int
    def __init__(self, clients: _Optional[_Iterable[_Union[Client, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class CountClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountClientsResponse(_message.Message):
    __slots__ = ("connected", "disconnected", "total", "revision", "live_sessions")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    connected: int
    disconnected: int
    total: int
    revision: int
    live_sessions: int
    def __init__(self, connected: _Optional[int] = ..., disconnected: _Optional[int] = ..., total: _Optional[int] = ..., revision: _Optional[int] = ..., live_sessions: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("revision", "kind", "client", "session_id", "reason")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    revision: int
    kind: EventKind
    client: Client
    session_id: str
    reason: str
    def __init__(self, revision: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., client: _Optional[_Union[Client, _Mapping]] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("snapshot", "snapshot_complete", "resync", "events", "revision")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    snapshot: _containers.RepeatedCompositeFieldContainer[Client]
    snapshot_complete: bool
    resync: bool
    events: _containers.RepeatedCompositeFieldContainer[Event]
    revision: int
    def __init__(self, snapshot: _Optional[_Iterable[_Union[Client, _Mapping]]] = ..., snapshot_complete: _Optional[bool] = ..., resync: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("client_id", "session_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_id: str
    def __init__(self, client_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("notice", "client", "reattach_seconds")
    class Notice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NOTICE_UNSPECIFIED: _ClassVar[AttachResponse.Notice]
        ATTACHED: _ClassVar[AttachResponse.Notice]
        SERVER_STOPPING: _ClassVar[AttachResponse.Notice]
    NOTICE_UNSPECIFIED: AttachResponse.Notice
    ATTACHED: AttachResponse.Notice
    SERVER_STOPPING: AttachResponse.Notice
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    REATTACH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    notice: AttachResponse.Notice
    client: Client
    reattach_seconds: int
    def __init__(self, notice: _Optional[_Union[AttachResponse.Notice, str]] = ..., client: _Optional[_Union[Client, _Mapping]] = ..., reattach_seconds: _Optional[int] = ...) -> None: ...
