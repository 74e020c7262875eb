#!/usr/bin/env python3
"""Run a command; print its wall time and the CPU seconds of each process of its tree.

    python bench/proc_cpu.py appeal-mailer --config CFG send LIST --yes

A send is three processes (the sender, the ledger's child, with [dkim] the
signing child); wait4(2) sums them. This samples /proc/PID/stat of the
command and of every descendant every 5 ms and prints the last reading of
each: `wall 8.38s rc=0 PID:NAME:uUSER+sSYSTEM ...`. Linux only. A process
that lives less than 5 ms can be missed, and the last 5 ms of each are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:  # gone meanwhile
        return []


def _times(pid: int) -> tuple[int, int, str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    # proc(5): utime and stime are fields 14 and 15, after the name in parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]), int(fields[12]), stat[stat.find("(") + 1 : stat.rfind(")")]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    ticks = os.sysconf("SC_CLK_TCK")
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, tuple[int, int, str]] = {}
    while process.poll() is None:
        todo = [process.pid]
        while todo:
            pid = todo.pop()
            reading = _times(pid)
            if reading is not None:
                seen[pid] = reading
            todo += _children(pid)
        time.sleep(0.005)
    wall = time.perf_counter() - started
    cpu = " ".join(
        f"{pid}:{name}:u{user / ticks:.2f}+s{system / ticks:.2f}"
        for pid, (user, system, name) in seen.items()
    )
    print(f"wall {wall:.2f}s rc={process.returncode} {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
