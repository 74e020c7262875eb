"""A recording SMTP server for tests: real aiosmtpd on port 0, with faults injected per recipient.

It runs on its own thread and event loop, so both synchronous tests (the CLI,
subprocesses) and asynchronous ones can talk to it. Faults are queued per
recipient address and stage: each queued fault is used once, in order, so
"451 then accept" is `server.fail("a@example.org", "rcpt", "451 4.7.1 Try later")`.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# Fault names beside SMTP replies ("451 ...", "550 ..."):
DROP = "drop"  # close the connection instead of replying
DROP_AFTER_DATA = "drop-after-data"  # at "data": accept and record, then close without a reply
STALL = "stall"  # never reply (until the server stops)


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any
    tls: bool
    login: str | None


@dataclass
class _Faults:
    queues: dict[tuple[str, str], collections.deque[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )
    every: dict[str, str] = field(default_factory=dict)


class _Handler:
    def __init__(self, server: RecordingServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        fault = self.server.next_fault(address, "rcpt")
        if fault is not None:
            return await self._fault(smtp, fault)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        address = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
        fault = self.server.next_fault(address, "data")
        if fault is not None and fault != DROP_AFTER_DATA:
            return await self._fault(smtp, fault)
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=session.peer,
            tls=smtp._tls_protocol is not None or session.ssl is not None,
            login=session.auth_data.decode() if isinstance(session.auth_data, bytes) else None,
        )
        with self.server.lock:
            self.server.messages.append(received)
        if fault == DROP_AFTER_DATA:
            # The message is in; the reply never leaves (RFC 1047's lost "250").
            return await self._fault(smtp, DROP)
        return "250 2.0.0 OK queued"

    async def _fault(self, smtp: SMTP, fault: str) -> str:
        if fault == DROP:
            if smtp.transport is not None:
                smtp.transport.close()
            return "421 dropped"  # never reaches the client: the socket is closed
        if fault == STALL:
            await self.server.stopped.wait()
            return "421 stopping"
        if fault.startswith("421") and smtp.transport is not None:
            # RFC 5321 3.8: a 421 reply is followed by closing the connection.
            asyncio.get_running_loop().call_later(0.05, smtp.transport.close)
        return fault


class RecordingServer:
    """An SMTP server on 127.0.0.1:<free port> that records every accepted message."""

    def __init__(
        self,
        *,
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()
        self._faults = _Faults()
        self._starttls_context = starttls_context
        self._implicit_tls_context = implicit_tls_context
        self._require_starttls = require_starttls
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.stopped: asyncio.Event

    # -- faults ---------------------------------------------------------------

    def fail(self, address: str, stage: str, *faults: str) -> None:
        """Queue faults for `address` at `stage` ("rcpt" or "data"), used once each, in order."""
        with self.lock:
            self._faults.queues[(address.lower(), stage)].extend(faults)

    def fail_always(self, address: str, stage: str, fault: str) -> None:
        with self.lock:
            self._faults.every[f"{address.lower()}/{stage}"] = fault

    def next_fault(self, address: str, stage: str) -> str | None:
        with self.lock:
            queue = self._faults.queues.get((address.lower(), stage))
            if queue:
                return queue.popleft()
            return self._faults.every.get(f"{address.lower()}/{stage}")

    # -- records --------------------------------------------------------------

    def recipients(self) -> list[str]:
        with self.lock:
            return [rcpt for message in self.messages for rcpt in message.rcpt_tos]

    def count_by_recipient(self) -> collections.Counter[str]:
        return collections.Counter(self.recipients())

    # -- life -------------------------------------------------------------------

    def start(self) -> RecordingServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        self.stopped = asyncio.Event()

        def factory() -> SMTP:
            with self.lock:
                self.connections += 1
            return SMTP(
                _Handler(self),
                hostname="test.smtp.invalid",
                tls_context=self._starttls_context,
                require_starttls=self._require_starttls,
                authenticator=self._authenticate if self._credentials else None,
                auth_require_tls=True,
                auth_required=self._credentials is not None,
            )

        self._server = await self._loop.create_server(
            factory, self.host, 0, ssl=self._implicit_tls_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self.stopped.set()
        if self._server is not None:
            self._server.close()
            await asyncio.sleep(0.05)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self._credentials is not None:
            user, password = self._credentials
            ok = auth_data.login.decode() == user and auth_data.password.decode() == password
            return AuthResult(success=ok, auth_data=auth_data.login if ok else None)
        return AuthResult(success=False, handled=False)
