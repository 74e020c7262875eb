"""Delivery against a real SMTP server: retries, faults, TLS, AUTH, pace, and the ledger.

Every test talks to the recording aiosmtpd server of `tests/smtpd.py`, with
and without PIPELINING; nothing mocks aiosmtplib. Most drive the CLI and check
both what it says and what the server received; a few use `SMTPTransport` or
`RateLimiter` directly where a whole run is too coarse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from appeal_mailer.config import SendingSettings, SmtpSettings
from appeal_mailer.errors import LedgerError
from appeal_mailer.ledger import Ledger
from appeal_mailer.models import Envelope, State
from appeal_mailer.ratelimit import RateLimiter
from appeal_mailer.transport import SMTPTransport
from tests.conftest import CliRun, ConfigWriter, ListWriter
from tests.smtpd import DROP, DROP_AFTER_DATA, STALL, Received, RecordingServer

EXIT_OK, EXIT_STOPPED, EXIT_TROUBLE = 0, 1, 3
TlsServer = Callable[..., tuple[RecordingServer, Path]]


# -- helpers -------------------------------------------------------------------------


def people(
    count: int, domain: str = "example.org", prefix: str = "member"
) -> list[dict[str, str]]:
    return [
        {"email": f"{prefix}{i}@{domain}", "name": f"Member {i}", "organization": "Branch 7"}
        for i in range(count)
    ]


def send(run_cli: CliRun, list_path: Path, config: Path | None = None) -> Result:
    return run_cli("send", str(list_path), "--yes", config=config)


def status(run_cli: CliRun, config: Path | None = None) -> dict[str, Any]:
    result = run_cli("status", "--format", "json", config=config)
    assert result.exit_code == EXIT_OK, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def row_of(report: dict[str, Any], email: str) -> dict[str, Any]:
    rows = [row for row in report["recipients"] if row["email"] == email]
    assert len(rows) == 1, f"{email}: {len(rows)} ledger rows in {report['recipients']}"
    return rows[0]


def crash_bound(server: RecordingServer, connections: int, *, rate: float) -> int:
    """Rows a run may hold `sending` at once, so at most unknown after a crash.

    Per session, each message in flight and one claimed next: with PIPELINING and
    no [sending] rate two are in flight (the next one's envelope follows the data
    of the one before); under a rate nothing is chained.
    """
    return (3 if server.pipelining and rate == 0 else 2) * connections


def assert_each_once(server: RecordingServer, emails: list[str]) -> None:
    counts = server.count_by_recipient()
    assert {email: counts[email] for email in emails} == dict.fromkeys(emails, 1)


@pytest.fixture(params=["pipelining", "lock-step"])
def smtp_server(request: pytest.FixtureRequest) -> Iterator[RecordingServer]:
    """The recording server, saying PIPELINING (RFC 2920) in its EHLO reply or not.

    Every delivery test runs against both: a pipelining client sends MAIL, RCPT
    and DATA as one group, otherwise one at a time, and both must behave alike.
    """
    server = RecordingServer(pipelining=request.param == "pipelining").start()
    yield server
    server.stop()


@pytest.fixture
def tls_server(
    write_config: ConfigWriter, server_tls_context: ssl.SSLContext, ca_file: Path
) -> Iterator[TlsServer]:
    """Start a TLS recording server and write a config for it; every server stops afterwards.

    `tls_server("starttls" | "tls", trusted=..., credentials=..., **smtp)` returns the
    server and the config path; `trusted=False` leaves out ca_file.
    """
    started: list[RecordingServer] = []

    def start(
        security: str = "starttls",
        *,
        trusted: bool = True,
        credentials: tuple[str, str] | None = None,
        **smtp: Any,
    ) -> tuple[RecordingServer, Path]:
        context = "starttls_context" if security == "starttls" else "implicit_tls_context"
        server = RecordingServer(**{context: server_tls_context}, credentials=credentials)
        started.append(server.start())
        section = {"host": server.host, "port": server.port, "security": security, **smtp}
        if trusted:
            section["ca_file"] = str(ca_file)
        return server, write_config(smtp=section)

    yield start
    for server in started:
        server.stop()


def smtp_settings(server: RecordingServer, **overrides: Any) -> SmtpSettings:
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "security": "none",
        "timeout": 5.0,
        "connections": 1,
    }
    return SmtpSettings(**{**values, **overrides})


def sending_settings(**overrides: Any) -> SendingSettings:
    values: dict[str, Any] = {
        "rate": 0,
        "max_attempts": 5,
        "attempts_per_run": 3,
        "retry_backoff": 0.01,
        "retry_max_delay": 0.05,
    }
    return SendingSettings(**{**values, **overrides})


def envelope(row_id: int, recipient: str) -> Envelope:
    data = (
        f"From: appeal@example.org\r\nTo: {recipient}\r\nSubject: test {row_id}\r\n"
        f"Message-ID: <{row_id}@test.example.org>\r\n\r\n"
        ".a line that starts with a dot\r\nbody\r\n"
    ).encode()
    return Envelope(row_id, "appeal@example.org", recipient, f"<{row_id}@test.example.org>", data)


# -- retries -----------------------------------------------------------------------------


def test_451_on_rcpt_is_retried_and_delivered_once(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A 451 on RCPT is retried and delivered once."""
    rows = people(3)
    smtp_server.fail("member1@example.org", "rcpt", "451 4.7.1 Greylisted, try later")
    result = send(run_cli, write_list(rows))
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    assert smtp_server.rcpt_attempts["member1@example.org"] == 2
    row = row_of(status(run_cli), "member1@example.org")
    assert row["state"] == "sent"
    assert row["attempts"] == 2


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_421_is_retried_on_a_new_connection_and_delivered_once(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer, stage: str
) -> None:
    """A 421 (the server closing the session) at RCPT or DATA is retried on a new session."""
    smtp_server.fail("member0@example.org", stage, "421 4.3.2 Shutting down")
    result = send(run_cli, write_list(people(1)))
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, ["member0@example.org"])
    assert smtp_server.rcpt_attempts["member0@example.org"] == 2
    (message,) = smtp_server.received_for("member0@example.org")
    # The session that said 421 is closed, so the copy came on a later one.
    assert message.session > 1
    assert row_of(status(run_cli), "member0@example.org")["state"] == "sent"


def test_550_on_rcpt_fails_that_recipient_once_and_delivers_the_others(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A 550 on RCPT is never retried: failed with the server's reply; the others are sent."""
    rows = people(4)
    refused = "member2@example.org"
    smtp_server.fail_always(refused, "rcpt", "550 5.1.1 No such user here")
    result = send(run_cli, write_list(rows))
    assert result.exit_code == EXIT_TROUBLE, result.output
    assert refused in result.output
    assert "550 5.1.1 No such user here" in result.output
    assert smtp_server.rcpt_attempts[refused] == 1
    assert refused not in smtp_server.recipients()
    assert_each_once(smtp_server, [r["email"] for r in rows if r["email"] != refused])
    report = status(run_cli)
    row = row_of(report, refused)
    assert (row["state"], row["attempts"], row["smtp_code"]) == ("failed", 1, 550)
    assert "No such user here" in row["smtp_reply"]
    assert report["counts"] == {"sent": 3, "failed": 1}


def test_transient_failure_outlasting_a_run_is_deferred_then_sent_by_the_next_run(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A 4xx outlasting attempts_per_run leaves the row deferred; the next `send` sends it once."""
    rows = people(3)
    slow = "member1@example.org"
    list_path = write_list(rows)
    smtp_server.fail_always(slow, "rcpt", "451 4.3.0 Mailbox busy")
    first = send(run_cli, list_path)
    assert first.exit_code == EXIT_TROUBLE, first.output
    assert slow in first.output
    assert smtp_server.rcpt_attempts[slow] == 3  # attempts_per_run
    assert slow not in smtp_server.recipients()
    row = row_of(status(run_cli), slow)
    assert (row["state"], row["attempts"], row["smtp_code"]) == ("deferred", 3, 451)

    smtp_server.clear_faults(slow)
    time.sleep(0.1)  # past next_attempt_at: retry delays are capped at 0.05 s
    second = send(run_cli, list_path)
    assert second.exit_code == EXIT_OK, second.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    row = row_of(status(run_cli), slow)
    assert (row["state"], row["attempts"]) == ("sent", 4)


def test_transient_failure_turns_failed_after_max_attempts(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A row deferred again and again becomes failed once max_attempts are used, never more."""
    list_path = write_list(people(2))
    stuck = "member0@example.org"
    smtp_server.fail_always(stuck, "rcpt", "451 4.3.0 Mailbox busy")
    assert send(run_cli, list_path).exit_code == EXIT_TROUBLE
    time.sleep(0.1)
    second = send(run_cli, list_path)
    assert second.exit_code == EXIT_TROUBLE, second.output
    row = row_of(status(run_cli), stuck)
    assert (row["state"], row["attempts"], row["smtp_code"]) == ("failed", 5, 451)
    assert smtp_server.rcpt_attempts[stuck] == 5  # max_attempts, over two runs

    time.sleep(0.1)
    third = send(run_cli, list_path)
    assert third.exit_code == EXIT_TROUBLE, third.output
    assert smtp_server.rcpt_attempts[stuck] == 5
    assert stuck not in smtp_server.recipients()
    assert_each_once(smtp_server, ["member1@example.org"])


# -- broken connections ------------------------------------------------------------------


def test_connection_dropped_at_rcpt_is_recovered_and_everyone_gets_one_copy(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A connection dropped at RCPT is retried on a new one; every recipient gets one copy."""
    rows = people(8)
    smtp_server.fail("member3@example.org", "rcpt", DROP)
    smtp_server.fail("member6@example.org", "rcpt", DROP)
    result = send(run_cli, write_list(rows))
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    assert len(smtp_server.messages) == len(rows)
    assert smtp_server.rcpt_attempts["member3@example.org"] == 2
    assert status(run_cli)["counts"] == {"sent": 8}


def test_drop_after_the_final_dot_is_unknown_and_never_resent(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A connection lost after the final dot leaves the row unknown; no `send` resends it."""
    rows = people(3)
    lost = "member1@example.org"
    list_path = write_list(rows)
    smtp_server.fail(lost, "data", DROP_AFTER_DATA)
    first = send(run_cli, list_path)
    assert first.exit_code == EXIT_TROUBLE, first.output
    assert lost in first.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    report = status(run_cli)
    assert row_of(report, lost)["state"] == "unknown"
    assert report["counts"] == {"sent": 2, "unknown": 1}
    table = run_cli("status")
    assert f"unknown  {lost}" in table.output

    second = send(run_cli, list_path)
    assert second.exit_code == EXIT_TROUBLE, second.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    assert row_of(status(run_cli), lost)["state"] == "unknown"


def test_stall_after_the_final_dot_times_out_as_unknown_and_is_not_resent(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """No reply after the final dot within the timeout: unknown, not resent."""
    config = write_config(smtp={"timeout": 0.5})
    stalled = "member0@example.org"
    list_path = write_list(people(2))
    smtp_server.fail(stalled, "data", STALL)
    first = send(run_cli, list_path, config)
    assert first.exit_code == EXIT_TROUBLE, first.output
    assert row_of(status(run_cli, config), stalled)["state"] == "unknown"
    assert smtp_server.rcpt_attempts[stalled] == 1

    second = send(run_cli, list_path, config)
    assert second.exit_code == EXIT_TROUBLE, second.output
    assert smtp_server.rcpt_attempts[stalled] == 1
    assert stalled not in smtp_server.recipients()
    assert_each_once(smtp_server, ["member1@example.org"])


def test_stall_at_rcpt_times_out_and_is_retried(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """No reply to RCPT within the timeout is transient: retried and delivered once."""
    config = write_config(smtp={"timeout": 0.5})
    smtp_server.fail("member0@example.org", "rcpt", STALL)
    result = send(run_cli, write_list(people(2)), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, ["member0@example.org", "member1@example.org"])
    assert smtp_server.rcpt_attempts["member0@example.org"] == 2
    row = row_of(status(run_cli, config), "member0@example.org")
    assert (row["state"], row["attempts"]) == ("sent", 2)


@pytest.mark.parametrize(
    "reply", ["550 5.4.5 Daily sending quota exceeded", "553 5.7.1 Sender address rejected"]
)
def test_5xx_to_mail_from_stops_the_run_and_fails_no_recipient(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer, reply: str
) -> None:
    """A 5xx to MAIL FROM refuses the sender, not a recipient: the run stops, all rows stay due."""
    smtp_server.fail_always("appeal@example.org", "mail", reply)
    list_path = write_list(people(5))
    result = send(run_cli, list_path)
    assert result.exit_code == EXIT_STOPPED, result.output
    assert reply in result.output
    assert "hint: check [campaign] from" in result.output
    assert "refused the sender appeal@example.org" in result.output
    assert smtp_server.messages == []
    report = status(run_cli)
    assert report["counts"] == {"pending": 5}

    smtp_server.clear_faults()
    again = send(run_cli, list_path)
    assert again.exit_code == EXIT_OK, again.output
    assert_each_once(smtp_server, [r["email"] for r in people(5)])


async def test_a_session_closed_while_idle_is_replaced_without_using_an_attempt(
    smtp_server: RecordingServer,
) -> None:
    """A pooled session the server closed while idle is replaced: no attempt used, no slow-down."""
    limiter = RateLimiter(10, {})
    transport = SMTPTransport(smtp_settings(smtp_server), sending_settings(rate=10), limiter)
    await transport.open()
    try:
        first = await transport.send(envelope(1, "first@example.org"), attempts_allowed=1)
        assert smtp_server.close_sessions() == 1
        await asyncio.sleep(0.05)  # the client sees the close while the session is idle
        second = await transport.send(envelope(2, "second@example.org"), attempts_allowed=1)
    finally:
        await transport.close()
    assert (first.state, second.state) == (State.SENT, State.SENT), second
    assert second.attempts == 1
    assert limiter.current_rate == 10
    assert smtp_server.count_by_recipient() == {"first@example.org": 1, "second@example.org": 1}


# -- TLS and AUTH ------------------------------------------------------------------------------


def test_starttls_with_a_trusted_certificate_delivers_over_tls(
    run_cli: CliRun, write_list: ListWriter, tls_server: TlsServer
) -> None:
    """With security = 'starttls' and the CA in ca_file, every message arrives over TLS."""
    server, config = tls_server("starttls")
    rows = people(3)
    result = send(run_cli, write_list(rows), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(server, [r["email"] for r in rows])
    assert all(message.tls for message in server.messages)
    used = [session for session in server.sessions if session.messages]
    assert used
    assert all(session.tls for session in used)


def test_starttls_required_but_not_offered_stops_before_sending(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    ca_file: Path,
) -> None:
    """security = 'starttls' against a server without STARTTLS: exit 1, nothing sent in clear."""
    config = write_config(smtp={"security": "starttls", "ca_file": str(ca_file)})
    result = send(run_cli, write_list(people(2)), config)
    assert result.exit_code == EXIT_STOPPED, result.output
    assert "does not offer STARTTLS" in result.output
    assert smtp_server.messages == []
    assert smtp_server.rcpt_attempts == {}


def test_implicit_tls_delivers(
    run_cli: CliRun, write_list: ListWriter, tls_server: TlsServer
) -> None:
    """security = 'tls' (TLS from the first byte, port 465 style) delivers over TLS."""
    server, config = tls_server("tls")
    rows = people(2)
    result = send(run_cli, write_list(rows), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(server, [r["email"] for r in rows])
    assert all(message.tls for message in server.messages)


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_untrusted_certificate_stops_before_sending(
    run_cli: CliRun, write_list: ListWriter, tls_server: TlsServer, security: str
) -> None:
    """A certificate from an unknown CA (no ca_file): exit 1, says so, nothing sent."""
    server, config = tls_server(security, trusted=False)
    result = send(run_cli, write_list(people(2)), config)
    assert result.exit_code == EXIT_STOPPED, result.output
    assert "certificate is not trusted" in result.output
    assert "ca_file" in result.output  # the hint says what to do
    assert server.messages == []
    assert server.rcpt_attempts == {}


def test_auth_with_the_password_from_the_environment_delivers_as_that_user(
    run_cli: CliRun,
    write_list: ListWriter,
    tls_server: TlsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AUTH with username from the config and password from the environment: sent as that user."""
    server, config = tls_server(credentials=("user", "secret"), username="user")
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", "secret")
    rows = people(2)
    result = send(run_cli, write_list(rows), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(server, [r["email"] for r in rows])
    assert [m.login for m in server.messages] == ["user", "user"]
    assert all(m.tls for m in server.messages)
    assert "secret" not in result.output


def test_auth_refused_stops_before_sending_and_never_shows_the_password(
    run_cli: CliRun,
    write_list: ListWriter,
    tls_server: TlsServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password: exit 1, "AUTH refused" with a hint, nothing sent, password never shown."""
    server, config = tls_server(credentials=("user", "secret"), username="user")
    wrong = "Wr0ng-pa55word"
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", wrong)
    result = send(run_cli, write_list(people(2)), config)
    assert result.exit_code == EXIT_STOPPED, result.output
    assert "AUTH refused" in result.output
    assert "hint:" in result.output
    assert "APPEAL_MAILER_SMTP__PASSWORD" in result.output
    assert server.messages == []
    assert server.rcpt_attempts == {}
    assert wrong not in result.output
    assert wrong not in caplog.text
    assert wrong not in json.dumps(status(run_cli, config))


def test_server_requiring_auth_without_a_username_stops_the_run_and_fails_no_recipient(
    run_cli: CliRun, write_list: ListWriter, tls_server: TlsServer
) -> None:
    """A server that wants AUTH while no username is set: the run stops; no row is failed."""
    server, config = tls_server(credentials=("user", "secret"))
    result = send(run_cli, write_list(people(3)), config)
    assert result.exit_code == EXIT_STOPPED, result.output
    assert "530" in result.output
    assert "[smtp] username" in result.output
    assert server.messages == []
    assert status(run_cli, config)["counts"] == {"pending": 3}


# -- pace -------------------------------------------------------------------------------------


def test_global_rate_holds(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """rate = 20 messages/s: 20 messages take at least ~0.95 s (19 gaps of 50 ms)."""
    config = write_config(sending={"rate": 20})
    list_path = write_list(people(20))
    started = time.monotonic()
    result = send(run_cli, list_path, config)
    elapsed = time.monotonic() - started
    assert result.exit_code == EXIT_OK, result.output
    assert len(smtp_server.messages) == 20
    assert elapsed >= 0.9
    arrivals = [m.received_at for m in smtp_server.messages]
    assert arrivals[-1] - arrivals[0] >= 0.85


def arrivals(server: RecordingServer, domain: str) -> list[float]:
    """When the messages to `domain` and its subdomains arrived, in order."""

    def within(address: str) -> bool:
        host = address.rpartition("@")[2]
        return host == domain or host.endswith("." + domain)

    return sorted(m.received_at for m in server.messages if within(m.rcpt_tos[0]))


def test_domain_limit_spaces_that_domains_messages(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """A per-domain limit (and its subdomains) spaces that domain's messages; all are delivered."""
    config = write_config(sending={"rate": 0, "domain_limits": {"slow.example": 4}})
    slow = people(3, "slow.example", "s") + people(2, "mx.slow.example", "sub")
    fast = people(10, "fast.example", "f")
    result = send(run_cli, write_list(slow + fast), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in slow + fast])
    limited = arrivals(smtp_server, "slow.example")
    assert len(limited) == 5
    # Five messages at 4/s: four gaps of 0.25 s.
    assert limited[-1] - limited[0] >= 0.9


def test_domain_limit_does_not_hold_back_other_domains(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """Other domains go out while a limited domain waits for its next slot."""
    config = write_config(sending={"rate": 0, "domain_limits": {"slow.example": 2}})
    slow = people(3, "slow.example", "s")  # more than the two connections
    fast = people(6, "fast.example", "f")
    result = send(run_cli, write_list(slow + fast), config)
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in slow + fast])
    slow_at, fast_at = arrivals(smtp_server, "slow.example"), arrivals(smtp_server, "fast.example")
    assert slow_at[1] - slow_at[0] >= 0.45
    # Ordering, not a time limit: the second slow message may not leave for 0.5 s,
    # and nothing but the slow domain's limit should hold the fast ones back.
    assert fast_at[-1] < slow_at[1]


def test_burst_of_451_slows_the_run_but_delivers_everyone_once(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """A burst of 451s slows the run down instead of failing it: all delivered once, exit 0."""
    config = write_config(sending={"rate": 10})
    rows = people(8)
    for row in rows:
        smtp_server.fail(row["email"], "rcpt", "451 4.7.0 Too many messages, slow down")
    started = time.monotonic()
    result = send(run_cli, write_list(rows), config)
    elapsed = time.monotonic() - started
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    assert status(run_cli, config)["counts"] == {"sent": 8}
    # At the configured 10/s the 16 attempts need at least 1.5 s; halved after the
    # burst's third 451, the rest go at 5/s or slower, which needs well over 2 s.
    assert elapsed >= 2.0


def test_rate_limiter_slow_down_lowers_the_pace() -> None:
    """A burst of slow_down() calls halves the current rate; it never goes to zero."""
    limiter = RateLimiter(20, {})
    assert limiter.current_rate == 20
    for _ in range(3):
        limiter.slow_down()
    assert limiter.current_rate == 10
    for _ in range(50):
        limiter.slow_down()
    assert limiter.current_rate > 0


def test_a_single_transient_reply_does_not_slow_the_run() -> None:
    """One 451 is about one recipient (greylisting): the pace stays; a burst halves it."""
    limiter = RateLimiter(20, {})
    limiter.slow_down()
    limiter.slow_down()
    assert limiter.current_rate == 20
    limiter.slow_down()
    assert limiter.current_rate == 10


async def test_transport_slows_down_after_451s(smtp_server: RecordingServer) -> None:
    """After 451 replies the transport's limiter runs slower than configured; mail still goes."""
    limiter = RateLimiter(50, {})
    transport = SMTPTransport(smtp_settings(smtp_server), sending_settings(rate=50), limiter)
    for i in range(3):
        smtp_server.fail(f"busy{i}@example.org", "rcpt", "451 4.7.0 Slow down")
    await transport.open()
    try:
        results = [
            await transport.send(envelope(i, f"busy{i}@example.org"), attempts_allowed=3)
            for i in range(3)
        ]
    finally:
        await transport.close()
    assert [r.state for r in results] == [State.SENT] * 3
    assert [r.attempts for r in results] == [2, 2, 2]
    assert limiter.current_rate < 50
    assert smtp_server.count_by_recipient() == {f"busy{i}@example.org": 1 for i in range(3)}


# -- what reaches the wire -----------------------------------------------------------------------


def test_crlf_in_a_list_field_never_reaches_a_header_or_the_envelope(
    run_cli: CliRun, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """A CR/LF in a name or address skips the row (reported by line); no Bcc reaches the server."""
    list_path = tmp_path / "injected.csv"
    list_path.write_bytes(
        b"email,name\r\n"
        b"anna@example.org,Anna\r\n"
        b'eve@example.org,"Eve\r\nBcc: victim@example.org"\r\n'
        b'"mallory@example.org\r\nRCPT TO:<victim2@example.org>",Mallory\r\n'
        b"boris@example.org,Boris\r\n"
    )
    result = send(run_cli, list_path)
    assert result.exit_code == EXIT_OK, result.output
    assert "line 3" in result.output
    assert "line 5" in result.output
    assert sorted(smtp_server.recipients()) == ["anna@example.org", "boris@example.org"]
    assert not any(b"bcc" in m.data.lower() for m in smtp_server.messages)
    assert not any(b"victim@example.org" in m.data for m in smtp_server.messages)
    assert not any(b"victim2@example.org" in m.data for m in smtp_server.messages)
    assert not any(a.startswith(("eve", "mallory", "victim")) for a in smtp_server.rcpt_attempts)
    emails = {row["email"] for row in status(run_cli)["recipients"]}
    assert emails == {"anna@example.org", "boris@example.org"}


async def test_transport_dot_stuffs_a_line_starting_with_a_dot(
    smtp_server: RecordingServer,
) -> None:
    """A body line starting with "." arrives intact (RFC 5321 4.5.2 transparency)."""
    transport = SMTPTransport(smtp_settings(smtp_server), sending_settings(), RateLimiter(0, {}))
    await transport.open()
    try:
        result = await transport.send(envelope(1, "dot@example.org"), attempts_allowed=1)
    finally:
        await transport.close()
    assert result.state is State.SENT
    (message,) = smtp_server.messages
    assert b"\r\n.a line that starts with a dot\r\n" in message.data


# -- sessions and resume -------------------------------------------------------------------------


def test_connections_are_reused(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """30 messages over connections = 2 use at most two sessions, not one per message."""
    rows = people(30)
    result = send(run_cli, write_list(rows))
    assert result.exit_code == EXIT_OK, result.output
    assert_each_once(smtp_server, [r["email"] for r in rows])
    assert smtp_server.connections <= 2
    assert sum(s.messages for s in smtp_server.sessions) == 30


def test_a_row_is_sending_before_its_data_and_only_rows_in_flight_are(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """Each row is durably `sending` when its DATA arrives, and only rows in flight are `sending`.

    A crash turns every `sending` row into `unknown`, never re-sent: claiming the
    whole list ahead of the pace would lose everyone not yet mailed.
    """
    connections = 2
    config = write_config(smtp={"connections": connections}, sending={"rate": 20})
    ledger = tmp_path / "ledger.db"
    seen: list[tuple[str, int]] = []

    def look(message: Received) -> None:
        # A separate connection: sees only what the run has committed.
        with contextlib.closing(sqlite3.connect(ledger)) as db:
            (state,) = db.execute(
                "SELECT state FROM deliveries WHERE email = ?", (message.rcpt_tos[0],)
            ).fetchone()
            (sending,) = db.execute(
                "SELECT count(*) FROM deliveries WHERE state = 'sending'"
            ).fetchone()
        seen.append((state, sending))

    smtp_server.on_data = look
    result = send(run_cli, write_list(people(20)), config)
    assert result.exit_code == EXIT_OK, result.output
    assert len(seen) == 20
    assert {state for state, _ in seen} == {"sending"}
    # Per session: those in flight and one claimed next. Claiming the whole list
    # ahead of the pace would show about 20 here.
    assert max(sending for _, sending in seen) <= crash_bound(smtp_server, connections, rate=20)


@pytest.mark.usefixtures("ledger_in_this_process")
def test_results_and_next_claims_share_commits_and_never_exceed_the_bound(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Group commit: a result and the claim its place goes to ride in one commit, within bounds.

    A place is given back as soon as its row's result is on its way to the ledger,
    to a claim committed with that result or after it. So after every commit the
    ledger holds at most the crash bound of rows `sending` (what a crash could
    leave unknown: 3 x connections with PIPELINING, else 2 x), and commits do
    carry results and claims together.
    """
    connections = 4
    config = write_config(smtp={"connections": connections}, sending={"rate": 0})
    commits: list[tuple[int, int, int]] = []  # (results, claims, rows `sending` after)
    write_group = Ledger.write_group

    def counted(self: Ledger, *args: Any, **kwargs: Any) -> tuple[list[int], list[int]]:
        out = write_group(self, *args, **kwargs)
        results = args[0] if args else kwargs.get("results", ())
        sending = self.counts("test-campaign").get("sending", 0)
        commits.append((len(results), len(kwargs.get("claim", ())), sending))
        return out

    monkeypatch.setattr(Ledger, "write_group", counted)
    result = send(run_cli, write_list(people(200)), config)
    assert result.exit_code == EXIT_OK, result.output
    assert sum(results for results, _, _ in commits) == 200
    assert sum(claims for _, claims, _ in commits) == 200
    assert max(sending for _, _, sending in commits) <= crash_bound(
        smtp_server, connections, rate=0
    )
    assert any(results and claims for results, claims, _ in commits)
    assert commits[-1][2] == 0


def test_rerunning_a_finished_campaign_sends_nothing(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """`send` again after everything was sent sends nothing and exits 0."""
    rows = people(5)
    list_path = write_list(rows)
    assert send(run_cli, list_path).exit_code == EXIT_OK
    assert len(smtp_server.messages) == 5
    again = send(run_cli, list_path)
    assert again.exit_code == EXIT_OK, again.output
    assert len(smtp_server.messages) == 5
    assert sum(smtp_server.rcpt_attempts.values()) == 5
    assert status(run_cli)["counts"] == {"sent": 5}


@pytest.mark.usefixtures("ledger_in_this_process")
def test_a_failed_claim_commit_stops_the_run_instead_of_hanging(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: RecordingServer,
) -> None:
    """The first claim's commit fails (a locked or full disk): the run ends with the error.

    Every place is held by a claim waiting for its commit; the failed claim must
    give its places back, or the run would wait for them for ever.
    """
    config = write_config(smtp={"connections": 2}, sending={"rate": 0})
    write_group = Ledger.write_group

    def failing(self: Ledger, *args: Any, **kwargs: Any) -> tuple[list[int], list[int]]:
        if kwargs.get("claim"):
            raise LedgerError("database is locked", location=self.location)
        return write_group(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "write_group", failing)
    result = send(run_cli, write_list(people(40)), config)  # pytest's timeout: a hang fails
    assert result.exit_code != EXIT_OK
    assert "database is locked" in result.output
    assert smtp_server.messages == []
    monkeypatch.setattr(Ledger, "write_group", write_group)
    assert status(run_cli, config)["counts"] == {"pending": 40}


@pytest.mark.usefixtures("ledger_in_this_process")
def test_after_a_failed_commit_nothing_more_is_written_and_the_bound_holds(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A ledger commit that fails stops the run, and no later claim is committed.

    The failed commit's results stay `sending` (their fate is not durable); a
    claim committed after them would hold places that those rows still hold, so
    a crash could leave more rows unknown than the crash bound. The run stops
    with the ledger error, and the next run finds at most that many rows unknown.
    """
    connections = 2
    config = write_config(smtp={"connections": connections}, sending={"rate": 0})
    write_group = Ledger.write_group
    calls: list[str] = []

    def failing(self: Ledger, *args: Any, **kwargs: Any) -> tuple[list[int], list[int]]:
        results = args[0] if args else ()
        if results and "failed" not in calls and len(calls) >= 6:
            calls.append("failed")
            raise LedgerError("disk I/O error", location=self.location)
        calls.append("written")
        return write_group(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "write_group", failing)
    result = send(run_cli, write_list(people(60)), config)
    assert result.exit_code != EXIT_OK
    assert "disk I/O error" in result.output
    assert "failed" in calls
    assert calls[calls.index("failed") + 1 :] == []
    monkeypatch.setattr(Ledger, "write_group", write_group)
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        (sending,) = db.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'sending'"
        ).fetchone()
    assert 1 <= sending <= crash_bound(smtp_server, connections, rate=0)
