"""The exception tree: every failure the user can see, carrying its facts.

    AppealMailerError                 root; ``str()`` is the message, ``.hint`` what to do
    +-- ConfigError(path, key)        a bad or missing setting
    +-- ListError(path, line, field)  the list cannot be read at all (not one bad row)
    +-- TemplateError(template, line, recipient_line)
    +-- LedgerError(location)         the ledger cannot be opened or written
    +-- ServerError(host, port, code, reply)
    |                                 the SMTP server cannot be used at all:
    |                                 unreachable, no TLS, AUTH refused
    +-- PreviewError(folder)          a dry run's folder cannot be written
    +-- DeliveryError(recipient, code, reply)
        +-- TransientDeliveryError    4xx, dropped connection, timeout: retry later
        +-- PermanentDeliveryError    5xx: never retried for this recipient

Third-party errors (aiosmtplib, SQLAlchemy, Jinja2, pydantic) are translated
into these in the one module that talks to that library, with ``raise ... from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class AppealMailerError(Exception):
    """Root of every error appeal-mailer reports to its user."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its message and attributes, not through __init__ (whose
        # keyword-only facts pickle's default would drop): errors raised in the
        # ledger's process reach the sender whole (ledger_process.py).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[AppealMailerError], args: tuple[Any, ...], state: dict[str, Any]
) -> AppealMailerError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(AppealMailerError):
    """A setting is missing, unknown or invalid."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = path
        self.key = key
        where = ": ".join(part for part in (str(path) if path else None, key) if part)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)


class ListError(AppealMailerError):
    """The subscriber list as a whole cannot be used (no header, no email column, bad bytes)."""

    def __init__(
        self,
        message: str,
        *,
        path: Path,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        where = f"{path}:{line}" if line is not None else str(path)
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}", hint=hint)


class TemplateError(AppealMailerError):
    """A template cannot be loaded, or cannot be rendered for one recipient."""

    def __init__(
        self,
        message: str,
        *,
        template: str,
        line: int | None = None,
        recipient_line: int | None = None,
        recipient: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.template = template
        self.line = line
        self.recipient_line = recipient_line
        self.recipient = recipient
        where = f"{template}:{line}" if line is not None else template
        if recipient_line is not None:
            where += f" (list line {recipient_line}, {recipient})"
        super().__init__(f"{where}: {message}", hint=hint)


class LedgerError(AppealMailerError):
    """The delivery ledger cannot be opened, migrated or written."""

    def __init__(self, message: str, *, location: str, hint: str | None = None) -> None:
        self.location = location
        super().__init__(f"ledger {location}: {message}", hint=hint)


class ServerError(AppealMailerError):
    """The SMTP server cannot be used at all: nothing can be sent through it now."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        port: int,
        code: int | None = None,
        reply: str | None = None,
        transient: bool = False,
        hint: str | None = None,
    ) -> None:
        self.host = host
        # True when trying again later may work (connection refused, 4xx greeting).
        self.transient = transient
        self.port = port
        self.code = code
        self.reply = reply
        said = f" (server said: {code} {reply})" if code is not None else ""
        super().__init__(f"{host}:{port}: {message}{said}", hint=hint)


class PreviewError(AppealMailerError):
    """A dry run's folder cannot be written (full, gone): nothing more can be shown."""

    def __init__(self, folder: Path, exc: OSError) -> None:
        self.folder = str(folder)
        super().__init__(
            f"{folder}: cannot write the preview: {exc.strerror or exc}",
            hint="free some space, or pass a writable folder with --out",
        )


class DeliveryError(AppealMailerError):
    """One message could not be delivered to one recipient."""

    def __init__(
        self,
        message: str,
        *,
        recipient: str,
        code: int | None = None,
        reply: str | None = None,
        after_data: bool = False,
    ) -> None:
        self.recipient = recipient
        self.code = code
        self.reply = reply
        # True when the connection failed after the final "." of DATA was sent:
        # the server may have accepted the message (RFC 1047), so its fate is unknown.
        self.after_data = after_data
        super().__init__(f"{recipient}: {message}")


class TransientDeliveryError(DeliveryError):
    """A 4xx reply, a dropped connection or a timeout: worth trying again later."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply: the server refused this message for good (RFC 5321 4.2.1)."""
