"""Reconnection against the real gateway: restarts, dropped connections, 1008, Retry-After."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from conftest import SECRET, Gateway, add_example_handlers, eventually

from duplex_gateway import (
    Call,
    ClosedByGateway,
    ConnectionLost,
    ConnectionRefused,
    DuplexError,
    ErrorCode,
    NotConnected,
    http_call,
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_reconnect_after_gateway_restart(
    gateway: Gateway, make_backend: Any, make_client: Any, sig: int
) -> None:
    publishes: list[float] = []
    backend = add_example_handlers(
        make_backend(gateway, on_connect=lambda: publishes.append(time.monotonic()))
    )
    entered = asyncio.Event()

    @backend.handle("hang")
    async def hang(call: Call) -> Any:
        entered.set()
        await asyncio.sleep(30)

    await backend.start()
    client = await make_client(gateway)
    assert await client.call("echo", "before") == "before"
    hanging = asyncio.create_task(client.call("hang"))
    await asyncio.wait_for(entered.wait(), 5)

    await asyncio.to_thread(gateway.stop, sig)

    # The call open when the connection dropped fails.
    with pytest.raises((ConnectionLost, DuplexError)) as raised:
        await asyncio.wait_for(hanging, 5)
    if sig == signal.SIGKILL:
        assert isinstance(raised.value, ConnectionLost)
    await eventually(lambda: not client.connected and not backend.connected)

    # Calls made while disconnected fail at once: nothing is buffered.
    started = time.monotonic()
    with pytest.raises(NotConnected):
        await client.call("echo", 1)
    with pytest.raises(NotConnected):
        await client.call_with_input("add", [1, 2])
    with pytest.raises(NotConnected):
        async for _ in client.stream("count", 2):
            pass
    with pytest.raises(NotConnected):
        await client.notify("echo", 1)
    with pytest.raises(NotConnected):
        await backend.call_client("0" * 32, "greet")
    assert time.monotonic() - started < 0.2

    await asyncio.sleep(0.3)  # a few attempts meet a closed port
    assert not client.closed and not backend.closed
    await asyncio.to_thread(gateway.start)

    await backend.wait_connected(10)
    await client.wait_connected(10)
    assert len(publishes) == 2  # the backend published again
    assert await client.call("echo", "after", timeout=5) == "after"
    assert [n async for n in client.stream("count", 3, timeout=5)] == [1, 2, 3]


async def test_client_retries_not_found_after_restart(
    gateway: Gateway, make_backend: Any, make_client: Any
) -> None:
    """After a restart the client may come back before its backend: 404 is retried then."""
    first = add_example_handlers(make_backend(gateway))
    await first.start()
    causes: list[BaseException] = []
    client = await make_client(gateway, on_retry=lambda attempt, delay, cause: causes.append(cause))
    await first.close()
    await asyncio.to_thread(gateway.stop)
    await asyncio.to_thread(gateway.start)
    await eventually(
        lambda: any(isinstance(c, ConnectionRefused) and c.status == 404 for c in causes)
    )
    assert not client.connected and not client.closed
    await add_example_handlers(make_backend(gateway)).start()
    await client.wait_connected(10)
    assert await client.call("echo", "found", timeout=5) == "found"


async def test_backend_republishes_after_drop(
    gateway: Gateway, make_backend: Any, make_client: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(gateway.port)
    publishes: list[float] = []
    backend = add_example_handlers(  # publishes through the proxy
        make_backend(proxy.ws, on_connect=lambda: publishes.append(time.monotonic()))
    )
    entered = asyncio.Event()

    @backend.handle("hang")
    async def hang(call: Call) -> Any:
        entered.set()
        await asyncio.sleep(30)

    await backend.start()
    client = await make_client(gateway)  # directly: stays connected, the backend is in its grace
    hanging = asyncio.create_task(client.call("hang"))
    await asyncio.wait_for(entered.wait(), 5)
    proxy.cut()

    with pytest.raises(DuplexError) as raised:  # the gateway fails the backend's open calls
        await asyncio.wait_for(hanging, 5)
    assert raised.value.code == ErrorCode.BACKEND_UNAVAILABLE
    # Calls made during the grace wait for the backend that publishes again.
    assert await client.call("echo", "during grace", timeout=5) == "during grace"
    assert len(publishes) == 2
    assert client.connected


async def test_no_reconnect_after_1008(
    gateway_factory: Any, make_backend: Any, make_client: Any
) -> None:
    endpoint = "endpoints:\n  - path: /x\n    secret: {}\n"
    gateway = gateway_factory(extra=endpoint.format("s1"))
    await add_example_handlers(make_backend(gateway, "/x", secret=None)).start()
    retries: list[Any] = []
    client = await make_client(gateway, "/x", secret="s1", on_retry=lambda *a: retries.append(a))
    assert await client.call("echo", 1) == 1

    gateway.write_config(extra=endpoint.format("s2"))
    await asyncio.to_thread(gateway.reload)

    with pytest.raises(ClosedByGateway) as raised:
        await asyncio.wait_for(client.wait_closed(), 5)
    assert raised.value.code == 1008
    await asyncio.sleep(0.5)  # the test policy would have retried several times by now
    assert retries == []
    assert client.closed and not client.connected
    with pytest.raises(NotConnected):
        await client.call("echo", 1)
    with pytest.raises(ClosedByGateway):
        await client.wait_connected(1)

    other = await make_client(gateway, "/x", secret="s2")
    assert await other.call("echo", 2) == 2


async def test_reconnect_disabled(
    gateway: Gateway, demo: Any, make_client: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(gateway.port)
    client = await make_client(proxy.ws, reconnect=False)
    assert await client.call("echo", 1) == 1
    proxy.cut()
    with pytest.raises(ConnectionLost) as raised:
        await asyncio.wait_for(client.wait_closed(), 5)
    assert not isinstance(raised.value, ClosedByGateway)
    with pytest.raises(NotConnected):
        await client.call("echo", 1)


async def test_close_while_reconnecting(
    gateway: Gateway, demo: Any, make_client: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(gateway.port)
    retries: list[Any] = []
    client = await make_client(proxy.ws, on_retry=lambda *a: retries.append(a))
    await proxy.close()  # cuts, and refuses new connections
    await eventually(lambda: len(retries) >= 2)
    started = time.monotonic()
    await asyncio.wait_for(client.close(), 5)
    assert time.monotonic() - started < 1
    await asyncio.wait_for(client.wait_closed(), 1)  # a close is not an error
    assert client.closed


async def test_retry_after_honoured(
    gateway_factory: Any, make_backend: Any, make_client: Any, proxy_factory: Any
) -> None:
    gateway = gateway_factory(limits="  requests_per_ip_per_second: 1")
    await add_example_handlers(make_backend(gateway)).start()  # takes this second's token
    proxy = await proxy_factory(gateway.port)
    events: list[tuple[Any, ...]] = []

    def on_retry(attempt: int, delay: float, cause: BaseException) -> None:
        events.append(("retry", time.monotonic(), attempt, delay, cause))

    await asyncio.sleep(1.1)
    client = await make_client(
        proxy.ws, on_retry=on_retry, on_connect=lambda: events.append(("connect", time.monotonic()))
    )

    # Empty the address's bucket: the next upgrade will be refused with 429 and Retry-After.
    with pytest.raises(DuplexError) as raised:
        for _ in range(5):
            await http_call(gateway.http, "/demo", "echo", 1, secret=SECRET)
    assert raised.value.status == 429
    # A first connection is not retried: the refusal says when to come back.
    with pytest.raises(ConnectionRefused) as refused:
        await make_client(gateway)
    assert refused.value.status == 429 and refused.value.retry_after is not None
    assert refused.value.retry_after >= 1

    proxy.cut()
    await eventually(lambda: len([e for e in events if e[0] == "connect"]) == 2, timeout=10)

    limited = [e for e in events if e[0] == "retry" and isinstance(e[4], ConnectionRefused)]
    assert limited, events
    _, refused_at, attempt, delay, cause = limited[0]
    assert cause.status == 429 and cause.retry_after >= 1
    assert delay >= cause.retry_after  # the policy waits at least Retry-After
    reconnected_at = [e for e in events if e[0] == "connect"][-1][1]
    assert reconnected_at - refused_at >= cause.retry_after - 0.01

    # Calls over the rate are answered -32004 with data.retry_after_ms.
    for _ in range(10):
        try:
            assert await client.call("echo", "back", timeout=5) == "back"
            break
        except DuplexError as e:
            assert e.code == ErrorCode.RATE_LIMITED and e.retry_after is not None
            await asyncio.sleep(e.retry_after)
    else:
        pytest.fail("the call never got through")
