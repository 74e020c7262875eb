"""The ledger served by a child process: the same answers, errors with their facts, no orphan.

A run's ledger lives in a child process (ledger_process.py) so that its work
runs on the other core. These tests drive that child through its proxy on
both engines and kill real processes: the child must give what the ledger
gives, pass its errors back whole, keep serving through Ctrl-C, and go away
when the sending process dies.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from appeal_mailer.errors import (
    AppealMailerError,
    ConfigError,
    LedgerError,
    ListError,
    ServerError,
    TemplateError,
    TransientDeliveryError,
)
from appeal_mailer.ledger import DueScope, Ledger, runs
from appeal_mailer.ledger_process import LedgerProcess
from appeal_mailer.models import DeliveryResult, State
from tests.test_ledger import CAMPAIGN, STEP, person


@pytest.fixture
def remote(ledger_url: str) -> Iterator[LedgerProcess]:
    opened = LedgerProcess.open(ledger_url)
    yield opened
    opened.close()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" in state or "dead" in state


def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_run_through_the_process_writes_what_the_ledger_reads(
    remote: LedgerProcess, ledger_url: str
) -> None:
    """Load, due pages, claims, results and counts through the child match the ledger itself."""
    run_id = remote.call(Ledger.start_run, CAMPAIGN, STEP, "send")
    people = [
        person(f"member{i:04d}@example.org", line=i + 2, city="Караганда") for i in range(1203)
    ]
    items = [(p, f"<{p.email}@test>") for p in people]
    assert remote.call(Ledger.load, CAMPAIGN, STEP, run_id, items) == 1203
    scope = DueScope(CAMPAIGN, STEP, run_id, datetime.now(UTC))
    assert remote.call(Ledger.count_due, scope) == 1203
    page = remote.call(Ledger.due_page, scope, 0, state=State.PENDING)
    assert [row.recipient for row in page] == people[: len(page)]
    assert page[0].recipient.fields["city"] == "Караганда"
    first, second, third = (row.row_id for row in page[:3])
    claimed = remote.call(Ledger.write_group, claim=[first, second, third], run_id=run_id)
    assert claimed == ([first, second, third], [])
    sent = DeliveryResult(first, people[0].email, State.SENT, attempts=1, code=250, reply="ok")
    gone = DeliveryResult(
        second, people[1].email, State.FAILED, attempts=1, code=550, reply="5.1.1 no such user"
    )
    remote.call(Ledger.write_group, [(sent, None), (gone, None)], [(people[1].email, "550 5.1.1")])
    remote.call(Ledger.release, [third], run_id)
    assert remote.call(Ledger.counts, CAMPAIGN, STEP) == {"sent": 1, "failed": 1, "pending": 1201}
    remote.call(Ledger.finish_run, run_id, {"sent": 1})

    here = Ledger.open(ledger_url)
    try:
        assert here.counts(CAMPAIGN, STEP) == remote.call(Ledger.counts, CAMPAIGN, STEP)
        assert [s.email for s in here.suppressions()] == [people[1].email]
        assert here.recent_runs(CAMPAIGN)[0].summary == {"sent": 1}
    finally:
        here.close()


def test_calls_sent_from_the_event_loop_are_answered_in_order(remote: LedgerProcess) -> None:
    """Several calls in flight at once: each future gets its own call's answer, errors included."""

    async def calls() -> list[Any]:
        await remote.attach()
        try:
            run_id = await remote.submit(Ledger.start_run, CAMPAIGN, STEP, "send")
            batches = [
                [
                    (person(f"b{b}m{i}@example.org", line=i + 2), f"<b{b}m{i}@test>")
                    for i in range(300)
                ]
                for b in range(4)
            ]
            futures: list[asyncio.Future[Any]] = [
                remote.submit(Ledger.load, CAMPAIGN, STEP, run_id, batch) for batch in batches
            ]
            futures.append(remote.submit(Ledger.counts, CAMPAIGN, STEP))
            futures.append(remote.submit(Ledger.count_due, "not a scope"))  # type: ignore[arg-type]
            futures.append(remote.submit(Ledger.load, CAMPAIGN, STEP, run_id, batches[0]))
            futures.append(remote.submit(Ledger.finish_run, 10**9, {}))  # no such run: fine
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            await remote.detach()

    answers = asyncio.run(calls())
    error = answers.pop(5)
    assert isinstance(error, LedgerError)
    assert "internal error in the ledger process" in str(error)
    assert answers == [300, 300, 300, 300, {"pending": 1200}, 0, None]
    # Detached, the blocking calls work again on the same child.
    assert remote.call(Ledger.counts, CAMPAIGN, STEP) == {"pending": 1200}


def test_the_run_log_names_the_sending_process_not_the_ledgers(
    remote: LedgerProcess, ledger_url: str
) -> None:
    """A run's pid is the sender's: when the sender dies, the next run knows at once."""
    run_id = remote.call(Ledger.start_run, CAMPAIGN, STEP, "send", pid=os.getpid())
    here = Ledger.open(ledger_url)
    try:
        with here._read() as conn:
            pid = conn.execute(sa.select(runs.c.pid).where(runs.c.id == run_id)).scalar_one()
    finally:
        here.close()
    assert pid == os.getpid()
    assert remote._process.pid != os.getpid()


def test_an_error_in_the_ledger_reaches_the_sender_with_its_facts(tmp_path: Path) -> None:
    """A ledger that cannot be opened is a LedgerError naming where, with its hint."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(LedgerError) as caught:
        LedgerProcess.open(f"sqlite:///{blocker}/ledger.db")
    assert str(blocker) in caught.value.location
    assert str(blocker) in str(caught.value)


def test_a_bug_in_the_ledger_process_is_a_ledger_error_saying_what_it_was(
    tmp_path: Path,
) -> None:
    """An exception that is not ours comes back as a LedgerError with its type and message."""
    remote = LedgerProcess.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with pytest.raises(LedgerError, match="internal error in the ledger process: Attr"):
            remote.call(Ledger.count_due, "not a scope")  # type: ignore[arg-type]  # the bug
        assert remote.call(Ledger.counts, CAMPAIGN) == {}  # and it keeps serving
    finally:
        remote.close()


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("must be a number", path=Path("config.toml"), key="rate", hint="e.g. 5"),
        ListError("not an address", path=Path("unions.csv"), line=7, field="email"),
        TemplateError("'name' is undefined", template="protest", line=3, recipient_line=9),
        LedgerError("disk I/O error", location="ledger.db", hint="free some space"),
        ServerError("refused", host="mx", port=25, code=421, reply="busy", transient=True),
        TransientDeliveryError("timed out", recipient="a@example.org", after_data=True),
    ],
    ids=lambda error: type(error).__name__,
)
def test_every_error_crosses_a_process_boundary_whole(error: AppealMailerError) -> None:
    """Pickled and back (as the ledger's process sends it): same type, message, hint and facts."""
    back = pickle.loads(pickle.dumps(error))  # noqa: S301  # our own bytes, just made
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.hint == error.hint
    assert vars(back) == vars(error)


def test_the_ledger_process_keeps_serving_through_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group; the child must let the sender finish recording."""
    remote = LedgerProcess.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        os.kill(remote._process.pid, signal.SIGINT)
        os.kill(remote._process.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert remote.call(Ledger.start_run, CAMPAIGN, STEP, "send") == 1
    finally:
        remote.close()
    assert remote._process.exitcode == 0


def test_a_dead_ledger_process_is_a_ledger_error_not_a_hang(tmp_path: Path) -> None:
    """If the child is killed, the next call fails at once with a LedgerError."""
    remote = LedgerProcess.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        os.kill(remote._process.pid, signal.SIGKILL)
        assert _wait_gone(remote._process.pid)
        with pytest.raises(LedgerError, match="ledger process ended unexpectedly"):
            remote.call(Ledger.counts, CAMPAIGN)
    finally:
        remote.close()


_SENDER = """
import sys, time
from appeal_mailer.ledger import Ledger
from appeal_mailer.ledger_process import LedgerProcess
remote = LedgerProcess.open(sys.argv[1])
remote.call(Ledger.start_run, "c", "appeal", "send")
print(remote._process.pid, flush=True)
time.sleep(600)
"""


def test_the_ledger_process_exits_when_the_sender_is_killed(tmp_path: Path) -> None:
    """kill -9 of the sender: the child sees its pipe close and exits; the ledger opens."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    sender = subprocess.Popen(  # our own interpreter and script
        [sys.executable, "-c", _SENDER, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sender.stdout is not None
        child = int(sender.stdout.readline())
        assert not _gone(child)
        sender.kill()
        sender.wait(timeout=10)
        assert _wait_gone(child), "the ledger process outlived its sender"
    finally:
        if sender.poll() is None:
            sender.kill()
    here = Ledger.open(url)
    try:
        assert here.recent_runs("c")[0].finished_at is None
    finally:
        here.close()


def test_a_cancelled_call_leaves_the_socket_in_step(remote: LedgerProcess) -> None:
    """A run cancelled with a call in flight (a second Ctrl-C): its reply is read and dropped.

    Otherwise the next blocking call would get the cancelled call's answer.
    """

    async def cancelled() -> None:
        await remote.attach()
        try:
            counting = remote.submit(Ledger.counts, CAMPAIGN, STEP)
            counting.cancel()
        finally:
            await remote.detach()

    asyncio.run(cancelled())
    assert remote.call(Ledger.steps, CAMPAIGN) == []
    assert remote.call(Ledger.counts, CAMPAIGN, STEP) == {}
