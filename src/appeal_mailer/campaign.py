"""Run one campaign step: list -> recipient -> ledger row -> message -> transport -> ledger.

Every message is rendered before the first is sent (``prepare``); then the
list is recorded in the ledger and the rows that are due flow through a
pipeline: render, rate limit, claim (``sending``, durable), deliver, record.
All ledger work runs on one thread, so commits are grouped and the event
loop keeps the SMTP sessions busy while SQLite flushes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, ParamSpec, Protocol, TypeVar

from appeal_mailer import timezones
from appeal_mailer.bounces import mailbox_gone
from appeal_mailer.config import Settings
from appeal_mailer.dkim import Signer, Unsigned
from appeal_mailer.errors import AppealMailerError, LedgerError, PreviewError, ServerError
from appeal_mailer.ledger import HEARTBEAT, DueRow, DueScope, Ledger, timestamp
from appeal_mailer.ledger_process import LedgerCall, LedgerProcess, LocalLedger
from appeal_mailer.lists import read_recipients
from appeal_mailer.mime import MessageBuilder
from appeal_mailer.models import (
    DeliveryResult,
    Envelope,
    Listed,
    Recipient,
    RenderedMessage,
    SkippedRow,
    State,
)
from appeal_mailer.ratelimit import RateLimiter
from appeal_mailer.reminders import Expired, RemindStep
from appeal_mailer.render import Languages
from appeal_mailer.signing import SigningProcess
from appeal_mailer.transport import Transport

T = TypeVar("T")
P = ParamSpec("P")
# Reports keep the first rows of each kind in full; the rest are counted.
REPORT_ROWS = 1000
# This many messages in a row that could not even reach the server: stop the run.
_UNREACHABLE_STREAK = 10
# Claims are grouped: one commit marks up to this many rows `sending`.
_CLAIM_BATCH = 64
# Rows of the list per ledger commit while loading it.
_LOAD_BATCH = 500
# DKIM: messages of a lane waiting for their signatures, so that the child always
# has the next ones to sign (each holds its wire bytes: 64 x 6 KB).
_SIGNING_AHEAD = 64
# How a message held back for its send window is noted in the ledger.
HELD = "outside the send window: held"


class Progress(Protocol):
    """Where a run reports progress: a progress bar in a terminal, log lines elsewhere."""

    def start(self, total: int) -> None: ...

    def advance(self, result: DeliveryResult) -> None: ...

    def finish(self) -> None: ...


@dataclass
class Preflight:
    """The list read and every message rendered: what a run is about to do."""

    # The list file, or for `remind` where in the ledger the recipients come from.
    list_path: Path | str
    valid: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    skipped_count: int = 0
    sample: bytes | None = None
    sample_recipient: Recipient | None = None
    # The recipients checked, in list order, in a temporary file (memory stays flat):
    # the run sends to exactly these, even if the list file changes meanwhile, and
    # does not parse and validate the list a second time.
    checked: IO[bytes] = field(default_factory=tempfile.TemporaryFile)
    # `remind`: reminders that came due too long ago, recorded `expired`, never sent.
    expired: IO[bytes] = field(default_factory=tempfile.TemporaryFile)
    expired_count: int = 0
    # Recipients by the language version they get (not the default's), and those
    # whose language has no version, by language: they get the default.
    languages: dict[str, int] = field(default_factory=dict)
    fell_back: dict[str, int] = field(default_factory=dict)
    # The first few of them, by language, for the report: who fell back.
    fell_back_examples: dict[str, list[str]] = field(default_factory=dict)

    def keep(self, recipient: Recipient) -> None:
        _spool(self.checked, recipient)

    def keep_expired(self, recipient: Recipient) -> None:
        _spool(self.expired, recipient)
        self.expired_count += 1

    def recipients(self) -> Iterator[Listed]:
        """The checked recipients, read back from the start, as the ledger records them."""
        return _unspool(self.checked)

    def expired_recipients(self) -> Iterator[Listed]:
        return _unspool(self.expired)

    def close(self) -> None:
        self.checked.close()
        self.expired.close()


def _spool(spool: IO[bytes], recipient: Recipient) -> None:
    # One line each: address, list line, data; JSON escapes any tab or line break.
    spool.write(f"{recipient.email}\t{recipient.line}\t{recipient.data_json()}\n".encode())


def _unspool(spool: IO[bytes]) -> Iterator[Listed]:
    spool.seek(0)
    for raw in spool:
        email, line, data = raw.decode().rstrip("\n").split("\t", 2)
        yield Listed(email, int(line), data)


@dataclass
class RunReport:
    """What one run did, for the summary, the exit status and the ledger's run log."""

    campaign: str
    step: str
    dry_run: bool
    preflight: Preflight
    recovered_unknown: int = 0
    requeued_unknown: int = 0
    new_rows: int = 0
    # `remind`: reminders recorded `expired` by this run (came due too long ago).
    expired: int = 0
    due: int = 0
    sent: int = 0
    suppressed: int = 0
    # Addresses put on the do-not-mail list because the server said they do not exist.
    bounced: int = 0
    failed: list[DeliveryResult] = field(default_factory=list)
    deferred: list[DeliveryResult] = field(default_factory=list)
    unknown: list[DeliveryResult] = field(default_factory=list)
    released: int = 0
    # Not sent now: outside the subscriber's send window, pending until it opens.
    held: int = 0
    stopped: str | None = None
    stopped_hint: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def trouble(self) -> bool:
        """Some message failed, is deferred or unknown, or the run stopped early."""
        settled = {State.FAILED.value, State.DEFERRED.value, State.UNKNOWN.value}
        return self.stopped is not None or any(self.counts.get(s, 0) for s in settled)

    @property
    def stopped_before_sending(self) -> bool:
        """The run stopped (a server problem, a signal) before any message went out."""
        delivered = self.sent or self.failed or self.deferred or self.unknown
        return self.stopped is not None and not delivered

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "list": str(self.preflight.list_path),
            "valid": self.preflight.valid,
            "skipped": self.preflight.skipped_count,
            "due": self.due,
            "sent": self.sent,
            "failed": len(self.failed),
            "deferred": len(self.deferred),
            "unknown": len(self.unknown),
            "suppressed": self.suppressed,
            "bounced": self.bounced,
            "expired": self.expired,
            "held": self.held,
            "stopped": self.stopped,
        }


@dataclass(frozen=True, slots=True)
class _Job:
    envelope: Envelope
    attempts_before: int
    # The subscriber's time zone, for the send window.
    timezone: str


Claims = tuple[list[int], list[int]]
_Results = list[tuple[DeliveryResult, str | None]]


class _GroupCommit:
    """Results and claims that wait for the ledger at the same time share one commit.

    One ledger transaction is in flight at a time; whatever is asked for meanwhile
    (the results that came back, the rows that workers need next) goes into the
    next one together: a commit, and its flush of the log, serves them all
    (Ledger.write_group). Each commit holds exactly what was asked for before it,
    in order: a prefix of the requests, never a later one without an earlier.
    """

    def __init__(
        self, write: Callable[[_Results, list[tuple[str, str]], list[int]], Any], location: str
    ) -> None:
        # `write(results, bounced, claim)` returns an awaitable of (claimed, suppressed).
        self._write = write
        self._location = location  # the ledger's, for errors
        self._results: _Results = []
        self._bounced: list[tuple[str, str]] = []
        self._claims: list[int] = []
        self._waiting: list[asyncio.Future[Claims]] = []
        self._writer: asyncio.Task[None] | None = None
        # Set by the first commit that fails: nothing after it is written (the run
        # stops), or a claim could commit while the failed results' rows are still
        # `sending`, and a crash then would leave more rows unknown than the bound.
        self._failed: Exception | None = None

    def claim(self, row_ids: list[int]) -> asyncio.Future[Claims]:
        """Claim `row_ids`: resolves to all the ids claimed and suppressed by the commit."""
        self._claims += row_ids
        return self._request()

    def record(self, results: _Results, bounced: list[tuple[str, str]]) -> asyncio.Future[Claims]:
        """Record `results` (and put `bounced` on the do-not-mail list): resolves when durable."""
        self._results += results
        self._bounced += bounced
        return self._request()

    def _request(self) -> asyncio.Future[Claims]:
        done: asyncio.Future[Claims] = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            done.set_exception(self._failed)
            return done
        self._waiting.append(done)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        return done

    async def _drain(self) -> None:
        waiting: list[asyncio.Future[Claims]] = []
        try:
            while self._waiting:
                # One turn of the loop first: whatever the request just made wakes
                # (a claim for the places a record gave back) joins this commit.
                await asyncio.sleep(0)
                waiting, self._waiting = self._waiting, []
                results, self._results = self._results, []
                bounced, self._bounced = self._bounced, []
                claims, self._claims = self._claims, []
                try:
                    if self._failed is not None:
                        raise self._failed
                    outcome = await self._write(results, bounced, claims)
                except Exception as exc:  # each waiter decides what a failure means
                    self._failed = self._failed or exc
                    for future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for future in waiting:
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._writer = None
            # Torn down (cancelled): nobody may wait forever, and every waiter's
            # `except AppealMailerError` treats this as the failed commit it is.
            for future in waiting + self._waiting:
                if not future.done():
                    future.set_exception(
                        LedgerError("the run ended before this commit", location=self._location)
                    )


class CampaignRun:
    """One `send` of a campaign step to a list, or one `remind` step, through one transport."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | LocalLedger | LedgerProcess,
        transport: Transport,
        *,
        template: str,
        list_path: Path | None = None,
        remind: RemindStep | None = None,
        dry_run: bool = False,
        limit: int | None = None,
        now: datetime | None = None,
        pace: RateLimiter | None = None,
        resend_unknown: bool = False,
    ) -> None:
        self.settings = settings
        # Where the ledger's calls run: a child process (ledger_process.py) or a thread.
        self.ledger = LocalLedger(ledger) if isinstance(ledger, Ledger) else ledger
        self.transport = transport
        # `send` sends `template` to `list_path`; `remind` one step whose recipients
        # come from the ledger (reminders.py).
        self.remind = remind
        if remind is not None:
            template = remind.template
        self.step = remind.step if remind is not None else template
        self.source: Path | str = remind.label if remind is not None else list_path or Path()
        self.dry_run = dry_run
        self.limit = limit
        # Paces each message's first attempt per domain; the transport paces the rest.
        self.pace = pace
        self.resend_unknown = resend_unknown
        self.now = now or datetime.now(UTC)
        campaign = settings.campaign
        unsubscribe_key = campaign.unsubscribe_key
        self.builder = MessageBuilder(
            campaign,
            unsubscribe_key=unsubscribe_key.get_secret_value().encode()
            if unsubscribe_key
            else None,
        )
        # [dkim]: every message is signed as it becomes wire bytes, previews too, so
        # that a dry run shows what is sent; a bad key stops here (ConfigError).
        self.signer = Signer.from_settings(settings.dkim, settings.source)
        sender_name, sender_address = campaign.sender
        list_name, list_id = campaign.list_id_parts
        # The template in each language it has a version in (templates/ru/...).
        self.languages = Languages(
            campaign.templates,
            template,
            campaign={
                "id": campaign.id,
                "name": list_name,
                "list_id": list_id,
                "timezone": campaign.timezone,
                "context": campaign.context,
            },
            sender={"name": sender_name, "address": sender_address},
            default_timezone=campaign.timezone,
            default_language=campaign.language,
            now=self.now,
            fallbacks=campaign.fallback_languages,
        )
        self._sender_address = sender_address
        self._started = time.monotonic()
        # `remind`: reminders that prepare() found made but overdue, now `expired`.
        self.expired_before = 0
        self._stop = asyncio.Event()
        self._stop_reason: str | None = None
        self._stop_error: AppealMailerError | None = None

    # -- before anything is sent -------------------------------------------------

    def prepare(self) -> Preflight:
        """Read the whole list and render every message; raise on the first that cannot be.

        Nothing is written and nothing is sent: a variable missing for one
        subscriber stops here, naming that subscriber's line.
        """
        if self.remind is not None:
            # Before the list of who is due is read: reminders due too long ago, made
            # earlier and not sent since (deferred, held, a stopped run), expire.
            self.expired_before = self.remind.expire_overdue(self.ledger)
        while True:
            preflight = Preflight(list_path=self.source)
            try:
                again = self._check(preflight)
            except BaseException:
                preflight.close()
                raise
            if not again:
                return preflight
            # The message turned out to be personal after all (Renderer.check): the
            # recipients checked against the shared text are checked again, each on
            # their own, so that none can fail once sending has begun.
            preflight.close()

    def _check(self, preflight: Preflight) -> bool:
        """One pass over the list; True if it must start again (see prepare)."""
        self.languages.reset()
        checked: collections.Counter[str] = collections.Counter()
        for item in self._items():
            if isinstance(item, Expired):
                preflight.keep_expired(item.recipient)
                continue
            if isinstance(item, SkippedRow):
                preflight.skipped_count += 1
                if len(preflight.skipped) < REPORT_ROWS:
                    preflight.skipped.append(item)
                continue
            # Rendering is what can fail for one subscriber; building the wire bytes
            # from a rendered message cannot (mime.py raises nothing).
            renderer = self.languages.pick(item, count=True)
            # Each language's renderer checks its own first recipients, then one in
            # 500 of its own (Renderer.check): a version whose readers all sit in the
            # middle of the list is checked like any other.
            personal = renderer.check(
                item,
                unsubscribe_url=self.builder.unsubscribe_urls(item.email)[0],
                step=self.step,
                index=checked[renderer.name],
            )
            checked[renderer.name] += 1
            if personal and preflight.valid > 0:
                return True
            if preflight.sample is None:
                preflight.sample, preflight.sample_recipient = self.wire_bytes(item), item
            preflight.keep(item)
            preflight.valid += 1
        preflight.languages = dict(self.languages.used)
        preflight.fell_back = dict(self.languages.fell_back)
        preflight.fell_back_examples = {
            language: list(who) for language, who in self.languages.fell_back_examples.items()
        }
        return False

    def _items(self) -> Iterator[Recipient | SkippedRow | Expired]:
        if self.remind is not None:
            return self.remind.recipients(self.ledger)
        return read_recipients(Path(self.source))

    def wire_bytes(self, recipient: Recipient) -> bytes:
        data = self._unsigned_bytes(recipient)
        return data if self.signer is None else self.signer.sign(data)

    def _unsigned_bytes(self, recipient: Recipient) -> bytes:
        message = self._render(recipient)
        return self.builder.build(
            message,
            message_id=self.builder.message_id(self.step, recipient.email),
            date=datetime.now(UTC),
        )

    def _render(self, recipient: Recipient) -> RenderedMessage:
        return self.languages.pick(recipient).render(
            recipient,
            unsubscribe_url=self.builder.unsubscribe_urls(recipient.email)[0],
            step=self.step,
        )

    def stop(self, reason: str, error: AppealMailerError | None = None) -> None:
        """Stop taking new messages; those in flight finish and are recorded."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop_error = error
        self._stop.set()

    # -- the run --------------------------------------------------------------------

    async def run(self, preflight: Preflight, progress: Progress | None = None) -> RunReport:
        """Record the list in the ledger and deliver every due message."""
        campaign = self.settings.campaign.id
        report = RunReport(campaign, self.step, self.dry_run, preflight)
        command = "remind" if self.remind is not None else "send"
        command += " --dry-run" if self.dry_run else ""
        await self.ledger.attach()
        try:
            run_id = await self._db(
                Ledger.start_run, campaign, self.step, command, pid=os.getpid()
            )
            report.recovered_unknown = await self._db(
                Ledger.recover_interrupted, campaign, self.step
            )
            report.new_rows = await self._load(run_id, preflight.recipients())
            report.expired = self.expired_before
            if preflight.expired_count and self.remind is not None:
                report.expired += await self._load(
                    run_id,
                    preflight.expired_recipients(),
                    state=State.EXPIRED,
                    reply=self.remind.expired_note,
                )
            if self.resend_unknown:
                report.requeued_unknown = await self._db(
                    Ledger.requeue_unknown, campaign, self.step, run_id
                )
            heartbeat = asyncio.create_task(self._heartbeat(run_id))
            try:
                await self._deliver(run_id, report, progress)
            finally:
                heartbeat.cancel()
                report.stopped = self._stop_reason
                report.stopped_hint = self._stop_error.hint if self._stop_error else None
                report.counts = await self._db(Ledger.counts, campaign, self.step)
                await self._db(Ledger.finish_run, run_id, report.summary())
        finally:
            await self.ledger.detach()
            preflight.close()
        return report

    async def _load(
        self,
        run_id: int,
        recipients: Iterable[Listed],
        *,
        state: State = State.PENDING,
        reply: str | None = None,
    ) -> int:
        """Record the checked recipients in the ledger, a batch per commit; returns the new rows.

        Each batch is read and sent while the ledger commits the one before.
        """
        campaign = self.settings.campaign.id
        listed = self.remind is None  # remind's recipients are the ledger's own
        new = 0
        in_flight: list[asyncio.Future[int]] = []
        try:
            for batch in _batched(self._with_ids(recipients), _LOAD_BATCH):
                in_flight.append(
                    self._db(
                        Ledger.load,
                        campaign,
                        self.step,
                        run_id,
                        batch,
                        state=state,
                        reply=reply,
                        listed=listed,
                    )
                )
                if len(in_flight) > 1:
                    new += await in_flight.pop(0)
            while in_flight:
                new += await in_flight.pop(0)
        finally:
            # Left by a failed batch: the one after it. Waited for (its commit is
            # harmless, a re-run loads the rest) so that no error goes unread.
            for future in in_flight:
                with contextlib.suppress(Exception):
                    await future
        return new

    async def _heartbeat(self, run_id: int) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            with contextlib.suppress(AppealMailerError):  # a missed beat is not fatal
                await self._db(Ledger.heartbeat, run_id)

    def _with_ids(self, recipients: Iterable[Listed]) -> Iterator[tuple[Listed, str]]:
        for recipient in recipients:
            yield recipient, self.builder.message_id(self.step, recipient.email)

    async def _deliver(self, run_id: int, report: RunReport, progress: Progress | None) -> None:
        campaign = self.settings.campaign.id
        # A remind of a campaign's own step only retries, and sends what a send window
        # held back: the rest of its pending rows are for `send` (its list) to send.
        held_only = self.remind is not None and not self.remind.adds_rows
        scope = DueScope(
            campaign, self.step, None if self.remind else run_id, self.now, held_only=held_only
        )
        # Retries that are due first (they have waited longest), then the rest.
        states = (State.DEFERRED, State.PENDING)
        report.due = 0
        for state in states:
            report.due += await self._db(Ledger.count_due, scope, state)
        todo = report.due if self.limit is None else min(report.due, self.limit)
        if todo == 0:
            return
        # [dkim]: the RSA signatures are made by a child process (signing.py), forked
        # here, before any SMTP connection or thread (the progress bar's) exists: it
        # holds no copy of a socket the server should see closed, and no lock.
        signing = await SigningProcess.start(self.signer) if self.signer is not None else None
        try:
            await self._pipeline(run_id, report, progress, scope, states, todo, signing)
        finally:
            # Signatures not taken (the run stopped) are dropped; their rows stay due.
            if signing is not None:
                await signing.close()

    async def _pipeline(  # noqa: PLR0917  # what _deliver found due, passed on as it is
        self,
        run_id: int,
        report: RunReport,
        progress: Progress | None,
        scope: DueScope,
        states: tuple[State, ...],
        todo: int,
        signing: SigningProcess | None,
    ) -> None:
        """Deliver the `todo` rows due in `scope`: render, claim, send, record."""
        if progress is not None:
            progress.start(todo)
        # Only now, with something to send: a wrong password or a server without
        # STARTTLS stops the run here, before any message.
        await self.transport.open()
        # Known once the transport is open (with PIPELINING, two a session).
        in_flight = self.transport.in_flight
        feed: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=_CLAIM_BATCH * 2)
        ready: asyncio.Queue[_Job | None] = asyncio.Queue()
        results: asyncio.Queue[tuple[DeliveryResult, str | None] | None] = asyncio.Queue()
        unsent: list[int] = []
        produced = 0
        lanes = self._lanes()

        async def produce(domain: str | None, exclude: tuple[str, ...]) -> None:
            nonlocal produced
            try:
                # Each state paged on its own (Ledger.due_page).
                for state in states:
                    await produce_state(state, domain, exclude)
            except Exception as exc:  # any failure stops the run cleanly
                self.stop(f"could not prepare the next message: {exc}", _error(exc))
            finally:
                await feed.put(None)

        async def produce_state(
            state: State, domain: str | None, exclude: tuple[str, ...]
        ) -> None:
            nonlocal produced
            after = 0
            # Messages waiting for their DKIM signatures, in the ledger's order. A
            # domain's own lane waits for each: its messages were paced before they
            # were signed, and held back here they would go out in a burst.
            signed: collections.deque[tuple[DueRow, Unsigned, asyncio.Future[bytes]]]
            signed = collections.deque()
            ahead = 1 if domain is not None and self.pace is not None else _SIGNING_AHEAD
            try:
                while produced < todo and not self._stop.is_set():
                    page = await self._db(
                        Ledger.due_page, scope, after, domain=domain, exclude=exclude, state=state
                    )
                    if not page:
                        break
                    for due in page:
                        if produced >= todo or self._stop.is_set():
                            break
                        # Counted before waiting for the domain's pace, so that two
                        # lanes cannot both take the last place under --limit.
                        produced += 1
                        if domain is not None and self.pace is not None:
                            await self.pace.acquire_domain(domain)
                        if self.signer is None or signing is None:
                            await feed.put(self._job(due, self.wire_bytes(due.recipient)))
                            continue
                        # The child signs while this process renders the next messages.
                        unsigned = self.signer.prepare(self._unsigned_bytes(due.recipient))
                        signed.append((due, unsigned, signing.rsa(unsigned.signed)))
                        if len(signed) >= ahead:
                            await put_signed(*signed.popleft())
                    after = page[-1].row_id
                while signed:
                    await put_signed(*signed.popleft())
            finally:
                # Left by a failure: their rows were not claimed and stay due. A
                # failed signature is read here, or asyncio would log it as lost.
                for *_, signature in signed:
                    if signature.done() and not signature.cancelled():
                        signature.exception()
                    signature.cancel()

        async def put_signed(
            due: DueRow, unsigned: Unsigned, signature: asyncio.Future[bytes]
        ) -> None:
            await feed.put(self._job(due, unsigned.finish(await signature)))

        # Rows are claimed only as workers can take them: a crash turns every
        # `sending` row into `unknown`, never re-sent, so claiming ahead of the pace
        # would lose the rest of the list. There is a place for each message the
        # transport can have in flight (two a session with PIPELINING: the next
        # one's envelope follows the data of the one before, transport._end_data)
        # and one more a session, for a message claimed next, so that claim commits
        # overlap the SMTP work. A row keeps its place until its result is on its
        # way to the ledger, not just until its reply came: the place goes to a
        # claim that is committed with that result or after it (_GroupCommit
        # commits requests in order), so the ledger never holds more than `places`
        # rows `sending` (3 x connections with PIPELINING and no rate, else 2 x), and a crash
        # leaves at most that many unknown, however far the ledger lags behind the
        # server. With two places a session instead of three, a send over a 10 ms
        # round trip went 22 % slower: a message waiting for its claim leaves its
        # session without a message to follow the one before (bench/README.md).
        places = in_flight + self.transport.connections
        free = asyncio.Semaphore(places)
        ledger = _GroupCommit(
            lambda results, bounced, claims: self._db(
                Ledger.write_group, results, bounced, claim=claims, run_id=run_id
            ),
            self.ledger.location,
        )

        claiming: set[asyncio.Task[None]] = set()

        async def claim_batch(batch: list[_Job]) -> None:
            try:
                await self._claim(batch, ledger, ready, free, report, progress)
            except Exception as exc:  # any failure stops the run cleanly
                self.stop(f"could not claim the next messages: {exc}", _error(exc))
                # _claim fails before handing any job on: the batch's places come
                # back, or claim() could wait for them for ever (no job, no result).
                for _ in batch:
                    free.release()

        async def claim() -> None:
            producing = len(lanes)
            try:
                while producing:
                    first = await feed.get()
                    if first is None:
                        producing -= 1
                        continue
                    if self._stop.is_set():
                        continue  # drained, not claimed: it stays due for the next run
                    await free.acquire()
                    if self._stop.is_set():  # stopped while waiting for a place
                        free.release()
                        continue
                    batch = [first]
                    # Group the claims of workers free at the same time into one commit.
                    while len(batch) < _CLAIM_BATCH and not feed.empty() and not free.locked():
                        job = feed.get_nowait()
                        if job is None:
                            producing -= 1
                            continue
                        await free.acquire()  # returns at once: not locked
                        batch.append(job)
                    # Not awaited here: places given back while this batch's commit is
                    # in flight are claimed at once, to ride in the very next commit
                    # (waiting would leave them for the commit after that, and workers
                    # idle meanwhile).
                    task = asyncio.create_task(claim_batch(batch))
                    claiming.add(task)
                    task.add_done_callback(claiming.discard)
            except Exception as exc:  # any failure stops the run cleanly
                self.stop(f"could not claim the next messages: {exc}", _error(exc))
                while producing:  # let the producers finish: they stop at the flag
                    if await feed.get() is None:
                        producing -= 1
            finally:
                # Every claim in flight hands its jobs to `ready` before the end marks.
                while claiming:
                    await asyncio.wait(list(claiming))
                for _ in range(in_flight):
                    await ready.put(None)

        async def deliver() -> None:
            while (job := await ready.get()) is not None:
                if self._stop.is_set():
                    unsent.append(job.envelope.row_id)
                    free.release()
                    continue
                # _send returns a result for every failure; record() frees the place.
                await results.put(await self._send(job))

        Recorded = tuple[_Results, list[tuple[str, str]], asyncio.Future[Claims]]

        async def record() -> None:
            # Results go to the ledger as they come; what each commit confirms is counted
            # by account(), in commit order. Recording does not wait for a commit before
            # handing over the next results: their places would come back a commit late.
            accounting: asyncio.Queue[Recorded | None] = asyncio.Queue()
            accountant = asyncio.create_task(account(accounting))
            try:
                done = False
                while not done:
                    batch: _Results = []
                    item = await results.get()
                    while item is not None:
                        batch.append(item)
                        if results.empty():
                            break
                        item = results.get_nowait()
                    done = item is None
                    if not batch:
                        continue
                    # A reply saying the mailbox does not exist suppresses the address,
                    # in the same commit as the failure (the rule: bounces.py).
                    bounced = [
                        (result.recipient, f"{result.code} {result.reply or ''}".rstrip())
                        for result, _ in batch
                        if result.state is State.FAILED and mailbox_gone(result.code, result.reply)
                    ]
                    durable = ledger.record(batch, bounced)
                    for _ in batch:
                        free.release()  # to claims that commit with these results or after
                    accounting.put_nowait((batch, bounced, durable))
            finally:
                accounting.put_nowait(None)
                await accountant

        async def account(accounting: asyncio.Queue[Recorded | None]) -> None:
            streak = 0
            while (recorded := await accounting.get()) is not None:
                batch, bounced, durable = recorded
                try:
                    await durable
                except AppealMailerError as exc:
                    # Not recorded: these rows stay `sending`, so the next run marks
                    # them unknown rather than sending them again.
                    self.stop(f"could not record results: {exc}", exc)
                    continue
                report.bounced += len(bounced)
                for result, _ in batch:
                    streak = streak + 1 if _unreachable(result) else 0
                    self._count(report, result)
                    if progress is not None and result.state is not State.PENDING:
                        progress.advance(result)
                if streak >= _UNREACHABLE_STREAK:
                    self.stop(f"{streak} messages in a row could not reach the server")

        recorder = asyncio.create_task(record())

        def recorder_ended(task: asyncio.Task[None]) -> None:
            # Only recording gives claim() its places back: should it fail (a bug), stop
            # the run and give them all back, so that nothing waits for them forever.
            error = None if task.cancelled() else task.exception()
            if isinstance(error, Exception):
                self.stop(f"could not record results: {error!r}", _error(error))
                for _ in range(places):
                    free.release()

        recorder.add_done_callback(recorder_ended)
        try:
            workers = [deliver() for _ in range(in_flight)]
            producers = [produce(domain, exclude) for domain, exclude in lanes]
            await asyncio.gather(*producers, claim(), *workers)
        finally:
            await results.put(None)
            # A failed recorder has already stopped the run (recorder_ended); what
            # follows must still run: close the sessions, give back unsent claims.
            with contextlib.suppress(Exception):
                await recorder
            # Closing is QUIT on each session: its failure cannot change any result.
            # A preview's is its last index rows: that the run must say.
            try:
                await self.transport.close()
            except PreviewError as exc:
                self.stop(str(exc), exc)
            except Exception:  # noqa: S110  # QUIT failing says nothing about a message
                pass
            if unsent:
                await self._db(Ledger.release, unsent, run_id)
                report.released += len(unsent)
            if progress is not None:
                progress.finish()

    def _job(self, due: DueRow, data: bytes) -> _Job:
        envelope = Envelope(
            due.row_id, self._sender_address, due.recipient.email, due.message_id, data
        )
        return _Job(
            envelope, due.attempts, due.recipient.timezone or self.settings.campaign.timezone
        )

    def _lanes(self) -> list[tuple[str | None, tuple[str, ...]]]:
        """One lane per rate-limited domain and one for all others, never overlapping.

        Each lane reads its own rows from the ledger, so a slow domain paces only
        its own messages and nothing is buffered while it waits. A lane for
        example.net leaves out a separately limited mail.example.net.
        """
        limited = sorted(self.pace.limited_domains()) if self.pace is not None else []
        lanes: list[tuple[str | None, tuple[str, ...]]] = [
            (domain, tuple(d for d in limited if d.endswith("." + domain))) for domain in limited
        ]
        lanes.append((None, tuple(limited)))
        return lanes

    async def _claim(  # noqa: PLR0917  # the pipeline's shared parts, passed explicitly
        self,
        batch: list[_Job],
        ledger: _GroupCommit,
        ready: asyncio.Queue[_Job | None],
        free: asyncio.Semaphore,
        report: RunReport,
        progress: Progress | None,
    ) -> None:
        # The commit may hold other waiters' claims too: each takes only its own rows.
        claimed, suppressed = map(set, await ledger.claim([job.envelope.row_id for job in batch]))
        for job in batch:
            row_id = job.envelope.row_id
            if row_id in claimed:
                claimed.discard(row_id)  # each claimed row goes out once
                await ready.put(job)
                continue
            free.release()
            if row_id in suppressed:
                suppressed.discard(row_id)
                report.suppressed += 1
                if progress is not None:
                    progress.advance(_suppressed(job.envelope))

    async def _send(self, job: _Job) -> tuple[DeliveryResult, str | None]:
        try:
            held = self._held(job)
        except Exception as exc:  # a bug: nothing was sent, the row goes back to pending
            self.stop(f"internal error checking the send window: {exc!r}", _error(exc))
            return self._not_sent(job, f"internal error: {exc!r}"), None
        if held is not None:
            return held
        allowed = min(
            self.settings.sending.attempts_per_run,
            self.settings.sending.max_attempts - job.attempts_before,
        )
        try:
            result = await self.transport.send(job.envelope, attempts_allowed=allowed)
        except (ServerError, PreviewError) as exc:  # nothing more can go through it
            self.stop(str(exc), exc)
            result = self._not_sent(job, str(exc))
        except Exception as exc:  # a bug must not leave the row in limbo
            # Whether any byte reached the server is not known: recorded unknown,
            # never re-sent on its own (the same rule as a lost reply, RFC 1047).
            self.stop(f"internal error while sending: {exc!r}", _error(exc))
            result = DeliveryResult(
                row_id=job.envelope.row_id,
                recipient=job.envelope.recipient,
                state=State.UNKNOWN,
                attempts=1,
                reply=f"internal error: {exc!r}",
            )
        return self._settle(result, job.attempts_before)

    @staticmethod
    def _not_sent(job: _Job, reply: str) -> DeliveryResult:
        """Nothing reached the server: the row goes back to `pending`, its attempts unchanged."""
        return DeliveryResult(
            row_id=job.envelope.row_id,
            recipient=job.envelope.recipient,
            state=State.PENDING,
            attempts=0,
            reply=reply,
        )

    def _held(self, job: _Job) -> tuple[DeliveryResult, str | None] | None:
        """Outside the subscriber's send window: back to `pending` until it opens, unsent."""
        window = self.settings.sending.send_window
        if window is None:
            return None
        # The run's clock: --now plus the time the run has taken so far.
        now = self.now + timedelta(seconds=time.monotonic() - self._started)
        opening = timezones.window_opening(
            now, job.timezone, window.opens, window.closes, window.weekdays
        )
        if opening is None:
            return None
        local = opening.astimezone(timezones.zone(job.timezone))
        held = self._not_sent(job, f"{HELD} until {local:%a %Y-%m-%d %H:%M} {job.timezone}")
        return held, timestamp(opening)

    def _settle(
        self, result: DeliveryResult, attempts_before: int
    ) -> tuple[DeliveryResult, str | None]:
        """The result to record, and when to try again if it is deferred.

        A deferral that used up `max_attempts` is a failure. The next attempt
        waits `retry_backoff` doubled for each attempt so far, in all runs, up to
        `retry_max_delay`.
        """
        sending = self.settings.sending
        total = attempts_before + result.attempts
        if result.state is not State.DEFERRED:
            return result, None
        if total >= sending.max_attempts:
            failed = DeliveryResult(
                row_id=result.row_id,
                recipient=result.recipient,
                state=State.FAILED,
                attempts=result.attempts,
                code=result.code,
                reply=f"gave up after {total} attempts: {result.reply}",
            )
            return failed, None
        delay = min(sending.retry_backoff * 2**total, sending.retry_max_delay)
        return result, timestamp(datetime.now(UTC) + timedelta(seconds=delay))

    @staticmethod
    def _count(report: RunReport, result: DeliveryResult) -> None:
        if result.state is State.SENT:
            report.sent += 1
            return
        if result.state is State.PENDING:
            if result.reply and result.reply.startswith(HELD):
                report.held += 1
            else:
                report.released += 1
            return
        bucket = {
            State.FAILED: report.failed,
            State.DEFERRED: report.deferred,
            State.UNKNOWN: report.unknown,
        }[result.state]
        if len(bucket) < REPORT_ROWS:
            bucket.append(result)

    def _db(self, fn: LedgerCall[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """`fn(ledger, ...)`, sent to the ledger now; await the future for its result."""
        return self.ledger.submit(fn, *args, **kwargs)


def _error(exc: Exception) -> AppealMailerError | None:
    return exc if isinstance(exc, AppealMailerError) else None


def _unreachable(result: DeliveryResult) -> bool:
    return result.state is State.DEFERRED and result.code is None


def _suppressed(envelope: Envelope) -> DeliveryResult:
    return DeliveryResult(
        row_id=envelope.row_id, recipient=envelope.recipient, state=State.SUPPRESSED, attempts=0
    )


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
