"""The ledger's operations, on SQLite and on PostgreSQL: one schema, one behaviour.

Every test that takes `ledger_url` runs on both engines. Each PostgreSQL test
gets a schema of its own (search_path in the URL), dropped afterwards, so tests
never see each other's rows. Without a PostgreSQL server those cases skip
locally and fail in CI (CI=true): the server is part of CI.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa

import appeal_mailer.ledger as ledger_module
from appeal_mailer.errors import LedgerError
from appeal_mailer.ledger import (
    SCHEMA_VERSION,
    STALE_AFTER,
    DueScope,
    Ledger,
    metadata,
    runs,
    timestamp,
)
from appeal_mailer.models import DeliveryResult, Recipient, State
from tests.conftest import CliRun, ListWriter
from tests.pg import engine as _engine
from tests.smtpd import RecordingServer

CAMPAIGN, STEP = "karaganda", "appeal"


# -- engines -------------------------------------------------------------------------------


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    opened = Ledger.open(ledger_url)
    yield opened
    opened.close()


# -- helpers -----------------------------------------------------------------------------


def person(email: str, line: int = 2, name: str = "", **fields: str) -> Recipient:
    return Recipient(
        email=email,
        line=line,
        name=name,
        organization="Branch 7",
        language="en",
        timezone="Asia/Almaty",
        fields=MappingProxyType(dict(fields)),
    )


def load(ledger: Ledger, run_id: int, emails: Sequence[str], step: str = STEP) -> int:
    people = [person(email, line=i + 2) for i, email in enumerate(emails)]
    return ledger.load(CAMPAIGN, step, run_id, [(p, f"<{p.email}.{step}@test>") for p in people])


def scope(run_id: int, now: datetime | None = None) -> DueScope:
    return DueScope(CAMPAIGN, STEP, run_id, now or datetime.now(UTC))


def due_ids(ledger: Ledger, run_id: int, **kwargs: Any) -> list[int]:
    """Every due row id, read page by page as a run reads them."""
    ids: list[int] = []
    while page := ledger.due_page(scope(run_id), ids[-1] if ids else 0, **kwargs):
        ids += [row.row_id for row in page]
    return ids


def due_emails(ledger: Ledger, run_id: int, **kwargs: Any) -> list[str]:
    return [row.recipient.email for row in ledger.due_page(scope(run_id), **kwargs)]


def states(ledger: Ledger) -> dict[str, str]:
    return {row.email: row.state for row in ledger.rows(CAMPAIGN)}


def result(row_id: int, state: State, code: int | None = None, reply: str = "") -> DeliveryResult:
    return DeliveryResult(row_id, f"row{row_id}", state, attempts=1, code=code, reply=reply)


def emails(n: int, domain: str = "example.org") -> list[str]:
    return [f"member{i:05d}@{domain}" for i in range(n)]


# -- runs ----------------------------------------------------------------------------------


def test_runs_start_beat_and_finish(ledger: Ledger) -> None:
    """A run gets a new id, its heartbeat moves, and finishing records when and a summary."""
    first = ledger.start_run(CAMPAIGN, STEP, "send")
    second = ledger.start_run(CAMPAIGN, STEP, "send --dry-run")
    assert second > first
    with ledger._read() as conn:
        before = conn.execute(sa.select(runs).where(runs.c.id == first)).one()
    assert before.finished_at is None
    assert before.host
    assert before.pid == os.getpid()
    ledger.heartbeat(first)
    ledger.finish_run(first, {"sent": 3, "list": "unions.csv"})
    with ledger._read() as conn:
        after = conn.execute(sa.select(runs).where(runs.c.id == first)).one()
        other = conn.execute(sa.select(runs).where(runs.c.id == second)).one()
    assert after.heartbeat_at >= before.heartbeat_at
    assert after.finished_at >= after.started_at
    assert json.loads(after.summary) == {"list": "unions.csv", "sent": 3}
    assert other.finished_at is None


# -- loading -------------------------------------------------------------------------------


def test_load_counts_new_rows_and_a_rerun_keeps_their_state(ledger: Ledger) -> None:
    """Loading again adds only new rows; a row already sent stays sent."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    assert load(ledger, run, ["anna@example.org", "boris@example.net"]) == 2
    [anna, boris] = due_ids(ledger, run)
    ledger.claim([anna], run)
    ledger.record([(result(anna, State.SENT, 250, "ok"), None)])
    rerun = ledger.start_run(CAMPAIGN, STEP, "send")
    assert load(ledger, rerun, ["anna@example.org", "boris@example.net", "vera@example.org"]) == 1
    assert states(ledger) == {
        "anna@example.org": "sent",
        "boris@example.net": "pending",
        "vera@example.org": "pending",
    }
    assert due_emails(ledger, rerun) == ["boris@example.net", "vera@example.org"]
    assert boris in due_ids(ledger, rerun)


def test_a_rerun_mails_its_own_list_with_the_corrected_data(ledger: Ledger) -> None:
    """The data of the latest list is used, and an address dropped from the list is not due."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    first = [person("anna@example.org", 2, "Ana"), person("boris@example.net", 3, "Boris")]
    ledger.load(CAMPAIGN, STEP, run, [(p, f"<{p.email}>") for p in first])
    rerun = ledger.start_run(CAMPAIGN, STEP, "send")
    corrected = person("anna@example.org", 7, "Anna Petrovna", union="Miners' union")
    assert ledger.load(CAMPAIGN, STEP, rerun, [(corrected, "<anna@example.org>")]) == 0
    [row] = ledger.due_page(scope(rerun))
    assert row.recipient == corrected
    assert row.recipient.fields["union"] == "Miners' union"
    assert row.message_id == "<anna@example.org>"
    assert row.attempts == 0
    assert ledger.count_due(scope(rerun)) == 1
    assert ledger.count_due(scope(run)) == 1  # boris: still due for the list that had him


def test_non_ascii_data_round_trips(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    kazakh = person("ерлан@пример.kz", 2, "Ерлан Ахметов", city="Қарағанды")
    ledger.load(CAMPAIGN, STEP, run, [(kazakh, "<1@test>")])
    [row] = ledger.due_page(scope(run))
    assert row.recipient == kazakh


def test_loading_more_than_a_page_counts_every_new_row(ledger: Ledger) -> None:
    """Batched inserts count what is new on both engines (psycopg has no executemany rowcount)."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    assert load(ledger, run, emails(1203)) == 1203
    assert load(ledger, run, emails(1210)) == 7
    ids = due_ids(ledger, run)
    assert len(ids) == 1210
    assert ids == sorted(ids)
    assert ledger.count_due(scope(run)) == 1210


# -- what is due -------------------------------------------------------------------------------


def test_due_pages_come_in_id_order_after_the_last_row(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(5))
    page = ledger.due_page(scope(run))
    assert [r.recipient.email for r in page] == emails(5)
    later = ledger.due_page(scope(run), page[1].row_id)
    assert [r.row_id for r in later] == [r.row_id for r in page[2:]]
    assert ledger.due_page(scope(run), page[-1].row_id) == []


def test_due_page_filters_by_domain_and_its_subdomains(ledger: Ledger) -> None:
    """A domain matches itself and its subdomains only; `_` and `%` are literal, not wildcards."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(
        ledger,
        run,
        [
            "a@example.org",
            "b@mail.example.org",
            "c@notexample.org",
            "d@example.org.evil.net",
            "e@my_list.org",
            "f@myxlist.org",
            "g@100%.org",
            "h@1000.org",
        ],
    )
    assert due_emails(ledger, run, domain="example.org") == ["a@example.org", "b@mail.example.org"]
    assert due_emails(ledger, run, domain="example.org", exclude=["mail.example.org"]) == [
        "a@example.org"
    ]
    assert due_emails(ledger, run, domain="my_list.org") == ["e@my_list.org"]
    assert due_emails(ledger, run, domain="100%.org") == ["g@100%.org"]
    others = due_emails(ledger, run, exclude=["example.org", "my_list.org"])
    assert others == [
        "c@notexample.org",
        "d@example.org.evil.net",
        "f@myxlist.org",
        "g@100%.org",
        "h@1000.org",
    ]


def test_deferred_rows_are_due_from_their_next_attempt_on(ledger: Ledger) -> None:
    """Timestamps are fixed-width text: they compare in time order on both engines."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["soon@example.org", "later@example.org", "failed@example.org"])
    soon, later, failed = due_ids(ledger, run)
    ledger.claim([soon, later, failed], run)
    now = datetime(2030, 1, 1, 9, 59, 59, 999999, tzinfo=UTC)
    ledger.record(
        [
            (result(soon, State.DEFERRED, 451), timestamp(now)),
            (result(later, State.DEFERRED, 421), timestamp(now + timedelta(microseconds=1))),
            (result(failed, State.FAILED, 550, "no such user"), None),
        ]
    )
    assert ledger.count_due(scope(run, now - timedelta(microseconds=1))) == 0
    assert ledger.count_due(scope(run, now)) == 1
    assert [r.row_id for r in ledger.due_page(scope(run, now))] == [soon]
    assert ledger.count_due(scope(run, now + timedelta(seconds=1))) == 2
    [row] = ledger.due_page(scope(run, now), domain="example.org", exclude=["x.example.org"])
    assert row.attempts == 1


def test_due_rows_are_only_this_campaign_and_step(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["anna@example.org"])
    load(ledger, run, ["anna@example.org"], step="reminder")
    ledger.load("other", STEP, run, [(person("zoe@example.org"), "<z@test>")])
    assert due_emails(ledger, run) == ["anna@example.org"]
    assert ledger.count_due(scope(run)) == 1
    assert ledger.count_due(DueScope(CAMPAIGN, "reminder", run, datetime.now(UTC))) == 1


# -- claiming, recording, releasing ----------------------------------------------------------


def test_a_row_is_claimed_once(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    other = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(3))
    a, b, c = due_ids(ledger, run)
    assert ledger.claim([], run) == ([], [])
    assert sorted(ledger.claim([a, b], run)[0]) == [a, b]
    assert ledger.claim([a, b, c], other) == ([c], [])
    assert ledger.claim([a, b, c], run) == ([], [])
    assert ledger.counts(CAMPAIGN) == {"sending": 3}
    assert due_ids(ledger, run) == []


def test_claim_suppresses_addresses_on_the_do_not_mail_list(ledger: Ledger) -> None:
    """The list is checked at claim time: an address suppressed after loading gets nothing."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["anna@example.org", "boris@example.net", "vera@example.org"])
    anna, boris, vera = due_ids(ledger, run)
    assert ledger.suppress("boris@example.net", "asked to leave", "manual")
    assert not ledger.suppress("boris@example.net", "again", "manual")
    claimed, suppressed = ledger.claim([anna, boris, vera], run)
    assert sorted(claimed) == [anna, vera]
    assert suppressed == [boris]
    assert states(ledger)["boris@example.net"] == "suppressed"
    assert ledger.claim([boris], run) == ([], [])  # suppressed once, not again


def test_record_writes_each_outcome(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["sent@example.org", "later@example.org", "gone@example.org"])
    sent, later, gone = due_ids(ledger, run)
    ledger.claim([sent, later, gone], run)
    retry_at = timestamp(datetime.now(UTC) + timedelta(hours=1))
    ledger.record(
        [
            (result(sent, State.SENT, 250, "2.0.0 queued as 4XyZ"), None),
            (result(later, State.DEFERRED, 451, "4.7.1 greylisted"), retry_at),
            (result(gone, State.FAILED, 550, "5.1.1 no such user"), None),
        ]
    )
    ledger.record([])
    rows = {row.email: row for row in ledger.rows(CAMPAIGN)}
    assert rows["sent@example.org"].state == "sent"
    assert rows["sent@example.org"].smtp_code == 250
    assert rows["sent@example.org"].smtp_reply == "2.0.0 queued as 4XyZ"
    assert rows["later@example.org"].state == "deferred"
    assert rows["later@example.org"].next_attempt_at == retry_at
    assert rows["gone@example.org"].smtp_reply == "5.1.1 no such user"
    assert {row.attempts for row in rows.values()} == {1}
    with ledger._read() as conn:
        holders = conn.execute(sa.text("SELECT claimed_by FROM deliveries")).scalars().all()
    assert holders == [None, None, None]
    # Attempts add up over runs.
    ledger.claim([later], run)
    ledger.record([(result(later, State.DEFERRED, 451), retry_at)])
    assert {r.email: r.attempts for r in ledger.rows(CAMPAIGN)}["later@example.org"] == 2


def test_release_returns_only_the_runs_own_claimed_rows(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    other = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(3))
    a, b, c = due_ids(ledger, run)
    ledger.claim([a, b], run)
    ledger.claim([c], other)
    ledger.release([], run)
    ledger.release([a, b, c], run)
    assert ledger.counts(CAMPAIGN) == {"pending": 2, "sending": 1}
    assert due_ids(ledger, run) == [a, b]
    ledger.release([c], run)  # not its row
    assert ledger.counts(CAMPAIGN) == {"pending": 2, "sending": 1}


# -- recovery --------------------------------------------------------------------------------


def _age(ledger: Ledger, run_id: int, seconds: float) -> None:
    """Make run `run_id`'s last heartbeat `seconds` old."""
    old = timestamp(datetime.now(UTC) - timedelta(seconds=seconds))
    with ledger._write() as conn:
        conn.execute(runs.update().where(runs.c.id == run_id).values(heartbeat_at=old))


def test_recover_interrupted_takes_over_only_the_rows_of_dead_runs(ledger: Ledger) -> None:
    """Rows left `sending` by a finished or silent run become unknown; a live run keeps its own."""
    live = ledger.start_run(CAMPAIGN, STEP, "send")
    finished = ledger.start_run(CAMPAIGN, STEP, "send")
    silent = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, live, ["live@example.org", "finished@example.org", "silent@example.org"])
    a, b, c = due_ids(ledger, live)
    ledger.claim([a], live)
    ledger.claim([b], finished)
    ledger.claim([c], silent)
    ledger.finish_run(finished, {})
    _age(ledger, silent, STALE_AFTER - 5)
    assert ledger.recover_interrupted(CAMPAIGN, STEP) == 1  # only the finished run's row
    _age(ledger, silent, STALE_AFTER + 5)
    assert ledger.recover_interrupted(CAMPAIGN, STEP) == 1
    assert ledger.recover_interrupted(CAMPAIGN, STEP) == 0
    rows = {row.email: row for row in ledger.rows(CAMPAIGN)}
    assert rows["live@example.org"].state == "sending"
    assert rows["finished@example.org"].state == "unknown"
    assert rows["silent@example.org"].state == "unknown"
    assert "interrupted" in (rows["silent@example.org"].smtp_reply or "")
    assert ledger.recover_interrupted("other", STEP) == 0


def test_recover_interrupted_is_per_campaign_step(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["anna@example.org"], step="reminder")
    [row] = ledger.due_page(DueScope(CAMPAIGN, "reminder", run, datetime.now(UTC)))
    ledger.claim([row.row_id], run)
    ledger.finish_run(run, {})
    assert ledger.recover_interrupted(CAMPAIGN, STEP) == 0
    assert ledger.recover_interrupted(CAMPAIGN, "reminder") == 1


def test_requeue_unknown_makes_this_lists_unknown_rows_due(ledger: Ledger) -> None:
    """send --resend-unknown: unknown rows of the list become due, with their Message-ID."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["anna@example.org", "boris@example.net", "vera@example.org"])
    anna, boris, vera = due_ids(ledger, run)
    ledger.claim([anna, boris, vera], run)
    ledger.record(
        [
            (result(anna, State.UNKNOWN, reply="connection lost after DATA"), None),
            (result(boris, State.UNKNOWN, reply="connection lost after DATA"), None),
            (result(vera, State.SENT, 250), None),
        ]
    )
    rerun = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, rerun, ["anna@example.org", "vera@example.org"])  # boris left the list
    assert ledger.requeue_unknown(CAMPAIGN, STEP, rerun) == 1
    assert ledger.requeue_unknown(CAMPAIGN, STEP, rerun) == 0
    [row] = ledger.due_page(scope(rerun))
    assert row.recipient.email == "anna@example.org"
    assert row.message_id == "<anna@example.org.appeal@test>"
    assert states(ledger)["boris@example.net"] == "unknown"


# -- reports ---------------------------------------------------------------------------------


def test_counts_rows_and_campaigns(ledger: Ledger) -> None:
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(1105))
    load(ledger, run, emails(2), step="reminder")
    ledger.load("another", STEP, run, [(person("zoe@example.org"), "<z@test>")])
    first = due_ids(ledger, run)[:2]
    ledger.claim(first, run)
    ledger.record([(result(first[0], State.SENT, 250), None)])
    assert ledger.counts(CAMPAIGN) == {"pending": 1105, "sending": 1, "sent": 1}
    assert ledger.counts(CAMPAIGN, STEP) == {"pending": 1103, "sending": 1, "sent": 1}
    assert ledger.counts(CAMPAIGN, "reminder") == {"pending": 2}
    assert ledger.counts("nobody") == {}
    every = list(ledger.rows(CAMPAIGN))
    assert len(every) == 1107
    assert [row.email for row in every[:1105]] == emails(1105)
    assert {row.step for row in every[1105:]} == {"reminder"}
    trouble = list(ledger.rows(CAMPAIGN, states=("sent", "sending")))
    assert [(row.email, row.state) for row in trouble] == [
        ("member00000@example.org", "sent"),
        ("member00001@example.org", "sending"),
    ]
    assert ledger.campaigns() == ["another", CAMPAIGN]


# -- overlapping runs --------------------------------------------------------------------------


def test_overlapping_claims_from_two_connections_never_share_a_row(ledger_url: str) -> None:
    """Four threads on two ledgers claim random overlapping batches: each row goes to one."""
    first, second = Ledger.open(ledger_url), Ledger.open(ledger_url)
    try:
        run_a = first.start_run(CAMPAIGN, STEP, "send")
        run_b = second.start_run(CAMPAIGN, STEP, "send")
        load(first, run_a, emails(400))
        ids = due_ids(first, run_a)
        assert len(ids) == 400
        barrier = threading.Barrier(4)
        got: list[list[int]] = [[] for _ in range(4)]
        errors: list[BaseException] = []

        def claimer(index: int, ledger: Ledger, run_id: int) -> None:
            rng = random.Random(index)
            try:
                barrier.wait()
                for _ in range(60):
                    batch = rng.sample(ids, 40)
                    got[index] += ledger.claim(batch, run_id)[0]
                got[index] += ledger.claim(ids, run_id)[0]  # whatever is left
            except BaseException as exc:  # reported below, from the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=claimer, args=(i, *pair))
            for i, pair in enumerate([(first, run_a), (second, run_b)] * 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        claimed = [row for rows in got for row in rows]
        assert len(claimed) == len(set(claimed))
        assert sorted(claimed) == ids
        assert first.counts(CAMPAIGN) == {"sending": 400}
    finally:
        first.close()
        second.close()


def test_a_claim_that_waits_for_another_skips_the_rows_that_one_took(postgres_url: str) -> None:
    """PostgreSQL: a claim blocked by another's uncommitted claim re-checks each row it waited for.

    Run A claims rows 1-4 and is held just before its commit; run B claims rows
    3-6 meanwhile and must wait for A's row locks; once A commits, B gets 5 and 6
    and not the rows A took.
    """
    a, b = Ledger.open(postgres_url), Ledger.open(postgres_url)
    admin = _engine(postgres_url)
    try:
        run_a = a.start_run(CAMPAIGN, STEP, "send")
        run_b = b.start_run(CAMPAIGN, STEP, "send")
        load(a, run_a, emails(6))
        ids = due_ids(a, run_a)
        committing, proceed = threading.Event(), threading.Event()

        connect = a._engine.raw_connection

        class HeldBeforeCommit:
            """Run A's driver connection, held just before it commits."""

            def __init__(self) -> None:
                self._raw = connect()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._raw, name)

            def commit(self) -> None:
                committing.set()
                proceed.wait(timeout=60)
                self._raw.commit()

        a._engine.raw_connection = HeldBeforeCommit  # type: ignore[method-assign]  # the hold
        out: dict[str, tuple[list[int], list[int]]] = {}
        thread_a = threading.Thread(target=lambda: out.update(a=a.claim(ids[:4], run_a)))
        thread_b = threading.Thread(target=lambda: out.update(b=b.claim(ids[2:], run_b)))
        thread_a.start()
        assert committing.wait(timeout=30)
        thread_b.start()
        waiting = sa.text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        deadline = time.monotonic() + 30
        with admin.connect() as conn:
            while conn.execute(waiting).scalar_one() == 0:
                assert time.monotonic() < deadline, "run B never waited for run A's locks"
                time.sleep(0.01)
        assert thread_b.is_alive()
        proceed.set()
        thread_a.join(timeout=30)
        thread_b.join(timeout=30)
        assert sorted(out["a"][0]) == ids[:4]
        assert sorted(out["b"][0]) == ids[4:]
        assert out["b"][1] == []
    finally:
        proceed.set()
        a.close()
        b.close()
        admin.dispose()


# -- schema versions and migrations ------------------------------------------------------------

# The tables as release 1 created them (its metadata, compiled), frozen here: a
# migration must keep working on exactly these, whatever ledger.py says today.
# {serial} is the id column's type: INTEGER on SQLite (the rowid), SERIAL on PostgreSQL.
V1_DDL = """
CREATE TABLE deliveries (
    id {serial} NOT NULL,
    campaign VARCHAR(64) NOT NULL,
    step VARCHAR(64) NOT NULL,
    email VARCHAR(320) NOT NULL,
    state VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    smtp_code INTEGER,
    smtp_reply TEXT,
    message_id VARCHAR(255) NOT NULL,
    next_attempt_at VARCHAR(32),
    claimed_by INTEGER,
    updated_at VARCHAR(32) NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_deliveries_campaign_step_email UNIQUE (campaign, step, email)
);
CREATE INDEX ix_deliveries_campaign_state ON deliveries (campaign, step, state);
CREATE TABLE meta (
    "key" VARCHAR(64) NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY ("key")
);
CREATE TABLE recipients (
    id {serial} NOT NULL,
    campaign VARCHAR(64) NOT NULL,
    email VARCHAR(320) NOT NULL,
    line INTEGER NOT NULL,
    data TEXT NOT NULL,
    seen_run INTEGER NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_recipients_campaign_email UNIQUE (campaign, email)
);
CREATE TABLE runs (
    id {serial} NOT NULL,
    campaign VARCHAR(64) NOT NULL,
    step VARCHAR(64) NOT NULL,
    command VARCHAR(32) NOT NULL,
    started_at VARCHAR(32) NOT NULL,
    finished_at VARCHAR(32),
    heartbeat_at VARCHAR(32) NOT NULL,
    summary TEXT,
    PRIMARY KEY (id)
);
CREATE TABLE suppressions (
    email VARCHAR(320) NOT NULL,
    reason TEXT NOT NULL,
    source VARCHAR(32) NOT NULL,
    created_at VARCHAR(32) NOT NULL,
    PRIMARY KEY (email)
);
"""

V1_ROWS = """
INSERT INTO runs (campaign, step, command, started_at, finished_at, heartbeat_at, summary)
VALUES ('karaganda', 'appeal', 'send', '2025-03-01T10:00:00.000000Z',
        '2025-03-01T10:05:00.000000Z', '2025-03-01T10:04:55.000000Z', '{{"sent": 1}}');
INSERT INTO recipients (campaign, email, line, data, seen_run) VALUES
('karaganda', 'anna@example.org', 2,
 '{{"name":"Anna","organization":"","language":"en","timezone":"","fields":{{}}}}', 1),
('karaganda', 'boris@example.net', 3,
 '{{"name":"Boris","organization":"","language":"en","timezone":"","fields":{{}}}}', 1);
INSERT INTO deliveries (campaign, step, email, state, attempts, smtp_code, smtp_reply,
                        message_id, updated_at) VALUES
('karaganda', 'appeal', 'anna@example.org', 'sent', 1, 250, 'ok', '<a@test>',
 '2025-03-01T10:01:00.000000Z'),
('karaganda', 'appeal', 'boris@example.net', 'pending', 0, NULL, NULL, '<b@test>',
 '2025-03-01T10:00:00.000000Z');
INSERT INTO suppressions VALUES ('left@example.org', 'asked', 'manual',
                                 '2025-02-01T00:00:00.000000Z');
"""


def _make_v1_ledger(url: str, *, version_row: bool = True) -> None:
    engine = _engine(url)
    serial = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    script = V1_DDL.format(serial=serial) + V1_ROWS.format()
    if version_row:
        script += "INSERT INTO meta VALUES ('schema_version', '1');"
    with engine.begin() as conn:
        for statement in script.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    engine.dispose()


def _schema(url: str) -> dict[str, Any]:
    """What matters of each table: columns (type, nullability), keys, unique sets, indexes."""
    engine = _engine(url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        found: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            found[table] = {
                "columns": {
                    c["name"]: (type(c["type"]).__name__, c["nullable"])
                    for c in inspector.get_columns(table)
                },
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                ),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]))
                    for i in inspector.get_indexes(table)
                    if not i.get("duplicates_constraint")
                ),
            }
        version = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'"))
        found["version"] = int(version.scalar_one())
    engine.dispose()
    return found


@pytest.mark.parametrize("version_row", [True, False], ids=["v1", "v1-killed-before-version"])
def test_a_version_1_ledger_is_migrated_on_open(ledger_url: str, version_row: bool) -> None:
    """A ledger made by release 1 opens: its schema brought up to date, its rows kept."""
    _make_v1_ledger(ledger_url, version_row=version_row)
    ledger = Ledger.open(ledger_url)
    try:
        assert {row.email: row.state for row in ledger.rows(CAMPAIGN)} == {
            "anna@example.org": "sent",
            "boris@example.net": "pending",
        }
        run = ledger.start_run(CAMPAIGN, STEP, "send")
        assert run == 2
        assert load(ledger, run, ["boris@example.net", "vera@example.org"]) == 1
        assert due_emails(ledger, run) == ["boris@example.net", "vera@example.org"]
        due = due_ids(ledger, run)
        assert sorted(ledger.claim(due, run)[0]) == due
        assert ledger.counts(CAMPAIGN) == {"sent": 1, "sending": 2}
        assert not ledger.suppress("left@example.org", "again", "manual")
        with ledger._read() as conn:
            old = conn.execute(sa.select(runs).where(runs.c.id == 1)).one()
            new = conn.execute(sa.select(runs).where(runs.c.id == run)).one()
        assert (old.host, old.pid) == (None, None)
        assert old.summary == '{"sent": 1}'
        assert new.pid == os.getpid()
    finally:
        ledger.close()
    migrated = _schema(ledger_url)
    assert migrated["version"] == SCHEMA_VERSION
    Ledger.open(ledger_url).close()  # and opens again, as it is


def test_a_migrated_ledger_has_the_schema_of_a_new_one(ledger_url: str, tmp_path: Path) -> None:
    """Every migration step together equals `metadata`: nothing forgotten, nothing extra."""
    _make_v1_ledger(ledger_url)
    Ledger.open(ledger_url).close()
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    if ledger_url.startswith("postgresql"):
        fresh = ledger_url.replace("search_path%3D", "search_path%3Dfresh_")
        with _engine(ledger_url).begin() as conn:
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
            conn.exec_driver_sql(f"CREATE SCHEMA fresh_{schema}")
    try:
        Ledger.open(fresh).close()
        assert _schema(ledger_url) == _schema(fresh)
        assert set(_schema(fresh)) - {"version"} == set(metadata.tables)
    finally:
        if ledger_url.startswith("postgresql"):
            with _engine(ledger_url).begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA fresh_{schema} CASCADE")


def test_processes_opening_an_old_ledger_at_once_migrate_it_once(ledger_url: str) -> None:
    """Two cron runs starting together on an old ledger: both open it, neither fails."""
    _make_v1_ledger(ledger_url)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            barrier.wait()
            Ledger.open(ledger_url).close()
        except BaseException as exc:  # reported below, from the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert _schema(ledger_url)["version"] == SCHEMA_VERSION


def test_a_ledger_from_a_newer_release_is_refused(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    with _engine(ledger_url).begin() as conn:
        conn.exec_driver_sql("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError) as caught:
        Ledger.open(ledger_url)
    assert "newer appeal-mailer (schema 99" in str(caught.value)
    assert caught.value.hint == "upgrade appeal-mailer"


# -- dry-run copies ----------------------------------------------------------------------------


def test_a_dry_run_copy_sees_the_ledger_and_writes_nothing_to_it(ledger_url: str) -> None:
    """The scratch copy has the campaign's rows, the do-not-mail list and the runs; its
    writes stay in the copy."""
    real = Ledger.open(ledger_url)
    run = real.start_run(CAMPAIGN, STEP, "send")
    load(real, run, ["anna@example.org", "boris@example.net", "vera@example.org"])
    anna, boris, vera = due_ids(real, run)
    real.claim([anna], run)
    real.record([(result(anna, State.SENT, 250), None)])
    real.suppress("vera@example.org", "asked", "manual")
    real.load("other", STEP, run, [(person("zoe@example.org"), "<z@test>")])
    real.finish_run(run, {})
    before = (real.counts(CAMPAIGN), real.counts("other"), list(real.rows(CAMPAIGN)))

    copy = Ledger.open(ledger_url, scratch_copy=True, campaign=CAMPAIGN)
    try:
        assert copy.location == real.location
        assert copy.counts(CAMPAIGN) == before[0]
        assert list(copy.rows(CAMPAIGN)) == before[2]
        dry = copy.start_run(CAMPAIGN, STEP, "send --dry-run")
        assert dry > run
        assert load(copy, dry, ["anna@example.org", "boris@example.net", "vera@example.org"]) == 0
        claimed, suppressed = copy.claim(due_ids(copy, dry), dry)
        assert (claimed, suppressed) == ([boris], [vera])
        copy.record([(result(boris, State.SENT, 250), None)])
        copy.finish_run(dry, {"dry_run": True})
        assert copy.counts(CAMPAIGN) == {"sent": 2, "suppressed": 1}
    finally:
        copy.close()
    assert (real.counts(CAMPAIGN), real.counts("other"), list(real.rows(CAMPAIGN))) == before
    with real._read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(runs)).scalar_one() == 1
    real.close()


def test_a_dry_run_copy_of_a_postgresql_ledger_holds_only_its_campaign(postgres_url: str) -> None:
    real = Ledger.open(postgres_url)
    run = real.start_run(CAMPAIGN, STEP, "send")
    load(real, run, emails(1203))  # more than one page of the server-side cursor
    real.load("other", STEP, run, [(person("zoe@example.org"), "<z@test>")])
    real.close()
    copy = Ledger.open(postgres_url, scratch_copy=True, campaign=CAMPAIGN)
    try:
        assert copy.campaigns() == [CAMPAIGN]
        assert copy.count_due(scope(run)) == 1203
        assert copy._engine.dialect.name == "sqlite"
    finally:
        copy.close()


def test_a_dry_run_on_an_empty_postgresql_database_creates_nothing(postgres_url: str) -> None:
    copy = Ledger.open(postgres_url, scratch_copy=True, campaign=CAMPAIGN)
    copy.start_run(CAMPAIGN, STEP, "send --dry-run")
    copy.close()
    engine = _engine(postgres_url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


def test_a_dry_run_does_not_migrate_an_old_ledger(ledger_url: str) -> None:
    """A dry run of a new release leaves an old ledger as it was (the old release still opens it).

    SQLite: the copy is migrated, not the file. PostgreSQL: refused, with the way out.
    """
    _make_v1_ledger(ledger_url)
    if ledger_url.startswith("sqlite"):
        copy = Ledger.open(ledger_url, scratch_copy=True)
        assert copy.counts(CAMPAIGN) == {"pending": 1, "sent": 1}
        copy.start_run(CAMPAIGN, STEP, "send --dry-run")
        copy.close()
    else:
        with pytest.raises(LedgerError) as caught:
            Ledger.open(ledger_url, scratch_copy=True, campaign=CAMPAIGN)
        assert "older appeal-mailer (schema 1" in str(caught.value)
        assert "appeal-mailer status" in (caught.value.hint or "")
    engine = _engine(ledger_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT value FROM meta").scalar_one() == "1"
        assert "host" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    engine.dispose()


# -- URLs ----------------------------------------------------------------------------------------


def test_a_plain_postgresql_url_is_opened_with_psycopg_3(postgres_url: str) -> None:
    ledger = Ledger.open(postgres_url)
    try:
        assert ledger._engine.dialect.driver == "psycopg"
        with ledger._read() as conn:
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
    finally:
        ledger.close()


def test_an_unreachable_server_is_a_ledger_error_without_the_password() -> None:
    with pytest.raises(LedgerError) as caught:
        Ledger.open("postgresql://mailer:s3cret@127.0.0.1:9/appeals?connect_timeout=2")
    message = str(caught.value)
    assert "s3cret" not in message
    assert "127.0.0.1:9/appeals" in message
    assert caught.value.hint == "check [ledger] path or url in the config"


def test_a_password_in_the_query_is_hidden_too() -> None:
    with pytest.raises(LedgerError) as caught:
        Ledger.open("postgresql://127.0.0.1:9/appeals?password=s3cret&connect_timeout=2")
    assert "s3cret" not in str(caught.value)


def test_a_missing_driver_says_what_to_install() -> None:
    with pytest.raises(LedgerError) as caught:
        Ledger.open("postgresql+pg8000://mailer:s3cret@127.0.0.1/appeals")
    assert "pg8000 is not installed" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "appeal-mailer[postgres]" in (caught.value.hint or "")


# -- the command line, on PostgreSQL -------------------------------------------------------------


def test_send_and_status_with_a_postgresql_ledger(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With APPEAL_MAILER_LEDGER__URL: a dry run writes nothing; send records; status reads."""
    monkeypatch.setenv("APPEAL_MAILER_LEDGER__URL", postgres_url)
    path = write_list(subscribers)
    preview = tmp_path / "preview"
    dry = run_cli("send", str(path), "--dry-run", "--out", str(preview))
    assert dry.exit_code == 0, dry.output
    assert len(list(preview.glob("*.eml"))) == 10
    assert smtp_server.messages == []
    sent = run_cli("send", str(path), "--yes")
    assert sent.exit_code == 0, sent.output
    assert "10 sent" in sent.output
    assert sorted(smtp_server.recipients()) == sorted(s["email"] for s in subscribers)
    again = run_cli("send", str(path), "--yes")
    assert again.exit_code == 0, again.output
    assert len(smtp_server.messages) == 10

    status = run_cli("status", "--format", "json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["campaign"] == "test-campaign"
    assert report["counts"] == {"sent": 10}
    assert sorted(r["email"] for r in report["recipients"]) == sorted(
        s["email"] for s in subscribers
    )
    for row in report["recipients"]:
        assert (row["step"], row["state"], row["attempts"], row["smtp_code"]) == (
            "appeal",
            "sent",
            1,
            250,
        )
        assert row["message_id"].startswith("<")
    assert not (tmp_path / "ledger.db").exists()  # the [ledger] path was not used


# -- the hot path: results and claims in one commit -----------------------------------------


def test_results_and_claims_share_one_commit(ledger: Ledger) -> None:
    """write_group records what came back and claims what is next, in one transaction."""
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["sent@example.org", "later@example.org", "next@example.org", "gone@x.org"])
    sent, later, nxt, gone = due_ids(ledger, run)
    ledger.claim([sent, later], run)
    ledger.suppress("gone@x.org", "asked to leave", "manual")
    retry_at = timestamp(datetime.now(UTC) + timedelta(hours=1))
    claimed, suppressed = ledger.write_group(
        [(result(sent, State.SENT, 250), None), (result(later, State.DEFERRED, 451), retry_at)],
        claim=[gone, nxt],
        run_id=run,
    )
    assert (claimed, suppressed) == ([nxt], [gone])
    assert states(ledger) == {
        "sent@example.org": "sent",
        "later@example.org": "deferred",
        "next@example.org": "sending",
        "gone@x.org": "suppressed",
    }


def test_a_group_that_fails_writes_none_of_it(ledger: Ledger) -> None:
    """A database error part-way through a group leaves every row as it was (one transaction).

    A trigger makes the update of one row fail; the result recorded before it and
    the claim after it in the same group must not be there afterwards, and the
    error is a LedgerError naming the ledger.
    """
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, ["a@example.org", "boom@example.org", "c@example.org"])
    a, boom, c = due_ids(ledger, run)
    ledger.claim([a, boom], run)
    with ledger._write() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.email = 'boom@example.org' THEN RAISE EXCEPTION 'boom'; END IF; "
                "RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE UPDATE ON deliveries "
                "FOR EACH ROW EXECUTE FUNCTION boom()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE UPDATE ON deliveries "
                "WHEN NEW.email = 'boom@example.org' BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
    with pytest.raises(LedgerError, match="boom") as caught:
        ledger.write_group(
            [(result(a, State.SENT, 250), None), (result(boom, State.SENT, 250), None)],
            claim=[c],
            run_id=run,
        )
    assert caught.value.location == ledger.location
    assert states(ledger) == {
        "a@example.org": "sending",
        "boom@example.org": "sending",
        "c@example.org": "pending",
    }


def test_due_pages_merge_pending_and_due_deferred_rows_in_id_order(ledger: Ledger) -> None:
    """Pending and due deferred rows, interleaved over several pages, each come exactly once.

    Without `state`, due_page pages both states at once in id order: every third
    row is deferred and due, every seventh deferred but not yet due; the pages
    must hold every due row once, in id order, and no row that is not due.
    """
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(1300))
    ids = due_ids(ledger, run)
    soon = timestamp(datetime.now(UTC) - timedelta(minutes=1))
    late = timestamp(datetime.now(UTC) + timedelta(hours=1))
    deferred = [i for n, i in enumerate(ids) if n % 3 == 0 or n % 7 == 0]
    ledger.claim(deferred, run)
    ledger.record(
        [
            (result(i, State.DEFERRED, 451), late if n % 7 == 0 else soon)
            for n, i in enumerate(ids)
            if i in set(deferred)
        ]
    )
    not_due = {i for n, i in enumerate(ids) if n % 7 == 0}
    pages: list[list[int]] = []
    while page := ledger.due_page(scope(run), pages[-1][-1] if pages else 0):
        pages.append([row.row_id for row in page])
    got = [i for page in pages for i in page]
    assert got == [i for i in ids if i not in not_due]
    assert len(pages) == 3
    assert all(len(page) == 500 for page in pages[:-1])


def test_heartbeats_on_postgresql_use_the_servers_clock(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run on a machine whose clock is ten minutes slow is not taken for dead.

    Run A, on another machine (another host, so its pid cannot be checked from
    here) with a clock ten minutes behind, claims rows and beats. Run B, here,
    with a right clock, recovers interrupted rows: A's stay `sending`, because
    its heartbeat came from the PostgreSQL server's clock, not its own. (On one
    machine's clock, A's heartbeat would be ten minutes old: stale.)
    """
    a, b = Ledger.open(postgres_url), Ledger.open(postgres_url)
    try:
        slow = datetime.now(UTC) - timedelta(minutes=10)
        with monkeypatch.context() as machine_a:
            machine_a.setattr(ledger_module, "_local_now", lambda: slow)
            machine_a.setattr(ledger_module, "_this_host", lambda: "another-machine")
            run_a = a.start_run(CAMPAIGN, STEP, "send")
            load(a, run_a, emails(3))
            a.claim(due_ids(a, run_a), run_a)
            a.heartbeat(run_a)
        assert b.recover_interrupted(CAMPAIGN, STEP) == 0
        assert b.counts(CAMPAIGN) == {"sending": 3}
        with b._read() as conn:
            beat = conn.execute(sa.select(runs.c.heartbeat_at).where(runs.c.id == run_a)).scalar()
        assert beat > timestamp(datetime.now(UTC) - timedelta(seconds=STALE_AFTER))
    finally:
        a.close()
        b.close()


def test_due_pages_of_one_state_hold_only_that_state_in_id_order(ledger: Ledger) -> None:
    """`state=` pages one state alone: due deferred rows, or pending rows, each once, in order.

    A run reads the due retries first, then the pending rows, each with its own
    cursor, so a page never reads past the other state's rows.
    """
    run = ledger.start_run(CAMPAIGN, STEP, "send")
    load(ledger, run, emails(1100))
    ids = due_ids(ledger, run)
    soon = timestamp(datetime.now(UTC) - timedelta(minutes=1))
    late = timestamp(datetime.now(UTC) + timedelta(hours=1))
    deferred = ids[::2]
    ledger.claim(deferred, run)
    ledger.record(
        [
            (result(i, State.DEFERRED, 451), late if n % 5 == 0 else soon)
            for n, i in enumerate(deferred)
        ]
    )

    def paged(state: State) -> list[int]:
        got: list[int] = []
        while page := ledger.due_page(scope(run), got[-1] if got else 0, state=state):
            got += [row.row_id for row in page]
        return got

    assert paged(State.DEFERRED) == [i for n, i in enumerate(deferred) if n % 5]
    assert paged(State.PENDING) == ids[1::2]
