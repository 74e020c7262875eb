"""The delivery ledger: one durable row per (campaign, step, recipient), on SQLite or PostgreSQL.

The only module that talks to the database. SQLAlchemy Core keeps one schema
and one set of statements for both engines. Every method is synchronous and
commits before it returns: the caller decides which thread waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.compiler import SQLCompiler

from appeal_mailer.errors import LedgerError
from appeal_mailer.models import DeliveryResult, Listed, Recipient, State

# The schema this release writes. A ledger made by an older release is brought up to
# it on open by _MIGRATIONS (see Ledger._migrate); one made by a newer one is refused.
SCHEMA_VERSION = 4
# "power": a commit survives power loss; "crash": a crash of the process only.
Durability = Literal["power", "crash"]
_BATCH = 500

metadata = sa.MetaData()

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("campaign", sa.String(64), nullable=False),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("line", sa.Integer, nullable=False),
    # name, organization, language, timezone and the other columns, as JSON.
    sa.Column("data", sa.Text, nullable=False),
    # The run that last read this address from a list: `send` mails only the
    # addresses of the list it was given, not whoever an older list had.
    sa.Column("seen_run", sa.Integer, nullable=False),
    sa.UniqueConstraint("campaign", "email", name="uq_recipients_campaign_email"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("campaign", sa.String(64), nullable=False),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("smtp_code", sa.Integer, nullable=True),
    sa.Column("smtp_reply", sa.Text, nullable=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    # ISO 8601 UTC text, fixed width, so that it sorts and compares as text on both engines.
    sa.Column("next_attempt_at", sa.String(32), nullable=True),
    sa.Column("claimed_by", sa.Integer, nullable=True),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.UniqueConstraint("campaign", "step", "email", name="uq_deliveries_campaign_step_email"),
    # Due rows are read page by page in id order, each state's from this index (due_page).
    sa.Index("ix_deliveries_due", "campaign", "step", "state", "id"),
    # `status` and exports read a campaign's rows page by page in id order (rows()).
    sa.Index("ix_deliveries_campaign_id", "campaign", "id"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("campaign", sa.String(64), nullable=False),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("command", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("finished_at", sa.String(32), nullable=True),
    # A live run touches this every HEARTBEAT seconds; a run that has not for
    # STALE_AFTER seconds is dead, and its `sending` rows can be recovered.
    sa.Column("heartbeat_at", sa.String(32), nullable=False),
    sa.Column("summary", sa.Text, nullable=True),
    # Where the run's process is (see _this_host) and its pid: a run killed outright
    # (kill -9, OOM) leaves a fresh heartbeat, but a run on this host whose process is
    # gone is known dead at once, and the next run need not wait STALE_AFTER.
    sa.Column("host", sa.Text, nullable=True),
    sa.Column("pid", sa.Integer, nullable=True),
)
HEARTBEAT = 10.0
STALE_AFTER = 60.0

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("email", sa.String(320), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    # "manual" (suppress add), "import" (suppress import) or "bounce" (see bounces.py).
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

# Rows a run may pick up: never started, or deferred and due.
_CLAIMABLE = (State.PENDING.value, State.DEFERRED.value)


def timestamp(moment: datetime | None = None) -> str:
    """`moment` (now by default) as fixed-width ISO 8601 UTC text."""
    moment = moment or _local_now()
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class DueScope:
    """Which rows a run may send: its campaign step, the addresses of its list, as of `now`.

    `listed_by` is the run whose list the addresses must be on (`send`); None for
    every row of the step (`remind`, whose rows come from the ledger itself).
    """

    campaign: str
    step: str
    listed_by: int | None
    now: datetime
    # Pending rows only if held back for a send window and due again: `remind` of a
    # campaign's own step, which leaves the rest of its pending rows to `send`.
    held_only: bool = False


@dataclass(frozen=True, slots=True)
class DueRow:
    """A ledger row that is due to be sent, with what is needed to render it."""

    row_id: int
    recipient: Recipient
    message_id: str
    attempts: int

    def __reduce__(self) -> tuple[Any, ...]:
        # As a constructor call: a slots dataclass's own pickling goes through
        # fields() for every row, and each page of due rows crosses from the
        # ledger's process (ledger_process.py).
        return (DueRow, (self.row_id, self.recipient, self.message_id, self.attempts))


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A subscriber a reminder follows: their earlier step's row, and when it was sent."""

    row_id: int
    recipient: Recipient
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run of the run log: what command, when, and what it did."""

    run_id: int
    step: str
    command: str
    started_at: str
    finished_at: str | None
    summary: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One row as `status` reports it."""

    email: str
    step: str
    state: str
    attempts: int
    smtp_code: int | None
    smtp_reply: str | None
    message_id: str
    updated_at: str
    next_attempt_at: str | None


@dataclass(frozen=True, slots=True)
class Suppression:
    """One address on the do-not-mail list, as `suppress list` reports it."""

    email: str
    reason: str
    source: str
    created_at: str


class Ledger:
    """Durable delivery state. Open with `Ledger.open(url)`; close with `close()`."""

    def __init__(self, engine: sa.Engine, location: str, scratch: Path | None = None) -> None:
        self._engine = engine
        self.location = location
        # The folder of a scratch copy, removed on close.
        self._scratch = scratch
        # The hot path's statements, compiled for this engine on first use.
        self._hot: _HotStatements | None = None

    @classmethod
    def open(
        cls,
        url: str,
        *,
        scratch_copy: bool = False,
        durability: Durability = "power",
        campaign: str | None = None,
    ) -> Ledger:
        """Open the ledger at `url`: create it, or bring an older one's schema up to date.

        `url` is an SQLAlchemy URL; a plain `postgresql://` one is opened with psycopg 3.
        With `scratch_copy`, the ledger is copied into a temporary SQLite file and the
        copy is opened: a dry run then sees exactly what a real run would, and writes
        nothing to the real ledger. (A file, not memory: memory must not grow with
        the list.) `campaign` limits the copy of a PostgreSQL ledger to that
        campaign's rows (an SQLite file is copied whole).
        """
        scratch = None
        try:
            location = _redact(url)
        except (ValueError, SQLAlchemyError) as exc:
            raise LedgerError(
                "not a database URL", location="[ledger] url", hint="e.g. postgresql://host/db"
            ) from exc
        ledger = None
        try:
            if scratch_copy:
                engine, scratch = _scratch_copy(url, location, campaign)
            else:
                engine = _connect(url, location, durability)
            ledger = cls(engine, location, scratch)
            ledger._migrate()
        except SQLAlchemyError as exc:
            if ledger is not None:
                ledger.close()
            raise LedgerError(
                f"cannot open: {exc.__class__.__name__}: {_first_line(exc)}",
                location=location,
                hint="check [ledger] path or url in the config",
            ) from exc
        except LedgerError:
            if ledger is not None:
                ledger.close()
            raise
        return ledger

    def close(self) -> None:
        self._engine.dispose()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # -- runs ------------------------------------------------------------------

    def start_run(self, campaign: str, step: str, command: str, *, pid: int | None = None) -> int:
        """Log a new run and return its id; `pid` is the sending process's (default: this one)."""
        with self._write() as conn:
            now = _clock(conn)
            result = conn.execute(
                runs.insert().values(
                    campaign=campaign,
                    step=step,
                    command=command,
                    started_at=now,
                    heartbeat_at=now,
                    host=_this_host(),
                    pid=os.getpid() if pid is None else pid,
                )
            )
            key = result.inserted_primary_key
            assert key is not None  # noqa: S101  # an INSERT into a table with a primary key
            return int(key[0])

    def heartbeat(self, run_id: int) -> None:
        """Say that run `run_id` is alive, so no other run recovers its rows."""
        with self._write() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(heartbeat_at=_clock(conn))
            )

    def finish_run(self, run_id: int, summary: dict[str, Any]) -> None:
        with self._write() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(finished_at=_clock(conn), summary=json.dumps(summary, sort_keys=True))
            )

    # -- loading a list --------------------------------------------------------

    def load(
        self,
        campaign: str,
        step: str,
        run_id: int,
        items: Iterable[tuple[Recipient | Listed, str]],
        *,
        state: State = State.PENDING,
        reply: str | None = None,
        listed: bool = True,
    ) -> int:
        """Record each (recipient, message_id) for this run; new rows start in `state`.

        Returns how many delivery rows were new. A recipient already in the ledger
        keeps its state (a re-run never re-sends what was sent); its list data is
        refreshed, so a corrected name is used for what is still to be sent.
        `reply` is the new rows' note (why a reminder expired). With `listed` False
        the recipients' data and list run are left as they are (`remind` takes its
        recipients from the ledger, not from a list).
        """
        now = timestamp()
        new = 0
        for batch in _batched(items, _BATCH):
            # One commit per batch: a kill mid-list leaves whole batches, and memory
            # holds one batch. On the driver's cursor, as the hot path (_Compiled).
            with self._hot_write() as (cursor, hot):
                if listed:
                    cursor.executemany(
                        hot.upsert_recipient.sql,
                        [
                            hot.upsert_recipient.params(
                                campaign=campaign,
                                email=r.email,
                                line=r.line,
                                data=r.data_json(),
                                seen_run=run_id,
                            )
                            for r, _ in batch
                        ],
                    )
                cursor.executemany(
                    hot.insert_delivery.sql,
                    [
                        hot.insert_delivery.params(
                            campaign=campaign,
                            step=step,
                            email=r.email,
                            state=state.value,
                            attempts=0,
                            smtp_reply=reply,
                            message_id=message_id,
                            updated_at=now,
                        )
                        for r, message_id in batch
                    ],
                )
                # executemany's rowcount is the sum over its rows (sqlite3; psycopg
                # without returning=True): an address already there inserts nothing.
                new += max(cursor.rowcount, 0)
        return new

    # -- sending ----------------------------------------------------------------

    def requeue_unknown(self, campaign: str, step: str, run_id: int) -> int:
        """Make this run's list's `unknown` rows due again (send --resend-unknown).

        They keep their Message-ID, so a copy that did arrive before can be
        recognised as a duplicate downstream.
        """
        listed = sa.select(recipients.c.email).where(
            recipients.c.campaign == campaign, recipients.c.seen_run == run_id
        )
        with self._write() as conn:
            result = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.campaign == campaign,
                    deliveries.c.step == step,
                    deliveries.c.state == State.UNKNOWN.value,
                    deliveries.c.email.in_(listed),
                )
                .values(state=State.PENDING.value, updated_at=timestamp())
            )
            return max(result.rowcount, 0)

    def recover_interrupted(self, campaign: str, step: str) -> int:
        """Rows left `sending` by a run that died become `unknown`; returns how many.

        SMTP cannot tell whether a lost "250" after the final dot meant delivery
        (RFC 1047), so such rows are not sent again unless the operator asks. Rows
        of a run that is still alive (an overlapping cron run) are left alone.
        """
        # Runs of this host whose process is gone. Read before the update, outside
        # its transaction: that is safe, because a dead process never comes back, and
        # a run that starts meanwhile is not in this list, so it counts as alive.
        with self._read() as conn:
            stale = _clock(conn, -STALE_AFTER)
            unfinished = sa.and_(runs.c.finished_at.is_(None), runs.c.heartbeat_at >= stale)
            here = conn.execute(
                sa.select(runs.c.id, runs.c.pid).where(
                    unfinished, runs.c.host == _this_host(), runs.c.pid.is_not(None)
                )
            ).all()
        gone = [run_id for run_id, pid in here if not _running(pid)]
        alive = sa.select(runs.c.id).where(unfinished, runs.c.id.not_in(gone))
        with self._write() as conn:
            result = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.campaign == campaign,
                    deliveries.c.step == step,
                    deliveries.c.state == State.SENDING.value,
                    sa.or_(
                        deliveries.c.claimed_by.is_(None),
                        deliveries.c.claimed_by.not_in(alive),
                    ),
                )
                .values(
                    state=State.UNKNOWN.value,
                    smtp_reply="interrupted while sending: delivery unknown",
                    updated_at=timestamp(),
                )
            )
            return max(result.rowcount, 0)

    def due_page(
        self,
        scope: DueScope,
        after: int = 0,
        *,
        domain: str | None = None,
        exclude: Sequence[str] = (),
        state: State | None = None,
    ) -> list[DueRow]:
        """The next page of rows of this run's list that are pending, or deferred and due.

        Rows come in id order after row `after`; read page by page, memory does not
        grow with the list. With `domain`, only addresses at that domain or its
        subdomains; `exclude` leaves such addresses out. With `state` (PENDING or
        DEFERRED), only those, read in id order from the index on (campaign, step,
        state, id): a page then costs the same at the list's end as at its start,
        however many rows are deferred and not yet due. Without it, both states:
        each page sorts every due row after `after` (a run pages each state alone).
        """
        query = self._due_query(scope, state).where(deliveries.c.id > after)
        if domain is not None:
            query = query.where(_at_domain(domain))
        for other in exclude:
            query = query.where(sa.not_(_at_domain(other)))
        with self._read() as conn:
            page = conn.execute(query.order_by(deliveries.c.id).limit(_BATCH)).all()
        return [
            DueRow(
                row_id=row.id,
                recipient=Recipient.from_data_json(row.email, row.line, row.data),
                message_id=row.message_id,
                attempts=row.attempts,
            )
            for row in page
        ]

    # -- follow-ups (remind) -----------------------------------------------------------

    def steps(self, campaign: str) -> list[str]:
        """The steps this campaign has rows for, in name order."""
        query = (
            sa.select(deliveries.c.step)
            .where(deliveries.c.campaign == campaign)
            .group_by(deliveries.c.step)
            .order_by(deliveries.c.step)
        )
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    def followups(
        self, campaign: str, after_step: str, step: str, sent_before: datetime, after: int = 0
    ) -> list[FollowUp]:
        """The next page (id order, after row `after`) of rows `step` follows and has not yet.

        Those are the subscribers whose `after_step` row is `sent`, since before
        `sent_before`, and who have no `step` row yet. When a row was sent is its
        `updated_at`: nothing changes a `sent` row afterwards.
        """
        later = deliveries.alias("later")
        query = (
            _with_recipient(deliveries.c.id, deliveries.c.updated_at)
            .where(
                deliveries.c.campaign == campaign,
                deliveries.c.step == after_step,
                deliveries.c.state == State.SENT.value,
                deliveries.c.updated_at <= timestamp(sent_before),
                deliveries.c.id > after,
                ~sa.exists().where(
                    later.c.campaign == campaign,
                    later.c.step == step,
                    later.c.email == deliveries.c.email,
                ),
            )
            .order_by(deliveries.c.id)
            .limit(_BATCH)
        )
        with self._read() as conn:
            page = conn.execute(query).all()
        return [
            FollowUp(
                row_id=row.id,
                recipient=Recipient.from_data_json(row.email, row.line, row.data),
                sent_at=datetime.fromisoformat(row.updated_at),
            )
            for row in page
        ]

    def expire_overdue(
        self, campaign: str, after_step: str, step: str, sent_before: datetime, note: str
    ) -> int:
        """A reminder still to send whose earlier step was sent before `sent_before`: `expired`.

        `remind` never sends a reminder late: one made when it was due, then
        deferred (a 4xx), held for a send window or left pending by a stopped run,
        expires like one that was never made. A row being sent now is left alone.
        Returns how many rows expired.
        """
        earlier = deliveries.alias("earlier")
        overdue = sa.exists().where(
            earlier.c.campaign == campaign,
            earlier.c.step == after_step,
            earlier.c.email == deliveries.c.email,
            earlier.c.state == State.SENT.value,
            earlier.c.updated_at < timestamp(sent_before),
        )
        with self._write() as conn:
            result = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.campaign == campaign,
                    deliveries.c.step == step,
                    deliveries.c.state.in_([State.PENDING.value, State.DEFERRED.value]),
                    overdue,
                )
                .values(
                    state=State.EXPIRED.value,
                    smtp_reply=note,
                    next_attempt_at=None,
                    updated_at=timestamp(),
                )
            )
            return max(result.rowcount, 0)

    def retries(
        self, campaign: str, step: str, now: datetime, *, pending: bool, after: int = 0
    ) -> list[tuple[int, Recipient]]:
        """The next page of `step`'s rows to try again now: deferred or held, and due.

        `remind` sends these along with new follow-ups: a deferred retry is due at
        its next attempt time, and a reminder row still `pending` was created by an
        earlier `remind` that stopped (or held back outside the send window).
        """
        # Deferred and due, or held back for a send window and due; with `pending`,
        # every pending row (a reminder's, made by an earlier `remind`).
        due = sa.and_(
            deliveries.c.state.in_([State.DEFERRED.value, State.PENDING.value]),
            deliveries.c.next_attempt_at <= timestamp(now),
        )
        if pending:
            due = sa.or_(
                due,
                sa.and_(
                    deliveries.c.state == State.PENDING.value,
                    deliveries.c.next_attempt_at.is_(None),
                ),
            )
        query = (
            _with_recipient(deliveries.c.id)
            .where(
                deliveries.c.campaign == campaign,
                deliveries.c.step == step,
                deliveries.c.id > after,
                due,
            )
            .order_by(deliveries.c.id)
            .limit(_BATCH)
        )
        with self._read() as conn:
            page = conn.execute(query).all()
        return [(row.id, Recipient.from_data_json(row.email, row.line, row.data)) for row in page]

    def count_due(self, scope: DueScope, state: State | None = None) -> int:
        """How many rows `due_page` gives (of `state` only, with one)."""
        query = self._due_query(scope, state).with_only_columns(sa.func.count())
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def _due_query(self, scope: DueScope, state: State | None = None) -> sa.Select[Any]:
        """Due rows of `scope`: pending or deferred-and-due, or only those of `state`."""
        now = timestamp(scope.now)
        # A pending row with a next attempt time was held back for its send window.
        held_due = deliveries.c.next_attempt_at <= now
        due: dict[State, sa.ColumnElement[bool]] = {
            State.PENDING: sa.and_(
                deliveries.c.state == State.PENDING.value,
                held_due
                if scope.held_only
                else sa.or_(deliveries.c.next_attempt_at.is_(None), held_due),
            ),
            State.DEFERRED: sa.and_(
                deliveries.c.state == State.DEFERRED.value,
                deliveries.c.next_attempt_at <= now,
            ),
        }
        query = _with_recipient(
            deliveries.c.id, deliveries.c.message_id, deliveries.c.attempts
        ).where(
            deliveries.c.campaign == scope.campaign,
            deliveries.c.step == scope.step,
            due[state] if state is not None else sa.or_(*due.values()),
        )
        if scope.listed_by is not None:
            query = query.where(recipients.c.seen_run == scope.listed_by)
        return query

    def claim(self, row_ids: Sequence[int], run_id: int) -> tuple[list[int], list[int]]:
        """Mark rows `sending`, durably, before any of their DATA starts.

        Rows whose address is on the suppression list become `suppressed` instead
        (checked now, at send time, not when the list was loaded). Returns the ids
        claimed and the ids suppressed, in id order; a row another run took
        meanwhile is in neither.
        """
        return self.write_group(claim=row_ids, run_id=run_id)

    def record(
        self,
        results: Sequence[tuple[DeliveryResult, str | None]],
        bounced: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write each outcome, with the next attempt's time if deferred; durable on return.

        Each (email, reply) of `bounced` goes on the do-not-mail list (source
        "bounce") in the same transaction: durable exactly when its failure is.
        """
        self.write_group(results, bounced)

    def write_group(
        self,
        results: Sequence[tuple[DeliveryResult, str | None]] = (),
        bounced: Sequence[tuple[str, str]] = (),
        *,
        claim: Sequence[int] = (),
        run_id: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """`record(results, bounced)` and `claim(claim, run_id)` in one transaction.

        A send's hot path: the results that came back and the claims that workers
        wait for meanwhile share one commit (one flush of the log), see campaign.py.
        Returns what `claim` returns.
        """
        if not (results or bounced or claim):
            return [], []
        if claim and run_id is None:
            raise ValueError("claiming rows needs the run_id that claims them")
        now = timestamp()
        writes: list[tuple[int, tuple[DeliveryResult, str | None] | None]] = [
            (row_id, None) for row_id in claim
        ]
        writes += [(item[0].row_id, item) for item in results]
        # In id order, results and claims alike: on PostgreSQL each UPDATE locks its
        # row, and two runs that lock rows in one order cannot deadlock. (SQLite has
        # one writer at a time; the order costs it nothing.)
        writes.sort(key=lambda write: write[0])
        claimed: list[int] = []
        suppressed: list[int] = []
        with self._hot_write() as (cursor, hot):
            for row_id, outcome in writes:
                if outcome is None:
                    cursor.execute(
                        hot.claim.sql, hot.claim.params(row_id=row_id, run_id=run_id, now=now)
                    )
                    for _, state in cursor.fetchall():
                        (claimed if state == State.SENDING.value else suppressed).append(row_id)
                    continue
                result, next_at = outcome
                cursor.execute(
                    hot.record.sql,
                    hot.record.params(
                        row_id=row_id,
                        new_state=result.state.value,
                        tries=result.attempts,
                        code=result.code,
                        reply=result.reply,
                        next_at=next_at,
                        now=now,
                    ),
                )
            # After the rows, in address order: one lock order for every run here too.
            for email, reply in sorted(bounced):
                cursor.execute(
                    hot.bounce.sql,
                    hot.bounce.params(email=email, reason=reply, source="bounce", created_at=now),
                )
        return claimed, suppressed

    def release(self, row_ids: Sequence[int], run_id: int) -> None:
        """Put claimed rows whose DATA never started back to `pending` (a run stopping early)."""
        if not row_ids:
            return
        with self._write() as conn:
            conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.id.in_(row_ids),
                    deliveries.c.state == State.SENDING.value,
                    deliveries.c.claimed_by == run_id,
                )
                .values(state=State.PENDING.value, claimed_by=None, updated_at=timestamp())
            )

    # -- suppression -------------------------------------------------------------

    def suppress(self, email: str, reason: str, source: str) -> bool:
        """Add `email` to the do-not-mail list; False if it was already there."""
        with self._write() as conn:
            result = conn.execute(
                self._insert(suppressions)
                .values(email=email.lower(), reason=reason, source=source, created_at=timestamp())
                .on_conflict_do_nothing(index_elements=["email"])
                .returning(suppressions.c.email)
            )
            # From RETURNING: through SQLAlchemy, psycopg reports no rowcount for an INSERT.
            return result.first() is not None

    def suppress_many(self, entries: Iterable[tuple[str, str]], source: str) -> int:
        """Add each (email, reason), committed in batches; returns how many were not there yet."""
        added = 0
        for batch in _batched(entries, _BATCH):
            now = timestamp()
            with self._write() as conn:
                # Counted from RETURNING: after an executemany, psycopg may report rowcount -1.
                result = conn.execute(
                    self._insert(suppressions)
                    .on_conflict_do_nothing(index_elements=["email"])
                    .returning(suppressions.c.email),
                    [
                        {"email": email, "reason": reason, "source": source, "created_at": now}
                        for email, reason in batch
                    ],
                )
                added += len(result.all())
        return added

    def unsuppress(self, email: str) -> tuple[bool, int]:
        """Take `email` off the do-not-mail list: whether it was there, and rows released.

        Its rows marked `suppressed` were never sent (the list is checked before
        DATA): they become `pending`, so the next `send` of their campaign mails them.
        """
        with self._write() as conn:
            removed = conn.execute(suppressions.delete().where(suppressions.c.email == email))
            released = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.email == email,
                    deliveries.c.state == State.SUPPRESSED.value,
                )
                .values(state=State.PENDING.value, claimed_by=None, updated_at=timestamp())
            )
            return removed.rowcount > 0, max(released.rowcount, 0)

    def suppressions(self) -> Iterator[Suppression]:
        """The do-not-mail list in address order, streamed page by page."""
        last = ""
        query = sa.select(suppressions).order_by(suppressions.c.email).limit(_BATCH)
        while True:
            with self._read() as conn:
                page = conn.execute(query.where(suppressions.c.email > last)).all()
            for row in page:
                yield Suppression(row.email, row.reason, row.source, row.created_at)
            if len(page) < _BATCH:
                return
            last = page[-1].email

    def suppression_counts(self) -> dict[str, int]:
        """How many addresses the do-not-mail list holds, per source."""
        query = sa.select(suppressions.c.source, sa.func.count()).group_by(suppressions.c.source)
        with self._read() as conn:
            return {source: int(n) for source, n in conn.execute(query).all()}

    # -- reports ------------------------------------------------------------------

    def counts(self, campaign: str, step: str | None = None) -> dict[str, int]:
        query = (
            sa.select(deliveries.c.state, sa.func.count())
            .where(deliveries.c.campaign == campaign)
            .group_by(deliveries.c.state)
        )
        if step is not None:
            query = query.where(deliveries.c.step == step)
        with self._read() as conn:
            return {state: int(n) for state, n in conn.execute(query).all()}

    def rows(self, campaign: str, states: Iterable[str] | None = None) -> Iterator[LedgerRow]:
        """Every row of the campaign (optionally only some states), in id order, streamed."""
        last = 0
        query = (
            sa.select(
                deliveries.c.id,
                deliveries.c.email,
                deliveries.c.step,
                deliveries.c.state,
                deliveries.c.attempts,
                deliveries.c.smtp_code,
                deliveries.c.smtp_reply,
                deliveries.c.message_id,
                deliveries.c.updated_at,
                deliveries.c.next_attempt_at,
            )
            .where(deliveries.c.campaign == campaign)
            .order_by(deliveries.c.id)
            .limit(_BATCH)
        )
        if states is not None:
            query = query.where(deliveries.c.state.in_(list(states)))
        while True:
            with self._read() as conn:
                page = conn.execute(query.where(deliveries.c.id > last)).all()
            for row in page:
                yield LedgerRow(
                    email=row.email,
                    step=row.step,
                    state=row.state,
                    attempts=row.attempts,
                    smtp_code=row.smtp_code,
                    smtp_reply=row.smtp_reply,
                    message_id=row.message_id,
                    updated_at=row.updated_at,
                    next_attempt_at=row.next_attempt_at,
                )
            if len(page) < _BATCH:
                return
            last = page[-1].id

    def recent_runs(self, campaign: str, limit: int = 10) -> list[RunRow]:
        """The campaign's latest runs, newest first: the run log."""
        query = (
            sa.select(
                runs.c.id,
                runs.c.step,
                runs.c.command,
                runs.c.started_at,
                runs.c.finished_at,
                runs.c.summary,
            )
            .where(runs.c.campaign == campaign)
            .order_by(runs.c.id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [
                RunRow(
                    run_id=row.id,
                    step=row.step,
                    command=row.command,
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    summary=json.loads(row.summary) if row.summary else {},
                )
                for row in conn.execute(query)
            ]

    def campaigns(self) -> list[str]:
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(deliveries.c.campaign).distinct().order_by(deliveries.c.campaign)
                ).scalars()
            )

    # -- plumbing ---------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        # ON CONFLICT is spelled the same by both dialects' insert(), not by the generic one.
        if self._engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite_dialect.insert(table)

    def _write(self) -> _Transaction:
        return _Transaction(self._engine, self.location)

    @contextlib.contextmanager
    def _hot_write(self) -> Iterator[tuple[Any, _HotStatements]]:
        """One transaction on the driver's own connection and cursor, committed on success.

        For the statements of `_HotStatements` only; database errors become LedgerError.
        """
        if self._hot is None:
            self._hot = _HotStatements.compile(self._engine.dialect, self._insert)
        driver_error: type[Exception] = self._engine.dialect.loaded_dbapi.Error
        try:
            raw = self._engine.raw_connection()
        except SQLAlchemyError as exc:
            raise LedgerError(_first_line(exc), location=self.location) from exc
        try:
            cursor = raw.cursor()
            try:
                yield cursor, self._hot
                raw.commit()
            except BaseException:
                with contextlib.suppress(driver_error):
                    raw.rollback()
                raise
            finally:
                with contextlib.suppress(driver_error):
                    cursor.close()
        except driver_error as exc:
            # The connection may be dead (a server restart, a dropped socket): discard
            # it rather than give it back to the pool; the next call opens a new one.
            raw.invalidate(exc)
            raise LedgerError(_first_line(exc), location=self.location) from exc
        finally:
            raw.close()  # back to the pool

    def _read(self) -> _Transaction:
        return _Transaction(self._engine, self.location)

    def _migrate(self) -> None:
        """Create the schema in an empty database, or bring an older ledger's up to date.

        An up-to-date ledger costs two small reads. Otherwise the work is one transaction
        (both engines run DDL in transactions, so a kill leaves the old schema or the
        new, never half of it), under a lock, so that two processes opening an old
        ledger at once (cron on two machines) migrate it once.
        """
        with self._engine.connect() as conn:
            if _schema_version(conn) == SCHEMA_VERSION:
                return
        with self._engine.connect() as conn:
            _lock_schema(conn)
            version = _schema_version(conn)
            if version is None:
                metadata.create_all(conn)
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            else:
                _check_not_newer(version, self.location)
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    _MIGRATIONS[step](conn)
                # Deleted and written again: the row may be missing (see _schema_version).
                conn.execute(meta.delete().where(meta.c.key == "schema_version"))
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            conn.commit()


class _Transaction:
    """`with` block: one transaction, committed on success; database errors become LedgerError."""

    def __init__(self, engine: sa.Engine, location: str) -> None:
        self._engine = engine
        self._location = location
        self._context: Any = None

    def __enter__(self) -> sa.Connection:
        try:
            self._context = self._engine.begin()
            conn: sa.Connection = self._context.__enter__()
        except SQLAlchemyError as exc:
            raise LedgerError(_first_line(exc), location=self._location) from exc
        return conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._context.__exit__(exc_type, exc, tb)
        except SQLAlchemyError as error:
            raise LedgerError(_first_line(error), location=self._location) from error
        if isinstance(exc, SQLAlchemyError):
            raise LedgerError(_first_line(exc), location=self._location) from exc


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A Core statement compiled once for one dialect, run on the driver's own cursor.

    Written by hand because SQLAlchemy's `Connection.execute()` spends 0.1 to 0.2 ms
    of Python on each call (cache key, parameter processing, result objects), a send
    makes one claim and one record per message, and under the GIL that time is taken
    from rendering and SMTP: measured, it was most of what the ledger cost a send
    (bench/README.md, "Ledger cost"). The SQL is still SQLAlchemy's, for either
    dialect; only the call is the driver's own (PEP 249), which SQLAlchemy offers
    for this (`Engine.raw_connection`).
    """

    sql: str
    defaults: dict[str, Any]
    # The parameters' order for a positional paramstyle (SQLite's "qmark"); None for
    # a named one (psycopg's "pyformat"), which takes a dict.
    positions: tuple[str, ...] | None

    @classmethod
    def of(
        cls,
        statement: sa.ClauseElement,
        dialect: sa.Dialect,
        column_keys: Sequence[str] | None = None,
    ) -> _Compiled:
        compiled = statement.compile(
            dialect=dialect, column_keys=list(column_keys) if column_keys else None
        )
        assert isinstance(compiled, SQLCompiler)  # noqa: S101  # a DML statement's compiler
        order = compiled.positiontup
        return cls(compiled.string, dict(compiled.params), None if order is None else tuple(order))

    def params(self, **values: Any) -> Any:
        merged = {**self.defaults, **values}
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)


@dataclass(frozen=True, slots=True)
class _HotStatements:
    """The statements a send runs for every message, compiled once per ledger."""

    claim: _Compiled
    record: _Compiled
    bounce: _Compiled
    upsert_recipient: _Compiled
    insert_delivery: _Compiled

    @classmethod
    def compile(cls, dialect: sa.Dialect, insert: Callable[[sa.Table], Any]) -> _HotStatements:
        listed = sa.exists().where(suppressions.c.email == deliveries.c.email)
        claimable = sa.or_(*(deliveries.c.state == state for state in _CLAIMABLE))
        # One statement per row, suppression checked in it: `sending`, or `suppressed`
        # when the address is on the do-not-mail list; nothing when another run took it.
        claim = (
            deliveries.update()
            .where(deliveries.c.id == sa.bindparam("row_id"), claimable)
            .values(
                state=sa.case((listed, State.SUPPRESSED.value), else_=State.SENDING.value),
                claimed_by=sa.case((listed, None), else_=sa.bindparam("run_id", type_=sa.Integer)),
                updated_at=sa.bindparam("now"),
            )
            .returning(deliveries.c.id, deliveries.c.state)
        )
        record = (
            deliveries.update()
            .where(deliveries.c.id == sa.bindparam("row_id"))
            .values(
                state=sa.bindparam("new_state"),
                attempts=deliveries.c.attempts + sa.bindparam("tries", type_=sa.Integer),
                smtp_code=sa.bindparam("code"),
                smtp_reply=sa.bindparam("reply"),
                # A row going back to `pending` unsent (the server went away) keeps the
                # time it was due again at: a deferred retry or a held message stays
                # one, for `remind` to pick up (Ledger.retries).
                next_attempt_at=sa.case(
                    (
                        sa.bindparam("new_state", type_=sa.String) == State.PENDING.value,
                        sa.func.coalesce(
                            sa.bindparam("next_at", type_=sa.String),
                            deliveries.c.next_attempt_at,
                        ),
                    ),
                    else_=sa.bindparam("next_at", type_=sa.String),
                ),
                claimed_by=None,
                updated_at=sa.bindparam("now"),
            )
        )
        bounce = insert(suppressions).on_conflict_do_nothing(index_elements=["email"])
        # A recipient already known keeps its row; its list data and run are refreshed.
        person = insert(recipients)
        upsert_recipient = person.on_conflict_do_update(
            index_elements=["campaign", "email"],
            set_={
                "line": person.excluded.line,
                "data": person.excluded.data,
                "seen_run": person.excluded.seen_run,
            },
        )
        # A delivery row already there keeps its state: a re-run never re-sends.
        insert_delivery = insert(deliveries).on_conflict_do_nothing(
            index_elements=["campaign", "step", "email"]
        )
        return cls(
            claim=_Compiled.of(claim, dialect),
            record=_Compiled.of(record, dialect),
            bounce=_Compiled.of(bounce, dialect, ["email", "reason", "source", "created_at"]),
            upsert_recipient=_Compiled.of(
                upsert_recipient, dialect, ["campaign", "email", "line", "data", "seen_run"]
            ),
            insert_delivery=_Compiled.of(
                insert_delivery,
                dialect,
                [
                    "campaign",
                    "step",
                    "email",
                    "state",
                    "attempts",
                    "smtp_reply",
                    "message_id",
                    "updated_at",
                ],
            ),
        )


def _clock(conn: sa.Connection, offset: float = 0.0) -> str:
    """Now (plus `offset` seconds) as `timestamp` text, by the database's clock where it has one.

    Runs' heartbeats are written by each run and judged stale by another, perhaps
    on another machine sharing a PostgreSQL ledger: one clock, the server's, keeps
    a machine whose clock is minutes behind from having its live run's rows taken
    over as dead (or a dead one's kept). clock_timestamp(), not now(): the time of
    the statement, not of the start of its transaction. An SQLite ledger is a file
    on one machine; its clock is this process's.
    """
    if conn.dialect.name == "postgresql":
        moment: datetime = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
    else:
        moment = _local_now()
    return timestamp(moment + timedelta(seconds=offset))


def _local_now() -> datetime:
    """This machine's clock: the one place the ledger reads it (tests move it)."""
    return datetime.now(UTC)


def _this_host() -> str:
    """This machine, boot and pid namespace: where a run's pid names the same process.

    The host name alone is not enough: two containers may share a name and the
    ledger file while each has its own pids. Where the parts beyond the name are
    missing (not Linux), the name stands alone.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def _running(pid: int) -> bool:
    """Whether a process `pid` exists here; when that cannot be told, assume it does."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows
    try:
        os.kill(pid, 0)  # signal 0: checks only, sends nothing
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


# -- schema migrations ----------------------------------------------------------------
#
# _MIGRATIONS[n] turns a version n-1 ledger into version n. A new ledger is created
# at SCHEMA_VERSION directly from `metadata`; each change to the tables above
# bumps SCHEMA_VERSION and adds its step here, and tests/test_ledger.py checks that
# a version 1 ledger migrated to the end has the tables `metadata` creates.
#
# Small functions on SQLAlchemy Core rather than Alembic: five tables that change
# rarely, one version row that was already there, and nothing to import, ship or
# configure (Alembic needs its own package and Mako, a script folder and env.py
# inside the package, and about 0.2 s more imports on each `send`/`status` that has
# to migrate). Should a step ever need what SQLite's ALTER TABLE cannot do (drop or
# change a column), Alembic's Operations batch mode, imported lazily inside that
# step, is the tool.

_LOCK_KEY = 0x41504D4C  # "APML": the advisory lock that serializes migrations on PostgreSQL


def _schema_version(conn: sa.Connection) -> int | None:
    """The ledger's schema version; None for an empty database."""
    if not sa.inspect(conn).has_table(meta.name):
        return None
    value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    # Release 1 created its tables before writing its version (SQLite DDL was not in the
    # transaction): tables without a version row are a version 1 ledger killed in between.
    return 1 if value is None else int(value)


def _check_not_newer(version: int, location: str) -> None:
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"made by a newer appeal-mailer (schema {version}, this one knows {SCHEMA_VERSION})",
            location=location,
            hint="upgrade appeal-mailer",
        )


def _lock_schema(conn: sa.Connection) -> None:
    """Begin the migrating transaction, holding off any other process that would do the same."""
    if conn.dialect.name == "sqlite":
        # pysqlite begins a transaction only before INSERT/UPDATE/DELETE; take the write
        # lock now, so that the version read next stays true until the commit.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        # Held until commit; keyed by schema, so ledgers in two schemas do not wait on each other.
        conn.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(:key, hashtext(coalesce(current_schema(), '')))"
            ),
            {"key": _LOCK_KEY},
        )


def _add_columns(conn: sa.Connection, table: str, *columns: sa.Column[Any]) -> None:
    """ALTER TABLE ... ADD COLUMN as the connection's dialect spells it (nullable columns)."""
    sa.Table(table, sa.MetaData(), *columns)  # CreateColumn compiles a column of a table
    name = conn.dialect.identifier_preparer.quote(table)
    for column in columns:
        spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {spec}")


def _v2_run_host_and_pid(conn: sa.Connection) -> None:
    """Runs record their host and pid, so that a run killed on this host is known dead at once.

    The columns as version 2 made them, not as `runs` says today: a step is frozen.
    """
    _add_columns(conn, "runs", sa.Column("host", sa.Text), sa.Column("pid", sa.Integer))


def _v3_due_index_in_id_order(conn: sa.Connection) -> None:
    """Due rows are read in id order from an index that has the id in it (see due_page).

    SQLite's old index had the row id in it implicitly; PostgreSQL's did not, and had
    to sort every due row for each page.
    """
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_deliveries_campaign_state")
    conn.exec_driver_sql(
        "CREATE INDEX ix_deliveries_due ON deliveries (campaign, step, state, id)"
    )


def _v4_campaign_rows_in_id_order(conn: sa.Connection) -> None:
    """A campaign's rows are read page by page in id order (`status`): an index for that.

    Without it each page sorted all the campaign's rows: minutes for 1,000,000.
    """
    conn.exec_driver_sql("CREATE INDEX ix_deliveries_campaign_id ON deliveries (campaign, id)")


_MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {
    2: _v2_run_host_and_pid,
    3: _v3_due_index_in_id_order,
    4: _v4_campaign_rows_in_id_order,
}


def _with_recipient(*columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """`columns` of delivery rows, with each row's recipient: address, list line and data."""
    return sa.select(*columns, recipients.c.email, recipients.c.line, recipients.c.data).join(
        recipients,
        sa.and_(
            recipients.c.campaign == deliveries.c.campaign,
            recipients.c.email == deliveries.c.email,
        ),
    )


def _at_domain(domain: str) -> sa.ColumnElement[bool]:
    # Addresses are stored lower-cased; autoescape keeps "_" and "%" literal in LIKE.
    return sa.or_(
        deliveries.c.email.endswith("@" + domain, autoescape=True),
        deliveries.c.email.endswith("." + domain, autoescape=True),
    )


def _sqlite_pragmas(durability: Durability) -> Callable[[Any, Any], None]:
    # WAL lets `status` read while a run writes. In WAL mode, synchronous=NORMAL
    # keeps every commit through a crash of the process but not through power
    # loss; FULL flushes the log on each commit and keeps it through both
    # (https://www.sqlite.org/pragma.html#pragma_synchronous).
    synchronous = "FULL" if durability == "power" else "NORMAL"

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _engine_url(url: str) -> sa.URL:
    """`url` as SQLAlchemy is to open it: the one place that picks the PostgreSQL driver.

    Users write `postgresql://...`; SQLAlchemy would read that as psycopg2, while
    appeal-mailer uses psycopg 3 (the `postgres` extra). An explicit driver is kept.
    """
    parsed = sa.engine.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _connect(url: str, location: str, durability: Durability) -> sa.Engine:
    parsed = _engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        _make_parent(url, location)
        engine = sa.create_engine(parsed)
        sa.event.listen(engine, "connect", _sqlite_pragmas(durability))
        return engine
    # PostgreSQL commits are as durable as the server is set up to make them
    # (synchronous_commit); `durability` is SQLite's.
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = 10  # an unreachable server: fail, do not hang
    try:
        # READ COMMITTED whatever the server's default: `claim` relies on its re-check
        # of a row after waiting for its lock (and a stricter level would fail instead).
        return sa.create_engine(
            parsed, isolation_level="READ COMMITTED", connect_args=connect_args
        )
    except ImportError as exc:
        raise LedgerError(
            f"no driver for this database ({exc.name} is not installed)",
            location=location,
            hint="pip install 'appeal-mailer[postgres]' (psycopg 3)",
        ) from exc


def _scratch_copy(url: str, location: str, campaign: str | None) -> tuple[sa.Engine, Path]:
    folder = Path(tempfile.mkdtemp(prefix="appeal-mailer-dry-run-"))
    copy = folder / "ledger.db"
    try:
        source = _engine_url(url)
        if source.get_backend_name() == "sqlite":
            path = source.database
            if path and Path(path).exists():
                # Read through SQLite itself, so that a ledger in use by a running send
                # is copied consistently.
                disk = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                target = sqlite3.connect(copy)
                try:
                    disk.backup(target)
                finally:
                    disk.close()
                    target.close()
        else:
            _copy_from_server(_connect(url, location, "power"), copy, location, campaign)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    engine = sa.create_engine(f"sqlite:///{copy}")
    # A scratch copy needs no durability: it is thrown away at the end.
    sa.event.listen(engine, "connect", _scratch_pragmas)
    return engine, folder


def _copy_from_server(source: sa.Engine, copy: Path, location: str, campaign: str | None) -> None:
    """Copy a PostgreSQL ledger (only `campaign`'s rows, if given) into the SQLite file `copy`.

    A dry run against PostgreSQL runs on such a copy, like one against SQLite,
    rather than on the real ledger inside one transaction rolled back at the end:
    that transaction would hold the lock of every row the dry run claims until the
    preview is written, so a real `send` of the campaign meanwhile (cron, another
    machine) would wait for it; and all the dry run's work would have to share one
    connection. The copy reads one consistent snapshot (REPEATABLE READ, read
    only: no locks, no writes) through a server-side cursor, so memory stays flat.
    """
    target = sa.create_engine(f"sqlite:///{copy}")
    sa.event.listen(target, "connect", _scratch_pragmas)
    try:
        with source.connect() as src, target.begin() as dst:
            src.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            version = _schema_version(src)
            if version is None:
                return  # nothing there yet: the copy starts empty, like the ledger
            _check_not_newer(version, location)
            if version < SCHEMA_VERSION:
                # Migrating is writing, and a dry run of a new release must not commit
                # the ledger to it.
                raise LedgerError(
                    f"made by an older appeal-mailer (schema {version}, this one "
                    f"writes {SCHEMA_VERSION}); a dry run does not upgrade it",
                    location=location,
                    hint="upgrade it first: `appeal-mailer status` (or a real send) does",
                )
            metadata.create_all(dst)
            for table in metadata.sorted_tables:
                query = sa.select(table)
                if campaign is not None and table in (recipients, deliveries):
                    query = query.where(table.c.campaign == campaign)
                result = src.execute(query, execution_options={"yield_per": _BATCH})
                for part in result.partitions(_BATCH):
                    dst.execute(table.insert(), [row._asdict() for row in part])
    finally:
        source.dispose()
        target.dispose()


def _scratch_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=MEMORY")
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


def _make_parent(url: str, location: str) -> None:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            raise LedgerError(
                f"cannot create its folder {folder}: {exc.strerror or exc}",
                location=location,
                hint="check [ledger] path in the config",
            ) from exc


def _redact(url: str) -> str:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    if "password" in parsed.query:  # libpq also takes it as ?password=...
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
