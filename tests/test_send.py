"""End to end: `appeal-mailer send` against a recording SMTP server."""

from __future__ import annotations

from tests.conftest import CliRun, ListWriter
from tests.smtpd import RecordingServer


def test_send_delivers_one_message_per_unique_valid_row(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """Each unique valid address gets exactly one message; invalid and duplicate rows get none."""
    path = write_list(
        [
            {"email": "anna@example.org", "name": "Anna"},
            {"email": "not-an-address", "name": "Broken"},
            {"email": "ANNA@example.org", "name": "Anna again"},
            {"email": "boris@example.net", "name": "Boris"},
        ]
    )
    result = run_cli("send", str(path), "--yes")
    assert result.exit_code == 0, result.output
    assert sorted(smtp_server.recipients()) == ["anna@example.org", "boris@example.net"]
    assert "line 3" in result.output
    assert "line 4" in result.output
