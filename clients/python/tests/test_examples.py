"""The example scripts (used by the cross-language matrix), run as processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import SECRET, TOKEN, Gateway

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_client(gateway: Gateway, path: str, secret: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "client.py"),
            "--url",
            gateway.ws,
            "--path",
            path,
            "--secret",
            secret,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_example_backend_and_client(gateway: Gateway, tmp_path: Path) -> None:
    stderr = open(tmp_path / "backend.err", "w")
    backend = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "backend.py"),
            "--url",
            gateway.ws,
            "--path",
            "/p",
            "--token",
            TOKEN,
            "--secret",
            SECRET,
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert backend.stdout is not None
        assert backend.stdout.readline().strip() == "ready"  # bounded by the test timeout

        done = run_client(gateway, "/p", SECRET)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line) for line in done.stdout.splitlines()] == [
            {"echo": {"hello": "python"}},
            {"count": [1, 2, 3]},
            {"add": 6},
        ]

        # whoami answers null without signed tokens (checked through HTTP).
        import urllib.request

        request = urllib.request.Request(
            f"{gateway.http}/p/whoami",
            data=b"{}",
            headers={"X-Duplex-Secret": SECRET},
            method="POST",
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            request, timeout=5
        ) as r:
            assert json.loads(r.read()) is None

        failed = run_client(gateway, "/p", "wrong-secret")
        assert failed.returncode != 0
        assert "401" in failed.stderr

        # SIGTERM drains the backend, which then exits 0.
        started = time.monotonic()
        backend.terminate()
        assert backend.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait(5)
        assert backend.stdout is not None
        backend.stdout.close()
        stderr.close()


def test_example_client_fails_without_backend(gateway: Gateway) -> None:
    done = run_client(gateway, "/nobody", SECRET)
    assert done.returncode != 0
    assert "404" in done.stderr


def test_example_client_fails_without_gateway(tmp_path: Any) -> None:
    from conftest import free_port

    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "client.py"),
            "--url",
            f"ws://127.0.0.1:{port}",
            "--path",
            "/p",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
