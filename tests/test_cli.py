"""The command line as moderators and operators use it: dry run, confirm, check, status, init."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_LIST, ROOT, CliRun, ConfigWriter, ListWriter
from tests.smtpd import RecordingServer


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make any attempt to open a network connection fail loudly, and record it."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise AssertionError(f"a dry run tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_dry_run_renders_every_message_and_opens_no_socket(
    run_cli: CliRun,
    example_list: Path,
    smtp_server: RecordingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dry run writes one parseable .eml per recipient, a summary, and touches no network."""
    attempts = _no_network(monkeypatch)
    out = tmp_path / "preview"
    result = run_cli("send", str(example_list), "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert attempts == []
    assert smtp_server.messages == []
    emls = sorted(out.glob("*.eml"))
    with example_list.open(encoding="utf-8") as handle:
        expected = {row["email"] for row in csv.DictReader(handle)}
    assert len(emls) == len(expected)
    seen = set()
    for path in emls:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert not message.defects
        seen.add(message["To"].addresses[0].addr_spec)
    assert seen == expected
    assert (out / "summary.txt").read_text(encoding="utf-8").startswith("test-campaign/appeal:")
    index = list(csv.DictReader((out / "index.csv").open(encoding="utf-8")))
    assert {row["email"] for row in index} == expected


def test_dry_run_leaves_the_ledger_untouched(
    run_cli: CliRun, write_list: ListWriter, subscribers: list[dict[str, str]], tmp_path: Path
) -> None:
    """A dry run writes nothing to the ledger, so the real send that follows sends everyone."""
    path = write_list(subscribers)
    ledger = tmp_path / "ledger.db"
    dry = run_cli("send", str(path), "--dry-run", "--out", str(tmp_path / "p"))
    assert dry.exit_code == 0, dry.output
    assert not ledger.exists()
    real = run_cli("send", str(path), "--yes")
    assert real.exit_code == 0, real.output
    assert "10 sent" in real.output


def test_dry_run_previews_only_what_a_real_run_would_still_send(
    run_cli: CliRun, write_list: ListWriter, subscribers: list[dict[str, str]], tmp_path: Path
) -> None:
    """After a partial send, a dry run renders only the messages not sent yet."""
    path = write_list(subscribers)
    assert run_cli("send", str(path), "--yes", "--limit", "4").exit_code == 0
    out = tmp_path / "rest"
    dry = run_cli("send", str(path), "--dry-run", "--out", str(out))
    assert dry.exit_code == 0, dry.output
    assert len(list(out.glob("*.eml"))) == 6


def test_a_missing_variable_for_one_subscriber_stops_everything_before_the_first_send(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """A variable missing for one row stops the run with that row's line; nothing is sent."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "call.txt.j2").write_text(
        "Subject: Call\n\nDear {{ recipient.name }},\n"
        "{% if recipient.organization %}{{ campaign.context.titles[recipient.organization] }}"
        "{% endif %}\n",
        encoding="utf-8",
    )
    config = write_config(
        campaign={
            "templates": str(templates),
            "template": "call",
            "context": {"titles": {"Branch 7": "Comrades of Branch 7"}},
        }
    )
    path = write_list(
        [
            {"email": "a@example.org", "name": "A", "organization": "Branch 7"},
            {"email": "b@example.org", "name": "B", "organization": ""},
            {"email": "c@example.org", "name": "C", "organization": "Branch 9"},
        ]
    )
    result = run_cli("send", str(path), "--yes", config=config)
    assert result.exit_code == 1
    assert "list line 4" in result.output
    assert "c@example.org" in result.output
    assert "call.txt.j2:4" in result.output
    assert smtp_server.messages == []
    status = json.loads(run_cli("status", "--format", "json", config=config).output)
    assert status["counts"] == {}


def test_limit_sends_a_batch_and_the_next_run_sends_the_rest_once(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """`--limit 3` sends three; running again sends the other seven; no one gets two."""
    path = write_list(subscribers)
    first = run_cli("send", str(path), "--yes", "--limit", "3")
    assert first.exit_code == 0, first.output
    assert len(smtp_server.messages) == 3
    assert "still to send" in first.output
    second = run_cli("send", str(path), "--yes")
    assert second.exit_code == 0, second.output
    counts = smtp_server.count_by_recipient()
    assert sorted(counts) == sorted(s["email"] for s in subscribers)
    assert set(counts.values()) == {1}


def test_without_a_terminal_send_refuses_to_go_ahead_without_yes(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """Outside a terminal, `send` without --yes is a usage error (exit 2) and sends nothing."""
    result = run_cli("send", str(write_list(subscribers)))
    assert result.exit_code == 2
    assert "--yes" in result.output
    assert smtp_server.messages == []


def _run_in_terminal(args: list[str], answer: str, cwd: Path) -> str:
    """Run appeal-mailer on a pseudo-terminal, answer its question, return all it printed."""
    main_fd, child_fd = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "appeal_mailer", *args],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        cwd=cwd,
        env=env,
    )
    os.close(child_fd)
    output = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if not answered and b"Send now?" in output:
            os.write(main_fd, answer.encode() + b"\n")
            answered = True
        if process.poll() is not None and not ready:
            break
    process.wait(timeout=30)
    os.close(main_fd)
    return output.decode("utf-8", errors="replace")


def test_in_a_terminal_send_shows_the_plan_and_a_sample_and_no_sends_nothing(
    config_file: Path, example_list: Path, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    """In a terminal, `send` shows count, template, server, rate, a sample; "n" sends nothing."""
    shown = _run_in_terminal(
        ["--config", str(config_file), "send", str(example_list)], "n", tmp_path
    )
    assert "Send now?" in shown
    assert "Template:   appeal" in shown
    assert f"{smtp_server.host}:{smtp_server.port}" in shown
    assert "Rate:" in shown
    assert "Signed:     no ([dkim] is off" in shown
    assert "Sample, as" in shown
    assert "please forward" in shown
    assert "Nothing sent." in shown
    assert smtp_server.messages == []


def test_in_a_terminal_answering_yes_sends(
    config_file: Path, example_list: Path, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    """Answering "y" at the question sends to the whole list."""
    shown = _run_in_terminal(
        ["--config", str(config_file), "send", str(example_list)], "y", tmp_path
    )
    with example_list.open(encoding="utf-8") as handle:
        expected = sum(1 for _ in csv.DictReader(handle))
    assert len(smtp_server.messages) == expected, shown


def test_status_json_has_the_documented_shape(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """`status --format json` prints one object: campaign, counts, and one object per row."""
    smtp_server.fail_always("member3@example.org", "rcpt", "550 5.1.1 No such user")
    assert run_cli("send", str(write_list(subscribers)), "--yes").exit_code == 3
    result = run_cli("status", "--format", "json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["campaign"] == "test-campaign"
    assert status["counts"] == {"sent": 9, "failed": 1}
    assert len(status["recipients"]) == 10
    for row in status["recipients"]:
        assert set(row) == {
            "email",
            "step",
            "state",
            "attempts",
            "smtp_code",
            "smtp_reply",
            "message_id",
            "updated_at",
        }
    failed = next(r for r in status["recipients"] if r["state"] == "failed")
    assert failed["email"] == "member3@example.org"
    assert failed["smtp_code"] == 550
    assert "No such user" in failed["smtp_reply"]


def test_status_csv_cells_cannot_start_a_spreadsheet_formula(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A reply or address starting with = + - @ is prefixed, so a spreadsheet shows it as text."""
    smtp_server.fail_always("-dash@example.org", "rcpt", '550 =HYPHERLINK("http://x")')
    path = write_list([{"email": "-dash@example.org"}, {"email": "ok@example.org"}])
    assert run_cli("send", str(path), "--yes").exit_code == 3
    result = run_cli("status", "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0] == [
        "email",
        "step",
        "state",
        "attempts",
        "smtp_code",
        "smtp_reply",
        "message_id",
        "updated_at",
    ]
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@")), row
    assert rows[1][:3] == ["'-dash@example.org", "appeal", "failed"]
    assert rows[1][5].startswith("'=HYPHERLINK")


def test_status_table_lists_problems_with_their_replies(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """The table counts rows per state and lists failed rows with the server's reply."""
    smtp_server.fail_always("gone@example.org", "rcpt", "550 5.1.1 Mailbox gone")
    path = write_list([{"email": "gone@example.org"}, {"email": "here@example.org"}])
    run_cli("send", str(path), "--yes")
    table = run_cli("status").output
    assert "sent" in table
    assert "failed" in table
    assert "gone@example.org" in table
    assert "Mailbox gone" in table


def test_check_renders_every_row_and_shakes_hands_without_sending(
    run_cli: CliRun, example_list: Path, smtp_server: RecordingServer
) -> None:
    """`check LIST` renders every template for every row and does the SMTP handshake only."""
    result = run_cli("check", str(example_list))
    assert result.exit_code == 0, result.output
    for name in ("appeal", "protest", "reminder"):
        assert f"template {name}: rendered for all" in result.output
    assert "smtp: connected" in result.output
    assert "nothing was sent" in result.output
    assert smtp_server.connections >= 1
    assert smtp_server.messages == []


def test_check_names_the_template_and_row_that_fail(
    run_cli: CliRun, write_config: ConfigWriter, write_list: ListWriter, tmp_path: Path
) -> None:
    """`check` fails with exit 1 naming the template line and the list line."""
    templates = tmp_path / "t"
    templates.mkdir()
    (templates / "x.txt.j2").write_text(
        "Subject: Hello\n\n{{ recipient.missing_column }}\n", encoding="utf-8"
    )
    config = write_config(campaign={"templates": str(templates), "template": "x"})
    result = run_cli("check", str(write_list([{"email": "a@example.org"}])), config=config)
    assert result.exit_code == 1
    assert "x.txt.j2:3" in result.output
    assert "list line 2" in result.output


def test_a_typo_in_the_config_names_the_file_and_the_key(
    run_cli: CliRun, write_config: ConfigWriter, write_list: ListWriter
) -> None:
    """An unknown key stops with exit 1 and says which file and which key."""
    config = write_config(smtp={"hots": "mail.example.org"})
    result = run_cli("send", str(write_list([{"email": "a@example.org"}])), "--yes", config=config)
    assert result.exit_code == 1
    assert str(config) in result.output
    assert "[smtp] hots" in result.output
    assert "unknown key" in result.output


def test_out_without_dry_run_is_a_usage_error(run_cli: CliRun, example_list: Path) -> None:
    """`--out` only makes sense with `--dry-run`: exit 2."""
    result = run_cli("send", str(example_list), "--out", "x", "--yes")
    assert result.exit_code == 2


def test_a_list_with_no_valid_row_stops_with_exit_1(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer
) -> None:
    """A list whose every row is invalid sends nothing and says why, by line."""
    path = write_list([{"email": "nobody"}, {"email": "still@nobody@x"}])
    result = run_cli("send", str(path), "--yes")
    assert result.exit_code == 1
    assert "no valid recipients" in result.output
    assert "line 2" in result.output
    assert "line 3" in result.output
    assert smtp_server.messages == []


def test_init_writes_an_example_that_previews_at_once(tmp_path: Path) -> None:
    """`init DIR` writes config, templates and a list that a dry run accepts as they are."""
    target = tmp_path / "campaign"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    subprocess.run(
        [sys.executable, "-m", "appeal_mailer", "init", str(target)], check=True, env=env
    )
    assert (target / "config.toml").is_file()
    preview = subprocess.run(
        [
            sys.executable,
            "-m",
            "appeal_mailer",
            "--config",
            "config.toml",
            "send",
            "lists/example.csv",
            "--dry-run",
            "--out",
            "preview",
        ],
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert preview.returncode == 0, preview.stderr + preview.stdout
    assert len(list((target / "preview").glob("*.eml"))) == 2
    again = subprocess.run(
        [sys.executable, "-m", "appeal_mailer", "init", str(target)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kept" in again.stdout


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The README's dry-run command works word for word on the shipped example."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in quick_start.splitlines() if "--dry-run" in line)
    install, _, run = command.partition(" && ")
    assert install == "pip install ."
    args = run.split()
    assert args[0] == "appeal-mailer"
    args = args[1:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPEAL_MAILER_")}
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("config.example.toml", "templates", "lists"):
        source = ROOT / name
        if source.is_dir():
            subprocess.run(["cp", "-r", str(source), str(work / name)], check=True)
        else:
            (work / name).write_bytes(source.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "appeal_mailer", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert list(work.rglob("*.eml"))
    assert EXAMPLE_LIST.exists()


def test_dry_run_of_a_finished_campaign_writes_an_empty_preview_and_exits_0(
    run_cli: CliRun, write_list: ListWriter, subscribers: list[dict[str, str]], tmp_path: Path
) -> None:
    """After everything was sent, a dry run has nothing to render; it says so, exit 0."""
    path = write_list(subscribers)
    assert run_cli("send", str(path), "--yes").exit_code == 0
    out = tmp_path / "nothing-left"
    result = run_cli("send", str(path), "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert list(out.glob("*.eml")) == []
    assert "0 written" in (out / "summary.txt").read_text(encoding="utf-8")


def test_status_shows_the_run_log_newest_first(
    run_cli: CliRun,
    write_list: ListWriter,
    subscribers: list[dict[str, str]],
    smtp_server: RecordingServer,
) -> None:
    """The status table ends with the latest runs: command, step and what each did."""
    path = write_list(subscribers)
    assert run_cli("send", str(path), "--yes", "--limit", "4").exit_code == 0
    assert run_cli("send", str(path), "--yes").exit_code == 0
    table = run_cli("status").output
    log = table.split("Latest runs:", 1)[1].strip().splitlines()
    assert len(log) == 2
    assert log[0].startswith("#2 ")
    assert "send appeal: 6 sent" in log[0]
    assert "send appeal: 4 sent" in log[1]


@pytest.mark.parametrize("uvloop_installed", [True, False], ids=["uvloop", "asyncio"])
def test_send_runs_on_uvloop_when_it_is_installed_and_on_asyncio_otherwise(
    run_cli: CliRun,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
    uvloop_installed: bool,
) -> None:
    """The `fast` extra's uvloop is used when importable; without it the run is the same."""
    import asyncio  # noqa: PLC0415  # only this test looks at the loop

    from appeal_mailer.campaign import CampaignRun  # noqa: PLC0415

    loops: list[str] = []
    real_run = CampaignRun.run

    async def run(self: CampaignRun, *args: object, **kwargs: object) -> object:
        loops.append(type(asyncio.get_running_loop()).__module__)
        return await real_run(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CampaignRun, "run", run)
    if not uvloop_installed:
        monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    people = [{"email": f"m{i}@example.org", "name": f"M {i}"} for i in range(5)]
    result = run_cli("send", str(write_list(people)), "--yes")
    assert result.exit_code == 0, result.output
    assert len(smtp_server.messages) == 5
    assert loops == (["uvloop"] if uvloop_installed else ["asyncio.unix_events"])
