"""The do-not-mail list: the `suppress` commands, hard bounces, and the check at send time."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appeal_mailer.bounces import mailbox_gone
from appeal_mailer.errors import LedgerError, ListError
from appeal_mailer.ledger import DueScope, Ledger
from appeal_mailer.lists import AddressLine, normalize_address, read_addresses
from appeal_mailer.models import DeliveryResult, Recipient, State
from tests.conftest import CliRun, ConfigWriter, ListWriter
from tests.smtpd import Received, RecordingServer

# The server CI and every developer machine have (trust auth), as in test_ledger.py.
POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# No single wait below may take longer: a stuck child fails the test, never hangs it.
DEADLINE = 120.0


def _suppressions(run_cli: CliRun) -> dict[str, dict[str, str]]:
    """`suppress list --format json`, keyed by address."""
    result = run_cli("suppress", "list", "--format", "json")
    assert result.exit_code == 0, result.output
    return {row["email"]: row for row in json.loads(result.output)["suppressions"]}


def _status(run_cli: CliRun, *args: str) -> dict[str, object]:
    result = run_cli("status", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    status: dict[str, object] = json.loads(result.output)
    return status


def _states(status: dict[str, object]) -> dict[str, str]:
    rows = status["recipients"]
    assert isinstance(rows, list)
    return {row["email"]: row["state"] for row in rows}


# -- which replies mean "no such mailbox" ---------------------------------------------


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        # Postfix, Gmail (multi-line), Exchange-style: RFC 3463 5.1.1.
        (550, "5.1.1 <gone@example.org>: Recipient address rejected: User unknown"),
        (550, "5.1.1 The email account that you tried to reach does not exist.\n5.1.1 Try"),
        (550, "5.1.1 <sender@example.org>: Recipient address rejected: User unknown"),
        (553, "5.1.0 Address rejected"),
        # RFC 7505 null MX: 556 5.1.10, or the bare 556 of RFC 7504.
        (550, "5.1.10 Recipient address has null MX"),
        (556, "5.1.10 Recipient address has null MX"),
        (556, "Domain does not accept mail"),
        # No enhanced code, or the generic X.0.0: the words decide.
        (550, "No Such User Here"),
        (550, "Requested action not taken: mailbox unavailable"),
        (551, "User unknown; please try <other@example.net>"),
        (553, "sorry, that mailbox does not exist"),
        (550, "5.0.0 <gone@example.org>... User unknown"),
    ],
)
def test_a_reply_saying_the_mailbox_does_not_exist_is_a_hard_bounce(code: int, reply: str) -> None:
    """5.1.1, 5.1.0, 5.1.10, 556, and 550/551/553 saying "user unknown": the mailbox is gone."""
    assert mailbox_gone(code, reply)


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (552, "5.2.2 Mailbox full"),
        (550, "5.2.2 Quota exceeded"),
        (550, "5.7.1 Message rejected as spam"),
        (550, "5.7.1 <a@example.org>: Recipient address rejected: user unknown, policy"),
        (554, "5.7.1 Relay access denied"),
        (550, "5.1.2 Host unknown"),
        (550, "Mailbox unavailable: over quota"),
        (550, "Requested action not taken: mailbox unavailable (blocked)"),
        (554, "Transaction failed"),
        # About our sender, refused at RCPT time (Postfix with smtpd_delay_reject).
        (550, "5.1.0 <appeal@example.org>: Sender address rejected: User unknown"),
        (550, "Sender address rejected: user unknown in local recipient table"),
        # Transient, or no reply at all.
        (450, "4.1.1 User unknown (try later)"),
        (451, "mailbox unavailable"),
        (None, None),
        (550, None),
    ],
)
def test_quota_policy_sender_and_other_failures_are_not_hard_bounces(
    code: int | None, reply: str | None
) -> None:
    """Mailbox full, policy (5.7.x), a refused sender, other 5xx and any 4xx leave the address."""
    assert not mailbox_gone(code, reply)


# -- addresses: the list's rule ------------------------------------------------------


def test_addresses_are_normalized_by_the_same_rule_as_lists(tmp_path: Path) -> None:
    """normalize_address trims, lower-cases and IDNA-encodes, and refuses what a list refuses."""
    assert normalize_address("  Ann.Smith@Example.ORG ") == "ann.smith@example.org"
    assert normalize_address("user@пример.рф") == "user@xn--e1afmkfd.xn--p1ai"
    for bad, why in [
        ("nobody", "invalid address"),
        ("", "empty"),
        ("a@example.org\n", "control character"),
        ("用户@example.org", "SMTPUTF8"),
    ]:
        with pytest.raises(ValueError, match=why):
            normalize_address(bad)


def test_a_file_is_read_as_a_stream(tmp_path: Path) -> None:
    """The first address comes before a broken line further down is read."""
    path = tmp_path / "big.txt"
    with path.open("wb") as handle:
        handle.writelines(f"member{i}@example.org\n".encode() for i in range(20_000))
        handle.write(b"caf\xe9@example.org\n")
    stream = read_addresses(path)
    first = next(stream)
    assert first == AddressLine(1, "member0@example.org")
    with pytest.raises(ListError) as excinfo:
        for _ in stream:
            pass
    assert excinfo.value.line == 20_001


# -- suppress add | remove | list ---------------------------------------------------------


def test_add_normalizes_the_address_and_keeps_reason_source_and_date(run_cli: CliRun) -> None:
    """`suppress add " Ann@Example.ORG " --reason ...` stores ann@example.org, manual, dated."""
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    result = run_cli("suppress", "add", " Ann@Example.ORG ", "--reason", "left the union")
    assert result.exit_code == 0, result.output
    assert "added ann@example.org" in result.output
    entry = _suppressions(run_cli)["ann@example.org"]
    assert entry["reason"] == "left the union"
    assert entry["source"] == "manual"
    assert entry["created_at"] >= before
    again = run_cli("suppress", "add", "ann@example.org")
    assert again.exit_code == 0, again.output
    assert "already on the do-not-mail list" in again.output
    assert list(_suppressions(run_cli)) == ["ann@example.org"]


def test_add_with_an_invalid_address_adds_nothing_and_exits_1(run_cli: CliRun) -> None:
    """One invalid address among several: each is named, none is added, exit status 1."""
    result = run_cli("suppress", "add", "good@example.org", "nobody", "also@@bad")
    assert result.exit_code == 1
    assert "'nobody'" in result.output
    assert "'also@@bad'" in result.output
    assert _suppressions(run_cli) == {}


def test_add_without_an_address_is_a_usage_error(run_cli: CliRun) -> None:
    """`suppress add` with no ADDRESS is a usage error: exit status 2."""
    assert run_cli("suppress", "add").exit_code == 2


def test_a_suppressed_address_is_not_mailed_and_remove_lets_the_next_send_mail_it(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """Suppressed before `send`: not mailed, row `suppressed`; after `remove`, next send mails."""
    target = "member4@example.org"
    assert run_cli("suppress", "add", target.upper()).exit_code == 0
    path = write_list(subscribers)
    first = run_cli("send", str(path), "--yes")
    assert first.exit_code == 0, first.output
    assert "1 suppressed" in first.output
    assert smtp_server.received_for(target) == []
    assert len(smtp_server.messages) == 9
    assert _states(_status(run_cli))[target] == "suppressed"

    removed = run_cli("suppress", "remove", target)
    assert removed.exit_code == 0, removed.output
    assert f"removed {target}" in removed.output
    assert "unsent messages to it, pending again: 1" in removed.output
    assert _suppressions(run_cli) == {}

    second = run_cli("send", str(path), "--yes")
    assert second.exit_code == 0, second.output
    assert len(smtp_server.received_for(target)) == 1
    assert set(smtp_server.count_by_recipient().values()) == {1}
    assert _states(_status(run_cli))[target] == "sent"


def test_remove_of_an_address_not_on_the_list_says_so(run_cli: CliRun) -> None:
    """Removing an address that is not on the list changes nothing, says so, and exits 0."""
    assert run_cli("suppress", "add", "kept@example.org").exit_code == 0
    result = run_cli("suppress", "remove", "Other@Example.org")
    assert result.exit_code == 0, result.output
    assert "other@example.org was not on the do-not-mail list" in result.output
    assert list(_suppressions(run_cli)) == ["kept@example.org"]


def test_list_table_counts_addresses_per_source(run_cli: CliRun, tmp_path: Path) -> None:
    """The table says how many addresses per source, then one line per address with its reason."""
    empty = run_cli("suppress", "list")
    assert empty.exit_code == 0
    assert "Do-not-mail list: empty" in empty.output
    run_cli("suppress", "add", "a@example.org", "--reason", "asked\nby phone")
    path = tmp_path / "unsubscribed.txt"
    path.write_text("b@example.org\n", encoding="utf-8")
    assert run_cli("suppress", "import", str(path)).exit_code == 0
    table = run_cli("suppress", "list").output
    assert "Do-not-mail list: 2 addresses (1 import, 1 manual)" in table
    [line_a] = [line for line in table.splitlines() if "a@example.org" in line]
    assert "manual" in line_a
    assert line_a.endswith("asked by phone")
    assert any("import" in line and "b@example.org" in line for line in table.splitlines())


def test_list_csv_cells_cannot_start_a_spreadsheet_formula(run_cli: CliRun) -> None:
    """An address or reason starting with = + - @ is prefixed with ', as in `status` CSV."""
    result = run_cli(
        "suppress", "add", "--reason", "+SUM(1)", "--", "=cmd@example.org", "-x@example.org"
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(run_cli("suppress", "list", "--format", "csv").output)))
    assert rows[0] == ["email", "reason", "source", "created_at"]
    assert len(rows) == 3
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@")), row
    assert {row[0] for row in rows[1:]} == {"'=cmd@example.org", "'-x@example.org"}
    assert {row[1] for row in rows[1:]} == {"'+SUM(1)"}


# -- suppress import ---------------------------------------------------------------------


def test_import_of_a_csv_takes_the_email_and_reason_columns_and_reports_bad_lines(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """A CSV (BOM, extra columns): valid rows imported with reasons, bad lines named, exit 1."""
    path = tmp_path / "export.csv"
    path.write_bytes(
        b"\xef\xbb\xbfName,EMAIL,Reason\r\n"
        b"Ann,ann@example.org,asked by phone\r\n"
        b"Bob,not-an-address,\r\n"
        b"\r\n"
        b"Cy,Cy@Example.ORG,\r\n"
        b"Dee,dee@example.org\r\n"
        b"Ann again,ANN@example.org,twice\r\n"
    )
    result = run_cli("suppress", "import", str(path))
    assert result.exit_code == 1
    assert f"{path}:3:" in result.output
    assert "not-an-address" in result.output
    assert f"{path}:6:" in result.output
    assert "3 addresses imported (2 new, 1 already on the do-not-mail list)" in result.output
    entries = _suppressions(run_cli)
    assert set(entries) == {"ann@example.org", "cy@example.org"}
    assert entries["ann@example.org"]["reason"] == "asked by phone"
    assert entries["cy@example.org"]["reason"] == "imported from export.csv"
    assert {e["source"] for e in entries.values()} == {"import"}


def test_import_of_one_address_per_line_uses_the_given_reason(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """A plain file (CRLF, blank lines): every address imported with --reason; exit 0."""
    path = tmp_path / "unsubscribed.txt"
    path.write_bytes(b"a@example.org\r\n\r\n  B@Example.org \r\nc@example.org")
    result = run_cli("suppress", "import", str(path), "--reason", "old list")
    assert result.exit_code == 0, result.output
    assert "3 addresses imported (3 new" in result.output
    entries = _suppressions(run_cli)
    assert set(entries) == {"a@example.org", "b@example.org", "c@example.org"}
    assert {e["reason"] for e in entries.values()} == {"old list"}


def test_import_of_a_file_that_cannot_be_read_imports_nothing(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """A byte that is not UTF-8 stops the import before anything is written, naming the line."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"a@example.org\ncaf\xe9@example.org\n")
    result = run_cli("suppress", "import", str(path))
    assert result.exit_code == 1
    assert f"{path}:2" in result.output
    assert "not UTF-8" in result.output
    assert _suppressions(run_cli) == {}


def test_import_of_a_missing_file_exits_1_naming_it(run_cli: CliRun, tmp_path: Path) -> None:
    """A FILE that does not exist: exit 1 with its name."""
    missing = tmp_path / "nowhere.csv"
    result = run_cli("suppress", "import", str(missing))
    assert result.exit_code == 1
    assert str(missing) in result.output


# -- hard bounces ----------------------------------------------------------------------------


def test_a_user_unknown_reply_suppresses_the_address_for_every_campaign(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """A 550 5.1.1 fails the row and lists the address (source bounce); other campaigns skip it."""
    gone = "member2@example.org"
    reply = f"5.1.1 <{gone}>: Recipient address rejected: User unknown"
    smtp_server.fail_always(gone, "rcpt", f"550 {reply}")
    path = write_list(subscribers)
    first = run_cli("send", str(path), "--yes")
    assert first.exit_code == 3, first.output
    assert "do-not-mail list" in first.output
    assert _states(_status(run_cli))[gone] == "failed"
    entry = _suppressions(run_cli)[gone]
    assert entry["source"] == "bounce"
    assert entry["reason"] == f"550 {reply}"

    other = run_cli("send", str(path), "--yes", "--campaign", "next-appeal")
    assert other.exit_code == 0, other.output
    assert _states(_status(run_cli, "--campaign", "next-appeal"))[gone] == "suppressed"
    assert smtp_server.rcpt_attempts[gone] == 1
    assert smtp_server.received_for(gone) == []
    assert len(smtp_server.messages) == 18


def test_quota_policy_and_other_refusals_do_not_suppress(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """5.2.2 mailbox full, 5.7.1 policy and a bare 554 fail their rows and list no one."""
    replies = {
        "full@example.org": "552 5.2.2 Mailbox full",
        "policy@example.org": "550 5.7.1 Message rejected by policy",
        "other@example.org": "554 Transaction failed",
    }
    for address, reply in replies.items():
        smtp_server.fail_always(address, "rcpt", reply)
    path = write_list([{"email": address} for address in replies])
    result = run_cli("send", str(path), "--yes")
    assert result.exit_code == 3, result.output
    assert set(_states(_status(run_cli)).values()) == {"failed"}
    assert _suppressions(run_cli) == {}


# -- the ledger, on both engines ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A fresh ledger: an SQLite file, or a schema of its own on the PostgreSQL server.

    As in test_ledger.py: without a server the PostgreSQL case skips, except in
    CI (CI=true), where it fails.
    """
    if request.param == "sqlite":
        opened = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
        yield opened
        opened.close()
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        reason = f"no PostgreSQL at {POSTGRES} ({str(exc).strip()}); set TEST_POSTGRES_URL"
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail(f"CI must run the ledger tests on PostgreSQL: {reason}")
        pytest.skip(reason)
    schema = psycopg.sql.Identifier(f"t_{uuid.uuid4().hex[:16]}")
    admin.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(schema))
    opened = Ledger.open(f"{POSTGRES}?options=-csearch_path%3D{schema.as_string(admin)}")
    try:
        yield opened
    finally:
        opened.close()
        admin.execute(psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
        admin.close()


def _claimed_row(ledger: Ledger, email: str) -> int:
    """Load one recipient and claim its row as a run would; returns the row's id."""
    run_id = ledger.start_run("c", "appeal", "send")
    ledger.load("c", "appeal", run_id, [(Recipient(email=email, line=2), f"<{email}.id@x>")])
    [due] = ledger.due_page(DueScope("c", "appeal", run_id, datetime.now(UTC)))
    claimed, suppressed = ledger.claim([due.row_id], run_id)
    assert (claimed, suppressed) == ([due.row_id], [])
    return due.row_id


def test_a_bounce_is_recorded_with_its_failure_in_one_transaction(ledger: Ledger) -> None:
    """The failure and the suppression commit together: both, or (on an error) neither."""
    row_id = _claimed_row(ledger, "gone@example.org")
    failed = DeliveryResult(row_id, "gone@example.org", State.FAILED, 1, 550, "5.1.1 unknown")
    # A reason of None breaks the NOT NULL constraint after the row's update ran.
    with pytest.raises(LedgerError):
        ledger.record([(failed, None)], [("gone@example.org", None)])  # type: ignore[list-item]
    assert [row.state for row in ledger.rows("c")] == ["sending"]
    assert list(ledger.suppressions()) == []

    ledger.record([(failed, None)], [("gone@example.org", "550 5.1.1 unknown")])
    assert [row.state for row in ledger.rows("c")] == ["failed"]
    [entry] = ledger.suppressions()
    assert (entry.email, entry.reason, entry.source) == (
        "gone@example.org",
        "550 5.1.1 unknown",
        "bounce",
    )


def test_the_list_pages_through_many_entries_and_remove_releases_suppressed_rows(
    ledger: Ledger,
) -> None:
    """Over 1,000 entries list in address order; removing one re-pends its suppressed row."""
    emails = [f"m{i:05d}@example.org" for i in range(1234)]
    added = ledger.suppress_many(((e, "old list") for e in [*emails, emails[0]]), "import")
    assert added == 1234
    assert [entry.email for entry in ledger.suppressions()] == emails
    assert ledger.suppression_counts() == {"import": 1234}

    run_id = ledger.start_run("c", "appeal", "send")
    ledger.load("c", "appeal", run_id, [(Recipient(email=emails[7], line=2), "<id@x>")])
    [due] = ledger.due_page(DueScope("c", "appeal", run_id, datetime.now(UTC)))
    assert ledger.claim([due.row_id], run_id) == ([], [due.row_id])
    assert ledger.unsuppress(emails[7]) == (True, 1)
    assert [row.state for row in ledger.rows("c")] == ["pending"]
    assert ledger.unsuppress(emails[7]) == (False, 0)
    assert ledger.suppression_counts() == {"import": 1233}


# -- the check at send time ---------------------------------------------------------------------


def test_an_address_suppressed_while_a_campaign_runs_gets_nothing_more(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
) -> None:
    """`suppress add` run mid-send: that address is not mailed, its row is `suppressed`."""
    # Paced (20/s) so the run is still going when the address is added. While the
    # 10th message waits for its reply, `suppress add` runs in this process: at most
    # the few rows claimed ahead of delivery are past the check by then.
    config = write_config(sending={"rate": 20}, smtp={"timeout": 60.0})
    people = [{"email": f"member{i:02d}@example.org"} for i in range(60)]
    late = people[-1]["email"]
    path = write_list(people)
    reached, added = threading.Event(), threading.Event()
    seen = 0

    def hold_the_tenth(message: Received) -> None:
        nonlocal seen
        seen += 1
        if seen == 10:
            reached.set()
            added.wait(timeout=DEADLINE)

    smtp_server.on_data = hold_the_tenth
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    sending = ["send", str(path), "--yes"]
    process = subprocess.Popen(
        [sys.executable, "-m", "appeal_mailer", "--config", str(config), "-q", *sending],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert reached.wait(timeout=DEADLINE), "the run never reached its 10th message"
        result = run_cli("suppress", "add", late, "--reason", "asked to stop", config=config)
    finally:
        added.set()
        output, _ = process.communicate(timeout=DEADLINE)
    assert result.exit_code == 0, result.output
    assert process.returncode == 0, output.decode()
    assert smtp_server.received_for(late) == []
    assert smtp_server.rcpt_attempts[late] == 0
    assert sorted(smtp_server.recipients()) == sorted(
        p["email"] for p in people if p["email"] != late
    )

    status = _status(run_cli)
    assert status["counts"] == {"sent": 59, "suppressed": 1}
    assert _states(status)[late] == "suppressed"
    table = run_cli("status").output
    assert "suppressed" in table
    assert late in table.split("Not mailed", 1)[1]
