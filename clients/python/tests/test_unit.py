"""Unit tests without the gateway: the backoff, the retry decisions, Retry-After, helpers."""

from __future__ import annotations

import asyncio
import random
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import pytest
from websockets.asyncio.server import serve

from duplex_gateway import (
    HANDSHAKE,
    Backend,
    ConnectionRefused,
    DuplexError,
    HandshakeError,
    NotConnected,
    ReconnectPolicy,
    connect,
)
from duplex_gateway._peer import ws_url
from duplex_gateway.errors import ConnectionLost, parse_retry_after
from duplex_gateway.http import _url

# ------------------------------------------------------------------------------ the backoff


def test_default_policy_is_half_a_second_to_thirty() -> None:
    policy = ReconnectPolicy()
    assert (policy.initial, policy.maximum) == (0.5, 30.0)
    assert [policy.cap(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.cap(10_000) == 30  # no overflow, still capped


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 50])
def test_full_jitter_is_spread_over_zero_to_cap(attempt: int) -> None:
    policy = ReconnectPolicy()
    rng = random.Random(1234 + attempt)
    cap = policy.cap(attempt)
    delays = [policy.delay(attempt, rng=rng) for _ in range(5000)]
    assert all(0.0 <= d <= cap for d in delays)
    assert all(d <= 30.0 for d in delays)
    # Full jitter: uniform over [0, cap], not bunched near the cap (as "equal jitter" would be).
    assert min(delays) < 0.01 * cap
    assert max(delays) > 0.99 * cap
    assert abs(sum(delays) / len(delays) - cap / 2) < 0.05 * cap
    bins = [0] * 10
    for d in delays:
        bins[min(9, int(d / cap * 10))] += 1
    assert all(400 <= b <= 600 for b in bins), bins


def test_jitter_uses_the_module_random_by_default() -> None:
    policy = ReconnectPolicy(initial=1, maximum=1)
    delays = {policy.delay(0) for _ in range(50)}
    assert len(delays) > 40 and all(0 <= d <= 1 for d in delays)


def test_retry_after_is_a_floor() -> None:
    policy = ReconnectPolicy()
    rng = random.Random(7)
    for attempt in (0, 4, 20):
        for _ in range(500):
            d = policy.delay(attempt, retry_after=3.0, rng=rng)
            assert 3.0 <= d <= 3.0 + policy.cap(attempt)
    assert policy.delay(0, retry_after=0, rng=rng) <= 0.5


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy(initial=0)
    with pytest.raises(ValueError):
        ReconnectPolicy(initial=2, maximum=1)
    with pytest.raises(ValueError):
        ReconnectPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        ReconnectPolicy().cap(-1)


# ------------------------------------------------------ the retry decisions, with fake attempts


class Script:
    """Replaces a peer's connection attempts and sleeps with a script."""

    def __init__(self, peer: Any, outcomes: list[Any]) -> None:
        self.outcomes = list(outcomes)
        self.sleeps: list[float] = []
        self.attempts = 0
        peer._open_once = self.open_once
        peer._sleep = self.sleep

    async def open_once(self) -> Any:
        self.attempts += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)


def backend(**policy: Any) -> Backend:
    return Backend("127.0.0.1:1", "/p", token="t" * 16, reconnect=ReconnectPolicy(**policy))


async def test_reconnect_waits_retry_after_then_backs_off() -> None:
    peer = backend(initial=0.5, maximum=30)
    script = Script(
        peer,
        [
            ConnectionRefused(429, "too many requests", retry_after=2.0),
            ConnectionRefused(503, "full", retry_after=5.0),
            OSError("connection refused"),
            "CONN",
        ],
    )
    conn, next_attempt = await peer._open_with_retry(0, ConnectionLost(1006))
    assert conn == "CONN" and script.attempts == 4 and next_attempt == 4
    first, second, third, fourth = script.sleeps
    assert 0 <= first <= 0.5  # attempt 0 after the drop
    assert 2.0 <= second <= 2.0 + 1  # Retry-After 2 s, plus attempt 1's jitter
    assert 5.0 <= third <= 5.0 + 2  # Retry-After 5 s, plus attempt 2's jitter
    assert 0 <= fourth <= 4  # no Retry-After: attempt 3's jitter alone


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_refusals_that_are_never_retried(status: int) -> None:
    peer = backend()
    script = Script(peer, [ConnectionRefused(status)])
    with pytest.raises(ConnectionRefused):
        await peer._open_with_retry(0, ConnectionLost(1006))
    assert script.attempts == 1


async def test_not_found_is_retried_while_reconnecting_only() -> None:
    peer = backend()
    Script(peer, [ConnectionRefused(404), "CONN"])
    assert (await peer._open_with_retry(0, ConnectionLost(1006)))[0] == "CONN"

    first = backend()  # a first connection: 404 raises
    script = Script(first, [ConnectionRefused(404), "CONN"])
    with pytest.raises(ConnectionRefused):
        await first._open_with_retry(0, None)
    assert script.attempts == 1

    strict = backend(retry_not_found=False)
    Script(strict, [ConnectionRefused(404), "CONN"])
    with pytest.raises(ConnectionRefused):
        await strict._open_with_retry(0, ConnectionLost(1006))


async def test_first_connection_of_a_backend_retries_from_attempt_zero() -> None:
    peer = backend(initial=0.5, maximum=30)
    script = Script(peer, [OSError("down"), OSError("down"), "CONN"])
    conn, next_attempt = await peer._open_with_retry(0, None)
    assert conn == "CONN" and next_attempt == 2
    assert 0 <= script.sleeps[0] <= 0.5 and 0 <= script.sleeps[1] <= 1.0


async def test_handshake_refusal_is_not_retried() -> None:
    peer = backend()
    script = Script(peer, [HandshakeError("-ERR nope"), "CONN"])
    with pytest.raises(HandshakeError):
        await peer._open_with_retry(0, ConnectionLost(1006))
    assert script.attempts == 1


async def test_max_attempts() -> None:
    peer = backend(max_attempts=3)
    script = Script(peer, [OSError("a"), OSError("b"), OSError("c"), "CONN"])
    with pytest.raises(OSError, match="c"):
        await peer._open_with_retry(0, ConnectionLost(1006))
    assert script.attempts == 3


# ----------------------------------------- Retry-After over real HTTP, from a stand-in server


async def test_backend_start_honours_retry_after_of_a_refused_upgrade() -> None:
    """A stand-in gateway refuses the first upgrade with 503 and Retry-After: 1."""
    seen: list[float] = []

    def process_request(connection: Any, request: Any) -> Any:
        seen.append(time.monotonic())
        if len(seen) == 1:
            response = connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, '{"error":{"code":503,"message":"busy"}}'
            )
            response.headers["Retry-After"] = "1"
            return response
        return None

    async def handler(ws: Any) -> None:
        assert await ws.recv() == HANDSHAKE
        await ws.send("+OK")
        async for _ in ws:
            pass

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        retries: list[Any] = []
        peer = Backend(
            f"127.0.0.1:{port}",
            "/p",
            token="t" * 16,
            reconnect=ReconnectPolicy(initial=0.01, maximum=0.05),
            on_retry=lambda *a: retries.append(a),
        )
        await asyncio.wait_for(peer.start(), 10)
        try:
            assert len(seen) == 2
            assert seen[1] - seen[0] >= 1.0
            ((attempt, delay, cause),) = retries
            assert isinstance(cause, ConnectionRefused)
            assert (cause.status, cause.retry_after, cause.message) == (503, 1.0, "busy")
            assert 1.0 <= delay <= 1.01
        finally:
            await peer.close()


async def test_client_handshake_refused() -> None:
    async def handler(ws: Any) -> None:
        await ws.recv()
        await ws.send("-ERR unsupported codec")
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeError, match="unsupported codec"):
            await asyncio.wait_for(connect(f"ws://127.0.0.1:{port}/p"), 5)


# ------------------------------------------------------------------------------ the helpers


def test_urls() -> None:
    assert ws_url("127.0.0.1:8080", "/demo") == "ws://127.0.0.1:8080/demo"
    assert ws_url("http://h:1/ignored?x=1", "demo") == "ws://h:1/demo?x=1"
    assert ws_url("https://h/a/b") == "wss://h/a/b"
    with pytest.raises(ValueError):
        ws_url("ftp://h/x")
    assert _url("http://h:1", "/demo", "echo") == "http://h:1/demo/echo"
    assert _url("ws://h:1/", "team/a/", "search") == "http://h:1/team/a/search"
    assert _url("h:1", "/", "echo", "async=true") == "http://h:1/echo?async=true"


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 <= later <= 61


def test_duplex_error() -> None:
    error = DuplexError.from_dict(
        {"code": -32004, "message": "rate limited", "data": {"retry_after_ms": 250}}
    )
    assert (error.code, error.message, error.retry_after) == (-32004, "rate limited", 0.25)
    assert error.to_dict() == {
        "code": -32004,
        "message": "rate limited",
        "data": {"retry_after_ms": 250},
    }
    assert "rate limited" in str(error)
    assert DuplexError.from_dict("garbage").code == -32603


async def test_close_during_start_backend_retry() -> None:
    """A backend retrying its first publish stops when closed."""
    peer = Backend(
        "127.0.0.1:9",  # nothing listens there
        "/p",
        token="t" * 16,
        reconnect=ReconnectPolicy(initial=0.05, maximum=0.1),
    )
    starting = asyncio.create_task(peer.start())
    await asyncio.sleep(0.3)
    assert not starting.done()
    await asyncio.wait_for(peer.close(), 2)
    with pytest.raises(NotConnected):
        await asyncio.wait_for(starting, 2)
    assert peer.closed and not peer.connected
