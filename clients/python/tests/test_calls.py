"""Calls through the real gateway: echo, reply streams, streamed input, backend-to-client
calls, errors, HTTP, signed tokens, drain."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import JWT_KEY, SECRET, Gateway, add_example_handlers, mint_jwt

from duplex_gateway import (
    Backend,
    Call,
    ClosedByGateway,
    ConnectionRefused,
    DuplexError,
    ErrorCode,
    NotConnected,
    http_call,
    http_notify,
    http_stream,
)


async def test_echo(gateway: Gateway, demo: Backend, make_client: Any) -> None:
    client = await make_client(gateway)
    assert await client.call("echo", {"hello": "python"}) == {"hello": "python"}
    assert await client.call("echo") is None
    big = 123456789012345678901234567890
    assert await client.call("echo", [big, 1.5, "é", None, True]) == [big, 1.5, "é", None, True]


async def test_ext_comes_back(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)
    seen: list[Any] = []

    @backend.handle("ext")
    async def ext(call: Call) -> Any:
        seen.append(call.ext)
        call.reply_ext = dict(call.ext or {}, added="by-backend")
        return call.route

    await backend.start()
    client = await make_client(gateway)
    route = await client.call("ext", None, ext={"mine": 1})
    assert isinstance(route, str) and len(route) == 32
    assert seen == [{"mine": 1, "route": route}]


async def test_concurrent_calls(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)

    @backend.handle("sleep")
    async def sleep(call: Call) -> Any:
        await asyncio.sleep(call.payload)
        return call.payload

    await backend.start()
    client = await make_client(gateway)
    started = time.monotonic()
    results = await asyncio.gather(*(client.call("sleep", 0.3 - i * 0.01) for i in range(20)))
    assert results == [0.3 - i * 0.01 for i in range(20)]
    assert time.monotonic() - started < 2


async def test_reply_stream(gateway: Gateway, demo: Backend, make_client: Any) -> None:
    client = await make_client(gateway)
    assert [n async for n in client.stream("count", 3)] == [1, 2, 3]
    assert [n async for n in client.stream("count", 1)] == [1]
    assert await client.call("count", 5) == 5  # call() answers the last frame


async def test_reply_stream_error_midway(
    gateway: Gateway, make_backend: Any, make_client: Any
) -> None:
    backend = make_backend(gateway)

    @backend.handle("fail_after")
    async def fail_after(call: Call) -> Any:
        for i in range(call.payload):
            await call.send(i)
        raise DuplexError(-32099, "broke", {"at": call.payload})

    await backend.start()
    client = await make_client(gateway)
    got: list[Any] = []
    with pytest.raises(DuplexError) as raised:
        async for item in client.stream("fail_after", 2):
            got.append(item)
    assert got == [0, 1]
    assert (raised.value.code, raised.value.message, raised.value.data) == (
        -32099,
        "broke",
        {"at": 2},
    )


async def test_streamed_input(gateway: Gateway, demo: Backend, make_client: Any) -> None:
    client = await make_client(gateway)
    assert await client.call_with_input("add", [1, 2, 3]) == 6
    assert await client.call_with_input("add", [[1, 2], 3]) == 6
    assert await client.call_with_input("add", [5]) == 5
    assert await client.call_with_input("add", []) == 0  # one request without payload

    async def slowly() -> Any:
        for i in range(1, 5):
            await asyncio.sleep(0.02)
            yield i

    assert await client.call_with_input("add", slowly()) == 10


async def test_streamed_input_two_clients_same_ids(
    gateway: Gateway, demo: Backend, make_client: Any
) -> None:
    # Both clients use ids 1, 2, ...: the gateway keeps their streams apart.
    a = await make_client(gateway)
    b = await make_client(gateway)

    async def numbers(start: int) -> Any:
        for i in range(start, start + 20):
            await asyncio.sleep(0.001)
            yield i

    ra, rb = await asyncio.gather(
        a.call_with_input("add", numbers(0)), b.call_with_input("add", numbers(1000))
    )
    assert (ra, rb) == (sum(range(0, 20)), sum(range(1000, 1020)))


async def test_streams_both_ways(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)

    @backend.handle("running_total")
    async def running_total(call: Call) -> Any:
        total = 0
        async for item in call.input:
            total += item
            await call.send(total)
        return "done"

    await backend.start()
    client = await make_client(gateway)
    assert [t async for t in client.stream_with_input("running_total", [1, 2, 3, 4])] == [
        1,
        3,
        6,
        10,
        "done",
    ]

    # A conversation: each input frame is sent after the reply to the previous one.
    call = await client.open_call("running_total", 1)
    replies = aiter(call)
    assert await anext(replies) == 1
    await call.send(2)
    assert await anext(replies) == 3
    await call.end(3)
    assert await anext(replies) == 6
    assert await call.result() == "done"
    with pytest.raises(RuntimeError):
        await call.send(4)


async def test_backend_calls_client(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)
    routes: list[str] = []

    @backend.handle("register")
    async def register(call: Call) -> Any:
        assert call.route is not None
        routes.append(call.route)
        return "ok"

    @backend.handle("ask")
    async def ask(call: Call) -> Any:
        # Calls the calling client back while its call is open.
        assert call.route is not None
        return await backend.call_client(call.route, "greet", call.payload, timeout=5)

    await backend.start()
    client = await make_client(gateway)
    greeted: list[Any] = []

    async def greet(call: Call) -> Any:
        greeted.append((call.payload, call.ext))
        return f"hello {call.payload}"

    client.handle("greet", greet)

    @client.handle("tick")
    async def tick(call: Call) -> Any:
        for i in range(call.payload):
            await call.send(i)
        return "done"

    assert await client.call("ask", "bob") == "hello bob"
    assert greeted == [("bob", None)]  # the gateway removed ext.route

    assert await client.call("register") == "ok"
    route = routes[0]
    assert await backend.call_client(route, "greet", "alice", timeout=5) == "hello alice"
    assert [x async for x in backend.stream_client(route, "tick", 2, timeout=5)] == [0, 1, "done"]

    with pytest.raises(DuplexError) as raised:
        await backend.call_client(route, "unknown", timeout=5)
    assert raised.value.code == ErrorCode.METHOD_NOT_FOUND

    with pytest.raises(DuplexError) as raised:
        await backend.call_client("0" * 32, "greet", "nobody", timeout=5)
    assert raised.value.code == ErrorCode.CLIENT_NOT_CONNECTED


async def test_client_leaving_fails_backend_call(
    gateway: Gateway, make_backend: Any, make_client: Any
) -> None:
    backend = make_backend(gateway)
    routes: list[str] = []
    backend.handle("register", lambda call: routes.append(call.route))
    await backend.start()
    client = await make_client(gateway)
    entered = asyncio.Event()

    @client.handle("hang")
    async def hang(call: Call) -> Any:
        entered.set()
        await asyncio.sleep(30)

    await client.call("register")
    pending = asyncio.create_task(backend.call_client(routes[0], "hang", timeout=10))
    await asyncio.wait_for(entered.wait(), 5)
    await client.close()
    with pytest.raises(DuplexError) as raised:
        await pending
    assert raised.value.code == ErrorCode.CLIENT_NOT_CONNECTED


async def test_notifications(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)
    got: asyncio.Queue[Any] = asyncio.Queue()
    routes: list[str] = []

    @backend.handle("note")
    async def note(call: Call) -> Any:
        assert call.id is None
        if call.route:
            routes.append(call.route)
        await got.put(call.payload)
        return "ignored"

    await backend.start()
    client = await make_client(gateway)
    client_got: asyncio.Queue[Any] = asyncio.Queue()
    client.handle("ping", lambda call: client_got.put_nowait(call.payload))

    await client.notify("note", {"n": 1})
    assert await asyncio.wait_for(got.get(), 5) == {"n": 1}
    await backend.notify_client(routes[0], "ping", 7)
    assert await asyncio.wait_for(client_got.get(), 5) == 7
    await http_notify(gateway.http, "/demo", "note", {"n": 2}, secret=SECRET)
    assert await asyncio.wait_for(got.get(), 5) == {"n": 2}


async def test_error_replies(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)

    @backend.handle("invalid")
    async def invalid(call: Call) -> Any:
        raise DuplexError(ErrorCode.INVALID_PARAMS, "wrong arguments", {"field": "x"})

    @backend.handle("crash")
    async def crash(call: Call) -> Any:
        raise ValueError("a bug")

    @backend.handle("not_json")
    async def not_json(call: Call) -> Any:
        return object()

    await backend.start()
    client = await make_client(gateway)

    with pytest.raises(DuplexError) as raised:
        await client.call("invalid")
    assert raised.value.code == -32602
    assert raised.value.message == "wrong arguments"
    assert raised.value.data == {"field": "x"}

    with pytest.raises(DuplexError) as raised:
        await client.call("nope")
    assert raised.value.code == ErrorCode.METHOD_NOT_FOUND

    for method in ("crash", "not_json"):
        with pytest.raises(DuplexError) as raised:
            await client.call(method)
        assert raised.value.code == ErrorCode.INTERNAL_ERROR

    # None of this hurt the connection.
    with pytest.raises(DuplexError):
        await client.call("invalid", timeout=5)
    assert client.connected


async def test_call_timeout(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)
    backend.handle("slow", lambda call: asyncio.sleep(5))
    backend.handle("echo", lambda call: call.payload)
    await backend.start()
    client = await make_client(gateway)
    with pytest.raises(TimeoutError):
        await client.call("slow", timeout=0.2)
    assert await client.call("echo", 1, timeout=5) == 1  # the late reply is dropped


async def test_http_calls(gateway: Gateway, make_backend: Any) -> None:
    backend = add_example_handlers(make_backend(gateway))

    @backend.handle("invalid")
    async def invalid(call: Call) -> Any:
        raise DuplexError(ErrorCode.INVALID_PARAMS, "wrong arguments", {"field": "x"})

    await backend.start()
    base = gateway.http
    assert await http_call(base, "/demo", "echo", {"hello": "http"}, secret=SECRET) == {
        "hello": "http"
    }
    assert await http_call(base, "/demo", "echo", None, secret=SECRET) is None
    assert (
        await http_call(gateway.ws, "demo", "add", [1, 2, 3], secret=SECRET) == 6
    )  # ws:// works too
    assert await http_call(base, "/demo", "count", 3, secret=SECRET) == 3
    assert [n async for n in http_stream(base, "/demo", "count", 3, secret=SECRET)] == [1, 2, 3]
    assert [n async for n in http_stream(base, "/demo", "echo", "one", secret=SECRET)] == ["one"]

    with pytest.raises(DuplexError) as raised:
        await http_call(base, "/demo", "echo", 1, secret="wrong")
    assert (raised.value.status, raised.value.code) == (401, 401)

    with pytest.raises(DuplexError) as raised:
        await http_call(base, "/demo", "nope", 1, secret=SECRET)
    assert (raised.value.status, raised.value.code) == (501, -32601)

    with pytest.raises(DuplexError) as raised:
        await http_call(base, "/demo", "invalid", 1, secret=SECRET)
    assert (raised.value.status, raised.value.code, raised.value.data) == (
        400,
        -32602,
        {"field": "x"},
    )

    with pytest.raises(DuplexError) as raised:
        await http_call(base, "/elsewhere", "echo", 1, secret=SECRET)
    assert raised.value.status == 404


async def test_http_rate_limit_retry_after(gateway_factory: Any, make_backend: Any) -> None:
    gateway = gateway_factory(limits="  requests_per_ip_per_second: 1")
    backend = add_example_handlers(make_backend(gateway))
    await backend.start()
    with pytest.raises(DuplexError) as raised:
        for _ in range(5):
            await http_call(gateway.http, "/demo", "echo", 1, secret=SECRET)
    assert raised.value.status == 429
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1


async def test_refused_connections(gateway: Gateway, demo: Backend, make_client: Any) -> None:
    with pytest.raises(ConnectionRefused) as raised:
        await make_client(gateway, secret="wrong")
    assert raised.value.status == 401
    with pytest.raises(ConnectionRefused) as raised:
        await make_client(gateway, "/nothing-here")
    assert raised.value.status == 404

    bad = Backend(gateway.ws, "/other", token="not-a-configured-token", secret="x")
    with pytest.raises(ConnectionRefused) as raised:
        await asyncio.wait_for(bad.start(), 5)  # 401 is not retried
    assert raised.value.status == 401
    assert bad.closed


async def test_signed_tokens_and_refresh(
    gateway_factory: Any, make_backend: Any, make_client: Any
) -> None:
    gateway = gateway_factory(
        extra=f"""endpoints:
  - path: /jwt
    auth:
      secret: false
      jwt:
        hs256_secret: "{JWT_KEY}"
"""
    )
    await add_example_handlers(make_backend(gateway, "/jwt", secret=None)).start()

    with pytest.raises(ConnectionRefused) as refused:
        await make_client(gateway, "/jwt", secret=None)
    assert refused.value.status == 401

    client = await make_client(gateway, "/jwt", secret=None, token=mint_jwt("alice", ttl=60))
    assert await client.call("whoami") == {"sub": "alice"}

    fresh = mint_jwt("alice", ttl=3600)
    answer = await client.refresh(fresh)
    assert isinstance(answer, dict) and answer["exp"] > time.time() + 3000
    assert client.token == fresh

    with pytest.raises(DuplexError) as raised:
        await client.refresh(mint_jwt("bob"))
    assert raised.value.code == ErrorCode.INVALID_PARAMS
    assert client.token == fresh  # unchanged
    assert await client.call("whoami") == {"sub": "alice"}

    assert await http_call(gateway.http, "/jwt", "whoami", token=mint_jwt("carol")) == {
        "sub": "carol"
    }


async def test_drain(gateway: Gateway, make_backend: Any, make_client: Any) -> None:
    backend = make_backend(gateway)
    entered = asyncio.Event()

    @backend.handle("slow")
    async def slow(call: Call) -> Any:
        entered.set()
        await asyncio.sleep(0.5)
        return "finished"

    await backend.start()
    client = await make_client(gateway, reconnect=False)
    running = asyncio.create_task(client.call("slow", timeout=10))
    await asyncio.wait_for(entered.wait(), 5)
    started = time.monotonic()
    assert await asyncio.wait_for(backend.drain(), 10) == 0
    assert time.monotonic() - started >= 0.3  # the gateway answered once the call ended
    assert await running == "finished"
    await asyncio.wait_for(backend.run(), 5)  # returns: drained and closed
    assert backend.closed and not backend.connected
    with pytest.raises(NotConnected):
        await backend.call_client("0" * 32, "x")


async def test_replaced_backend_does_not_come_back(
    gateway: Gateway, make_backend: Any, make_client: Any
) -> None:
    first = add_example_handlers(make_backend(gateway))
    await first.start()
    client = await make_client(gateway)
    second = make_backend(gateway)
    second.handle("echo", lambda call: ["second", call.payload])
    await second.start()
    with pytest.raises(ClosedByGateway) as raised:
        await asyncio.wait_for(first.wait_closed(), 5)
    assert raised.value.code == 1012
    await asyncio.sleep(0.3)  # a reconnecting backend would have taken the endpoint back by now
    assert not first.connected
    assert await client.call("echo", 1, timeout=5) == ["second", 1]
