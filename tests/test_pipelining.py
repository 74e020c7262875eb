"""SMTP PIPELINING (RFC 2920) and the reply reader, against a server each test scripts.

aiosmtpd (tests/smtpd.py) answers every command as it reads it, so it cannot
show that a client sent DATA before it had MAIL's reply, nor misbehave in the
ways a broken server does. The small raw server here speaks just enough SMTP
to greet, and lets each test decide what the transaction gets back.
"""

from __future__ import annotations

import asyncio
import contextlib
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
