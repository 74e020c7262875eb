"""The sending pace: global and per-domain rates that slow down when the server pushes back."""

from __future__ import annotations

import collections
import time

from aiolimiter import AsyncLimiter

# Slowing down halves the pace, but never below this (messages per second).
_FLOOR_RATE = 0.2
# After this many successes in a row, the pace recovers by a tenth (AIMD,
# as TCP does: halve on trouble, grow slowly while all is well).
_RECOVER_AFTER = 20
_RECOVER_FACTOR = 1.1
_WINDOW = 50


def _spaced(rate: float) -> AsyncLimiter:
    # One message per 1/rate seconds: spaced evenly, never a burst of `rate` at
    # once, which is what a provider's "N per second" limit usually counts.
    return AsyncLimiter(1, 1.0 / rate)


class RateLimiter:
    """Waits before each message so that the configured rates hold across the whole run.

    `rate` is messages per second for the whole run (0: unlimited); `domain_limits`
    maps a recipient domain (and its subdomains) to its own rate. A burst of
    transient replies (421, 451) halves the pace through `slow_down()`; it
    recovers while messages go through.
    """

    def __init__(self, rate: float, domain_limits: dict[str, float]) -> None:
        self.configured_rate = rate
        self._rate = rate
        self._global = _spaced(rate) if rate > 0 else None
        self._domains = {domain: _spaced(limit) for domain, limit in domain_limits.items()}
        self._recent: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._successes = 0

    @property
    def current_rate(self) -> float:
        """The pace in force now (0: unlimited)."""
        return self._rate

    async def acquire(self, domain: str) -> None:
        if self._global is not None:
            await self._global.acquire()
        limiter = self._domain_limiter(domain)
        if limiter is not None:
            await limiter.acquire()
        self._recent.append(time.monotonic())

    def slow_down(self) -> None:
        """The server said "not now" (4xx or a drop): halve the pace."""
        self._successes = 0
        base = self._rate if self._rate > 0 else self._observed_rate()
        if base <= 0:
            return
        self._set_rate(max(base / 2, _FLOOR_RATE))

    def succeeded(self) -> None:
        """A message went through: after a run of these, recover some of the pace."""
        if self._rate <= 0 or self._rate == self.configured_rate:
            return
        self._successes += 1
        if self._successes < _RECOVER_AFTER:
            return
        self._successes = 0
        faster = self._rate * _RECOVER_FACTOR
        if self.configured_rate > 0:
            faster = min(faster, self.configured_rate)
        elif faster > 2 * self._observed_rate():
            # Unlimited by config, and no longer the bottleneck: lift the limit.
            self._rate, self._global = 0, None
            return
        self._set_rate(faster)

    def _set_rate(self, rate: float) -> None:
        self._rate = rate
        self._global = _spaced(rate)

    def _observed_rate(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1] - self._recent[0]
        return (len(self._recent) - 1) / span if span > 0 else float(len(self._recent))

    def _domain_limiter(self, domain: str) -> AsyncLimiter | None:
        if not self._domains:
            return None
        name = domain.lower()
        while True:
            limiter = self._domains.get(name)
            if limiter is not None or "." not in name:
                return limiter
            name = name.partition(".")[2]
