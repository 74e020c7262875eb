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
# "A burst": this many transient replies within this many seconds.
_BURST = 3
_BURST_WINDOW = 5.0


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
        self._pushback: collections.deque[float] = collections.deque()
        self._last_slow_down = -_BURST_WINDOW
        self._successes = 0

    @property
    def current_rate(self) -> float:
        """The pace in force now (0: unlimited)."""
        return self._rate

    def limited_domains(self) -> list[str]:
        """The domains with a rate of their own."""
        return list(self._domains)

    def limited_domain(self, domain: str) -> str | None:
        """The configured domain whose limit covers `domain` (itself or a parent), if any."""
        name = domain.lower()
        while name not in self._domains:
            if "." not in name:
                return None
            name = name.partition(".")[2]
        return name

    async def acquire(self, domain: str | None = None) -> None:
        """Wait for the global pace, and for `domain`'s own pace when it has one."""
        if self._global is not None:
            await self._global.acquire()
        if domain is not None:
            await self.acquire_domain(domain)
        self._recent.append(time.monotonic())

    def take_unpaced(self) -> bool:
        """Count a message that goes now, without waiting, if no global rate is in force.

        False (and nothing counted) while a rate holds: the message must wait
        for its turn (`acquire`). For a message the transport would send in the
        same write as the one before it.
        """
        if self._global is not None:
            return False
        self._recent.append(time.monotonic())
        return True

    async def acquire_domain(self, domain: str) -> None:
        """Wait for the pace of the limit covering `domain` (no wait without one)."""
        key = self.limited_domain(domain)
        if key is not None:
            await self._domains[key].acquire()

    def slow_down(self) -> None:
        """The server said "not now" (4xx or a drop): in a burst of these, halve the pace.

        One 451 is usually about one recipient (greylisting, a full mailbox); only
        several within a few seconds say the server wants us slower, and the pace is
        halved at most once per such window.
        """
        now = time.monotonic()
        self._pushback.append(now)
        while self._pushback and now - self._pushback[0] > _BURST_WINDOW:
            self._pushback.popleft()
        if len(self._pushback) < _BURST or now - self._last_slow_down < _BURST_WINDOW / 2:
            return
        self._last_slow_down = now
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
