#!/usr/bin/env python3
"""An example backend: publishes echo, count, add and whoami on a path of a gateway.

    python examples/backend.py --url ws://127.0.0.1:8080 --path /demo --token TOKEN --secret s3cret

- echo: answers with its payload.
- count: payload n (an integer >= 1): streams 1 .. n-1 (more: true), then answers n.
- add: sums numbers (a number, an array of numbers, or streamed input of those).
- whoami: answers ext.auth (who calls, on endpoints with signed client tokens), else null.

Prints "ready" on stdout once published; publishes again whenever the connection drops.
SIGINT/SIGTERM drain it first (the running calls finish), then it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from duplex_gateway import Backend, Call, DuplexError, ErrorCode  # noqa: E402


def make_backend(url: str, path: str, token: str, secret: str | None) -> Backend:
    backend = Backend(url, path, token=token, secret=secret)

    @backend.handle("echo")
    async def echo(call: Call) -> Any:
        return call.payload

    @backend.handle("count")
    async def count(call: Call) -> Any:
        n = call.payload
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000:
            raise DuplexError(ErrorCode.INVALID_PARAMS, "count takes an integer from 1 to 1000000")
        for i in range(1, n):
            await call.send(i)
        return n

    @backend.handle("add")
    async def add(call: Call) -> Any:
        total: int | float = 0
        async for item in call.input:  # the first frame's payload, then the streamed ones
            total += _sum(item)
        return total

    @backend.handle("whoami")
    async def whoami(call: Call) -> Any:
        return call.auth

    return backend


def _sum(value: Any) -> int | float:
    if value is None:
        return 0
    if isinstance(value, list):
        return sum(_sum(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise DuplexError(ErrorCode.INVALID_PARAMS, "add takes numbers or arrays of numbers")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the gateway's WebSocket URL")
    parser.add_argument("--path", default="/demo", help="the endpoint path to publish")
    parser.add_argument(
        "--token", default=os.environ.get("DUPLEX_GATEWAY_TOKEN"), help="publish token"
    )
    parser.add_argument("--secret", default=None, help="the secret clients must present")
    args = parser.parse_args()
    if not args.token:
        parser.error("--token (or DUPLEX_GATEWAY_TOKEN) is required")

    backend = make_backend(args.url, args.path, args.token, args.secret)
    await backend.start()
    print("ready", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(backend.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not runner.done():
        try:
            pending = await backend.drain(timeout=35)
            print(f"drained ({pending} calls still running)", file=sys.stderr)
        except Exception as e:  # the connection may be gone already
            print(f"drain failed: {e}", file=sys.stderr)
            await backend.close()
    stopper.cancel()
    try:
        await runner
    except Exception as e:
        print(f"backend stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
