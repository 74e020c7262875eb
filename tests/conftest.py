"""Fixtures chained from a recording SMTP server on port 0: server -> config -> list -> CLI run."""

from __future__ import annotations

import csv
import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
import tomli_w
import trustme
from click.testing import CliRunner, Result

from appeal_mailer.cli import main
from appeal_mailer.ledger import Ledger
from tests.dnsd import LoopbackDns
from tests.pg import POSTGRES_URL, engine
from tests.smtpd import RecordingServer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
EXAMPLE_CONFIG = ROOT / "config.example.toml"
EXAMPLE_LIST = ROOT / "lists" / "unions.csv"

ConfigWriter = Callable[..., Path]
ListWriter = Callable[..., Path]
CliRun = Callable[..., Result]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPEAL_MAILER_* variable of the developer's shell leaks into a test."""
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("APPEAL_MAILER_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


@pytest.fixture
def smtp_server() -> Iterator[RecordingServer]:
    """A plain (loopback, no TLS) recording SMTP server."""
    server = RecordingServer().start()
    yield server
    server.stop()


@pytest.fixture
def loopback_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackDns]:
    """dnspython's default resolver, which `check` and dkimpy use, asks LoopbackDns only."""
    server = LoopbackDns()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    monkeypatch.setattr(dns.resolver, "default_resolver", resolver)
    yield server
    server.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child process a test starts; any still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def base_config(server: RecordingServer, tmp_path: Path) -> dict[str, Any]:
    """A config that sends to `server` quickly: no rate limit, short retry delays."""
    return {
        "smtp": {
            "host": server.host,
            "port": server.port,
            "security": "none",
            "timeout": 5.0,
            "connections": 2,
        },
        "sending": {
            "rate": 0,
            "max_attempts": 5,
            "attempts_per_run": 3,
            "retry_backoff": 0.01,
            "retry_max_delay": 0.05,
        },
        "campaign": {
            "id": "test-campaign",
            "from": "Solidarity Committee <appeal@example.org>",
            "list_id": "Solidarity <test.lists.example.org>",
            "unsubscribe_mailto": "unsubscribe@example.org",
            "template": "appeal",
            "templates": str(TEMPLATES),
            "timezone": "Europe/London",
            "context": _example_context(),
        },
        "ledger": {"path": str(tmp_path / "ledger.db")},
    }


def _example_context() -> dict[str, Any]:
    import tomllib  # noqa: PLC0415

    with EXAMPLE_CONFIG.open("rb") as handle:
        context: dict[str, Any] = tomllib.load(handle)["campaign"]["context"]
    return context


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def write_config(smtp_server: RecordingServer, tmp_path: Path) -> ConfigWriter:
    """Write config.toml for `smtp_server`; keyword sections override (None removes a key)."""

    def write(**sections: dict[str, Any]) -> Path:
        data = _merge(base_config(smtp_server, tmp_path), sections)
        path = tmp_path / "config.toml"
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        return path

    return write


@pytest.fixture
def config_file(write_config: ConfigWriter) -> Path:
    return write_config()


@pytest.fixture
def write_list(tmp_path: Path) -> ListWriter:
    """Write a CSV list: `write_list(rows)` with a header from the first row's keys."""

    def write(
        rows: Sequence[dict[str, str]], name: str = "list.csv", header: Sequence[str] | None = None
    ) -> Path:
        path = tmp_path / name
        columns = list(header or rows[0].keys())
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path

    return write


@pytest.fixture
def subscribers() -> list[dict[str, str]]:
    """Ten plain subscribers."""
    return [
        {"email": f"member{i}@example.org", "name": f"Member {i}", "organization": "Branch 7"}
        for i in range(10)
    ]


@pytest.fixture
def example_list(tmp_path: Path) -> Path:
    target = tmp_path / "unions.csv"
    shutil.copy(EXAMPLE_LIST, target)
    return target


@pytest.fixture
def run_cli(config_file: Path) -> CliRun:
    """Run `appeal-mailer --config <config_file> ARGS...` in this process."""

    def run(*args: str, config: Path | None = None, input: str | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(
            main,
            ["--config", str(config or config_file), *args],
            input=input,
            catch_exceptions=False,
        )

    return run


# -- the ledger's engines: SQLite and PostgreSQL -------------------------------------------------


@pytest.fixture
def ledger_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`send` keeps its ledger in the test's process, where a test can watch its calls.

    A run's ledger normally lives in a child process (ledger_process.py), where a
    monkeypatched Ledger method would run in a copy of the test's memory.
    """
    from appeal_mailer import ledger_process  # noqa: PLC0415  # only for these tests

    monkeypatch.setattr(ledger_process, "open_for_run", Ledger.open)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server's URL; skips when there is none, except in CI, where it fails."""
    import psycopg  # noqa: PLC0415  # only where PostgreSQL is wanted

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        said = " ".join(str(exc).split())
        reason = f"no PostgreSQL at {POSTGRES_URL} ({said}); set TEST_POSTGRES_URL"
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail(f"CI must run the ledger tests on PostgreSQL: {reason}")
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema of this test's own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = engine(postgres_server).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{postgres_server}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ledger on each engine in turn: a file in tmp_path, or a schema of this test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
