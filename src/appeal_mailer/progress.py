"""Show a run's progress: a progress bar in a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TextIO

from appeal_mailer.models import DeliveryResult, State

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

log = logging.getLogger("appeal_mailer")

# Without a terminal, a line at most this often (seconds), so cron mail stays short.
_LOG_EVERY = 10.0


class LogProgress:
    """Progress as log lines: each problem as it happens, and a count now and then."""

    def __init__(self, *, dry_run: bool = False) -> None:
        self._verb = "written" if dry_run else "sent"
        self._total = 0
        self._done = 0
        self._sent = 0
        self._started = 0.0
        self._last = 0.0

    def start(self, total: int) -> None:
        self._total = total
        self._started = self._last = time.monotonic()
        log.info("%d messages to go (%s)", total, "dry run" if self._verb == "written" else "send")

    def advance(self, result: DeliveryResult) -> None:
        self._done += 1
        if result.state is State.SENT:
            self._sent += 1
            log.debug("%s: %s", self._verb, result.recipient)
        elif result.state is State.SUPPRESSED:
            log.info("suppressed: %s", result.recipient)
        else:
            log.warning("%s", result)
        now = time.monotonic()
        if now - self._last >= _LOG_EVERY:
            self._last = now
            rate = self._sent / (now - self._started) if now > self._started else 0.0
            log.info(
                "progress: %d/%d done, %d %s, %.1f messages/s",
                self._done,
                self._total,
                self._sent,
                self._verb,
                rate,
            )

    def finish(self) -> None:
        elapsed = time.monotonic() - self._started
        log.info("%d/%d done in %.1f s", self._done, self._total, elapsed)


class BarProgress:
    """A progress bar on the terminal (rich), with problems printed above it."""

    def __init__(self, stream: TextIO) -> None:
        # Imported here: rich costs start-up time that cron runs need not pay.
        from rich.console import Console  # noqa: PLC0415

        self._console = Console(file=stream)
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def start(self, total: int) -> None:
        from rich.progress import (  # noqa: PLC0415  # see __init__
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("send", total=total)

    def advance(self, result: DeliveryResult) -> None:
        if self._bar is None or self._task is None:
            return
        if result.state not in (State.SENT, State.SUPPRESSED):
            self._bar.console.print(f"[yellow]{result.state}[/]: {_escape(str(result))}")
        self._bar.advance(self._task)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _escape(text: str) -> str:
    from rich.markup import escape  # noqa: PLC0415  # see BarProgress.__init__

    return escape(text)
