"""Settings: the TOML file, environment overrides, secrets, validation and where errors point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from appeal_mailer.config import Settings, config_path, load_settings
from appeal_mailer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config.example.toml"


def minimal() -> dict[str, Any]:
    """The smallest valid config: only the required [campaign] keys."""
    return {
        "campaign": {
            "id": "karaganda-2003",
            "from": "Solidarity Committee <appeal@example.org>",
            "list_id": "Solidarity <karaganda.lists.example.org>",
            "unsubscribe_mailto": "unsubscribe@example.org",
        }
    }


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    """`minimal()` with `overrides` merged in, section by section; None removes a key."""
    data = minimal()
    for section, values in overrides.items():
        if isinstance(values, dict):
            target = data.setdefault(section, {})
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        else:
            data[section] = values
    return data


def write(
    folder: Path, overrides: dict[str, Any] | None = None, name: str = "config.toml"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(tomli_w.dumps(merged(overrides or {})), encoding="utf-8")
    return path


def load(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Settings:
    return load_settings(write(tmp_path, overrides))


def refused(tmp_path: Path, overrides: dict[str, Any]) -> ConfigError:
    path = write(tmp_path, overrides)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    error = excinfo.value
    assert error.path == path
    assert str(path) in str(error)
    return error


# -- the shipped example -------------------------------------------------------------


def test_shipped_example_config_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """config.example.toml is valid as shipped, from any working directory."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(EXAMPLE_CONFIG)
    assert settings.campaign.id == "karaganda-2003"
    assert settings.campaign.templates == ROOT / "templates"
    assert settings.ledger.path == ROOT / "appeal-mailer.db"
    assert settings.campaign.sender == ("Kazakhstan Solidarity Committee", "appeal@example.org")
    assert settings.campaign.context["court"]["timezone"] == "Asia/Almaty"
    assert settings.smtp.password is None
    assert settings.source == EXAMPLE_CONFIG


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    """Only the required keys: every other setting has the default the example documents."""
    settings = load(tmp_path)
    assert (settings.smtp.host, settings.smtp.port, settings.smtp.security) == (
        "localhost",
        587,
        "starttls",
    )
    assert settings.smtp.username == ""
    assert settings.smtp.verify_tls is True
    assert settings.sending.rate == 5.0
    assert settings.campaign.timezone == "UTC"
    assert settings.campaign.template == "appeal"


# -- environment overrides -----------------------------------------------------------


def test_environment_overrides_beat_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """APPEAL_MAILER_SMTP__HOST/PORT, SENDING__RATE and LEDGER__PATH win over the TOML values."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__HOST", "smtp.env.example")
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PORT", "2525")
    monkeypatch.setenv("APPEAL_MAILER_SENDING__RATE", "0.5")
    monkeypatch.setenv("APPEAL_MAILER_LEDGER__PATH", "/var/lib/appeal-mailer/env.db")
    settings = load(
        tmp_path,
        {
            "smtp": {"host": "smtp.file.example", "port": 587, "timeout": 12.0},
            "sending": {"rate": 3.0, "max_attempts": 4},
            "ledger": {"path": "file.db"},
        },
    )
    assert settings.smtp.host == "smtp.env.example"
    assert settings.smtp.port == 2525
    assert settings.sending.rate == 0.5
    assert settings.ledger.path == Path("/var/lib/appeal-mailer/env.db")
    # Keys the environment does not name still come from the file.
    assert settings.smtp.timeout == 12.0
    assert settings.sending.max_attempts == 4


def test_environment_override_works_without_the_section_in_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An override needs no [smtp] section in the file to apply."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__HOST", "relay.example.org")
    monkeypatch.setenv("APPEAL_MAILER_SMTP__SECURITY", "tls")
    settings = load(tmp_path)
    assert settings.smtp.host == "relay.example.org"
    assert settings.smtp.security == "tls"
    assert settings.smtp.port == 465


def test_bad_environment_value_names_the_key_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wrong value from the environment names the key and hints at the variable it came from."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PORT", "five-eight-seven")
    error = refused(tmp_path, {"smtp": {"port": 587}})
    assert error.key == "[smtp] port"
    assert error.hint is not None
    assert "APPEAL_MAILER_SMTP__PORT" in error.hint


# -- secrets -------------------------------------------------------------------------


def test_password_from_environment_is_a_secret_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """APPEAL_MAILER_SMTP__PASSWORD gives a SecretStr that repr/str of the settings never show."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", "correct-horse-battery")
    settings = load(tmp_path, {"smtp": {"username": "appeal@example.org"}})
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "correct-horse-battery"
    for shown in (repr(settings), str(settings), repr(settings.smtp), str(settings.smtp)):
        assert "correct-horse-battery" not in shown
    assert "**********" in repr(settings.smtp)


def test_password_never_appears_in_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When a setting next to the password is refused, the error does not quote the password."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", "correct-horse-battery")
    error = refused(
        tmp_path, {"smtp": {"security": "none", "host": "127.0.0.1", "username": "appeal"}}
    )
    assert "correct-horse-battery" not in str(error)
    assert "correct-horse-battery" not in (error.hint or "")


def test_password_from_secrets_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The file smtp__password in $APPEAL_MAILER_SECRETS_DIR is the password, newline cut."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "smtp__password").write_text("from-the-secrets-dir\n", encoding="utf-8")
    monkeypatch.setenv("APPEAL_MAILER_SECRETS_DIR", str(secrets))
    settings = load(tmp_path / "conf", {"smtp": {"username": "appeal@example.org"}})
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "from-the-secrets-dir"
    assert "from-the-secrets-dir" not in repr(settings)


def test_a_secrets_directory_that_does_not_exist_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mistyped $APPEAL_MAILER_SECRETS_DIR is named, not silently ignored."""
    monkeypatch.setenv("APPEAL_MAILER_SECRETS_DIR", str(tmp_path / "no-such-dir"))
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "conf", {})
    assert "no-such-dir" in str(caught.value)
    assert "does not exist" in str(caught.value)


def test_environment_beats_the_secrets_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the password in both, the environment variable wins."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "smtp__password").write_text("from-file", encoding="utf-8")
    monkeypatch.setenv("APPEAL_MAILER_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", "from-env")
    settings = load(tmp_path / "conf", {"smtp": {"username": "appeal@example.org"}})
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "from-env"


def test_unsubscribe_key_from_secrets_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """campaign__unsubscribe_key in the secrets directory serves an unsubscribe_url {token}."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "campaign__unsubscribe_key").write_text("signing-key", encoding="utf-8")
    monkeypatch.setenv("APPEAL_MAILER_SECRETS_DIR", str(secrets))
    settings = load(
        tmp_path / "conf",
        {"campaign": {"unsubscribe_url": "https://lists.example.org/u?t={token}"}},
    )
    assert settings.campaign.unsubscribe_key is not None
    assert settings.campaign.unsubscribe_key.get_secret_value() == "signing-key"


@pytest.mark.parametrize(
    ("section", "key", "variable"),
    [
        ("smtp", "password", "APPEAL_MAILER_SMTP__PASSWORD"),
        ("campaign", "unsubscribe_key", "APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY"),
    ],
)
def test_secret_written_in_the_file_is_refused(
    tmp_path: Path, section: str, key: str, variable: str
) -> None:
    """A password in the TOML is refused naming `[smtp] password`, hinting at the env variable."""
    error = refused(tmp_path, {section: {key: "oops-committed"}})
    assert error.key == f"[{section}] {key}"
    assert f"[{section}] {key}" in str(error)
    assert "oops-committed" not in str(error)
    assert error.hint is not None
    assert variable in error.hint
    assert f"{section}__{key}" in error.hint


# -- unknown keys, wrong types, broken files -----------------------------------------


def test_unknown_key_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    """A typo such as `[smtp] hots` is refused, not silently ignored."""
    error = refused(tmp_path, {"smtp": {"hots": "smtp.example.org"}})
    assert error.key == "[smtp] hots"
    assert "unknown key" in str(error)


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    """A misspelt section such as `[smpt]` is refused, naming it."""
    error = refused(tmp_path, {"smpt": {"host": "smtp.example.org"}})
    assert error.key == "smpt"
    assert "unknown key" in str(error)


def test_unknown_key_in_campaign_is_refused(tmp_path: Path) -> None:
    """`[campaign] reply-to` (a dash for the underscore) is refused naming the key."""
    error = refused(tmp_path, {"campaign": {"reply-to": "x@example.org"}})
    assert error.key == "[campaign] reply-to"


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    """A port given as words is refused naming `[smtp] port`."""
    error = refused(tmp_path, {"smtp": {"port": "five-eight-seven"}})
    assert error.key == "[smtp] port"
    assert "[smtp] port" in str(error)
    assert "integer" in str(error)


def test_out_of_range_value_names_the_key(tmp_path: Path) -> None:
    """A negative rate is refused naming `[sending] rate`."""
    error = refused(tmp_path, {"sending": {"rate": -1}})
    assert error.key == "[sending] rate"


def test_missing_required_key_names_it(tmp_path: Path) -> None:
    """A config without `[campaign] from` says it is required and missing."""
    error = refused(tmp_path, {"campaign": {"from": None}})
    assert error.key == "[campaign] from"
    assert "missing" in str(error)


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error is a ConfigError naming the file and the line of the mistake."""
    path = tmp_path / "config.toml"
    path.write_text('[smtp]\nhost = "smtp.example.org"\nport = = 587\n', encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    assert excinfo.value.path == path
    assert str(path) in str(excinfo.value)
    assert "line 3" in str(excinfo.value)


def test_missing_file_is_refused_with_a_hint_to_run_init(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError whose hint mentions `init`."""
    path = tmp_path / "nowhere" / "config.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    assert excinfo.value.path == path
    assert excinfo.value.hint is not None
    assert "init" in excinfo.value.hint


def test_config_with_bom_is_read(tmp_path: Path) -> None:
    """A config saved by an editor with a UTF-8 BOM loads."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(minimal()).encode())
    assert load_settings(path).campaign.id == "karaganda-2003"


# -- [smtp] --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["smtp.example.org", "192.0.2.10", "::ffff:192.0.2.10"])
def test_security_none_to_a_remote_host_is_refused(tmp_path: Path, host: str) -> None:
    """security = 'none' is only for a loopback host: plain SMTP over a network is refused."""
    error = refused(tmp_path, {"smtp": {"security": "none", "host": host}})
    assert error.key is not None
    assert error.key.startswith("[smtp]")
    assert "loopback" in str(error)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "[::1]", "127.0.0.53"])
def test_security_none_to_a_loopback_host_is_allowed(tmp_path: Path, host: str) -> None:
    """security = 'none' to a local relay or test server loads, on port 25 by default."""
    settings = load(tmp_path, {"smtp": {"security": "none", "host": host}})
    assert settings.smtp.security == "none"
    assert settings.smtp.port == 25


def test_username_without_tls_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AUTH over a plain connection is refused, even to localhost and with a password."""
    monkeypatch.setenv("APPEAL_MAILER_SMTP__PASSWORD", "secret")
    error = refused(
        tmp_path, {"smtp": {"security": "none", "host": "localhost", "username": "appeal"}}
    )
    assert error.key is not None
    assert error.key.startswith("[smtp]")
    assert "without TLS" in str(error)


def test_username_without_password_is_refused(tmp_path: Path) -> None:
    """A username with no password anywhere is refused, saying where a password can come from."""
    error = refused(tmp_path, {"smtp": {"username": "appeal@example.org"}})
    assert error.key is not None
    assert error.key.startswith("[smtp]")
    assert "APPEAL_MAILER_SMTP__PASSWORD" in str(error)


def test_no_username_means_no_password_needed(tmp_path: Path) -> None:
    """Without a username (no AUTH) no password is asked for."""
    settings = load(tmp_path, {"smtp": {"host": "relay.example.org"}})
    assert settings.smtp.username == ""
    assert settings.smtp.password is None


@pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("tls", 465), ("none", 25)])
def test_default_port_follows_security(tmp_path: Path, security: str, port: int) -> None:
    """Without a port: 587 for starttls, 465 for tls, 25 for none."""
    settings = load(tmp_path, {"smtp": {"security": security}})
    assert settings.smtp.port == port


def test_explicit_port_is_kept(tmp_path: Path) -> None:
    """A port in the file is used as given, whatever the security."""
    settings = load(tmp_path, {"smtp": {"security": "tls", "port": 2465}})
    assert settings.smtp.port == 2465


def test_unknown_security_is_refused(tmp_path: Path) -> None:
    """security must be starttls, tls or none."""
    error = refused(tmp_path, {"smtp": {"security": "ssl"}})
    assert error.key == "[smtp] security"


# -- relative paths ------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ledger.path, campaign.templates and smtp.ca_file are relative to the config's folder."""
    folder = tmp_path / "etc" / "appeal"
    path = write(
        folder,
        {
            "smtp": {"ca_file": "certs/relay-ca.pem"},
            "campaign": {"templates": "my-templates"},
            "ledger": {"path": "state/ledger.db"},
        },
    )
    elsewhere = tmp_path / "cron-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(path)
    assert settings.ledger.path == folder / "state" / "ledger.db"
    assert settings.campaign.templates == folder / "my-templates"
    assert settings.smtp.ca_file == folder / "certs" / "relay-ca.pem"


def test_default_paths_also_resolve_against_the_config_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without ledger.path or templates, the defaults are in the config file's folder."""
    folder = tmp_path / "conf"
    path = write(folder)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path)
    assert settings.ledger.path == folder / "appeal-mailer.db"
    assert settings.campaign.templates == folder / "templates"
    assert settings.ledger_url == f"sqlite:///{folder / 'appeal-mailer.db'}"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """An absolute ledger path is used as written."""
    target = tmp_path / "var" / "ledger.db"
    settings = load(tmp_path / "conf", {"ledger": {"path": str(target)}})
    assert settings.ledger.path == target


# -- [campaign] ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "campaign_id", ["has space", "-leading-dash", "slash/inside", "x" * 65, "", "ünicode"]
)
def test_campaign_id_pattern_is_enforced(tmp_path: Path, campaign_id: str) -> None:
    """A campaign id that could not go into a Message-ID or a file name is refused."""
    error = refused(tmp_path, {"campaign": {"id": campaign_id}})
    assert error.key == "[campaign] id"


@pytest.mark.parametrize("campaign_id", ["karaganda-2003", "a", "A.b_c-1", "x" * 64])
def test_good_campaign_ids_are_accepted(tmp_path: Path, campaign_id: str) -> None:
    """Letters, digits, '.', '_' and '-' up to 64 characters make a campaign id."""
    assert load(tmp_path, {"campaign": {"id": campaign_id}}).campaign.id == campaign_id


@pytest.mark.parametrize(
    "list_id",
    [
        "Solidarity",
        "Solidarity <nodot>",
        "Solidarity <has space.example.org>",
        "<a.example.org",
        "Solidarity <a.example.org>\r\nBcc: victim@example.com",
    ],
)
def test_list_id_must_be_rfc_2919_shaped(tmp_path: Path, list_id: str) -> None:
    """list_id must be an optional phrase and a dotted id in angle brackets (RFC 2919)."""
    error = refused(tmp_path, {"campaign": {"list_id": list_id}})
    assert error.key == "[campaign] list_id"
    assert "RFC 2919" in str(error)


def test_list_id_parts_are_split(tmp_path: Path) -> None:
    """A good list_id yields its phrase and its identifier."""
    settings = load(tmp_path, {"campaign": {"list_id": '"Kazakhstan Solidarity" <k.lists.org>'}})
    assert settings.campaign.list_id_parts == ("Kazakhstan Solidarity", "k.lists.org")


@pytest.mark.parametrize(
    "sender", ["not an address", "Committee <>", "A <a@example.org>\nBcc: victim@example.com"]
)
def test_bad_from_is_refused_naming_the_key(tmp_path: Path, sender: str) -> None:
    """A From that is not 'Name <address>' or 'address' (or hides a header) is refused."""
    error = refused(tmp_path, {"campaign": {"from": sender}})
    assert error.key == "[campaign] from"


def test_unsubscribe_url_with_token_needs_a_key(tmp_path: Path) -> None:
    """unsubscribe_url with {token} and no unsubscribe_key is refused, naming the env variable."""
    error = refused(
        tmp_path, {"campaign": {"unsubscribe_url": "https://lists.example.org/u?t={token}"}}
    )
    assert error.key is not None
    assert error.key.startswith("[campaign]")
    assert "unsubscribe_key" in str(error)
    assert "APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY" in str(error)


def test_unsubscribe_url_with_token_and_key_from_environment_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY set, a {token} URL is accepted, key hidden."""
    monkeypatch.setenv("APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY", "sign-me")
    settings = load(
        tmp_path,
        {
            "campaign": {
                "unsubscribe_url": "https://lists.example.org/u?t={token}",
                "unsubscribe_mailto": None,
            }
        },
    )
    assert settings.campaign.unsubscribe_key is not None
    assert settings.campaign.unsubscribe_key.get_secret_value() == "sign-me"
    assert "sign-me" not in repr(settings)


def test_unsubscribe_url_without_token_needs_no_key(tmp_path: Path) -> None:
    """A fixed unsubscribe page (no {token}) is fine without a signing key."""
    settings = load(
        tmp_path,
        {
            "campaign": {
                "unsubscribe_url": "https://lists.example.org/unsubscribe",
                "unsubscribe_mailto": None,
            }
        },
    )
    assert settings.campaign.unsubscribe_url == "https://lists.example.org/unsubscribe"


@pytest.mark.parametrize("url", ["ftp://lists.example.org/u", "https://a b.example.org/", "x"])
def test_unsubscribe_url_must_be_http(tmp_path: Path, url: str) -> None:
    """An unsubscribe_url that is not an http(s) URL without spaces is refused."""
    error = refused(tmp_path, {"campaign": {"unsubscribe_url": url}})
    assert error.key is not None
    assert error.key.startswith("[campaign]")
    assert "unsubscribe_url" in str(error)


def test_neither_unsubscribe_mailto_nor_url_is_refused(tmp_path: Path) -> None:
    """Bulk mail must carry List-Unsubscribe: a campaign with no way to unsubscribe is refused."""
    error = refused(tmp_path, {"campaign": {"unsubscribe_mailto": None}})
    assert error.key is not None
    assert error.key.startswith("[campaign]")
    assert "unsubscribe_mailto" in str(error)
    assert "unsubscribe_url" in str(error)


@pytest.mark.parametrize("timezone", ["Mars/Olympus_Mons", "GMT+25", "../../etc/passwd"])
def test_bad_campaign_timezone_is_refused(tmp_path: Path, timezone: str) -> None:
    """A campaign timezone that is not an IANA zone is refused naming `[campaign] timezone`."""
    error = refused(tmp_path, {"campaign": {"timezone": timezone}})
    assert error.key == "[campaign] timezone"
    assert "IANA" in str(error)


# -- where the config is -------------------------------------------------------------


def test_config_path_explicit_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config FILE wins over $APPEAL_MAILER_CONFIG."""
    monkeypatch.setenv("APPEAL_MAILER_CONFIG", "/etc/appeal/from-env.toml")
    assert config_path(Path("explicit.toml")) == Path("explicit.toml")


def test_config_path_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config, $APPEAL_MAILER_CONFIG names the file."""
    monkeypatch.setenv("APPEAL_MAILER_CONFIG", "/etc/appeal/from-env.toml")
    assert config_path(None) == Path("/etc/appeal/from-env.toml")


def test_config_path_defaults_to_config_toml_in_cwd() -> None:
    """With neither, it is ./config.toml."""
    assert config_path(None) == Path("config.toml")


def test_config_path_ignores_an_empty_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty $APPEAL_MAILER_CONFIG counts as unset."""
    monkeypatch.setenv("APPEAL_MAILER_CONFIG", "")
    assert config_path(None) == Path("config.toml")


def test_config_variable_is_not_taken_for_a_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$APPEAL_MAILER_CONFIG shares the settings prefix but is not refused as an unknown key."""
    path = write(tmp_path)
    monkeypatch.setenv("APPEAL_MAILER_CONFIG", str(path))
    assert load_settings(config_path(None)).source == path
