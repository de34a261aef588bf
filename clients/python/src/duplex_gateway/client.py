"""The client: calls a backend through the gateway, and answers the backend's calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Mapping
from typing import Any

from ._peer import OnConnect, OnDisconnect, OnRetry, OutgoingCall, _Peer, ws_url
from .reconnect import ReconnectPolicy

__all__ = ["Client", "connect"]


class Client(_Peer):
    """A Duplex client of one endpoint. Make one with :func:`connect`.

    Calls fail at once with :class:`NotConnected` while there is no connection (nothing is
    buffered); calls open when the connection drops fail with :class:`ConnectionLost`. After a
    drop the client reconnects by itself (see :class:`ReconnectPolicy`), except after close code
    1008 (see :meth:`wait_closed`).
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        reconnect: ReconnectPolicy | bool = True,
        open_timeout: float = 10.0,
        max_size: int | None = 16 * 1024 * 1024,
        ping_interval: float | None = 20.0,
        on_connect: OnConnect | None = None,
        on_disconnect: OnDisconnect | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        super().__init__(
            ws_url(url),
            headers=headers,
            reconnect=reconnect,
            open_timeout=open_timeout,
            max_size=max_size,
            ping_interval=ping_interval,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_retry=on_retry,
        )
        self.secret = secret
        self.token = token

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self.secret:
            headers["X-Duplex-Secret"] = self.secret
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def connect(self) -> Client:
        """Opens the connection. The first attempt is not retried: a refusal raises
        :class:`ConnectionRefused` (``status`` 401, 404, 429 with ``retry_after``...)."""
        await self._start(retry=False)
        return self

    async def __aenter__(self) -> Client:
        if not self._started:
            await self.connect()
        return self

    async def call(
        self,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Calls ``method`` and returns the reply's payload (the last one of a reply stream).
        Raises :class:`DuplexError` for an error reply, :class:`TimeoutError` after
        ``timeout`` seconds."""
        return await self._call(method, payload, ext=ext, timeout=timeout)

    def stream(
        self,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Calls ``method`` and yields every payload of its reply stream, the last one
        included. ``timeout`` bounds the wait for each frame."""
        return self._stream(method, payload, ext=ext, timeout=timeout)

    async def call_with_input(
        self,
        method: str,
        inputs: AsyncIterable[Any] | Iterable[Any],
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Calls ``method`` with streamed input: one request frame per item of ``inputs`` (a
        list or an async iterable), ``more: true`` on all but the last; returns the reply's
        (last) payload. An empty input sends one request without payload. Each item is sent
        once the next one is known (so the last frame carries the last item): for input that
        waits on the replies, use :meth:`open_call`."""
        replies = self._stream_with_input(method, inputs, ext=ext)
        try:
            async with asyncio.timeout(timeout):
                last = None
                async for last in replies:
                    pass
                return last
        finally:
            await replies.aclose()

    async def open_call(
        self,
        method: str,
        payload: Any = None,
        *,
        more: bool = True,
        ext: Mapping[str, Any] | None = None,
    ) -> OutgoingCall:
        """Starts a call whose input is written as it goes: sends the first frame (``more:
        true`` unless ``more=False``) and returns an :class:`OutgoingCall`, to ``send()`` the
        next frames (``more=False`` on the last, or ``end()``), iterate over the reply payloads
        with ``async for``, or ``await result()``. For input whose next item depends on the
        replies (a conversation), where :meth:`call_with_input` would wait for the next item."""
        return await self._open_call(method, payload, ext, more)

    def stream_with_input(
        self,
        method: str,
        inputs: AsyncIterable[Any] | Iterable[Any],
        *,
        ext: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Streamed input and a reply stream: yields every reply payload."""
        return self._stream_with_input(method, inputs, ext=ext)

    async def notify(
        self, method: str, payload: Any = None, *, ext: Mapping[str, Any] | None = None
    ) -> None:
        """Sends ``method`` without an id: no reply comes, not even an error."""
        await self._notify(method, payload, ext)

    async def refresh(self, token: str, *, timeout: float | None = 10.0) -> Any:
        """Renews the signed client token (``$refresh``) and returns the gateway's answer,
        ``{"exp": ...}``. The new token is also the one a reconnection presents. A token the
        gateway refuses raises :class:`DuplexError` (``-32602``) and changes nothing."""
        result = await self._call("$refresh", token, timeout=timeout)
        self.token = token
        return result


class _Connecting:
    """What :func:`connect` returns: await it for a connected :class:`Client`, or use it with
    ``async with`` to close the client at the end of the block."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._client.close()


def connect(
    url: str,
    *,
    secret: str | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    reconnect: ReconnectPolicy | bool = True,
    open_timeout: float = 10.0,
    max_size: int | None = 16 * 1024 * 1024,
    ping_interval: float | None = 20.0,
    on_connect: OnConnect | None = None,
    on_disconnect: OnDisconnect | None = None,
    on_retry: OnRetry | None = None,
) -> _Connecting:
    """Connects a client to the endpoint at ``url`` (``ws://HOST/path``).

    ``secret`` goes in ``X-Duplex-Secret``, ``token`` (a signed client token, for endpoints
    with ``auth.jwt``) in ``Authorization: Bearer``; ``headers`` adds others. ``reconnect``:
    a :class:`ReconnectPolicy`, ``True`` (the default policy) or ``False`` (a drop ends the
    client). ``on_connect()``, ``on_disconnect(error)`` and ``on_retry(attempt, delay, cause)``
    are called on those events.

    ``client = await connect(...)`` or ``async with connect(...) as client:``.
    """
    return _Connecting(
        Client(
            url,
            secret=secret,
            token=token,
            headers=headers,
            reconnect=reconnect,
            open_timeout=open_timeout,
            max_size=max_size,
            ping_interval=ping_interval,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_retry=on_retry,
        )
    )
