"""The Duplex peer shared by the client and the backend: the connection, its handshake, the
calls in both directions, and reconnection."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from typing import Any, TypeGuard, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

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
from .reconnect import ReconnectPolicy

__all__ = ["Call", "Handler", "HANDSHAKE", "OutgoingCall"]

log = logging.getLogger("duplex_gateway")

HANDSHAKE = "SIMPLEX/1.0;json"

Handler = Callable[["Call"], Awaitable[Any] | Any]
"""A handler takes the :class:`Call` and returns the reply's payload (or an awaitable of it)."""

H = TypeVar("H", bound=Callable[["Call"], Any])

OnRetry = Callable[[int, float, BaseException], Any]
OnDisconnect = Callable[[BaseException], Any]
OnConnect = Callable[[], Any]

_END = object()


def _dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def ws_url(url: str, path: str | None = None) -> str:
    """Normalises ``url`` to ``ws://``/``wss://`` (``http`` and a bare ``host:port`` are
    accepted) and, when ``path`` is given, puts it in place of the URL's path."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url!r}")
    new_path = parts.path or "/"
    if path is not None:
        new_path = "/" + path.lstrip("/")
    return urlunsplit((scheme, parts.netloc, new_path, parts.query, ""))


class _Input:
    """The request payloads of one incoming call, the first one included."""

    def __init__(self, first: Any, more: bool) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue.put_nowait(first)
        self.open = more
        if not more:
            self._queue.put_nowait(_END)

    def push(self, payload: Any, more: bool) -> None:
        if not self.open:
            return
        self._queue.put_nowait(payload)
        if not more:
            self.open = False
            self._queue.put_nowait(_END)

    def fail(self, error: BaseException) -> None:
        if self.open:
            self.open = False
            self._queue.put_nowait(error)

    def __aiter__(self) -> _Input:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stays exhausted
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item


class Call:
    """A call received from the other side, handed to a handler.

    - ``method``, ``id`` (``None`` for a notification, which gets no reply), ``payload`` (the
      first request frame's), ``ext`` (the request's ``ext`` object, or ``None``).
    - ``route``: ``ext.route`` (on a backend: the calling client's route key, to call it back
      with :meth:`Backend.call_client`); ``auth``: ``ext.auth`` (set by the gateway on
      endpoints with signed client tokens).
    - ``input``: an async iterator over the request payloads, **the first one included**, then
      every further frame of streamed input, until the caller's last frame.
    - ``await send(payload)``: sends one reply frame with ``more: true`` (a reply stream); the
      handler's return value is the last frame.
    - ``reply_ext``: the ``ext`` put on every reply (by default the request's, as the protocol
      asks); change it to add keys.
    """

    def __init__(self, peer: _Peer, conn: _Conn, message: Mapping[str, Any]) -> None:
        self._peer = peer
        self._conn = conn
        self.method: str = message["method"]
        call_id = message.get("id")
        self.id: int | None = call_id if call_id else None
        self.payload: Any = message.get("payload")
        ext = message.get("ext")
        self.ext: dict[str, Any] | None = ext if isinstance(ext, dict) else None
        self.reply_ext: dict[str, Any] | None = dict(self.ext) if self.ext is not None else None
        self._input = _Input(self.payload, bool(message.get("more")) and self.id is not None)
        self.finished = False

    @property
    def route(self) -> str | None:
        """The caller's route key (``ext.route``), set by the gateway on a backend's calls."""
        value = (self.ext or {}).get("route")
        return value if isinstance(value, str) else None

    @property
    def auth(self) -> Any:
        """``ext.auth``: who calls, on endpoints with signed client tokens (else ``None``)."""
        return (self.ext or {}).get("auth")

    @property
    def more(self) -> bool:
        """Whether more input frames are still to come."""
        return self._input.open

    @property
    def input(self) -> AsyncIterator[Any]:
        """Every request payload of the call, the first one included."""
        return self._input

    async def send(self, payload: Any) -> None:
        """Sends one frame of a reply stream (``more: true``)."""
        if self.id is None:
            raise RuntimeError("a notification (a request without id) gets no reply")
        if self.finished:
            raise RuntimeError("the call has already been answered")
        frame: dict[str, Any] = {"type": "rep", "id": self.id, "payload": payload, "more": True}
        if self.reply_ext is not None:
            frame["ext"] = self.reply_ext
        await self._peer._send_on(self._conn, frame)

    def __repr__(self) -> str:
        return f"<Call {self.method!r} id={self.id!r}>"


class _Outgoing:
    """A call this side made: the replies arrive in ``queue``."""

    __slots__ = ("id", "queue")

    def __init__(self, call_id: int) -> None:
        self.id = call_id
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()


class OutgoingCall:
    """A call whose input is written as it goes (see :meth:`Client.open_call`): ``send`` more
    request frames, iterate over the reply payloads, or ``await result()`` for the last one."""

    def __init__(
        self,
        peer: _Peer,
        conn: _Conn,
        out: _Outgoing,
        method: str,
        ext: Mapping[str, Any] | None,
        more: bool,
    ) -> None:
        self._peer = peer
        self._conn = conn
        self._out = out
        self.method = method
        self._ext = dict(ext) if ext is not None else None
        self.input_open = more
        self._replies = peer._replies(conn, out)

    @property
    def id(self) -> int:
        return self._out.id

    async def send(self, payload: Any, *, more: bool = True) -> None:
        """Sends one more frame of input; ``more=False`` makes it the last one."""
        if not self.input_open:
            raise RuntimeError("the input of this call has already ended")
        if self._conn.outgoing.get(self._out.id) is not self._out:
            raise RuntimeError("the call has already ended")
        frame: dict[str, Any] = {
            "type": "req",
            "method": self.method,
            "id": self._out.id,
            "payload": payload,
        }
        if more:
            frame["more"] = True
        if self._ext is not None:
            frame["ext"] = self._ext
        if not more:
            self.input_open = False
        await self._peer._send_on(self._conn, frame)

    async def end(self, payload: Any = None) -> None:
        """Sends the last frame of input."""
        await self.send(payload, more=False)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._replies

    async def result(self) -> Any:
        """Waits for the end of the call and returns its last reply payload."""
        last = None
        async for last in self._replies:
            pass
        return last

    async def aclose(self) -> None:
        """Stops waiting for replies (late ones are dropped)."""
        await self._replies.aclose()


class _Conn:
    """One WebSocket connection and the calls open on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.outgoing: dict[int, _Outgoing] = {}
        self.incoming: dict[int, Call] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.lost: ConnectionLost | None = None
        self.since = time.monotonic()


class _Peer:
    """What the client and the backend share (use :class:`Client` or :class:`Backend`)."""

    # Close codes after which the peer never reconnects.
    _stop_codes: frozenset[int] = frozenset({CloseCode.POLICY})

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        reconnect: ReconnectPolicy | bool = True,
        open_timeout: float = 10.0,
        max_size: int | None = 16 * 1024 * 1024,
        ping_interval: float | None = 20.0,
        on_connect: OnConnect | None = None,
        on_disconnect: OnDisconnect | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.url = url
        self._extra_headers = dict(headers or {})
        if reconnect is True:
            reconnect = ReconnectPolicy()
        self.reconnect: ReconnectPolicy | None = reconnect or None
        self._open_timeout = open_timeout
        self._max_size = max_size
        self._ping_interval = ping_interval
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_retry = on_retry
        self._handlers: dict[str, Handler] = {}
        self._conn: _Conn | None = None
        self._next_id = 0
        self._closing = False
        self._started = False
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._done = asyncio.Event()
        self._final: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._not_connected_why = "not connected yet"

    # ----------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        """Whether the peer has a live connection now."""
        return self._conn is not None

    @property
    def closed(self) -> bool:
        """Whether the peer stopped for good (closed, refused, or closed by the gateway)."""
        return self._done.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Waits until the peer is connected (again). Raises the reason if it stops for good,
        and :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self._conn is None:
                if self._done.is_set():
                    if self._final is not None:
                        raise self._final
                    raise NotConnected("the peer is closed")
                waiters = [
                    asyncio.ensure_future(self._connected.wait()),
                    asyncio.ensure_future(self._done.wait()),
                ]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()

    async def wait_closed(self) -> None:
        """Waits until the peer stops for good. Returns after :meth:`close` (or a drain);
        raises :class:`ClosedByGateway` (1008...), :class:`ConnectionRefused` (a refused
        reconnection), or :class:`ConnectionLost` (a drop with reconnecting off)."""
        await self._done.wait()
        if self._final is not None:
            raise self._final

    async def close(self) -> None:
        """Closes the connection (code 1000) and stops reconnecting. Open calls fail with
        :class:`ConnectionLost`; later calls with :class:`NotConnected`."""
        self._closing = True
        self._not_connected_why = "the peer is closed"
        self._wake.set()
        conn = self._conn
        if conn is not None:
            try:
                await conn.ws.close()
            except Exception:  # pragma: no cover - closing a broken socket
                pass
        if self._supervisor is not None:
            if self._supervisor is not asyncio.current_task():
                try:
                    await self._supervisor
                except BaseException:  # pragma: no cover
                    pass
        else:
            self._finish(None)

    async def __aenter__(self) -> _Peer:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -------------------------------------------------------------- handlers

    @overload
    def handle(self, method: str) -> Callable[[H], H]: ...

    @overload
    def handle(self, method: str, handler: H) -> H: ...

    def handle(self, method: str, handler: H | None = None) -> Any:
        """Registers ``handler`` for calls of ``method``: ``peer.handle("m", fn)``, or as a
        decorator, ``@peer.handle("m")``. The handler gets a :class:`Call` and returns the reply
        payload (sync or async); raising :class:`DuplexError` answers with that error, any other
        exception with ``-32603``. Unknown methods are answered ``-32601``."""
        if method.startswith("$"):
            raise ValueError("methods starting with $ are reserved for the gateway")

        def register(fn: H) -> H:
            self._handlers[method] = fn
            return fn

        if handler is None:
            return register
        return register(handler)

    # ------------------------------------------------------------ connecting

    def _headers(self) -> dict[str, str]:
        return dict(self._extra_headers)

    async def _open_once(self) -> _Conn:
        """One connection attempt: the upgrade, then the Duplex handshake."""
        try:
            ws = await ws_connect(
                self.url,
                additional_headers=self._headers(),
                open_timeout=self._open_timeout,
                proxy=None,
                compression=None,
                max_size=self._max_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                user_agent_header="duplex-gateway-python",
            )
        except InvalidStatus as e:
            response = e.response
            raise ConnectionRefused.from_http(
                response.status_code, response.headers, bytes(response.body)
            ) from None
        try:
            async with asyncio.timeout(self._open_timeout):
                await ws.send(HANDSHAKE)
                while True:
                    answer = await ws.recv()
                    if isinstance(answer, bytes):
                        answer = answer.decode("utf-8", "replace")
                    if answer.strip():
                        break
        except BaseException:
            await ws.close()
            raise
        if not answer.strip().startswith("+"):
            await ws.close()
            raise HandshakeError(f"handshake refused: {answer.strip()}")
        return _Conn(ws)

    def _retryable(self, error: BaseException, reconnecting: bool) -> bool:
        if isinstance(error, ConnectionRefused):
            if error.status == 404:
                return (
                    reconnecting and self.reconnect is not None and self.reconnect.retry_not_found
                )
            return error.status in (408, 429) or error.status >= 500
        if isinstance(error, (HandshakeError, InvalidURI, ValueError, TypeError)):
            return False
        return isinstance(
            error, (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, EOFError)
        )

    async def _sleep(self, delay: float) -> None:
        """Sleeps ``delay`` seconds, or less if the peer is closed meanwhile."""
        if self._closing:
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass

    async def _open_with_retry(
        self, attempt: int, cause: BaseException | None
    ) -> tuple[_Conn, int]:
        """Opens a connection, retrying with the reconnect policy from attempt ``attempt``.
        ``cause`` is the reason of the first wait (a drop); ``None`` tries at once (a first
        connection). Returns the connection and the next attempt number."""
        policy = self.reconnect
        reconnecting = cause is not None
        retry_after: float | None = None
        failures = 0
        while True:
            if cause is not None:
                assert policy is not None
                delay = policy.delay(attempt, retry_after)
                log.info("%s: reconnecting in %.3f s (%s)", self.url, delay, cause)
                self._call_hook(self._on_retry, attempt, delay, cause)
                await self._sleep(delay)
                attempt += 1
            if self._closing:
                raise NotConnected("the peer is closed")
            try:
                return await self._open_once(), attempt
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                failures += 1
                if (
                    policy is None
                    or not self._retryable(error, reconnecting)
                    or (policy.max_attempts is not None and failures >= policy.max_attempts)
                ):
                    raise
                log.debug("%s: connection attempt failed: %r", self.url, error)
                retry_after = error.retry_after if isinstance(error, ConnectionRefused) else None
                cause = error

    async def _start(self, retry: bool) -> None:
        """Opens the first connection (trying again per the policy when ``retry``) and starts
        the task that reads it and reconnects."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        attempt = 0
        try:
            if retry:
                conn, attempt = await self._open_with_retry(0, None)
            else:
                conn = await self._open_once()
        except BaseException as error:
            self._finish(error if not isinstance(error, asyncio.CancelledError) else None)
            raise
        if self._closing:  # closed while connecting
            await conn.ws.close()
            self._finish(None)
            raise NotConnected("the peer was closed while connecting")
        self._install(conn)
        self._supervisor = asyncio.create_task(self._supervise(conn, attempt))

    def _install(self, conn: _Conn) -> None:
        self._conn = conn
        self._connected.set()
        log.info("%s: connected", self.url)
        self._call_hook(self._on_connect)

    async def _supervise(self, conn: _Conn, attempt: int) -> None:
        try:
            while True:
                code, reason = await self._read(conn)
                lost = (
                    ClosedByGateway(code, reason)
                    if code in self._stop_codes and not self._closing
                    else ConnectionLost(code, reason)
                )
                self._drop(conn, lost)
                if self._closing:
                    self._finish(None)
                    return
                if isinstance(lost, ClosedByGateway):
                    log.warning("%s: %s: not reconnecting", self.url, lost)
                    self._finish(lost)
                    return
                if self.reconnect is None:
                    self._finish(lost)
                    return
                if time.monotonic() - conn.since >= self.reconnect.stable_after:
                    attempt = 0
                self._not_connected_why = f"reconnecting after {lost}"
                try:
                    conn, attempt = await self._open_with_retry(attempt, lost)
                except NotConnected:
                    self._finish(None)
                    return
                if self._closing:
                    await conn.ws.close()
                    self._finish(None)
                    return
                self._install(conn)
        except asyncio.CancelledError:
            self._finish(None)
            raise
        except BaseException as error:
            log.warning("%s: giving up: %s", self.url, error)
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        if self._done.is_set():
            return
        self._final = error
        self._closing = True
        self._not_connected_why = (
            f"the peer stopped: {error}" if error is not None else "the peer is closed"
        )
        self._done.set()

    def _drop(self, conn: _Conn, lost: ConnectionLost) -> None:
        """The connection is gone: fail what was open on it."""
        if self._conn is conn:
            self._conn = None
            self._connected.clear()
        conn.lost = lost
        for out in conn.outgoing.values():
            out.queue.put_nowait(("error", lost))
        conn.outgoing.clear()
        for call in conn.incoming.values():
            call._input.fail(lost)
        conn.incoming.clear()
        for task in conn.tasks:
            task.cancel()
        log.info("%s: %s", self.url, lost)
        self._call_hook(self._on_disconnect, lost)

    def _call_hook(self, hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(_log_task_error)
        except Exception:
            log.exception("a callback raised")

    # --------------------------------------------------------------- reading

    async def _read(self, conn: _Conn) -> tuple[int | None, str]:
        ws = conn.ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    try:
                        message = message.decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                if not message:
                    continue  # keepalive
                try:
                    self._dispatch(conn, message)
                except Exception:  # pragma: no cover - a bug must not kill the connection
                    log.exception("while handling a frame")
        except ConnectionClosed:
            pass
        code = ws.close_code
        return (code if code is not None else CloseCode.ABNORMAL), ws.close_reason or ""

    def _dispatch(self, conn: _Conn, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.debug("dropped a frame that is not JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "rep":
            self._on_reply(conn, message)
        elif kind == "req" and isinstance(message.get("method"), str):
            self._on_request(conn, message)

    def _on_reply(self, conn: _Conn, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        out = conn.outgoing.get(call_id) if _valid_id(call_id) else None
        if out is None:
            return  # a late reply to a call given up on
        if message.get("error") is not None:
            del conn.outgoing[out.id]
            out.queue.put_nowait(("error", DuplexError.from_dict(message["error"])))
        elif message.get("more") is True:
            out.queue.put_nowait(("more", message.get("payload")))
        else:
            del conn.outgoing[out.id]
            out.queue.put_nowait(("end", message.get("payload")))

    def _on_request(self, conn: _Conn, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        if call_id is not None and call_id != 0 and not _valid_id(call_id):
            log.debug("dropped a request with an invalid id: %r", call_id)
            return
        if isinstance(call_id, int) and call_id in conn.incoming:
            conn.incoming[call_id]._input.push(message.get("payload"), message.get("more") is True)
            return
        call = Call(self, conn, message)
        if call.id is not None:
            conn.incoming[call.id] = call
        task = asyncio.get_running_loop().create_task(self._serve(conn, call))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    async def _serve(self, conn: _Conn, call: Call) -> None:
        handler = self._handlers.get(call.method)
        reply: dict[str, Any] = {"type": "rep", "id": call.id}
        try:
            if handler is None:
                raise DuplexError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {call.method}")
            result = handler(call)
            if inspect.isawaitable(result):
                result = await result
            reply["payload"] = result
            _dumps(reply)  # a result that is not JSON is an internal error, below
        except DuplexError as error:
            reply.pop("payload", None)
            reply["error"] = error.to_dict()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler of %r failed", call.method)
            reply.pop("payload", None)
            reply["error"] = {"code": int(ErrorCode.INTERNAL_ERROR), "message": "internal error"}
        finally:
            call.finished = True
            if call.id is not None and conn.incoming.get(call.id) is call:
                del conn.incoming[call.id]
        if call.id is None:
            if "error" in reply:
                log.debug("notification %r failed: %s", call.method, reply["error"])
            return
        if call.reply_ext is not None:
            reply["ext"] = call.reply_ext
        try:
            await self._send_on(conn, reply)
        except DuplexGatewayError:
            pass  # the connection is gone: the caller gets an error from the gateway

    # --------------------------------------------------------------- sending

    def _live_conn(self) -> _Conn:
        conn = self._conn
        if conn is None:
            raise NotConnected(f"not connected: {self._not_connected_why}")
        return conn

    async def _send_on(self, conn: _Conn, frame: Mapping[str, Any]) -> None:
        text = _dumps(frame)
        if conn.lost is not None:
            raise ConnectionLost(conn.lost.code, conn.lost.reason)
        try:
            await conn.ws.send(text)
        except ConnectionClosed as e:
            raise ConnectionLost(
                e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else ""
            ) from None

    def _new_outgoing(self, conn: _Conn) -> _Outgoing:
        self._next_id += 1
        out = _Outgoing(self._next_id)
        conn.outgoing[out.id] = out
        return out

    async def _notify(self, method: str, payload: Any, ext: Mapping[str, Any] | None) -> None:
        conn = self._live_conn()
        frame: dict[str, Any] = {"type": "req", "method": method, "payload": payload}
        if ext is not None:
            frame["ext"] = dict(ext)
        await self._send_first(conn, frame)

    async def _send_first(self, conn: _Conn, frame: Mapping[str, Any]) -> None:
        """Sends a call's first frame: a connection that is going away is NotConnected."""
        try:
            await self._send_on(conn, frame)
        except ConnectionLost as e:
            raise NotConnected(f"not connected: {e}") from None

    async def _start_call(
        self, method: str, payload: Any, ext: Mapping[str, Any] | None, more: bool = False
    ) -> tuple[_Conn, _Outgoing]:
        conn = self._live_conn()
        frame: dict[str, Any] = {"type": "req", "method": method, "payload": payload}
        text_check = _dumps(frame)  # fail on a payload that is not JSON before taking an id
        del text_check
        out = self._new_outgoing(conn)
        frame["id"] = out.id
        if more:
            frame["more"] = True
        if ext is not None:
            frame["ext"] = dict(ext)
        try:
            await self._send_first(conn, frame)
        except BaseException:
            conn.outgoing.pop(out.id, None)
            raise
        return conn, out

    async def _replies(
        self, conn: _Conn, out: _Outgoing, sender: asyncio.Task[None] | None = None
    ) -> AsyncGenerator[Any, None]:
        """Yields every reply payload of a call, the last one included."""
        try:
            while True:
                kind, value = await out.queue.get()
                if kind == "more":
                    yield value
                elif kind == "end":
                    yield value
                    return
                else:
                    raise value
        finally:
            conn.outgoing.pop(out.id, None)
            if sender is not None and not sender.done():
                sender.cancel()

    async def _call(
        self,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        async with asyncio.timeout(timeout):
            conn, out = await self._start_call(method, payload, ext)
            try:
                while True:
                    kind, value = await out.queue.get()
                    if kind == "end":
                        return value
                    if kind == "error":
                        raise value
            finally:
                conn.outgoing.pop(out.id, None)

    async def _stream(
        self,
        method: str,
        payload: Any = None,
        *,
        ext: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        conn, out = await self._start_call(method, payload, ext)
        replies = self._replies(conn, out)
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        item = await anext(replies)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await replies.aclose()

    async def _open_call(
        self, method: str, payload: Any, ext: Mapping[str, Any] | None, more: bool
    ) -> OutgoingCall:
        conn, out = await self._start_call(method, payload, ext, more=more)
        return OutgoingCall(self, conn, out, method, ext, more)

    async def _stream_with_input(
        self,
        method: str,
        inputs: AsyncIterable[Any] | Iterable[Any],
        *,
        ext: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[Any, None]:
        source = _aiter(inputs)
        self._live_conn()  # fail at once when disconnected, before reading the input
        first = await anext(source, _END)
        if first is _END:
            conn, out = await self._start_call(method, None, ext)
            sender = None
        else:
            following = await anext(source, _END)
            conn, out = await self._start_call(method, first, ext, more=following is not _END)
            sender = None
            if following is not _END:
                sender = asyncio.create_task(self._pump(conn, out, method, ext, following, source))
        replies = self._replies(conn, out, sender)
        try:
            async for item in replies:
                yield item
        finally:
            await replies.aclose()

    async def _pump(
        self,
        conn: _Conn,
        out: _Outgoing,
        method: str,
        ext: Mapping[str, Any] | None,
        pending: Any,
        source: AsyncIterator[Any],
    ) -> None:
        """Sends the rest of a streamed input, one frame behind the source so the last frame
        is the one without ``more``."""
        try:
            while True:
                following = await anext(source, _END)
                if conn.outgoing.get(out.id) is not out:
                    return  # the call already ended (an early reply or an error)
                frame: dict[str, Any] = {
                    "type": "req",
                    "method": method,
                    "id": out.id,
                    "payload": pending,
                }
                if following is not _END:
                    frame["more"] = True
                if ext is not None:
                    frame["ext"] = dict(ext)
                await self._send_on(conn, frame)
                if following is _END:
                    return
                pending = following
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            # The input failed (or the connection did): the call cannot be finished cleanly.
            if conn.outgoing.pop(out.id, None) is not None:
                out.queue.put_nowait(("error", error))


def _valid_id(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


async def _aiter(items: AsyncIterable[Any] | Iterable[Any]) -> AsyncGenerator[Any, None]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a callback failed", exc_info=task.exception())
