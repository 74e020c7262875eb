"""Settings: the TOML file plus environment overrides, validated once at the edge.

After ``load_settings()`` returns, every value is checked and every relative
path is resolved against the config file's folder (cron runs from anywhere),
so no other module re-checks settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pytimeparse.timeparse import timeparse

from appeal_mailer.errors import ConfigError
from appeal_mailer.models import NAME_MAX, NAME_PATTERN

ENV_PREFIX = "APPEAL_MAILER_"
CONFIG_ENV = "APPEAL_MAILER_CONFIG"
SECRETS_DIR_ENV = "APPEAL_MAILER_SECRETS_DIR"
DEFAULT_CONFIG = Path("config.toml")

DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpSettings(_Section):
    host: str = "localhost"
    # Absent: 587 for starttls, 465 for tls, 25 for none (filled in by _default_port).
    port: int = Field(default=0, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: SecretStr | None = None
    timeout: float = Field(default=30.0, gt=0)
    connections: int = Field(default=4, ge=1, le=64)
    local_hostname: str | None = None
    ca_file: Path | None = None
    verify_tls: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("port"):
            security = data.get("security", "starttls")
            return {**data, "port": DEFAULT_PORTS.get(security, 587)}
        return data

    @model_validator(mode="after")
    def _check_security(self) -> SmtpSettings:
        if self.security == "none":
            if not _is_loopback(self.host):
                raise ValueError(
                    f"security = 'none' is only allowed to a loopback host, not {self.host!r}; "
                    "use 'starttls' (port 587) or 'tls' (port 465)"
                )
            if self.username:
                raise ValueError("username is set but security = 'none': never AUTH without TLS")
        if self.username and self.password is None:
            raise ValueError(
                "username is set but no password: set APPEAL_MAILER_SMTP__PASSWORD "
                "or put it in the secrets directory as smtp__password"
            )
        return self


def _duration(value: Any) -> timedelta:
    """ "3 days", "36h", "1 day 12 hours", "90 minutes" (pytimeparse), or seconds as a number."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds: float | None = float(value)
    elif isinstance(value, str):
        seconds = timeparse(value)
    else:
        seconds = None
    if seconds is None or seconds < 0:
        raise ValueError(f"{value!r} is not a duration such as '3 days', '36h' or '90 minutes'")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(_duration)]
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class SendWindow(NamedTuple):
    """Local hours and weekdays in which a subscriber may be mailed (in their own zone)."""

    opens: time
    closes: time  # at or before `opens`: the window runs past midnight
    weekdays: frozenset[int]  # 0 = Monday, as datetime.weekday()


class SendingSettings(_Section):
    rate: float = Field(default=5.0, ge=0, description="messages per second, 0 = unlimited")
    max_attempts: int = Field(default=8, ge=1, le=100)
    attempts_per_run: int = Field(default=3, ge=1, le=100)
    retry_backoff: float = Field(default=1.0, ge=0)
    retry_max_delay: float = Field(default=600.0, ge=0)
    domain_limits: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    # "09:00-20:00": mail each subscriber only between these hours of their own time
    # zone (the list's `timezone` column, else [campaign] timezone); absent: any time.
    window: str | None = None
    # The weekdays the window is open ("mon" ... "sun"); all by default.
    weekdays: tuple[str, ...] = _WEEKDAYS

    @field_validator("domain_limits")
    @classmethod
    def _lowercase_domains(cls, value: dict[str, float]) -> dict[str, float]:
        return {domain.strip().lower().rstrip("."): rate for domain, rate in value.items()}

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_window(value)
        return value

    @field_validator("weekdays")
    @classmethod
    def _check_weekdays(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        days = tuple(day.strip().lower()[:3] for day in value)
        unknown = [day for day in days if day not in _WEEKDAYS]
        if unknown or not days:
            raise ValueError(f"weekdays must be some of {', '.join(_WEEKDAYS)}, not {value!r}")
        return days

    @property
    def send_window(self) -> SendWindow | None:
        if self.window is None and len(set(self.weekdays)) == len(_WEEKDAYS):
            return None
        opens, closes = _parse_window(self.window or "00:00-00:00")
        return SendWindow(opens, closes, frozenset(_WEEKDAYS.index(d) for d in self.weekdays))


class CampaignSettings(_Section):
    id: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    from_: str = Field(alias="from")
    reply_to: str | None = None
    list_id: str
    template: str = Field(default="appeal", pattern=NAME_PATTERN, max_length=NAME_MAX)
    templates: Path = Path("templates")
    timezone: str = "UTC"
    language: str = "en"
    # A language with no templates of its own, to one that has: {kk = "ru"}.
    fallback_languages: dict[str, str] = Field(default_factory=dict)
    unsubscribe_mailto: str | None = None
    unsubscribe_url: str | None = None
    unsubscribe_key: SecretStr | None = None
    context: dict[str, Any] = Field(default_factory=dict)

    @property
    def sender(self) -> tuple[str, str]:
        """The From display name (maybe empty) and normalized address."""
        return _parse_mailbox(self.from_, "from")

    @property
    def reply_to_mailbox(self) -> tuple[str, str] | None:
        return None if self.reply_to is None else _parse_mailbox(self.reply_to, "reply_to")

    @property
    def list_id_parts(self) -> tuple[str, str]:
        """The List-Id phrase (maybe empty) and its dot-atom identifier."""
        return _parse_list_id(self.list_id)

    # Single-key checks are field validators so that the error names the key
    # ("[campaign] list_id"), not only the section; parsed once here so that a bad
    # value is reported at load time.
    @field_validator("from_")
    @classmethod
    def _check_from(cls, value: str) -> str:
        _parse_mailbox(value, "from")
        return value

    @field_validator("reply_to")
    @classmethod
    def _check_reply_to(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_mailbox(value, "reply_to")
        return value

    @field_validator("list_id")
    @classmethod
    def _check_list_id(cls, value: str) -> str:
        _parse_list_id(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {value!r} is not an IANA time zone") from exc
        return value

    @model_validator(mode="after")
    def _check_campaign(self) -> CampaignSettings:
        if not (self.unsubscribe_mailto or self.unsubscribe_url):
            raise ValueError(
                "set unsubscribe_mailto or unsubscribe_url: bulk mail must carry "
                "List-Unsubscribe (RFC 2369)"
            )
        if self.unsubscribe_mailto:
            name, address = _parse_mailbox(self.unsubscribe_mailto, "unsubscribe_mailto")
            if name or address != self.unsubscribe_mailto.strip():
                raise ValueError(
                    f"unsubscribe_mailto must be a bare address such as "
                    f"{address!r}, without a name or angle brackets"
                )
        if self.unsubscribe_url:
            # RFC 2369 2: the URL goes into a header in angle brackets: ASCII, no spaces.
            if not re.match(r"^https?://[\x21-\x3b\x3d\x3f-\x7e]+$", self.unsubscribe_url):
                raise ValueError(
                    "unsubscribe_url must be an http(s) URL of ASCII characters without "
                    "spaces or angle brackets (percent-encode the rest)"
                )
            if "{token}" in self.unsubscribe_url and self.unsubscribe_key is None:
                raise ValueError(
                    "unsubscribe_url has {token} but no unsubscribe_key: set "
                    "APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY"
                )
        return self


class ReminderSettings(_Section):
    """One `[[reminders]]` entry: a follow-up that `remind` sends when it is due."""

    # The ledger step (and the Message-ID's part): one row per subscriber, sent once.
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    # The template to send [default: the name].
    template: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=NAME_MAX)
    # The earlier step whose `sent` rows it follows [default: [campaign] template].
    after_step: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=NAME_MAX)
    # Due this long after the subscriber's earlier step was sent.
    after: Duration
    # A reminder due longer ago than this is never sent: it is recorded `expired`.
    expires_after: Duration = timedelta(days=1)

    @property
    def template_name(self) -> str:
        return self.template or self.name


class LedgerSettings(_Section):
    path: Path = Path("appeal-mailer.db")
    # "power": every commit survives power loss (SQLite synchronous=FULL);
    # "crash": a crash of the process only (synchronous=NORMAL), cheaper.
    durability: Literal["power", "crash"] = "power"
    # A secret: a PostgreSQL URL may carry a password.
    url: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(
            r"^(postgresql|sqlite)(\+\w+)?://", value.get_secret_value()
        ):
            raise ValueError("url must start with postgresql:// (or sqlite://)")
        return value


# RFC 6376 3.1: a selector is one or more DNS labels; so is a domain (RFC 1035 2.3.1).
_DNS_NAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


class DkimSettings(_Section):
    """`[dkim]`: sign every message (RFC 6376); off while `domain` is unset."""

    # d=: the From address's domain, or a parent of it, for DMARC alignment.
    domain: str | None = None
    # s=: the key is published in the DNS at SELECTOR._domainkey.DOMAIN.
    selector: str | None = None
    # The RSA private key in PEM: a file, or the key itself (a secret: from the
    # environment or the secrets directory, never the config file).
    private_key_file: Path | None = None
    private_key: SecretStr | None = None

    @field_validator("domain", "selector")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().rstrip(".").lower()
        # RFC 1035 2.3.4: a name is at most 255 octets on the wire, 253 characters.
        if len(name) > 253:
            raise ValueError(f"{value[:40]!r}... is longer than a DNS name may be (253)")
        if not _DNS_NAME.match(name):
            raise ValueError(
                f"{value!r} is not a DNS name of ASCII letters, digits and hyphens "
                "(write an international domain in its xn-- form)"
            )
        return name

    @model_validator(mode="after")
    def _check_dkim(self) -> DkimSettings:
        if self.domain is None and self.selector is None:
            if self.private_key_file is not None or self.private_key is not None:
                raise ValueError("a DKIM key without domain and selector: set both, or neither")
            return self
        if self.domain is None or self.selector is None:
            raise ValueError("set both domain and selector, or neither (no DKIM signing)")
        # The key's name, SELECTOR._domainkey.DOMAIN, must fit in the DNS too.
        name = f"{self.selector}._domainkey.{self.domain}"
        if len(name) > 253:
            raise ValueError(f"{name} is longer than a DNS name may be (253 characters)")
        if (self.private_key_file is None) == (self.private_key is None):
            raise ValueError(
                "set private_key_file, or the key itself in APPEAL_MAILER_DKIM__PRIVATE_KEY "
                "(one of the two)"
            )
        return self


class Settings(BaseSettings):
    """Every setting appeal-mailer reads; `config.example.toml` documents each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        secrets_nested_delimiter="__",
        secrets_prefix="",
        extra="forbid",
        frozen=True,
    )

    smtp: SmtpSettings = SmtpSettings()
    sending: SendingSettings = SendingSettings()
    campaign: CampaignSettings
    ledger: LedgerSettings = LedgerSettings()
    reminders: tuple[ReminderSettings, ...] = ()
    dkim: DkimSettings = DkimSettings()
    # The file these settings came from; relative paths were resolved against it.
    source: Path = Path("config.toml")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the secrets directory, which beats the TOML file.
        return (env_settings, NestedSecretsSettingsSource(file_secret_settings), init_settings)

    @model_validator(mode="after")
    def _check_reminders(self) -> Settings:
        names = [reminder.name for reminder in self.reminders]
        for index, reminder in enumerate(self.reminders):
            if names.count(reminder.name) > 1:
                raise ValueError(f"reminders.{index}: two reminders named {reminder.name!r}")
            if reminder.name in {self.campaign.template, self.after_step(reminder)}:
                raise ValueError(
                    f"reminders.{index}: name {reminder.name!r} is already the step it follows "
                    "or the campaign's template; give the reminder its own name"
                )
        return self

    def after_step(self, reminder: ReminderSettings) -> str:
        """The step whose `sent` rows `reminder` follows."""
        return reminder.after_step or self.campaign.template

    @property
    def ledger_url(self) -> str:
        if self.ledger.url is not None:
            return self.ledger.url.get_secret_value()
        return f"sqlite:///{self.ledger.path}"


def config_path(explicit: Path | None) -> Path:
    """Where the config is: --config, else $APPEAL_MAILER_CONFIG, else ./config.toml."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    return Path(from_env) if from_env else DEFAULT_CONFIG


def load_settings(path: Path) -> Settings:
    """Read, merge and validate the settings, or raise a ConfigError naming file and key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "no such config file",
            path=path,
            hint="run `appeal-mailer init` for a working example, or pass --config FILE",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 (byte {exc.start})", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from exc

    if "source" in data:
        raise ConfigError("unknown key (a typo?)", path=path, key="source")
    for section, keys in _SECRET_KEYS.items():
        for key in keys:
            if key in data.get(section, {}):
                raise ConfigError(
                    "secrets do not belong in the config file",
                    path=path,
                    key=f"[{section}] {key}",
                    hint=f"set {ENV_PREFIX}{section.upper()}__{key.upper()} in the environment, "
                    f"or write it to the file {section}__{key} in ${SECRETS_DIR_ENV}",
                )

    secrets_dir = os.environ.get(SECRETS_DIR_ENV) or os.environ.get("CREDENTIALS_DIRECTORY")
    if secrets_dir and not Path(secrets_dir).is_dir():
        raise ConfigError(
            f"the secrets directory {secrets_dir} does not exist",
            path=path,
            hint=f"check ${SECRETS_DIR_ENV} (or $CREDENTIALS_DIRECTORY)",
        )
    try:
        settings = Settings(
            _secrets_dir=secrets_dir,  # type: ignore[call-arg]  # pydantic-settings init-only arg
            **data,
            source=path,
        )
    except ValidationError as exc:
        raise _config_error(exc, path) from None
    except SettingsError as exc:
        raise ConfigError(f"cannot read the settings: {exc}", path=path) from exc
    return _resolve_paths(settings, path.parent)


_SECRET_KEYS = {
    "smtp": ("password",),
    "campaign": ("unsubscribe_key",),
    "dkim": ("private_key",),
}


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    smtp = settings.smtp
    if smtp.ca_file is not None:
        smtp = smtp.model_copy(update={"ca_file": resolve(smtp.ca_file)})
    campaign = settings.campaign.model_copy(
        update={"templates": resolve(settings.campaign.templates)}
    )
    ledger = settings.ledger.model_copy(update={"path": resolve(settings.ledger.path)})
    dkim = settings.dkim
    if dkim.private_key_file is not None:
        dkim = dkim.model_copy(update={"private_key_file": resolve(dkim.private_key_file)})
    return settings.model_copy(
        update={"smtp": smtp, "campaign": campaign, "ledger": ledger, "dkim": dkim}
    )


def _config_error(exc: ValidationError, path: Path) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if loc and loc[0] in {"smtp", "sending", "campaign", "ledger", "dkim"}:
        key = f"[{loc[0]}] " + ".".join(loc[1:]) if len(loc) > 1 else f"[{loc[0]}]"
    elif len(loc) > 1 and loc[0] == "reminders" and loc[1].isdigit():
        # The n-th [[reminders]] entry of the file, counted from 1 as people count.
        key = f"[[reminders]] #{int(loc[1]) + 1} " + ".".join(loc[2:])
    else:
        key = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (a typo?)"
    elif first["type"] == "missing":
        message = "required, but missing"
    env_name = ENV_PREFIX + "__".join(part.upper() for part in loc)
    hint = None
    if env_name in os.environ:
        hint = f"the value comes from the environment variable {env_name}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(message, path=path, key=key or None, hint=hint)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_mailbox(value: str, key: str) -> tuple[str, str]:
    """Split 'Name <addr>' or 'addr' and validate the address; the name may be empty."""
    match = re.fullmatch(r"\s*(?:(.*?)\s*<([^<>]+)>|([^<>\s]+))\s*", value)
    if match is None or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{key} must be 'Name <address>' or 'address', not {value!r}")
    name = (match.group(1) or "").strip().strip('"')
    address = match.group(2) or match.group(3) or ""
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{key}: {exc}") from exc
    # The ASCII form (an IDN domain as "xn--"): it goes into headers and the envelope.
    return name, checked.ascii_email or checked.normalized


def _parse_list_id(value: str) -> tuple[str, str]:
    # RFC 2919 2: List-Id is an optional phrase and a dot-atom in angle brackets.
    match = re.fullmatch(r"\s*(.*?)\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)>\s*", value)
    if match is None or "." not in match.group(2):
        raise ValueError(
            "list_id must look like 'Campaign name <appeal.lists.example.org>' (RFC 2919)"
        )
    return match.group(1).strip().strip('"'), match.group(2)


def _parse_window(value: str) -> tuple[time, time]:
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if match is not None:
        h1, m1, h2, m2 = (int(part) for part in match.groups())
        if h1 < 24 and h2 <= 24 and m1 < 60 and m2 < 60:
            return time(h1, m1), time(0, 0) if h2 == 24 else time(h2, m2)
    raise ValueError(f"window must look like '09:00-20:00' (local hours), not {value!r}")
