#!/usr/bin/env python3
"""A TCP proxy that delays every byte by a fixed time each way: a network round trip on loopback.

    python bench/delay_proxy.py LISTEN_PORT TARGET_PORT ONE_WAY_MS

Listens on 127.0.0.1:LISTEN_PORT and forwards each connection to
127.0.0.1:TARGET_PORT, holding what comes from either side ONE_WAY_MS before
passing it on, in order: the round trip grows by twice that. send_bench.py
--rtt puts it in front of smtp-sink, so that a send is timed as it would go
to a server across a network, where round trips, not CPU, set the pace.

Written by hand: Linux's netem (`tc qdisc ... netem delay`) does this in the
kernel, but needs a kernel module and root, which a container or CI machine
may not have; a few lines of asyncio need neither. Prints "ready" on stdout
once it accepts connections; runs until killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys

HOST = "127.0.0.1"


class _Side(asyncio.Protocol):
    """One end of a proxied connection: what it receives goes to the other end, late."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        # (when, data): a queue, not a timer per chunk, so that chunks leave in the
        # order they came even when two get the same deadline.
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport here

    def data_received(self, data: bytes) -> None:
        self._later(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._later(None)  # None: close the other end, after what came before

    def _later(self, data: bytes | None) -> None:
        self._queue.append((self._loop.time() + self.delay, data))
        if len(self._queue) == 1:
            self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            other = self.other.transport if self.other is not None else None
            if other is None or other.is_closing():
                continue
            if data is None:
                other.close()
            else:
                other.write(data)
        if self._queue:
            self._loop.call_at(self._queue[0][0], self._flush)


class _Client(_Side):
    """The side a client connects to; it opens the other side, to the target."""

    def __init__(self, delay: float, target: int) -> None:
        super().__init__(delay)
        self._target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]  # until the target is there
        self._loop.create_task(self._link())

    async def _link(self) -> None:
        assert self.transport is not None
        try:
            _, server = await self._loop.create_connection(
                lambda: _Side(self.delay), HOST, self._target
            )
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while this connected
            assert server.transport is not None
            server.transport.close()
            return
        server.other, self.other = self, server
        self.transport.resume_reading()


async def serve(listen: int, target: int, one_way_ms: float) -> None:
    loop = asyncio.get_running_loop()
    delay = one_way_ms / 1000
    server = await loop.create_server(lambda: _Client(delay, target), HOST, listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen, target, one_way_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415  # optional: the proxy's own CPU, lower

        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(listen, target, one_way_ms))


if __name__ == "__main__":
    main()
