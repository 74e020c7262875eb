"""The command line: parse options, wire the parts, turn errors into messages and exit codes.

Exit status (DESIGN.md): 0 every message sent (or rendered, in a dry run);
1 stopped before sending anything; 2 usage; 3 finished, but some messages
failed or are still deferred or unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from appeal_mailer import __version__
from appeal_mailer.errors import AppealMailerError, ConfigError
from appeal_mailer.models import NAME_MAX, NAME_PATTERN

if TYPE_CHECKING:
    from appeal_mailer.campaign import CampaignRun, RunReport
    from appeal_mailer.config import Settings
    from appeal_mailer.ledger import Ledger
    from appeal_mailer.ledger_process import LedgerProcess, LocalLedger
    from appeal_mailer.ratelimit import RateLimiter
    from appeal_mailer.reminders import RemindStep

EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_TROUBLE = 0, 1, 2, 3
NAME_RE = re.compile(NAME_PATTERN)
log = logging.getLogger("appeal_mailer")
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class _Context:
    def __init__(self, config: Path | None, verbosity: int) -> None:
        self.config = config
        self.verbosity = verbosity

    def settings(self, campaign: str | None = None) -> Any:
        from appeal_mailer.config import config_path, load_settings  # noqa: PLC0415  # fast --help

        settings = load_settings(config_path(self.config))
        if campaign is not None:
            settings = settings.model_copy(
                update={"campaign": settings.campaign.model_copy(update={"id": campaign})}
            )
        return settings


def _name(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (len(value) > NAME_MAX or not NAME_RE.match(value)):
        raise click.BadParameter(
            f"at most {NAME_MAX} letters, digits, '_', '-' and single inner dots "
            "(it goes into Message-IDs)",
            param=param,
        )
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appeal-mailer")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file [default: $APPEAL_MAILER_CONFIG, else ./config.toml].",
)
@click.option("-v", "--verbose", count=True, help="Say more (repeat for each message).")
@click.option("-q", "--quiet", is_flag=True, help="Only problems and the final summary.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: int, quiet: bool) -> None:
    """Send campaign appeals to a mailing list through your own SMTP server."""
    verbosity = -1 if quiet else verbose
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    ctx.obj = _Context(config, verbosity)


# `status` and `suppress list`: for people, for scripts, for spreadsheets.
_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)


def _reported(fn: F) -> F:
    """Run a command, turning our errors into a message, a hint and exit status 1."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AppealMailerError as exc:
            click.secho(f"error: {exc}", err=True, fg="red")
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(EXIT_STOPPED)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]  # same signature as fn


@main.command()
@click.argument("list_path", metavar="LIST", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--template", callback=_name, help="Template to send [default: from config].")
@click.option("--campaign", callback=_name, help="Campaign ID [default: from config].")
@click.option("--dry-run", is_flag=True, help="Render every message into --out; send nothing.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where a dry run writes its .eml files [default: ./preview].",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most N messages this run.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before sending (cron, scripts).")
@click.option(
    "--resend-unknown",
    is_flag=True,
    help="Send again to rows whose delivery is unknown (may duplicate; same Message-ID).",
)
@click.pass_obj
@_reported
def send(  # noqa: PLR0917  # click passes each option as an argument
    obj: _Context,
    list_path: Path,
    template: str | None,
    campaign: str | None,
    dry_run: bool,
    out: Path | None,
    limit: int | None,
    yes: bool,
    resend_unknown: bool,
) -> None:
    """Send (or with --dry-run, render) the campaign to every subscriber on LIST.

    Running it again for the same campaign sends only what was not sent yet.
    """
    from appeal_mailer import report  # noqa: PLC0415  # keep --help fast
    from appeal_mailer.campaign import CampaignRun  # noqa: PLC0415
    from appeal_mailer.ledger import Ledger  # noqa: PLC0415
    from appeal_mailer.ledger_process import open_for_run  # noqa: PLC0415
    from appeal_mailer.ratelimit import RateLimiter  # noqa: PLC0415
    from appeal_mailer.transport import DryRunTransport, SMTPTransport, Transport  # noqa: PLC0415

    if out is not None and not dry_run:
        raise click.UsageError("--out is only for --dry-run")
    settings = obj.settings(campaign)
    template = template or settings.campaign.template
    transport: Transport
    limiter = None
    if dry_run:
        out = out or Path("preview")
        _clear_preview(out)
        transport = DryRunTransport(out)
    else:
        limiter = RateLimiter(settings.sending.rate, dict(settings.sending.domain_limits))
        transport = SMTPTransport(settings.smtp, settings.sending, limiter)
    # On the second core (ledger_process.py): opened before anything else starts a thread.
    ledger = open_for_run(
        settings.ledger_url,
        scratch_copy=dry_run,
        durability=settings.ledger.durability,
        campaign=settings.campaign.id,
    )
    try:
        run = CampaignRun(
            settings,
            ledger,
            transport,
            template=template,
            list_path=list_path,
            dry_run=dry_run,
            limit=limit,
            pace=None if dry_run else limiter,
            resend_unknown=resend_unknown,
        )
        preflight = run.prepare()
        if preflight.valid == 0:
            click.echo(report.nothing_to_send(preflight), err=True)
            sys.exit(EXIT_STOPPED)
        if not dry_run and not yes:
            already = ledger.call(Ledger.counts, settings.campaign.id, template).get("sent", 0)
            _confirm(
                report.plan(
                    preflight,
                    campaign=settings.campaign.id,
                    template=template,
                    server=transport.description,
                    rate=settings.sending.rate,
                    already_sent=already,
                    limit=limit,
                    dkim=_signed_as(run),
                )
            )
        progress = _progress(obj, dry_run=dry_run)
        result = _run(_run_with_signals(run, preflight, progress))
    finally:
        ledger.close()
    text = report.summary(result)
    quiet_and_fine = obj.verbosity < 0 and not result.trouble
    # -q: a clean run prints nothing, so cron mails only about trouble.
    if dry_run and out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        except OSError as exc:  # the summary is still printed: only its copy is missing
            click.echo(f"warning: {out}/summary.txt not written: {exc.strerror or exc}", err=True)
        text += f"\nPreview: {out}/ (one .eml per message, index.csv, summary.txt)"
    if not quiet_and_fine:
        click.echo(text)
    if result.stopped_before_sending:
        sys.exit(EXIT_STOPPED)
    sys.exit(EXIT_TROUBLE if result.trouble else EXIT_OK)


@main.command()
@click.option(
    "--now",
    "as_of",
    metavar="ISO-8601",
    callback=lambda _ctx, _param, value: _moment(value),
    help="Run as of this moment, e.g. 2026-12-01T09:00+06:00 (no offset: UTC) [default: now].",
)
@click.option("--campaign", callback=_name, help="Campaign ID [default: from config].")
@click.option("--dry-run", is_flag=True, help="Render what is due into --out; send nothing.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where a dry run writes its .eml files, a folder per step [default: ./preview].",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before sending (cron, scripts).")
@click.pass_obj
@_reported
def remind(  # noqa: PLR0917  # click passes each option as an argument
    obj: _Context,
    as_of: datetime | None,
    campaign: str | None,
    dry_run: bool,
    out: Path | None,
    yes: bool,
) -> None:
    """Send every follow-up that is due now, and retry what is due again (what cron runs).

    Each [[reminders]] entry goes to those whose earlier step was sent at least
    `after` ago; one due longer ago than `expires_after` is recorded as expired,
    never sent late. Run it as often as you like: what was sent is not sent
    again, and two runs at once never send the same message. With -q it prints
    nothing when all went well.
    """
    from appeal_mailer import report  # noqa: PLC0415  # keep --help fast
    from appeal_mailer.ledger import Ledger  # noqa: PLC0415
    from appeal_mailer.ledger_process import open_for_run  # noqa: PLC0415
    from appeal_mailer.ratelimit import RateLimiter  # noqa: PLC0415
    from appeal_mailer.reminders import plan  # noqa: PLC0415

    if out is not None and not dry_run:
        raise click.UsageError("--out is only for --dry-run")
    settings = obj.settings(campaign)
    now = as_of or datetime.now(UTC)
    out = out or Path("preview")
    limiter = RateLimiter(settings.sending.rate, dict(settings.sending.domain_limits))
    ledger = open_for_run(
        settings.ledger_url,
        scratch_copy=dry_run,
        durability=settings.ledger.durability,
        campaign=settings.campaign.id,
    )
    results = []
    # Said even with -q (cron mails them): rows found interrupted, steps that failed.
    notes: list[str] = []
    failed_steps = recovered_rows = 0
    try:
        for step in plan(settings, ledger.call(Ledger.steps, settings.campaign.id), now):
            where = f"{settings.campaign.id}/{step.step}"
            try:
                # A killed run's `sending` rows, whether or not anything is due now.
                recovered = ledger.call(Ledger.recover_interrupted, step.campaign, step.step)
                recovered_rows += recovered
                if recovered:
                    notes.append(
                        f"{where}: {recovered} messages were being sent when an earlier run "
                        "stopped: marked unknown, not sent again (`status` lists them)"
                    )
                if not step.adds_rows and not step.has_retries(ledger):
                    continue  # nothing due again for this step: the usual case, and silent
                result = _remind_step(obj, settings, ledger, step, limiter, out, dry_run, yes)
            except AppealMailerError as exc:
                # One step that cannot run (its template deleted, say) does not keep
                # the others from theirs; the exit status says so.
                failed_steps += 1
                notes.append(f"error: remind {where}: {exc}")
                if exc.hint:
                    notes.append(f"hint: {exc.hint}")
                continue
            if result is None:
                continue
            results.append(result)
            if result.stopped is not None:
                break  # a server problem or a signal: the next cron run carries on
    finally:
        ledger.close()
    for note in notes:
        click.echo(note, err=True)
    for result in results:
        if obj.verbosity >= 0 or result.trouble:
            click.echo(report.summary(result))  # says how many expired, if any
        elif result.expired:
            # Said even with -q: cron was down, or a backup was restored; worth a mail.
            click.echo(
                f"{settings.campaign.id}/{result.step}: {result.expired} reminders came due "
                "too long ago and were recorded as expired, not sent",
                err=True,
            )
    if dry_run and results:
        click.echo(f"Preview: {out}/ (a folder per step: one .eml per message, index.csv)")
    if failed_steps or any(result.stopped_before_sending for result in results):
        sys.exit(EXIT_STOPPED)
    trouble = recovered_rows > 0 or any(result.trouble for result in results)
    sys.exit(EXIT_TROUBLE if trouble else EXIT_OK)


def _remind_step(  # noqa: PLR0917  # the command's parts, passed explicitly
    obj: _Context,
    settings: Settings,
    ledger: LocalLedger | LedgerProcess,
    step: RemindStep,
    limiter: RateLimiter,
    out: Path,
    dry_run: bool,
    yes: bool,
) -> RunReport | None:
    """One step of `remind`: check what is due, ask if need be, send; None if nothing to do."""
    from appeal_mailer import report  # noqa: PLC0415  # keep --help fast
    from appeal_mailer.campaign import CampaignRun  # noqa: PLC0415
    from appeal_mailer.transport import DryRunTransport, SMTPTransport, Transport  # noqa: PLC0415

    transport: Transport
    if dry_run:
        _clear_preview(out / step.step)
        transport = DryRunTransport(out / step.step)
    else:
        transport = SMTPTransport(settings.smtp, settings.sending, limiter)
    run = CampaignRun(
        settings,
        ledger,
        transport,
        template=step.template,
        remind=step,
        dry_run=dry_run,
        now=step.now,
        pace=None if dry_run else limiter,
    )
    preflight = run.prepare()
    if preflight.valid == 0 and preflight.expired_count == 0 and run.expired_before == 0:
        preflight.close()
        return None  # nothing due for this step: the usual case, and silent
    if not dry_run and not yes and preflight.valid:
        _confirm(
            report.plan(
                preflight,
                campaign=settings.campaign.id,
                template=step.template,
                server=transport.description,
                rate=settings.sending.rate,
                already_sent=0,
                limit=None,
                dkim=_signed_as(run),
            )
        )
    result: RunReport = _run(_run_with_signals(run, preflight, _progress(obj, dry_run=dry_run)))
    return result


def _signed_as(run: CampaignRun) -> tuple[str, str] | None:
    """The (domain, selector) of the run's DKIM signatures, for the plan; None: unsigned."""
    return None if run.signer is None else (run.signer.domain, run.signer.selector)


def _confirm(plan_text: str) -> None:
    """Show what is about to be sent and ask; exit if the answer is no, or nobody can answer."""
    if not sys.stdin.isatty():
        raise click.UsageError("not a terminal, so cannot ask before sending: pass --yes to send")
    click.echo(plan_text)
    if not click.confirm("\nSend now?", default=False):
        click.echo("Nothing sent.")
        sys.exit(EXIT_STOPPED)


def _moment(text: str | None) -> datetime | None:
    """An ISO 8601 moment from the command line; without an offset it is UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 moment such as 2026-12-01T09:00+06:00"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@main.command()
@click.argument(
    "list_path", metavar="[LIST]", required=False, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--campaign", callback=_name, help="Campaign ID [default: from config].")
@click.option("--no-smtp", is_flag=True, help="Skip the SMTP handshake.")
@click.pass_obj
@_reported
def check(obj: _Context, list_path: Path | None, campaign: str | None, no_smtp: bool) -> None:
    """Check the config, render every template for every row of LIST, and try the SMTP server.

    Sends nothing and writes nothing.
    """
    from appeal_mailer.campaign import CampaignRun  # noqa: PLC0415  # keep --help fast
    from appeal_mailer.ledger import Ledger  # noqa: PLC0415
    from appeal_mailer.ratelimit import RateLimiter  # noqa: PLC0415
    from appeal_mailer.render import TEXT_SUFFIX  # noqa: PLC0415
    from appeal_mailer.transport import DryRunTransport, SMTPTransport  # noqa: PLC0415

    settings = obj.settings(campaign)
    click.echo(f"config {settings.source}: ok (campaign {settings.campaign.id})")
    _check_dkim(settings)
    templates = sorted(
        path.name.removesuffix(TEXT_SUFFIX)
        for path in settings.campaign.templates.glob("*" + TEXT_SUFFIX)
        if not path.name.startswith("_")
    )
    if not templates:
        raise ConfigError(
            f"no templates (NAME{TEXT_SUFFIX}) in {settings.campaign.templates}",
            path=settings.source,
            key="[campaign] templates",
        )
    ledger = Ledger.open("sqlite://", scratch_copy=False)
    try:
        for name in templates:
            run = CampaignRun(
                settings,
                ledger,
                DryRunTransport(Path()),
                template=name,
                list_path=list_path or Path(),
            )
            if list_path is None:
                click.echo(f"template {name}: loads")
                continue
            preflight = run.prepare()
            click.echo(
                f"template {name}: rendered for all {preflight.valid} recipients of {list_path}"
                + (f" ({preflight.skipped_count} rows skipped)" if preflight.skipped_count else "")
            )
        if list_path is not None and preflight.skipped:
            for row in preflight.skipped:
                click.echo(f"  skipped {list_path}: {row}")
    finally:
        ledger.close()
    if no_smtp:
        return
    limiter = RateLimiter(0, {})
    transport = SMTPTransport(settings.smtp, settings.sending, limiter)
    for line in _run(transport.handshake()):
        click.echo(f"smtp: {line}")
    click.echo("all checks passed; nothing was sent")


def _check_dkim(settings: Settings) -> None:
    """Load the DKIM key, and say what to publish in the DNS and whether DMARC will align."""
    from appeal_mailer.dkim import Signer  # noqa: PLC0415  # keep --help fast

    signer = Signer.from_settings(settings.dkim, settings.source)
    if signer is None:
        click.echo("dkim: off (no [dkim] domain): the SMTP server must sign, if anyone does")
        return
    click.echo(
        f"dkim: signing as d={signer.domain} s={signer.selector}, RSA key of {signer.bits} bits"
    )
    key_file = settings.dkim.private_key_file
    if settings.dkim.private_key is None and key_file is not None and os.name == "posix":
        # Whoever can read the key can sign mail as the campaign's domain.
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            click.echo(
                f"dkim: warning: {key_file} can be read by other users (mode {mode:03o}): "
                f"chmod 600 {key_file}"
            )
    name, record = signer.dns_record()
    # Quoted in pieces of at most 255 characters: one TXT string's limit (RFC 1035 3.3.14).
    pieces = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    click.echo(f"dkim: the DNS must publish: {name}. IN TXT {pieces}")
    published, failure = signer.published()
    if failure is not None:
        click.echo(f"dkim: could not ask the DNS for {name} ({failure}); try: dig TXT {name}")
    elif not published:
        click.echo(
            f"dkim: warning: nothing is published at {name} yet: until the record above is, "
            "receivers cannot check the signatures"
        )
    elif any(signer.is_mine(key) for key in published):
        click.echo(f"dkim: {name} publishes this key")
    else:
        revoked = "" in published
        raise ConfigError(
            f"the DNS publishes {'a revoked key' if revoked else 'another key'} at {name}: "
            "receivers would reject every signature",
            path=settings.source,
            key="[dkim] selector",
            hint="publish the record above, or set selector and the key to those published",
        )
    from_domain = settings.campaign.sender[1].rpartition("@")[2].lower()
    inside = (from_domain, signer.domain)
    if from_domain != signer.domain and not any(
        a.endswith("." + b) for a, b in (inside, inside[::-1])
    ):
        # RFC 7489 3.1.1: DMARC's relaxed alignment wants d= and From's domain in
        # one organizational domain. One inside the other always is; telling
        # a.example.org and b.example.org (one) from a.co.uk and b.co.uk (two)
        # takes the Public Suffix List, which this warning does without.
        click.echo(
            f"dkim: warning: d={signer.domain} and From's domain ({from_domain}) are not one "
            "inside the other: DMARC counts this signature as the sender's only if both "
            "belong to the same organization's domain"
        )


@main.command()
@click.option("--campaign", callback=_name, help="Campaign ID [default: from config].")
@_format_option
@click.pass_obj
@_reported
def status(obj: _Context, campaign: str | None, fmt: str) -> None:
    """Show the ledger: how many messages are in each state, and which need attention."""
    from appeal_mailer import report  # noqa: PLC0415  # keep --help fast
    from appeal_mailer.ledger import Ledger  # noqa: PLC0415

    settings = obj.settings(campaign)
    name = settings.campaign.id
    ledger = Ledger.open(settings.ledger_url)
    try:
        counts = ledger.counts(name)
        if fmt == "json":
            report.write_status_json(sys.stdout, name, counts, ledger.rows(name))
        elif fmt == "csv":
            report.write_status_csv(sys.stdout, ledger.rows(name))
        else:
            problems = ledger.rows(name, states=("failed", "deferred", "unknown"))
            suppressed = ledger.rows(name, states=("suppressed",))
            click.echo(report.status_table(name, counts, problems, suppressed))
            click.echo(report.run_log(ledger.recent_runs(name)))
    finally:
        ledger.close()


@main.group()
def suppress() -> None:
    """The do-not-mail list, one for all campaigns: unsubscribes, hard bounces, manual entries.

    `send` checks it just before each message, so an address added while a
    campaign is running gets nothing more.
    """


@suppress.command("add")
@click.argument("addresses", metavar="ADDRESS...", nargs=-1, required=True)
@click.option(
    "--reason", default="", help="Why; kept with the entry and shown by `suppress list`."
)
@click.pass_obj
@_reported
def suppress_add(obj: _Context, addresses: tuple[str, ...], reason: str) -> None:
    """Put each ADDRESS on the do-not-mail list."""
    emails = _normalized(addresses, "nothing was added")
    ledger = _ledger(obj)
    try:
        for email in emails:
            if ledger.suppress(email, reason, "manual"):
                click.echo(f"added {email}")
            else:
                click.echo(f"{email} was already on the do-not-mail list")
    finally:
        ledger.close()


@suppress.command("remove")
@click.argument("addresses", metavar="ADDRESS...", nargs=-1, required=True)
@click.pass_obj
@_reported
def suppress_remove(obj: _Context, addresses: tuple[str, ...]) -> None:
    """Take each ADDRESS off the do-not-mail list; campaigns may mail it again."""
    emails = _normalized(addresses, "nothing was removed")
    ledger = _ledger(obj)
    try:
        for email in emails:
            removed, released = ledger.unsuppress(email)
            if not removed:
                click.echo(f"{email} was not on the do-not-mail list")
                continue
            click.echo(
                f"removed {email}"
                + (
                    f" (unsent messages to it, pending again: {released}; "
                    "the next `send` of their campaign mails them)"
                    if released
                    else ""
                )
            )
    finally:
        ledger.close()


@suppress.command("import")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reason", help="Why, for lines that give none [default: imported from FILE].")
@click.pass_obj
@_reported
def suppress_import(obj: _Context, path: Path, reason: str | None) -> None:
    """Add every address of FILE: a CSV with an `email` column, or one address per line.

    An optional `reason` column is kept with each entry. Lines that are not an
    address are listed by line number, the others are imported, and the exit
    status is then 1.
    """
    from appeal_mailer.lists import AddressLine, read_addresses  # noqa: PLC0415  # fast --help

    # Read twice, as a stream: a file that cannot be read at all (not UTF-8, an
    # unbalanced quote) stops here, before anything is written.
    valid = skipped = 0
    for item in read_addresses(path):
        if isinstance(item, AddressLine):
            valid += 1
        else:
            skipped += 1
            click.echo(f"skipped {path}:{item.line}: {item.reason}", err=True)
    if valid == 0 and skipped == 0:
        click.echo(f"{path}: no addresses; nothing to import")
        return
    default = reason if reason is not None else f"imported from {path.name}"
    added = 0
    if valid:
        ledger = _ledger(obj)
        try:
            added = ledger.suppress_many(
                (
                    (item.email, item.reason or default)
                    for item in read_addresses(path)
                    if isinstance(item, AddressLine)
                ),
                "import",
            )
        finally:
            ledger.close()
    click.echo(
        f"{path}: {valid} addresses imported ({added} new, {valid - added} already on the "
        "do-not-mail list)" + (f", {skipped} lines skipped" if skipped else "")
    )
    if skipped:
        click.secho(
            f"error: {path}: the lines listed above are not addresses and were not imported",
            err=True,
            fg="red",
        )
        click.echo("hint: correct them and import the file again", err=True)
        sys.exit(EXIT_STOPPED)


@suppress.command("list")
@_format_option
@click.pass_obj
@_reported
def suppress_list(obj: _Context, fmt: str) -> None:
    """Show the do-not-mail list: each address with its reason, source and date."""
    from appeal_mailer import report  # noqa: PLC0415  # keep --help fast

    ledger = _ledger(obj)
    try:
        if fmt == "csv":
            report.write_suppressions_csv(sys.stdout, ledger.suppressions())
        elif fmt == "json":
            counts = ledger.suppression_counts()
            report.write_suppressions_json(sys.stdout, counts, ledger.suppressions())
        else:
            counts = ledger.suppression_counts()
            report.write_suppressions_table(sys.stdout, counts, ledger.suppressions())
    finally:
        ledger.close()


def _normalized(addresses: tuple[str, ...], outcome: str) -> list[str]:
    """Each address as lists.py normalizes it; exit 1 naming every one that is not valid."""
    from appeal_mailer.lists import normalize_address  # noqa: PLC0415  # keep --help fast

    emails: list[str] = []
    errors: list[str] = []
    for text in addresses:
        try:
            emails.append(normalize_address(text))
        except ValueError as exc:
            reason = str(exc)
            errors.append(reason if repr(text.strip()) in reason else f"{text!r}: {reason}")
    for error in errors:
        click.secho(f"error: {error}", err=True, fg="red")
    if errors:
        click.echo(f"hint: {outcome}; correct the address and run the command again", err=True)
        sys.exit(EXIT_STOPPED)
    return emails


def _ledger(obj: _Context) -> Ledger:
    from appeal_mailer.ledger import Ledger  # noqa: PLC0415  # keep --help fast

    settings = obj.settings()
    return Ledger.open(settings.ledger_url, durability=settings.ledger.durability)


@main.command()
@click.argument("directory", metavar="[DIR]", default=".", type=click.Path(path_type=Path))
@_reported
def init(directory: Path) -> None:
    """Write a small working example into DIR: config.toml, templates/, lists/."""
    skeleton = resources.files("appeal_mailer") / "skeleton"
    written = []
    for source, relative in _walk(skeleton):
        target = directory / relative
        if target.exists():
            click.echo(f"kept {target} (already there)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        written.append(target)
    for path in written:
        click.echo(f"wrote {path}")
    config = directory / "config.toml"
    click.echo(
        "\nNext: edit the [campaign] and [smtp] sections of "
        f"{config}, then preview:\n"
        f"  appeal-mailer --config {config} send {directory / 'lists' / 'example.csv'} "
        "--dry-run --out preview"
    )


def _walk(folder: Any, prefix: Path = Path()) -> Iterator[tuple[Any, Path]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("__"):
            continue
        if entry.is_dir():
            yield from _walk(entry, prefix / entry.name)
        else:
            yield entry, prefix / entry.name


async def _run_with_signals(run: Any, preflight: Any, progress: Any) -> Any:
    # Ctrl-C or a TERM from cron/systemd: stop taking new messages, finish and
    # record those in flight, then report. A second one (either) does not wait.
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def first_signal(sig: signal.Signals) -> None:
        run.stop(f"interrupted by {sig.name}")
        _say(
            f"\n{sig.name}: stopping; the messages in flight are finished and recorded "
            "(Ctrl-C again to stop at once)\n"
        )
        for each in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(each, second_signal, each)

    def second_signal(sig: signal.Signals) -> None:
        # A second one does not wait (a server that stalls would hold the first for
        # [smtp] timeout): the process ends now, as the shell reports an interrupt
        # (128 + the signal). Rows in flight stay `sending`; the next run marks them
        # unknown, never re-sent. Its children see the socket close and end too.
        # The process leaves without cleanup: the progress bar's hidden cursor is
        # shown again here, and nothing may keep it from leaving (a closed stderr).
        try:
            if sys.stderr.isatty():
                _say("\x1b[?25h")
            if run.dry_run:
                _say(
                    f"\ninterrupted again by {sig.name}: stopped at once; the preview is partial\n"
                )
            else:
                _say(
                    f"\ninterrupted again by {sig.name}: stopped at once; the next run marks "
                    "the messages that were in flight unknown (`status` lists them)\n"
                )
        finally:
            os._exit(128 + sig)

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, first_signal, sig)
    return await run.run(preflight, progress)


def _say(text: str) -> None:
    """`text` on stderr, written at once (in a signal's handler); failing quietly."""
    with contextlib.suppress(OSError, ValueError):  # stderr closed, a pipe gone
        os.write(sys.stderr.fileno(), text.encode())


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop's event loop when uvloop is installed (the `fast` extra).

    uvloop runs the same asyncio code with less CPU per socket event: sending is
    CPU-bound, so that is more messages per second (bench/README.md).
    """
    try:
        import uvloop  # noqa: PLC0415  # optional, and only a run needs it
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _progress(obj: _Context, *, dry_run: bool) -> Any:
    from appeal_mailer.progress import BarProgress, LogProgress  # noqa: PLC0415  # fast --help

    if sys.stderr.isatty() and obj.verbosity >= 0:
        return BarProgress(sys.stderr)
    return LogProgress(dry_run=dry_run)


def _clear_preview(out: Path) -> None:
    # Only what an earlier dry run wrote, so an old preview does not mix with this one.
    if not out.is_dir():
        return
    for path in out.glob("[0-9]*-*.eml"):
        path.unlink()
    for name in ("index.csv", "summary.txt"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
