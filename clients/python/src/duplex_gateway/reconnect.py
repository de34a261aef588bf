"""Reconnection: exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ReconnectPolicy"]


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a lost connection is opened again.

    Attempt ``n`` (0 for the first try after a drop) waits
    ``random.uniform(0, min(maximum, initial * 2**n))`` seconds: exponential backoff with *full*
    jitter, so peers that lost the gateway together do not come back together. When the last
    refusal carried ``Retry-After`` (HTTP 429 or 503), that many seconds are added on top, so the
    wait is never shorter than the gateway asked for.

    - ``initial``: the cap of the first delay (seconds), default 0.5.
    - ``maximum``: the largest cap (seconds), default 30.
    - ``max_attempts``: give up after this many failed attempts in a row (``None``: never).
    - ``retry_not_found``: whether a 404 refusal *while reconnecting* is tried again (default
      ``True``: after a gateway restart a client may come back before its backend has published
      again). The first connection never retries a 404, and 401/403 are never retried.
    - ``stable_after``: a connection that lived at least this long resets the backoff; one that
      dropped sooner continues it, so a connection that flaps does not reconnect in a tight loop.
    """

    initial: float = 0.5
    maximum: float = 30.0
    max_attempts: int | None = None
    retry_not_found: bool = True
    stable_after: float = 10.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError("initial must be > 0")
        if self.maximum < self.initial:
            raise ValueError("maximum must be >= initial")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")

    def cap(self, attempt: int) -> float:
        """The largest delay of attempt ``attempt`` (from 0): ``min(maximum, initial * 2**n)``."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        return min(self.maximum, self.initial * (2.0 ** min(attempt, 64)))

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        rng: random.Random | None = None,
    ) -> float:
        """The seconds to wait before attempt ``attempt``: a uniform draw in ``[0, cap(attempt)]``,
        plus ``retry_after`` when the gateway sent one."""
        jitter = (rng or random).uniform(0.0, self.cap(attempt))
        if retry_after is not None and retry_after > 0:
            return retry_after + jitter
        return jitter
