"""Plain HTTP calls (``POST <endpoint>/<method>``), on the standard library only."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from http.client import HTTPResponse
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import DuplexError, parse_retry_after

__all__ = ["http_call", "http_stream", "http_notify"]

# No proxy from the environment: the gateway is called directly.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _url(base_url: str, endpoint: str, method: str, query: str = "") -> str:
    if "://" not in base_url:
        base_url = "http://" + base_url
    parts = urlsplit(base_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    prefix = parts.path.rstrip("/")
    endpoint = "/" + endpoint.strip("/") if endpoint.strip("/") else ""
    path = f"{prefix}{endpoint}/{quote(method, safe='!$&()*+,;=:@~')}"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _request(
    url: str,
    payload: Any,
    secret: str | None,
    token: str | None,
    headers: Mapping[str, str] | None,
) -> urllib.request.Request:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    all_headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, application/x-ndjson",
    }
    if secret:
        all_headers["X-Duplex-Secret"] = secret
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    return urllib.request.Request(
        url, data=body.encode("utf-8"), headers=all_headers, method="POST"
    )


def _error(status: int, headers: Any, body: bytes) -> DuplexError:
    retry_after = parse_retry_after(headers.get("Retry-After")) if headers else None
    try:
        error = json.loads(body)["error"]
        return DuplexError.from_dict(error, status=status, retry_after=retry_after)
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return DuplexError(status, text or f"HTTP {status}", status=status, retry_after=retry_after)


def _open(request: urllib.request.Request, timeout: float | None) -> HTTPResponse:
    try:
        return _opener.open(request, timeout=timeout)  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        with e:
            raise _error(e.code, e.headers, e.read()) from None


def _is_stream(response: HTTPResponse) -> bool:
    return response.headers.get_content_type() == "application/x-ndjson"


def _line(response: HTTPResponse, line: bytes) -> Any:
    item = json.loads(line)
    if isinstance(item, dict) and set(item) == {"error"} and isinstance(item["error"], dict):
        raise DuplexError.from_dict(item["error"], status=response.status)
    return item


def _call_blocking(request: urllib.request.Request, timeout: float | None) -> Any:
    with _open(request, timeout) as response:
        if _is_stream(response):
            last = None
            for line in response:
                if line.strip():
                    last = _line(response, line)
            return last
        body = response.read()
        return json.loads(body) if body.strip() else None


async def http_call(
    base_url: str,
    endpoint: str,
    method: str,
    payload: Any = None,
    *,
    secret: str | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = 60.0,
) -> Any:
    """Calls ``method`` of ``endpoint`` with ``POST {base_url}{endpoint}/{method}`` and
    returns the reply's payload; for a reply stream (``application/x-ndjson``), the last one
    (use :func:`http_stream` for each).

    ``secret`` goes in ``X-Duplex-Secret``, ``token`` (a signed client token) in
    ``Authorization: Bearer``. Errors raise :class:`DuplexError` with ``status`` (the HTTP
    status), ``code`` (the backend's error code, or the status for the gateway's own
    refusals) and ``retry_after`` (``Retry-After`` of a 429 or 503). ``timeout`` is the socket
    timeout, in seconds."""
    request = _request(_url(base_url, endpoint, method), payload, secret, token, headers)
    return await asyncio.to_thread(_call_blocking, request, timeout)


async def http_stream(
    base_url: str,
    endpoint: str,
    method: str,
    payload: Any = None,
    *,
    secret: str | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = 60.0,
) -> AsyncIterator[Any]:
    """Like :func:`http_call`, yielding each payload of a reply stream as its line arrives
    (a single reply yields once). An error line ends the stream with :class:`DuplexError`."""
    request = _request(_url(base_url, endpoint, method), payload, secret, token, headers)
    response = await asyncio.to_thread(_open, request, timeout)
    try:
        if not _is_stream(response):
            body = await asyncio.to_thread(response.read)
            yield json.loads(body) if body.strip() else None
            return
        while True:
            line = await asyncio.to_thread(response.readline)
            if not line:
                return
            if line.strip():
                yield _line(response, line)
    finally:
        response.close()


async def http_notify(
    base_url: str,
    endpoint: str,
    method: str,
    payload: Any = None,
    *,
    secret: str | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = 60.0,
) -> None:
    """Fire-and-forget (``?async=true``): the gateway answers 202 once the request is on its
    way to the backend; no reply comes back."""
    request = _request(
        _url(base_url, endpoint, method, "async=true"), payload, secret, token, headers
    )
    await asyncio.to_thread(_call_blocking, request, timeout)
