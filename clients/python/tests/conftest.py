"""Fixtures: the real gateway binary on free loopback ports, backends, and a TCP proxy that can
cut connections."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from duplex_gateway import Backend, Client, ReconnectPolicy, connect

ROOT = Path(__file__).resolve().parents[3]  # the repository: clients/python/tests/ -> ../../..
GATEWAY_BIN = Path(
    os.environ.get("DUPLEX_GATEWAY_BIN") or ROOT / "target" / "debug" / "duplex-gateway"
)

TOKEN = "main-token-0123456789"
SECRET = "s3cret"
JWT_KEY = "a-test-hs256-secret-of-at-least-32-bytes!"

# Fast reconnection for tests: delays in [0, 0.05], [0, 0.1] ... up to 0.5 s.
FAST = ReconnectPolicy(initial=0.05, maximum=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mint_jwt(sub: str, ttl: int = 600, key: str = JWT_KEY) -> str:
    """An HS256 JWT, with the standard library only."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": sub, "exp": int(time.time()) + ttl}).encode())
    signature = hmac.new(key.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


class Gateway:
    """One duplex-gateway process on its own ports and config file."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.config = workdir / "gateway.yaml"
        self.log = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, extra: str = "", limits: str = "") -> None:
        self.config.write_text(
            f"""listen:
  - address: 127.0.0.1:{self.port}
metrics:
  address: 127.0.0.1:{self.metrics_port}
tokens:
  - name: main
    token: {TOKEN}
    endpoints: ["/*"]
limits:
  backend_grace: 2s
{limits}
{extra}
"""
        )

    def start(self, timeout: float = 10.0) -> None:
        if not GATEWAY_BIN.is_file():
            pytest.fail(
                f"the gateway binary is missing: {GATEWAY_BIN} "
                "(build it with `cargo build`, or set DUPLEX_GATEWAY_BIN)"
            )
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(GATEWAY_BIN), "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the gateway exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        pytest.fail(f"the gateway did not listen within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (0 when absent)."""
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, and waits until the gateway counted a successful reload."""
        name = 'duplex_gateway_config_reloads_total{result="success"}'
        before = self._reloads(name)
        self.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._reloads(name) > before:
                return
            time.sleep(0.02)
        pytest.fail(f"the reload did not succeed:\n{self.log_text()}")

    def _reloads(self, sample: str) -> float:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Makes a gateway (not started), with extra config; stops them all at the end."""
    made: list[Gateway] = []

    def make(extra: str = "", limits: str = "", start: bool = True) -> Gateway:
        workdir = tmp_path / f"gw{len(made)}"
        workdir.mkdir()
        gateway = Gateway(workdir)
        gateway.write_config(extra, limits)
        made.append(gateway)
        if start:
            gateway.start()
        return gateway

    yield make
    for gateway in made:
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    """A gateway on the default test config."""
    return gateway_factory()


def add_example_handlers(backend: Backend) -> Backend:
    """echo, count, add and whoami, as examples/backend.py has them."""

    @backend.handle("echo")
    async def echo(call: Any) -> Any:
        return call.payload

    @backend.handle("count")
    async def count(call: Any) -> Any:
        for i in range(1, call.payload):
            await call.send(i)
        return call.payload

    @backend.handle("add")
    async def add(call: Any) -> Any:
        total = 0
        async for item in call.input:
            total += sum(item) if isinstance(item, list) else (item or 0)
        return total

    @backend.handle("whoami")
    def whoami(call: Any) -> Any:  # a plain function works too
        return call.auth

    return backend


@pytest.fixture
async def peers() -> AsyncIterator[list[Any]]:
    """Backends and clients made by a test, closed at its end."""
    made: list[Any] = []
    yield made
    for peer in made:
        await peer.close()


@pytest.fixture
def make_backend(peers: list[Any]) -> Callable[..., Backend]:
    def make(gateway: Gateway | str, path: str = "/demo", **kwargs: Any) -> Backend:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("reconnect", FAST)
        base = gateway.ws if isinstance(gateway, Gateway) else gateway
        backend = Backend(base, path, **kwargs)
        peers.append(backend)
        return backend

    return make


@pytest.fixture
def make_client(peers: list[Any]) -> Callable[..., Any]:
    async def make(gateway: Gateway | str, path: str = "/demo", **kwargs: Any) -> Client:
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("reconnect", FAST)
        base = gateway.ws if isinstance(gateway, Gateway) else gateway
        client = await connect(base + path, **kwargs)
        peers.append(client)
        return client

    return make


@pytest.fixture
async def demo(gateway: Gateway, make_backend: Callable[..., Backend]) -> Backend:
    """The example backend published at /demo."""
    backend = add_example_handlers(make_backend(gateway))
    await asyncio.wait_for(backend.start(), 10)
    return backend


class Proxy:
    """A TCP proxy on a loopback port that can cut every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    def cut(self) -> None:
        """Drops every connection through the proxy at once (a reset, no close frame)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[[int], Any]]:
    made: list[Proxy] = []

    async def make(target_port: int) -> Proxy:
        proxy = await Proxy(target_port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Waits until ``predicate()`` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
