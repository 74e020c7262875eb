"""Words for people and rows for scripts: the send plan, the run summary, the ledger's status."""

from __future__ import annotations

import csv
import email
import email.policy
import json
import re
from collections.abc import Iterable, Sequence
from typing import TextIO

from appeal_mailer.campaign import Preflight, RunReport
from appeal_mailer.ledger import LedgerRow, RunRow, Suppression
from appeal_mailer.models import State

STATUS_FIELDS = (
    "email",
    "step",
    "state",
    "attempts",
    "smtp_code",
    "smtp_reply",
    "message_id",
    "updated_at",
)
SUPPRESSION_FIELDS = ("email", "reason", "source", "created_at")
# OWASP "CSV injection": a cell starting with one of these is a formula in a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_SHOWN_SKIPPED = 20
_SHOWN_SUPPRESSED = 20
_WHITESPACE = re.compile(r"\s+")


def plan(
    preflight: Preflight,
    *,
    campaign: str,
    template: str,
    server: str,
    rate: float,
    already_sent: int,
    limit: int | None,
    dkim: tuple[str, str] | None = None,
) -> str:
    """What `send` is about to do, shown before it asks to go ahead.

    `dkim`: the (domain, selector) every message is signed as, if any.
    """
    to_send = max(preflight.valid - already_sent, 0)
    if limit is not None:
        to_send = min(to_send, limit)
    lines = [
        f"Campaign:   {campaign}",
        f"Template:   {template}",
        f"List:       {preflight.list_path}: {preflight.valid} recipients"
        + (f", {preflight.skipped_count} rows skipped" if preflight.skipped_count else ""),
        f"Already sent in this campaign step: {already_sent}",
        f"To send now: about {to_send}" + (f" (--limit {limit})" if limit is not None else ""),
        f"Server:     {server}",
        f"Rate:       {_rate(rate)}, estimated time {_duration(to_send, rate)}",
        "Signed:     "
        + (
            f"DKIM, d={dkim[0]} s={dkim[1]}"
            if dkim
            else "no ([dkim] is off; your server may sign)"
        ),
    ]
    lines += _skipped_lines(preflight)
    lines += _language_lines(preflight)
    if preflight.sample is not None and preflight.sample_recipient is not None:
        lines += ["", f"Sample, as {preflight.sample_recipient.email} will get it:", ""]
        lines += readable(preflight.sample).splitlines()
    return "\n".join(lines)


def nothing_to_send(preflight: Preflight) -> str:
    """Why a list gave no one to mail."""
    lines = [f"error: {preflight.list_path}: no valid recipients; nothing was sent"]
    return "\n".join(lines + _skipped_lines(preflight))


def readable(data: bytes, *, max_lines: int = 40) -> str:
    """A wire message decoded for reading on a terminal: headers and the text body."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    head = [
        f"{name}: {message[name]}"
        for name in ("From", "To", "Subject", "Reply-To", "List-Unsubscribe")
        if message[name] is not None
    ]
    part = message.get_body(preferencelist=("plain",))
    body = part.get_content() if part is not None else ""
    lines = str(body).splitlines()
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"[... {len(lines) - max_lines} more lines]"]
    return "\n".join([*head, "", *lines])


def summary(report: RunReport) -> str:
    """The run's closing summary: counts, then every problem with the server's reply."""
    verb = "written" if report.dry_run else "sent"
    preflight = report.preflight
    lines = [
        f"{report.campaign}/{report.step}: {report.sent} {verb}, {len(report.failed)} failed, "
        f"{len(report.deferred)} deferred, {len(report.unknown)} unknown, "
        f"{report.suppressed} suppressed"
        + (f" (of {report.due} due)" if report.due != report.sent else ""),
        f"List {preflight.list_path}: {preflight.valid} recipients, "
        f"{preflight.skipped_count} rows skipped",
    ]
    lines += _skipped_lines(preflight)
    lines += _language_lines(preflight)
    for title, rows in (
        ("Failed (not retried)", report.failed),
        ("Deferred (retried by the next `send` or `remind`)", report.deferred),
        (
            "Unknown (the connection broke after the message was sent; not re-sent "
            "unless you run send --resend-unknown)",
            report.unknown,
        ),
    ):
        if rows:
            lines.append(f"{title}:")
            lines += [f"  {row}" for row in rows]
    if report.recovered_unknown:
        lines.append(
            f"{report.recovered_unknown} messages were being sent when an earlier run stopped: "
            "marked unknown, not re-sent (--resend-unknown sends them again)"
        )
    if report.requeued_unknown:
        lines.append(
            f"{report.requeued_unknown} messages of unknown fate were sent again "
            "(--resend-unknown), with their first Message-ID"
        )
    if report.bounced:
        lines.append(
            "Put on the do-not-mail list, as the server said the mailbox does not exist: "
            f"{report.bounced} (appeal-mailer suppress list)"
        )
    if report.released:
        lines.append(f"{report.released} claimed messages were not sent and are pending again")
    if report.held:
        lines.append(
            f"{report.held} messages wait for their subscribers' send window "
            "([sending] window): the next `remind` after it opens sends them"
        )
    if report.expired:
        lines.append(
            f"{report.expired} reminders came due too long ago ([[reminders]] expires_after): "
            "recorded as expired, not sent"
        )
    remaining = report.due - report.sent - report.suppressed - report.held
    remaining -= len(report.failed) + len(report.deferred) + len(report.unknown)
    if remaining > 0:
        lines.append(f"{remaining} messages are still to send: run the same command again")
    if report.stopped:
        lines.append(f"Stopped early: {report.stopped}")
        if report.stopped_hint:
            lines.append(f"hint: {report.stopped_hint}")
    if not report.dry_run:
        totals = ", ".join(f"{n} {state}" for state, n in sorted(report.counts.items()))
        lines.append(f"Ledger for this step: {totals or 'empty'}")
    return "\n".join(lines)


def status_table(
    campaign: str,
    counts: dict[str, int],
    problems: Iterable[LedgerRow],
    suppressed: Iterable[LedgerRow] = (),
) -> str:
    lines = [f"Campaign {campaign}"]
    total = sum(counts.values())
    for state in State:
        if counts.get(state.value):
            lines.append(f"  {state.value:<11} {counts[state.value]:>8}")
    lines.append(f"  {'total':<11} {total:>8}")
    for shown, row in enumerate(problems):
        if shown == 0:
            lines.append("Needing attention:")
        reply = f"{row.smtp_code or ''} {row.smtp_reply or ''}".strip()
        lines.append(f"  {row.state:<8} {row.email} ({row.step}, {row.attempts} attempts) {reply}")
    for shown, row in enumerate(suppressed):
        if shown == 0:
            lines.append("Not mailed, on the do-not-mail list (suppress list says why):")
        if shown == _SHOWN_SUPPRESSED:
            more = counts.get(State.SUPPRESSED.value, 0) - shown
            lines.append(f"  ... and {more} more (status --format csv lists them all)")
            break
        lines.append(f"  {row.email} ({row.step})")
    return "\n".join(lines)


def run_log(runs: Sequence[RunRow]) -> str:
    """The latest runs, newest first: when, which command, and what each did."""
    if not runs:
        return "No runs yet."
    lines = ["Latest runs:"]
    for run in runs:
        s = run.summary
        if run.finished_at is None:
            did = "did not finish (running, or killed)"
        else:
            did = (
                ", ".join(
                    f"{s.get(key, 0)} {key}"
                    for key in ("sent", "failed", "deferred", "unknown", "suppressed")
                    if s.get(key)
                )
                or "nothing to send"
            )
            if s.get("stopped"):
                did += f"; stopped: {s['stopped']}"
        lines.append(f"  #{run.run_id} {run.started_at[:19]}Z {run.command} {run.step}: {did}")
    return "\n".join(lines)


def write_status_json(
    out: TextIO, campaign: str, counts: dict[str, int], rows: Iterable[LedgerRow]
) -> None:
    """One JSON object, streamed row by row so a large ledger needs no memory."""
    out.write('{"campaign": ' + json.dumps(campaign) + ', "counts": ' + json.dumps(counts))
    out.write(', "recipients": [')
    for index, row in enumerate(rows):
        out.write(
            ("," if index else "") + "\n  " + json.dumps(_status_dict(row), ensure_ascii=False)
        )
    out.write("\n]}\n")


def write_status_csv(out: TextIO, rows: Iterable[LedgerRow]) -> None:
    writer = csv.writer(out)
    writer.writerow(STATUS_FIELDS)
    for row in rows:
        writer.writerow([_cell(value) for value in _status_dict(row).values()])


def write_suppressions_table(
    out: TextIO, counts: dict[str, int], entries: Iterable[Suppression]
) -> None:
    """The do-not-mail list for reading: a count per source, then one line per address."""
    total = sum(counts.values())
    by_source = ", ".join(f"{n} {source}" for source, n in sorted(counts.items()))
    out.write(
        f"Do-not-mail list: {total} addresses ({by_source})\n"
        if total
        else "Do-not-mail list: empty\n"
    )
    for entry in entries:
        # The date and source are fixed-width, so the lines line up without a second pass.
        when = entry.created_at[:16].replace("T", " ")
        reason = _WHITESPACE.sub(" ", entry.reason).strip()
        out.write(f"  {when}  {entry.source:<6}  {entry.email}  {reason}".rstrip() + "\n")


def write_suppressions_json(
    out: TextIO, counts: dict[str, int], entries: Iterable[Suppression]
) -> None:
    """One JSON object: `counts` (source -> number) and `suppressions`, streamed."""
    out.write('{"counts": ' + json.dumps(counts, sort_keys=True) + ', "suppressions": [')
    for index, entry in enumerate(entries):
        row = {name: getattr(entry, name) for name in SUPPRESSION_FIELDS}
        out.write(("," if index else "") + "\n  " + json.dumps(row, ensure_ascii=False))
    out.write("\n]}\n")


def write_suppressions_csv(out: TextIO, entries: Iterable[Suppression]) -> None:
    """The do-not-mail list as CSV, safe to open in a spreadsheet (no cell starts a formula)."""
    writer = csv.writer(out)
    writer.writerow(SUPPRESSION_FIELDS)
    for entry in entries:
        writer.writerow([_cell(getattr(entry, name)) for name in SUPPRESSION_FIELDS])


def _status_dict(row: LedgerRow) -> dict[str, object]:
    return {name: getattr(row, name) for name in STATUS_FIELDS}


def _cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _language_lines(preflight: Preflight) -> list[str]:
    """Who got a language version, and who asked for a language that has none."""
    lines = []
    if preflight.languages:
        lines.append(f"In their own language: {_by_language(preflight.languages)}")
    if preflight.fell_back:
        lines.append(
            "No version in their language, given the default: "
            f"{_by_language(preflight.fell_back)} "
            "(add templates/LANGUAGE/ beside the default templates)"
        )
        for language, who in sorted(preflight.fell_back_examples.items()):
            more = preflight.fell_back[language] - len(who)
            lines.append(
                f"  {language}: " + ", ".join(who) + (f" and {more} more" if more > 0 else "")
            )
    return lines


def _by_language(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {language}" for language, n in sorted(counts.items()))


def _skipped_lines(preflight: Preflight) -> list[str]:
    lines = [f"  {row}" for row in preflight.skipped[:_SHOWN_SKIPPED]]
    if preflight.skipped_count > _SHOWN_SKIPPED:
        lines.append(f"  ... and {preflight.skipped_count - _SHOWN_SKIPPED} more skipped rows")
    if lines:
        lines.insert(0, "Skipped rows (not mailed):")
    return lines


def _rate(rate: float) -> str:
    return "unlimited" if rate <= 0 else f"{rate:g} messages/s"


def _duration(count: int, rate: float) -> str:
    if rate <= 0:
        return "as fast as the server takes them"
    seconds = count / rate
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
