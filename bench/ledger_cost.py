#!/usr/bin/env python3
"""What does the ledger cost? `appeal-mailer send` at each durability level, and with none.

One command, nothing leaves the machine:

    python bench/ledger_cost.py --recipients 20000

On one generated list and config (send_bench.py's list, config and smtp-sink),
it times, each in a fresh process from start to exit:

  - power: `appeal-mailer send LIST --yes` with `[ledger] durability = "power"`
    (the default: SQLite synchronous=FULL), from a fresh ledger;
  - crash: the same with `durability = "crash"` (synchronous=NORMAL);
  - none: bench/no_ledger_send.py, the same messages rendered by appeal-mailer's
    own CampaignRun and sent through its own SMTPTransport, with the same
    workers and rate limiter, and no ledger at all (a benchmark baseline, not
    a product path);

alternating power, crash, none, power, ... `--repeats` times (default 3), and
reports the median of each, and what each durability level costs relative to
none. Every run is checked: smtp-sink must have received exactly N messages;
after a send, the ledger must count N `sent` and nothing else; after the
baseline, no ledger file may exist. See bench/README.md, "Ledger cost".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from send_bench import (
    Bench,
    Row,
    SmtpSink,
    _workdir,
    free_port,
    machine,
    measure,
    write_config,
    write_list,
)

BASELINE = Path(__file__).resolve().parent / "no_ledger_send.py"
LEVELS = ("power", "crash")
VARIANTS = (*LEVELS, "none")
LABELS = {
    "power": 'power: durability = "power" (synchronous=FULL, default)',
    "crash": 'crash: durability = "crash" (synchronous=NORMAL)',
    "none": "none: no ledger (bench/no_ledger_send.py)",
}


def steal_seconds() -> float | None:
    """CPU time the hypervisor took from this virtual machine so far, all CPUs (Linux).

    On a shared host, "steal" makes wall time jitter whatever the benchmark does;
    each run reports how much of it the machine suffered meanwhile.
    """
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def write_level_config(
    path: Path, level: str, *, port: int, connections: int, ledger: Path
) -> None:
    """send_bench's config, with `[ledger] durability = LEVEL` set explicitly."""
    write_config(path, port=port, connections=connections, ledger=ledger)
    base = path.read_text(encoding="utf-8")
    # write_config writes [ledger] last, so a line appended lands in it; checked below.
    text = base.rstrip("\n") + f'\ndurability = "{level}"\n'
    expected = tomllib.loads(base)
    expected["ledger"]["durability"] = level
    if tomllib.loads(text) != expected:
        raise AssertionError("durability did not land in [ledger]")
    path.write_text(text, encoding="utf-8")


class LedgerCost:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        # send_bench's runner: fresh processes, timing, time limits, ledger checks.
        self.bench = Bench(args, workdir)
        self.workdir = workdir
        self.configs = {level: workdir / f"config-{level}.toml" for level in LEVELS}
        self.runs: dict[str, list[Row]] = {variant: [] for variant in VARIANTS}

    def say(self, text: str) -> None:
        self.bench.say(text)

    def all(self) -> None:
        args, bench = self.args, self.bench
        self.say(f"writing {args.recipients} subscribers and configs in {self.workdir}")
        write_list(bench.list_path, args.recipients, args.seed)
        port = free_port()
        for level, path in self.configs.items():
            write_level_config(
                path, level, port=port, connections=args.connections, ledger=bench.ledger
            )
        runs = len(VARIANTS) * args.repeats + 2
        with SmtpSink(port, self.workdir, lifetime=bench.timeout * runs + 60) as sink:
            self.say(f"smtp-sink listening on 127.0.0.1:{port}")
            self.warm_up()
            for repeat in range(1, args.repeats + 1):
                for variant in VARIANTS:
                    self.say(f"round {repeat}/{args.repeats}, {variant}")
                    stolen = steal_seconds()
                    if variant == "none":
                        row = self.none(sink, repeat)
                    else:
                        row = self.send(sink, variant, repeat)
                    if stolen is not None and (now := steal_seconds()) is not None:
                        row.details["machine_steal_seconds"] = round(now - stolen, 2)
                    row.details["round"] = repeat
                    self.runs[variant].append(row)
                    self.say(
                        f"  {row.seconds:.2f} s, {row.messages_per_second:,.0f} msgs/s, "
                        f"CPU {row.cpu_seconds:.2f} s, steal "
                        f"{row.details.get('machine_steal_seconds', '?')} s: {row.check}"
                    )
            if args.profile is not None:
                self.profile(args.profile)

    def warm_up(self) -> None:
        """Import everything once, untimed, so the first timed run does not pay a cold cache."""
        command = [
            sys.executable,
            "-c",
            "import appeal_mailer.cli, appeal_mailer.campaign, appeal_mailer.ledger, "
            "appeal_mailer.transport",
        ]
        self.bench.run(Row("warm-up imports", command, 1), "warm-up", keep_row=False)

    def send(self, sink: SmtpSink, level: str, repeat: int) -> Row:
        self.bench.config = self.configs[level]
        # Bench.send starts from a fresh ledger, checks smtp-sink's count and the ledger's.
        row = self.bench.send(sink, self.args.template)
        row.name = level
        row.details["durability"] = level
        # Bench.send names its log after the template only: keep each run's own.
        log = self.workdir / f"send-{self.args.template}.log"
        if self.args.keep and log.exists():
            row.log = str(log.rename(self.workdir / f"{level}-{repeat}.log"))
        return row

    def none(self, sink: SmtpSink, repeat: int) -> Row:
        n = self.args.recipients
        ledger = self.bench.ledger
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{ledger}{suffix}").unlink(missing_ok=True)
        command = [
            sys.executable,
            str(BASELINE),
            "--config",
            str(self.configs["power"]),
            "--template",
            self.args.template,
            str(self.bench.list_path),
        ]
        before = sink.received()
        row = self.bench.run(Row("none", command, n), f"none-{repeat}")
        got = sink.received_after(before, n)
        row.details["smtp_sink_received"] = got
        problems = []
        if got != n:
            problems.append(f"smtp-sink received {got}, expected {n}")
        if ledger.exists():
            problems.append(f"a ledger file appeared: {ledger}")
        if row.check == "ok" and problems:
            row.fail("; ".join(problems))
        return row

    def profile(self, directory: Path) -> None:
        """One power send under pyinstrument, after the timed runs: not timed, not in the table."""
        directory.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.bench.ledger}{suffix}").unlink(missing_ok=True)
        name = f"send-power-{self.args.template}"
        session = directory / f"{name}.pyisession"
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
            "--config",
            str(self.configs["power"]),
            "send",
            str(self.bench.list_path),
            "--template",
            self.args.template,
            "--yes",
        ]
        self.say(f"  profiling power: {' '.join(command)}")
        result = measure(
            command,
            cwd=self.workdir,
            env=self.bench.env,
            timeout=self.bench.timeout * 3,
            log=directory / f"{name}.log",
            time_tool=None,
        )
        self.say(f"  profiled run: {result.seconds:.1f} s, exit {result.returncode}")
        if result.returncode != 0 or not session.exists():
            return
        for renderer, suffix, options in (
            ("text", "txt", ["-p", "show_all=false"]),
            ("pstats", "pstats", []),
        ):
            measure(
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
                    str(directory / f"{name}.{suffix}"),
                ],
                cwd=self.workdir,
                env=self.bench.env,
                timeout=300,
                log=directory / f"{name}-{suffix}.log",
                time_tool=None,
            )
        self.say(f"  profile written to {directory}/{name}.txt (.pstats, .pyisession)")

    def summary(self) -> list[dict[str, Any]]:
        """The median of each variant's runs, and its cost relative to `none`."""
        medians: dict[str, dict[str, Any]] = {}
        for variant, rows in self.runs.items():
            ok = [row for row in rows if row.check == "ok"]
            medians[variant] = {
                "variant": variant,
                "label": LABELS[variant],
                "runs_ok": len(ok),
                "runs": len(rows),
                "messages_per_second": _median([r.messages_per_second for r in ok]),
                "seconds": _median([r.seconds for r in ok]),
                "cpu_seconds": _median([r.cpu_seconds for r in ok]),
                "checks": sorted({r.check for r in rows}),
            }
        none = medians["none"]
        for m in medians.values():
            m["throughput_lost_vs_none_percent"] = _percent(
                1 - _ratio(m["messages_per_second"], none["messages_per_second"])
            )
            m["time_added_vs_none_percent"] = _percent(_ratio(m["seconds"], none["seconds"]) - 1)
            m["cpu_added_vs_none_percent"] = _percent(
                _ratio(m["cpu_seconds"], none["cpu_seconds"]) - 1
            )
        return list(medians.values())


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _percent(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 1)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _versus(m: dict[str, Any], key: str) -> str:
    if m["variant"] == "none":
        return ""
    return "-" if m[key] is None else f"{m[key]:+.1f} %"


def markdown(header: Sequence[str], body: list[Sequence[str]], right: set[int]) -> str:
    """A Markdown table, aligned for reading as text too; columns in `right` right-aligned."""
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def table(summary: list[dict[str, Any]]) -> str:
    """The medians, and each durability level's cost relative to no ledger."""
    header = (
        "ledger",
        "msgs/s",
        "seconds",
        "CPU s",
        "throughput lost vs none",
        "time added vs none",
        "CPU added vs none",
        "check",
    )
    body: list[Sequence[str]] = [
        (
            m["label"],
            _cell(m["messages_per_second"], ",.0f"),
            _cell(m["seconds"], ".2f"),
            _cell(m["cpu_seconds"], ".2f"),
            _versus(m, "throughput_lost_vs_none_percent"),
            _versus(m, "time_added_vs_none_percent"),
            _versus(m, "cpu_added_vs_none_percent"),
            f"{m['runs_ok']}/{m['runs']} ok"
            + ("" if m["checks"] == ["ok"] else f" {m['checks']}"),
        )
        for m in summary
    ]
    return markdown(header, body, {1, 2, 3, 4, 5, 6})


def runs_table(rows: list[Row]) -> str:
    """Every timed run in the order it ran, with what the machine was doing meanwhile."""
    header = ("round", "ledger", "msgs/s", "seconds", "CPU s", "steal s", "load before", "check")
    body: list[Sequence[str]] = [
        (
            str(row.details.get("round", "")),
            row.name,
            f"{row.messages_per_second:,.0f}" if row.check == "ok" else "-",
            f"{row.seconds:.2f}",
            f"{row.cpu_seconds:.2f}",
            _cell(row.details.get("machine_steal_seconds"), ".1f"),
            _cell(row.details.get("load_average_before"), ".2f"),
            row.check,
        )
        for row in rows
    ]
    return markdown(header, body, {0, 2, 3, 4, 5, 6})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="What the ledger costs: `appeal-mailer send` at each durability level "
        "against the same send with no ledger, to Postfix's smtp-sink on loopback.",
        epilog="Needs Postfix's smtp-sink (Debian: apt-get install -y postfix).",
    )
    parser.add_argument("--recipients", type=int, default=2000, help="list length [2000]")
    parser.add_argument("--connections", type=int, default=8, help="[smtp] connections [8]")
    parser.add_argument("--template", default="appeal", help="template to send [appeal]")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each variant, alternating [3]"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--seed", type=int, default=2003, help="seed of the fictional list")
    parser.add_argument(
        "--run-timeout",
        type=float,
        help="kill a run after this many seconds [120 + 0.1 per recipient]",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (list, configs, logs)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the timed runs, one power send under pyinstrument; reports into DIR",
    )
    args = parser.parse_args(argv)
    if args.recipients < 1:
        parser.error("--recipients must be at least 1")
    if not 1 <= args.connections <= 64:
        parser.error("--connections must be 1 to 64 (appeal-mailer's limit)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM unwinds like Ctrl-C: the `finally` blocks stop smtp-sink and any child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with _workdir(args.keep) as workdir:
        cost = LedgerCost(args, workdir)
        try:
            cost.all()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # smtp-sink would not start
            print(f"error: {exc}", file=sys.stderr)
            return 1
    summary = cost.summary()
    command = "python bench/ledger_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # In the order they ran: round by round, power, crash, none.
    rows = sorted(
        (row for variant in VARIANTS for row in cost.runs[variant]),
        key=lambda row: row.details.get("round", 0),
    )
    info = {
        "command": command.strip(),
        "date": started.isoformat(timespec="seconds"),
        "recipients": args.recipients,
        "connections": args.connections,
        "template": args.template,
        "repeats": args.repeats,
        "machine": machine(),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": summary,
        "runs": [asdict(row) for row in rows],
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        m = info["machine"]
        print(
            f"{command.strip()}\n{info['date']}: {args.recipients} recipients, template "
            f"{args.template}, {args.connections} connections, median of {args.repeats} "
            f"alternating runs; {m['cpus']} CPUs, Python {m['python']}, Postfix "
            f"{m['postfix'] or '?'}; load average (1 min) {load_before[0]:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after\n"
        )
        print(table(summary))
        print("\nEach run (steal s: CPU time the host took from this machine, all CPUs):\n")
        print(runs_table(rows))
    return 0 if all(row.check == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
