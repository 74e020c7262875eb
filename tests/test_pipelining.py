"""SMTP PIPELINING (RFC 2920) and the reply reader, against a server each test scripts.

aiosmtpd (tests/smtpd.py) answers every command as it reads it, so it cannot
show that a client sent DATA before it had MAIL's reply, nor misbehave in the
ways a broken server does. The small raw server here speaks just enough SMTP
to greet, and lets each test decide what the transaction gets back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from appeal_mailer.config import SendingSettings, SmtpSettings
from appeal_mailer.errors import ServerError
from appeal_mailer.models import DeliveryResult, Envelope, State
from appeal_mailer.ratelimit import RateLimiter
from appeal_mailer.transport import SMTPTransport

GREETING = b"220 scripted.test.invalid ESMTP\r\n"
EHLO_PIPELINING = b"250-scripted.test.invalid\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_LOCK_STEP = b"250-scripted.test.invalid\r\n250 8BITMIME\r\n"


@dataclass
class Connection:
    """One client connection as the scripted server sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # Each command line the client sent, and each whole message (without the final dot).
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)

    async def command(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("the client closed the connection")
        self.commands.append(line)
        return line

    async def message(self) -> bytes:
        """The data after 354, up to the line with the single dot (RFC 5321 4.1.1.4)."""
        data = await self.reader.readuntil(b"\r\n.\r\n")
        self.messages.append(data[: -len(b".\r\n")])
        return data

    async def reply(self, *lines: bytes) -> None:
        self.writer.write(b"".join(line + b"\r\n" for line in lines))
        await self.writer.drain()


Script = Callable[[Connection, int], Awaitable[None]]


@dataclass
class ScriptedServer:
    host: str
    port: int
    connections: list[Connection]


class Starter(Protocol):
    def __call__(
        self, script: Script, *, pipelining: bool = True
    ) -> Awaitable[ScriptedServer]: ...


@pytest.fixture
async def scripted() -> AsyncIterator[Starter]:
    """Start a raw SMTP server on 127.0.0.1, port 0, running `script(connection, number)`.

    The server greets and answers EHLO, with PIPELINING unless told otherwise;
    then the script runs.
    Everything stops at the end of the test.
    """
    servers: list[asyncio.Server] = []

    async def start(script: Script, *, pipelining: bool = True) -> ScriptedServer:
        connections: list[Connection] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connection = Connection(reader, writer)
            connections.append(connection)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                writer.write(GREETING)
                assert (await connection.command()).upper().startswith(b"EHLO")
                writer.write(EHLO_PIPELINING if pipelining else EHLO_LOCK_STEP)
                await script(connection, len(connections))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return ScriptedServer("127.0.0.1", port, connections)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def transport_for(server: ScriptedServer, timeout: float = 2.0) -> SMTPTransport:
    smtp = SmtpSettings(
        host=server.host, port=server.port, security="none", timeout=timeout, connections=1
    )
    sending = SendingSettings(
        rate=0, max_attempts=5, attempts_per_run=1, retry_backoff=0.01, retry_max_delay=0.05
    )
    return SMTPTransport(smtp, sending, RateLimiter(0, {}))


def envelope(row_id: int, recipient: str) -> Envelope:
    data = f"Subject: test {row_id}\r\n\r\nbody {row_id}\r\n".encode()
    return Envelope(row_id, "appeal@example.org", recipient, f"<{row_id}@test.invalid>", data)


async def send_all(transport: SMTPTransport, *envelopes: Envelope) -> list[DeliveryResult]:
    await transport.open()
    try:
        return [await transport.send(item, attempts_allowed=1) for item in envelopes]
    finally:
        await transport.close()


async def serve_messages(connection: Connection, count: int) -> None:
    """Answer `count` pipelined transactions normally, each group only once it is whole."""
    for _ in range(count):
        # Not one reply before DATA has arrived: a client that waited for
        # MAIL's reply before sending RCPT would wait here until it timed out.
        group = [await connection.command() for _ in range(3)]
        assert [line.split(b":")[0].split()[0].upper() for line in group] == [
            b"MAIL",
            b"RCPT",
            b"DATA",
        ]
        await connection.reply(b"250 2.1.0 sender ok", b"250 2.1.5 recipient ok", b"354 go on")
        await connection.message()
        await connection.reply(b"250 2.0.0 queued")


async def test_with_pipelining_mail_rcpt_and_data_go_before_any_reply(scripted: Starter) -> None:
    """A server saying PIPELINING gets MAIL, RCPT and DATA before it answers any of them."""

    async def script(connection: Connection, _number: int) -> None:
        await serve_messages(connection, 2)
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script)
    results = await send_all(
        transport_for(server), envelope(1, "a@example.org"), envelope(2, "b@example.org")
    )
    assert [r.state for r in results] == [State.SENT, State.SENT], results
    assert [r.reply for r in results] == ["2.0.0 queued", "2.0.0 queued"]
    (connection,) = server.connections  # one session for both messages
    assert connection.messages == [
        b"Subject: test 1\r\n\r\nbody 1\r\n",
        b"Subject: test 2\r\n\r\nbody 2\r\n",
    ]


async def test_a_recipient_refused_in_a_group_fails_and_a_data_accepted_anyway_gets_a_lone_dot(
    scripted: Starter,
) -> None:
    """RCPT 550 but DATA 354 (a broken server): the client ends DATA with a lone "." and goes on.

    RFC 2920 3.1: the refusal decides (the recipient fails, once); nothing of the
    message is sent; the session is reset and carries the next message.
    """
    seen_after_refusal: list[bytes] = []

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", b"550 5.1.1 no such user", b"354 go on anyway")
        seen_after_refusal.append(await connection.reader.readuntil(b".\r\n"))
        await connection.reply(b"554 5.5.1 no valid recipients")
        assert (await connection.command()).upper() == b"RSET\r\n"
        await connection.reply(b"250 reset")
        await serve_messages(connection, 1)

    server = await scripted(script)
    refused, delivered = await send_all(
        transport_for(server), envelope(1, "gone@example.org"), envelope(2, "b@example.org")
    )
    assert (refused.state, refused.code, refused.reply) == (
        State.FAILED,
        550,
        "5.1.1 no such user",
    )
    assert seen_after_refusal == [b".\r\n"]
    assert delivered.state is State.SENT
    assert len(server.connections) == 1
    assert server.connections[0].messages == [b"Subject: test 2\r\n\r\nbody 2\r\n"]


async def test_421_to_mail_then_a_close_defers_the_message(scripted: Starter) -> None:
    """MAIL 421 and the connection closed before the other replies: deferred, not failed."""

    async def script(connection: Connection, number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"421 4.3.2 shutting down")

    server = await scripted(script)
    (result,) = await send_all(transport_for(server), envelope(1, "a@example.org"))
    assert (result.state, result.code) == (State.DEFERRED, 421), result


async def test_an_unasked_reply_while_idle_retires_the_session_without_using_an_attempt(
    scripted: Starter,
) -> None:
    """A session that says something unasked while idle (a 421 notice) is not reused.

    The next message goes on a new session at its first attempt; the stray
    reply is never taken for that message's MAIL reply.
    """
    delivered_first = asyncio.Event()

    async def script(connection: Connection, number: int) -> None:
        await serve_messages(connection, 1)
        if number == 1:
            await connection.reply(b"421 4.4.2 idle too long")  # unasked; the socket stays open
            delivered_first.set()
            await asyncio.sleep(5)

    server = await scripted(script)
    transport = transport_for(server)
    await transport.open()
    try:
        first = await transport.send(envelope(1, "a@example.org"), attempts_allowed=1)
        await delivered_first.wait()
        # Until the 421 has reached the client while the session is idle (a fixed
        # sleep could be too short on a loaded machine); the pool is private, but
        # only the test's timing depends on it.
        for _ in range(500):
            if not any(session.ready for session in transport._idle):
                break
            await asyncio.sleep(0.01)
        second = await transport.send(envelope(2, "b@example.org"), attempts_allowed=1)
    finally:
        await transport.close()
    assert (first.state, second.state) == (State.SENT, State.SENT), second
    assert second.attempts == 1
    assert len(server.connections) == 2
    assert server.connections[1].messages == [b"Subject: test 2\r\n\r\nbody 2\r\n"]


@pytest.mark.parametrize(
    ("garbage", "after_dot"),
    [
        (b"HTTP/1.1 400 Bad Request", False),
        (b"25", False),
        (b"2500 ok", True),
    ],
)
async def test_a_reply_that_is_not_smtp_ends_the_session(
    scripted: Starter, garbage: bytes, after_dot: bool
) -> None:
    """Garbage for a reply defers the message (or, after the final dot, makes it unknown).

    Never a permanent failure: it says nothing about the recipient. The session
    is dropped, and the next message goes on a new one.
    """

    async def script(connection: Connection, number: int) -> None:
        if number == 2:
            await serve_messages(connection, 1)
            return
        for _ in range(3):
            await connection.command()
        if after_dot:
            await connection.reply(b"250 ok", b"250 ok", b"354 go on")
            await connection.message()
        await connection.reply(garbage)
        await asyncio.sleep(5)

    server = await scripted(script)
    broken, delivered = await send_all(
        transport_for(server, timeout=0.5),
        envelope(1, "a@example.org"),
        envelope(2, "b@example.org"),
    )
    assert broken.state is (State.UNKNOWN if after_dot else State.DEFERRED), broken
    assert delivered.state is State.SENT
    assert len(server.connections) == 2


async def test_a_multiline_final_reply_is_read_whole(scripted: Starter) -> None:
    """A reply in several lines, arriving in pieces, is one reply, joined (RFC 5321 4.2.1)."""

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        connection.writer.write(b"250-2.0.0 queued as A1\r\n25")
        await connection.writer.drain()
        await asyncio.sleep(0.05)
        await connection.reply(b"0 2.0.0 thank you")

    server = await scripted(script)
    (result,) = await send_all(transport_for(server), envelope(1, "a@example.org"))
    assert (result.state, result.code) == (State.SENT, 250)
    assert result.reply == "2.0.0 queued as A1\n2.0.0 thank you"


# -- the next message's envelope behind the final dot (RFC 2920 3.1) ---------------------


async def send_together(transport: SMTPTransport, *envelopes: Envelope) -> list[DeliveryResult]:
    """Open, then send all at once (as the campaign's workers do), then close."""
    await transport.open()
    try:
        return list(
            await asyncio.gather(*(transport.send(item, attempts_allowed=1) for item in envelopes))
        )
    finally:
        await transport.close()


async def first_then_next_envelope(connection: Connection) -> list[bytes]:
    """Take message 1's transaction up to its final dot, then the next MAIL, RCPT and DATA.

    Message 1's final reply is not sent yet: a client that waited for it before
    sending the next envelope would wait here until it timed out.
    """
    for _ in range(3):
        await connection.command()
    await connection.reply(b"250 sender ok", b"250 recipient ok", b"354 go on")
    await connection.message()
    return [await connection.command() for _ in range(3)]


async def test_the_next_envelope_follows_the_final_dot_before_its_reply(scripted: Starter) -> None:
    """With PIPELINING, message 2's MAIL, RCPT and DATA come before message 1's final reply.

    RFC 2920 3.1 lets message content start a group: one round trip a message
    instead of two, on one session, with every reply still read in order.
    """

    async def script(connection: Connection, _number: int) -> None:
        group = await first_then_next_envelope(connection)
        assert [line.split(b":")[0].upper() for line in group] == [
            b"MAIL FROM",
            b"RCPT TO",
            b"DATA\r\n",
        ]
        await connection.reply(b"250 2.0.0 queued 1", b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        await connection.reply(b"250 2.0.0 queued 2")
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script)
    transport = transport_for(server)
    first, second = await send_together(
        transport, envelope(1, "a@example.org"), envelope(2, "b@example.org")
    )
    assert transport.in_flight == 2  # one session, two messages in flight on it
    assert (first.state, first.reply) == (State.SENT, "2.0.0 queued 1"), first
    assert (second.state, second.reply) == (State.SENT, "2.0.0 queued 2"), second
    (connection,) = server.connections
    assert connection.messages == [
        b"Subject: test 1\r\n\r\nbody 1\r\n",
        b"Subject: test 2\r\n\r\nbody 2\r\n",
    ]


async def test_a_message_refused_at_its_final_dot_leaves_the_one_behind_it_alone(
    scripted: Starter,
) -> None:
    """Message 1 refused after its data (554): it fails; message 2, already chained, is sent.

    No RSET: the final reply ends the transaction whatever it says (RFC 5321
    4.1.1.4), and an RSET would land inside message 2's transaction.
    """

    async def script(connection: Connection, _number: int) -> None:
        await first_then_next_envelope(connection)
        await connection.reply(b"554 5.7.1 spam", b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        await connection.reply(b"250 2.0.0 queued 2")
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script)
    refused, sent = await send_together(
        transport_for(server), envelope(1, "a@example.org"), envelope(2, "b@example.org")
    )
    assert (refused.state, refused.code, refused.reply) == (State.FAILED, 554, "5.7.1 spam")
    assert sent.state is State.SENT, sent
    (connection,) = server.connections
    assert not any(line.upper().startswith(b"RSET") for line in connection.commands)
    assert connection.messages[-1] == b"Subject: test 2\r\n\r\nbody 2\r\n"


@pytest.mark.parametrize("ending", ["421", "drop"])
async def test_a_session_ending_at_a_final_dot_moves_the_message_behind_it_at_no_cost(
    scripted: Starter, ending: str
) -> None:
    """The session ends with message 1's final reply (a 421) or without one (a drop).

    Message 1 is deferred (421, RFC 5321 3.8) or unknown (its reply lost, RFC
    1047). Message 2, whose envelope was already written behind it, goes on a
    new session at once, as its first attempt: none of its data had been sent.
    """

    async def script(connection: Connection, number: int) -> None:
        if number == 2:
            await serve_messages(connection, 1)
            await connection.command()  # QUIT
            await connection.reply(b"221 bye")
            return
        await first_then_next_envelope(connection)
        if ending == "421":
            await connection.reply(b"421 4.3.2 shutting down")

    server = await scripted(script)
    first, second = await send_together(
        transport_for(server), envelope(1, "a@example.org"), envelope(2, "b@example.org")
    )
    if ending == "421":
        assert (first.state, first.code) == (State.DEFERRED, 421), first
    else:
        assert first.state is State.UNKNOWN, first
    assert (second.state, second.attempts) == (State.SENT, 1), second
    assert len(server.connections) == 2
    assert server.connections[0].messages == [b"Subject: test 1\r\n\r\nbody 1\r\n"]
    assert server.connections[1].messages == [b"Subject: test 2\r\n\r\nbody 2\r\n"]


async def test_each_reply_on_a_chained_session_gets_the_whole_timeout(scripted: Starter) -> None:
    """Message 2's envelope replies come 1.2 s after it was written, each 0.6 s after the last.

    With [smtp] timeout 1 s that is no timeout: a reply's time starts when the
    replies before it are in (RFC 5321 4.5.3.2 times each command), not when the
    command was written behind a slow message.
    """

    async def script(connection: Connection, _number: int) -> None:
        await first_then_next_envelope(connection)
        await asyncio.sleep(0.6)
        await connection.reply(b"250 2.0.0 queued 1")
        await asyncio.sleep(0.6)
        await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        await connection.reply(b"250 2.0.0 queued 2")
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script)
    first, second = await send_together(
        transport_for(server, timeout=1.0),
        envelope(1, "a@example.org"),
        envelope(2, "b@example.org"),
    )
    assert (first.state, second.state) == (State.SENT, State.SENT), (first, second)
    assert len(server.connections) == 1


async def test_without_pipelining_the_next_message_waits_for_the_session(
    scripted: Starter,
) -> None:
    """Without PIPELINING one message is in flight a session: the second waits its turn.

    The pool opens no second session for it either ([smtp] connections = 1).
    """

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(2):
            for reply in (b"250 sender ok", b"250 recipient ok", b"354 go on"):
                await connection.command()
                await connection.reply(reply)
            await connection.message()
            await connection.reply(b"250 2.0.0 queued")
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script, pipelining=False)
    transport = transport_for(server)
    results = await send_together(
        transport, envelope(1, "a@example.org"), envelope(2, "b@example.org")
    )
    assert transport.in_flight == 1
    assert [r.state for r in results] == [State.SENT, State.SENT], results
    assert len(server.connections) == 1
    assert len(server.connections[0].messages) == 2


# -- without PIPELINING, and servers that say odd things ---------------------------------


@pytest.mark.parametrize("fault", ["close", "stall"])
async def test_without_pipelining_a_session_lost_at_mail_defers_the_message(
    scripted: Starter, fault: str
) -> None:
    """One command at a time: MAIL answered by a close or by silence is a transient failure.

    Nothing was sent, so the message is deferred (and retried), never unknown.
    The next message goes on a new session.
    """

    async def script(connection: Connection, number: int) -> None:
        if number == 2:
            for _ in range(3):
                command = await connection.command()
                await connection.reply(b"354 go on" if command.startswith(b"DATA") else b"250 ok")
            await connection.message()
            await connection.reply(b"250 queued")
            return
        await connection.command()  # MAIL
        if fault == "stall":
            await asyncio.sleep(5)

    server = await scripted(script, pipelining=False)
    lost, delivered = await send_all(
        transport_for(server, timeout=0.5),
        envelope(1, "a@example.org"),
        envelope(2, "b@example.org"),
    )
    assert lost.state is State.DEFERRED, lost
    assert delivered.state is State.SENT, delivered
    assert server.connections[1].messages == [b"Subject: test 2\r\n\r\nbody 2\r\n"]


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        # Neither what was asked nor a refusal: a confused server, not a verdict.
        ((b"220 hello again", b"250 ok", b"354 go on"), State.DEFERRED),
        ((b"250 ok", b"354 go on", b"354 go on"), State.DEFERRED),
        ((b"999 what", b"250 ok", b"354 go on"), State.DEFERRED),
    ],
)
async def test_an_unexpected_reply_before_the_data_defers_and_never_fails_the_recipient(
    scripted: Starter, replies: tuple[bytes, ...], expected: State
) -> None:
    """A 2yz or 3yz where a refusal could be, or a code SMTP has not, defers (RFC 5321 4.2.1).

    And no "." goes after such a 354: the recipient may stand, so a dot could
    deliver an empty message; the session is dropped with the data unended.
    """
    after_354: list[bytes] = []
    heard_all = asyncio.Event()

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(*replies)
        after_354.append(await connection.reader.read())  # until the client closes
        heard_all.set()

    server = await scripted(script)
    (result,) = await send_all(transport_for(server, timeout=0.5), envelope(1, "a@example.org"))
    await asyncio.wait_for(heard_all.wait(), 5)
    assert result.state is expected, result
    assert result.reply is not None
    assert result.reply.startswith(("unexpected reply", "not an SMTP reply")), result.reply
    assert after_354 == [b""]  # not even a "."


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        (b"252 2.0.0 accepted, probably", State.SENT),  # RFC 5321 4.2.1: 2yz is done
        (b"354 go on again", State.UNKNOWN),  # after the dot, says nothing: never re-sent
        (b"451 4.3.0 try again", State.DEFERRED),
        (b"554 5.7.1 rejected", State.FAILED),
    ],
)
async def test_the_reply_after_the_final_dot_decides_by_its_first_digit(
    scripted: Starter, final: bytes, expected: State
) -> None:
    """After the data: 2yz sent, 4yz deferred, 5yz failed, anything else unknown."""

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        await connection.reply(final)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await connection.command():
                await connection.reply(b"250 ok")

    server = await scripted(script)
    (result,) = await send_all(transport_for(server, timeout=0.5), envelope(1, "a@example.org"))
    assert result.state is expected, result


async def test_a_reply_in_another_charset_is_kept_as_storable_text(scripted: Starter) -> None:
    """A CP1251 refusal (not UTF-8) fails the recipient with a reply that UTF-8 can store.

    Lone surrogates in the reply would make the ledger refuse to record it.
    """
    refusal = "550 5.1.1 Пользователь не найден".encode("cp1251")

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", refusal, b"503 no recipients")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await connection.command():
                await connection.reply(b"250 ok")

    server = await scripted(script)
    (result,) = await send_all(transport_for(server), envelope(1, "a@example.org"))
    assert (result.state, result.code) == (State.FAILED, 550), result
    assert result.reply is not None
    assert result.reply.startswith("5.1.1 \\xcf")  # shown escaped, byte for byte
    result.reply.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate


async def test_closing_the_transport_mid_send_ends_that_send_at_once(scripted: Starter) -> None:
    """close() while a message waits for its final reply cuts the session: unknown, no hang.

    The final "." was written, so the message may have arrived (RFC 1047): unknown.
    """
    data_in = asyncio.Event()

    async def script(connection: Connection, _number: int) -> None:
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        data_in.set()
        await asyncio.sleep(30)  # never confirms

    server = await scripted(script)
    transport = transport_for(server, timeout=30)
    await transport.open()
    sending = asyncio.create_task(transport.send(envelope(1, "a@example.org"), attempts_allowed=1))
    await data_in.wait()
    await transport.close()
    result = await asyncio.wait_for(sending, 5)  # the test's own guard against a hang
    assert result.state is State.UNKNOWN, result


async def test_closing_the_transport_ends_a_send_waiting_for_a_session(scripted: Starter) -> None:
    """close() while a second message waits for the only session: it ends, sending nothing.

    Without PIPELINING the second message waits its turn ([smtp] connections = 1);
    once the transport is closed it opens no new session: a ServerError, which
    the run records as not sent.
    """
    data_in = asyncio.Event()

    async def script(connection: Connection, _number: int) -> None:
        for reply in (b"250 ok", b"250 ok", b"354 go on"):
            await connection.command()
            await connection.reply(reply)
        await connection.message()
        data_in.set()
        await asyncio.sleep(30)  # never confirms

    server = await scripted(script, pipelining=False)
    transport = transport_for(server, timeout=30)
    await transport.open()
    first = asyncio.create_task(transport.send(envelope(1, "a@example.org"), attempts_allowed=1))
    second = asyncio.create_task(transport.send(envelope(2, "b@example.org"), attempts_allowed=1))
    await data_in.wait()
    await transport.close()
    # The test's own guards against a hang.
    assert (await asyncio.wait_for(first, 5)).state is State.UNKNOWN
    with pytest.raises(ServerError, match="no new message"):
        await asyncio.wait_for(second, 5)
    assert len(server.connections) == 1
    assert len(server.connections[0].messages) == 1


async def test_more_replies_than_asked_in_one_packet_drop_the_session(scripted: Starter) -> None:
    """Without PIPELINING, MAIL answered by "250" and a stray "550" at once: the 550 is not RCPT's.

    The surplus reply retires the session; the message is deferred and goes
    on a new session, and the recipient is neither failed nor suppressed.
    """

    async def script(connection: Connection, number: int) -> None:
        if number == 1:
            await connection.command()  # MAIL
            await connection.reply(b"250 ok", b"550 5.1.1 no such user")
            await asyncio.sleep(5)
            return
        for _ in range(3):
            command = await connection.command()
            await connection.reply(b"354 go on" if command.startswith(b"DATA") else b"250 ok")
        await connection.message()
        await connection.reply(b"250 queued")

    server = await scripted(script, pipelining=False)
    transport = transport_for(server)
    await transport.open()
    try:
        first = await transport.send(envelope(1, "a@example.org"), attempts_allowed=1)
        second = await transport.send(envelope(1, "a@example.org"), attempts_allowed=1)
    finally:
        await transport.close()
    assert first.state is State.DEFERRED, first
    assert first.reply is not None
    assert "unasked reply: 550" in first.reply
    assert second.state is State.SENT, second


# -- a pool of sessions, cancelled sends, close() and servers that misbehave -------------


def pool_for(
    server: ScriptedServer,
    *,
    connections: int = 1,
    timeout: float = 2.0,
    limiter: RateLimiter | None = None,
) -> SMTPTransport:
    """As transport_for, with [smtp] connections and the pace (unlimited unless given)."""
    limiter = limiter or RateLimiter(0, {})
    smtp = SmtpSettings(
        host=server.host,
        port=server.port,
        security="none",
        timeout=timeout,
        connections=connections,
    )
    sending = SendingSettings(
        rate=limiter.configured_rate,
        max_attempts=5,
        attempts_per_run=1,
        retry_backoff=0.01,
        retry_max_delay=0.05,
    )
    return SMTPTransport(smtp, sending, limiter)


def body(row_id: int) -> bytes:
    """The message `envelope(row_id, ...)` carries, as the server stores it."""
    return f"Subject: test {row_id}\r\n\r\nbody {row_id}\r\n".encode()


def verbs(connection: Connection) -> list[bytes]:
    """The commands the client sent on `connection`, by name (the message data aside)."""
    return [line.split(b":")[0].split()[0].upper() for line in connection.commands]


async def serve_until_quit(
    connection: Connection,
    *,
    on_mail: Callable[[], None] | None = None,
    after_data: Callable[[Connection], Awaitable[None]] | None = None,
) -> None:
    """Answer pipelined transactions normally until QUIT (or until the client leaves).

    `on_mail` runs as each MAIL arrives; `after_data` after each message's final
    dot, before its reply.
    """
    while True:
        command = await connection.command()
        if command.upper().startswith(b"QUIT"):
            await connection.reply(b"221 bye")
            return
        assert command.upper().startswith(b"MAIL"), command
        if on_mail is not None:
            on_mail()
        await connection.command()  # RCPT
        await connection.command()  # DATA
        await connection.reply(b"250 2.1.0 sender ok", b"250 2.1.5 recipient ok", b"354 go on")
        await connection.message()
        if after_data is not None:
            await after_data(connection)
        await connection.reply(b"250 2.0.0 queued")


Handler = Callable[[Connection, int], Awaitable[None]]


class RawStarter(Protocol):
    def __call__(self, handler: Handler) -> Awaitable[ScriptedServer]: ...


@pytest.fixture
async def raw() -> AsyncIterator[RawStarter]:
    """As `scripted`, but `handler(connection, number)` greets (or refuses, or stalls) itself."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> ScriptedServer:
        connections: list[Connection] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connection = Connection(reader, writer)
            connections.append(connection)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await handler(connection, len(connections))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return ScriptedServer("127.0.0.1", server.sockets[0].getsockname()[1], connections)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def greet(connection: Connection) -> None:
    """What the `scripted` server does before its script: 220, then EHLO with PIPELINING."""
    await connection.reply(GREETING.rstrip(b"\r\n"))
    assert (await connection.command()).upper().startswith(b"EHLO")
    await connection.reply(EHLO_PIPELINING.rstrip(b"\r\n"))


async def cancel_the_first_then_send_another(
    transport: SMTPTransport, reached: asyncio.Event
) -> DeliveryResult:
    """Send message 1, cancel it once the server has `reached` its point, then send message 2.

    Returns message 2's result. Every wait is the test's own guard against a
    hang (the bugs these tests pin down left message 2 waiting for ever).
    """
    await transport.open()
    try:
        first = asyncio.create_task(
            transport.send(envelope(1, "a@example.org"), attempts_allowed=1)
        )
        await asyncio.wait_for(reached.wait(), 5)
        first.cancel()
        await asyncio.wait({first}, timeout=5)
        assert first.cancelled()
        return await asyncio.wait_for(
            transport.send(envelope(2, "b@example.org"), attempts_allowed=1), 5
        )
    finally:
        await transport.close()


async def test_a_send_cancelled_mid_transaction_frees_its_place_in_the_pool(
    scripted: Starter,
) -> None:
    """A send cancelled while it waits for its envelope's replies gives its session up.

    Its replies would be taken for the next command's, so the session is closed;
    and it no longer counts against [smtp] connections = 1: the next send opens
    a new session and is sent, instead of waiting for a session nobody returns.
    """
    group_in = asyncio.Event()
    ended: list[bytes] = []

    async def script(connection: Connection, number: int) -> None:
        if number == 2:
            await serve_messages(connection, 1)
            await connection.command()  # QUIT
            await connection.reply(b"221 bye")
            return
        for _ in range(3):
            await connection.command()
        group_in.set()  # and never answered
        ended.append(await connection.reader.read())  # until the client closes

    server = await scripted(script)
    second = await cancel_the_first_then_send_another(pool_for(server, timeout=30), group_in)
    assert (second.state, second.attempts) == (State.SENT, 1), second
    assert len(server.connections) == 2
    assert ended == [b""]  # the first session was closed, with no data sent on it
    assert server.connections[0].messages == []
    assert server.connections[1].messages == [body(2)]


async def test_a_chained_send_cancelled_leaves_the_message_before_it_its_final_reply(
    scripted: Starter,
) -> None:
    """Message 2, chained behind message 1's final dot, is cancelled: message 1 is still sent.

    Message 1's 250 comes before any reply to message 2's group (RFC 2920 3.1:
    replies in the order of the commands), so it is read and message 1 is SENT,
    not unknown. Then the session ends: message 2's replies have no reader, and
    its data, after a 354 nobody took, is never written.
    """
    group_in = asyncio.Event()
    cancelled = asyncio.Event()
    heard_end = asyncio.Event()
    after_354: list[bytes] = []

    async def script(connection: Connection, _number: int) -> None:
        await first_then_next_envelope(connection)
        group_in.set()
        await cancelled.wait()
        await connection.reply(b"250 2.0.0 queued 1", b"250 ok", b"250 ok", b"354 go on")
        after_354.append(await connection.reader.read())  # until the client closes
        heard_end.set()

    server = await scripted(script)
    transport = pool_for(server, timeout=10)
    await transport.open()
    try:
        first = asyncio.create_task(
            transport.send(envelope(1, "a@example.org"), attempts_allowed=1)
        )
        second = asyncio.create_task(
            transport.send(envelope(2, "b@example.org"), attempts_allowed=1)
        )
        await asyncio.wait_for(group_in.wait(), 5)  # the test's own guard against a hang
        second.cancel()
        await asyncio.wait({second}, timeout=5)
        assert second.cancelled()
        cancelled.set()
        # The test's own guards against a hang.
        result = await asyncio.wait_for(first, 5)
        await asyncio.wait_for(heard_end.wait(), 5)
    finally:
        await transport.close()
    assert (result.state, result.code, result.reply) == (State.SENT, 250, "2.0.0 queued 1")
    assert after_354 == [b""]  # not a byte of message 2's data
    (connection,) = server.connections
    assert connection.messages == [body(1)]


async def test_a_wake_up_for_a_send_cancelled_before_it_ran_goes_to_the_next_waiting_send(
    scripted: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B is woken for the free session and cancelled before it runs: C, waiting too, gets it.

    Without PIPELINING and with one connection, B and C wait while A sends.
    A cancellation can land between a wake-up and the woken task's next step (a
    wait_for deadline, the run stopping); _wake is wrapped here to cancel B at
    exactly that point, which a real run hits only by chance. The session is
    idle then, so C must not wait for ever.
    """
    data_in = asyncio.Event()
    release = asyncio.Event()
    tasks: dict[str, asyncio.Task[DeliveryResult]] = {}
    fired: list[bool] = []

    async def lock_step(connection: Connection) -> None:
        for reply in (b"250 sender ok", b"250 recipient ok", b"354 go on"):
            await connection.command()
            await connection.reply(reply)
        await connection.message()

    async def script(connection: Connection, _number: int) -> None:
        await lock_step(connection)
        data_in.set()
        await release.wait()
        await connection.reply(b"250 2.0.0 queued 1")
        await lock_step(connection)
        await connection.reply(b"250 2.0.0 queued 3")
        await connection.command()  # QUIT
        await connection.reply(b"221 bye")

    server = await scripted(script, pipelining=False)
    transport = pool_for(server, timeout=10)
    await transport.open()
    wake = transport._wake

    def wake_then_cancel_b() -> None:
        if not fired and len(transport._waiting) == 2:  # B, then C: A's session came free
            fired.append(True)
            wake()
            tasks["b"].cancel()  # after B's wake-up, before B runs
            return
        wake()

    monkeypatch.setattr(transport, "_wake", wake_then_cancel_b)
    try:
        for name, row_id in (("a", 1), ("b", 2), ("c", 3)):
            tasks[name] = asyncio.create_task(
                transport.send(envelope(row_id, f"{name}@example.org"), attempts_allowed=1)
            )
        await asyncio.wait_for(data_in.wait(), 5)  # the test's own guard against a hang
        release.set()
        # The test's own guards against a hang (the bug: C waited for ever).
        a = await asyncio.wait_for(tasks["a"], 5)
        c = await asyncio.wait_for(tasks["c"], 5)
    finally:
        await transport.close()
    assert fired, "the race was not forced"
    assert tasks["b"].cancelled()
    assert (a.state, c.state) == (State.SENT, State.SENT), (a, c)
    assert c.reply == "2.0.0 queued 3"
    (connection,) = server.connections
    assert connection.messages == [body(1), body(3)]


async def test_close_while_a_send_opens_a_session_sends_nothing_and_closes_that_session(
    raw: RawStarter,
) -> None:
    """close() comes while B's new session is still being greeted: B sends nothing on it.

    The run is ending, so B ends with "no new message goes out" once its session
    is ready, and that session is closed, not left open in a pool close()
    has already emptied: the server sees EHLO, then the connection end.
    """
    data_in = asyncio.Event()
    second_in = asyncio.Event()
    greeting = asyncio.Event()
    second_ended = asyncio.Event()
    after_ehlo: list[bytes] = []

    async def handler(connection: Connection, number: int) -> None:
        if number == 1:
            await greet(connection)
            for _ in range(3):
                await connection.command()
            await connection.reply(b"250 ok", b"250 ok", b"354 go on")
            await connection.message()
            data_in.set()
            await connection.reader.read()  # never confirms; until the client closes
            return
        second_in.set()
        await greeting.wait()  # a slow greeting: close() comes first
        await greet(connection)
        after_ehlo.append(await connection.reader.read())  # until the client closes
        second_ended.set()

    server = await raw(handler)
    transport = pool_for(server, connections=2, timeout=5)
    await transport.open()
    a = asyncio.create_task(transport.send(envelope(1, "a@example.org"), attempts_allowed=1))
    # The test's own guards against a hang, here and below.
    await asyncio.wait_for(data_in.wait(), 5)
    # A has the only session: B opens a second one ([smtp] connections = 2).
    b = asyncio.create_task(transport.send(envelope(2, "b@example.org"), attempts_allowed=1))
    await asyncio.wait_for(second_in.wait(), 5)
    await transport.close()
    greeting.set()
    with pytest.raises(ServerError, match="no new message"):
        await asyncio.wait_for(b, 5)
    # Cut by close() after its final dot: it may have arrived (RFC 1047).
    assert (await asyncio.wait_for(a, 5)).state is State.UNKNOWN
    await asyncio.wait_for(second_ended.wait(), 5)
    assert after_ehlo == [b""]  # no MAIL on the session opened during close()
    assert not transport._all  # nothing of the pool outlives close()
    assert [len(connection.messages) for connection in server.connections] == [1, 0]


async def test_with_a_rate_a_slow_final_reply_is_not_followed_by_a_burst(
    scripted: Starter,
) -> None:
    """Rate 2/s, one session, PIPELINING; message 1's final reply takes 1.5 s.

    The sends behind it must not have taken their turns at the pace while they
    waited, to go out together once the session is free (two MAILs at once
    breaks a provider's "2 per second"): a send is paced only once it has a
    session, and a send the pace holds back is not chained behind a final dot.
    The pace is one message per 0.5 s; consecutive MAILs reach the server at
    least 0.3 s apart (a margin for a loaded machine).
    """
    arrivals: list[float] = []
    slow: list[bool] = []
    loop = asyncio.get_running_loop()

    async def first_reply_slow(_connection: Connection) -> None:
        if not slow:
            slow.append(True)
            await asyncio.sleep(1.5)  # a content scan, a hiccup

    async def script(connection: Connection, _number: int) -> None:
        await serve_until_quit(
            connection, on_mail=lambda: arrivals.append(loop.time()), after_data=first_reply_slow
        )

    server = await scripted(script)
    transport = pool_for(server, timeout=10, limiter=RateLimiter(2, {}))
    # The test's own guard against a hang; the run itself takes about 2.5 s.
    results = await asyncio.wait_for(
        send_together(transport, *(envelope(i, f"r{i}@example.org") for i in range(1, 5))), 15
    )
    assert [r.state for r in results] == [State.SENT] * 4, results
    assert len(server.connections) == 1
    assert len(arrivals) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.3, gaps


async def test_a_server_dropping_what_follows_a_final_dot_turns_chaining_off_for_the_run(
    scripted: Starter,
) -> None:
    """A server that says PIPELINING but discards what came in with a final dot.

    RFC 2920 3.1 forbids that, but such servers exist: the chained message's
    envelope is never answered, and its wait times out ([smtp] timeout 1 s).
    That silence turns chaining off: the message goes again on a new session
    (no attempt used: none of it was answered), and the rest go one at a time
    without a timeout each. Six messages, all sent at their first attempt, and
    at most one timeout suffered: at most two sessions.
    """

    async def discard_the_rest(connection: Connection) -> None:
        # What arrived with the final dot (the server's own read buffer) is lost.
        connection.reader._buffer.clear()  # type: ignore[attr-defined]

    async def script(connection: Connection, _number: int) -> None:
        await serve_until_quit(connection, after_data=discard_the_rest)

    server = await scripted(script)
    transport = pool_for(server, timeout=1.0)
    # The test's own guard against a hang; six timeouts would take 6 s.
    results = await asyncio.wait_for(
        send_together(transport, *(envelope(i, f"r{i}@example.org") for i in range(1, 7))), 15
    )
    assert [(r.state, r.attempts) for r in results] == [(State.SENT, 1)] * 6, results
    assert len(server.connections) <= 2, len(server.connections)
    delivered = [message for connection in server.connections for message in connection.messages]
    assert sorted(delivered) == sorted(body(i) for i in range(1, 7))


async def test_a_pool_of_two_sessions_sends_each_message_once_and_opens_no_third(
    scripted: Starter,
) -> None:
    """[smtp] connections = 2 with PIPELINING: eight messages at once over at most two sessions.

    Every message is sent, and its data reaches the server exactly once, on
    whichever session carried it; the pool never opens more sessions than the
    provider allows, however many sends wait.
    """

    async def script(connection: Connection, _number: int) -> None:
        await serve_until_quit(connection)

    server = await scripted(script)
    transport = pool_for(server, connections=2)
    # The test's own guard against a hang.
    results = await asyncio.wait_for(
        send_together(transport, *(envelope(i, f"r{i}@example.org") for i in range(1, 9))), 15
    )
    assert transport.in_flight == 4  # two sessions, two messages in flight on each
    assert [r.state for r in results] == [State.SENT] * 8, results
    assert len(server.connections) <= 2
    delivered = [message for connection in server.connections for message in connection.messages]
    assert sorted(delivered) == sorted(body(i) for i in range(1, 9))


async def test_a_send_cancelled_while_its_rset_is_unanswered_frees_its_place_in_the_pool(
    raw: RawStarter,
) -> None:
    """A send refused at RCPT is cancelled while it waits for its RSET's reply.

    The RSET (RFC 5321 4.1.1.5) is awaited from the refusal's handler, past the
    attempt's own cancellation handling; the session must still leave the pool,
    or the next send would wait for ever for [smtp] connections = 1.
    """
    rset_in = asyncio.Event()

    async def handler(connection: Connection, number: int) -> None:
        await greet(connection)
        if number > 1:
            await serve_until_quit(connection)
            return
        for _ in range(3):
            await connection.command()
        await connection.reply(b"250 ok", b"550 5.1.1 no such user", b"554 no valid recipients")
        assert (await connection.command()).upper().startswith(b"RSET")
        rset_in.set()  # and never answered
        await connection.reader.read()  # until the client closes

    server = await raw(handler)
    second = await cancel_the_first_then_send_another(pool_for(server, timeout=30), rset_in)
    assert (second.state, second.attempts) == (State.SENT, 1), second
    assert len(server.connections) == 2
    assert server.connections[1].messages == [body(2)]


async def test_a_slow_final_reply_does_not_turn_chaining_off(raw: RawStarter) -> None:
    """Message 1's final reply outlasts [smtp] timeout: it is unknown, and chaining stays on.

    The message chained behind it heard nothing because the session ended on
    message 1's timer, not its own: no sign that the server drops what follows
    a final dot. Later messages on the new session still ride behind the
    previous one's dot: the server gets the next MAIL before each final reply.
    """
    slow_once = [True]
    early_mails: list[int] = []

    async def handler(connection: Connection, number: int) -> None:
        await greet(connection)

        async def after_data(connection: Connection) -> None:
            if slow_once[0]:
                slow_once[0] = False
                await asyncio.sleep(1.5)  # longer than the 1 s timeout: a slow content scan
                return
            # Is the next message's MAIL already here, before this one's reply?
            if b"MAIL" in bytes(connection.reader._buffer):  # what arrived
                early_mails.append(number)

        await serve_until_quit(connection, after_data=after_data)

    server = await raw(handler)
    transport = pool_for(server, timeout=1.0)
    results = await asyncio.wait_for(  # the test's own guard against a hang
        send_together(transport, *(envelope(i, f"r{i}@example.org") for i in range(1, 7))), 20
    )
    assert results[0].state is State.UNKNOWN, results[0]
    assert [r.state for r in results[1:]] == [State.SENT] * 5, results
    assert all(r.attempts == 1 for r in results[1:]), results
    assert len(server.connections) == 2
    assert early_mails, "no message rode behind the one before it after the timeout"


async def test_a_chained_message_refused_at_rcpt_is_reset_after_the_one_before_it(
    scripted: Starter,
) -> None:
    """Message 1 is queued; message 2, chained behind it, gets RCPT 550 (and DATA 554).

    Message 2 fails with the 550. Its transaction is cleared with RSET (RFC
    5321 4.1.1.5), sent only after message 1's final reply and message 2's
    group: never inside another transaction. Message 3 then goes on the same
    session.
    """

    async def script(connection: Connection, _number: int) -> None:
        await first_then_next_envelope(connection)
        await connection.reply(
            b"250 2.0.0 queued 1",
            b"250 ok",
            b"550 5.1.1 no such user",
            b"554 5.5.1 no valid recipients",
        )
        assert (await connection.command()).upper() == b"RSET\r\n"
        await connection.reply(b"250 reset")
        await serve_until_quit(connection)

    server = await scripted(script)
    first, refused, third = await asyncio.wait_for(
        send_together(
            pool_for(server),
            envelope(1, "a@example.org"),
            envelope(2, "gone@example.org"),
            envelope(3, "c@example.org"),
        ),
        10,
    )  # the test's own guard against a hang
    assert (first.state, first.reply) == (State.SENT, "2.0.0 queued 1"), first
    assert (refused.state, refused.code, refused.reply) == (
        State.FAILED,
        550,
        "5.1.1 no such user",
    ), refused
    assert (third.state, third.attempts) == (State.SENT, 1), third
    (connection,) = server.connections
    assert verbs(connection) == [
        *(b"EHLO", b"MAIL", b"RCPT", b"DATA"),
        *(b"MAIL", b"RCPT", b"DATA", b"RSET"),
        *(b"MAIL", b"RCPT", b"DATA", b"QUIT"),
    ]
    assert connection.messages == [body(1), body(3)]


async def test_a_failed_connect_wakes_a_send_waiting_for_a_place_in_the_pool(
    raw: RawStarter,
) -> None:
    """[smtp] connections = 2: A has a session, B opens the second, C waits for a place.

    The server turns B's connection away (421 greeting, RFC 5321 3.8): B is
    deferred at its only attempt, and its place in the pool is free again, so
    C, waiting, opens a session of its own and is sent while A is still busy;
    C does not wait for A to finish (A's envelope is answered only after C is sent).
    """
    release = asyncio.Event()

    async def handler(connection: Connection, number: int) -> None:
        if number == 2:
            await connection.reply(b"421 4.7.0 too many connections")
            return
        await greet(connection)
        if number == 1:
            # A's envelope is answered only once C is sent: A holds its session,
            # and C, with no final dot to follow, can only have a session of its own.
            for _ in range(3):
                await connection.command()
            await release.wait()
            await connection.reply(b"250 ok", b"250 ok", b"354 go on")
            await connection.message()
            await connection.reply(b"250 2.0.0 queued 1")
        await serve_until_quit(connection)

    server = await raw(handler)
    transport = pool_for(server, connections=2, timeout=10)
    await transport.open()
    try:
        a, b, c = (
            asyncio.create_task(
                transport.send(envelope(row_id, f"r{row_id}@example.org"), attempts_allowed=1)
            )
            for row_id in (1, 2, 3)
        )
        # The test's own guards against a hang (the bug: C waits for A, which waits for C).
        c_result = await asyncio.wait_for(c, 5)
        release.set()
        a_result = await asyncio.wait_for(a, 5)
        b_result = await asyncio.wait_for(b, 5)
    finally:
        await transport.close()
    assert (c_result.state, c_result.attempts) == (State.SENT, 1), c_result
    assert a_result.state is State.SENT, a_result
    assert (b_result.state, b_result.code, b_result.attempts) == (
        State.DEFERRED,
        421,
        1,
    ), b_result
    assert len(server.connections) == 3
    assert [c.messages for c in server.connections] == [[body(1)], [], [body(3)]]


# What a randomized server does with a transaction, and the state it leaves the message in
# when it is the message's last attempt: sent, refused, deferred, or unknown (RFC 1047).
FUZZ_ENDINGS = {
    "mail421": State.DEFERRED,
    "rcpt550": State.FAILED,
    "rcpt451": State.DEFERRED,
    "data250": State.SENT,
    "data554": State.FAILED,
    "data451": State.DEFERRED,
    "data421": State.DEFERRED,
    "data-drop": State.UNKNOWN,
}
FUZZ_TRANSIENT = {"mail421", "rcpt451", "data451", "data421"}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_randomized_server_never_gets_a_message_twice_and_each_result_matches_it(
    raw: RawStarter, seed: int, pipelining: bool
) -> None:
    """A pool of 1 to 3 sessions against a server that refuses, defers, closes and drops.

    Each recipient's transactions get their fates from the seed, the recipient
    and the attempt (not from the order the sessions run in), so a seed is the
    same run every time. Invariants: never more sessions than [smtp]
    connections; a recipient is tried again only after a transient failure
    (never after a 250, a 5yz or a final reply lost: RFC 1047); the attempts
    counted are the transactions the server saw (a message whose envelope was
    chained behind one whose session then ended was not attempted); and the
    result is what the last one said.
    """
    settings = random.Random(seed)
    cap = settings.choice([1, 2, 3])
    count = settings.choice([5, 12, 25])
    seen: dict[str, list[str]] = collections.defaultdict(list)
    live = peak = 0

    def fate(recipient: str) -> tuple[str, str]:
        chance = random.Random(f"{seed}/{recipient}/{len(seen[recipient])}")
        envelope_fates = ["ok", "rcpt550", "mail421", "rcpt451"]
        dot_fates = ["250", "554", "451", "421", "drop", "slow"]
        return (
            chance.choices(envelope_fates, [85, 6, 3, 6])[0],
            chance.choices(dot_fates, [75, 5, 5, 5, 5, 5])[0],
        )

    async def transaction(connection: Connection) -> bool:
        """One MAIL's transaction (MAIL read already); False once the session is over."""
        if not pipelining:
            await connection.reply(b"250 ok")  # MAIL: its fate needs the recipient
        rcpt = await connection.command()
        recipient = rcpt.split(b"<")[1].split(b">")[0].decode()
        envelope_fate, dot_fate = fate(recipient)
        if envelope_fate != "ok":
            seen[recipient].append(envelope_fate)
        if envelope_fate == "mail421":
            # With PIPELINING the 421 answers MAIL; without, RCPT. Then the session ends.
            await connection.reply(b"421 4.3.2 closing")
            return False
        if envelope_fate in ("rcpt550", "rcpt451"):
            refusal = b"550 5.1.1 no such user" if envelope_fate == "rcpt550" else b"451 later"
            if pipelining:
                await connection.command()  # DATA
                await connection.reply(b"250 ok", refusal, b"554 5.5.1 no valid recipients")
            else:
                await connection.reply(refusal)
            return True
        if pipelining:
            await connection.command()  # DATA
            await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        else:
            await connection.reply(b"250 ok")
            await connection.command()  # DATA
            await connection.reply(b"354 go on")
        await connection.message()
        seen[recipient].append("data-drop" if dot_fate == "drop" else f"data{dot_fate}")
        if dot_fate == "drop":
            return False
        if dot_fate == "slow":
            await asyncio.sleep(random.Random(f"{seed}/{recipient}").random() * 0.05)
            seen[recipient][-1] = "data250"
        await connection.reply(
            {
                "554": b"554 5.7.1 spam",
                "451": b"451 4.3.0 try later",
                "421": b"421 4.3.2 closing",
            }.get(dot_fate, b"250 2.0.0 queued")
        )
        return dot_fate != "421"

    async def handler(connection: Connection, _number: int) -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            await connection.reply(GREETING.rstrip(b"\r\n"))
            await connection.command()  # EHLO
            await connection.reply((EHLO_PIPELINING if pipelining else EHLO_LOCK_STEP)[:-2])
            while True:
                command = (await connection.command()).upper()
                if command.startswith(b"QUIT"):
                    await connection.reply(b"221 bye")
                    return
                if command.startswith(b"RSET"):
                    await connection.reply(b"250 reset")
                    continue
                assert command.startswith(b"MAIL"), command
                if not await transaction(connection):
                    return
        finally:
            live -= 1

    server = await raw(handler)
    transport = pool_for(server, connections=cap)
    envelopes = [envelope(i, f"r{i}@example.org") for i in range(count)]
    try:
        await transport.open()
        # As the campaign does: no more sends at once than the transport has in flight.
        places = asyncio.Semaphore(transport.in_flight)

        async def send(item: Envelope) -> DeliveryResult:
            async with places:
                return await transport.send(item, attempts_allowed=3)

        # The test's own guard against a hang.
        results = await asyncio.wait_for(asyncio.gather(*(send(e) for e in envelopes)), 30)
    finally:
        await transport.close()
    assert peak <= cap, (peak, cap)
    problems: list[tuple[object, ...]] = []
    for result in results:
        events = seen[result.recipient]
        if not events:
            problems.append(("never reached the server", result))
            continue
        if any(event not in FUZZ_TRANSIENT for event in events[:-1]):
            problems.append(("tried again after a final answer", events, result))
        if len(events) != result.attempts or result.attempts > 3:
            problems.append(("attempts", events, result))
        if result.state is not FUZZ_ENDINGS[events[-1]]:
            problems.append(("result", events, result))
    assert not problems, (cap, count, problems)


# -- retries to a domain with its own pace, and a session left by both its senders -------


async def serve_greylisting_once(
    connection: Connection, greylisted: set[str], log: list[tuple[float, str]]
) -> None:
    """Answer transactions until QUIT; refuse each @slow.example recipient once with 451.

    Logs (time, recipient) as each group arrives. The refused group gets 554 to
    its DATA (RFC 2920 3.1: no valid recipients), and the client's RSET a 250.
    Each message's final reply takes 5 ms (a queue file written), so that a
    retry's backoff (tens of ms here) ends while the other messages still flow.
    """
    loop = asyncio.get_running_loop()
    while True:
        command = await connection.command()
        if command.upper().startswith(b"QUIT"):
            await connection.reply(b"221 bye")
            return
        if command.upper().startswith(b"RSET"):
            await connection.reply(b"250 reset")
            continue
        assert command.upper().startswith(b"MAIL"), command
        rcpt = await connection.command()
        await connection.command()  # DATA
        who = rcpt.split(b"<")[1].split(b">")[0].decode()
        log.append((loop.time(), who))
        if who.endswith("@slow.example") and who not in greylisted:
            greylisted.add(who)
            await connection.reply(b"250 ok", b"451 4.7.1 greylisted", b"554 no valid recipients")
            continue
        await connection.reply(b"250 ok", b"250 ok", b"354 go on")
        await connection.message()
        await asyncio.sleep(0.005)
        await connection.reply(b"250 2.0.0 queued")


async def greylisting_server(scripted: Starter) -> tuple[ScriptedServer, list[tuple[float, str]]]:
    """A scripted server that runs serve_greylisting_once; its log of (time, recipient)."""
    greylisted: set[str] = set()
    log: list[tuple[float, str]] = []

    async def script(connection: Connection, _number: int) -> None:
        await serve_greylisting_once(connection, greylisted, log)

    return await scripted(script), log


async def test_a_retry_waits_for_its_domains_pace_without_holding_a_session(
    scripted: Starter,
) -> None:
    """A retry to a domain with its own limit (0.5 a second) waits for that pace first.

    Only then does it take a session: waiting with the only session in hand
    ([smtp] connections = 1) would hold every other message back for 2 s.
    """
    server, log = await greylisting_server(scripted)
    limiter = RateLimiter(0, {"slow.example": 0.5})
    transport = pool_for(server, connections=1, timeout=10, limiter=limiter)
    await transport.open()
    loop = asyncio.get_running_loop()
    try:
        await limiter.acquire_domain("slow.example")  # the campaign's turn, for attempt 1
        start = loop.time()
        retried = asyncio.create_task(
            transport.send(envelope(1, "r@slow.example"), attempts_allowed=2)
        )
        await asyncio.sleep(0.3)  # refused once; its retry now waits for its domain's pace
        others = [
            asyncio.create_task(
                transport.send(envelope(i, f"o{i}@other.example"), attempts_allowed=1)
            )
            for i in range(2, 5)
        ]
        # The test's own guard against a hang.
        results = await asyncio.wait_for(asyncio.gather(retried, *others), 10)
    finally:
        await transport.close()
    assert [r.state for r in results] == [State.SENT] * 4, results
    assert results[0].attempts == 2
    first_other = min(at for at, who in log if who.endswith("@other.example")) - start
    # About 0.3 s; with the session held through the retry's 2 s pace, about 2.
    assert first_other < 1.0, f"the others waited {first_other:.2f} s for a retry's pace"


async def test_a_retry_to_a_limited_domain_is_not_left_behind_chained_messages(
    scripted: Starter,
) -> None:
    """A retry to a domain with a limit of its own goes out soon, not after the whole queue.

    [smtp] connections = 2 and as many workers as the campaign runs; the limit
    (1,000 a second) never holds anything back, but a paced message is never
    chained: it waited for an idle session, which steady chaining never leaves,
    and went out last of 200. Taking the domain's turn before looking for a
    session makes it a message like the others.
    """
    server, log = await greylisting_server(scripted)
    limiter = RateLimiter(0, {"slow.example": 1000})
    transport = pool_for(server, connections=2, timeout=10, limiter=limiter)
    await transport.open()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for row in range(1, 201):
        queue.put_nowait(row)
    results: dict[int, DeliveryResult] = {}

    async def worker() -> None:
        while not queue.empty():
            row = queue.get_nowait()
            to = "r@slow.example" if row == 1 else f"o{row}@other.example"
            results[row] = await transport.send(envelope(row, to), attempts_allowed=2)

    try:
        workers = (worker() for _ in range(transport.in_flight))
        await asyncio.wait_for(asyncio.gather(*workers), 30)  # the test's own guard
    finally:
        await transport.close()
    assert (results[1].state, results[1].attempts) == (State.SENT, 2), results[1]
    assert all(result.state is State.SENT for result in results.values())
    order = [who for _, who in log]
    retry_at = len(order) - 1 - order[::-1].index("r@slow.example")
    assert retry_at < 50, f"the retry went out as transaction {retry_at} of {len(order)}"


async def test_a_session_whose_two_senders_are_cancelled_leaves_the_pool(
    scripted: Starter,
) -> None:
    """B's final reply is pending and C rides behind it; C is cancelled, then B.

    Each leaves the session to the other while it lives; once it is dead
    (abandoned waits), whoever leaves last drops it, so the next send with
    [smtp] connections = 1 opens a new session instead of waiting for ever.
    """
    group_in = asyncio.Event()

    async def script(connection: Connection, number: int) -> None:
        if number == 1:
            await first_then_next_envelope(connection)
            group_in.set()
            await connection.reader.read()  # never answers; until the client closes
            return
        await serve_until_quit(connection)

    server = await scripted(script)
    transport = pool_for(server, connections=1, timeout=30)
    await transport.open()
    try:
        b = asyncio.create_task(transport.send(envelope(1, "b@example.org"), attempts_allowed=1))
        c = asyncio.create_task(transport.send(envelope(2, "c@example.org"), attempts_allowed=1))
        await asyncio.wait_for(group_in.wait(), 5)  # the test's own guard against a hang
        c.cancel()
        await asyncio.wait({c}, timeout=5)
        b.cancel()
        await asyncio.wait({b}, timeout=5)
        assert b.cancelled()
        assert c.cancelled()
        # The test's own guard against a hang (the bug: this send waited for ever).
        d = await asyncio.wait_for(
            transport.send(envelope(3, "d@example.org"), attempts_allowed=1), 5
        )
    finally:
        await transport.close()
    assert (d.state, d.attempts) == (State.SENT, 1), d
    assert len(server.connections) == 2
    assert server.connections[0].messages == [body(1)]  # B's data went; C's never did
    assert server.connections[1].messages == [body(3)]


async def test_under_a_rate_a_session_carries_one_message_at_a_time(scripted: Starter) -> None:
    """With a [sending] rate, nothing is chained, so a run keeps one message in flight a session.

    A chained message would go without waiting for its turn; and rows claimed
    for sends that cannot go would only wait (the crash bound stays 2 x).
    """

    async def script(connection: Connection, _number: int) -> None:
        await serve_until_quit(connection)

    server = await scripted(script)
    paced = pool_for(server, connections=2, limiter=RateLimiter(100, {}))
    free = pool_for(server, connections=2)
    for transport in (paced, free):
        await transport.open()
        await transport.close()
    assert (paced.in_flight, free.in_flight) == (2, 4)
