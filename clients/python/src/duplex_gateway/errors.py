"""Exceptions raised by the library."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

__all__ = [
    "ErrorCode",
    "CloseCode",
    "DuplexGatewayError",
    "DuplexError",
    "NotConnected",
    "ConnectionLost",
    "ClosedByGateway",
    "ConnectionRefused",
    "HandshakeError",
]


class ErrorCode(IntEnum):
    """The error codes used by duplex-gateway (after JSON-RPC)."""

    PARSE_ERROR = -32700
    INVALID_MESSAGE = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    BACKEND_UNAVAILABLE = -32000
    CLIENT_NOT_CONNECTED = -32001
    TIMEOUT = -32002
    TOO_MANY_PENDING_CALLS = -32003
    RATE_LIMITED = -32004


class CloseCode(IntEnum):
    """The WebSocket close codes the gateway sends."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the gateway is stopping, or the peer was silent
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY = 1008  # bad/revoked token, changed secret, expired JWT, slow reader: never reconnect
    TOO_BIG = 1009
    ABNORMAL = 1006  # no close frame: the connection was lost
    SERVICE_RESTART = 1012  # a backend was replaced by a new publish of its path
    TRY_AGAIN_LATER = 1013  # the backend did not come back within the grace


class DuplexGatewayError(Exception):
    """The base of every exception of this library."""


class DuplexError(DuplexGatewayError):
    """An error reply: ``{"code": ..., "message": ..., "data": ...}``.

    Raised by calls whose reply carries ``error``, and by HTTP calls answered with an error
    (``status`` is then the HTTP status; the gateway's own refusals carry the status as
    ``code``). Raise it from a handler to answer a call with that error.
    """

    def __init__(
        self,
        code: int,
        message: str = "",
        data: Any = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, data)
        self.code = int(code)
        self.message = message
        self.data = data
        self.status = status
        self._retry_after = retry_after

    def __str__(self) -> str:
        text = f"{self.message} ({self.code})" if self.message else f"error {self.code}"
        if self.status is not None:
            text += f" [HTTP {self.status}]"
        return text

    def __repr__(self) -> str:
        return f"DuplexError(code={self.code!r}, message={self.message!r}, data={self.data!r})"

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again: the HTTP ``Retry-After`` header, or
        ``data.retry_after_ms`` of a ``-32004`` (rate limited) reply."""
        if self._retry_after is not None:
            return self._retry_after
        if isinstance(self.data, Mapping):
            ms = self.data.get("retry_after_ms")
            if isinstance(ms, (int, float)) and not isinstance(ms, bool):
                return max(0.0, ms / 1000.0)
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a reply frame."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def from_dict(cls, error: Any, **kwargs: Any) -> DuplexError:
        """Builds the exception from an ``error`` object (tolerant of malformed ones)."""
        if not isinstance(error, Mapping):
            return cls(ErrorCode.INTERNAL_ERROR, f"malformed error: {error!r}", **kwargs)
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = int(ErrorCode.INTERNAL_ERROR)
        message = error.get("message")
        return cls(code, message if isinstance(message, str) else "", error.get("data"), **kwargs)


class NotConnected(DuplexGatewayError):
    """A call made while the peer has no connection (it is reconnecting, or closed for good).

    The request was not sent: nothing is buffered, so it is safe to try again later.
    """


class ConnectionLost(DuplexGatewayError):
    """The connection dropped while a call was open (whether it ran is unknown), or the peer
    stopped because its connection dropped and reconnecting is off."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        text = "connection lost"
        if code is not None:
            text += f" (close code {code}"
            text += f": {reason})" if reason else ")"
        super().__init__(text)


class ClosedByGateway(ConnectionLost):
    """The gateway closed the connection with a code that forbids reconnecting: 1008 (policy:
    a revoked token, a changed secret, an expired signed token...), or 1012 for a backend that
    a new publish of its path replaced."""

    def __str__(self) -> str:
        text = f"closed by the gateway with code {self.code}"
        return text + (f": {self.reason}" if self.reason else "")


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header value (seconds, or an HTTP date) in seconds from now."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ConnectionRefused(DuplexGatewayError):
    """The gateway refused the WebSocket upgrade with an HTTP status.

    ``status`` is the HTTP status, ``message`` the gateway's reason (from its JSON body) and
    ``retry_after`` the seconds of its ``Retry-After`` header (429 and 503), if any.
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        retry_after: float | None = None,
        code: int | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.code = code if code is not None else status
        text = f"the gateway refused the connection: HTTP {status}"
        if message:
            text += f" ({message})"
        if retry_after is not None:
            text += f", retry after {retry_after:g} s"
        super().__init__(text)

    @classmethod
    def from_http(
        cls, status: int, headers: Mapping[str, str] | Any, body: bytes | None
    ) -> ConnectionRefused:
        message = ""
        code = None
        if body:
            try:
                error = json.loads(body).get("error", {})
                message = str(error.get("message", ""))
                if isinstance(error.get("code"), int):
                    code = error["code"]
            except (ValueError, AttributeError):
                message = body[:200].decode("utf-8", "replace")
        retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
        return cls(status, message, retry_after=retry_after, code=code)


class HandshakeError(DuplexGatewayError):
    """The peer refused the Duplex handshake (an answer not starting with ``+``, e.g. ``-ERR``)."""
