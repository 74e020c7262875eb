"""`remind`, what cron runs: follow-ups sent once when due, never late, never twice.

Time travel with `--now`: the appeal is sent for real (its rows' `sent` time is
now), then `remind --now` runs as of later moments. A real recording SMTP
server counts what arrives; overlapping runs are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from appeal_mailer import timezones
from appeal_mailer.campaign import CampaignRun
from appeal_mailer.config import load_settings
from appeal_mailer.errors import ConfigError, ServerError
from appeal_mailer.ledger import Ledger, _this_host, timestamp
from appeal_mailer.models import DeliveryResult, Envelope
from appeal_mailer.reminders import plan
from tests.conftest import TEMPLATES, CliRun, ConfigWriter, ListWriter
from tests.smtpd import RecordingServer
from tests.test_delivery import people, row_of, send, status

EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_TROUBLE = 0, 1, 2, 3
REMINDER = {"name": "reminder", "after": "3 days", "expires_after": "1 day"}


@pytest.fixture
def reminder_config(write_config: ConfigWriter) -> Path:
    return write_config(reminders=[REMINDER])


def remind(run_cli: CliRun, config: Path, at: datetime, *, quiet: bool = False) -> Result:
    """`[-q] remind --yes --now AT`."""
    loud = ("-q",) if quiet else ()
    return run_cli(*loud, "remind", "--yes", "--now", at.isoformat(), config=config)


def subjects_for(server: RecordingServer, email: str) -> list[str]:
    return [
        str(make_header(decode_header(message_from_bytes(received.data)["Subject"])))
        for received in server.received_for(email)
    ]


def steps_of(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(row["email"], row["step"]): row["state"] for row in report["recipients"]}


def test_nothing_is_sent_before_the_reminder_is_due(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Two days after the appeal, with `after = "3 days"`: nothing, silently, exit 0."""
    assert send(run_cli, write_list(people(4)), reminder_config).exit_code == EXIT_OK
    result = remind(run_cli, reminder_config, datetime.now(UTC) + timedelta(days=2), quiet=True)
    assert result.exit_code == EXIT_OK, result.output
    assert len(smtp_server.messages) == 4
    assert {step for _, step in steps_of(status(run_cli, reminder_config))} == {"appeal"}


def test_a_due_reminder_is_sent_once_and_a_second_run_sends_nothing(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Past `after`: each subscriber gets the reminder once; the same run again sends nothing."""
    rows = people(5)
    assert send(run_cli, write_list(rows), reminder_config).exit_code == EXIT_OK
    due = datetime.now(UTC) + timedelta(days=3, minutes=5)
    first = remind(run_cli, reminder_config, due)
    assert first.exit_code == EXIT_OK, first.output
    assert "5 sent" in first.output
    again = remind(run_cli, reminder_config, due)
    assert again.exit_code == EXIT_OK, again.output
    later = remind(run_cli, reminder_config, due + timedelta(hours=6))
    assert later.exit_code == EXIT_OK, later.output
    for row in rows:
        subjects = subjects_for(smtp_server, row["email"])
        assert len(subjects) == 2, subjects
        assert "has your fax reached" in subjects[1]
    report = status(run_cli, reminder_config)
    states = steps_of(report)
    assert {states[(row["email"], "reminder")] for row in rows} == {"sent"}
    # Its own Message-ID per step: a downstream duplicate check tells them apart.
    first_row = row_of(
        {"recipients": [r for r in report["recipients"] if r["step"] == "reminder"]},
        rows[0]["email"],
    )
    appeal_row = row_of(
        {"recipients": [r for r in report["recipients"] if r["step"] == "appeal"]},
        rows[0]["email"],
    )
    assert first_row["message_id"] != appeal_row["message_id"]
    assert ".reminder." in first_row["message_id"]


def test_a_reminder_due_too_long_ago_is_recorded_expired_and_never_sent(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Cron down for days: the stale reminder is `expired`, said once even with -q, never sent."""
    rows = people(3)
    assert send(run_cli, write_list(rows), reminder_config).exit_code == EXIT_OK
    stale = datetime.now(UTC) + timedelta(days=5)  # due at +3 days, expired after +4
    result = remind(run_cli, reminder_config, stale, quiet=True)
    assert result.exit_code == EXIT_OK, result.output
    assert "3 reminders came due too long ago and were recorded as expired" in result.output
    assert len(smtp_server.messages) == 3
    report = status(run_cli, reminder_config)
    reminder_rows = [row for row in report["recipients"] if row["step"] == "reminder"]
    assert {row["state"] for row in reminder_rows} == {"expired"}
    assert all("not sent late" in row["smtp_reply"] for row in reminder_rows)
    quiet_again = remind(run_cli, reminder_config, stale + timedelta(days=1), quiet=True)
    assert quiet_again.exit_code == EXIT_OK
    assert quiet_again.output == ""
    assert len(smtp_server.messages) == 3


def test_only_subscribers_whose_earlier_step_was_sent_get_the_reminder(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A failed appeal or an address suppressed since gets no reminder."""
    rows = people(4)
    failed, suppressed = rows[0]["email"], rows[1]["email"]
    smtp_server.fail_always(failed, "rcpt", "550 5.7.1 Refused by policy")
    assert send(run_cli, write_list(rows), reminder_config).exit_code == EXIT_TROUBLE
    added = run_cli("suppress", "add", suppressed, config=reminder_config)
    assert added.exit_code == EXIT_OK, added.output
    result = remind(run_cli, reminder_config, datetime.now(UTC) + timedelta(days=3, hours=1))
    assert result.exit_code == EXIT_OK, result.output
    assert subjects_for(smtp_server, failed) == []
    assert len(subjects_for(smtp_server, suppressed)) == 1  # the appeal, before suppression
    for row in rows[2:]:
        assert len(subjects_for(smtp_server, row["email"])) == 2
    states = steps_of(status(run_cli, reminder_config))
    assert (failed, "reminder") not in states
    assert states[(suppressed, "reminder")] == "suppressed"


def test_remind_retries_the_appeals_deferred_rows_when_due(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """A greylisted address left `deferred` by `send` is retried by the next `remind`."""
    config = write_config(
        sending={"attempts_per_run": 1, "retry_backoff": 60, "retry_max_delay": 120},
        reminders=[REMINDER],
    )
    rows = people(3)
    greylisted = rows[2]["email"]
    smtp_server.fail(greylisted, "rcpt", "451 4.7.1 Greylisted, try later")
    assert send(run_cli, write_list(rows), config).exit_code == EXIT_TROUBLE
    assert steps_of(status(run_cli, config))[(greylisted, "appeal")] == "deferred"
    too_soon = remind(run_cli, config, datetime.now(UTC) + timedelta(seconds=10))
    assert too_soon.exit_code == EXIT_OK, too_soon.output
    assert subjects_for(smtp_server, greylisted) == []
    due = remind(run_cli, config, datetime.now(UTC) + timedelta(minutes=10), quiet=True)
    assert due.exit_code == EXIT_OK, due.output
    assert due.output == ""
    assert len(subjects_for(smtp_server, greylisted)) == 1
    assert steps_of(status(run_cli, config))[(greylisted, "appeal")] == "sent"


def test_remind_dry_run_writes_what_is_due_and_sends_or_records_nothing(
    run_cli: CliRun,
    reminder_config: Path,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """A dry run previews due reminders (.eml, a folder per step); the ledger is unchanged."""
    assert send(run_cli, write_list(people(2)), reminder_config).exit_code == EXIT_OK
    out = tmp_path / "preview"
    at = (datetime.now(UTC) + timedelta(days=3, hours=1)).isoformat()
    result = run_cli("remind", "--dry-run", "--now", at, "--out", str(out), config=reminder_config)
    assert result.exit_code == EXIT_OK, result.output
    previews = sorted((out / "reminder").glob("*.eml"))
    assert len(previews) == 2
    message = message_from_bytes(previews[0].read_bytes())
    assert "has your fax reached" in str(make_header(decode_header(message["Subject"])))
    assert len(smtp_server.messages) == 2
    assert {step for _, step in steps_of(status(run_cli, reminder_config))} == {"appeal"}


def test_remind_outside_a_terminal_without_yes_is_a_usage_error(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Nobody can answer the question: say to pass --yes, and send nothing."""
    assert send(run_cli, write_list(people(2)), reminder_config).exit_code == EXIT_OK
    at = (datetime.now(UTC) + timedelta(days=3, hours=1)).isoformat()
    result = run_cli("remind", "--now", at, config=reminder_config)
    assert result.exit_code == EXIT_USAGE
    assert "--yes" in result.output
    assert len(smtp_server.messages) == 2


def test_a_now_that_is_not_a_moment_is_a_usage_error(run_cli: CliRun) -> None:
    result = run_cli("remind", "--yes", "--now", "next tuesday")
    assert result.exit_code == EXIT_USAGE
    assert "ISO 8601" in result.output


def test_a_reminder_that_follows_another_reminder_waits_for_that_one(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """A chain: the second follow-up is due `after` the first was sent, not the appeal."""
    config = write_config(
        reminders=[
            REMINDER,
            {
                "name": "last-call",
                "template": "reminder",
                "after_step": "reminder",
                "after": "2 days",
                "expires_after": "3 days",
            },
        ]
    )
    rows = people(2)
    assert send(run_cli, write_list(rows), config).exit_code == EXIT_OK
    # The appeal went out 3 days and an hour ago (its rows' sent time, moved back).
    earlier = (datetime.now(UTC) - timedelta(days=3, hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db, db:
        db.execute("UPDATE deliveries SET updated_at = ? WHERE step = 'appeal'", (earlier,))
    # Now the first reminder is due, and is sent now.
    assert remind(run_cli, config, datetime.now(UTC)).exit_code == EXIT_OK
    assert len(smtp_server.messages) == 4
    # A day later "last-call" would be due after the appeal (3 days + 1 day > 2 days),
    # but it follows the reminder, sent a day before: not yet.
    assert remind(run_cli, config, datetime.now(UTC) + timedelta(days=1)).exit_code == EXIT_OK
    assert len(smtp_server.messages) == 4
    at = datetime.now(UTC) + timedelta(days=2, hours=1)
    assert remind(run_cli, config, at).exit_code == EXIT_OK
    assert len(smtp_server.messages) == 6
    states = steps_of(status(run_cli, config))
    assert {states[(row["email"], "last-call")] for row in rows} == {"sent"}


def test_two_overlapping_remind_processes_send_each_reminder_once(
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    run_cli: CliRun,
    tmp_path: Path,
) -> None:
    """cron started a second `remind` while the first was still sending: nobody gets two."""
    rows = people(300)
    config = write_config(smtp={"connections": 3}, sending={"rate": 150}, reminders=[REMINDER])
    assert send(run_cli, write_list(rows), config).exit_code == EXIT_OK
    at = (datetime.now(UTC) + timedelta(days=3, hours=1)).isoformat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    command = [
        sys.executable, "-m", "appeal_mailer", "--config", str(config), "-q",
        "remind", "--yes", "--now", at,
    ]  # fmt: skip
    processes = [
        subprocess.Popen(  # our own interpreter and module
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    reminders = {row["email"]: len(subjects_for(smtp_server, row["email"])) - 1 for row in rows}
    assert set(reminders.values()) == {1}, {k: v for k, v in reminders.items() if v != 1}
    states = steps_of(status(run_cli, config))
    assert {states[(row["email"], "reminder")] for row in rows} == {"sent"}
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        runs = db.execute(
            "SELECT started_at, finished_at FROM runs WHERE command = 'remind' ORDER BY id"
        ).fetchall()
    (_, first_end), (second_start, _) = runs
    assert second_start < first_end, "the two runs did not overlap"


# -- send windows ------------------------------------------------------------------------

NINE_TO_EIGHT = (time(9), time(20))
EVERY_DAY = frozenset(range(7))
WEEKDAYS = frozenset(range(5))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "tz", "days", "opening"),
    [
        # Inside the window: send now.
        ("2026-12-01T12:00", "Europe/London", EVERY_DAY, None),
        # Before it opens: today at 09:00 local.
        ("2026-12-01T07:30", "Europe/London", EVERY_DAY, "2026-12-01T09:00"),
        # After it closed: tomorrow.
        ("2026-12-01T20:00", "Europe/London", EVERY_DAY, "2026-12-02T09:00"),
        # Friday night, weekdays only: Monday.
        ("2026-12-04T21:00", "Europe/London", WEEKDAYS, "2026-12-07T09:00"),
        # The night before the clocks go forward (29 March 2026): 09:00 BST is 08:00 UTC.
        ("2026-03-28T21:00", "Europe/London", EVERY_DAY, "2026-03-29T08:00"),
        # The night before they go back (25 October 2026): 09:00 GMT is 09:00 UTC again.
        ("2026-10-24T21:00", "Europe/London", EVERY_DAY, "2026-10-25T09:00"),
        # Almaty is UTC+5 all year: 08:00 there is before 09:00; it opens at 04:00 UTC.
        ("2026-12-01T03:00", "Asia/Almaty", EVERY_DAY, "2026-12-01T04:00"),
        ("2026-12-01T10:00", "Asia/Almaty", EVERY_DAY, None),
        ("2026-12-01T15:00", "Asia/Almaty", EVERY_DAY, "2026-12-02T04:00"),
    ],
)
def test_the_send_window_opens_at_local_hours_across_dst(
    moment: str, tz: str, days: frozenset[int], opening: str | None
) -> None:
    """When a message outside the window may go: the next local opening, in UTC."""
    found = timezones.window_opening(utc(moment), tz, *NINE_TO_EIGHT, days)
    assert found == (None if opening is None else utc(opening))


def test_a_window_past_midnight_is_open_until_it_closes_the_next_day() -> None:
    """ "22:00-06:00": open late at night and early in the morning, closed in between."""
    night = (time(22), time(6))
    assert timezones.window_opening(utc("2026-12-01T23:00"), "UTC", *night, EVERY_DAY) is None
    assert timezones.window_opening(utc("2026-12-02T05:00"), "UTC", *night, EVERY_DAY) is None
    found = timezones.window_opening(utc("2026-12-02T07:00"), "UTC", *night, EVERY_DAY)
    assert found == utc("2026-12-02T22:00")


def test_a_window_opening_in_the_spring_forward_gap_opens_after_the_gap() -> None:
    """01:30 does not exist in London on 29 March 2026: the window opens at 02:30 BST."""
    found = timezones.window_opening(
        utc("2026-03-28T23:00"), "Europe/London", time(1, 30), time(3), EVERY_DAY
    )
    assert found == utc("2026-03-29T01:30")
    assert found.astimezone(timezones.zone("Europe/London")).hour == 2


def test_outside_the_window_a_message_waits_and_the_next_remind_sends_it(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """`send` holds a subscriber whose local time is outside the window; exit 0, said once.

    The window opens two hours from now in UTC. A subscriber in UTC+3 is inside it
    now and gets the appeal at once; one in UTC waits, `pending` with the opening as
    its next attempt. A `remind` before then sends nothing; one after, sends it.
    """
    now = datetime.now(UTC)
    opens = (now + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    closes = opens + timedelta(hours=2)
    window = f"{opens:%H:%M}-{closes:%H:%M}"
    config = write_config(sending={"window": window}, reminders=[REMINDER])
    inside, waiting = "east@example.org", "london@example.org"
    rows = [
        {"email": inside, "name": "East", "timezone": "Etc/GMT-3"},  # UTC+3 (POSIX sign)
        {"email": waiting, "name": "West", "timezone": "UTC"},
    ]
    result = send(run_cli, write_list(rows), config)
    assert result.exit_code == EXIT_OK, result.output
    assert "1 messages wait for their subscribers' send window" in result.output
    assert smtp_server.recipients() == [inside]
    row = row_of(status(run_cli, config), waiting)
    assert row["state"] == "pending"
    assert row["smtp_reply"].startswith("outside the send window: held until")
    early = remind(run_cli, config, opens - timedelta(minutes=30), quiet=True)
    assert early.exit_code == EXIT_OK, early.output
    assert smtp_server.recipients() == [inside]
    on_time = remind(run_cli, config, opens + timedelta(minutes=1), quiet=True)
    assert on_time.exit_code == EXIT_OK, on_time.output
    assert on_time.output == ""
    assert smtp_server.recipients() == [inside, waiting]
    assert row_of(status(run_cli, config), waiting)["state"] == "sent"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("3 days", 259200), ("36h", 129600), ("1 day 12 hours", 129600), ("90 minutes", 5400)],
)
def test_reminder_durations_are_read_as_people_write_them(
    write_config: ConfigWriter, written: str, seconds: int
) -> None:
    settings = load_settings(write_config(reminders=[{**REMINDER, "after": written}]))
    assert settings.reminders[0].after.total_seconds() == seconds


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            {"reminders": [REMINDER, {**REMINDER, "name": "x", "after": "soonish"}]},
            "[[reminders]] #2 after",
            "is not a duration",
        ),
        ({"reminders": [REMINDER, REMINDER]}, "", "two reminders named 'reminder'"),
        ({"reminders": [{**REMINDER, "name": "appeal"}]}, "", "give the reminder its own name"),
        ({"sending": {"window": "9 to 5"}}, "[sending] window", "must look like '09:00-20:00'"),
        ({"sending": {"weekdays": ["mon", "funday"]}}, "[sending] weekdays", "must be some of"),
    ],
)
def test_a_bad_reminder_or_window_is_a_config_error_naming_the_key(
    write_config: ConfigWriter, overrides: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(**overrides))
    assert message in str(caught.value)
    assert key in str(caught.value)


def test_a_reminder_due_at_night_waits_for_the_morning_across_the_dst_change(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """Due on Saturday 27 March 2027, 21:00 UTC: London waits until 09:00 BST, Almaty 09:00.

    The clocks go forward in London that night, so its window opens at 08:00 UTC;
    Almaty (UTC+5, no DST) opens at 04:00 UTC. Each is held until then, not before.
    """
    due = utc("2027-03-27T21:00")
    after = due - datetime.now(UTC) - timedelta(hours=1)  # due an hour before `due`
    london, almaty = "london@example.org", "almaty@example.org"
    rows = [
        {"email": london, "name": "L", "timezone": "Europe/London"},
        {"email": almaty, "name": "A", "timezone": "Asia/Almaty"},
    ]
    # The appeal goes out now, with no window; then the config gets one (same file).
    plain = write_config(reminders=[{**REMINDER, "after": after.total_seconds()}])
    assert send(run_cli, write_list(rows), plain).exit_code == EXIT_OK
    config = write_config(
        sending={"window": "09:00-20:00"},
        reminders=[{**REMINDER, "after": after.total_seconds(), "expires_after": "30 days"}],
    )
    sent_first = len(smtp_server.messages)
    assert remind(run_cli, config, due, quiet=True).exit_code == EXIT_OK
    assert len(smtp_server.messages) == sent_first
    report = status(run_cli, config)
    held = {r["email"]: r for r in report["recipients"] if r["step"] == "reminder"}
    assert {r["state"] for r in held.values()} == {"pending"}
    assert "held until Sun 2027-03-28 09:00 Europe/London" in held[london]["smtp_reply"]
    assert "held until Sun 2027-03-28 09:00 Asia/Almaty" in held[almaty]["smtp_reply"]

    def reminded() -> set[str]:
        return {
            email
            for email in (london, almaty)
            if any("has your fax reached" in s for s in subjects_for(smtp_server, email))
        }

    for moment, expected in [
        ("2027-03-28T03:59", set()),
        ("2027-03-28T04:01", {almaty}),
        ("2027-03-28T07:59", {almaty}),  # 08:59 BST in London
        ("2027-03-28T08:01", {almaty, london}),
    ]:
        assert remind(run_cli, config, utc(moment), quiet=True).exit_code == EXIT_OK
        assert reminded() == expected, moment
    assert len(smtp_server.messages) == sent_first + 2


# -- what a review found: each of these failed before its fix ----------------------------


def test_a_reminder_deferred_then_overdue_expires_instead_of_going_out_late(
    run_cli: CliRun, reminder_config: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Deferred by a 451 when it was due, a week later it is expired, not sent."""
    rows = people(3)
    assert send(run_cli, write_list(rows), reminder_config).exit_code == EXIT_OK
    due = datetime.now(UTC) + timedelta(days=3, minutes=5)
    for row in rows:
        smtp_server.fail_always(row["email"], "rcpt", "451 4.3.0 Try later")
    assert remind(run_cli, reminder_config, due).exit_code == EXIT_TROUBLE
    smtp_server.clear_faults()
    late = remind(run_cli, reminder_config, due + timedelta(days=7), quiet=True)
    assert late.exit_code == EXIT_OK, late.output
    assert "3 reminders came due too long ago" in late.output
    for row in rows:
        assert len(subjects_for(smtp_server, row["email"])) == 1  # the appeal only
    states = steps_of(status(run_cli, reminder_config))
    assert {states[(row["email"], "reminder")] for row in rows} == {"expired"}


class _ServerGoneTransport:
    """A transport whose server went away after the run began: every send is a ServerError."""

    description = "a server that went away"
    connections = 1
    in_flight = 1

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, envelope: Envelope, *, attempts_allowed: int) -> DeliveryResult:
        raise ServerError("connection refused", host="127.0.0.1", port=1, transient=True)


def test_a_retry_cut_short_by_a_server_outage_is_retried_by_the_next_remind(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """A deferred appeal that `remind` could not retry (server gone) stays due for the next.

    The row goes back to `pending` unsent, and keeps the time it was due at, so
    that `remind` (which leaves a step's never-tried pending rows to `send`) finds
    it again.
    """
    config = write_config(sending={"attempts_per_run": 1, "retry_backoff": 60})
    rows = people(2)
    for row in rows:
        smtp_server.fail(row["email"], "rcpt", "451 4.3.0 Try later")
    assert send(run_cli, write_list(rows), config).exit_code == EXIT_TROUBLE
    later = datetime.now(UTC) + timedelta(hours=1)
    settings = load_settings(config)
    ledger = Ledger.open(settings.ledger_url)
    try:
        [step] = plan(settings, ledger.steps(settings.campaign.id), later)
        run = CampaignRun(
            settings,
            ledger,
            _ServerGoneTransport(),
            template=step.template,
            remind=step,
            now=later,
        )
        report = asyncio.run(run.run(run.prepare()))
    finally:
        ledger.close()
    assert report.stopped is not None
    after_outage = {row["email"]: row for row in status(run_cli, config)["recipients"]}
    assert "pending" in {row["state"] for row in after_outage.values()}
    again = remind(run_cli, config, later + timedelta(minutes=5), quiet=True)
    assert again.exit_code == EXIT_OK, again.output
    assert sorted(smtp_server.recipients()) == sorted(row["email"] for row in rows)


def test_a_killed_reminds_sending_rows_are_recovered_by_the_next_remind(
    run_cli: CliRun,
    reminder_config: Path,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """kill -9 mid-step: the next `remind` marks its row `unknown`, even with nothing due."""
    rows = people(3)
    assert send(run_cli, write_list(rows), reminder_config).exit_code == EXIT_OK
    due = datetime.now(UTC) + timedelta(days=3, minutes=5)
    assert remind(run_cli, reminder_config, due).exit_code == EXIT_OK
    # As a killed `remind` leaves it: its run unfinished, its process gone, a row `sending`.
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db, db:
        stamp = timestamp()
        dead = db.execute(
            "INSERT INTO runs (campaign, step, command, started_at, heartbeat_at, host, pid)"
            " VALUES ('test-campaign', 'reminder', 'remind', ?, ?, ?, ?)",
            (stamp, stamp, _this_host(), _dead_pid()),
        ).lastrowid
        db.execute(
            "UPDATE deliveries SET state = 'sending', claimed_by = ?"
            " WHERE step = 'reminder' AND email = ?",
            (dead, rows[0]["email"]),
        )
    result = remind(run_cli, reminder_config, due + timedelta(hours=1), quiet=True)
    assert result.exit_code == EXIT_TROUBLE
    assert "1 messages were being sent when an earlier run stopped" in result.output
    assert steps_of(status(run_cli, reminder_config))[(rows[0]["email"], "reminder")] == "unknown"


def test_a_step_whose_template_is_gone_does_not_stop_the_reminders(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """An old step (a draft sent once, its template since deleted) is skipped when nothing is due.

    And a step that cannot run is named in the error while the others still run.
    """
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    shutil.copy(folder / "appeal.txt.j2", folder / "draft.txt.j2")
    config = write_config(campaign={"templates": str(folder)}, reminders=[REMINDER])
    rows = people(2)
    assert send(run_cli, write_list(rows), config).exit_code == EXIT_OK
    draft = run_cli(
        "send", str(write_list(rows[:1])), "--template", "draft", "--yes", config=config
    )
    assert draft.exit_code == EXIT_OK, draft.output
    (folder / "draft.txt.j2").unlink()
    due = datetime.now(UTC) + timedelta(days=3, minutes=5)
    result = remind(run_cli, config, due, quiet=True)
    assert result.exit_code == EXIT_OK, result.output
    for row in rows:
        assert any("has your fax reached" in s for s in subjects_for(smtp_server, row["email"]))
    # The reminder's template gone too: that step fails, by name; the exit status says so.
    (folder / "reminder.txt.j2").unlink()
    more = people(3)[2:]
    assert send(run_cli, write_list(rows + more), config).exit_code == EXIT_OK
    broken = remind(run_cli, config, due + timedelta(hours=1), quiet=True)
    assert broken.exit_code == EXIT_STOPPED
    assert "error: remind test-campaign/reminder:" in broken.output


def _dead_pid() -> int:
    """A pid no process has: a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # our interpreter
    child.wait()
    return child.pid
