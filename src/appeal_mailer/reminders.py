"""Due follow-ups for `remind`: which step to send now, to whom, and what came due too long ago.

`remind` (what cron runs) has no list: its recipients come from the ledger.
For each `[[reminders]]` entry, a subscriber is due once their earlier step
was `sent` at least `after` ago (never those whose earlier step failed, was
suppressed or is unknown: they have no `sent` row); one due longer ago than
`after + expires_after` is recorded `expired` and never sent late, so a cron
that was down for a week, or a restored backup, does not flood the list with
stale reminders. Each step's deferred rows that are due again are retried
too, the campaign's own steps included (a `send` whose retries outlived it).

Every step runs as one CampaignRun: the same pre-flight render, claims,
windows, retries and ledger rules as `send`; a second `remind` at the same
moment finds nothing due, and two overlapping ones never send a row twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from appeal_mailer.config import ReminderSettings, Settings
from appeal_mailer.ledger import Ledger
from appeal_mailer.ledger_process import LedgerProcess, LocalLedger
from appeal_mailer.models import Recipient


@dataclass(frozen=True, slots=True)
class Expired:
    """A subscriber whose reminder came due too long ago to send."""

    recipient: Recipient


@dataclass(frozen=True)
class RemindStep:
    """What one `remind` does for one step: send new follow-ups (a reminder) and retries."""

    campaign: str
    step: str
    template: str
    now: datetime
    reminder: ReminderSettings | None = None
    after_step: str | None = None

    @property
    def label(self) -> str:
        """Where the recipients come from, for reports (a `send` shows its list file here)."""
        if self.reminder is None:
            return f"ledger: {self.step} retries due"
        return f"ledger: {self.after_step} sent {_words(self.reminder.after)} ago or more"

    @property
    def adds_rows(self) -> bool:
        """A reminder creates its rows; a campaign's own step only retries deferred ones."""
        return self.reminder is not None

    @property
    def expired_note(self) -> str:
        expires = self.reminder.expires_after if self.reminder else timedelta(0)
        return f"expired: came due more than {_words(expires)} before remind ran; not sent late"

    def _sent_before(self, reminder: ReminderSettings) -> tuple[datetime, datetime]:
        """An earlier step sent before the first is due now; before the second, too late."""
        due = self.now - reminder.after
        return due, due - reminder.expires_after

    def expire_overdue(self, ledger: LocalLedger | LedgerProcess) -> int:
        """Its rows still to send but due too long ago become `expired`: never sent late."""
        if self.reminder is None or self.after_step is None:
            return 0
        _, too_late = self._sent_before(self.reminder)
        return ledger.call(
            Ledger.expire_overdue,
            self.campaign,
            self.after_step,
            self.step,
            too_late,
            self.expired_note,
        )

    def has_retries(self, ledger: LocalLedger | LedgerProcess) -> bool:
        """Whether a campaign's own step has anything due again (else its templates
        need not even load: a step sent once with a template since deleted is fine)."""
        return bool(ledger.call(Ledger.retries, self.campaign, self.step, self.now, pending=False))

    def recipients(self, ledger: LocalLedger | LedgerProcess) -> Iterator[Recipient | Expired]:
        """Everyone this step sends to now (and, for a reminder, whoever expired).

        Read page by page, so memory stays flat; outside the event loop (pre-flight).
        """
        campaign = self.campaign
        after = 0
        # Rows of this step already there: deferred and due, or (a reminder's) pending.
        while page := ledger.call(
            Ledger.retries, campaign, self.step, self.now, pending=self.adds_rows, after=after
        ):
            for _, recipient in page:
                yield recipient
            after = page[-1][0]
        if self.reminder is None or self.after_step is None:
            return
        due_before, too_late = self._sent_before(self.reminder)
        after = 0
        while followups := ledger.call(
            Ledger.followups, campaign, self.after_step, self.step, due_before, after
        ):
            for followup in followups:
                if followup.sent_at < too_late:
                    yield Expired(followup.recipient)
                else:
                    yield followup.recipient
            after = followups[-1].row_id


def plan(settings: Settings, steps: list[str], now: datetime) -> list[RemindStep]:
    """The steps `remind` runs, in order: the campaign's own retries, then each reminder.

    `steps` are those the ledger has rows for (Ledger.steps).
    """
    campaign = settings.campaign.id
    reminders = {reminder.name: reminder for reminder in settings.reminders}
    todo = [RemindStep(campaign, step, step, now) for step in steps if step not in reminders]
    todo += [
        RemindStep(
            campaign,
            reminder.name,
            reminder.template_name,
            now,
            reminder=reminder,
            after_step=settings.after_step(reminder),
        )
        for reminder in settings.reminders
    ]
    return todo


def _words(span: timedelta) -> str:
    """ "3 days", "1 day 12 hours", "90 minutes": a duration as config.example.toml writes it."""
    seconds = int(span.total_seconds())
    parts = []
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'s' if count != 1 else ''}")
    return " ".join(parts) or "0 seconds"
