"""Crash tests with real processes: kill -9 a running `send`, resume, check what the server got.

Each test runs `python -m appeal_mailer ... send` as a child process against the
recording SMTP server of this process, so a SIGKILL ends the sender and nothing
else. What the server received is then compared with the ledger as `status
--format json` reports it (DESIGN.md, "The ledger: nothing lost, nothing sent
twice").

Every test here runs on both ledger engines (`ledger_url`, tests/conftest.py):
an SQLite file, and a PostgreSQL schema of the test's own that the children get
as `[ledger] url` in their config. The test reads the ledger behind the CLI's
back on the same engine (`LedgerView`).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from appeal_mailer.ledger import Ledger, runs
from appeal_mailer.models import Recipient
from tests import pg
from tests.conftest import ConfigWriter, ListWriter
from tests.smtpd import STALL, RecordingServer

CONNECTIONS = 4
# Rows a run can hold `sending` at once: per connection two messages in flight (the
# recording server says PIPELINING, so the next envelope follows the data of the one
# before) and one claimed next (campaign.py's `free` semaphore, whose places come
# back only when a result is durable), so at most this many are unknown after a kill.
IN_FLIGHT = 3 * CONNECTIONS
# Under a [sending] rate nothing is chained: one message in flight per connection.
IN_FLIGHT_PACED = 2 * CONNECTIONS
# No single wait below may take longer: a stuck child fails the test, never hangs it.
DEADLINE = 60.0
FAST_RETRIES = {"retry_backoff": 0.01, "retry_max_delay": 0.05}


class LedgerView:
    """The ledger the children write, read by the test on the same engine.

    SQLite: short-lived connections to the file, which is never created here (a
    count is 0 until a child has made it). PostgreSQL: the test's schema, through
    the URL the children get, but with an `application_name` of the children's own,
    so that the test can tell when the server is done with a killed child.
    """

    def __init__(self, url: str) -> None:
        self.file: Path | None = None
        self.application_name: str | None = None
        if url.startswith("sqlite:///"):
            self.file = Path(url.removeprefix("sqlite:///"))
            self.engine = sa.create_engine(url, poolclass=NullPool, connect_args={"timeout": 10})
            self.children_url = url
        else:
            self.engine = pg.engine(url)
            self.application_name = f"appeal-mailer-crash-{uuid.uuid4().hex[:12]}"
            self.children_url = f"{url}&application_name={self.application_name}"

    @property
    def is_sqlite(self) -> bool:
        return self.file is not None

    def config(self, **section: Any) -> dict[str, Any]:
        """The config's [ledger] section: the default file, or the PostgreSQL url."""
        return section if self.is_sqlite else {**section, "url": self.children_url}

    def rows(self, query: str, **params: Any) -> list[sa.Row[Any]]:
        """What `query` returns; nothing while the ledger or its tables do not exist yet."""
        if self.file is not None and not self.file.exists():
            return []
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(sa.text(query), params))
        except sa.exc.DBAPIError as exc:  # killed before the schema was written
            no_table = "no such table" in str(exc.orig)  # SQLite
            if no_table or getattr(exc.orig, "sqlstate", None) == "42P01":  # undefined_table
                return []
            raise

    def count(self, query: str, **params: Any) -> int:
        """One number from the ledger; 0 while it or its tables do not exist yet."""
        found = self.rows(query, **params)
        return int(found[0][0] or 0) if found else 0

    def emails_in(self, state: str) -> set[str]:
        """The addresses whose row is in `state`."""
        found = self.rows("SELECT email FROM deliveries WHERE state = :state", state=state)
        return {email for (email,) in found}

    def counts(self) -> dict[str, int]:
        """How many rows are in each state, as `status` counts them."""
        found = self.rows("SELECT state, count(*) FROM deliveries GROUP BY state")
        return {state: int(n) for state, n in found}

    def settle(self) -> None:
        """After a SIGKILL: wait until the ledger holds all it ever will of the killed child.

        SQLite: at once, the child wrote the file itself. PostgreSQL: the server may
        still hold the child's session, with a COMMIT in its socket not yet carried
        out, or an open transaction and its row locks; it ends the session when it
        reads the end of the connection. Until then the test could read a state the
        child's last commit then changes.
        """
        if self.is_sqlite:
            return
        deadline = time.monotonic() + DEADLINE
        sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
        while self.count(sessions, name=self.application_name):
            assert time.monotonic() < deadline, "the server kept a killed child's session"
            time.sleep(0.005)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def ledger_view(ledger_url: str) -> Iterator[LedgerView]:
    """The ledger of this test, on each engine in turn."""
    view = LedgerView(ledger_url)
    yield view
    view.close()


class Mailer:
    """Runs the CLI as child processes, one config and one list, logs in files under `folder`."""

    def __init__(
        self,
        config: Path,
        list_path: Path,
        folder: Path,
        children: list[subprocess.Popen[bytes]],
        ledger: LedgerView | None,
    ) -> None:
        self.config = config
        self.list_path = list_path
        self.folder = folder
        self.children = children
        # No APPEAL_MAILER_* variable: the ledger, SQLite or PostgreSQL, is in `config`.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
        self.ledger = ledger
        # Each process's log files, by pid: send-N.out and send-N.err.
        self.logs: dict[int, Path] = {}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "appeal_mailer", "--config", str(self.config), *args]

    def start(self) -> subprocess.Popen[bytes]:
        """Start `send LIST --yes`, its stdout and stderr into files."""
        name = self.folder / f"send-{len(self.logs) + 1}"
        with (
            name.with_suffix(".out").open("wb") as out,
            name.with_suffix(".err").open("wb") as err,
        ):
            process = subprocess.Popen(
                self.command("send", str(self.list_path), "--yes"),
                stdout=out,
                stderr=err,
                cwd=self.folder,
                env=self.env,
            )
        self.children.append(process)
        self.logs[process.pid] = name
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        """What a `send` printed so far, stdout then stderr."""
        name = self.logs[process.pid]
        return name.with_suffix(".out").read_text() + name.with_suffix(".err").read_text()

    def finish(self, process: subprocess.Popen[bytes]) -> int:
        """Wait for a `send` to end by itself; its exit status."""
        try:
            return process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            pytest.fail(f"send did not finish within {DEADLINE} s:\n{self.output(process)}")

    def kill(self, process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig`; for SIGKILL, also reap the child and let the ledger settle.

        Reaped, its pid is gone (not a zombie); settled (LedgerView.settle), the
        ledger holds all the child wrote before it died, and nothing more comes.
        """
        os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=30)
            if self.ledger is not None:
                self.ledger.settle()

    def status(self) -> dict[str, Any]:
        """`status --format json`, which must exit 0 and print one JSON object.

        Its counts must be those the test reads from the ledger itself: the CLI and
        the test look at the same ledger, on the same engine (and on PostgreSQL, no
        SQLite file was made in its stead).
        """
        result = subprocess.run(
            self.command("status", "--format", "json"),
            capture_output=True,
            cwd=self.folder,
            env=self.env,
            timeout=DEADLINE,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        parsed: dict[str, Any] = json.loads(result.stdout)
        assert self.ledger is not None, "a Mailer without a LedgerView cannot check status"
        assert parsed["counts"] == self.ledger.counts()
        if not self.ledger.is_sqlite:
            assert list(self.folder.glob("*.db")) == []
        return parsed


def _people(count: int) -> list[dict[str, str]]:
    return [
        {"email": f"member{i:05d}@example.org", "name": f"Member {i}", "organization": "Branch 7"}
        for i in range(count)
    ]


def _wait(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str, *, poll: float
) -> bool:
    """Wait until `condition` holds (True) or `process` ends first (False); fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(poll)
    process.kill()
    process.wait(timeout=30)
    pytest.fail(f"waited {DEADLINE} s for {what}")


def _messages(server: RecordingServer, at_least: int) -> Callable[[], bool]:
    """A condition: the server has received `at_least` messages."""
    return lambda: len(server.messages) >= at_least


def _ledger_has(ledger: LedgerView, query: str, **params: object) -> Callable[[], bool]:
    """A condition: `query` counts more than 0 in the ledger."""
    return lambda: ledger.count(query, **params) > 0


def _check_record(
    server: RecordingServer, status: dict[str, Any], emails: list[str]
) -> tuple[set[str], collections.Counter[str]]:
    """Nothing lost, nobody twice: each `sent` row has exactly one copy, `unknown` 0 or 1.

    Returns the unknown addresses and the copies the server got of each address.
    """
    states = {row["email"]: row["state"] for row in status["recipients"]}
    copies = server.count_by_recipient()
    assert sorted(states) == sorted(emails)
    twice = {email: n for email, n in copies.items() if n > 1}
    assert twice == {}, "recipients that got more than one copy"
    assert set(copies) <= set(emails)
    lost = {email: state for email, state in states.items() if state not in {"sent", "unknown"}}
    assert lost == {}, "rows neither sent nor unknown"
    not_received = [
        email for email, state in states.items() if state == "sent" and not copies[email]
    ]
    assert not_received == [], "rows recorded sent that the server never got"
    unknown = {email for email, state in states.items() if state == "unknown"}
    assert status["counts"] == dict(collections.Counter(states.values()))
    return unknown, copies


def test_kill_9_at_random_moments_then_resume_sends_everyone_once(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    ledger_view: LedgerView,
) -> None:
    """Killed by SIGKILL 4 times and resumed: all sent once, but for the unknown in-flight rows.

    On either engine: the rows `sending` in the ledger at each kill, and only those,
    end up unknown, at most IN_FLIGHT of them per kill; every other row is sent, once.
    """
    people = _people(2000)
    emails = [p["email"] for p in people]
    config = write_config(
        smtp={"connections": CONNECTIONS},
        sending={"rate": 0, "attempts_per_run": 3, **FAST_RETRIES},
        ledger=ledger_view.config(),
    )
    mailer = Mailer(config, write_list(people), tmp_path, children, ledger_view)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # The rows `sending` at each kill: exactly these must end up unknown.
    in_flight_at_kill: list[set[str]] = []
    for _ in range(4):
        process = mailer.start()
        target = len(smtp_server.messages) + rng.randint(1, 300)
        reached = _wait(_messages(smtp_server, target), process, "messages", poll=0.002)
        assert reached, f"seed {seed}: the run ended before the kill:\n{mailer.output(process)}"
        mailer.kill(process)
        in_flight_at_kill.append(ledger_view.emails_in("sending"))
    # The next run starts at once: a run killed with SIGKILL left no finished_at and a
    # heartbeat younger than STALE_AFTER, and must still be seen dead (its pid is gone).
    last = mailer.start()
    code = mailer.finish(last)
    unknown, copies = _check_record(smtp_server, mailer.status(), emails)
    assert code == (3 if unknown else 0), mailer.output(last)  # 3: some rows are unknown
    sizes = [len(rows) for rows in in_flight_at_kill]
    print(
        f"seed {seed}: sending at each kill {sizes}; unknown {len(unknown)}, of which "
        f"{sum(copies[e] for e in unknown)} arrived"
    )
    assert all(size <= IN_FLIGHT for size in sizes), f"seed {seed}: {sizes} > {IN_FLIGHT}"
    # Exactly the rows in flight at a kill are unknown; no other row is.
    assert unknown == set().union(*in_flight_at_kill), f"seed {seed}"
    assert len(unknown) <= IN_FLIGHT * len(in_flight_at_kill)
    if in_flight_at_kill[-1]:
        assert f"{len(in_flight_at_kill[-1])} messages were being sent" in mailer.output(last)


def test_kill_9_while_the_ledger_is_written_leaves_a_ledger_that_opens(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    ledger_view: LedgerView,
) -> None:
    """Killed creating, loading, claiming: `status` opens it each time; then all are sent once.

    After each kill the ledger opens, its counts add up and no delivery row is
    without its recipient; SQLite's file also passes `PRAGMA integrity_check`. On
    PostgreSQL the server rolls back the killed client's open transaction, and
    this proves each of the CLI's transactions (the schema, each batch of the
    list, each claim) is all or nothing, and that none leaves a state or a lock
    that keeps the next run from opening the ledger and sending the rest once.
    """
    # Six batches of the list's load (ledger._BATCH = 500): room for a kill between two.
    people = _people(3000)
    emails = [p["email"] for p in people]
    # "crash" durability (synchronous=NORMAL in WAL mode) must also survive a killed process.
    # (SQLite's setting; on PostgreSQL the server's own commit settings apply.)
    config = write_config(
        smtp={"connections": CONNECTIONS},
        # Paced, so that no run can send the whole list before the kill meant for it
        # (a "start" kill waits up to 1.5 s): at 500 a second the list takes 6 s.
        sending={"rate": 500, **FAST_RETRIES},
        ledger=ledger_view.config(durability="crash"),
    )
    mailer = Mailer(config, write_list(people), tmp_path, children, ledger_view)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    loaded = "SELECT count(*) FROM recipients WHERE seen_run > :run"
    claimed = "SELECT count(*) FROM deliveries WHERE state = 'sending' AND claimed_by > :run"
    in_flight_at_kill: list[set[str]] = []
    mid_load = 0
    for phase in ("start", "load", "claims", "load", "start", "load"):
        before = ledger_view.count("SELECT max(id) FROM runs")
        process = mailer.start()
        if phase == "start":
            # Python starting, the config, the ledger's schema being created, the list rendered.
            time.sleep(rng.uniform(0.2, 1.5))
        elif phase == "load":
            # The list goes into the ledger in batches, one commit each: kill after the first.
            _wait(_ledger_has(ledger_view, loaded, run=before), process, "load", poll=0.001)
        else:
            _wait(_ledger_has(ledger_view, claimed, run=before), process, "claim", poll=0.001)
        assert process.poll() is None, f"seed {seed}: ended before the kill in {phase}"
        mailer.kill(process)
        mid_load += 0 < ledger_view.count(loaded, run=before) < len(people)
        in_flight_at_kill.append(ledger_view.emails_in("sending"))
        if ledger_view.file is not None and ledger_view.file.exists():
            assert ledger_view.rows("PRAGMA integrity_check") == [("ok",)], f"seed {seed}"
        # No delivery row without its recipient: the two are written in one transaction.
        orphans = ledger_view.count(
            "SELECT count(*) FROM deliveries d LEFT JOIN recipients r"
            " ON r.campaign = d.campaign AND r.email = d.email WHERE r.email IS NULL"
        )
        assert orphans == 0, f"seed {seed}"
        status = mailer.status()
        assert sum(status["counts"].values()) == len(status["recipients"])
    # Each "load" kill came after a batch's commit; at least one fell before the last.
    assert mid_load >= 1, f"seed {seed}: no kill fell in the middle of loading the list"
    last = mailer.start()
    code = mailer.finish(last)
    unknown, copies = _check_record(smtp_server, mailer.status(), emails)
    assert code == (3 if unknown else 0), mailer.output(last)
    sizes = [len(rows) for rows in in_flight_at_kill]
    print(
        f"seed {seed}: {mid_load} kills mid-load; sending at each kill {sizes}; unknown "
        f"{len(unknown)}, of which {sum(copies[e] for e in unknown)} arrived"
    )
    assert all(size <= IN_FLIGHT_PACED for size in sizes), (
        f"seed {seed}: {sizes} > {IN_FLIGHT_PACED}"
    )
    assert unknown == set().union(*in_flight_at_kill), f"seed {seed}"


def test_two_overlapping_sends_never_send_a_recipient_twice(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    ledger_view: LedgerView,
) -> None:
    """Two `send`s of one campaign and list at once: nobody twice, all sent, none unknown.

    On either engine: two processes claiming from one ledger never both take a row.
    """
    people = _people(600)
    emails = [p["email"] for p in people]
    # 100 messages/s each: alone, a run takes about 6 s, so the two overlap for seconds.
    config = write_config(
        smtp={"connections": CONNECTIONS},
        sending={"rate": 100, **FAST_RETRIES},
        ledger=ledger_view.config(),
    )
    mailer = Mailer(config, write_list(people), tmp_path, children, ledger_view)
    first = mailer.start()
    # The second starts as the first begins to send (about a second later), so that
    # both are sending at once. Two started in the same instant mostly race on
    # loading the list instead: the later load takes the list over (`seen_run`), and
    # the earlier run then finds nothing due.
    assert _wait(_messages(smtp_server, 1), first, "a first message", poll=0.002)
    second = mailer.start()
    codes = [mailer.finish(first), mailer.finish(second)]
    assert codes == [0, 0], mailer.output(first) + mailer.output(second)
    twice = {email: n for email, n in smtp_server.count_by_recipient().items() if n > 1}
    assert twice == {}
    runs = ledger_view.rows("SELECT started_at, finished_at, summary FROM runs ORDER BY id")
    (_, first_end, first_summary), (second_start, _, second_summary) = runs
    assert second_start < first_end, "the two runs did not overlap"
    sent_by = [json.loads(first_summary)["sent"], json.loads(second_summary)["sent"]]
    assert all(sent_by), f"one of the runs sent nothing: {sent_by}"
    # What both left (a run counts rows the other took against its share) is pending,
    # and one more run sends it; nothing was in flight at a crash, so nothing is unknown.
    if mailer.status()["counts"].get("pending"):
        assert mailer.finish(mailer.start()) == 0
    unknown, copies = _check_record(smtp_server, mailer.status(), emails)
    print(f"sent by the overlapping runs {sent_by}, by a third {len(emails) - sum(sent_by)}")
    assert unknown == set()
    assert copies == dict.fromkeys(emails, 1)


def test_sigterm_stops_cleanly_and_the_next_run_sends_the_rest_once(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    ledger_view: LedgerView,
) -> None:
    """SIGTERM: exit 3, the summary says it stopped, nothing left `sending`; the rest sent once.

    On either engine: every result of a message in flight is committed before exit.
    """
    people = _people(600)
    emails = [p["email"] for p in people]
    config = write_config(
        smtp={"connections": CONNECTIONS},
        sending={"rate": 150, **FAST_RETRIES},
        ledger=ledger_view.config(),
    )
    mailer = Mailer(config, write_list(people), tmp_path, children, ledger_view)
    process = mailer.start()
    assert _wait(_messages(smtp_server, 100), process, "100 messages", poll=0.005)
    mailer.kill(process, signal.SIGTERM)
    assert mailer.finish(process) == 3, mailer.output(process)
    output = mailer.output(process)
    assert "Stopped early" in output
    assert "SIGTERM" in output
    counts = mailer.status()["counts"]
    assert "sending" not in counts
    assert "unknown" not in counts
    # Every message in flight finished and was recorded: the ledger matches the server.
    assert counts["sent"] == len(smtp_server.messages)
    assert counts["pending"] == len(emails) - counts["sent"] > 0
    rest = mailer.start()
    assert mailer.finish(rest) == 0, mailer.output(rest)
    unknown, copies = _check_record(smtp_server, mailer.status(), emails)
    assert unknown == set()
    assert copies == dict.fromkeys(emails, 1)


def _stalled_run(
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    mailer_at: Callable[[Path, Path], Mailer],
) -> tuple[Mailer, list[str]]:
    """A config and list of 40 whose first message's DATA never gets a reply.

    The server stalls for longer than any test waits, so a first signal alone
    would wait out [smtp] timeout (set far beyond DEADLINE).
    """
    people = _people(40)
    smtp_server.fail(people[0]["email"], "data", STALL)
    config = write_config(
        smtp={"connections": 2, "timeout": 10 * DEADLINE}, sending={"rate": 20, **FAST_RETRIES}
    )
    return mailer_at(config, write_list(people)), [p["email"] for p in people]


def _first_signal_taken(mailer: Mailer, process: subprocess.Popen[bytes], name: str) -> bool:
    return _wait(
        lambda: f"{name}: stopping" in mailer.output(process),
        process,
        f"the {name} to be taken",
        poll=0.01,
    )


def test_a_second_ctrl_c_ends_the_run_at_once_and_the_next_run_finishes_it(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    ledger_view: LedgerView,
) -> None:
    """The first Ctrl-C waits for the messages in flight, and says so; a second does not wait.

    The second ends the process (exit 130, as a shell reports an interrupt);
    the next run marks what was in flight unknown and sends the rest, once.
    """
    mailer, emails = _stalled_run(
        lambda **sections: write_config(**sections, ledger=ledger_view.config()),
        write_list,
        smtp_server,
        lambda config, people: Mailer(config, people, tmp_path, children, ledger_view),
    )
    process = mailer.start()
    assert _wait(_messages(smtp_server, 5), process, "5 messages", poll=0.005)
    mailer.kill(process, signal.SIGINT)
    assert _first_signal_taken(mailer, process, "SIGINT"), mailer.output(process)
    assert "Ctrl-C again to stop at once" in mailer.output(process)
    mailer.kill(process, signal.SIGINT)
    assert mailer.finish(process) == 130, mailer.output(process)
    assert "interrupted again by SIGINT: stopped at once" in mailer.output(process)
    ledger_view.settle()
    rest = mailer.start()
    assert mailer.finish(rest) in (0, 3), mailer.output(rest)
    unknown, copies = _check_record(smtp_server, mailer.status(), emails)
    assert emails[0] in unknown
    assert all(count == 1 for email, count in copies.items() if email not in unknown)


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)],
    ids=["int-then-term", "term-then-int"],
)
def test_either_signal_after_the_other_is_the_second(  # noqa: PLR0917  # pytest fixtures
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    first: signal.Signals,
    second: signal.Signals,
) -> None:
    """Ctrl-C after a TERM (or a TERM after Ctrl-C) ends the run at once: 128 + the second."""
    mailer, _ = _stalled_run(
        write_config,
        write_list,
        smtp_server,
        lambda config, people: Mailer(config, people, tmp_path, children, None),
    )
    process = mailer.start()
    assert _wait(_messages(smtp_server, 5), process, "5 messages", poll=0.005)
    mailer.kill(process, first)
    assert _first_signal_taken(mailer, process, first.name), mailer.output(process)
    mailer.kill(process, second)
    assert mailer.finish(process) == 128 + second, mailer.output(process)


def test_a_second_ctrl_c_ends_the_run_even_when_stderr_is_gone(
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """`send ... 2>&1 | tee log`: Ctrl-C kills tee too; the second Ctrl-C must still end the run.

    Its stderr is a pipe whose reader has gone (EPIPE): nothing it writes there
    may keep it from leaving.
    """
    mailer, _ = _stalled_run(
        write_config,
        write_list,
        smtp_server,
        lambda config, people: Mailer(config, people, tmp_path, children, None),
    )
    reader, writer = os.pipe()
    with (tmp_path / "out.txt").open("wb") as out:
        process = subprocess.Popen(
            mailer.command("send", str(mailer.list_path), "--yes"),
            stdout=out,
            stderr=writer,
            cwd=tmp_path,
            env=mailer.env,
        )
    children.append(process)
    os.close(writer)
    try:
        assert _wait(_messages(smtp_server, 5), process, "5 messages", poll=0.005)
    finally:
        os.close(reader)  # tee, gone
    os.kill(process.pid, signal.SIGINT)
    # Its "stopping" line cannot be read back (stderr is gone): a pause, so that
    # the two signals are not taken as one. Not a measurement.
    time.sleep(1.0)
    assert process.poll() is None, "the first SIGINT alone must wait for the stalled message"
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=DEADLINE) == 130


def test_a_run_whose_process_is_gone_is_dead_at_once_but_only_on_its_own_host(
    ledger_url: str,
) -> None:
    """A dead pid on this host frees its run's rows at once; another host's run keeps them.

    On either engine: the runs table keeps each run's host and pid, and recovery
    reads them there.
    """
    ledger = Ledger.open(ledger_url)
    people = [Recipient(email=f"p{i}@example.org", line=i + 2) for i in range(4)]
    here, there = ledger.start_run("c", "appeal", "send"), ledger.start_run("c", "appeal", "send")
    ledger.load("c", "appeal", there, [(p, f"<{i}@x>") for i, p in enumerate(people)])
    assert ledger.claim([1, 2], here) == ([1, 2], [])
    assert ledger.claim([3, 4], there) == ([3, 4], [])
    # Both runs live in this process: alive, whatever their heartbeat.
    assert ledger.recover_interrupted("c", "appeal") == 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=DEADLINE)  # reaped: its pid names no process now
    with ledger._write() as conn:
        conn.execute(runs.update().where(runs.c.id == here).values(pid=gone.pid))
        # The same pid on another machine says nothing about that machine's process.
        conn.execute(
            runs.update().where(runs.c.id == there).values(pid=gone.pid, host="elsewhere")
        )
    assert ledger.recover_interrupted("c", "appeal") == 2
    states = {row.email: row.state for row in ledger.rows("c")}
    ledger.close()
    assert states == {
        "p0@example.org": "unknown",
        "p1@example.org": "unknown",
        "p2@example.org": "sending",
        "p3@example.org": "sending",
    }
