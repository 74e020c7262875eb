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
import time
from collections.abc import Callable
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
    # Which session (1, 2, ... in the order they were opened) carried it, and when.
    session: int = 0
    received_at: float = field(default_factory=time.monotonic)


@dataclass
class SessionRecord:
    """One SMTP session (connection) as the server saw it."""

    number: int
    tls: bool = False
    login: str | None = None
    messages: int = 0


@dataclass
class _Faults:
    queues: dict[tuple[str, str], collections.deque[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )
    every: dict[str, str] = field(default_factory=dict)


class _Handler:
    def __init__(self, server: RecordingServer, record: SessionRecord) -> None:
        self.server = server
        self.record = record

    def _observe(self, smtp: SMTP, session: Session) -> tuple[bool, str | None]:
        # Implicit TLS sets neither _tls_protocol nor session.ssl: ask the transport.
        transport = smtp.transport
        tls = (
            smtp._tls_protocol is not None
            or session.ssl is not None
            or (transport is not None and transport.get_extra_info("ssl_object") is not None)
        )
        login = session.auth_data.decode() if isinstance(session.auth_data, bytes) else None
        with self.server.lock:
            self.record.tls = self.record.tls or tls
            self.record.login = login or self.record.login
        return tls, login

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # aiosmtpd reads commands one line at a time, so it takes pipelined ones
        # in order; it only does not say so. The last line ends the reply ("250 ...").
        # With this hook, aiosmtpd leaves remembering the EHLO name to it.
        session.host_name = hostname
        if self.server.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # Faults at "mail" are keyed by the sender: MAIL FROM names no recipient yet.
        fault = self.server.next_fault(address, "mail")
        if fault is not None:
            return await self._fault(smtp, fault)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._observe(smtp, session)
        with self.server.lock:
            self.server.rcpt_attempts[address.lower()] += 1
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
        tls, login = self._observe(smtp, session)
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=session.peer,
            tls=tls,
            login=login,
            session=self.record.number,
        )
        if self.server.on_data is not None:
            self.server.on_data(received)
        with self.server.lock:
            self.server.messages.append(received)
            self.record.messages += 1
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
        pipelining: bool = True,
    ) -> None:
        self.host = "127.0.0.1"
        # Advertise PIPELINING (RFC 2920) in the EHLO reply.
        self.pipelining = pipelining
        self.port = 0
        self.messages: list[Received] = []
        self.connections = 0
        self.sessions: list[SessionRecord] = []
        # Called on the server's thread for each message, after its final dot and
        # before the reply: a test can look at the world at that moment.
        self.on_data: Callable[[Received], None] | None = None
        # RCPT commands seen per (lower-cased) address, accepted or not.
        self.rcpt_attempts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self._faults = _Faults()
        self._starttls_context = starttls_context
        self._implicit_tls_context = implicit_tls_context
        self._require_starttls = require_starttls
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._live: list[SMTP] = []
        self.stopped: asyncio.Event

    # -- faults ---------------------------------------------------------------

    def fail(self, address: str, stage: str, *faults: str) -> None:
        """Queue faults for `address` at `stage`, used once each, in order.

        `stage` is "rcpt" or "data" (keyed by recipient), or "mail" (keyed by the
        sender: MAIL FROM names no recipient yet).
        """
        with self.lock:
            self._faults.queues[(address.lower(), stage)].extend(faults)

    def fail_always(self, address: str, stage: str, fault: str) -> None:
        with self.lock:
            self._faults.every[f"{address.lower()}/{stage}"] = fault

    def clear_faults(self, address: str | None = None) -> None:
        """Forget queued and permanent faults (for `address`, or for everyone)."""
        with self.lock:
            if address is None:
                self._faults.queues.clear()
                self._faults.every.clear()
                return
            key = address.lower()
            for stage in ("mail", "rcpt", "data"):
                self._faults.queues.pop((key, stage), None)
                self._faults.every.pop(f"{key}/{stage}", None)

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

    def received_for(self, address: str) -> list[Received]:
        """The messages accepted for `address` (case-insensitive), in arrival order."""
        key = address.lower()
        with self.lock:
            return [m for m in self.messages if key in (r.lower() for r in m.rcpt_tos)]

    def close_sessions(self) -> int:
        """Close every open session from the server's side (an idle timeout); returns how many."""

        async def close() -> int:
            closed = 0
            for smtp in self._live:
                if smtp.transport is not None and not smtp.transport.is_closing():
                    smtp.transport.close()
                    closed += 1
            await asyncio.sleep(0.05)
            return closed

        return asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)

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
                record = SessionRecord(number=self.connections)
                self.sessions.append(record)
            smtp = SMTP(
                _Handler(self, record),
                hostname="test.smtp.invalid",
                tls_context=self._starttls_context,
                require_starttls=self._require_starttls,
                authenticator=self._authenticate if self._credentials else None,
                auth_require_tls=True,
                auth_required=self._credentials is not None,
            )
            self._live.append(smtp)
            return smtp

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
            if ok:
                return AuthResult(success=True, auth_data=auth_data.login)
            # handled=False: aiosmtpd then replies "535 5.7.8" itself; with the
            # default (True) it would send no reply at all and the client would hang.
            return AuthResult(success=False, handled=False)
        return AuthResult(success=False, handled=False)
