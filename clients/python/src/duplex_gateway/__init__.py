"""duplex-gateway for Python: an asyncio client and backend for duplex-gateway.

- :func:`connect` / :class:`Client`: call a published backend over WebSocket (calls, reply
  streams, streamed input, backend-to-client calls, ``$refresh``).
- :class:`Backend`: publish an endpoint and serve its clients (handlers, streams both ways,
  calls to clients, ``$drain``).
- :func:`http_call` / :func:`http_stream`: plain HTTP calls.
- Both peers reconnect after a lost connection (:class:`ReconnectPolicy`).
"""

from ._peer import HANDSHAKE, Call, Handler, OutgoingCall
from .backend import Backend
from .client import Client, connect
from .errors import (
    CloseCode,
    ClosedByGateway,
    ConnectionLost,
    ConnectionRefused,
    DuplexError,
    DuplexGatewayError,
    ErrorCode,
    HandshakeError,
    NotConnected,
)
from .http import http_call, http_notify, http_stream
from .reconnect import ReconnectPolicy

__version__ = "0.1.0"

__all__ = [
    "HANDSHAKE",
    "Backend",
    "Call",
    "Client",
    "CloseCode",
    "ClosedByGateway",
    "ConnectionLost",
    "ConnectionRefused",
    "DuplexError",
    "DuplexGatewayError",
    "ErrorCode",
    "Handler",
    "HandshakeError",
    "NotConnected",
    "OutgoingCall",
    "ReconnectPolicy",
    "__version__",
    "connect",
    "http_call",
    "http_notify",
    "http_stream",
]
