#!/usr/bin/env python3
# The fictional names and organizations use Cyrillic letters and typographic quotes on purpose.
# ruff: noqa: RUF001
"""How fast does `appeal-mailer send` go, end to end, against a real SMTP server?

One command, nothing leaves the machine:

    python bench/send_bench.py --recipients 20000

In a temporary folder it writes a list of N fictional subscribers and a config
built from config.example.toml's [campaign], starts Postfix's `smtp-sink` on a
free loopback port, then times, each in a fresh process (wall clock; peak RSS
from GNU time(1) when installed, else wait4(2); CPU time from wait4(2)):

  - `appeal-mailer send LIST --dry-run --out DIR` (list, render, wire format,
    scratch ledger, one .eml file per message: no network);
  - `smtp-source` sending as many messages of the same size over the same
    number of reused sessions: what this machine's loopback SMTP costs at best;
  - for the appeal only, `mailmerge` 2.3.0 (PyPI), the popular Python mail-merge
    CLI, sending the same list, with the same text, to the same smtp-sink: the
    peer a Python user would pick. It runs from a venv of its own that this
    script creates once and caches (~/.cache/appeal-mailer-bench/mailmerge-2.3.0),
    so its dependencies never touch appeal-mailer's;
  - `appeal-mailer send LIST --yes` end to end (process start, list, render,
    wire format, ledger, SMTP), with a fresh ledger;
  - for the first template, the same send with DKIM signing on ([dkim], an
    RSA-2048 key made for the run), checked by a small signed preview that
    dkimpy verifies;

for each template (default: appeal, then protest), and prints a table (or JSON
with --json). Every run is checked: the number of .eml files, the messages
smtp-sink counted, and the ledger's counts must all equal N.

With --rtt MS every client (smtp-source, mailmerge, appeal-mailer) reaches the
sink through bench/delay_proxy.py, which holds each way's bytes MS/2 ms: the
round trips of a server across a network, where they, not CPU, set the pace.

Needs Postfix's test programs (Debian: `apt-get install -y postfix`) and
appeal-mailer installed in this Python (`pip install -e .`); mailmerge comes
from PyPI by itself (or pass --skip-mailmerge). See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime as dt
import email
import email.policy
import fcntl
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
EXAMPLE_CONFIG = ROOT / "config.example.toml"
HOST = "127.0.0.1"
SINK_READY_SECONDS = 15.0
SINK_STOP_SECONDS = 5.0
SOURCE_REPEATS = 3
# The peer: the popular Python mail-merge CLI, at a pinned release, in a venv of its own.
MAILMERGE_VERSION = "2.3.0"
# The one template with a mailmerge counterpart (see mailmerge_inputs).
MAILMERGE_TEMPLATE = "appeal"
# The DKIM row signs as config.example.toml's From domain, with a key made per run.
DKIM_DOMAIN = "example.org"
DKIM_SELECTOR = "bench"
MAILMERGE_INSTALL_SECONDS = 600.0

# -- the list ------------------------------------------------------------------------------------

# (display name, ASCII for the address, language)
FIRST_NAMES = [
    ("Amelia", "amelia", "en"),
    ("Tom", "tom", "en"),
    ("Siobhán", "siobhan", "en"),
    ("José", "jose", "es"),
    ("Zoë", "zoe", "en"),
    ("Łukasz", "lukasz", "pl"),
    ("Jean-Luc", "jeanluc", "fr"),
    ("Ngozi", "ngozi", "en"),
    ("Mehmet", "mehmet", "tr"),
    ("Anna", "anna", "de"),
    ("Айгерім", "aigerim", "kk"),
    ("Нурлан", "nurlan", "kk"),
    ("Мөлдір", "moldir", "kk"),
    ("Ерлан", "erlan", "kk"),
    ("Татьяна", "tatyana", "ru"),
    ("Сергей", "sergei", "ru"),
    ("Ольга", "olga", "ru"),
    ("Дмитрий", "dmitry", "ru"),
]
LAST_NAMES_LATIN = [
    ("Hart", "hart"),
    ("Okafor", "okafor"),
    ("O’Neill", "oneill"),
    ("Müller", "mueller"),
    ("García", "garcia"),
    ("Nowak", "nowak"),
    ("Dubois", "dubois"),
    ("Yılmaz", "yilmaz"),
    ("Smith-Jones", "smithjones"),
]
LAST_NAMES_CYRILLIC = [
    ("Сейітқали", "seitkali"),
    ("Омаров", "omarov"),
    ("Ким", "kim"),
    ("Танірбергенов", "tanirbergenov"),
    ("Иванова", "ivanova"),
    ("Петров", "petrov"),
    ("Жанусов", "zhanusov"),
]
ORGANIZATIONS = [
    "Leeds Transport Workers, Branch 114",
    "Avonside Trades Council",
    "Dublin Hospital Porters’ Union, North Side",
    'Cercle "Solidarité" des cheminots',
    "Związek Zawodowy Górników, koło 7",
    "Қарағанды кеншілер кәсіподағы, №3 бөлім",
    "Профсоюз работников образования, г. Алматы",
    "Независимый профсоюз «Защита труда»",
    "ver.di Ortsverein Kassel",
    "",
]
TIMEZONES = [
    "Europe/London",
    "Europe/Dublin",
    "Europe/Berlin",
    "Europe/Moscow",
    "Asia/Almaty",
    "America/New_York",
    "Australia/Sydney",
    "",  # none: the campaign's zone
]
COUNTRIES = ["GB", "IE", "DE", "FR", "PL", "KZ", "RU", "US", "AU"]
DOMAINS = ["example.org", "example.net"]


def write_list(path: Path, count: int, seed: int) -> None:
    """Write `count` fictional, valid, distinct subscribers to a CSV list."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "organization", "language", "timezone", "country"])
        for number in range(1, count + 1):
            first, first_ascii, language = rng.choice(FIRST_NAMES)
            cyrillic = language in {"kk", "ru"}
            last, last_ascii = rng.choice(LAST_NAMES_CYRILLIC if cyrillic else LAST_NAMES_LATIN)
            address = f"{first_ascii}.{last_ascii}.{number}@{rng.choice(DOMAINS)}"
            # A few rows have no name: the templates' "Dear friend" branch.
            name = "" if rng.random() < 0.03 else f"{first} {last}"
            writer.writerow(
                [
                    address,
                    name,
                    rng.choice(ORGANIZATIONS),
                    language,
                    rng.choice(TIMEZONES),
                    rng.choice(COUNTRIES),
                ]
            )


# -- the config ----------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(name: str, table: dict[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    lines.extend(
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
    )
    lines.append("")
    for key, value in table.items():
        if isinstance(value, dict):
            _toml_table(f"{name}.{_toml_key(key)}", value, lines)


def write_config(path: Path, *, port: int, connections: int, ledger: Path) -> None:
    """A config for smtp-sink on loopback, with config.example.toml's [campaign]."""
    example = tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    campaign = dict(example["campaign"])
    campaign["templates"] = str(TEMPLATES)
    config = {
        "smtp": {"host": HOST, "port": port, "security": "none", "connections": connections},
        "sending": {"rate": 0},
        "campaign": campaign,
        "ledger": {"path": str(ledger)},
    }
    lines = ["# Written by bench/send_bench.py; [campaign] is config.example.toml's.", ""]
    for name, table in config.items():
        _toml_table(name, table, lines)
    text = "\n".join(lines)
    if tomllib.loads(text) != config:
        raise AssertionError("the benchmark's TOML writer lost something")
    path.write_text(text, encoding="utf-8")


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float
    max_rss_mib: float
    cpu_seconds: float
    returncode: int
    timed_out: bool


def _kill_group(pgid: int) -> None:
    # Only the process group of a child this script started (start_new_session=True).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def gnu_time() -> str | None:
    """GNU time(1), if installed: it reports the child's own peak RSS (see `measure`)."""
    path = shutil.which("time") or "/usr/bin/time"
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "GNU" in version.stdout + version.stderr else None


def measure(
    command: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: Path,
    time_tool: str | None,
) -> Measurement:
    """Run `command` in a fresh process: its wall time, peak RSS and CPU time.

    CPU time comes from wait4(2). Peak RSS comes from GNU time(1) when it is
    there: a child forked (or vforked) from this Python inherits this
    process's resident pages until exec, so wait4's ru_maxrss is never below
    this script's own RSS (about 20 MiB), which would hide a small child's
    figure. time(1) is a small C program, so its floor is about 1 MiB.
    """
    fired = threading.Event()
    rusage_file = log.with_suffix(".rusage")
    if time_tool is not None:
        command = [time_tool, "-f", "%M", "-o", str(rusage_file), *command]

    def expire(pgid: int) -> None:
        fired.set()
        _kill_group(pgid)

    with log.open("wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, expire, (process.pid,))
        timer.daemon = True
        timer.start()
        try:
            _pid, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            timer.cancel()
            _kill_group(process.pid)
            process.wait()
            raise
        elapsed = time.perf_counter() - started
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    max_rss_kib = usage.ru_maxrss  # KiB on Linux
    if time_tool is not None:
        # The last line is %M; "Command exited with non-zero status N" may come first.
        with contextlib.suppress(OSError, ValueError, IndexError):
            max_rss_kib = int(rusage_file.read_text().split()[-1])
    return Measurement(
        seconds=elapsed,
        max_rss_mib=max_rss_kib / 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
        timed_out=fired.is_set(),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class SmtpSink:
    """Postfix's smtp-sink on a loopback port: accepts every message and throws it away.

    Run under timeout(1) when available, so it ends by itself even if this
    script is killed without a chance to stop it.
    """

    def __init__(self, port: int, workdir: Path, lifetime: float) -> None:
        self.port = port
        self._counters = workdir / "smtp-sink.out"
        self._errors = workdir / "smtp-sink.err"
        self._lifetime = lifetime
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        sink = _tool("smtp-sink")
        command = [sink, "-c"]
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without dropping privileges.
            command += ["-u", "nobody"]
        command += [f"{HOST}:{self.port}", "1000"]
        command = _bounded(command, self._lifetime)
        with self._counters.open("wb") as out, self._errors.open("wb") as err:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SINK_READY_SECONDS
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"smtp-sink exited with status {self._process.returncode}: "
                    + self._errors.read_text(errors="replace").strip()
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as conn:
                    if conn.recv(512).startswith(b"220"):
                        conn.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtp-sink did not accept connections on port {self.port}")

    def received(self) -> int:
        """Messages received so far (smtp-sink -c counters: "sess=.. quit=.. mesg=N")."""
        counts = re.findall(rb"mesg=(\d+)", self._counters.read_bytes())
        return int(counts[-1]) if counts else 0

    def sessions(self) -> int:
        """SMTP sessions so far (the "sess=N" counter)."""
        counts = re.findall(rb"sess=(\d+)", self._counters.read_bytes())
        return int(counts[-1]) if counts else 0

    def received_after(self, before: int, expected: int) -> int:
        # The counters are written when a session ends; give the last one a moment.
        deadline = time.monotonic() + 2.0
        while True:
            got = self.received() - before
            if got >= expected or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def stop(self) -> None:
        _stop(self._process)


def _bounded(command: list[str], lifetime: float) -> list[str]:
    """`command` under timeout(1) when installed, to end by itself after `lifetime` s.

    So it ends even if this script is killed without a chance to stop it.
    """
    timeout = shutil.which("timeout")
    return [timeout, "-k", "5", str(int(lifetime)), *command] if timeout else command


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    """TERM a server this script started, then KILL its process group if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(SINK_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        process.wait(SINK_STOP_SECONDS)


def _tool(name: str) -> str:
    found = shutil.which(name)
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if found is None and (Path(folder) / name).exists():
            found = str(Path(folder) / name)
    if found is None:
        sys.exit(f"{name} not found: install Postfix (Debian: apt-get install -y postfix)")
    return found


def appeal_mailer_command() -> list[str]:
    # The console script next to this interpreter: a pyenv/asdf shim on PATH would
    # add a shell and a second interpreter start to every timing.
    script = Path(sys.executable).parent / "appeal-mailer"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "appeal_mailer"]


def child_env() -> dict[str, str]:
    # The config file alone decides: no APPEAL_MAILER_* override from the caller.
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return "\n".join(text.strip().splitlines()[-lines:])


# -- mailmerge ------------------------------------------------------------------------------------


def mailmerge_home() -> Path:
    """Where the benchmark keeps mailmerge's venv between runs."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "appeal-mailer-bench" / f"mailmerge-{MAILMERGE_VERSION}"


def isolated_env() -> dict[str, str]:
    """child_env() for mailmerge's venv: nothing from the caller's Python may leak in.

    No PYTHONUNBUFFERED either: mailmerge prints every message it sends, and a
    user who redirects that output gets Python's default block buffering.
    """
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "VIRTUAL_ENV"}
    drop |= {"PIP_USER", "PIP_TARGET", "PIP_PREFIX"}
    env = {k: v for k, v in child_env().items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _mailmerge_version(executable: Path) -> str | None:
    # click's --version prints "mailmerge, version 2.3.0".
    try:
        done = subprocess.run(
            [str(executable), "--version"],
            capture_output=True,
            text=True,
            env=isolated_env(),
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"version (\S+)", done.stdout)
    return found.group(1) if done.returncode == 0 and found else None


def install_mailmerge(home: Path, log: Path, say: Callable[[str], None]) -> Path:
    """mailmerge==MAILMERGE_VERSION in a venv of its own at `home`: made once, then reused.

    A venv cannot be moved once made, so it is built in place under a lock, and
    a marker written last says it is complete; a half-made one is rebuilt.
    When it cannot be made, says the installer's last lines and raises RuntimeError.
    """
    executable = home / "bin" / "mailmerge"
    marker = home / ".appeal-mailer-bench-complete"
    home.parent.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"{home.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmarks at once build it once
        if marker.exists() and _mailmerge_version(executable) == MAILMERGE_VERSION:
            return executable
        shutil.rmtree(home, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(home)],
            [
                str(home / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"mailmerge=={MAILMERGE_VERSION}",
            ],
        ]
        with log.open("wb") as output:
            for step in steps:
                say(f"  installing mailmerge {MAILMERGE_VERSION}: {' '.join(step)}")
                output.write(f"$ {' '.join(step)}\n".encode())
                output.flush()
                try:
                    done = subprocess.run(
                        step,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env=isolated_env(),
                        timeout=MAILMERGE_INSTALL_SECONDS,
                        check=False,
                    )
                except (OSError, subprocess.SubprocessError) as exc:
                    raise RuntimeError(f"{step[0]}: {exc}") from exc
                if done.returncode != 0:
                    say(f"  !! last lines of {log}:\n{_tail(log)}")
                    what = "pip install" if "pip" in step else "python -m venv"
                    raise RuntimeError(f"{what} failed (exit status {done.returncode})")
        version = _mailmerge_version(executable)
        if version != MAILMERGE_VERSION:
            raise RuntimeError(f"{executable} --version says {version}, not {MAILMERGE_VERSION}")
        marker.write_text(f"mailmerge=={MAILMERGE_VERSION}\n", encoding="utf-8")
    return executable


def _jinja_literal(text: str) -> str:
    """`text` as Jinja2 template source that renders to exactly `text`."""
    if not any(mark in text for mark in ("{{", "{%", "{#")):
        return text
    if "endraw" in text:
        raise ValueError("the text holds Jinja2 markup that {% raw %} cannot quote")
    return "{% raw %}" + text + "{% endraw %}"


# Headers of appeal-mailer's appeal that are the same for every recipient; mailmerge's
# template carries them word for word. To (personal) is {{name}} <{{email}}>; Date,
# MIME-Version and Content-* are mailmerge's own; Message-ID it does not write.
MAILMERGE_COPIED_HEADERS = (
    "From",
    "Reply-To",
    "Subject",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Precedence",
)


def _subject(raw: bytes) -> bytes:
    """The raw Subject header of a message, folded lines and all."""
    match = re.search(rb"^Subject:.*?\r\n(?! )", raw, re.MULTILINE | re.DOTALL)
    return match.group() if match else b""


def _same_language_samples(files: Sequence[Path]) -> list[bytes]:
    """The first and the last message in the list's most common language (Subject).

    The list's Russian and Kazakh readers get the Russian appeal (templates/ru/,
    and `fallback_languages = { kk = "ru" }`), everyone else the default one;
    mailmerge has no languages, so it is given the text most readers get, for
    everyone, and the check in mailmerge_inputs compares two messages of it.
    Which row comes first depends on --seed, so the language is not taken from
    the first row.
    """
    subjects = []
    for path in files:
        with path.open("rb") as handle:
            subjects.append(_subject(handle.read(8192)))
    common = collections.Counter(subjects).most_common(1)[0][0]
    chosen = [path for path, subject in zip(files, subjects, strict=True) if subject == common]
    return [chosen[0].read_bytes(), chosen[-1].read_bytes()][: len(chosen)]


def mailmerge_inputs(messages: Sequence[bytes], template: Path, config: Path, port: int) -> None:
    """Write mailmerge's template and server config from appeal-mailer's own messages.

    `messages` are .eml files of appeal-mailer's dry run of the appeal (the
    first and the last of the list). The appeal is the same for every reader
    (only the To header names them), so its text is rendered once, by
    appeal-mailer itself, and pasted into mailmerge's template as literal text,
    with mailmerge's {{name}} and {{email}} where appeal-mailer personalizes.
    Checked here: the messages really share that text and those headers.
    """
    if not messages:
        raise ValueError("the dry run wrote no message to take the text from")
    parsed = [email.message_from_bytes(raw, policy=email.policy.default) for raw in messages]
    bodies = []
    for message in parsed:
        part = message.get_body(("plain",))
        if part is None or message.is_multipart():
            raise ValueError("the appeal is no longer one text/plain part")
        bodies.append(part.get_content().replace("\r\n", "\n"))
    if len(set(bodies)) != 1:
        raise ValueError("the appeal's text differs between recipients: no longer one text")
    headers: list[tuple[str, str]] = []
    for name in MAILMERGE_COPIED_HEADERS:
        values = {str(message.get(name, "")) for message in parsed}
        if len(values) != 1:
            raise ValueError(f"the appeal's {name} header differs between recipients")
        if value := values.pop():
            headers.append((name.upper() if name in {"From", "Subject"} else name, value))
    lines = ["TO: {{name}} <{{email}}>"]
    lines += [f"{name}: {_jinja_literal(value)}" for name, value in headers]
    # Jinja2 drops a template's last newline: one more keeps the text's own.
    text = "\n".join(lines) + "\n\n" + _jinja_literal(bodies[0]) + "\n"
    template.write_text(text, encoding="utf-8")
    # No `security` key: mailmerge 2.3 then connects in clear text, with no
    # STARTTLS and no AUTH (its values SSL/TLS, STARTTLS, PLAIN and XOAUTH all
    # log in, and ask for a password on the terminal). ratelimit = 0: unlimited.
    config.write_text(
        "# Written by bench/send_bench.py: smtp-sink on loopback; no TLS, AUTH or rate limit.\n"
        f"[smtp_server]\nhost = {HOST}\nport = {port}\nratelimit = 0\n",
        encoding="utf-8",
    )


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    command: list[str]
    messages: int
    seconds: float = 0.0
    messages_per_second: float = 0.0
    max_rss_mib: float = 0.0
    cpu_seconds: float = 0.0
    vs_smtp_source: float | None = None
    vs_mailmerge: float | None = None
    returncode: int = 0
    check: str = "ok"
    killed: bool = False
    measured: bool = True  # False: the command never ran (its install failed)
    log: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def record(self, result: Measurement) -> None:
        self.seconds = result.seconds
        self.messages_per_second = self.messages / result.seconds if result.seconds else 0.0
        self.max_rss_mib = result.max_rss_mib
        self.cpu_seconds = result.cpu_seconds
        self.returncode = result.returncode
        self.killed = result.timed_out
        if result.timed_out:
            self.fail(f"killed after the {result.seconds:.0f} s time limit")
        elif result.returncode != 0:
            self.fail(f"exit status {result.returncode}")

    def fail(self, why: str) -> None:
        self.check = why
        # Not a throughput: the run did not do all its work.
        self.messages_per_second = 0.0


def check_sent(row: Row, *, received: int, sessions: int, counts: dict[str, int]) -> None:
    """A send's checks: smtp-sink got exactly the row's N messages, the ledger N `sent`."""
    n = row.messages
    row.details |= {
        "smtp_sink_received": received,
        "smtp_sink_sessions": sessions,
        "ledger_counts": counts,
    }
    problems = []
    if received != n:
        problems.append(f"smtp-sink received {received}")
    if counts.get("sent") != n or len(counts) != 1:
        problems.append(f"ledger {counts}")
    if row.check == "ok" and problems:
        row.fail(", ".join(problems) + f"; expected {n} sent")


class DelayProxy:
    """bench/delay_proxy.py in front of smtp-sink: each way `one_way_ms` later (--rtt)."""

    def __init__(self, target: int, one_way_ms: float, workdir: Path, lifetime: float) -> None:
        self.port = free_port()
        script = Path(__file__).with_name("delay_proxy.py")
        self._command = _bounded(
            [sys.executable, str(script), str(self.port), str(target), str(one_way_ms)], lifetime
        )
        self._errors = workdir / "delay-proxy.err"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DelayProxy:
        with self._errors.open("wb") as err:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != b"ready":
            self.__exit__()
            raise RuntimeError(
                "the delay proxy did not start: " + self._errors.read_text(errors="replace")
            )
        return self

    def __exit__(self, *_exc: object) -> None:
        _stop(self._process)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.list_path = workdir / "subscribers.csv"
        self.config = workdir / "config.toml"
        self.ledger = workdir / "ledger.db"
        self.env = child_env()
        self.mailer = appeal_mailer_command()
        self.rows: list[Row] = []
        self.timeout = args.run_timeout or 120 + 0.1 * args.recipients
        self.time_tool = gnu_time()
        # The first and the last message of a template's dry run (mailmerge's template).
        self.samples: dict[str, list[bytes]] = {}
        # Where the clients connect: smtp-sink, or the delay proxy in front of it (--rtt).
        self.target_port = 0

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run(
        self, row: Row, label: str, *, keep_row: bool = True, env: dict[str, str] | None = None
    ) -> Row:
        log = self.workdir / f"{label}.log"
        self.say(f"  {row.name}: {' '.join(row.command)}")
        row.details["load_average_before"] = round(os.getloadavg()[0], 2)
        row.record(
            measure(
                row.command,
                cwd=self.workdir,
                env=self.env if env is None else env,
                timeout=self.timeout,
                log=log,
                time_tool=self.time_tool,
            )
        )
        row.log = str(log) if self.args.keep else ""
        if row.check != "ok":
            self.say(f"  !! {row.name}: {row.check}; last lines of {log}:\n{_tail(log)}")
        if keep_row:
            self.rows.append(row)
        return row

    def dry_run(self, template: str) -> tuple[Row, int]:
        """Time a dry run; also return the mean size of one message it wrote, in bytes."""
        out = self.workdir / f"preview-{template}"
        command = [
            *self.mailer,
            "--config",
            str(self.config),
            "send",
            str(self.list_path),
            "--template",
            template,
            "--dry-run",
            "--out",
            str(out),
        ]
        row = self.run(
            Row(f"dry-run {template}", command, self.args.recipients), f"dry-{template}"
        )
        files = sorted(out.glob("*.eml")) if out.is_dir() else []
        sizes = [path.stat().st_size for path in files]
        row.details |= {"eml_files": len(files), "mean_message_bytes": _mean(sizes)}
        if row.check == "ok" and len(files) != self.args.recipients:
            row.fail(f"{len(files)} .eml files, expected {self.args.recipients}")
        if files:
            self.samples[template] = _same_language_samples(files)
        if not self.args.keep:
            shutil.rmtree(out, ignore_errors=True)
        return row, int(_mean(sizes)) or 5000

    def smtp_source(self, sink: SmtpSink, template: str, size: int) -> Row:
        n = self.args.recipients
        command = [
            _tool("smtp-source"),
            "-d",
            "-s",
            str(self.args.connections),
            "-m",
            str(n),
            "-l",
            str(size),
            "-f",
            "from@example.org",
            "-t",
            "to@example.org",
            f"{HOST}:{self.target_port}",
        ]
        # The ceiling: the best of a few runs (one run of a small list lasts a
        # fraction of a second, and a busy machine makes it jitter).
        best: Row | None = None
        tries = []
        for attempt in range(1, SOURCE_REPEATS + 1):
            before = sink.received()
            row = Row(f"smtp-source ({template} size)", command, n)
            self.run(row, f"source-{template}-{attempt}", keep_row=False)
            got = sink.received_after(before, n)
            tries.append(round(row.seconds, 3))
            if row.check == "ok" and got != n:
                row.fail(f"smtp-sink received {got}, expected {n}")
            row.details |= {"message_bytes": size, "smtp_sink_received": got}
            if row.check != "ok":
                best = row
                break
            if best is None or row.seconds < best.seconds:
                best = row
        assert best is not None
        best.details["seconds_of_each_try"] = tries
        self.rows.append(best)
        return best

    def install_mailmerge(self) -> Path | str:
        """mailmerge's executable, or why it could not be installed."""
        try:
            executable = install_mailmerge(
                mailmerge_home(), self.workdir / "mailmerge-install.log", self.say
            )
        except (RuntimeError, OSError) as exc:
            self.say(f"  !! mailmerge {MAILMERGE_VERSION} could not be installed: {exc}")
            return f"mailmerge {MAILMERGE_VERSION} not installed: {str(exc).splitlines()[0]}"
        self.say(f"mailmerge {MAILMERGE_VERSION}: {executable}")
        return executable

    def mailmerge(self, sink: SmtpSink, executable: Path | str, template: str) -> Row:
        """mailmerge sending the list, with appeal-mailer's text, to smtp-sink.

        `executable` is a string when mailmerge could not be installed: the row
        then says so, and fails.
        """
        n = self.args.recipients
        if isinstance(executable, str):
            row = Row(f"mailmerge {template}", ["mailmerge"], n, measured=False)
            row.fail(executable)
            self.rows.append(row)
            return row
        mm_template = self.workdir / f"mailmerge-{template}.txt"
        mm_config = self.workdir / "mailmerge_server.conf"
        command = [
            str(executable),
            "--template",
            str(mm_template),
            "--database",
            str(self.list_path),
            "--config",
            str(mm_config),
            "--no-limit",
            "--no-dry-run",
        ]
        row = Row(f"mailmerge {template}", command, n)
        try:
            mailmerge_inputs(
                self.samples.get(template, []), mm_template, mm_config, self.target_port
            )
        except ValueError as exc:
            # No dry-run messages (it failed), or the appeal stopped being one text for all.
            row.measured = False
            row.fail(f"no mailmerge template: {exc}")
            self.say(f"  !! {row.name}: {row.check}")
            self.rows.append(row)
            return row
        # Untimed: the size of one message as mailmerge puts it on the wire.
        sample = [*command[:-2], "--dry-run", "--limit", "1", "--output-format", "raw"]
        assert command[-2:] == ["--no-limit", "--no-dry-run"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            printed = subprocess.run(
                sample,
                cwd=self.workdir,
                env=isolated_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            ).stdout
            # It prints ">>> message 1", the message as it sends it, ">>> message 1 sent".
            found = re.search(rb">>> message 1\n(.*?)\n>>> message 1 sent", printed, re.S)
            if found:
                row.details["message_bytes"] = len(found.group(1).replace(b"\n", b"\r\n"))
        before, sessions = sink.received(), sink.sessions()
        self.run(row, f"mailmerge-{template}", env=isolated_env())
        got = sink.received_after(before, n)
        row.details |= {
            "smtp_sink_received": got,
            "smtp_sink_sessions": sink.sessions() - sessions,
        }
        if row.check == "ok" and got != n:
            row.fail(f"smtp-sink received {got}, expected {n}")
        return row

    def send(self, sink: SmtpSink, template: str, *, dkim: bool = False) -> Row:
        n = self.args.recipients
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.ledger}{suffix}").unlink(missing_ok=True)
        command = [
            *self.mailer,
            "--config",
            str(self.config),
            "send",
            str(self.list_path),
            "--template",
            template,
            "--yes",
        ]
        before, sessions = sink.received(), sink.sessions()
        name, label, env = f"send {template}", f"send-{template}", self.env
        if dkim:
            name, label, env = f"{name}, DKIM", f"{label}-dkim", self.dkim_env()
        row = self.run(Row(name, command, n), label, env=env)
        got = sink.received_after(before, n)
        counts = self.ledger_counts()
        check_sent(row, received=got, sessions=sink.sessions() - sessions, counts=counts)
        if dkim and row.check == "ok":
            self.check_signed(row, template)
        return row

    def dkim_env(self) -> dict[str, str]:
        """The environment of a run that signs: a new RSA-2048 key, d= the From domain."""
        key = self.workdir / "dkim.pem"
        if not key.exists():
            # Imported here: only the DKIM rows need it (appeal-mailer depends on it).
            from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
            from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key.write_bytes(
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return self.env | {
            "APPEAL_MAILER_DKIM__DOMAIN": DKIM_DOMAIN,
            "APPEAL_MAILER_DKIM__SELECTOR": DKIM_SELECTOR,
            "APPEAL_MAILER_DKIM__PRIVATE_KEY_FILE": str(key),
        }

    def check_signed(self, row: Row, template: str) -> None:
        """A signed run's check: a small signed preview that dkimpy verifies, when installed."""
        out = self.workdir / f"preview-{template}-dkim"
        env = self.dkim_env() | {"APPEAL_MAILER_LEDGER__PATH": str(self.workdir / "dkim.db")}
        command = [*self.mailer, "--config", str(self.config), "send", str(self.list_path)]
        command += ["--template", template, "--dry-run", "--out", str(out), "--limit", "20"]
        done = subprocess.run(
            command,
            cwd=self.workdir,
            env=env,
            capture_output=True,
            timeout=self.timeout,
            check=False,
        )
        files = sorted(out.glob("*.eml"))
        if done.returncode != 0 or not files:
            row.fail(f"the signed preview failed (exit {done.returncode})")
            return
        try:
            import dkim  # noqa: PLC0415  # dkimpy: appeal-mailer's test extra
        except ImportError:
            row.details["dkim_verified"] = "not checked: dkimpy is not installed"
            return
        from appeal_mailer.dkim import Signer, load_key  # noqa: PLC0415

        key = self.workdir / "dkim.pem"
        signer = Signer(load_key(key.read_bytes(), key, None), DKIM_DOMAIN, DKIM_SELECTOR)
        record = signer.dns_record()[1].encode()
        verified = sum(
            bool(dkim.verify(path.read_bytes(), dnsfunc=lambda _name, timeout=5: record))
            for path in files
        )
        row.details["dkim_verified"] = f"{verified} of {len(files)}"
        if verified != len(files):
            row.fail(f"dkimpy verified {verified} of {len(files)} signed messages")

    def ledger_counts(self) -> dict[str, int]:
        command = [*self.mailer, "--config", str(self.config), "status", "--format", "json"]
        done = subprocess.run(
            command,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        try:
            counts = json.loads(done.stdout)["counts"]
        except (ValueError, KeyError, TypeError):
            self.say(f"  !! status --format json: exit {done.returncode}: {done.stderr.strip()}")
            return {"status-unreadable": -1}
        return {state: number for state, number in counts.items() if number}

    def all(self) -> None:
        args = self.args
        self.say(f"writing {args.recipients} subscribers and a config in {self.workdir}")
        write_list(self.list_path, args.recipients, args.seed)
        port = free_port()
        # Installed (or found in the cache) before anything is timed.
        mailmerge: Path | str | None = None
        if args.skip_mailmerge:
            pass
        elif MAILMERGE_TEMPLATE not in args.template:
            self.say(f"no mailmerge row: it sends only the {MAILMERGE_TEMPLATE} template")
        else:
            mailmerge = self.install_mailmerge()
        runs = len(args.template) * (2 if args.skip_smtp_source else 2 + SOURCE_REPEATS) + 3
        lifetime = self.timeout * runs + 60
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(SmtpSink(port, self.workdir, lifetime=lifetime))
            self.say(f"smtp-sink listening on {HOST}:{port}")
            self.target_port = port
            if args.rtt:
                proxy = DelayProxy(port, args.rtt / 2, self.workdir, lifetime)
                self.target_port = stack.enter_context(proxy).port
                self.say(f"delay proxy on {HOST}:{self.target_port}: round trip + {args.rtt:g} ms")
            write_config(
                self.config,
                port=self.target_port,
                connections=args.connections,
                ledger=self.ledger,
            )
            for template in args.template:
                dry, size = self.dry_run(template)
                source = None if args.skip_smtp_source else self.smtp_source(sink, template, size)
                peer = None
                if mailmerge is not None and template == MAILMERGE_TEMPLATE:
                    peer = self.mailmerge(sink, mailmerge, template)
                send = self.send(sink, template)
                # The DKIM goal is for the appeal: >= 2,000 messages/s signed.
                if not args.skip_dkim and template == args.template[0]:
                    signed = self.send(sink, template, dkim=True)
                    if source is not None and source.check == "ok" and signed.check == "ok":
                        signed.vs_smtp_source = (
                            signed.messages_per_second / source.messages_per_second
                        )
                if source is not None and source.check == "ok":
                    for row in (dry, peer, send):
                        if row is None or row.check != "ok":
                            continue
                        row.vs_smtp_source = row.messages_per_second / source.messages_per_second
                # A dry run sends nothing: only the real send is set against mailmerge's.
                if peer is not None and peer.check == "ok" and send.check == "ok":
                    send.vs_mailmerge = send.messages_per_second / peer.messages_per_second
            if args.profile is not None:
                self.profile(args.template[0], args.profile)

    def profile(self, template: str, directory: Path) -> None:
        """Run one dry run and one send under pyinstrument (not timed; not in the table)."""
        directory.mkdir(parents=True, exist_ok=True)
        base = [
            *self.mailer,
            "--config",
            str(self.config),
            "send",
            str(self.list_path),
            "--template",
            template,
        ]
        for label, extra in (
            ("dry-run", ["--dry-run", "--out", str(self.workdir / "preview-profile")]),
            ("send", ["--yes"]),
        ):
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.ledger}{suffix}").unlink(missing_ok=True)
            session = directory / f"{label}-{template}.pyisession"
            command = [
                sys.executable,
                "-m",
                "pyinstrument",
                "-r",
                "pyisession",
                "-o",
                str(session),
                "-m",
                "appeal_mailer",
                *base[len(self.mailer) :],
                *extra,
            ]
            self.say(f"  profiling {label} {template}: {' '.join(command)}")
            result = measure(
                command,
                cwd=self.workdir,
                env=self.env,
                timeout=self.timeout * 3,
                log=directory / f"{label}-{template}.log",
                time_tool=None,
            )
            if result.returncode != 0 or not session.exists():
                self.say(f"  !! profile {label}: exit {result.returncode}")
                continue
            for renderer, name, options in (
                ("text", f"{label}-{template}.txt", ["-p", "show_all=false"]),
                ("pstats", f"{label}-{template}.pstats", []),
            ):
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pyinstrument",
                        "--load",
                        str(session),
                        "-r",
                        renderer,
                        *options,
                        "-o",
                        str(directory / name),
                    ],
                    check=False,
                    env=self.env,
                    timeout=300,
                )
            self.say(f"  profile written to {directory}/{label}-{template}.txt (.pstats)")


def _mean(values: Sequence[int]) -> float:
    return sum(values) / len(values) if values else 0.0


# -- output --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    postfix = ""
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postfix = subprocess.run(
            # -d: the compiled-in value, which needs no main.cf (Debian's "No configuration").
            [postconf, "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postfix": postfix,
    }


def table(rows: list[Row]) -> str:
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    columns: list[tuple[str, bool, Any]] = [
        ("run", False, lambda row: row.name),
        (
            "msgs/s",
            True,
            lambda row: f"{row.messages_per_second:,.0f}" if row.check == "ok" else "-",
        ),
        ("seconds", True, lambda row: f"{row.seconds:.2f}" if row.measured else "-"),
        # A killed run's figures are those of time(1), not of the command.
        (
            "peak RSS MiB",
            True,
            lambda row: f"{row.max_rss_mib:.1f}" if row.measured and not row.killed else "-",
        ),
        (
            "CPU s",
            True,
            lambda row: f"{row.cpu_seconds:.2f}" if row.measured and not row.killed else "-",
        ),
        ("vs mailmerge", True, lambda row: ratio(row.vs_mailmerge)),
        ("vs smtp-source", True, lambda row: ratio(row.vs_smtp_source)),
        ("check", False, lambda row: row.check),
    ]
    # A ratio column with nothing in it (--skip-mailmerge, --skip-smtp-source) is left out.
    columns = [
        column
        for column in columns
        if not column[0].startswith("vs ") or any(column[2](row) for row in rows)
    ]
    header = [name for name, _right, _cell in columns]
    body = [[cell(row) for _name, _right, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    right = [flush for _name, flush, _cell in columns]

    def fmt(line: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if flush else c.ljust(w)
            for c, w, flush in zip(line, widths, right, strict=True)
        ]
        return "| " + " | ".join(cells) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if flush else "-" * (w + 2)
            for w, flush in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `appeal-mailer send` against Postfix's smtp-sink on loopback, "
        f"side by side with Postfix's smtp-source and mailmerge {MAILMERGE_VERSION}.",
        epilog="Needs Postfix's smtp-sink and smtp-source (Debian: apt-get install -y postfix). "
        f"mailmerge {MAILMERGE_VERSION} is installed from PyPI into a venv of its own, "
        f"cached in {mailmerge_home()}.",
    )
    parser.add_argument("--recipients", type=int, default=2000, help="list length [2000]")
    parser.add_argument(
        "--connections", type=int, default=8, help="[smtp] connections and smtp-source -s [8]"
    )
    parser.add_argument(
        "--template",
        action="append",
        help="template to measure; repeat for several [appeal, then protest]",
    )
    parser.add_argument("--skip-smtp-source", action="store_true", help="no smtp-source rows")
    parser.add_argument(
        "--skip-dkim", action="store_true", help="no DKIM-signed send of the first template"
    )
    parser.add_argument(
        "--skip-mailmerge",
        action="store_true",
        help=f"no mailmerge {MAILMERGE_VERSION} row (nothing installed from PyPI)",
    )
    parser.add_argument(
        "--rtt",
        type=float,
        default=0,
        metavar="MS",
        help="add MS milliseconds to every round trip to the sink (bench/delay_proxy.py), "
        "as a server across a network would [0]",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--seed", type=int, default=2003, help="seed of the fictional list")
    parser.add_argument(
        "--run-timeout",
        type=float,
        help="kill a run after this many seconds [120 + 0.1 per recipient]",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (list, config, logs)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also run one dry run and one send under pyinstrument; reports into DIR",
    )
    args = parser.parse_args(argv)
    if args.recipients < 1:
        parser.error("--recipients must be at least 1")
    if args.rtt < 0:
        parser.error("--rtt must be 0 or more")
    if not 1 <= args.connections <= 64:
        parser.error("--connections must be 1 to 64 (appeal-mailer's limit)")
    args.template = args.template or ["appeal", "protest"]
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="appeal-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM (from timeout(1), CI, a terminal closing) unwinds like Ctrl-C: the
    # `finally` blocks stop smtp-sink and any child still running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with _workdir(args.keep) as workdir:
        bench = Bench(args, workdir)
        try:
            bench.all()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # smtp-sink would not start
            print(f"error: {exc}", file=sys.stderr)
            return 1
    command = "python bench/send_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {
        "command": command.strip(),
        "date": started.isoformat(timespec="seconds"),
        "recipients": args.recipients,
        "connections": args.connections,
        "added_round_trip_ms": args.rtt,
        "machine": machine(),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "peak_rss_from": "GNU time -f %M" if bench.time_tool else "wait4 ru_maxrss",
        "runs": [asdict(row) for row in bench.rows],
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        m = info["machine"]
        print(
            f"{command.strip()}\n{info['date']}: {args.recipients} recipients, "
            f"{args.connections} connections"
            + (f", round trip + {args.rtt:g} ms" if args.rtt else "")
            + f"; {m['cpus']} CPUs, Python {m['python']}, "
            f"Postfix {m['postfix'] or '?'}; load average (1 min) "
            f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        )
        print(table(bench.rows))
    return 0 if all(row.check == "ok" for row in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
