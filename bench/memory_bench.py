#!/usr/bin/env python3
"""Does appeal-mailer's memory stay flat as the list grows? Peak RSS at several list sizes.

One command, nothing leaves the machine:

    python bench/memory_bench.py --sizes 10000,100000,1000000

For each list size N (send_bench.py's generated list, config and smtp-sink), it
runs, each in a fresh process from start to exit, each from a fresh ledger:

  - dry-run: `appeal-mailer send LIST --dry-run --out DIR` (list, render, wire
    format, scratch ledger, one .eml file per message: no network);
  - send: `appeal-mailer send LIST --yes` to Postfix's smtp-sink on loopback;

and reports each run's peak resident memory (GNU time's %M, as send_bench.py
measures it), wall time and messages per second, and how much the peak grew
from the smallest size. While a run lasts, its resident memory is also sampled
from /proc, so a table shows whether it climbs during the run. Every run is
checked: a dry run must write N .eml files (the preview folder is then deleted
at once: 1,000,000 messages take about 5 GB); after a send, smtp-sink must have
counted exactly N more messages and the ledger must count N `sent` and nothing
else. The code and templates the runs use are fingerprinted before and after
each run: if they changed meanwhile (someone committing to the tree), the sizes
did not run the same code, and the benchmark says so and fails. The exit status
is 1 if any check failed. See bench/README.md, "Memory".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ledger_cost import markdown, steal_seconds
from send_bench import (
    ROOT,
    TEMPLATES,
    Bench,
    Row,
    SmtpSink,
    _workdir,
    check_sent,
    child_env,
    free_port,
    machine,
    write_config,
    write_list,
)

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
# The goal: peak memory under 150 MB (decimal) for 1,000,000 recipients.
GOAL_BYTES = 150_000_000
# Per-run time limit unless --run-timeout: a fixed part, and so much per recipient
# (a 1,000,000-recipient send took 10 to 15 minutes on a 2-core machine).
TIMEOUT_BASE_SECONDS = 300.0
TIMEOUT_PER_RECIPIENT = 0.006
# What a dry run writes per message (.eml file, index.csv, scratch ledger), with room
# to spare; a dry run that would not fit on the disk is not started.
DRY_RUN_BYTES_PER_MESSAGE = 8_000
# Where the RSS timeline is read, as shares of each run's wall time.
TIMELINE_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


# -- sampling resident memory during a run -----------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of `pid` in KiB, from /proc/PID/status; {} once it is gone."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(":")
            if key in {"VmRSS", "VmHWM"}:
                found[key] = int(value.split()[0])
    return found


class RssSampler:
    """Samples the resident memory of the one process whose argv holds `marker` and "send".

    measure() (send_bench.py) starts the command under GNU time, so the process
    is found in /proc by its arguments: the config path of its list size is in no
    other command line, and `time` itself (same arguments) is left out by name.
    """

    def __init__(self, marker: str, interval: float) -> None:
        self._marker = marker.encode()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.samples: list[tuple[float, float]] = []  # (seconds since start, VmRSS MiB)
        self.hwm_mib: float | None = None  # the kernel's own peak (VmHWM), last seen

    def __enter__(self) -> RssSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _find(self) -> int | None:
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                    name = Path(entry.path, "comm").read_text(encoding="utf-8").strip()
                except OSError:
                    continue
                if self._marker in argv and b"send" in argv and name != "time":
                    return int(entry.name)
        return None

    def _loop(self) -> None:
        pid: int | None = None
        while not self._stop.is_set():
            if pid is None:
                pid = self._find()
            if pid is not None:
                status = _status_kib(pid)
                if not status:
                    return  # it ended
                elapsed = time.perf_counter() - self._started
                if "VmRSS" in status:
                    self.samples.append((round(elapsed, 2), round(status["VmRSS"] / 1024, 1)))
                if "VmHWM" in status:
                    self.hwm_mib = round(status["VmHWM"] / 1024, 1)
            self._stop.wait(self._interval)

    def timeline(self, seconds: float) -> dict[str, float | None]:
        """VmRSS at each share of the run's wall time (the last sample at or before it)."""
        points: dict[str, float | None] = {}
        for share in TIMELINE_POINTS:
            before = [rss for at, rss in self.samples if at <= share * seconds]
            points[f"{share:.0%}"] = before[-1] if before else None
        return points


# -- the runs ------------------------------------------------------------------------------------


def run_timeout(args: argparse.Namespace, size: int) -> float:
    if args.run_timeout is not None:
        return float(args.run_timeout)
    return TIMEOUT_BASE_SECONDS + TIMEOUT_PER_RECIPIENT * size


def _unlink_ledger(ledger: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)


def _count_eml(folder: Path) -> tuple[int, int]:
    """(.eml files, their total bytes) in `folder`, without holding a list of 1,000,000 paths."""
    count = total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".eml"):
                count += 1
                total += entry.stat().st_size
    return count, total


class MemoryBench:
    def __init__(self, args: argparse.Namespace, workdir: Path, code: list[Path]) -> None:
        self.args = args
        self.workdir = workdir
        self.rows: list[Row] = []
        # The measured code and templates, fingerprinted before and after every run:
        # someone editing the tree meanwhile would make sizes incomparable.
        self.code = code

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def all(self) -> None:
        args = self.args
        port = free_port()
        per_size = 1 if args.skip_dry_run else 2
        # smtp-sink ends by itself after this (timeout(1)), should this script be killed.
        lifetime = sum(run_timeout(args, n) * per_size + 0.002 * n + 120 for n in args.sizes)
        with SmtpSink(port, self.workdir, lifetime=lifetime) as sink:
            self.say(f"smtp-sink listening on 127.0.0.1:{port}")
            for size in args.sizes:
                self.size(sink, port, size)

    def size(self, sink: SmtpSink, port: int, n: int) -> None:
        args = self.args
        folder = self.workdir / f"size-{n}"
        folder.mkdir()
        # send_bench's runner, for this size: its list, config, ledger, logs and time limit.
        bench_args = argparse.Namespace(**vars(args))
        bench_args.recipients = n
        bench = Bench(bench_args, folder)
        bench.timeout = run_timeout(args, n)
        self.say(f"{n:,} recipients: writing the list and a config in {folder}")
        write_list(bench.list_path, n, args.seed)
        write_config(bench.config, port=port, connections=args.connections, ledger=bench.ledger)
        if not args.skip_dry_run:
            self.add(self.dry_run(bench, n), n, bench)
        _unlink_ledger(bench.ledger)
        self.add(self.send(bench, sink, n), n, bench)
        if not args.keep:
            # The list (about 100 bytes a row) and the ledger: not needed any more.
            bench.list_path.unlink(missing_ok=True)
            _unlink_ledger(bench.ledger)

    def add(self, row: Row, n: int, bench: Bench) -> None:
        row.details["size"] = n
        row.details["timeout_seconds"] = bench.timeout
        self.rows.append(row)
        rss = row.details.get("rss_timeline") or {}
        self.say(
            f"  {row.seconds:.1f} s, {row.messages_per_second:,.0f} msgs/s, peak RSS "
            f"{row.max_rss_mib:.1f} MiB (VmHWM {row.details.get('vm_hwm_mib')}); RSS at "
            + ", ".join(f"{k} {v}" for k, v in rss.items())
            + f": {row.check}"
        )

    def timed(self, bench: Bench, row: Row, label: str) -> Row:
        """bench.run(row), with its resident memory sampled, and the machine's steal."""
        interval = 0.25 if row.messages < 50_000 else 1.0
        stolen = steal_seconds()
        code_before = fingerprint(self.code)
        with RssSampler(str(bench.config), interval) as sampler:
            bench.run(row, label, keep_row=False)
        row.details["code"] = code_before
        if (code_after := fingerprint(self.code)) != code_before:
            row.details["code_after"] = code_after
        if stolen is not None and (now := steal_seconds()) is not None:
            row.details["machine_steal_seconds"] = round(now - stolen, 2)
        row.details["vm_hwm_mib"] = sampler.hwm_mib
        row.details["rss_timeline"] = sampler.timeline(row.seconds)
        row.details["rss_samples"] = sampler.samples
        return row

    def dry_run(self, bench: Bench, n: int) -> Row:
        out = bench.workdir / "preview"
        command = [
            *bench.mailer,
            "--config",
            str(bench.config),
            "send",
            str(bench.list_path),
            "--template",
            self.args.template,
            "--dry-run",
            "--out",
            str(out),
        ]
        row = Row("dry-run", command, n)
        _unlink_ledger(bench.ledger)
        needed = DRY_RUN_BYTES_PER_MESSAGE * n
        free = shutil.disk_usage(bench.workdir).free
        if free < needed:
            row.measured = False
            row.fail(f"not started: {free / 1e9:.1f} GB free, it needs about {needed / 1e9:.1f}")
            self.say(f"  !! dry-run: {row.check}")
            return row
        self.timed(bench, row, "dry-run")
        files, total = _count_eml(out)
        row.details |= {
            "eml_files": files,
            "mean_message_bytes": round(total / files) if files else 0,
        }
        if row.check == "ok" and files != n:
            row.fail(f"{files} .eml files, expected {n}")
        # Right away, whatever --keep says: 1,000,000 previews are about 5 GB.
        self.say(f"  deleting the preview ({files:,} files, {total / 1e9:.2f} GB)")
        started = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)
        row.details["preview_delete_seconds"] = round(time.perf_counter() - started, 1)
        return row

    def send(self, bench: Bench, sink: SmtpSink, n: int) -> Row:
        command = [
            *bench.mailer,
            "--config",
            str(bench.config),
            "send",
            str(bench.list_path),
            "--template",
            self.args.template,
            "--yes",
        ]
        row = Row("send", command, n)
        before, sessions = sink.received(), sink.sessions()
        self.timed(bench, row, "send")
        got = sink.received_after(before, n)
        started = time.perf_counter()
        counts = bench.ledger_counts()
        # Not timed in the table: `appeal-mailer status` reading the ledger, for the check.
        row.details["status_seconds"] = round(time.perf_counter() - started, 1)
        check_sent(row, received=got, sessions=sink.sessions() - sessions, counts=counts)
        return row


# -- output --------------------------------------------------------------------------------------


def add_growth(rows: list[Row]) -> None:
    """Each row's peak RSS against the same run at the smallest size that passed."""
    for name in ("dry-run", "send"):
        runs = [r for r in rows if r.name == name and r.check == "ok" and not r.killed]
        if not runs:
            continue
        base = min(runs, key=lambda r: r.details["size"])
        for row in runs:
            growth = row.max_rss_mib - base.max_rss_mib
            row.details["growth_from"] = base.details["size"]
            row.details["growth_mib"] = round(growth, 1)
            row.details["growth_percent"] = round(100 * growth / base.max_rss_mib, 1)


def _growth(row: Row) -> str:
    if "growth_mib" not in row.details:
        return "-"
    if row.details["growth_from"] == row.details["size"]:
        return "(base)"
    return f"{row.details['growth_mib']:+.1f} MiB ({row.details['growth_percent']:+.1f} %)"


def table(rows: list[Row]) -> str:
    header = (
        "size",
        "run",
        "msgs/s",
        "seconds",
        "peak RSS MiB",
        "growth from smallest",
        "CPU s",
        "check",
    )
    body: list[Sequence[str]] = [
        (
            f"{row.details['size']:,}",
            row.name,
            f"{row.messages_per_second:,.0f}" if row.check == "ok" else "-",
            f"{row.seconds:.2f}" if row.measured else "-",
            f"{row.max_rss_mib:.1f}" if row.measured and not row.killed else "-",
            _growth(row),
            f"{row.cpu_seconds:.2f}" if row.measured and not row.killed else "-",
            row.check,
        )
        for row in rows
    ]
    return markdown(header, body, {0, 2, 3, 4, 5, 6})


def timeline_table(rows: list[Row]) -> str:
    header = ("size", "run", *(f"RSS at {share:.0%}" for share in TIMELINE_POINTS), "VmHWM")
    body: list[Sequence[str]] = []
    for row in rows:
        if not row.measured:
            continue
        points = row.details.get("rss_timeline", {})
        cells = [f"{points[k]:.1f}" if points.get(k) is not None else "-" for k in points]
        hwm = row.details.get("vm_hwm_mib")
        body.append(
            (
                f"{row.details['size']:,}",
                row.name,
                *cells,
                f"{hwm:.1f}" if hwm is not None else "-",
            )
        )
    return markdown(header, body, set(range(len(header))) - {1})


def goal_line(rows: list[Row]) -> str:
    largest = max((row.details["size"] for row in rows), default=0)
    peaks = [
        f"{row.name} {row.max_rss_mib * 2**20 / 1e6:.1f} MB"
        + (" (under)" if row.max_rss_mib * 2**20 < GOAL_BYTES else " (OVER)")
        for row in rows
        if row.details["size"] == largest and row.measured and not row.killed
    ]
    limit = GOAL_BYTES / 1e6
    return (
        f"Goal: peak under {limit:.0f} MB ({GOAL_BYTES / 2**20:.1f} MiB) at 1,000,000, flat from "
        f"10,000. Largest size here, {largest:,}: " + (", ".join(peaks) or "no run measured")
    )


def package_dir() -> Path | None:
    """Where the measured `appeal-mailer` imports appeal_mailer from (PYTHONPATH included)."""
    command = [sys.executable, "-c", "import appeal_mailer; print(appeal_mailer.__file__)"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            command, env=child_env(), capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip()).resolve().parent
    return None


def fingerprint(folders: Sequence[Path]) -> str:
    """A hash of the code and templates the runs use: if it changes between runs, they differ."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                with contextlib.suppress(OSError):
                    digest.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def tree(package: Path | None) -> dict[str, Any]:
    """The commit of the checkout appeal_mailer is imported from, and its uncommitted changes."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", "-C", str(package), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            return done.stdout.strip()
        return ""

    top = git("rev-parse", "--show-toplevel") if package is not None else ""
    changed = (
        git("status", "--porcelain", "--", f"{top}/src", f"{top}/pyproject.toml") if top else ""
    )
    return {
        "package": str(package) if package is not None else None,
        "checkout": top or None,
        "commit": git("rev-parse", "--short", "HEAD") if top else "",
        "changed": changed.splitlines(),
        "templates": str(TEMPLATES),
    }


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be at least 1")
    return sorted(set(sizes))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory, wall time and msgs/s of `appeal-mailer send` (to Postfix's "
        "smtp-sink on loopback) and of its dry run, at several list sizes.",
        epilog="Needs Postfix's smtp-sink (Debian: apt-get install -y postfix) and GNU time "
        "(apt-get install -y time) for peak RSS. A dry run of 1,000,000 writes about 5 GB "
        "into the temporary folder, deleted as soon as it is counted.",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="list sizes, comma-separated [10000,100000,1000000]",
    )
    parser.add_argument("--connections", type=int, default=8, help="[smtp] connections [8]")
    parser.add_argument("--template", default="appeal", help="template to send [appeal]")
    parser.add_argument("--skip-dry-run", action="store_true", help="only the real sends")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    parser.add_argument("--seed", type=int, default=2003, help="seed of the fictional list")
    parser.add_argument(
        "--run-timeout",
        type=float,
        help=f"kill a run after this many seconds [{TIMEOUT_BASE_SECONDS:.0f} + "
        f"{TIMEOUT_PER_RECIPIENT} per recipient of its size]",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (lists, configs, ledgers, logs; never the previews)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 64:
        parser.error("--connections must be 1 to 64 (appeal-mailer's limit)")
    if args.run_timeout is not None and args.run_timeout <= 0:
        parser.error("--run-timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM unwinds like Ctrl-C: the `finally` blocks stop smtp-sink and any child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    package = package_dir()
    if package is None:
        print("error: this Python cannot import appeal_mailer (pip install -e .)", file=sys.stderr)
        return 1
    source = tree(package)
    with _workdir(args.keep) as workdir:
        bench = MemoryBench(args, workdir, [package, TEMPLATES])
        try:
            bench.all()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # smtp-sink would not start
            print(f"error: {exc}", file=sys.stderr)
            return 1
    rows = bench.rows
    add_growth(rows)
    # Every run on the same code and templates, or the sizes do not compare.
    codes = {
        row.details[key] for row in rows for key in ("code", "code_after") if key in row.details
    }
    source["fingerprints"] = sorted(codes)
    source["changed_during_run"] = len(codes) > 1
    command = "python bench/memory_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    info = {
        "command": command.strip(),
        "date": started.isoformat(timespec="seconds"),
        "sizes": args.sizes,
        "template": args.template,
        "connections": args.connections,
        "tree": source,
        "machine": machine(),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "goal_bytes": GOAL_BYTES,
        "runs": [asdict(row) for row in rows],
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        m = info["machine"]
        changed = f" + uncommitted changes in {len(source['changed'])} files" * bool(
            source["changed"]
        )
        if source["checkout"] != str(ROOT):
            changed += f" (appeal_mailer from {source['package']})"
        print(
            f"{command.strip()}\n{info['date']}: sizes {', '.join(f'{n:,}' for n in args.sizes)}, "
            f"template {args.template}, {args.connections} connections; tree "
            f"{source['commit'] or '?'}{changed}; {m['cpus']} CPUs, Python {m['python']}, "
            f"Postfix {m['postfix'] or '?'}; load average (1 min) {load_before[0]:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after\n"
        )
        print(table(rows))
        if source["changed_during_run"]:
            print(
                f"\nWARNING: the code or templates changed during the benchmark "
                f"({', '.join(sorted(codes))}): the sizes ran different code. Pin a commit "
                "(see bench/README.md, Memory) and run again."
            )
        print(f"\n{goal_line(rows)}\n")
        print("Resident memory during each run (MiB, sampled from /proc; % of its wall time):\n")
        print(timeline_table(rows))
    consistent = not source["changed_during_run"]
    return 0 if rows and consistent and all(row.check == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
