"""The backend: publishes an endpoint on the gateway and serves its clients' calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ._peer import OnConnect, OnDisconnect, OnRetry, _Peer, ws_url
from .errors import CloseCode
from .reconnect import ReconnectPolicy

__all__ = ["Backend"]


class Backend(_Peer):
    """A backend: dials out to the gateway and publishes ``path`` with a publish ``token``.

    Register handlers with ``@backend.handle("method")``, then ``await backend.run()``: it
    publishes (trying again while the gateway is unreachable or answers 429/5xx), serves every
    client of the endpoint over the one connection, publishes again after a lost connection,
    and returns after :meth:`close` or :meth:`drain`. It stops for good, raising
    :class:`ClosedByGateway`, when the gateway closes it with 1008 (its token was revoked) or
    1012 (another backend replaced it: reconnecting would take the endpoint back from it).

    ``url_or_host``: ``ws://HOST:PORT``, ``wss://...`` or ``HOST:PORT``; ``path`` the endpoint
    path (it replaces the URL's path; ``None`` keeps the URL's). ``secret`` is the client secret
    of the endpoint (optional when the config fixes one). Both credentials travel in headers.
    """

    _stop_codes = frozenset({CloseCode.POLICY, CloseCode.SERVICE_RESTART})

    def __init__(
        self,
        url_or_host: str,
        path: str | None = None,
        *,
        token: str,
        secret: str | None = None,
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
            ws_url(url_or_host, path),
            headers=headers,
            reconnect=reconnect,
            open_timeout=open_timeout,
            max_size=max_size,
            ping_interval=ping_interval,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_retry=on_retry,
        )
        self.token = token
        self.secret = secret

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        headers["Authorization"] = f"Bearer {self.token}"
        if self.secret:
            headers["X-Duplex-Secret"] = self.secret
        return headers

    async def start(self) -> Backend:
        """Publishes, and returns once the gateway answered ``+OK`` (clients can then reach
        the endpoint). Retries per the reconnect policy while the gateway is unreachable or
        answers 429/5xx; raises :class:`ConnectionRefused` for a refusal that will not change
        (401 unknown token, 403 scope, 400...)."""
        await self._start(retry=self.reconnect is not None)
        return self

    async def __aenter__(self) -> Backend:
        if not self._started:
            await self.start()
        return self

    async def run(self) -> None:
        """Publishes (unless :meth:`start` did) and serves until closed: returns after
        :meth:`close` or :meth:`drain`, raises when the backend stops for good otherwise."""
        if not self._started:
            await self.start()
        await self.wait_closed()

    async def call_client(
        self,
        route: str,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Calls ``method`` on the client whose route key is ``route`` (``call.route`` of one
        of its calls) and returns the reply's payload. A client that is gone: ``-32001``."""
        return await self._call(method, payload, ext=_routed(route, ext), timeout=timeout)

    def stream_client(
        self,
        route: str,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Like :meth:`call_client`, yielding every payload of the client's reply stream."""
        return self._stream(method, payload, ext=_routed(route, ext), timeout=timeout)

    async def notify_client(
        self,
        route: str,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
    ) -> None:
        """Sends ``method`` to the client without an id (no reply)."""
        await self._notify(method, payload, _routed(route, ext))

    async def drain(self, timeout: float | None = None) -> int:
        """Drains the backend (``$drain``): the gateway sends it no new clients and calls while
        the running ones finish, and answers when they have; then the backend closes. Returns
        the number of calls still running when the gateway answered (0 unless its
        ``limits.drain_timeout`` ran out)."""
        self._closing = True  # a drop during the drain must not publish again
        try:
            answer = await self._call("$drain", None, timeout=timeout)
        finally:
            await self.close()
        pending = answer.get("pending") if isinstance(answer, dict) else None
        return pending if isinstance(pending, int) else 0


def _routed(route: str, ext: Mapping[str, Any] | None) -> dict[str, Any]:
    routed = dict(ext or {})
    routed["route"] = route
    return routed
