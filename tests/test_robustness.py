"""What happens when things go wrong mid-run: failing parts, overlapping runs, odd settings."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appeal_mailer.campaign import CampaignRun
from appeal_mailer.config import load_settings
from appeal_mailer.errors import ConfigError, LedgerError, TemplateError
from appeal_mailer.ledger import Durability, Ledger, runs, timestamp
from appeal_mailer.models import DeliveryResult, Envelope, Recipient, State
from appeal_mailer.ratelimit import RateLimiter
from appeal_mailer.transport import SMTPTransport
from tests.conftest import ROOT, CliRun, ConfigWriter, ListWriter
from tests.smtpd import RecordingServer
from tests.test_delivery import envelope, sending_settings, smtp_settings


class _BrokenTransport:
    """A test transport that delivers, then fails with a bug on its third message."""

    description = "broken test transport"
    connections = 2
    in_flight = 2

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.crashed = 0

    async def open(self) -> None:
        return None

    async def send(self, envelope: Envelope, *, attempts_allowed: int) -> DeliveryResult:
        await asyncio.sleep(0.01)
        if len(self.delivered) == 2:
            self.crashed += 1
            raise RuntimeError("a bug in a transport")
        self.delivered.append(envelope.recipient)
        return DeliveryResult(envelope.row_id, envelope.recipient, State.SENT, 1, 250, "OK")

    async def close(self) -> None:
        return None


def test_a_failing_part_stops_the_run_and_leaves_no_row_sending(
    config_file: Path, write_list: ListWriter, subscribers: list[dict[str, str]]
) -> None:
    """A bug mid-run stops the run: rows it hit are unknown, none is left `sending`."""
    settings = load_settings(config_file)
    ledger = Ledger.open(settings.ledger_url)
    transport = _BrokenTransport()
    run = CampaignRun(
        settings, ledger, transport, template="appeal", list_path=write_list(subscribers)
    )
    report = asyncio.run(run.run(run.prepare()))
    counts = ledger.counts(settings.campaign.id)
    ledger.close()
    assert report.stopped is not None
    assert "a bug in a transport" in report.stopped
    assert "sending" not in counts
    # Each message in flight when the bug struck is unknown; no other row is.
    assert 1 <= transport.crashed <= transport.connections
    assert counts.get("unknown") == transport.crashed
    assert counts.get("sent") == len(transport.delivered) == 2
    assert sum(counts.values()) == len(subscribers)
    assert report.trouble


def test_overlapping_domain_limits_send_each_message_once(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """Limits for example.net and mail.example.net do not make a message go out twice."""
    config = write_config(
        sending={"domain_limits": {"example.net": 100.0, "mail.example.net": 100.0}}
    )
    emails = ["x@mail.example.net", "y@example.net", "z@other.example.org", "w@example.net"]
    result = run_cli(
        "send", str(write_list([{"email": e} for e in emails])), "--yes", config=config
    )
    assert result.exit_code == 0, result.output
    assert smtp_server.count_by_recipient() == dict.fromkeys(emails, 1)


def test_a_run_does_not_take_over_the_rows_of_a_live_overlapping_run(tmp_path: Path) -> None:
    """Rows `sending` by a run with a fresh heartbeat stay; a dead run's become unknown."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    people = [Recipient(email=f"p{i}@example.org", line=i + 2) for i in range(4)]
    alive = ledger.start_run("c", "appeal", "send")
    ledger.load("c", "appeal", alive, [(p, f"<{i}@x>") for i, p in enumerate(people)])
    claimed, _ = ledger.claim([1, 2], alive)
    assert claimed == [1, 2]
    assert ledger.recover_interrupted("c", "appeal") == 0
    assert ledger.counts("c") == {"sending": 2, "pending": 2}
    # The same run, silent for longer than STALE_AFTER: dead.
    with ledger._write() as conn:
        long_ago = timestamp(datetime.now(UTC) - timedelta(minutes=10))
        conn.execute(runs.update().where(runs.c.id == alive).values(heartbeat_at=long_ago))
    assert ledger.recover_interrupted("c", "appeal") == 2
    assert ledger.counts("c") == {"unknown": 2, "pending": 2}
    ledger.close()


async def test_one_greylisted_recipient_does_not_slow_the_run(
    smtp_server: RecordingServer,
) -> None:
    """Three 451s for one recipient are one push-back, not a burst: the pace stays."""
    limiter = RateLimiter(50, {})
    transport = SMTPTransport(smtp_settings(smtp_server), sending_settings(rate=50), limiter)
    smtp_server.fail("grey@example.org", "rcpt", "451 4.7.1 Greylisted", "451 4.7.1 Greylisted")
    await transport.open()
    try:
        result = await transport.send(envelope(1, "grey@example.org"), attempts_allowed=3)
    finally:
        await transport.close()
    assert result.state is State.SENT
    assert result.attempts == 3
    assert limiter.current_rate == 50


def test_quiet_clean_run_prints_nothing(
    run_cli: CliRun, write_list: ListWriter, subscribers: list[dict[str, str]]
) -> None:
    """With -q a run where all went well prints nothing, so cron mails only trouble."""
    result = run_cli("-q", "send", str(write_list(subscribers)), "--yes")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_quiet_run_with_trouble_still_prints_the_summary(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """With -q a run with a failure still prints its summary (and exits 3)."""
    smtp_server.fail_always("gone@example.org", "rcpt", "550 5.1.1 No such user")
    result = run_cli("-q", "send", str(write_list([{"email": "gone@example.org"}])), "--yes")
    assert result.exit_code == 3
    assert "gone@example.org" in result.stdout


def test_a_non_ascii_unsubscribe_url_is_refused_at_load(
    write_config: ConfigWriter,
) -> None:
    """An unsubscribe URL must be ASCII (it goes into a header): refused, naming the key."""
    config = write_config(campaign={"unsubscribe_url": "https://пример.рф/unsubscribe"})
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "[campaign]" in str(caught.value)
    assert "ASCII" in str(caught.value)


def test_a_malformed_ledger_url_is_a_ledger_error() -> None:
    """A broken [ledger] url gives a clear error, not a traceback, and no password."""
    with pytest.raises(LedgerError) as caught:
        Ledger.open("postgresql://user:secret@host:54x/db")
    assert "secret" not in str(caught.value)


def test_an_unwritable_preview_folder_is_a_clear_error(
    run_cli: CliRun, write_list: ListWriter, subscribers: list[dict[str, str]], tmp_path: Path
) -> None:
    """`--out` where a file stands: exit 1 with the folder named, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    result = run_cli(
        "send", str(write_list(subscribers)), "--dry-run", "--out", str(blocker / "sub")
    )
    assert result.exit_code == 1
    assert "cannot write the preview" in result.output


def test_a_very_long_address_gets_a_preview_file(
    run_cli: CliRun, write_list: ListWriter, tmp_path: Path
) -> None:
    """A valid 64+63-character address still gets an .eml with a name the disk accepts."""
    address = "a" * 64 + "@" + "b" * 63 + ".example.org"
    out = tmp_path / "p"
    result = run_cli("send", str(write_list([{"email": address}])), "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    [eml] = list(out.glob("*.eml"))
    assert len(eml.name) < 255


def test_the_wheel_carries_the_init_example(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not an editable install) includes what `init` writes."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = list(tmp_path.glob("appeal_mailer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "appeal_mailer/skeleton/config.toml",
        "appeal_mailer/skeleton/lists/example.csv",
        "appeal_mailer/skeleton/templates/appeal.txt.j2",
        "appeal_mailer/py.typed",
    ):
        assert name in names


def test_resend_unknown_sends_again_with_the_same_message_id(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """An unknown row is not re-sent by a plain `send`; `--resend-unknown` sends it, same ID."""
    smtp_server.fail("lost@example.org", "data", "drop-after-data")
    path = write_list([{"email": "lost@example.org"}, {"email": "fine@example.org"}])
    first = run_cli("send", str(path), "--yes")
    assert first.exit_code == 3
    assert "--resend-unknown" in first.output
    assert run_cli("send", str(path), "--yes").exit_code == 3
    assert smtp_server.count_by_recipient()["lost@example.org"] == 1
    again = run_cli("send", str(path), "--yes", "--resend-unknown")
    assert again.exit_code == 0, again.output
    copies = [m for m in smtp_server.messages if m.rcpt_tos == ["lost@example.org"]]
    assert len(copies) == 2
    ids = {
        line
        for message in copies
        for line in message.data.split(b"\r\n")
        if line.startswith(b"Message-ID:")
    }
    assert len(ids) == 1
    assert smtp_server.count_by_recipient()["fine@example.org"] == 1


@pytest.mark.parametrize(("durability", "expected"), [("power", 2), ("crash", 1)])
def test_durability_setting_chooses_how_sqlite_flushes(
    tmp_path: Path, durability: Durability, expected: int
) -> None:
    """durability = "power" flushes every commit (FULL); "crash" relies on the OS (NORMAL)."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}", durability=durability)
    with ledger._read() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    ledger.close()


def test_a_deferred_row_is_not_retried_before_it_is_due(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """A deferred row waits for its next attempt time: a `send` before then leaves it alone."""
    busy = "busy@example.org"
    smtp_server.fail(busy, "rcpt", "451 4.3.0 Mailbox busy")
    path = write_list([{"email": busy}, {"email": "ok@example.org"}])
    # One attempt per run, so the first run's backoff is never slept.
    config = write_config(
        sending={"retry_backoff": 600.0, "retry_max_delay": 3600.0, "attempts_per_run": 1}
    )
    first = run_cli("send", str(path), "--yes", config=config)
    assert first.exit_code == 3, first.output
    assert smtp_server.rcpt_attempts[busy] == 1
    second = run_cli("send", str(path), "--yes", config=config)
    assert second.exit_code == 3, second.output
    assert smtp_server.rcpt_attempts[busy] == 1
    status = json.loads(run_cli("status", "--format", "json", config=config).output)
    [row] = [r for r in status["recipients"] if r["email"] == busy]
    assert row["state"] == "deferred"
    assert row["attempts"] == 1


def test_a_run_sends_to_the_list_as_it_was_checked_even_if_the_file_changes(
    config_file: Path, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """The pre-flight pass keeps the recipients it checked; the run sends to exactly those.

    The list file is rewritten between the check (and the moderator's "yes") and
    the sending: an address added afterwards was never checked and gets nothing,
    and the corrected name is not used either (the check saw the old one).
    """
    settings = load_settings(config_file)
    list_path = write_list(
        [{"email": "anna@example.org", "name": "Anna"}, {"email": "boris@example.org"}]
    )
    ledger = Ledger.open(settings.ledger_url)
    limiter = RateLimiter(0, {})
    run = CampaignRun(
        settings,
        ledger,
        SMTPTransport(settings.smtp, settings.sending, limiter),
        template="protest",
        list_path=list_path,
        pace=limiter,
    )
    try:
        preflight = run.prepare()
        list_path.write_text(
            "email,name\nanna@example.org,Hanna\nboris@example.org,\nzoe@example.org,Zoe\n",
            encoding="utf-8",
        )
        report = asyncio.run(run.run(preflight))
    finally:
        ledger.close()
    assert report.sent == 2
    assert sorted(smtp_server.recipients()) == ["anna@example.org", "boris@example.org"]
    anna = smtp_server.received_for("anna@example.org")[0].data.decode()
    assert "Anna" in anna
    assert "Hanna" not in anna


def test_a_shared_text_found_personal_late_has_everyone_checked_again(
    write_config: ConfigWriter, write_list: ListWriter, tmp_path: Path
) -> None:
    """A message first taken for shared, found personal at the 500th check, is checked anew.

    The template tests the unsubscribe URL with a plain string's `in` (C code the
    probe cannot see): for the 501st recipient it says "ok", and for the 101st it
    uses a field that does not exist. Recipients 21 to 500 were only checked
    against the shared text; when the 501st differs, the whole list is checked
    again, each on their own, and the 101st stops the pre-flight pass, naming its
    line: it must not be found only once sending has begun.
    """
    (tmp_path / "t").mkdir()
    for partial in ROOT.joinpath("templates").glob("_*"):
        (tmp_path / "t" / partial.name).write_bytes(partial.read_bytes())
    people = [{"email": f"member{i:04d}@example.org"} for i in range(501)]
    config = write_config(
        campaign={
            "templates": str(tmp_path / "t"),
            "unsubscribe_url": "https://lists.example.org/unsubscribe?e={email}",
        }
    )
    settings = load_settings(config)
    ledger = Ledger.open(settings.ledger_url)
    try:

        def make_run() -> CampaignRun:
            return CampaignRun(
                settings,
                ledger,
                SMTPTransport(settings.smtp, settings.sending, RateLimiter(0, {})),
                template="late",
                list_path=write_list(people),
            )

        (tmp_path / "t" / "late.txt.j2").write_text("Subject: S\n\nplaceholder\n")
        url = make_run().builder.unsubscribe_urls
        (tmp_path / "t" / "late.txt.j2").write_text(
            "Subject: S\n\n"
            f"{{% if unsubscribe_url in '{url('member0500@example.org')[0]}' %}}ok"
            f"{{% elif unsubscribe_url in '{url('member0100@example.org')[0]}' %}}"
            "{{ recipient.no_such_field }}{% endif %}\n"
        )
        with pytest.raises(TemplateError) as caught:
            make_run().prepare()
    finally:
        ledger.close()
    assert caught.value.recipient == "member0100@example.org"
    assert caught.value.recipient_line == 102
