#!/usr/bin/env python3
"""An example client: calls echo, count and add (streamed input) of the example backend.

    python examples/client.py --url ws://127.0.0.1:8080 --path /demo --secret s3cret

Prints one JSON line per result ({"echo": ...}, {"count": [1, 2, 3]}, {"add": 6}) and exits 0,
or prints the error on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from duplex_gateway import connect  # noqa: E402


async def run(url: str, secret: str | None) -> None:
    async with connect(url, secret=secret, reconnect=False) as client:
        print(json.dumps({"echo": await client.call("echo", {"hello": "python"})}), flush=True)
        print(json.dumps({"count": [n async for n in client.stream("count", 3)]}), flush=True)
        print(json.dumps({"add": await client.call_with_input("add", [1, 2, 3])}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the gateway's WebSocket URL")
    parser.add_argument("--path", default="/demo", help="the endpoint path")
    parser.add_argument("--secret", default=None, help="the endpoint's client secret")
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="give up after this many seconds"
    )
    args = parser.parse_args()
    url = args.url.rstrip("/") + "/" + args.path.lstrip("/")
    try:
        asyncio.run(asyncio.wait_for(run(url, args.secret), args.timeout))
    except Exception as e:
        print(f"client failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
