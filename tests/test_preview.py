"""A dry run's preview folder: an .eml per message, exactly as it would be sent; index.csv."""

# The names and subjects use Cyrillic letters and typographic quotes on purpose:
# ruff: noqa: RUF001

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import appeal_mailer.transport as transport_module
from appeal_mailer.errors import PreviewError
from appeal_mailer.models import Envelope, State
from appeal_mailer.transport import DryRunTransport
from tests.conftest import CliRun, ListWriter
from tests.smtpd import RecordingServer

# Each message's Date is the moment it was built: the one header two runs cannot share.
_DATE = re.compile(rb"^Date: [^\r\n]*\r\n", re.MULTILINE)


def _envelope(row_id: int, recipient: str, data: bytes) -> Envelope:
    message_id = f"<c.appeal.{row_id}@example.org>"
    return Envelope(row_id, "appeal@example.org", recipient, message_id, data)


async def test_each_message_is_written_byte_for_byte_under_its_row_and_address(
    tmp_path: Path,
) -> None:
    """File names, file bytes and index.csv are exactly what the preview has always written.

    The bytes are the message's own: CRLF kept, a bare LF not translated, a line
    starting with "." not dot-stuffed (that is SMTP's, not the message's),
    non-ASCII bytes as they are.
    """
    long_local = "a" * 64
    envelopes = [
        _envelope(7, "anna@example.org", b"Subject: one\r\n\r\nHi\r\n.\r\n..two\nbare LF\r\n"),
        _envelope(12, "o'neil+list@example.net", "Subject: два\r\n\r\nПривет\r\n".encode()),
        _envelope(123456, f"{long_local}@{'b' * 63}.example.org", b"Subject: long\r\n\r\nx\r\n"),
    ]
    out = tmp_path / "preview"
    transport = DryRunTransport(out)
    await transport.open()
    results = [await transport.send(e, attempts_allowed=1) for e in envelopes]
    await transport.close()

    names = [
        "000007-anna@example.org.eml",
        "000012-o_neil+list@example.net.eml",
        # At most 100 characters of the address, so the name fits any disk.
        f"123456-{long_local}@{'b' * 35}.eml",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "index.csv"])
    for name, envelope in zip(names, envelopes, strict=True):
        assert (out / name).read_bytes() == envelope.data
    assert (out / "index.csv").read_bytes() == (
        "file,email,message_id\r\n"
        + "".join(
            f"{name},{e.recipient},{e.message_id}\r\n"
            for name, e in zip(names, envelopes, strict=True)
        )
    ).encode()
    assert [(r.row_id, r.state, r.attempts, r.reply) for r in results] == [
        (e.row_id, State.SENT, 1, f"written to {name}")
        for name, e in zip(names, envelopes, strict=True)
    ]


async def test_a_file_left_by_an_earlier_preview_is_replaced_whole(tmp_path: Path) -> None:
    """A longer file of the same name from before is truncated, not partly overwritten."""
    out = tmp_path / "preview"
    out.mkdir()
    (out / "000001-anna@example.org.eml").write_bytes(b"an older, longer message" * 100)
    transport = DryRunTransport(out)
    await transport.open()
    await transport.send(_envelope(1, "anna@example.org", b"new\r\n"), attempts_allowed=1)
    await transport.close()
    assert (out / "000001-anna@example.org.eml").read_bytes() == b"new\r\n"


def test_a_preview_is_byte_for_byte_what_the_real_send_puts_on_the_wire(
    run_cli: CliRun,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """Each .eml holds the very bytes the server then receives for that address, Date aside."""
    people = [
        {"email": "anna@example.org", "name": "Anna Smith", "organization": "Branch 7"},
        {"email": "boris@example.net", "name": "Борис Иванов", "organization": "Союз"},
        {"email": "chloe@example.org", "name": "Chloé O’Neill", "organization": ""},
    ]
    path = write_list(people)
    out = tmp_path / "preview"
    dry = run_cli("send", str(path), "--template", "protest", "--dry-run", "--out", str(out))
    assert dry.exit_code == 0, dry.output
    real = run_cli("send", str(path), "--template", "protest", "--yes")
    assert real.exit_code == 0, real.output

    sent = {m.rcpt_tos[0]: m.data for m in smtp_server.messages}
    previews = {p.name.split("-", 1)[1].removesuffix(".eml"): p for p in out.glob("*.eml")}
    assert sorted(previews) == sorted(sent) == sorted(p["email"] for p in people)
    for address, data in sent.items():
        preview = previews[address].read_bytes()
        assert _DATE.search(preview) is not None
        assert _DATE.sub(b"", preview, count=1) == _DATE.sub(b"", data, count=1)


def test_a_long_dry_run_previews_exactly_what_the_real_send_then_sends(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    """Over many claim groups and ledger pages: sent rows and suppressed addresses are skipped.

    A dry run keeps hundreds of rows claimed at once (in a scratch copy of the
    ledger, not the real one); what it previews must still be, row for row, what
    the real send that follows sends, and index.csv lists the files in row order.
    """
    people = [{"email": f"m{i}@example.org", "name": f"M {i}"} for i in range(700)]
    path = write_list(people)
    suppressed = ["m3@example.org", "m399@example.org", "m650@example.org"]
    assert run_cli("suppress", "add", *suppressed).exit_code == 0
    first = run_cli("send", str(path), "--yes", "--limit", "120")
    assert first.exit_code == 0, first.output
    already = {m.rcpt_tos[0] for m in smtp_server.messages}
    # m3 took one of the 120 places, and was suppressed when claimed.
    assert len(already) == 119

    out = tmp_path / "preview"
    dry = run_cli("send", str(path), "--dry-run", "--out", str(out))
    assert dry.exit_code == 0, dry.output
    files = sorted(p.name for p in out.glob("*.eml"))
    previewed = [name.split("-", 1)[1].removesuffix(".eml") for name in files]
    index = (out / "index.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [line.split(",")[0] for line in index] == files

    rest = run_cli("send", str(path), "--yes")
    assert rest.exit_code == 0, rest.output
    sent_now = [m.rcpt_tos[0] for m in smtp_server.messages if m.rcpt_tos[0] not in already]
    expected = {p["email"] for p in people} - already - set(suppressed)
    assert sorted(previewed) == sorted(sent_now) == sorted(expected)
    assert len(previewed) == 700 - 119 - 3


def test_a_disk_that_fills_mid_preview_stops_the_run_with_a_clear_message(
    run_cli: CliRun,
    write_list: ListWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC while writing the 4th file: the run stops, naming the folder; no traceback.

    Not an "internal error" and not a message recorded unknown: the files already
    written stay, the summary says what happened, and the exit status says trouble.
    The full disk is simulated at the one call that writes a preview file.
    """
    real_write = transport_module._write_file
    written: list[str] = []

    def fill_up(path: str, data: bytes) -> None:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_write(path, data)
        written.append(path)

    monkeypatch.setattr(transport_module, "_write_file", fill_up)
    people = [{"email": f"m{i}@example.org", "name": f"M {i}"} for i in range(10)]
    out = tmp_path / "preview"
    result = run_cli("send", str(write_list(people)), "--dry-run", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert f"{out}: cannot write the preview: No space left on device" in result.output
    assert "hint: free some space, or pass a writable folder with --out" in result.output
    assert "internal error" not in result.output
    assert len(list(out.glob("*.eml"))) == 3
    assert len((out / "index.csv").read_text(encoding="utf-8").splitlines()) == 1 + 3


def test_a_file_size_limit_leaves_no_half_message_and_no_silent_index(tmp_path: Path) -> None:
    """A real short write (RLIMIT_FSIZE, in a child process): no partial .eml stays behind.

    The message that did not fit raises PreviewError and its file is removed;
    index.csv's last rows, which no longer fit either, make close() raise
    PreviewError too instead of leaving a cut index unsaid.
    """
    code = r"""
import asyncio, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails: EFBIG
from appeal_mailer.errors import PreviewError
from appeal_mailer.models import Envelope
from appeal_mailer.transport import DryRunTransport

async def main() -> None:
    transport = DryRunTransport(Path(sys.argv[1]))
    await transport.open()
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for i in range(1, 40):  # small ones fit; index.csv stays in its buffer
        message = Envelope(i, "s@x.org", f"r{i}@x.org", f"<{i}@x>", b"x" * 100)
        await transport.send(message, attempts_allowed=1)
    try:
        big = Envelope(1000, "s@x.org", "big@x.org", "<b@x>", b"y" * 10000)
        await transport.send(big, attempts_allowed=1)
    except PreviewError as exc:
        print("send:", exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the index no longer fits
    try:
        await transport.close()
    except PreviewError as exc:
        print("close:", exc)

asyncio.run(main())
"""
    out = tmp_path / "preview"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["send", "close"], done.stdout
    assert "cannot write the preview: File too large" in lines[0]
    assert not (out / "001000-big@x.org.eml").exists()
    assert len(list(out.glob("*.eml"))) == 39
    assert all(path.stat().st_size == 100 for path in out.glob("*.eml"))


def test_an_index_that_cannot_be_finished_stops_the_run_with_trouble(
    run_cli: CliRun,
    write_list: ListWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """index.csv's last rows failing at the end (disk full): exit 3 and the folder named."""

    async def failing_close(self: DryRunTransport) -> None:
        raise PreviewError(tmp_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(DryRunTransport, "close", failing_close)
    people = [{"email": f"m{i}@example.org", "name": f"M {i}"} for i in range(5)]
    out = tmp_path / "preview"
    result = run_cli("send", str(write_list(people)), "--dry-run", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert f"{tmp_path}: cannot write the preview: No space left on device" in result.output
