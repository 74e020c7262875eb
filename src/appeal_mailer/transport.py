"""Deliver finished messages: SMTP through a pool of reused sessions, or a dry run into files.

The only module that imports aiosmtplib; its errors become ours here, once.
A transport never re-sends a message whose final "." reached the server
without a reply: that message's fate is unknown (RFC 1047), and it is
reported as such instead of risking a second copy. With PIPELINING (RFC 2920)
a session carries two messages at once: the next one's envelope goes in the
same write as the data of the one before (SMTPTransport._end_data).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import errno
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

import aiosmtplib
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from appeal_mailer.config import SendingSettings, SmtpSettings
from appeal_mailer.errors import (
    DeliveryError,
    PermanentDeliveryError,
    PreviewError,
    ServerError,
    TransientDeliveryError,
)
from appeal_mailer.models import DeliveryResult, Envelope, State
from appeal_mailer.ratelimit import RateLimiter

# RFC 5321 4.5.2: a line of the message starting with "." gets one more ".".
_LEADING_DOT = re.compile(rb"(?m)^\.")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9@._+-]")
# A reply line: a code (RFC 5321 4.2.1: 2-5, then 0-5, then a digit), then " ", "-" or its end.
_REPLY_LINE = re.compile(rb"[2-5][0-5][0-9](?:[ -]|\r?\n)")


class Transport(Protocol):
    """Delivers one message at a time; several `send` calls may run at once."""

    description: str
    # How many sessions (or, for files, slots) it uses at most.
    connections: int
    # How many messages it can have in flight at once; known once open() returned.
    in_flight: int

    async def open(self) -> None:
        """Get ready to send; raise ServerError if sending is impossible (nothing sent yet)."""

    async def send(self, envelope: Envelope, *, attempts_allowed: int) -> DeliveryResult:
        """Deliver, retrying transient failures; the result: sent, failed, deferred or unknown."""

    async def close(self) -> None:
        """Release connections and files."""


class SMTPTransport:
    """SMTP submission through a pool of at most `connections` reused sessions."""

    def __init__(self, smtp: SmtpSettings, sending: SendingSettings, limiter: RateLimiter) -> None:
        self._smtp = smtp
        self._backoff = sending.retry_backoff
        self._max_delay = sending.retry_max_delay
        self._limiter = limiter
        self.connections = smtp.connections
        # Twice the sessions once open() has seen PIPELINING, and no rate (_end_data).
        self.in_flight = smtp.connections
        self._idle: list[_Session] = []
        self._all: set[_Session] = set()
        # Sessions being opened, and sends waiting for a session: there are never
        # more than `connections` at once ([smtp] connections, the provider's limit).
        self._opening = 0
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._closed = False
        # Off for the rest of the run if the server drops what follows a final dot.
        self._chaining = True
        mode = {"starttls": "STARTTLS", "tls": "TLS", "none": "no TLS"}[smtp.security]
        auth = f", AUTH as {smtp.username}" if smtp.username else ""
        self.description = f"{smtp.host}:{smtp.port} ({mode}{auth})"

    async def open(self) -> None:
        """Open the first session now: a wrong password or a missing STARTTLS stops here."""
        self._closed = False
        session = await self._connect()
        self._idle.append(session)
        if session.pipelining and self._limiter.configured_rate == 0:
            # Each session carries a message waiting for its final reply and the
            # next one's envelope (_end_data): two messages in flight per session.
            # Not under a rate: a paced message is never chained (_chainable), and
            # rows claimed for sends that could not go would only wait.
            self.in_flight = 2 * self.connections

    async def close(self) -> None:
        self._closed = True
        # Sends still waiting for a session (only if close() is called mid-send)
        # look again, and find the transport closed.
        while self._waiting:
            self._wake()
        idle = set(self._idle)
        for session in self._all - idle:
            # In the middle of a message (only if close() is called mid-send): cut,
            # which ends that send's wait at once (unknown after its final dot).
            session.close()
        # QUIT on every idle session at once: one slow server costs 5 s, not 5 s each.
        await asyncio.gather(*(session.quit() for session in idle))
        self._all.clear()
        self._idle.clear()

    async def handshake(self) -> list[str]:
        """Connect, EHLO, STARTTLS and AUTH as configured, then QUIT; returns what happened."""
        session = await self._connect()
        try:
            tls = session.tls
            steps = [
                f"connected to {self._smtp.host}:{self._smtp.port}",
                "TLS: "
                + (
                    "yes, certificate verified"
                    if tls and self._smtp.verify_tls
                    else "yes, certificate NOT verified"
                    if tls
                    else "no"
                ),
                "extensions: " + ", ".join(session.extensions),
            ]
            if self._smtp.username:
                steps.append(f"AUTH accepted for {self._smtp.username}")
            return steps
        finally:
            await self._quit(session)

    async def send(self, envelope: Envelope, *, attempts_allowed: int) -> DeliveryResult:
        # Most messages go at their first attempt, and that one is made without
        # tenacity: its retry loop, built for every message, was about 9 % of a
        # send's CPU (py-spy, bench/README.md). A transient failure hands over to
        # that same loop, whose first attempt this one then was.
        try:
            # The first attempt's domain pace was kept by whoever scheduled the
            # message (the campaign): only the global pace applies here.
            reply = await self._attempt(envelope)
        except TransientDeliveryError as exc:
            return await self._retry(envelope, attempts_allowed, exc)
        except DeliveryError as exc:
            return _result(envelope, 1, exc)
        self._limiter.succeeded()
        return _sent(envelope, 1, reply)

    async def _retry(
        self, envelope: Envelope, attempts_allowed: int, first: TransientDeliveryError
    ) -> DeliveryResult:
        """Attempts 2 and on, after the first failed with `first`: backoff, jitter, limits."""
        attempts = 0
        domain = envelope.recipient.rpartition("@")[2]

        def slow_down(state: RetryCallState) -> None:
            # One push-back per message: a greylisted recipient retried three times
            # is one recipient's trouble, not a burst from the server.
            if state.attempt_number == 1:
                self._limiter.slow_down()

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(attempts_allowed, 1)),
            wait=wait_exponential_jitter(
                multiplier=self._backoff, max=self._max_delay, jitter=self._backoff
            ),
            retry=retry_if_exception_type(TransientDeliveryError),
            before_sleep=slow_down,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts == 1:
                        raise first  # made already, by send()
                    # A retry is one more message to that domain: paced as such,
                    # before it looks for a session (holding one while its domain's
                    # turn comes would keep it from every other message).
                    await self._limiter.acquire_domain(domain)
                    reply = await self._attempt(envelope)
        except DeliveryError as exc:
            if isinstance(exc, TransientDeliveryError) and attempts == 1:
                self._limiter.slow_down()  # not counted yet: no retry was slept before
            return _result(envelope, attempts, exc)
        self._limiter.succeeded()
        return _sent(envelope, attempts, reply)

    async def _attempt(self, envelope: Envelope) -> aiosmtplib.SMTPResponse:
        """One attempt, at the global pace (a domain's own is kept by the caller)."""
        # Our addresses are validated ASCII already (lists.normalize_address).
        mail = b"MAIL FROM:<" + envelope.sender.encode("ascii") + b">\r\n"
        rcpt = b"RCPT TO:<" + envelope.recipient.encode("ascii") + b">\r\n"
        commands = mail + rcpt + b"DATA\r\n"
        while True:
            try:
                session, answers = await self._session(commands)
            except ServerError as exc:
                if not exc.transient:
                    raise
                raise TransientDeliveryError(
                    exc.message, recipient=envelope.recipient, code=exc.code, reply=exc.reply
                ) from exc
            if answers is None:
                # Paced only now that it has a session: a message that took its turn
                # and then waited for a session would go out with those that took
                # theirs later, in a burst (chained messages: _end_data).
                try:
                    await self._limiter.acquire()
                except BaseException:
                    self._done_with(session, handed_on=False)
                    raise
                if not session.ready:  # closed while the pace held it back: no attempt
                    self._drop(session)
                    continue
            replies: list[aiosmtplib.SMTPResponse] = []
            after_dot = handed_on = False
            try:
                if answers is None:
                    replies = await _envelope(session, mail, rcpt)
                # Else written already, behind the data of the message before (_end_data).
                elif not (replies := await session.take(answers)):
                    # The session ended with the message before this one (its final
                    # reply was a 421, or never came): nothing of this message was
                    # answered and its data was never sent, so this was no attempt.
                    if session.timed_out is answers:
                        # The message before was answered, then silence for the group
                        # that followed its final dot: a server that drops what
                        # follows the dot (against RFC 2920 3.1). No more chaining
                        # this run. (A slow reply to the message before is no sign.)
                        self._chaining = False
                    self._drop(session)
                    continue
                await _check_envelope(session, envelope, replies)
                # RFC 5321 4.1.1.4: the data ends with CRLF.CRLF. From the moment the
                # final "." is written, a lost reply leaves delivery unknown (RFC 1047).
                own, handed_on = self._end_data(session, _stuffed(envelope.data) + b".\r\n")
                after_dot = True
                got = await session.take(own)
                if not got:
                    raise session.trouble()
                reply = got[0]
                # RFC 5321 4.2.1: 2yz is done, 4yz and 5yz refuse; anything else after
                # the final dot says nothing about the message: unknown, below.
                if not 200 <= reply.code < 300:
                    if reply.code < 400:
                        raise aiosmtplib.SMTPException(
                            f"unexpected reply: {reply.code} {reply.message}"
                        )
                    raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            except asyncio.CancelledError:
                # Its replies, if any are still to come, are dropped (take); the
                # session goes once no earlier message still waits on it.
                self._leave(session)
                raise
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:
                    # RFC 5321 3.8: 421 means the server is closing this session.
                    self._drop(session)
                elif after_dot:
                    # Refused after the final dot: the transaction is over either way
                    # (RFC 5321 4.1.1.4 clears its buffers), so no RSET, which would
                    # land inside the next message's transaction on a chained session.
                    self._done_with(session, handed_on)
                else:
                    await self._reset(session)
                if isinstance(exc, aiosmtplib.SMTPSenderRefused) and exc.code >= 500:
                    # A 5xx to MAIL FROM refuses the sender (policy, quota, AUTH required),
                    # not this recipient: failing each recipient in turn would fail the list.
                    raise _sender_refused(self._smtp, envelope.sender, exc) from exc
                raise _delivery_error(envelope, exc.code, exc.message) from exc
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                self._drop(session)
                detail = str(exc) or type(exc).__name__
                if after_dot:
                    raise DeliveryError(
                        f"connection lost after the message was sent, before the server "
                        f"confirmed it ({detail}): it may or may not have been delivered",
                        recipient=envelope.recipient,
                        reply=detail,
                        after_data=True,
                    ) from exc
                lost = isinstance(exc, (TimeoutError, OSError, aiosmtplib.SMTPServerDisconnected))
                raise TransientDeliveryError(
                    f"{'connection lost' if lost else 'session dropped'}: {detail}",
                    recipient=envelope.recipient,
                    reply=detail,
                ) from exc
            self._done_with(session, handed_on)
            return reply

    async def _session(self, commands: bytes) -> tuple[_Session, _Replies | None]:
        """A session for a message whose MAIL, RCPT and DATA are `commands`.

        An idle pooled session that is still connected, else a new one while
        there are fewer than `connections`; else wait for one to come free, or
        for a message to end its data on one with PIPELINING, which then sends
        `commands` behind it (_end_data) if no rate is in force. Then the wait
        for their replies comes too: the session is chained.
        """
        while True:
            if self._closed:
                raise self._ended()
            while self._idle:
                session = self._idle.pop()
                if session.ready:
                    return session, None
                # Closed by the server while idle (its timeout, RFC 5321 4.5.3.2.7), or
                # it said something unasked (a 421 before closing): not a delivery
                # failure, so it must not use up one of the message's attempts.
                self._drop(session)
            if len(self._all) + self._opening < self.connections:
                self._opening += 1
                try:
                    session = await self._connect()
                except BaseException:
                    self._wake()  # its place is free again, for a waiting send
                    raise
                finally:
                    self._opening -= 1
                if self._closed:  # close() came while it was being opened
                    self._drop(session)
                    raise self._ended()
                return session, None
            waiting = _Waiting(commands, asyncio.get_running_loop().create_future())
            self._waiting.append(waiting)
            try:
                handed = await waiting.future
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiting)
                if waiting.future.done() and not waiting.future.cancelled():
                    given = waiting.future.result()
                    if given is None:
                        self._wake()  # the wake meant for this send goes to the next
                    else:  # written for this send, which will not read their replies
                        given[0].abandon(given[1])
                        self._leave(given[0])
                raise
            if handed is not None:
                return handed

    def _end_data(self, session: _Session, data: bytes) -> tuple[_Replies, bool]:
        """Write a message's data and final dot; the wait for its reply, and if it was chained.

        RFC 2920 3.1 lets message content start a group: if a send is waiting
        for a session, its MAIL, RCPT and DATA go in the same write, without
        waiting for this message's reply, so a message costs one round trip
        instead of two. One write, not two: a second small segment could wait
        for the first one's ACK (Nagle's algorithm, on a server without
        TCP_NODELAY) and stall each message by a delayed ACK, 40 ms on Linux.
        """
        waiting = self._chainable() if session.pipelining and session.alive else None
        if waiting is None:
            session.write(data)
            return session.expect(1), False
        # (alive: write() cannot raise, so the send taken from the queue is not lost.)
        session.write(data + waiting.commands)
        own = session.expect(1)
        waiting.future.set_result((session, session.expect(3)))
        return own, True

    def _chainable(self) -> _Waiting | None:
        """The first waiting send, taken from the queue, if it may go now; else None.

        Only while no rate is in force (RateLimiter.take_unpaced): a chained
        message goes without waiting for its turn, which would break the pace.
        """
        if not self._chaining or not self._waiting or not self._limiter.take_unpaced():
            return None
        return self._next_waiting()

    def _done_with(self, session: _Session, handed_on: bool) -> None:
        """A message's final reply is in: the session is idle, unless the next message has it."""
        if handed_on:
            if not session.alive:
                # Ended by the next message's sender leaving (cancelled): gone.
                self._drop(session)
            return  # the next message gives it back
        self._idle.append(session)
        self._wake()

    def _leave(self, session: _Session) -> None:
        """A send that holds `session` is cancelled: a dead session leaves the pool.

        A live one stays with whoever still waits on it: the next message (if
        this one handed it on), or an earlier one still waiting for its final
        reply, whose sender drops it once it fails on the abandoned wait.
        """
        if not session.alive:
            self._drop(session)

    def _next_waiting(self) -> _Waiting | None:
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                return waiting
        return None

    def _wake(self) -> None:
        """A session came free (or a place for one): the first waiting send looks again."""
        waiting = self._next_waiting()
        if waiting is not None:
            waiting.future.set_result(None)

    def _ended(self) -> ServerError:
        return ServerError(
            "the run is ending: no new message goes out",
            host=self._smtp.host,
            port=self._smtp.port,
        )

    async def _connect(self) -> _Session:
        smtp = self._smtp
        client = aiosmtplib.SMTP(
            hostname=smtp.host,
            port=smtp.port,
            timeout=smtp.timeout,
            use_tls=smtp.security == "tls",
            # True, not None: STARTTLS is required, never silently skipped.
            start_tls=smtp.security == "starttls",
            validate_certs=smtp.verify_tls,
            tls_context=_tls_context(smtp) if smtp.security != "none" else None,
            local_hostname=smtp.local_hostname,
            username=smtp.username or None,
            password=smtp.password.get_secret_value() if smtp.password else None,
        )
        try:
            await client.connect()
            # Greeted now, not by the first MAIL (see _attempt, which sends its own).
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()  # RFC 5321 4.1.1.1: an old server may know only HELO
            session = _Session(client, smtp.timeout)
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise ServerError(
                f"AUTH refused for user {smtp.username!r}",
                host=smtp.host,
                port=smtp.port,
                code=exc.code,
                reply=exc.message,
                hint="check the username in [smtp] and APPEAL_MAILER_SMTP__PASSWORD",
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            client.close()
            raise _untrusted(smtp, exc) from exc
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise ServerError(
                "the server refused the session",
                host=smtp.host,
                port=smtp.port,
                code=exc.code,
                reply=exc.message,
                transient=400 <= exc.code < 500,
            ) from exc
        except aiosmtplib.SMTPException as exc:
            client.close()
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                # Implicit TLS: aiosmtplib wraps the failed check in SMTPConnectError.
                raise _untrusted(smtp, exc.__cause__) from exc
            text = str(exc)
            if "STARTTLS" in text.upper() or "starttls" in text:
                raise ServerError(
                    "the server does not offer STARTTLS, and security = 'starttls' "
                    "requires it: refusing to send in clear text",
                    host=smtp.host,
                    port=smtp.port,
                    hint="if the server speaks TLS from the start, use security = 'tls' "
                    "(port 465)",
                ) from exc
            transient = isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError))
            raise ServerError(
                f"cannot use the server: {text}",
                host=smtp.host,
                port=smtp.port,
                transient=transient,
                hint="check [smtp] host, port and security" if transient else None,
            ) from exc
        except OSError as exc:
            client.close()
            raise ServerError(
                f"cannot connect: {exc.strerror or exc}",
                host=smtp.host,
                port=smtp.port,
                transient=True,
                hint="check [smtp] host and port, and that the server is up",
            ) from exc
        self._all.add(session)
        return session

    async def _reset(self, session: _Session) -> None:
        # RFC 5321 4.1.1.5: RSET clears the failed transaction so the session can be reused.
        if session.ready:
            session.write(b"RSET\r\n")
            try:
                if (await session.reply()).code == 250:
                    self._done_with(session, handed_on=False)
                    return
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                pass  # dropped below
            except asyncio.CancelledError:
                # Called from a failed attempt's handler, past _attempt's own: the
                # session, ended by the abandoned reply (take), leaves the pool here.
                self._drop(session)
                raise
        self._drop(session)

    async def _quit(self, session: _Session) -> None:
        """QUIT `session` politely (out of the pool meanwhile), then close it."""
        self._all.discard(session)
        await session.quit()
        self._drop(session)

    def _drop(self, session: _Session) -> None:
        """Close `session` and leave the pool: a waiting send may open another."""
        session.close()
        if session in self._all:
            self._all.discard(session)
            self._wake()


# What each command of a message's envelope must get back (RFC 5321 4.3.2):
# MAIL 250; RCPT 250 or 251 (will forward); DATA 354 (start mail input).
_ACCEPTED: tuple[frozenset[int], ...] = (frozenset({250}), frozenset({250, 251}), frozenset({354}))


async def _envelope(session: _Session, mail: bytes, rcpt: bytes) -> list[aiosmtplib.SMTPResponse]:
    """Send MAIL, RCPT and DATA; their replies, up to the first refusal or the session's end."""
    if session.pipelining:
        # RFC 2920 3.1: MAIL, RCPT and DATA go as one group, DATA last; every reply
        # is still read and checked, in order. (On a session that carries a message
        # already, the next one's group goes with its data instead: _end_data.)
        session.write(mail + rcpt + b"DATA\r\n")
        return await session.replies(3)
    replies: list[aiosmtplib.SMTPResponse] = []
    for accepted, command in zip(_ACCEPTED, (mail, rcpt, b"DATA\r\n"), strict=True):
        session.write(command)
        got = await session.replies(1)
        replies += got
        if not got or got[0].code not in accepted:
            break  # a refusal, or a session that ended: _check_envelope says which
    return replies


def _stuffed(data: bytes) -> bytes:
    """The message as DATA sends it, up to the final dot (RFC 5321 4.5.2, 4.1.1.4)."""
    if data.startswith(b".") or b"\n." in data:  # a C search; the regex only if needed
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):  # mime.py ends every message so; smtplib does this too
        data += b"\r\n"
    return data


async def _check_envelope(
    session: _Session, envelope: Envelope, replies: list[aiosmtplib.SMTPResponse]
) -> None:
    """Raise for the first of MAIL, RCPT, DATA refused, or for a session that ended first."""
    for stage, reply in enumerate(replies):
        if reply.code in _ACCEPTED[stage]:
            continue
        if len(replies) == 3 and replies[2].code == 354 and reply.code >= 400:
            # RFC 2920 3.1: a server that takes DATA after refusing the recipient
            # gets an empty message ended at once; its reply delivers nothing.
            # Not after an odd 2yz or 3yz: the recipient may stand, and the "."
            # would deliver an empty message; the session is dropped instead,
            # which leaves the data unended, so nothing is delivered (4.1.1.4).
            with contextlib.suppress(TimeoutError, aiosmtplib.SMTPException, OSError):
                session.write(b".\r\n")
                await session.reply()
        if reply.code < 400:
            # Neither what was asked nor a refusal (RFC 5321 4.3.2): a confused
            # server, not a verdict on the recipient. The session is dropped.
            raise aiosmtplib.SMTPException(f"unexpected reply: {reply.code} {reply.message}")
        if stage == 0:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, envelope.sender)
        if stage == 1:
            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, envelope.recipient)
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    if len(replies) < 3:
        raise session.trouble()


class _Session(asyncio.Protocol):
    """One SMTP session, greeted, after EHLO, STARTTLS and AUTH: its message transactions.

    aiosmtplib opens the session (TLS, EHLO, AUTH: the parts worth a library),
    then hands its transport to this protocol. Written by hand because
    aiosmtplib cannot pipeline: its protocol keeps one reply at a time and drops
    or strands the rest ("if multiple commands are written to the transport
    without awaiting, response data will be lost", SMTPProtocol.read_response).
    With PIPELINING (RFC 2920) a message costs one round trip instead of four:
    its MAIL, RCPT and DATA go in one group, behind the previous message's data.
    Replies are handed out in the order their commands were written, to one
    wait after another, each under its own timer.
    """

    # RFC 5321 4.5.3.1.5 allows 512 octets a reply line; a few lines of them is
    # plenty. More without an end means the peer is not speaking SMTP.
    _MAX_PENDING = 64 * 1024
    _MAX_LINES = 1000

    def __init__(self, client: aiosmtplib.SMTP, timeout: float) -> None:
        # Not isinstance(asyncio.Transport): uvloop's transports do not inherit from it.
        transport = cast("asyncio.Transport | None", client.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost during the greeting")
        self.pipelining = client.supports_extension("pipelining")
        self.extensions = sorted(client.esmtp_extensions)
        self.tls = transport.get_extra_info("sslcontext") is not None
        self._transport = transport
        # [smtp] timeout, for every reply (one value, as before, for all commands).
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._pending = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        # Each wait for replies, in the order of the commands it waits for: how many
        # replies, how long at most, and the future that gets them.
        self._waits: collections.deque[_Wait] = collections.deque()
        # The first wait's timer, started when the replies before it are in.
        self._timer: asyncio.TimerHandle | None = None
        # The wait whose timer ended the session, if one did.
        self.timed_out: _Replies | None = None
        self._trouble: aiosmtplib.SMTPException | None = None
        # From here on the transport talks to this protocol only; aiosmtplib's
        # client keeps no reference that acts on it.
        transport.set_protocol(self)

    @property
    def alive(self) -> bool:
        """Connected, and nothing has gone wrong."""
        return self._trouble is None and not self._transport.is_closing()

    @property
    def ready(self) -> bool:
        """Connected, nothing awaited and nothing unasked heard: fit for the next message."""
        return (
            self.alive
            and not self._waits
            and not self._replies
            and not self._pending
            and not self._lines
        )

    def trouble(self) -> aiosmtplib.SMTPException:
        """Why the session cannot go on (lost, timed out, or not speaking SMTP)."""
        return self._trouble or aiosmtplib.SMTPServerDisconnected("connection lost")

    def write(self, data: bytes) -> None:
        if self._trouble is not None:
            raise self._trouble
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        self._transport.write(data)

    def expect(self, count: int, seconds: float | None = None) -> _Replies:
        """Wait for the next `count` replies after those already expected; see `take`.

        The wait's timer, `seconds` ([smtp] timeout by default), starts when the
        replies expected before are in: each wait (one command, or a pipelined
        group) gets its own time (RFC 5321 4.5.3.2), however long the message
        before took.
        """
        # No pause_writing/resume_writing: a session has two messages in flight at
        # most, and each writer waits for its replies anyway (under the timer), so
        # the transport's buffer holds a message or two, not a backlog.
        future: _Replies = self._loop.create_future()
        self._waits.append(_Wait(count, self._timeout if seconds is None else seconds, future))
        self._serve()
        return future

    async def take(self, expected: _Replies) -> list[aiosmtplib.SMTPResponse]:
        """The replies `expect` waited for, or fewer: those that came before the session failed."""
        try:
            return await expected
        except asyncio.CancelledError:
            self.abandon(expected)
            raise

    def abandon(self, expected: _Replies) -> None:
        """Nobody will read the replies `expect` waited for: the session ends at that point.

        The waits before it still get theirs (a message chained behind another
        is cancelled: the one before still hears its final reply); then the
        session fails, as its replies would be taken for the next wait's, and
        its transaction may be open (after a 354, the server waits for data).
        """
        for wait in self._waits:
            if wait.future is expected:
                wait.abandoned = True
                self._serve()
                return
        # Already answered, but its sender did not go on: the transaction is open.
        self._fail(aiosmtplib.SMTPException("a send was cancelled mid-transaction"))

    async def replies(
        self, count: int, seconds: float | None = None
    ) -> list[aiosmtplib.SMTPResponse]:
        """The next `count` replies (`expect`, then `take`)."""
        return await self.take(self.expect(count, seconds))

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply; raises if the session fails first."""
        got = await self.replies(1)
        if not got:
            raise self.trouble()
        return got[0]

    async def quit(self) -> None:
        """QUIT politely (RFC 5321 4.1.1.10), 5 s at most, then close; never raises."""
        with contextlib.suppress(TimeoutError, aiosmtplib.SMTPException, OSError):
            if self.ready:
                self.write(b"QUIT\r\n")
                await self.replies(1, seconds=min(5.0, self._timeout))
        self.close()

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()

    def _serve(self) -> None:
        """Hand each wait its replies, in order; once the session failed, what there is."""
        waits, replies = self._waits, self._replies
        while waits:
            wait = waits[0]
            if wait.abandoned and self._trouble is None:
                self._fail(aiosmtplib.SMTPException("a send was cancelled mid-transaction"))
                return  # _fail served every wait
            if len(replies) < wait.count and self._trouble is None:
                if self._timer is None:
                    self._timer = self._loop.call_later(wait.seconds, self._time_out, wait.seconds)
                return
            waits.popleft()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            got = [replies.popleft() for _ in range(min(wait.count, len(replies)))]
            if not wait.future.done():
                wait.future.set_result(got)

    # -- asyncio.Protocol ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._trouble is not None:
            return  # a failed session hears nothing more: it is closing
        pending = self._pending
        pending += data
        start = 0
        while (end := pending.find(b"\n", start)) != -1:
            line = bytes(pending[start : end + 1])
            start = end + 1
            # RFC 5321 4.2: "250-text" continues a reply, "250 text" (or "250") ends
            # it; the first digit is 2 to 5, the second 0 to 5 (4.2.1).
            if _REPLY_LINE.match(line) is None:
                # Not a refusal with a code, but a session that cannot go on.
                self._fail(aiosmtplib.SMTPException(f"not an SMTP reply: {line[:80]!r}"))
                return
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if len(self._lines) > self._MAX_LINES:
                self._fail(aiosmtplib.SMTPException("a reply of more than 1,000 lines"))
                return
            if line[3:4] != b"-":
                # Not surrogateescape: a reply in another charset (a CP1251 "550
                # Пользователь не найден") must still be storable text.
                text = b"\n".join(self._lines).decode("utf-8", "backslashreplace")
                self._replies.append(aiosmtplib.SMTPResponse(int(line[:3]), text))
                self._lines.clear()
        del pending[:start]
        if len(pending) > self._MAX_PENDING:
            self._fail(aiosmtplib.SMTPException("a reply line longer than 64 KiB"))
            return
        self._serve()
        if self._replies and not self._waits:
            # Said while nobody asked, or more than was asked (a 421 notice before
            # closing, RFC 5321 3.8, or a confused server): never taken for the
            # next command's reply. What was asked for has been handed over.
            reply = self._replies[-1]
            self._fail(aiosmtplib.SMTPException(f"unasked reply: {reply.code} {reply.message}"))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the server closed the connection"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    def _time_out(self, seconds: float) -> None:
        self._timer = None
        self.timed_out = self._waits[0].future if self._waits else None
        self._fail(aiosmtplib.SMTPReadTimeoutError(f"no reply from the server in {seconds:g} s"))

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        """The session cannot go on: every wait gets what came, the rest is dropped, close."""
        if self._trouble is None:
            self._trouble = exc
        self._pending.clear()
        self._lines.clear()
        self._serve()
        self.close()


_Replies = asyncio.Future[list[aiosmtplib.SMTPResponse]]


@dataclass(slots=True)
class _Waiting:
    """A send waiting for a session: its MAIL, RCPT and DATA, ready to follow another message.

    The future gets None when a session comes free (look again), or a session
    with the commands written on it and the wait for their replies.
    """

    commands: bytes
    future: asyncio.Future[tuple[_Session, _Replies] | None]


@dataclass(slots=True)
class _Wait:
    """A wait for `count` replies (_Session.expect)."""

    count: int
    seconds: float
    future: _Replies
    # Its sender is gone (cancelled): its replies must not go to the next wait.
    abandoned: bool = False


class DryRunTransport:
    """Writes each message to `DIR/NNNNNN-address.eml` instead of sending it; opens no socket."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        # File names are joined to this as text: cheaper than a Path per message.
        self._folder = os.path.join(directory, "")
        self.description = f"dry run: messages written to {directory}/"
        # Files need no sessions: this sets how many rows a run keeps claimed at once
        # (in_flight + connections), in the scratch copy of the ledger a dry run works on. At
        # 32, a commit carried at most 32 claims and the sender waited for each one;
        # at 512, the next claims (up to campaign.py's 64 a group) are committed while
        # the rows claimed before are rendered and written, so sender and ledger
        # process work at the same time: the delivery phase of 20,000 messages took
        # 2.09 -> 1.34 s (medians of 5). More bought nothing measurable, and each
        # place can hold a rendered message in memory.
        self.connections = 256
        self.in_flight = 256
        self._index: TextIO | None = None
        self._writer: Any = None

    async def open(self) -> None:
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            # Written as the run goes, so memory does not grow with the list.
            self._index = (self._directory / "index.csv").open("w", newline="", encoding="utf-8")
        except OSError as exc:
            raise PreviewError(self._directory, exc) from exc
        self._writer = csv.writer(self._index)
        self._writer.writerow(["file", "email", "message_id"])

    async def send(self, envelope: Envelope, *, attempts_allowed: int) -> DeliveryResult:
        # At most 100 characters of the address: a file name has 255 bytes at most.
        shown = _UNSAFE_FILENAME.sub("_", envelope.recipient)[:100]
        name = f"{envelope.row_id:06d}-{shown}.eml"
        try:
            _write_file(self._folder + name, envelope.data)
            if self._writer is not None:
                self._writer.writerow([name, envelope.recipient, envelope.message_id])
        except OSError as exc:  # the disk full, the folder removed: the run stops here
            raise PreviewError(self._directory, exc) from exc
        return DeliveryResult(
            row_id=envelope.row_id,
            recipient=envelope.recipient,
            state=State.SENT,
            attempts=1,
            reply=f"written to {name}",
        )

    async def close(self) -> None:
        if self._index is not None:
            index, self._index = self._index, None
            try:
                index.close()  # its last rows are written now: this can fail too
            except OSError as exc:
                raise PreviewError(self._directory, exc) from exc


# As open("wb") opens a file: a file of an earlier preview with the same name is
# replaced whole; on Windows in binary mode (no newline translation) and not
# inherited by child processes (O_NOINHERIT, where POSIX has O_CLOEXEC).
_CREATE: int = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_TRUNC
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_CLOEXEC", getattr(os, "O_NOINHERIT", 0))
)


def _write_file(path: str, data: bytes) -> None:
    """Write `data` to a new file at `path`: open, write, close, and nothing more.

    Path.write_bytes goes through io.open, which adds an fstat, an ioctl (a
    terminal check, which fails) and an lseek to each file and builds a buffered
    writer for a single write: three system calls of six, and about 10 us of CPU
    per file, for every message of a dry run (strace -c, py-spy).
    """
    fd = os.open(path, _CREATE, 0o666)
    try:
        # One write, but for a short one (rare for a regular file: the disk filling).
        view, written = memoryview(data), 0
        while written < len(data):
            more = os.write(fd, view[written:])
            if more == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            written += more
    except BaseException:
        # No half a message left to be taken for the whole one.
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _tls_context(smtp: SmtpSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(smtp.ca_file) if smtp.ca_file else None)
    if not smtp.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _untrusted(smtp: SmtpSettings, exc: ssl.SSLCertVerificationError) -> ServerError:
    return ServerError(
        f"the server's TLS certificate is not trusted: {exc.verify_message}",
        host=smtp.host,
        port=smtp.port,
        hint="check [smtp] host; for a private CA set [smtp] ca_file",
    )


def _sender_refused(
    smtp: SmtpSettings, sender: str, exc: aiosmtplib.SMTPResponseException
) -> ServerError:
    # RFC 4954 6: 530 5.7.0 means the server wants AUTH before MAIL.
    if exc.code == 530:
        message = "the server wants AUTH before it takes mail: set [smtp] username"
        hint = "set [smtp] username, and the password in APPEAL_MAILER_SMTP__PASSWORD"
    else:
        message = f"the server refused the sender {sender}"
        hint = "check [campaign] from and what the server lets this account send"
    return ServerError(
        message, host=smtp.host, port=smtp.port, code=exc.code, reply=exc.message, hint=hint
    )


def _delivery_error(envelope: Envelope, code: int, message: str) -> DeliveryError:
    # RFC 5321 4.2.1: 4yz is a transient failure, 5yz a permanent one.
    if 400 <= code < 500:
        return TransientDeliveryError(
            f"deferred by the server: {code} {message}",
            recipient=envelope.recipient,
            code=code,
            reply=message,
        )
    return PermanentDeliveryError(
        f"refused by the server: {code} {message}",
        recipient=envelope.recipient,
        code=code,
        reply=message,
    )


def _sent(envelope: Envelope, attempts: int, reply: aiosmtplib.SMTPResponse) -> DeliveryResult:
    return DeliveryResult(
        row_id=envelope.row_id,
        recipient=envelope.recipient,
        state=State.SENT,
        attempts=attempts,
        code=reply.code,
        reply=reply.message,
    )


def _result(envelope: Envelope, attempts: int, exc: DeliveryError) -> DeliveryResult:
    """What `exc`, the last attempt's failure, leaves the message: deferred, failed, unknown."""
    if isinstance(exc, TransientDeliveryError):
        state = State.DEFERRED
    elif isinstance(exc, PermanentDeliveryError):
        state = State.FAILED
    else:  # only an error after the final "." is neither transient nor permanent
        state = State.UNKNOWN
    return DeliveryResult(
        row_id=envelope.row_id,
        recipient=envelope.recipient,
        state=state,
        attempts=attempts,
        code=exc.code,
        reply=exc.reply or exc.message,
    )
